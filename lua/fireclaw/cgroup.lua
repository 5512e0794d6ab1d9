-- fireclaw.cgroup: resource limits for a VMM — memory, number of tasks, CPU time — on
-- cgroup v2 (the unified hierarchy) or v1 (one hierarchy per controller).
--
--   local l = cgroup.detect()          -- {version = 2, root =, controllers = {"memory", …}}
--                                      -- or {version = 1, mounts = {memory = dir, …}, controllers}
--                                      -- or {why = "…"} (no usable controller: no limits)
--   local lim = cgroup.limits{mem_mib = 256, vcpu = 1, cpus = 0.5}
--                                      -- {memory = bytes, pids = n, cpus = x or nil}
--   local cg = cgroup.plan("fc-1a2b3c", lim [, layout])
--                                      -- no side effect: cg.dirs (to record first), cg.procs
--                                      -- (cgroup.procs files for proc.spawn{cgroup = …})
--   cgroup.create(cg)                  -- the directories with their limits; raises
--   cgroup.oom_kills(dirs) -> n        -- OOM kills counted in those cgroups (0 if none)
--   cgroup.remove(dirs) -> {what was done}  -- kills what is left inside, rmdir; raises if
--                                      -- a cgroup cannot be removed
--   cgroup.describe(layout) -> "v1 memory,pids,cpu" | "v2 memory,pids,cpu" | "none: …"
--
-- Every VM gets its own cgroup fireclaw/<name> (name: its namespace) under the root of
-- each hierarchy: on v2 a child of the root can have controllers (a cgroup holding
-- processes, like fireclaw's own, cannot hand them to children), and v1 does the same for
-- one layout on both. The VMM joins it in the child between fork and exec (proc.spawn's
-- cgroup option; on v2 it is created there, clone3 CLONE_INTO_CGROUP), so it never runs
-- a single instruction unlimited.
--
-- Pure file operations on cgroupfs; `FIRECLAW_CGROUP=none` turns limits off,
-- `FIRECLAW_CGROUP_MEM_MIB=N` sets the memory limit itself (the tests set one below the
-- guest's RAM to make the guest's allocations hit it). See docs/security.md.
local fs = require "fireclaw.fs"
local runtime = require "fireclaw.runtime"

local sys = require "fireclaw.sys"

local E, SIGKILL = sys.errno, sys.signal.SIGKILL

local M = {}

-- Memory on top of the guest's RAM for the VMM itself (its heap, QEMU's TCG code cache,
-- device buffers): 64 MiB plus a quarter of the RAM. QEMU under TCG was measured at
-- 120-230 MiB resident for a 256 MiB guest, RAM included.
M.MEM_OVERHEAD_MIB = 64
M.MEM_OVERHEAD_SHARE = 0.25
-- QEMU runs 4-6 threads for a 1-vCPU guest (main, RCU, vCPU, I/O), its block thread pool
-- may grow to 64, one thread per vCPU: 256 leaves room and still stops a runaway.
M.PIDS_MAX = 256
M.CPU_PERIOD_US = 100000
M.ROOT = "/sys/fs/cgroup"
M.DIR = "fireclaw" -- under each hierarchy's root
local WANTED = { "memory", "pids", "cpu" }

local function read(path)
	local f = io.open(path, "rb")
	if not f then return nil end
	local s = f:read("*a")
	f:close()
	return s
end

local exists = fs.exists -- access(2): cgroup.kill is write-only

-- One write(2) of the whole value: cgroupfs takes a value per write, and says why not
-- in the errno of that write.
local function write(path, value)
	local fd, oerr = sys.open(path, sys.O.WRONLY)
	if not fd then error(string.format("cgroup: open %s: %s", path, oerr), 0) end
	local n, e = sys.write(fd, value)
	sys.close(fd)
	if n ~= #value then error(string.format("cgroup: write '%s' to %s: %s", value, path, e or "short write"), 0) end
end

local function mkdir(path)
	local ok, err, e = sys.mkdir(path, "755")
	if not ok and e ~= E.EEXIST then
		error(string.format("cgroup: mkdir %s: %s", path, err), 0)
	end
end

local function has(list, x)
	for _, y in ipairs(list) do if y == x then return true end end
	return false
end

