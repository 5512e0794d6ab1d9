-- Remove VMs by id: kill the VMM, delete the namespace and the run directory
local cli = require "fireclaw.cli"
local log = require "fireclaw.log"
local state = require "fireclaw.state"

local function main(args)
	local _, ids = cli.parse(args, { usage = "fireclaw rm ID…", { "-v, --verbose", "say what was removed" } })
	if #ids == 0 then cli.usage_error("rm needs at least one VM id (see fireclaw ps)") end
	return cli.each_vm(ids, "no VM with id '%s' (see fireclaw ps)", function(rec)
		for _, what in ipairs(state.reap(rec)) do log.info("VM %s: %s", rec.id, what) end
		log.note("removed VM %s", rec.id)
	end)
end

return cli.recipe({}, main, ...)
