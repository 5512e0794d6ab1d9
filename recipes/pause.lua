-- Pause a kept VM: save its memory and devices (its disk stays), end its VMM (RAM freed)
local cli = require "fireclaw.cli"
local log = require "fireclaw.log"
local runtime = require "fireclaw.runtime"
local sandbox = require "fireclaw.sandbox"

local function main(args)
	local _, ref = cli.parse_vm(args, { usage = "fireclaw pause ID|NAME",
		about = "Save kept VM ID (memory, devices, its own disk) and end its VMM; fireclaw resume ID brings it back." })
	local t0 = runtime.now()
	local sb = sandbox.pause_kept(ref)
	log.info("VM %s paused in %.0f ms (saved in %s)", sb.id, (runtime.now() - t0) * 1000, sb.rec.paused.dir)
	return 0
end

return cli.recipe({}, main, ...)