-- The hierarchies in a /proc/self/mounts text: the cgroup2 mount point (if any) and the v1
-- mount point of each wanted controller (cpu may share one with cpuacct). A read-only
-- mount (a container's view) cannot take a VM's cgroup: it does not count.
local function parse_mounts(text)
	local v2, v1 = nil, {}
	for line in text:gmatch("[^\n]+") do
		local dir, fstype, opts = line:match("^%S+ (%S+) (%S+) (%S+)")
		if opts and ("," .. opts .. ","):find(",ro,", 1, true) then fstype = nil end
		if fstype == "cgroup2" and not v2 then v2 = dir end
		if fstype == "cgroup" then
			for o in opts:gmatch("[^,]+") do
				if has(WANTED, o) and not v1[o] then v1[o] = dir end
			end
		end
	end
	return v2, v1
end

-- What this host offers. opts (for tests): mounts = text of /proc/self/mounts.
-- v2 wins when its root has any of the controllers; else v1 with whichever of memory,
-- pids, cpu are mounted; else none (a hybrid host's cgroup2 at /sys/fs/cgroup/unified
-- holds no controllers: it counts as none unless v1 has some).
function M.detect(opts)
	opts = opts or {}
	if not opts.mounts and os.getenv("FIRECLAW_CGROUP") == "none" then
		return { why = "FIRECLAW_CGROUP=none" }
	end
	local v2, v1 = parse_mounts(opts.mounts or read("/proc/self/mounts") or "")
	if v2 then
		local have, ctl = {}, {}
		for c in (read(v2 .. "/cgroup.controllers") or ""):gmatch("%S+") do have[#have + 1] = c end
		for _, c in ipairs(WANTED) do
			if has(have, c) then ctl[#ctl + 1] = c end
		end
		if #ctl > 0 then return { version = 2, root = v2, controllers = ctl } end
	end
	local ctl, mounts = {}, {}
	for _, c in ipairs(WANTED) do
		if v1[c] then ctl[#ctl + 1], mounts[c] = c, v1[c] end
	end
	if #ctl > 0 then return { version = 1, mounts = mounts, controllers = ctl } end
	if v2 then return { why = "cgroup2 at " .. v2 .. " has no memory, pids or cpu controller" } end
	return { why = "no cgroup hierarchy with memory, pids or cpu is mounted" }
end

local detected
local function layout_of(l)
	if l then return l end
	detected = detected or M.detect()
	return detected
end

function M.describe(l)
	l = layout_of(l)
	if not l.version then return "none: VMs run without limits (" .. l.why .. ")" end
	return string.format("v%d %s", l.version, table.concat(l.controllers, ","))
end

-- The limits of a VM: guest RAM plus the VMM's overhead, at most PIDS_MAX tasks, `cpus`
-- CPUs' worth of time (fractions allowed; nil: no CPU limit).
function M.limits(o)
	local mem_mib = assert(tonumber(o.mem_mib), "cgroup.limits: mem_mib")
	local limit_mib = math.ceil(mem_mib + mem_mib * M.MEM_OVERHEAD_SHARE + M.MEM_OVERHEAD_MIB)
	local forced = os.getenv("FIRECLAW_CGROUP_MEM_MIB")
	if forced and forced ~= "" then
		limit_mib = tonumber(forced)
		if not limit_mib or limit_mib < 16 or limit_mib % 1 ~= 0 then
			error("cgroup: FIRECLAW_CGROUP_MEM_MIB must be a whole number of MiB >= 16, not '" .. forced .. "'", 0)
		end
	end
	if o.cpus ~= nil and (type(o.cpus) ~= "number" or o.cpus <= 0) then
		error("cgroup: cpus must be a positive number, not " .. tostring(o.cpus), 0)
	end
	return { memory = limit_mib * 1024 * 1024, pids = M.PIDS_MAX, cpus = o.cpus }
end

-- The CPU quota in microseconds per period; at least 1 ms (the kernel's minimum).
local function quota_us(cpus) return math.max(1000, math.floor(cpus * M.CPU_PERIOD_US + 0.5)) end

-- The controllers this VM's cgroup needs: cpu only with a CPU limit.
local function needed(l, lim)
	local out = {}
	for _, c in ipairs(l.controllers) do
		if c ~= "cpu" or lim.cpus then out[#out + 1] = c end
	end
	return out
end

-- Where the VM's cgroups go, without creating anything. nil when there is no cgroup to
-- use (layout.why says why).
function M.plan(name, lim, l)
	l = layout_of(l)
	if not l.version then return nil end
	if not tostring(name):match("^[%w_.-]+$") or name:sub(1, 1) == "." then
		error("cgroup: bad cgroup name '" .. tostring(name) .. "'", 0)
	end
	local cg = { layout = l, limits = lim, name = name, dirs = {}, procs = {}, controllers = needed(l, lim) }
	if l.version == 2 then
		cg.dirs[1] = l.root .. "/" .. M.DIR .. "/" .. name
	else
		local seen = {}
		for _, c in ipairs(cg.controllers) do
			local d = l.mounts[c] .. "/" .. M.DIR .. "/" .. name
			if not seen[d] then -- controllers mounted together share one directory
				seen[d] = true
				cg.dirs[#cg.dirs + 1] = d
			end
		end
	end
	for i, d in ipairs(cg.dirs) do cg.procs[i] = d .. "/cgroup.procs" end
	return cg
end

local function write_if(path, value)
	if exists(path) then write(path, value) return true end
	return false
end

local function create_v2(cg)
	local l, lim = cg.layout, cg.limits
	local parent = l.root .. "/" .. M.DIR
	-- the root hands the controllers to fireclaw/, which hands them to each VM
	for _, d in ipairs({ l.root, parent }) do
		if d == parent then mkdir(parent) end
		local have = {}
		for w in (read(d .. "/cgroup.subtree_control") or ""):gmatch("%S+") do have[#have + 1] = w end
		local missing = {}
		for _, c in ipairs(cg.controllers) do
			if not has(have, c) then missing[#missing + 1] = "+" .. c end
		end
		if #missing > 0 then write(d .. "/cgroup.subtree_control", table.concat(missing, " ")) end
	end
	local dir = cg.dirs[1]
	mkdir(dir)
	if has(cg.controllers, "memory") then
		write(dir .. "/memory.max", tostring(lim.memory))
		write_if(dir .. "/memory.swap.max", "0")
		-- an OOM kill takes every task of the VMM, not one thread's worth of it
		write_if(dir .. "/memory.oom.group", "1")
	end
	if has(cg.controllers, "pids") then write(dir .. "/pids.max", tostring(lim.pids)) end
	if lim.cpus and has(cg.controllers, "cpu") then
		write(dir .. "/cpu.max", string.format("%d %d", quota_us(lim.cpus), M.CPU_PERIOD_US))
	end
end

local function create_v1(cg)
	local l, lim = cg.layout, cg.limits
	for _, c in ipairs(cg.controllers) do
		local base = l.mounts[c] .. "/" .. M.DIR
		mkdir(base)
		local dir = base .. "/" .. cg.name
		mkdir(dir)
		if c == "memory" then
			write(dir .. "/memory.limit_in_bytes", tostring(lim.memory))
			-- memory + swap at the same limit: no swapping past it (needs swap accounting)
			write_if(dir .. "/memory.memsw.limit_in_bytes", tostring(lim.memory))
		elseif c == "pids" then
			write(dir .. "/pids.max", tostring(lim.pids))
		elseif c == "cpu" and lim.cpus then
			if not exists(dir .. "/cpu.cfs_quota_us") then
				error("cgroup: " .. dir .. " has no cpu.cfs_quota_us (a kernel without CFS bandwidth control): --cpus cannot be enforced", 0)
			end
			write(dir .. "/cpu.cfs_period_us", tostring(M.CPU_PERIOD_US))
			write(dir .. "/cpu.cfs_quota_us", tostring(quota_us(lim.cpus)))
		end
	end
end

-- Create the VM's cgroups with their limits. On error, what was made is removed. The
-- shared fireclaw/ parent goes with the last VM (M.remove): one that another VM removes
-- between our mkdir of it and of ours makes this try fail, and the next one remake it.
function M.create(cg)
	local ok, err
	for _ = 1, 3 do
		ok, err = pcall(cg.layout.version == 2 and create_v2 or create_v1, cg)
		if ok then return cg end
		pcall(M.remove, cg.dirs)
	end
	error(err, 0)
end

local function pids_in(dir)
	local out = {}
	-- 0: a process of another pid namespace (kill(0) would mean our own process group)
	for p in (read(dir .. "/cgroup.procs") or ""):gmatch("%d+") do
		if tonumber(p) > 0 then out[#out + 1] = tonumber(p) end
	end
	return out
end

-- OOM kills the kernel counted in these cgroups (v2 memory.events, v1 memory.oom_control).
function M.oom_kills(dirs)
	local n = 0
	for _, d in ipairs(dirs or {}) do
		local ev = read(d .. "/memory.events") or read(d .. "/memory.oom_control") or ""
		n = n + (tonumber(ev:match("oom_kill (%d+)")) or 0)
	end
	return n
end

-- Empty each cgroup (cgroup.kill on v2, else SIGKILL to every pid listed: a process in
-- this VM's cgroup is this VM's, whatever its pid) and remove it. Safe on dirs that are
-- already gone. Returns a list of what was done; raises if a cgroup stays.
function M.remove(dirs)
	local done = {}
	for _, d in ipairs(dirs or {}) do
		if fs.is_dir(d) then -- (a stat: a listing made a table of its ~30 files)
			local left = pids_in(d)
			if #left > 0 then
				if not write_if(d .. "/cgroup.kill", "1") then
					for _, pid in ipairs(left) do sys.kill(pid, SIGKILL) end
				end
				done[#done + 1] = string.format("killed %d process(es) in %s", #left, d)
			end
			-- a killed task leaves its cgroup when it has exited: at most a few seconds
			local deadline = runtime.now() + 5
			while true do
				local ok, e, errno = sys.rmdir(d)
				if ok or errno == E.ENOENT then break end
				if runtime.now() > deadline then error(string.format("cgroup: rmdir %s: %s", d, e), 0) end
				for _, pid in ipairs(pids_in(d)) do sys.kill(pid, SIGKILL) end
				runtime.sleep(0.02)
			end
			done[#done + 1] = "removed cgroup " .. d
		end
		-- the shared parent goes with the last VM's cgroup (busy while another VM has one)
		local parent = d:match("^(.*)/[^/]+$")
		if parent and parent:match("/" .. M.DIR .. "$") then sys.rmdir(parent) end
	end
	return done
end

return M
