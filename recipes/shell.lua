-- A shell in a kept VM, on a terminal (a PTY in the guest; the terminal raw, resizes followed)
local cli = require "fireclaw.cli"
local sandbox = require "fireclaw.sandbox"
local sys = require "fireclaw.sys"

local run = cli.use "run"

local function main(args)
	local _, rest = cli.parse(args, { usage = "fireclaw shell ID|NAME", args = 1,
		about = "Open a login shell in kept VM ID (or NAME) on this terminal." })
	if not rest[1] then cli.usage_error("shell needs a VM id or name (see fireclaw ps)") end
	if not sys.isatty(0) then
		cli.usage_error("shell needs a terminal on stdin (for a pipe: fireclaw exec -i %s -- sh)", rest[1])
	end
	local sb = sandbox.attach(rest[1], { what = "open a shell in" })
	local r = sandbox.with(sb, function()
		return sb:exec("exec sh -l", run.stdin_opts({ tty = true, interactive = true }, {
			on_stdout = function(d) io.stdout:write(d) io.stdout:flush() end,
			on_stderr = function(d) io.stderr:write(d) io.stderr:flush() end,
		}))
	end)
	return run.exit_status(r)
end

return cli.recipe({}, main, ...)
