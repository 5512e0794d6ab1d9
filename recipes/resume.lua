-- Resume a paused VM with its processes and files as they were
local cli = require "fireclaw.cli"
local log = require "fireclaw.log"
local runtime = require "fireclaw.runtime"
local sandbox = require "fireclaw.sandbox"

local function main(args)
	local _, ref = cli.parse_vm(args, { usage = "fireclaw resume ID|NAME",
		about = "Bring paused VM ID back: a fresh VMM restores its saved memory, devices and disk." })
	local t0 = runtime.now()
	local sb = sandbox.resume_kept(ref)
	log.info("VM %s resumed in %.0f ms", sb.id, (runtime.now() - t0) * 1000)
	return 0
end

return cli.recipe({}, main, ...)
