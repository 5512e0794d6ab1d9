-- tests/cgroup.lua: fireclaw.cgroup and proc.spawn's cgroup option. Layout detection and
-- the v2 file writes run against fake trees in a temporary directory (a host whose
-- controllers are bound to v1 cannot mount a cgroup2 with controllers); the v1 limits,
-- joining between fork and exec, and removal with a process still inside run against
-- this host's real hierarchies; the v2 join, cgroup.kill and removal against the real
-- cgroup2 mount when there is one. Everything is named fct-cg<pid>-… and removed at the
-- end, also when a test fails halfway.
local t = require "tap"
local cgroup = require "fireclaw.cgroup"
local fs = require "fireclaw.fs"
local proc = require "fireclaw.proc"
local runtime = require "fireclaw.runtime"

local function read(path)
	local f = io.open(path)
	if not f then return nil end
	local s = f:read("*a")
	f:close()
	return s
end

local function trim(s) return s and (s:gsub("%s+$", "")) end
local function put(path, data)
	local f = assert(io.open(path, "w"))
	f:write(data)
	f:close()
end

local PID = read("/proc/self/stat"):match("^(%d+)")
local NAME = "fct-cg" .. PID
local tmp = os.tmpname()
os.remove(tmp)
fs.mkdir(tmp, "700")
local MIB = 1024 * 1024

-- ---- pure parts: limits, plans, detection on fake trees ----

local lim = cgroup.limits { mem_mib = 256 }
t.is(lim.memory, (256 + 64 + 64) * MIB, "memory limit: 256 MiB guest + 64 MiB + 25%")
t.is(lim.pids, 256, "pids limit")
t.is(lim.cpus, nil, "no CPU limit unless asked")
t.is(cgroup.limits({ mem_mib = 1000, cpus = 0.5 }).memory, (1000 + 250 + 64) * MIB, "a bigger guest's limit")
t.raises(function() cgroup.limits { mem_mib = 256, cpus = 0 } end, "cpus must be a positive number", "cpus 0 refused")
t.raises(function() cgroup.limits { mem_mib = 256, cpus = "x" } end, "cpus must be a positive number",
	"cpus not a number refused")

-- this host's kind of mount table: v1 controllers plus an empty cgroup2 (hybrid)
local HYBRID = table.concat({
	"tmpfs /sys/fs/cgroup tmpfs rw 0 0",
	"cgroup " .. tmp .. "/v1/cpu,cpuacct cgroup rw,relatime,cpu,cpuacct 0 0",
	"cgroup " .. tmp .. "/v1/memory cgroup rw,relatime,memory 0 0",
	"cgroup " .. tmp .. "/v1/pids cgroup rw,relatime,pids 0 0",
	"cgroup " .. tmp .. "/v1/cpuset cgroup rw,relatime,cpuset 0 0",
	"cgroup2 " .. tmp .. "/unified cgroup2 rw,relatime 0 0",
}, "\n")
fs.mkdir_p(tmp .. "/unified", "755")
put(tmp .. "/unified/cgroup.controllers", "")
local l1 = cgroup.detect { mounts = HYBRID }
t.is(l1.version, 1, "hybrid host: v1 (its cgroup2 has no controllers)")
t.same(l1.controllers, { "memory", "pids", "cpu" }, "hybrid host: v1 controllers found")
t.is(l1.mounts.cpu, tmp .. "/v1/cpu,cpuacct", "cpu found in a cpu,cpuacct hierarchy")
t.is(cgroup.describe(l1), "v1 memory,pids,cpu", "describe v1")

local V2 = "cgroup2 " .. tmp .. "/v2 cgroup2 rw,nsdelegate 0 0\n"
fs.mkdir_p(tmp .. "/v2", "755")
put(tmp .. "/v2/cgroup.controllers", "cpuset cpu io memory hugetlb pids rdma misc\n")
local l2 = cgroup.detect { mounts = V2 }
t.is(l2.version, 2, "v2-only host: v2")
t.same(l2.controllers, { "memory", "pids", "cpu" }, "v2 controllers found")
t.is(cgroup.describe(l2), "v2 memory,pids,cpu", "describe v2")
put(tmp .. "/v2/cgroup.controllers", "pids\n")
t.same(cgroup.detect({ mounts = V2 }).controllers, { "pids" }, "v2 with only pids")

t.is(cgroup.detect({ mounts = (HYBRID:gsub("rw,relatime,", "ro,relatime,")) }).version, nil,
	"read-only cgroup mounts (a container's view) do not count")

