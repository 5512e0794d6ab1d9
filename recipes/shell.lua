-- A shell in a kept VM, on a terminal (a PTY in the guest; the terminal raw, resizes followed)
local cli = require "fireclaw.cli"
local sandbox = require "fireclaw.sandbox"
local sys = require "fireclaw.sys"

local run = cli.use "run"

local function main(args)
	local _, ref = cli.parse_vm(args, { usage = "fireclaw shell ID|NAME",
		about = "Open a login shell in kept VM ID (or NAME) on this terminal." })
	if not sys.isatty(0) then
		cli.usage_error("shell needs a terminal on stdin (for a pipe: fireclaw exec -i %s -- sh)", ref)
	end
	local sb = sandbox.attach(ref, { what = "open a shell in" })
	local r = sandbox.with(sb, function()
		return sb:exec("exec sh -l", run.stdin_opts({ tty = true, interactive = true }, {
			on_stdout = function(d) io.stdout:write(d) io.stdout:flush() end,
			on_stderr = function(d) io.stderr:write(d) io.stderr:flush() end,
		}))
	end)
	return run.exit_status(r)
end

return cli.recipe({}, main, ...)
