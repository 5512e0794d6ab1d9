-- Stop kept VMs by id or name: the VMM, its namespace, its files (and a paused VM's saved state)
local cli = require "fireclaw.cli"
local log = require "fireclaw.log"
local state = require "fireclaw.state"

local function main(args)
	local _, ids = cli.parse(args, { usage = "fireclaw stop ID|NAME…", { "-v, --verbose", "say what was removed" } })
	if #ids == 0 then cli.usage_error("stop needs at least one VM id or name (see fireclaw ps)") end
	state.reap_expired()
	return cli.each_vm(ids, "no VM '%s' (see fireclaw ps; an expired one was removed)", function(rec)
		if not rec.keep and state.owner_alive(rec) then
			io.stderr:write(string.format("fireclaw: VM %s is not a kept VM: it belongs to the fireclaw run of pid %s "
				.. "(stop that, or fireclaw rm %s)\n", rec.id, tostring(rec.owner.pid), rec.id))
			return false
		end
		for _, what in ipairs(state.reap(rec)) do log.info("VM %s: %s", rec.id, what) end
		log.info("stopped VM %s", rec.id)
	end)
end

return cli.recipe({}, main, ...)
