-- Benchmark helper: execs on one live VM, through the agent and over SSH
--
--   fireclaw bench/exec_live.lua [N] [SNAPSHOT]
-- restores the image's snapshot (or SNAPSHOT) once, runs `true` N times (default 100)
-- through the guest agent, then N times over SSH on the same VM, and prints one JSON line:
--   {"agent": [ms…], "ssh": [ms…], "agent_fds": [before, after], "agent_rss_kib": [before,
--    after], "ssh_fds": […], "ssh_rss_kib": […]}
-- (fds: this process's open descriptors; RSS: VmRSS, after a full GC).
local cli = require "fireclaw.cli"
local fs = require "fireclaw.fs"
local json = require "fireclaw.json"
local runtime = require "fireclaw.runtime"

local n = tonumber(arg[1]) or 100
local restore = cli.use "restore"
local snap = assert(restore.find { image = "default", snapshot = arg[2] })
local sb = restore.restore({ image = "default" }, snap)

local function nfds() return #runtime.listdir("/proc/self/fd") end
local function rss()
	collectgarbage() collectgarbage()
	return tonumber((fs.read("/proc/self/status") or ""):match("VmRSS:%s+(%d+)"))
end

local out = {}
local function series(name, exec)
	exec() -- a first one, not counted
	local fd0, rss0 = nfds(), rss()
	local ms = {}
	for i = 1, n do
		local t0 = runtime.now()
		local r = exec()
		ms[i] = (runtime.now() - t0) * 1000
		assert(r.status == 0, name .. ": exec failed")
	end
	out[name] = ms
	out[name .. "_fds"] = { fd0, nfds() }
	out[name .. "_rss_kib"] = { rss0, rss() }
end

local ok, err = pcall(function()
	if sb.agent then series("agent", function() return sb.agent:exec({ "true" }) end) end
	local s = sb:connect()
	series("ssh", function() return s:exec({ "true" }) end)
end)
sb:destroy()
if not ok then error(err, 0) end
io.write(json.encode(out), "\n")