local none = cgroup.detect { mounts = "proc /proc proc rw 0 0\n" }
t.is(none.version, nil, "no cgroup mounts: none")
t.like(cgroup.describe(none), "^none: VMs run without limits", "describe none")
t.like(cgroup.describe(cgroup.detect { mounts = "cgroup2 " .. tmp .. "/unified cgroup2 rw 0 0\n" }),
	"^none: .*has no memory, pids or cpu", "an empty cgroup2 alone: none, and why")
t.is(cgroup.plan("x", lim, none), nil, "no plan without a layout")

local p1 = cgroup.plan("fc-abc", lim, l1)
t.same(p1.dirs, { tmp .. "/v1/memory/fireclaw/fc-abc", tmp .. "/v1/pids/fireclaw/fc-abc" },
	"v1 plan without --cpus: memory and pids only")
t.same(p1.procs, { tmp .. "/v1/memory/fireclaw/fc-abc/cgroup.procs", tmp .. "/v1/pids/fireclaw/fc-abc/cgroup.procs" },
	"v1 plan: the cgroup.procs files for spawn")
local p1c = cgroup.plan("fc-abc", cgroup.limits { mem_mib = 256, cpus = 1.5 }, l1)
t.is(p1c.dirs[3], tmp .. "/v1/cpu,cpuacct/fireclaw/fc-abc", "v1 plan with --cpus: the cpu hierarchy too")
t.raises(function() cgroup.plan("../etc", lim, l1) end, "bad cgroup name", "a name with a slash is refused")
t.raises(function() cgroup.plan(".x", lim, l1) end, "bad cgroup name", "a hidden name is refused")

