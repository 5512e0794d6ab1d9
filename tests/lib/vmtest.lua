-- vmtest.lua: helpers for the VM tests (tests/vm_*.lua): temp dirs, test namespaces with a
-- tap, cleanup that runs even when a test fails, and leak checks.
local json = require "fireclaw.json"
local proc = require "fireclaw.proc"
local runtime = require "fireclaw.runtime"

local M = {}

M.TAP_MAC = "06:00:ac:10:00:01"
M.GUEST_MAC = "06:00:ac:10:00:02"
M.TESTS = os.getenv("FIRECLAW_TESTS") or "tests"
M.PID = proc.getpid()

local function run(argv)
	local r = proc.run(argv, { timeout = 60 })
	if r.status ~= 0 then
		error(table.concat(argv, " ") .. ": " .. (r.stderr ~= "" and r.stderr or r.stdout), 0)
	end
	return (r.stdout:gsub("%s+$", ""))
end
M.run = run

function M.tmpdir()
	return run({ "mktemp", "-d", "/tmp/fct-vm-XXXXXX" })
end

function M.rm_rf(path)
	if path and path:match("^/tmp/fct%-vm%-") then proc.run({ "rm", "-rf", path }) end
end

-- What comes back when a child process writes `text` (no NULs) to fd (as its descriptor
-- 3) and reads as many bytes from it: a channel whose far end echoes gives `text` back.
-- The child is bounded (5 s), then killed.
function M.fd_echo(fd, text)
	local dir = M.tmpdir()
	local p = proc.spawn { argv = { "sh", "-c", 'printf %s "$1" >&3 && head -c "$2" <&3', "-", text, tostring(#text) },
		fds = { fd }, stdout = dir .. "/out" }
	if not p:wait(5) then
		p:kill(9)
		p:wait(5)
	end
	p:close()
	local f = io.open(dir .. "/out", "rb")
	local got = f and f:read("*a")
	if f then f:close() end
	M.rm_rf(dir)
	return got
end

-- "dev:inode" of a path (follows symlinks), or nil.
function M.stat_id(path)
	local r = proc.run({ "stat", "-L", "-c", "%d:%i", path })
	return r.status == 0 and (r.stdout:gsub("%s+$", "")) or nil
end

function M.inode(path)
	local id = M.stat_id(path)
	return id and tonumber(id:match(":(%d+)$"))
end

function M.exists(path)
	return proc.run({ "test", "-e", path }).status == 0
end

function M.read_jsonl(path)
	local out = {}
	local f = io.open(path)
	if not f then return out end
	for line in f:lines() do
		if line ~= "" then out[#out + 1] = json.decode(line) end
	end
	f:close()
	return out
end

-- Namespaces are made with ip(8): the test of the VM layer should not depend on
-- fireclaw.net (tested on its own). net.probe is used when present, to reach a guest.
local has_net, net = pcall(require, "fireclaw.net")
if not (has_net and type(net) == "table") then net = nil end

-- A test namespace NAME holding tap0 (172.16.0.1/30, the fixed gateway MAC), as every VM
-- namespace has. Registered with `cleanup` for deletion.
function M.netns(cleanup, name)
	cleanup:add(function() M.netns_delete(name) end)
	run({ "ip", "netns", "add", name })
	run({ "ip", "-n", name, "tuntap", "add", "tap0", "mode", "tap" })
	run({ "ip", "-n", name, "link", "set", "tap0", "address", M.TAP_MAC })
	run({ "ip", "-n", name, "addr", "add", "172.16.0.1/30", "dev", "tap0" })
	run({ "ip", "-n", name, "link", "set", "tap0", "up" })
	run({ "ip", "-n", name, "link", "set", "lo", "up" })
	-- the guest's MAC is fixed: no ARP round trip before the first packet
	run({ "ip", "-n", name, "neigh", "replace", "172.16.0.2", "lladdr", M.GUEST_MAC, "dev", "tap0",
		"nud", "permanent" })
	return name
end

function M.netns_delete(name)
	proc.run({ "ip", "netns", "delete", name })
end

-- Names of the namespaces starting with prefix.
function M.netns_list(prefix)
	local out = {}
	for _, n in ipairs(runtime.listdir("/run/netns") or {}) do
		if n:sub(1, #prefix) == prefix then out[#out + 1] = n end
	end
	return out
end

-- Is something mounted on path in *our* mount namespace (the host's)?
function M.mounted_here(path)
	local f = io.open("/proc/self/mountinfo")
	local s = f and f:read("*a") or ""
	if f then f:close() end
	for line in s:gmatch("[^\n]+") do
		local mp = line:match("^%S+ %S+ %S+ %S+ (%S+)")
		if mp == path then return true end
	end
	return false
end

-- Can we reach guest:port from inside the namespace?
function M.tcp_probe(ns, host, port, timeout_ms)
	if net and net.probe then return net.probe(ns, host, port, timeout_ms) end
	local r = proc.run({ "ip", "netns", "exec", ns, "bash", "-c",
		string.format("exec 3<>/dev/tcp/%s/%d", host, port) }, { timeout = (timeout_ms or 1000) / 1000 })
	return r.status == 0
end

-- Cleanup actions, run last-in first-out, each protected: a failing one does not stop the
-- others.
function M.cleanup()
	local c = { fns = {} }
	function c:add(fn) self.fns[#self.fns + 1] = fn end
	function c:run()
		for i = #self.fns, 1, -1 do pcall(self.fns[i]) end
		self.fns = {}
	end
	return c
end

-- Copy a file keeping holes.
function M.copy(src, dst)
	run({ "cp", "--sparse=always", src, dst })
end

function M.shallow_copy(t, extra)
	local r = {}
	for k, v in pairs(t) do r[k] = v end
	for k, v in pairs(extra or {}) do r[k] = v end
	return r
end

return M
