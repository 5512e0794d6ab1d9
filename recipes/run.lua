-- Run a command in a throw-away microVM (from the image's snapshot when there is one)
--
--   fireclaw run [options] -- CMD [ARGS…]
-- Restores from the image's snapshot when a usable one exists (else cold boots), runs CMD
-- through the guest agent (else over SSH) with its output streamed, exits with its status (128+N if killed by signal N,
-- 124 on --timeout) and destroys the VM whatever happens.
local cli = require "fireclaw.cli"
local fault = require "fireclaw.fault"
local fs = require "fireclaw.fs"
local image = require "fireclaw.image"
local json = require "fireclaw.json"
local log = require "fireclaw.log"
local netpolicy = require "fireclaw.netpolicy"
local runtime = require "fireclaw.runtime"
local sandbox = require "fireclaw.sandbox"
local sys = require "fireclaw.sys"
local vm = require "fireclaw.vm"

local coldboot = cli.use "coldboot"
local restore = cli.use "restore"


local SPEC = {
	usage = "fireclaw run [options] -- CMD [ARGS…]",
	about = "Run CMD in a throw-away microVM: restore from the image's snapshot (or cold boot),\n"
		.. "stream its output, exit with its status, destroy the VM. An image imported with\n"
		.. "image import --oci runs its Entrypoint + Cmd without CMD; CMD replaces Cmd (as docker run).",
	{ "--image NAME", "image to run (default: the snapshot's with --snapshot, else default)" },
	{ "--vcpu N", "vCPUs (cold boot; a snapshot keeps its own)", type = "number", default = 1 },
	{ "--mem MIB", "memory in MiB (cold boot)", type = "number", default = 256 },
	{ "--cpus N", "limit the VM to N CPUs' worth of time (fractions allowed: 0.5)", type = "number" },
	{ "--disk SIZE", "grow the root disk to SIZE (e.g. 512M, 2G; cold boot, or a snapshot made with --disk)" },
	{ "--timeout S", "stop CMD after S seconds (exit status 124)", type = "number" },
	{ "--vmm NAME", "auto, firecracker or qemu (default: $FIRECLAW_VMM, else auto)" },
	{ "--exec HOW", "auto, agent or ssh: how CMD and files reach the guest (default: $FIRECLAW_EXEC, else auto: "
		.. "the guest agent when the image has it)" },
	{ "--no-snapshot", "always cold boot" },
	{ "--snapshot NAME", "restore this snapshot (default: the image's)" },
	{ "--put LOCAL:REMOTE", "copy a file (through the agent: or a directory) in before CMD (REMOTE may be a "
		.. "directory; repeatable)", multi = true },
	{ "--get REMOTE:LOCAL", "copy a file (through the agent: or a directory) out after CMD, never setuid (LOCAL "
		.. "may be a directory; repeatable)",
		multi = true },
	{ "--max-transfer SIZE", "cap on each --put/--get file: 64K, 512M, 2G…", default = "1G" },
	{ "--env K=V", "set an environment variable for CMD (repeatable)", multi = true },
	{ "--entrypoint PROG", "with an image imported with --oci: run PROG instead of its Entrypoint and Cmd ('' for none)" },
	{ "--keep", "leave the VM running afterwards (remove it with fireclaw rm ID)" },
	{ "-i, --interactive", "forward stdin to CMD (also when it is a terminal)" },
	{ "-t, --tty", "give CMD a terminal (a PTY in the guest); with -i on a terminal: raw mode, resizes" },
	{ "--unsafe-no-jailer", "let Firecracker run as root when no jailer is found (not confined)" },
	{ "--json", "print {exit_code, stdout, stderr, duration_ms, boot, vm_id, stages} instead of streaming" },
	{ "--max-output BYTES", "with --json: keep at most this much of each stream", type = "number",
		default = 16 * 1024 * 1024 },
	{ "--boot-timeout S", "how long to wait for the guest's agent or SSH", type = "number", default = 60 },
	{ "-v, --verbose", "progress lines with the time of each stage" },
}
-- --net, --allow, -p (fireclaw.netpolicy), before --keep in --help
do
	local at = #SPEC + 1
	for i, opt in ipairs(SPEC) do
		if opt[1] == "--keep" then at = i end
	end
	for i, opt in ipairs(netpolicy.CLI) do table.insert(SPEC, at + i - 1, opt) end
end

-- "64K", "512M", "2G", "1000" -> bytes (binary units), nil if it is not a size.
local function parse_size(s)
	local num, unit = s:match("^(%d+%.?%d*)([kKmMgGtT]?)[iI]?[bB]?$")
	if not num then return nil end
	local n = math.floor(tonumber(num) * ({ [""] = 1, k = 2 ^ 10, m = 2 ^ 20, g = 2 ^ 30, t = 2 ^ 40 })[unit:lower()])
	return n <= 2 ^ 53 and n or nil
end

-- docker's combined short flags: -it, -ti.
local function split_flags(args)
	local out = {}
	for i, a in ipairs(args) do
		if a == "--" then
			for j = i, #args do out[#out + 1] = args[j] end
			break
		end
		if a == "-it" or a == "-ti" then
			out[#out + 1], out[#out + 2] = "-i", "-t"
		else
			out[#out + 1] = a
		end
	end
	return out
end

-- The exec options for stdin and the terminal (-i, -t), like docker's:
--   -it on a terminal: a PTY of the terminal's size, the terminal raw (every key, Ctrl-C
--   too, goes to the guest program) and restored after, window resizes followed;
--   -t alone: a PTY (the terminal's size), stdin not forwarded; -i alone: stdin forwarded.
-- Without either, a stdin that is not a terminal is forwarded; a terminal is not, and a
-- line says so (a `run -- sh` that exits at once is otherwise a mystery).
-- The local TERM for the guest's PTY, when it is a plain name.
local function M_term()
	local t = os.getenv("TERM") or ""
	return t:match("^[%w._+-]+$") and #t < 32 and t or "xterm"
end

local function stdin_opts(o, opts)
	if o.tty and o.interactive then
		if not sys.isatty(0) then cli.usage_error("-it needs a terminal on stdin (use -i alone for a pipe)") end
		opts.tty, opts.stdin = 0, 0
	elseif o.tty then
		opts.pty = { term = M_term() }
	elseif o.interactive or not sys.isatty(0) then
		opts.stdin = 0
	elseif not o.json then
		log.note("stdin is a terminal and is not forwarded (use -it for an interactive program, -i to forward it)")
	end
	if opts.tty then opts.pty = { term = M_term() } end
	return opts
end

-- Check everything the user typed before a VM exists: bad input costs nothing.
local function check_options(o)
	-- (no command: the image's own Entrypoint/Cmd, for an imported OCI image; main checks)
	if not o.image then -- a snapshot's clones run its image
		local meta = o.snapshot and not o.no_snapshot and require("fireclaw.snapshot").load(o.snapshot)
		o.image = meta and meta.image or "default"
	end
	if o.vcpu < 1 or o.vcpu > 64 or o.vcpu % 1 ~= 0 then cli.usage_error("--vcpu must be 1 to 64, got %s", o.vcpu) end
	if o.mem < 64 or o.mem > 65536 or o.mem % 1 ~= 0 then
		cli.usage_error("--mem must be 64 to 65536 MiB, got %s", o.mem)
	end
	if o.timeout and o.timeout <= 0 then cli.usage_error("--timeout must be positive") end
	if o.snapshot and o.no_snapshot then cli.usage_error("--snapshot and --no-snapshot exclude each other") end
	if o.cpus and (o.cpus < 0.01 or o.cpus > 1024) then cli.usage_error("--cpus must be 0.01 to 1024, got %s", o.cpus) end
	if o.disk then
		local ok, err = sandbox.disk_bytes(o.disk)
		if not ok then cli.usage_error("--disk: %s", err) end
	end
	if o.max_output < 0 or o.max_output % 1 ~= 0 then cli.usage_error("--max-output must be a byte count, got %s", o.max_output) end
	if o.exec and not sandbox.EXEC_MODES[o.exec] then
		cli.usage_error("--exec must be auto, agent or ssh, got '%s'", o.exec)
	end
	if o.vmm and o.vmm ~= "auto" and o.vmm ~= "firecracker" and o.vmm ~= "qemu" then
		cli.usage_error("--vmm must be auto, firecracker or qemu, got '%s'", o.vmm)
	end
	o.max_transfer = parse_size(o.max_transfer)
	if not o.max_transfer then cli.usage_error("--max-transfer wants a size such as 64K, 512M or 2G") end
	local stall = os.getenv("FIRECLAW_TRANSFER_STALL_S")
	if stall and stall ~= "" and (tonumber(stall) or 0) <= 0 then
		cli.usage_error("FIRECLAW_TRANSFER_STALL_S must be a number of seconds > 0, got '%s'", stall)
	end
	local bad_net
	o.policy, bad_net = netpolicy.from_cli(o)
	if not o.policy then cli.usage_error("%s", bad_net) end
	o.puts, o.gets, o.envs = {}, {}, {}
	for _, p in ipairs(o.put) do
		local l, r = p:match("^([^:]+):(.+)$")
		if not l then cli.usage_error("--put wants LOCAL:REMOTE, got '%s'", p) end
		if not fs.exists(l) then cli.usage_error("--put: no such file '%s'", l) end
		-- a directory goes as a tree through the agent (run_command checks the channel)
		if fs.is_dir(l) and (o.exec or require("fireclaw.config").exec) == "ssh" then
			cli.usage_error("--put: '%s' is a directory; directory trees go through the guest agent, not SSH "
				.. "(put a tar archive)", l)
		elseif not fs.is_dir(l) then
			local size, why = require("fireclaw.ssh").check_source(l, o.max_transfer)
			if not size then cli.usage_error("--put: '%s' %s", l, why) end
		end
		o.puts[#o.puts + 1] = { l, r }
	end
	for _, g in ipairs(o.get) do
		local r, l = g:match("^([^:]+):(.+)$")
		if not r then cli.usage_error("--get wants REMOTE:LOCAL, got '%s'", g) end
		local parent = l:match("^(.*)/[^/]*$") or "."
		if parent ~= "" and not fs.is_dir(parent) then cli.usage_error("--get: no directory '%s' for '%s'", parent, l) end
		o.gets[#o.gets + 1] = { r, l }
	end
	for _, e in ipairs(o.env) do
		local k, v = e:match("^([%a_][%w_]*)=(.*)$")
		if not k then cli.usage_error("--env wants K=V with a valid name, got '%s'", e) end
		o.envs[k] = v
	end
end

-- A VM ready for exec: restored from the snapshot if possible, else cold booted.
local function start_vm(o)
	-- one choice of VMM for the whole run (flag > FIRECLAW_VMM > config > auto): the
	-- snapshot check and the VM use the same; an impossible one is one line, now
	local d = vm.choose { vmm = o.vmm, cmdline_devices = image.load(o.image).cmdline_devices,
		unsafe_no_jailer = o.unsafe_no_jailer }
	local vmopts = { image = o.image, vcpu = o.vcpu, mem_mib = o.mem, vmm = o.vmm, keep = o.keep,
		boot_timeout = o.boot_timeout, detected = d, snapshot = o.snapshot, cpus = o.cpus, disk = o.disk,
		exec = o.exec, unsafe_no_jailer = o.unsafe_no_jailer, name = o.name, ttl = o.ttl,
		net = o.policy,
		-- a VM that is not kept: nobody reads its disk afterwards (QEMU: an overlay, no copy)
		throwaway_disk = not o.keep or nil }
	if not o.no_snapshot then
		local snap, why = restore.find(vmopts)
		if snap and o.sized and (o.vcpu ~= snap.vcpu or o.mem ~= snap.mem_mib) then
			log.note("--vcpu/--mem ignored: snapshot '%s' fixes %d vCPU, %d MiB (--no-snapshot cold boots with them)",
				snap.name, snap.vcpu, snap.mem_mib)
		end
		if snap then
			local sb = restore.restore(vmopts, snap)
			return sb
		end
		if o.snapshot then
			-- (a reason that says how to make a fitting snapshot needs no second hint)
			if why:find("fireclaw snapshot create", 1, true) then error(why, 0) end
			error(why .. " (create it with: fireclaw snapshot create --name " .. o.snapshot .. ")", 0)
		end
		if not why:match("^no snapshot named") then log.note("%s; cold booting", why) end
	end
	return coldboot.boot(vmopts)
end

local function exit_status(r)
	if r.timed_out then return 124 end
	if r.signal then return 128 + (sys.signal["SIG" .. r.signal] or tonumber(r.signal) or 0) end
	return r.status or 1
end

local function run_command(sb, o, cmd)
	for _, p in ipairs(o.puts) do
		if fs.is_dir(p[1]) and not sb.agent then
			error(string.format("--put %s: a directory needs the guest agent (this run uses SSH): put a tar archive",
				p[1]), 0)
		end
		sb:put(p[1], p[2], { max_bytes = o.max_transfer })
	end
	-- (a restored VM was reseeded and its clock set by restore.restore, before the --put files)
	local line, env = image.command_line(sb.img, cmd, o.envs, o.entrypoint)
	-- through the agent an image's own command runs as an argv, with no shell in between
	if sb.agent and type(sb.img.container) ~= "table" then line = cmd end
	-- the first Ctrl-C goes to the command (the agent sends it SIGINT, as a terminal would);
	-- if it has not ended 2 s later, or on a second Ctrl-C, fireclaw stops
	local opts = stdin_opts(o, { env = env, timeout = o.timeout, forward_sigint = true })
	if o.json then
		opts.max_capture = o.max_output
	else
		opts.on_stdout = function(d) fault.point("exec-output") io.stdout:write(d) io.stdout:flush() end
		opts.on_stderr = function(d) io.stderr:write(d) io.stderr:flush() end
	end
	local r = sb:exec(line, opts)
	fault.point("command-done")
	sb.timer:stage("command")
	for _, g in ipairs(o.gets) do sb:get(g[1], g[2], { max_bytes = o.max_transfer }) end
	return r
end

-- Whether the user gave --vcpu or --mem (their defaults look the same otherwise).
local function sized(args)
	for _, a in ipairs(args) do
		if a == "--" then break end
		if a:match("^%-%-vcpu") or a:match("^%-%-mem") then return true end
	end
	return false
end

-- {exit_code, stdout, stderr, …} for --json (run, exec): JSON text is UTF-8, so a stream
-- that is not also comes as exact bytes in <name>_base64 (and as text with U+FFFD for
-- the bytes that are not UTF-8).
local function result_json(r, status, extra)
	local truncated = (r.stdout_truncated or r.stderr_truncated) and true or nil
	local out = { exit_code = status, timed_out = r.timed_out or nil, signal = r.signal, truncated = truncated }
	for k, v in pairs(extra or {}) do out[k] = v end
	for _, name in ipairs({ "stdout", "stderr" }) do
		local data = r[name] or ""
		local ok, text = json.utf8(data)
		out[name] = ok and data or text
		if not ok then out[name .. "_base64"] = json.base64(data) end
	end
	return out, truncated
end

local function main(args)
	local o, cmd = cli.parse(split_flags(args), SPEC)
	o.sized = sized(args)
	check_options(o)
	if o.tty and o.json then cli.usage_error("-t and --json exclude each other (a terminal's output is not JSON)") end
	if o.tty and o.interactive and not sys.isatty(0) then
		cli.usage_error("-it needs a terminal on stdin (use -i alone for a pipe)")
	end
	-- no command: only an imported OCI image has one of its own (Entrypoint/Cmd)
	local container = image.exists(o.image) and image.load(o.image).container
	if o.entrypoint and not container then
		cli.usage_error("--entrypoint is for images imported with --oci; '%s' is not one", o.image)
	end
	if #cmd == 0 and (o.entrypoint == "" or (not o.entrypoint and not container)) then
		cli.usage_error("no command given (fireclaw run -- CMD [ARGS…])")
	end
	if not image.exists(o.image) then
		if o.image ~= "default" then error(string.format("image: no image named '%s' (build it with: fireclaw image build --name %s)", o.image, o.image), 0) end
		log.note("no default image yet: building it (once)")
		image.build { name = "default" }
	end
	local t0 = runtime.now()
	local sb = start_vm(o)
	local r = sandbox.with(sb, run_command, o, cmd)
	if o.keep then io.stderr:write(sb:reach_hint()) end
	local status = exit_status(r)
	if r.timed_out then log.note("command timed out after %g s", o.timeout) end
	if o.json then
		local out, truncated = result_json(r, status, {
			duration_ms = math.floor((runtime.now() - t0) * 1000 + 0.5), boot = sb.how, vm_id = sb.id,
			stages = (function()
				local st = json.array()
				for i, x in ipairs(sb.timer.stages) do st[i] = { name = x.name, ms = math.floor(x.ms * 10 + 0.5) / 10 } end
				return st
			end)(),
		})
		io.stdout:write(json.encode(out), "\n")
		if truncated then log.note("output beyond %d bytes per stream was dropped (--max-output)", o.max_output) end
	end
	log.info("VM %s: %s run, total %.1f ms", sb.id, sb.how, (runtime.now() - t0) * 1000)
	-- the VM and all around it are gone (or kept): the process may end without freeing
	-- its Lua state (main does so only when no finalizer has work left)
	runtime.exit_unclosed()
	return status
end

return cli.recipe({ start_vm = start_vm, check_options = check_options, exit_status = exit_status,
	result_json = result_json, split_flags = split_flags, stdin_opts = stdin_opts, parse_size = parse_size,
	sized = sized }, main, ...)