-- v2 writes on a fake tree: the files exist as the kernel would show them
put(tmp .. "/v2/cgroup.controllers", "cpuset cpu io memory pids\n")
put(tmp .. "/v2/cgroup.subtree_control", "")
local vm2 = tmp .. "/v2/fireclaw/fc-abc"
fs.mkdir_p(vm2, "755")
put(tmp .. "/v2/fireclaw/cgroup.subtree_control", "")
for _, f in ipairs({ "memory.max", "memory.swap.max", "memory.oom.group", "pids.max", "cpu.max" }) do put(vm2 .. "/" .. f, "") end
local p2 = cgroup.plan("fc-abc", cgroup.limits { mem_mib = 256, cpus = 0.5 }, cgroup.detect { mounts = V2 })
t.same(p2.dirs, { vm2 }, "v2 plan: one directory")
t.lives(function() cgroup.create(p2) end, "v2 create on a fake tree")
t.is(read(tmp .. "/v2/cgroup.subtree_control"), "+memory +pids +cpu", "v2: the root hands down the controllers")
t.is(read(tmp .. "/v2/fireclaw/cgroup.subtree_control"), "+memory +pids +cpu", "v2: fireclaw/ hands them to the VM")
t.is(read(vm2 .. "/memory.max"), tostring(384 * MIB), "v2 memory.max")
t.is(read(vm2 .. "/memory.swap.max"), "0", "v2 memory.swap.max = 0")
t.is(read(vm2 .. "/memory.oom.group"), "1", "v2 memory.oom.group = 1")
t.is(read(vm2 .. "/pids.max"), "256", "v2 pids.max")
t.is(read(vm2 .. "/cpu.max"), "50000 100000", "v2 cpu.max for 0.5 CPUs")
put(vm2 .. "/memory.events", "low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\noom_group_kill 1\n")
put(tmp .. "/oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
fs.mkdir_p(tmp .. "/v1m", "755")
put(tmp .. "/v1m/memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
t.is(cgroup.oom_kills({ vm2, tmp .. "/v1m" }), 3, "OOM kills counted from v2 memory.events and v1 memory.oom_control")
t.is(cgroup.oom_kills({ tmp .. "/nowhere" }), 0, "no OOM kills in a cgroup that is gone")

-- ---- the real hierarchies of this host ----

local made = {}
local function cleanup()
	for i = #made, 1, -1 do pcall(cgroup.remove, made[i]) end
end

local function in_cgroup(pid, name)
	return (read("/proc/" .. pid .. "/cgroup") or ""):find("/fireclaw/" .. name .. "\n", 1, true) ~= nil
end

local ok, err = pcall(function()
	-- (make check runs this file as any user: the fake trees above are its unprivileged part)
	if require("fireclaw.sys").geteuid() ~= 0 then
		t.skip("not root: the checks on this host's cgroup hierarchies need root")
		return
	end
	local host = cgroup.detect()
	if host.version ~= 1 then
		t.skip("this host has no cgroup v1 controllers (" .. cgroup.describe(host) .. "): v1 checks skipped")
	else
		local cg = cgroup.plan(NAME, cgroup.limits { mem_mib = 100, cpus = 0.25 }, host)
		made[#made + 1] = cg.dirs
		cgroup.create(cg)
		local m = host.mounts
		if m.memory then
			t.is(trim(read(m.memory .. "/fireclaw/" .. NAME .. "/memory.limit_in_bytes")), tostring(189 * MIB),
				"v1 memory.limit_in_bytes (100 MiB guest)")
		end
		if m.pids then t.is(trim(read(m.pids .. "/fireclaw/" .. NAME .. "/pids.max")), "256", "v1 pids.max") end
		if m.cpu then
			t.is(trim(read(m.cpu .. "/fireclaw/" .. NAME .. "/cpu.cfs_quota_us")), "25000", "v1 cpu.cfs_quota_us")
			t.is(trim(read(m.cpu .. "/fireclaw/" .. NAME .. "/cpu.cfs_period_us")), "100000", "v1 cpu.cfs_period_us")
		end
		local p = proc.spawn { argv = { "sleep", "300" }, cgroup = cg.procs }
		local pid = p:pid()
		local lines = 0
		for line in (read("/proc/" .. pid .. "/cgroup") or ""):gmatch("[^\n]+") do
			if line:find("/fireclaw/" .. NAME, 1, true) then lines = lines + 1 end
		end
		t.is(lines, #cg.dirs, "the spawned process is in each of its v1 cgroups")
		t.ok(not in_cgroup(proc.getpid(), NAME), "fireclaw itself stays where it was")
		-- the program's first look at itself already shows the cgroup: joined before exec
		local seen = tmp .. "/self-cgroup"
		local c = proc.spawn { argv = { "cat", "/proc/self/cgroup" }, stdout = seen, cgroup = cg.procs }
		c:wait(10)
		t.ok((read(seen) or ""):find("/fireclaw/" .. NAME .. "\n", 1, true),
			"a spawned program sees itself in its cgroup from its start")
		-- the same through vfork (the child joins, then execs, in fireclaw's memory), and a
		-- failing one raises as a fork's does
		local seen2 = tmp .. "/self-cgroup-vfork"
		local c2 = proc.spawn { argv = { "cat", "/proc/self/cgroup" }, stdout = seen2, cgroup = cg.procs,
			vfork = true, wait_exec = false }
		t.ok(c2:wait_exec() and c2:wait(10) and (read(seen2) or ""):find("/fireclaw/" .. NAME .. "\n", 1, true),
			"vfork = true: the program starts in its cgroup too")
		t.raises(function() proc.spawn { argv = { "/nonexistent/fct-prog" }, cgroup = cg.procs, vfork = true } end,
			"^proc: cannot run /nonexistent/fct%-prog: No such file", "vfork = true: a program that cannot run raises")
		if m.cpu then
			-- a busy loop under a 1% quota is throttled within a few periods, however busy the host
			local cpudir = m.cpu .. "/fireclaw/" .. NAME
			put(cpudir .. "/cpu.cfs_quota_us", "1000")
			local busy = proc.spawn { argv = { "sh", "-c", "while :; do :; done" }, cgroup = { cpudir .. "/cgroup.procs" } }
			local function throttled()
				return tonumber((read(cpudir .. "/cpu.stat") or ""):match("nr_throttled (%d+)")) or 0
			end
			local deadline = runtime.now() + 20
			while throttled() == 0 and runtime.now() < deadline do runtime.sleep(0.05) end
			t.ok(throttled() > 0, "the cpu quota throttles a busy process in the cgroup (nr_throttled "
				.. throttled() .. ")")
			busy:close()
		end
		local done = cgroup.remove(cg.dirs)
		t.like(table.concat(done, "; "), "killed 1 process", "remove kills what is still inside")
		t.ok(p:wait(5), "the process inside is gone")
		for _, d in ipairs(cg.dirs) do t.ok(not fs.exists(d), "removed " .. d) end
		t.same(cgroup.remove(cg.dirs), {}, "remove twice: nothing to do")
		t.raises(function() proc.spawn { argv = { "true" }, cgroup = { m.pids .. "/fireclaw/" .. NAME .. "/cgroup.procs" } } end,
			"proc: cannot start true: .*/fireclaw/" .. NAME:gsub("%-", "%%-") .. "/cgroup.procs: No such file",
			"spawn into a missing cgroup fails and says which")
	end

	-- v2: the real unified mount, with or without controllers (the join and the kill)
	local v2root
	for line in (read("/proc/self/mounts") or ""):gmatch("[^\n]+") do
		local dir, fstype = line:match("^%S+ (%S+) (%S+)")
		if fstype == "cgroup2" then v2root = v2root or dir end
	end
	if not v2root then
		t.skip("no cgroup2 mount: v2 checks skipped")
	else
		-- the shared parent goes too when this test made it (on a v1 host nothing else uses it)
		if not fs.exists(v2root .. "/fireclaw") then
			made[#made + 1] = { v2root .. "/fireclaw" }
		end
		local ctl = host.version == 2 and host.controllers or {}
		local layout = { version = 2, root = v2root, controllers = ctl }
		local cg = cgroup.plan(NAME, cgroup.limits { mem_mib = 100 }, layout)
		made[#made + 1] = cg.dirs
		cgroup.create(cg)
		t.ok(fs.is_dir(cg.dirs[1]), "v2 cgroup created under " .. v2root .. " (controllers: "
			.. (#ctl > 0 and table.concat(ctl, ",") or "none here") .. ")")
		local p = proc.spawn { argv = { "sleep", "300" }, cgroup = cg.procs }
		t.like(read("/proc/" .. p:pid() .. "/cgroup") or "", "\n?0::/fireclaw/" .. NAME:gsub("%-", "%%-") .. "\n",
			"the spawned process is in its v2 cgroup")
		t.is(trim(read(cg.dirs[1] .. "/cgroup.procs")), tostring(p:pid()), "v2 cgroup.procs lists it")
		-- the child is created in it (clone3 CLONE_INTO_CGROUP) and writes nothing: with
		-- /dev/null bound over cgroup.procs (a private mount namespace), a write would go
		-- nowhere and leave the program outside its cgroup
		local seen = tmp .. "/v2-self-cgroup"
		local script = tmp .. "/v2-spawn.lua"
		put(script, string.format([[local p = require("fireclaw.proc").spawn { argv = { "cat", "/proc/self/cgroup" },
			stdout = %q, cgroup = { %q } } os.exit(p:wait(10).status)]], seen, cg.procs[1]))
		local rc = os.execute(string.format("unshare -m --propagation private sh -c 'mount --bind /dev/null %s && exec %s %s'",
			cg.procs[1], os.getenv("FIRECLAW") or "./fireclaw", script))
		t.is(rc, 0, "a spawn with cgroup.procs hidden behind /dev/null runs")
		t.like(read(seen) or "", "\n?0::/fireclaw/" .. NAME:gsub("%-", "%%-") .. "\n",
			"... and its program starts in its v2 cgroup: created there, no cgroup.procs write")
		-- a spawn's log sink goes where fireclaw is, whatever its descriptor 0 is: with
		-- stdin a cgroup2 directory, a sink made with a zeroed request (cgroup descriptor 0)
		-- was created in that cgroup
		local sink_seen = tmp .. "/v2-sink-cgroup"
		local sink_script = tmp .. "/v2-sink.lua"
		put(sink_script, string.format([[local p = require("fireclaw.proc").spawn { argv = { "sleep", "300" },
			stdout = { log = %q } }
			local f = assert(io.open("/proc/" .. p:sink_pid() .. "/cgroup")) local s = f:read("*a") f:close()
			f = assert(io.open(%q, "w")) f:write(s) f:close() p:close()]], tmp .. "/v2-sink.log", sink_seen))
		rc = os.execute(string.format("%s %s < %s", os.getenv("FIRECLAW") or "./fireclaw", sink_script, cg.dirs[1]))
		local own = (read("/proc/self/cgroup") or ""):match("0::[^\n]*")
		t.ok(rc == 0 and own and (read(sink_seen) or ""):match("0::[^\n]*") == own,
			"a log sink starts in fireclaw's own cgroup, not in the one its stdin names", read(sink_seen))
		local done = cgroup.remove(cg.dirs)
		t.like(table.concat(done, "; "), "killed 1 process.*removed cgroup", "v2 remove kills (cgroup.kill) and removes")
		t.ok(p:wait(5), "the process inside is gone")
		t.ok(not fs.exists(cg.dirs[1]), "v2 cgroup removed")
	end
end)
cleanup()
os.execute("rm -rf '" .. tmp .. "'")
t.ok(ok, "no error in the real-hierarchy checks", tostring(err))
return t.done()
