-- fireclaw.vmm.util: small helpers shared by fireclaw.vm and its drivers (file helpers
-- are fireclaw.fs's).
local fs = require "fireclaw.fs"
local log = require "fireclaw.log"
local proc = require "fireclaw.proc"
local runtime = require "fireclaw.runtime"

local M = {}

-- A progress line on stderr with -v.
M.verbose = log.info

M.is_dir = fs.is_dir
M.exists = fs.exists
M.read_file = fs.read

-- Create (or empty) a file.
function M.touch(path)
	local f, err = io.open(path, "wb")
	if not f then error("vm: cannot create " .. tostring(err), 0) end
	f:close()
end

-- Run a helper command; raise with its stderr if it fails.
function M.run(argv, what)
	local r = proc.run(argv, { timeout = 120 })
	if r.status ~= 0 then
		local msg = (r.stderr ~= "" and r.stderr or r.stdout):gsub("%s+$", "")
		error(string.format("vm: %s failed (%s): %s", what or argv[1],
			r.signal and ("signal " .. r.signal) or ("status " .. tostring(r.status)), msg), 0)
	end
	return r
end

function M.mkdir_p(path)
	fs.mkdir_p(path)
end

-- An absolute path: the VMM may run with another working directory, and what it records
-- in a snapshot must make sense later.
function M.abspath(path)
	if path:sub(1, 1) == "/" then return path end
	local pwd = os.getenv("PWD")
	if not pwd then error("vm: relative path " .. path .. " and no $PWD to resolve it", 0) end
	return (pwd .. "/" .. path):gsub("/%./", "/")
end

-- Compare dotted versions: "1.16.1" >= "1.1" is true.
function M.version_at_least(v, min)
	local a, b = {}, {}
	for n in tostring(v):gmatch("%d+") do a[#a + 1] = tonumber(n) end
	for n in tostring(min):gmatch("%d+") do b[#b + 1] = tonumber(n) end
	for i = 1, math.max(#a, #b) do
		local x, y = a[i] or 0, b[i] or 0
		if x ~= y then return x > y end
	end
	return true
end

-- Copy a (large, mostly empty) file keeping holes: a reflink where the filesystem can,
-- through fireclaw.rootfs when it is there, else cp --sparse=always.
function M.copy_sparse(src, dst)
	local ok, rootfs = pcall(require, "fireclaw.rootfs")
	if ok and type(rootfs) == "table" and rootfs.copy then
		rootfs.copy(src, dst)
		return
	end
	M.run({ "cp", "--reflink=auto", "--sparse=always", src, dst }, "copy " .. src)
end

-- A file of `bytes` bytes that allocates nothing.
function M.sparse_file(path, bytes)
	M.run({ "truncate", "-s", tostring(bytes), path }, "truncate " .. path)
end

-- Find an executable: a path with a slash is taken as is, else searched on $PATH.
function M.which(name)
	if not name or name == "" then return nil end
	if name:find("/", 1, true) then
		return M.exists(name) and not M.is_dir(name) and name or nil
	end
	for dir in (os.getenv("PATH") or "/usr/bin:/bin"):gmatch("[^:]+") do
		local p = dir .. "/" .. name
		if M.exists(p) and not M.is_dir(p) then return p end
	end
	return nil
end

-- Wait for cond() with short, growing steps (1 ms up to 10 ms) until it returns a value
-- or the deadline passes (then nil). Used on VMM state that has no event to wait on.
function M.poll(cond, timeout_s)
	local deadline = runtime.now() + timeout_s
	local step = 0.001
	while true do
		local v = cond()
		if v ~= nil then return v end
		if runtime.now() >= deadline then return nil end
		runtime.sleep(step)
		step = math.min(step * 1.5, 0.01)
	end
end

-- The VM's tap must exist before the VMM opens it: Firecracker and QEMU both create a
-- missing one themselves (unconfigured, non-persistent), and the guest then boots or
-- restores "fine" with a dead network (docs/guest-notes.md, "Taps, MACs and neighbours") -- or, without a namespace, a
-- stray tap appears on the host.
function M.check_tap(v)
	if not v.tap then return end
	local present
	if v.netns then
		local ok, net = pcall(require, "fireclaw.net")
		if ok and type(net) == "table" and net.link_exists then
			present = net.link_exists(v.netns, v.tap)
		else
			present = proc.run({ "ip", "-n", v.netns, "link", "show", v.tap }).status == 0
		end
	else
		present = M.is_dir("/sys/class/net/" .. v.tap)
	end
	if not present then
		error(string.format("vm %s: no %s in %s: create the tap first (fireclaw.net.tap_create)",
			v.id, v.tap, v.netns and ("namespace " .. v.netns) or "the host's namespace"), 0)
	end
end

-- "exited (status 1)" / "was killed (signal 9)" for a proc:wait() result.
function M.describe_exit(st)
	if not st then return "is still running" end
	if st.signal then return "was killed (signal " .. st.signal .. ")" end
	return "exited (status " .. tostring(st.status) .. ")"
end

-- What probe(binary) finds out about a VMM binary (its version, its features), cached in
-- $FIRECLAW_STATE/cache/vmm-probes.json under the binary's identity (path, size, mtime,
-- inode): running `qemu -version` costs ~20 ms of every run otherwise. A changed or
-- replaced binary is probed again; an unwritable cache only costs the probe.
function M.cached_probe(kind, binary, probe)
	local json = require "fireclaw.json"
	local config = require "fireclaw.config"
	local st = runtime.stat(binary)
	if not st then return probe() end
	local key = string.format("%s %s %d %.9f %d", kind, binary, st.size, st.mtime, st.ino)
	local path = config.state_dir .. "/cache/vmm-probes.json"
	local ok, cache = pcall(json.decode, M.read_file(path) or "{}")
	if not ok or type(cache) ~= "table" then cache = {} end
	if type(cache[key]) == "table" then return cache[key] end
	local result = probe()
	if result then
		cache[key] = result
		pcall(function()
			fs.mkdir_p(config.state_dir .. "/cache", "700")
			fs.write(path, json.encode(cache), "600")
		end)
	end
	return result
end

-- The host's TSC frequency in kHz, for tsc_early_khz= (cpuinfo: the text of /proc/cpuinfo,
-- read when not given): "cpu MHz" (constant_tsc hosts), nil without one.
function M.tsc_khz(cpuinfo)
	cpuinfo = cpuinfo or fs.read("/proc/cpuinfo") or ""
	local mhz = tonumber(cpuinfo:match("cpu MHz%s*:%s*([%d.]+)"))
	return mhz and math.floor(mhz * 1000 + 0.5) or nil
end

-- The one TCG boot-argument policy (image.boot_args and the QEMU driver both use it):
-- `args` (a string) plus the image's TCG extras (a list or a string). Under TCG the guest
-- kernel's TSC calibration hangs in about 3 boots out of 5 without tsc_early_khz=
-- (docs/guest-notes.md, "Booting under TCG"): the extras carry the build host's value,
-- this host's replaces it (or it goes, when this host's is unknown), and it is added
-- when neither args nor the extras have one. (cpuinfo: for the tests, as for tsc_khz.)
function M.tcg_boot_args(args, extra, cpuinfo)
	local khz = M.tsc_khz(cpuinfo)
	local out = {}
	for _, a in ipairs(type(extra) == "table" and extra or {}) do out[#out + 1] = a end
	if type(extra) == "string" then
		for a in extra:gmatch("%S+") do out[#out + 1] = a end
	end
	for i = #out, 1, -1 do
		if out[i]:match("^tsc_early_khz=") then
			if khz then out[i] = "tsc_early_khz=" .. khz else table.remove(out, i) end
		end
	end
	local line = table.concat(out, " ")
	if khz and not (args .. " " .. line):find("tsc_early_khz=", 1, true) then
		out[#out + 1] = "tsc_early_khz=" .. khz
		line = table.concat(out, " ")
	end
	return line ~= "" and (args .. " " .. line) or args
end

-- A small stable number for a VM id: the usual 6 hex digits as they are, any other id
-- hashed (djb2, 24 bits). Both VMMs' per-VM users are UID_BASE + 1 + this.
function M.id_number(id)
	id = tostring(id)
	if id:match("^%x%x%x%x%x%x$") then return tonumber(id, 16) end
	local h = 5381
	for i = 1, #id do h = (h * 33 + id:byte(i)) % 16777216 end
	return h
end

return M
