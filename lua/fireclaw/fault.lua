-- fireclaw.fault: fault injection for the tests (tests/faults.sh).
--
--   fault.point("netns")   -- a named point in a flow; does nothing unless asked to:
--   FIRECLAW_FAULT=netns           fireclaw kills itself with SIGKILL there
--   FIRECLAW_FAULT=netns:error     the point raises "fault injected at netns" instead
--
-- The points (record, netns, tap, disk, vmm-spawned, vmm-recorded, ram-filled (a restore: QEMU
-- forked, its RAM copied, the rest of the disk not yet), ssh-ready or agent-ready, exec,
-- exec-output, command-done, teardown-session or teardown-agent, teardown-vmm, reap-vmm, reap-netns,
-- snapshot-saved) sit at the stage boundaries of fireclaw.sandbox, fireclaw.state and the
-- recipes, so a test can stop a run at each one and check that nothing is left behind.
-- The environment is read once; without FIRECLAW_FAULT a point is an empty function.
local M = {}

local want, how = (os.getenv("FIRECLAW_FAULT") or ""):match("^([^:]+):?(.*)$")

function M.point() end

if want then
	function M.point(name)
		if name ~= want then return end
		if how == "error" then error("fault injected at " .. name, 0) end
		io.stdout:flush()
		io.stderr:flush()
		local proc = require "fireclaw.proc"
		local me = proc.getpid()
		proc.kill(me, proc.starttime(me), require("fireclaw.sys").signal.SIGKILL, 0)
	end
end

return M
