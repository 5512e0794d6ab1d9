-- Firecracker through its jailer (fireclaw.vmm.jailer), against tests/fake-jailer (parses
-- and checks its argv like jailer v1.0.0/v1.16, builds the chroot, drops to the VM's
-- uid/gid for real, then execs the fake Firecracker confined to the chroot's paths) and
-- tests/fake-firecracker. The full lifecycle: cold boot, snapshot, restore into another
-- jail, two clones at once, teardown; what runs as whom and who owns what in the chroot;
-- a SIGKILLed fireclaw and `fireclaw cleanup`; the refusal without a jailer and the opt-in.
local t = require "tap"
local vt = require "vmtest"
local config = require "fireclaw.config"
local fs = require "fireclaw.fs"
local jailer = require "fireclaw.vmm.jailer"
local json = require "fireclaw.json"
local proc = require "fireclaw.proc"
local runtime = require "fireclaw.runtime"
local state = require "fireclaw.state"
local util = require "fireclaw.vmm.util"
local vm = require "fireclaw.vm"

local FAKE = vt.TESTS .. "/fake-firecracker"
local JAILER = vt.TESTS .. "/fake-jailer"
local FIRECLAW = os.getenv("FIRECLAW") or "./fireclaw"
local NS_PREFIX = "fct-jl-" .. (os.getenv("FIRECLAW_TEST_TAG") or "") .. vt.PID .. "-"

local c = vt.cleanup()
local base = vt.tmpdir()
c:add(function() vt.rm_rf(base) end)
vt.run({ "chmod", "711", base }) -- the fake Firecracker, as the VM's user, appends to its log here
config.run_dir = base .. "/run"
config.jailer = JAILER
config.unsafe_no_jailer = false

local function stat(path)
	local r = proc.run({ "stat", "-c", "%u %g %a %i %h %F", path })
	if r.status ~= 0 then return nil end
	local u, g, a, i, h, kind = r.stdout:match("^(%d+) (%d+) (%d+) (%d+) (%d+) (.-)%s*$")
	return { uid = tonumber(u), gid = tonumber(g), mode = a, ino = tonumber(i), links = tonumber(h), kind = kind }
end

local function events(log, kind)
	local out = {}
	for _, r in ipairs(vt.read_jsonl(log)) do
		if (kind == nil and r.method) or r.event == kind then out[#out + 1] = r end
	end
	return out
end

local function find_call(log, method, path)
	for _, r in ipairs(events(log)) do
		if r.method == method and r.path == path then return r end
	end
end

-- Can the VM's user open jail-relative `name` for appending? Through a descriptor of the
-- chroot (the directories above it are root's 0700, as a real chroot never sees them).
local function uid_can_write(j, name)
	local r = proc.run({ "bash", "-c", 'exec 9<"$1" && exec setpriv --reuid="$2" --regid="$3" --clear-groups '
		.. 'sh -c ": >>/proc/self/fd/9/$4"', "-", j.root, tostring(j.uid), tostring(j.gid), name })
	return r.status == 0
end

local function status_ids(pid)
	local s = fs.read("/proc/" .. pid .. "/status") or ""
	return tonumber(s:match("\nUid:%s*(%d+)")), tonumber(s:match("\nGid:%s*(%d+)"))
end

-- every section runs inside main: a failure still deletes the namespaces and directories
local function main()
	-- ---- 1. the fake jailer's argv, as the real one parses it ----

	local function jail_run(args, env)
		local argv = { JAILER }
		for _, a in ipairs(args) do argv[#argv + 1] = a end
		return proc.run(argv, { env = env or { FAKE_FC_VERSION = "1.0.0" }, timeout = 30 })
	end

	do
		local jb = base .. "/jb"
		fs.mkdir_p(jb, "700")
		local r = jail_run({ "--id", "x", "--exec-file", FAKE, "--gid", "1" })
		t.is(r.status, 1, "fake jailer: a missing required flag is status 1")
		t.like(r.stdout, "^Arguments parsing error: Argument 'uid' required, but not found%.",
			"fake jailer: the parser's message, on stdout")
		r = jail_run({ "--id", "x", "--exec-file", FAKE, "--uid", "1", "--gid", "1", "--node", "0" })
		t.like(r.status .. " " .. r.stdout, "^1 Arguments parsing error: Found argument 'node' which wasn't expected",
			"fake jailer: --node (gone in v1.0) is an argument error")
		r = jail_run({ "--id", "bad_id", "--exec-file", FAKE, "--uid", "1", "--gid", "1", "--chroot-base-dir", jb })
		t.is(r.status, 134, "fake jailer v1.0: a bad id panics (134)")
		t.like(r.stderr, "Invalid instance ID: invalid char %(_%) at position 3", "fake jailer: the id rule")
		r = jail_run({ "--id", string.rep("a", 65), "--exec-file", FAKE, "--uid", "1", "--gid", "1", "--chroot-base-dir", jb })
		t.like(r.stderr, "invalid len %(65%)", "fake jailer: ids are at most 64 characters")
		r = jail_run({ "--id", "x", "--exec-file", FAKE, "--uid", "-1", "--gid", "1", "--chroot-base-dir", jb })
		t.like(r.stderr, "Invalid uid: %-1", "fake jailer: uid -1 refused")
		r = jail_run({ "--id", "x", "--exec-file", FAKE, "--uid", "1", "--gid", "1", "--chroot-base-dir", jb .. "/nope" })
		t.like(r.status .. " " .. r.stderr, "^134 .*Failed to canonicalize path .*/nope: No such file or directory",
			"fake jailer: the base dir must exist")
		r = jail_run({ "--id", "a.b", "--exec-file", FAKE, "--uid", "1", "--gid", "1", "--chroot-base-dir", jb },
			{ FAKE_FC_VERSION = "1.16.1" })
		t.like(r.status .. " " .. r.stderr, "^1 Jailer error: Invalid instance ID: invalid char %(%.%) at position 1",
			"fake jailer v1.16: errors are status 1")
		t.is(jail_run({ "--version" }).stdout, "Jailer v1.0.0\n", "fake jailer: --version")
		-- a second run of one id fails on the device nodes the first left (as the real one does)
		fs.mkdir_p(jb .. "/fake-firecracker/again/root/dev/net", "700")
		vt.run({ "mknod", jb .. "/fake-firecracker/again/root/dev/net/tun", "c", "10", "200" })
		r = jail_run({ "--id", "again", "--exec-file", FAKE, "--uid", "1", "--gid", "1", "--chroot-base-dir", jb,
			"--", "--api-sock", "/a.sock" })
		t.like(r.status .. " " .. r.stderr, "^134 .*Failed to create /dev/net/tun via mknod inside the jail: File exists",
			"fake jailer: a reused id fails on the leftover nodes")
	end

	-- ---- 2. the lifecycle through the VM object ----

	local function new_vm(version, name, log, extra)
		local ns = vt.netns(c, NS_PREFIX .. name)
		local dir = base .. "/vms/" .. name
		local opts = { id = "jl" .. name, dir = dir, vmm = "firecracker", firecracker = FAKE, netns = ns,
			tap = "tap0", mac = vt.GUEST_MAC, env = { FAKE_FC_VERSION = version, FAKE_FC_LOG = log } }
		for k, v in pairs(extra or {}) do opts[k] = v end
		local v = vm.new(opts)
		c:add(function() v:destroy() end)
		return v, ns
	end

	local function lifecycle(version)
		local tag = "v" .. version .. ": "
		local log = base .. "/" .. version .. ".jsonl"
		fs.write(log, "", "666") -- the fake Firecracker appends to it as the VM's user
		local kernel = base .. "/vmlinux"
		fs.write(kernel, "kernel", "644")
		local a, ns = new_vm(version, "a" .. version:gsub("%.", ""), log)
		util.sparse_file(a.dir .. "/disk.ext4", 1048576)
		t.lives(function() a:boot{ kernel = kernel, rootfs = a.dir .. "/disk.ext4", mem_mib = 128 } end, tag .. "jailed cold boot")
		local j = a.jail or {}
		local uid, gid = jailer.uid_gid(a.id)
		t.is(j.uid, uid, tag .. "the VM's user is UID_BASE + 1 + id (QEMU's scheme)")
		local jl = events(log, "jailer")[1] or {}
		t.same(jl.argv, { "--id", a.id, "--exec-file", vt.run({ "realpath", FAKE }), "--uid", tostring(uid),
			"--gid", tostring(gid), "--chroot-base-dir", config.run_dir .. "/jail", "--netns", "/run/netns/" .. ns,
			"--resource-limit", "no-file=1024", "--", "--api-sock", "/api.sock" }, tag .. "the jailer's exact argv")
		t.is(jl.uid, 0, tag .. "the jailer starts as root")
		local start = events(log, "start")[1] or {}
		t.is(start.uid, uid, tag .. "Firecracker runs as the VM's uid")
		t.is(start.gid, gid, tag .. "with the shared VMM group")
		t.same(start.groups, {}, tag .. "and no supplementary groups")
		t.is(start.host_pid, j.pid, tag .. "v.jail.pid is the Firecracker process")
		t.is(jl.host_pid, j.pid, tag .. "which the jailer became (exec in place)")
		local su, sg = status_ids(j.pid)
		t.ok(su == uid and sg == gid, tag .. "/proc says so too", su)
		t.is(start.netns, "net:[" .. tostring(vt.inode("/run/netns/" .. ns)) .. "]", tag .. "in the VM's network namespace")
		t.ok(fs.readlink("/proc/" .. j.pid .. "/ns/pid") ~= fs.readlink("/proc/self/ns/pid"),
			tag .. "in a pid namespace of its own")
		t.ok(a.pid ~= j.pid and proc.alive(a.pid, a.starttime), tag .. "v.pid is the jail's launcher (unshare), alive")
		t.is(j.root, config.run_dir .. "/jail/fake-firecracker/" .. a.id .. "/root", tag .. "the chroot's place")
		local root = stat(j.root) or {}
		t.is(root.uid .. " " .. root.mode, uid .. " 700", tag .. "chroot: the uid's, 0700")
		local k = stat(j.root .. "/vmlinux") or {}
		t.is(k.uid .. " " .. k.mode, "0 644", tag .. "kernel: root's, not writable by the VM user")
		t.is(k.ino, vt.inode(kernel), tag .. "kernel: a hard link of the image's file")
		local d = stat(j.root .. "/disk.ext4") or {}
		t.is(d.uid .. " " .. d.mode, uid .. " 600", tag .. "disk: the VM user's own copy")
		t.is(d.ino, vt.inode(a.dir .. "/disk.ext4"), tag .. "disk: the VM's per-run copy, linked")
		t.ok(uid_can_write(j, "disk.ext4"), tag .. "the VM user can write its disk")
		t.ok(not uid_can_write(j, "vmlinux"), tag .. "but not the kernel")
		t.is((stat(j.root .. "/dev/kvm") or {}).kind, "character special file", tag .. "dev/kvm made by the jailer")
		t.is((stat(j.root .. "/firecracker.log") or {}).kind, "fifo", tag .. "the logger is a FIFO in the jail")
		t.is((find_call(log, "PUT", "/boot-source") or { body = {} }).body.kernel_image_path, "/vmlinux",
			tag .. "paths in API bodies are the jail's")
		t.is((find_call(log, "PUT", "/drives/rootfs") or { body = {} }).body.path_on_host, "/disk.ext4", tag .. "/disk.ext4")
		t.is((find_call(log, "PUT", "/logger") or { body = {} }).body.log_path, "/firecracker.log", tag .. "/firecracker.log")
		t.ok(util.poll(function()
			return (fs.read(a.dir .. "/firecracker.log") or ""):find("Running Firecracker", 1, true) and true or nil
		end, 10), tag .. "the logger's lines reach the capped firecracker.log")
		t.lives(function() a:wait_console("guest is running", 10) end, tag .. "the console reaches console.log")
		t.like(a.driver and fs.readlink("/proc/self/fd/" .. j.fd) or "", "/root$", tag .. "the API socket is reached through a descriptor of the chroot")
		t.ok(#("/proc/self/fd/" .. j.fd .. "/api.sock") < 40, tag .. "a short socket path")
		-- the vsock socket lives in the chroot: Firecracker (the uid) binds /v.sock there
		t.same((find_call(log, "PUT", "/vsock") or {}).body, { guest_cid = 3, uds_path = "/v.sock" },
			tag .. "PUT /vsock names the jail's /v.sock")
		local vsk = stat(j.root .. "/v.sock") or {}
		t.is(vsk.kind .. " " .. tostring(vsk.uid), "socket " .. uid, tag .. "the vsock socket is in the chroot, the uid's")
		t.is(require("fireclaw.vmm.firecracker").vsock_host(a), "/proc/self/fd/" .. j.fd .. "/v.sock",
			tag .. "fireclaw reaches it through its descriptor of the chroot")
		local fd, why = a:agent_channel(5)
		t.ok(fd, tag .. "agent channel through the chroot's socket", why)
		if fd then
			t.is(vt.fd_echo(fd, "jailed " .. version), "jailed " .. version, tag .. "a byte stream to the guest's agent port")
			require("fireclaw.sys").close(fd)
		end

		-- snapshot: written in the jail as the uid, moved out, root's
		-- v1.16.1's snapshot goes to another filesystem (tmpfs): moved out of the jail by a
		-- copy, and copied (not linked) into the clones' jails
		local cross = version == "1.16.1"
		local snap = base .. "/snap" .. version
		if cross then
			local shm = vt.run({ "mktemp", "-d", "/dev/shm/fct-jl-XXXXXX" })
			c:add(function() proc.run({ "rm", "-rf", shm }) end)
			snap = shm .. "/snap"
		end
		local info
		t.lives(function() info = a:snapshot(snap) end, tag .. "snapshot")
		t.same((find_call(log, "PUT", "/snapshot/create") or {}).body, { snapshot_type = "Full",
			snapshot_path = "/snap/vmstate", mem_file_path = "/snap/memory" }, tag .. "written inside the jail")
		local ms, vs = stat(snap .. "/memory") or {}, stat(snap .. "/vmstate") or {}
		t.is(ms.uid .. " " .. ms.mode .. " " .. vs.uid .. " " .. vs.mode, "0 644 0 644", tag .. "the snapshot's files are root's")
		t.is((info or {}).rootfs_path_in_vmm, "/disk.ext4", tag .. "the snapshot opens its disk at /disk.ext4")
		t.same((info or {}).vsock, { guest_cid = 3, uds_path = "/v.sock" }, tag .. "the snapshot binds /v.sock again")
		t.same(runtime.listdir(j.root .. "/snap"), {}, tag .. "nothing left in the jail's /snap")
		local apid, astart, adir = j.pid, j.start, j.dir
		a:destroy()
		t.ok(not proc.alive(apid, astart), tag .. "destroy: Firecracker is gone")
		t.ok(not vt.exists(adir), tag .. "destroy: the jail is removed")
		t.ok(vt.exists(kernel) and vt.exists(snap .. "/memory"), tag .. "its sources stay")

		-- two clones at once, each in a jail of its own
		local clones = {}
		for i = 1, 2 do
			local v = new_vm(version, "c" .. i .. version:gsub("%.", ""), log)
			util.sparse_file(v.dir .. "/disk.ext4", 1048576)
			t.lives(function() v:restore(snap, { rootfs = v.dir .. "/disk.ext4", mem_mib = 128, vcpu = 1,
				rootfs_path_in_vmm = info and info.rootfs_path_in_vmm, vsock = info and info.vsock }) end,
				tag .. "clone " .. i .. " restored in its own jail")
			clones[i] = v
		end
		local c1, c2 = clones[1].jail or {}, clones[2].jail or {}
		t.ok(c1.uid and c2.uid and c1.uid ~= c2.uid, tag .. "two clones, two users")
		t.ok(c1.pid and c2.pid and proc.alive(c1.pid, c1.start) and proc.alive(c2.pid, c2.start), tag .. "both running")
		for i, cj in ipairs({ c1, c2 }) do
			local m = stat((cj.root or "") .. "/memory") or {}
			if cross then
				t.ok(m.uid == 0 and m.mode == "444" and m.ino ~= ms.ino, tag .. "clone " .. i
					.. ": /memory is a root-owned read-only copy (another filesystem)", m.mode)
			else
				t.ok(m.uid == 0 and m.mode == "644" and m.ino == ms.ino, tag .. "clone " .. i
					.. ": /memory is the snapshot's (a link), root's, read-only to it")
			end
			t.ok(not uid_can_write(cj, "memory") and not uid_can_write(cj, "vmstate"),
				tag .. "clone " .. i .. ": its user cannot write the snapshot's files")
			t.ok(uid_can_write(cj, "disk.ext4"), tag .. "clone " .. i .. ": but can write its disk")
			local dd = stat((cj.root or "") .. "/disk.ext4") or {}
			t.ok(dd.uid == cj.uid and dd.mode == "600", tag .. "clone " .. i .. ": its own disk, its own user's")
		end
		-- each clone's load bound /v.sock inside its own jail; both channels at once
		local chs = {}
		for i, cj in ipairs({ c1, c2 }) do
			local cvs = stat((cj.root or "") .. "/v.sock") or {}
			t.ok(cvs.kind == "socket" and cvs.uid == cj.uid, tag .. "clone " .. i .. ": /v.sock bound in its own jail, by its user")
			chs[i] = clones[i]:agent_channel(5)
			t.ok(chs[i], tag .. "clone " .. i .. ": agent channel")
		end
		for i, cfd in ipairs(chs) do -- both open at once
			t.is(vt.fd_echo(cfd, "clone " .. i), "clone " .. i, tag .. "clone " .. i .. ": its own stream")
			require("fireclaw.sys").close(cfd)
		end
		local loads = {}
		for _, r in ipairs(events(log)) do
			if r.path == "/snapshot/load" then loads[#loads + 1] = r end
		end
		local lb = (loads[1] or {}).body or {}
		t.is(lb.snapshot_path, "/vmstate", tag .. "load: /vmstate in the jail")
		t.is(lb.mem_file_path or (lb.mem_backend or {}).backend_path, "/memory", tag .. "load: /memory in the jail")
		t.ok(#loads == 2 and loads[1].status == 204 and loads[2].status == 204, tag .. "both loads answered 204")
		for _, v in ipairs(clones) do
			local pid, st, dir = v.jail.pid, v.jail.start, v.jail.dir
			v:destroy()
			t.ok(not proc.alive(pid, st) and not vt.exists(dir), tag .. "clone gone with its jail")
		end
		t.same(runtime.listdir(config.run_dir .. "/jail/fake-firecracker") or {}, {}, tag .. "no jail left")
	end

	lifecycle("1.0.0")
	lifecycle("1.16.1")

	-- ---- 3. reaping a record: the jailed Firecracker by pid + start time, its jail ----

	do
		local log = base .. "/keep.jsonl"
		fs.write(log, "", "666")
		fs.write(base .. "/vmlinux", "kernel", "644")
		local v = new_vm("1.0.0", "k", log, { keep = true })
		t.lives(function() v:boot{ kernel = base .. "/vmlinux" } end, "kept VM booted (no parent-death signal)")
		local j = v.jail or {}
		-- forget the objects: only the record is left, as after a crash
		v.proc:detach()
		local rec = { id = v.id, jail = { dir = j.dir, pid = j.pid, start = j.start },
			vmm = { pid = v.pid, start = v.starttime } }
		local done = state.reap(rec)
		-- dead at once; reaped by its init as the pid namespace goes (a moment later)
		t.ok(util.poll(function() return not proc.alive(j.pid, j.start) or nil end, 5),
			"reap kills the jailed Firecracker", table.concat(done, "; "))
		t.ok(not vt.exists(j.dir), "reap removes the jail")
		t.like(table.concat(done, "; "), "removed jail", "and says so")
		v.destroyed = true
	end

	-- ---- 4. a SIGKILLed fireclaw: the jail dies with it, cleanup removes the rest ----

	do
		local run = base .. "/cli-run"
		local env = { FIRECLAW_RUN = run, FIRECLAW_STATE = os.getenv("FIRECLAW_STATE"),
			FIRECLAW_FIRECRACKER = FAKE, FIRECLAW_JAILER = JAILER, FIRECLAW_VMM = "firecracker",
			FIRECLAW_NETNS_PREFIX = NS_PREFIX .. "cli-", PATH = os.getenv("PATH"), FAKE_FC_VERSION = "1.16.1" }
		local p = proc.spawn{ argv = { FIRECLAW, "coldboot", "--boot-timeout", "60" }, env = env,
			stdout = base .. "/cli.out", stderr = base .. "/cli.err" }
		c:add(function() p:close() end)
		local rec = util.poll(function()
			if not p:alive() then return false end
			for _, id in ipairs(runtime.listdir(run .. "/vms") or {}) do
				local ok, r = pcall(json.decode, fs.read(run .. "/vms/" .. id .. "/record.json") or "")
				if ok and type(r) == "table" and r.jail and r.jail.pid then return r end
			end
		end, 60)
		t.ok(rec, "a fireclaw coldboot with a jailed Firecracker, recorded with its jail",
			fs.read(base .. "/cli.err"))
		rec = rec or { jail = {} }
		t.like(rec.jail.dir or "", "/jail/fake%-firecracker/" .. (rec.id or "?") .. "$", "the record names the chroot")
		p:kill(9)
		p:wait(10)
		t.ok(util.poll(function() return not proc.alive(rec.jail.pid or 1, rec.jail.start) or nil end, 5),
			"SIGKILL of fireclaw: the jailed Firecracker dies with it (its init's parent-death signal)")
		t.ok(vt.exists(rec.jail.dir or "/nonexistent"), "its chroot is still there")
		local r = proc.run({ FIRECLAW, "cleanup" }, { env = env, timeout = 60 })
		t.is(r.status, 0, "fireclaw cleanup", r.stderr)
		t.ok(not vt.exists(rec.jail.dir or "/nonexistent"), "cleanup removed the chroot")
		t.same(runtime.listdir(run .. "/vms") or {}, {}, "and the VM directory")
		t.same(vt.netns_list(NS_PREFIX .. "cli-"), {}, "and the namespace")
		local left = {}
		for _, e in ipairs(runtime.listdir(run .. "/jail") or {}) do
			for _, id in ipairs(runtime.listdir(run .. "/jail/" .. e) or {}) do left[#left + 1] = e .. "/" .. id end
		end
		t.same(left, {}, "no jail left")
	end

	-- ---- 5. no jailer: refused as root (one line, status 1), unless asked for ----

	do
		local run = base .. "/nojail-run"
		local env = { FIRECLAW_RUN = run, FIRECLAW_STATE = os.getenv("FIRECLAW_STATE"), FIRECLAW_FIRECRACKER = FAKE,
			FIRECLAW_NETNS_PREFIX = NS_PREFIX .. "nj-", PATH = "/usr/sbin:/usr/bin:/sbin:/bin" }
		local r = proc.run({ FIRECLAW, "run", "--vmm", "firecracker", "--", "true" }, { env = env, timeout = 60 })
		t.is(r.status, 1, "no jailer: fireclaw run --vmm firecracker exits 1")
		t.like(r.stderr, "^fireclaw: [^\n]*no jailer found[^\n]*FIRECLAW_JAILER[^\n]*%-%-unsafe%-no%-jailer%)\n$",
			"in one line saying how to get the jailer and how to opt out")
		env.FIRECLAW_JAILER = base .. "/no-such-jailer"
		r = proc.run({ FIRECLAW, "coldboot", "--vmm", "firecracker" }, { env = env, timeout = 60 })
		t.like(r.status .. " " .. r.stderr, "^1 fireclaw: [^\n]*no jailer found %(FIRECLAW_JAILER=[^\n]*/no%-such%-jailer does not exist%)",
			"FIRECLAW_JAILER naming nothing: refused too, naming it")
		env.FIRECLAW_JAILER = nil
		r = proc.run({ FIRECLAW, "coldboot", "--vmm", "firecracker", "--unsafe-no-jailer", "--boot-timeout", "1" },
			{ env = env, timeout = 60 })
		-- the image has the agent, so the guest channel waited for is the agent's (SSH for older images)
		local waited = "agent: VM %x+: the guest agent did not answer within 1 s"
		t.like(r.stderr, waited, "--unsafe-no-jailer: the unjailed Firecracker runs (to the guest channel's wait)")
		env.FIRECLAW_UNSAFE_NO_JAILER = "1"
		r = proc.run({ FIRECLAW, "coldboot", "--vmm", "firecracker", "--boot-timeout", "1" }, { env = env, timeout = 60 })
		t.like(r.stderr, waited, "FIRECLAW_UNSAFE_NO_JAILER=1: the same")
		t.same(runtime.listdir(run .. "/vms") or {}, {}, "nothing left by the refused or opted-in runs")

		-- auto on a host where Firecracker could boot guests: QEMU, saying why
		local d = { firecracker = FAKE, firecracker_version = "1.16.1", kvm = "hardware", kvm_why = "test", qemu = "/bin/true" }
		config.unsafe_no_jailer = false
		local which, why = vm.choose_vmm("auto", "auto", d)
		t.is(which, "qemu", "auto without a jailer picks QEMU (confined)")
		t.like(why or "", "no jailer", "and says why")
		d.jailer = JAILER
		t.is(vm.choose_vmm("auto", "auto", d), "firecracker", "auto with a jailer picks Firecracker")
		d.jailer = nil
		config.unsafe_no_jailer = true
		t.is(vm.choose_vmm("auto", "auto", d), "firecracker", "auto, no jailer, opted in: Firecracker")
		config.unsafe_no_jailer = false
		d.unsafe_no_jailer = true
		t.is(vm.choose_vmm("auto", "auto", d), "firecracker", "the opt-in as an option of the run (no global)")

		-- --unsafe-no-jailer is an option handed down to the VM (like vmm), not a global
		-- the recipes set: one sandbox's opt-in does not leak into the next VM of the process
		local saved = config.jailer
		config.jailer = base .. "/no-such-jailer"
		t.raises(function() vm.new { id = "nj1", dir = base .. "/nj1", vmm = "firecracker", firecracker = FAKE } end,
			"no jailer found", "no jailer, no opt-in: vm.new refuses")
		local nj
		t.lives(function()
			nj = vm.new { id = "nj2", dir = base .. "/nj2", vmm = "firecracker", firecracker = FAKE, unsafe_no_jailer = true }
			c:add(function() nj:destroy() end)
			nj:boot { kernel = "/dev/null" }
		end, "vm.new{unsafe_no_jailer = true}: the unjailed Firecracker boots")
		t.ok(nj and nj.jail == nil and nj.pid and nj:state() == "running", "unjailed, running")
		if nj then nj:destroy() end
		t.is(config.unsafe_no_jailer, false, "and the process-wide opt-in is untouched")
		t.lives(function() require("fireclaw.opts").check("sandbox.new", { unsafe_no_jailer = true },
			require("fireclaw.sandbox").OPTIONS) end, "unsafe_no_jailer is a sandbox option")
		local cold = require("fireclaw.cli").use("coldboot")
		t.raises(function() cold.boot { vmm = "firecracker", unsafe_no_jailer = true, image = "no-such-image" } end,
			"no image named 'no%-such%-image'", "coldboot.boot takes it too (the image is the first thing missing)")
		config.jailer = saved
	end

	-- ---- 5b. a dynamically linked exec-file gets its loader and libraries in the jail ----

	do
		t.is(jailer.dynamic("/bin/true"), true, "/bin/true is dynamically linked (PT_INTERP)")
		t.is(jailer.dynamic(FAKE), false, "a script is not")
		local j = { exec = "/bin/true", root = base .. "/libjail/root" }
		fs.mkdir_p(j.root, "700")
		local n = jailer.copy_libs(j)
		local interp = vt.run({ "sh", "-c", "ldd /bin/true | awk '/ld-linux/ {print $1}'" })
		t.ok(n >= 2 and vt.exists(j.root .. interp), "its loader and libraries copied to the same paths in the jail", n)
		vt.run({ "cp", "/bin/true", j.root .. "/true" })
		t.is(proc.run({ "chroot", j.root, "/true" }).status, 0, "with them, the dynamic binary runs inside the chroot")
		local bare = base .. "/libjail/bare"
		fs.mkdir_p(bare, "700")
		vt.run({ "cp", "/bin/true", bare .. "/true" })
		t.isnt(proc.run({ "chroot", bare, "/true" }).status, 0, "without them it cannot (what the copy is for)")
	end

	-- ---- 6. doctor's confinement line ----

	do
		local dlog = base .. "/doctor.jsonl"
		local env = { FIRECLAW_FIRECRACKER = FAKE, FIRECLAW_RUN = base .. "/doc-run", FIRECLAW_JAILER = JAILER,
			FAKE_FC_VERSION = "1.16.1", FAKE_FC_LOG = dlog }
		local out = proc.run({ FIRECLAW, "doctor" }, { env = env, timeout = 120 }).stdout
		local asked = 0
		for _, e in ipairs(events(dlog, "jailer")) do
			if e.argv and e.argv[1] == "--version" then asked = asked + 1 end
		end
		t.is(asked, 1, "doctor: jailer --version is run once")
		env.FAKE_FC_LOG = nil
		t.like(out, "\nok +confine fc +Firecracker jailed by [^\n]*fake%-jailer: uid " .. jailer.UID_BASE
			.. "%+1%+id per VM, gid " .. jailer.UID_BASE .. ", chroot [^\n]*/doc%-run/jail/<exec>/<id>/root",
			"doctor: jailed, by which jailer, the uid scheme and the chroot")
		fs.write(base .. "/jailer-1.0", "#!/bin/sh\nFAKE_FC_VERSION=1.0.0 exec " .. JAILER .. " \"$@\"\n", "755")
		env.FIRECLAW_JAILER = base .. "/jailer-1.0"
		out = proc.run({ FIRECLAW, "doctor" }, { env = env, timeout = 120 }).stdout
		t.like(out, "\nwarn +confine fc +[^\n]*; but jailer 1%.0%.0 with firecracker 1%.16%.1\n",
			"doctor: a jailer of another release is a warning")
		env.FIRECLAW_JAILER = base .. "/no-jailer"
		out = proc.run({ FIRECLAW, "doctor" }, { env = env, timeout = 120 }).stdout
		t.like(out, "\nwarn +confine fc +no jailer %(FIRECLAW_JAILER=[^\n]*/no%-jailer does not exist%): "
			.. "Firecracker is refused as root", "doctor: no jailer, and what that means")
		t.like(out, "fix: get jailer from the Firecracker release", "doctor: and how to get one")
	end

end

local ok, err = pcall(main)
c:run()
if not ok then error(err, 0) end
return t.done()
