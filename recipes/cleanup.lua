-- Reap VMs whose fireclaw is gone: VMM, namespace, files (--all: every VM)
--
-- Trusts records, not names: a VM is stale when the process that owns it has exited (pid
-- and start time checked, pids are reused) and it was not started with --keep. Its VMM is
-- killed only if that pid still has the recorded start time.
local cli = require "fireclaw.cli"
local log = require "fireclaw.log"
local runtime = require "fireclaw.runtime"
local snapshot = require "fireclaw.snapshot"
local state = require "fireclaw.state"

local function main(args)
	local o = cli.parse(args, {
		usage = "fireclaw cleanup [--all]", args = 0,
		about = "Remove what dead fireclaw runs left behind: VMM processes, namespaces, run directories.",
		{ "--all", "also stop live and kept VMs" },
		{ "-v, --verbose", "say what was removed" },
	})
	local n, failed = 0, 0
	for _, rec in ipairs(state.list()) do
		if o.all or state.is_stale(rec) then
			-- one VM that cannot be reaped (a busy mount, an immutable file) does not stop
			-- the others: it is reported, and the exit status says so
			local ok, done = pcall(state.reap, rec)
			if not ok and runtime.signal() ~= 0 then error(done, 0) end -- Ctrl-C: stop here
			if ok then
				for _, what in ipairs(done) do log.info("VM %s: %s", rec.id, what) end
				n = n + 1
			else
				io.stderr:write(string.format("fireclaw: cleanup: VM %s cannot be reaped: %s; "
					.. "remove what holds it (a mount, chattr +i), then run cleanup again\n",
					rec.id, tostring(done)))
				failed = failed + 1
			end
		end
	end
	state.clean_partial()
	snapshot.clean_temp()
	log.note("cleanup: %d VM%s reaped%s", n, n == 1 and "" or "s",
		failed > 0 and string.format(", %d could not be", failed) or "")
	return failed > 0 and 1 or 0
end

return cli.recipe({}, main, ...)
