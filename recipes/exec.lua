-- Run a command in a kept VM (fireclaw start): exec [-it] ID|NAME -- CMD
--
-- Any number of processes may exec into one VM at once: each has its own channel (one of
-- the agent's ports, flock'ed; when all are busy for a moment, an SSH session).
local cli = require "fireclaw.cli"
local json = require "fireclaw.json"
local log = require "fireclaw.log"
local runtime = require "fireclaw.runtime"
local sandbox = require "fireclaw.sandbox"
local ssh = require "fireclaw.ssh"

local run = cli.use "run"

local SPEC = {
	usage = "fireclaw exec [options] ID|NAME [--] CMD [ARGS…]",
	about = "Run CMD in kept VM ID (or NAME), stream its output, exit with its status.",
	{ "-i, --interactive", "forward stdin to CMD (also when it is a terminal)" },
	{ "-t, --tty", "give CMD a terminal (a PTY); with -i on a terminal: raw mode, resizes" },
	{ "--env K=V", "set an environment variable for CMD (repeatable)", multi = true },
	{ "--timeout S", "stop CMD after S seconds (exit status 124)", type = "number" },
	{ "--json", "print {exit_code, stdout, stderr, duration_ms, vm_id} instead of streaming" },
	{ "--max-output BYTES", "with --json: keep at most this much of each stream", type = "number",
		default = 16 * 1024 * 1024 },
	{ "--exec HOW", "auto, agent or ssh: the channel to the guest (default: $FIRECLAW_EXEC, else auto: "
		.. "the agent when the VM has it)" },
	{ "-v, --verbose", "progress lines" },
}

local function main(args)
	local o, rest = cli.parse(run.split_flags(args), SPEC)
	local ref = table.remove(rest, 1)
	if not ref then cli.usage_error("exec needs a VM id or name and a command (fireclaw exec ID -- CMD)") end
	if rest[1] == "--" then table.remove(rest, 1) end
	if #rest == 0 then cli.usage_error("no command given (fireclaw exec %s -- CMD [ARGS…])", ref) end
	if o.timeout and o.timeout <= 0 then cli.usage_error("--timeout must be positive") end
	if o.tty and o.json then cli.usage_error("-t and --json exclude each other") end
	local envs = {}
	for _, e in ipairs(o.env) do
		local k, v = e:match("^([%a_][%w_]*)=(.*)$")
		if not k then cli.usage_error("--env wants K=V with a valid name, got '%s'", e) end
		envs[k] = v
	end
	local t0 = runtime.now()
	local sb = sandbox.attach(ref, { what = "exec into", exec = o.exec })
	local r = sandbox.with(sb, function()
		local opts = run.stdin_opts(o, { env = envs, timeout = o.timeout })
		if o.json then
			opts.max_capture = o.max_output
		else
			opts.on_stdout = function(d) io.stdout:write(d) io.stdout:flush() end
			opts.on_stderr = function(d) io.stderr:write(d) io.stderr:flush() end
		end
		return sb:exec(ssh.quote(rest), opts)
	end)
	local status = run.exit_status(r)
	if r.timed_out then log.note("command timed out after %g s", o.timeout) end
	if o.json then
		local out = run.result_json(r, status, { vm_id = sb.id,
			duration_ms = math.floor((runtime.now() - t0) * 1000 + 0.5) })
		io.stdout:write(json.encode(out), "\n")
	end
	return status
end

return cli.recipe({}, main, ...)
