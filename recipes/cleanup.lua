-- Reap VMs whose fireclaw is gone: VMM, namespace, files (--all: every VM)
--
-- Trusts records, not names: a VM is stale when the process that owns it has exited (pid
-- and start time checked, pids are reused) and it was not started with --keep. Its VMM is
-- killed only if that pid still has the recorded start time.
local cli = require "fireclaw.cli"
local log = require "fireclaw.log"
local snapshot = require "fireclaw.snapshot"
local state = require "fireclaw.state"

local function main(args)
	local o = cli.parse(args, {
		usage = "fireclaw cleanup [--all]", args = 0,
		about = "Remove what dead fireclaw runs left behind: VMM processes, namespaces, run directories.",
		{ "--all", "also stop live and kept VMs" },
		{ "-v, --verbose", "say what was removed" },
	})
	local n = 0
	for _, rec in ipairs(state.list()) do
		if o.all or state.is_stale(rec) then
			for _, what in ipairs(state.reap(rec)) do log.info("VM %s: %s", rec.id, what) end
			n = n + 1
		end
	end
	state.clean_partial()
	snapshot.clean_temp()
	log.note("cleanup: %d VM%s reaped", n, n == 1 and "" or "s")
	return 0
end

return cli.recipe({}, main, ...)
