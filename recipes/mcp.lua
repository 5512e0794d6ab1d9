-- Serve sandboxes to AI agents: a Model Context Protocol server on stdin/stdout
--
--   fireclaw mcp [options]
-- Speaks MCP 2025-06-18 (JSON-RPC 2.0, one message per line) on stdin/stdout; logs go to
-- stderr. Tools: run (one-shot), start, exec, write_file, read_file, stop, list. The
-- sandboxes it starts are this process's: stop destroys one, and all go at stdin EOF,
-- SIGTERM or SIGINT (after SIGKILL their VMMs die with it, and `fireclaw cleanup` reaps
-- the rest). One request at a time: a long command holds the next request back.
-- docs/mcp.md has the tools, the limits and a client configuration.
local cli = require "fireclaw.cli"
local image = require "fireclaw.image"
local json = require "fireclaw.json"
local jsonrpc = require "fireclaw.jsonrpc"
local log = require "fireclaw.log"
local runtime = require "fireclaw.runtime"
local sys = require "fireclaw.sys"

local run = cli.use "run"

local PROTOCOL = "2025-06-18"
local MiB = 1024 * 1024

local SPEC = {
	usage = "fireclaw mcp [options]",
	about = "Serve microVM sandboxes over the Model Context Protocol (MCP 2025-06-18, stdio):\n"
		.. "JSON-RPC on stdin/stdout, logs on stderr. See docs/mcp.md.",
	args = 0,
	{ "--image NAME", "image for run and start when the client names none", default = "default" },
	{ "--vmm NAME", "auto, firecracker or qemu (default: $FIRECLAW_VMM, else auto)" },
	{ "--max-sandboxes N", "at most N sandboxes started with start at once", type = "number", default = 4 },
	{ "--max-message BYTES", "a longer input line is answered with an error", type = "number", default = 4 * MiB },
	{ "--max-output BYTES", "keep at most this much of each output stream and of read_file", type = "number",
		default = MiB },
	{ "--timeout S", "timeout of a command when the client gives none (at most 3600)", type = "number",
		default = 60 },
	{ "--boot-timeout S", "how long to wait for a guest's SSH", type = "number", default = 60 },
	{ "-v, --verbose", "progress lines on stderr" },
}

-- ---- errors ----

-- A bad argument the schema could not see (an env name, a mode): a JSON-RPC error.
local function invalid_params(fmt, ...)
	error({ code = jsonrpc.INVALID_PARAMS, message = "Invalid params: " .. string.format(fmt, ...) }, 0)
end

-- A tool that cannot do its job: an isError result the model can read and act on.
local function fail(fmt, ...)
	error(string.format(fmt, ...), 0)
end

-- ---- input schemas ----

local function obj(props, required)
	-- (no "required": [] for none: draft-04 schemas want it non-empty)
	return { type = "object", properties = props, required = required and json.array(required), additionalProperties = false }
end

local COMMAND = {
	description = "an argv list (each element arrives byte for byte, no shell) or a shell command line (run by sh -c)",
	anyOf = json.array {
		{ type = "array", items = { type = "string" }, minItems = 1 },
		{ type = "string", minLength = 1 },
	},
}
local STDIN = { type = "string", description = "text for the command's standard input" }
local TIMEOUT = { type = "number", minimum = 0.1, maximum = 3600,
	description = "seconds before the command is killed (exit_code 124); default the server's --timeout" }
local ENV = { type = "object", additionalProperties = { type = "string" },
	description = "environment variables for the command, {\"NAME\": \"value\"}" }
local ID = { type = "string", minLength = 1, maxLength = 64, description = "a sandbox id from start" }
local NAME = { type = "string", minLength = 1, maxLength = 64 }
local PATH = { type = "string", minLength = 1, maxLength = 4096, description = "a path in the guest (relative: to /root)" }

local function named(s, description)
	local t = {}
	for k, v in pairs(s) do t[k] = v end
	t.description = description
	return t
end

-- ---- the sandboxes of this server ----

local S = { boxes = {}, order = {} } -- id -> {sb =, image =, started =}; ids in start order

local function box(id)
	local b = S.boxes[id]
	if not b then
		fail("no sandbox '%s' in this session (list shows the live ones; start makes one)", id)
	end
	return b
end

local function forget(id)
	S.boxes[id] = nil
	for i, x in ipairs(S.order) do
		if x == id then table.remove(S.order, i) break end
	end
end

-- A VM ready for exec, as `fireclaw run` makes it: restored from the snapshot when there
-- is a usable one (a named one must be), else cold booted.
local function new_vm(img, snap)
	local ok, err = pcall(image.check_name, img)
	if not ok then fail("%s", err) end
	if not image.exists(img) then
		if img ~= "default" then fail("no image named '%s' (build it with: fireclaw image build --name %s)", img, img) end
		log.note("no default image yet: building it (once)")
		image.build { name = "default" }
	end
	return run.start_vm { image = img, vcpu = 1, mem = 256, vmm = S.opts.vmm, boot_timeout = S.opts.boot_timeout,
		snapshot = snap }
end

local function exit_status(r)
	if r.timed_out then return 124 end
	if r.signal then return 128 + (sys.signal["SIG" .. r.signal] or tonumber(r.signal) or 0) end
	return r.status or 1
end

-- JSON text is UTF-8: a stream that is not also comes as exact bytes in NAME_base64.
local function put_bytes(out, name, data)
	local ok, text = json.utf8(data)
	out[name] = ok and data or text
	if not ok then out[name .. "_base64"] = json.base64(data) end
end

-- What a failed guest command said, as one line of UTF-8 text.
local function why_failed(r)
	local err = (r.stderr or ""):gsub("%s+$", ""):gsub("\n", "; ")
	local ok, fixed = json.utf8(err)
	if not ok then err = fixed end
	return err ~= "" and err or "exit status " .. exit_status(r)
end

local function check_env(env)
	for k in pairs(env or {}) do
		if not tostring(k):match("^[%a_][%w_]*$") then invalid_params("env: '%s' is not a variable name", tostring(k)) end
	end
	return env
end

local function command_of(c)
	if type(c) == "string" then return c end
	local argv = {}
	for i, a in ipairs(c) do argv[i] = a end
	return argv
end

local function exec(sb, a)
	local r = sb:exec(command_of(a.command), { stdin = a.stdin, env = check_env(a.env),
		timeout = a.timeout or S.opts.timeout, max_capture = S.opts.max_output })
	local out = { exit_code = exit_status(r), timed_out = r.timed_out or false,
		duration_ms = math.floor((r.duration_ms or 0) + 0.5),
		stdout_truncated = r.stdout_truncated or false, stderr_truncated = r.stderr_truncated or false }
	if r.signal then out.signal = r.signal end
	put_bytes(out, "stdout", r.stdout or "")
	put_bytes(out, "stderr", r.stderr or "")
	return out
end

-- ---- base64 (write_file) ----

local B64 = {}
do
	local abc = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
	for i = 1, 64 do B64[abc:byte(i)] = i - 1 end
end

local function unbase64(s)
	s = s:gsub("%s", "")
	if #s % 4 ~= 0 or not s:match("^[A-Za-z0-9+/]*=?=?$") then return nil end
	local out, bit = {}, require "bit"
	for i = 1, #s, 4 do
		local a, b, c, d = s:byte(i, i + 3)
		local n = bit.bor(bit.lshift(B64[a], 18), bit.lshift(B64[b], 12),
			bit.lshift(B64[c] or 0, 6), B64[d] or 0)
		local bytes = string.char(bit.rshift(n, 16), bit.band(bit.rshift(n, 8), 255), bit.band(n, 255))
		out[#out + 1] = bytes:sub(1, c == 61 and 1 or d == 61 and 2 or 3)
	end
	return table.concat(out)
end

-- ---- the tools ----

local TOOLS = {}

TOOLS[#TOOLS + 1] = {
	name = "run",
	title = "Run a command in a throw-away microVM",
	annotations = { readOnlyHint = false, destructiveHint = false, openWorldHint = false },
	description = "Boot a fresh microVM (restored from a snapshot when there is one), run one command, "
		.. "destroy the VM. Returns exit_code (124: timed out; 128+N: killed by signal N), stdout, stderr "
		.. "(each capped; *_truncated says so; *_base64 holds the exact bytes when they are not UTF-8). "
		.. "Nothing survives the call: use start/exec for a session.",
	inputSchema = obj({ command = COMMAND, stdin = STDIN, timeout = TIMEOUT, env = ENV,
		image = named(NAME, "guest image (default: the server's --image)") }, { "command" }),
	call = function(a)
		check_env(a.env)
		local sb = new_vm(a.image or S.opts.image)
		local ok, out = pcall(exec, sb, a)
		sb:destroy()
		if not ok then error(out, 0) end
		out.boot = sb.how
		return out
	end,
}

TOOLS[#TOOLS + 1] = {
	name = "start",
	title = "Start a sandbox for this session",
	annotations = { readOnlyHint = false, destructiveHint = false, openWorldHint = false },
	description = "Start a microVM that stays up for exec, write_file and read_file until stop (or until "
		.. "the MCP server exits). Returns its id. Restored from the image's snapshot when there is one; "
		.. "'snapshot' names another.",
	inputSchema = obj({ image = named(NAME, "guest image (default: the server's --image)"),
		snapshot = named(NAME, "restore this snapshot (fireclaw snapshot list)") }),
	call = function(a)
		if #S.order >= S.opts.max_sandboxes then
			fail("this server already runs %d sandboxes, its limit (fireclaw mcp --max-sandboxes): stop one first",
				#S.order)
		end
		local img = a.image or S.opts.image
		if a.snapshot then
			local ok, err = pcall(require("fireclaw.snapshot").check_name, a.snapshot)
			if not ok then fail("%s", err) end
		end
		local sb = new_vm(img, a.snapshot)
		S.boxes[sb.id] = { sb = sb, image = img, started = os.time() }
		S.order[#S.order + 1] = sb.id
		return { id = sb.id, image = img, boot = sb.how }
	end,
}

TOOLS[#TOOLS + 1] = {
	name = "exec",
	title = "Run a command in a sandbox",
	annotations = { readOnlyHint = false, destructiveHint = true, openWorldHint = false },
	description = "Run a command in a sandbox from start. Files and processes it leaves stay for the next "
		.. "call. Returns exit_code (124: timed out), stdout and stderr (capped, as for run).",
	inputSchema = obj({ id = ID, command = COMMAND, stdin = STDIN, timeout = TIMEOUT, env = ENV }, { "id", "command" }),
	call = function(a)
		check_env(a.env)
		return exec(box(a.id).sb, a)
	end,
}

-- (busybox sh in the guest; the path and mode are arguments, never part of the script)
local WRITE = 'case "$1" in */*) d=${1%/*}; [ -z "$d" ] || mkdir -p -- "$d" || exit 1;; esac; '
	.. 'cat > "$1" && chmod -- "$2" "$1"'
local READ = '[ -e "$1" ] || { echo "no such file: $1" >&2; exit 2; }; '
	.. '[ -d "$1" ] && { echo "$1 is a directory" >&2; exit 2; }; exec head -c "$2" < "$1"'

TOOLS[#TOOLS + 1] = {
	name = "write_file",
	title = "Write a file in a sandbox",
	annotations = { readOnlyHint = false, destructiveHint = true, idempotentHint = true, openWorldHint = false },
	description = "Create or replace a file in a sandbox (its parent directories are made). content is "
		.. "text, or base64 with base64: true (binary files).",
	inputSchema = obj({ id = ID, path = PATH, content = { type = "string", description = "the file's content" },
		base64 = { type = "boolean", description = "content is base64 (default false)" },
		mode = { type = "string", minLength = 3, maxLength = 4, description = "octal permission bits, default \"644\"" } },
		{ "id", "path", "content" }),
	call = function(a)
		local mode = a.mode or "644"
		if not mode:match("^[0-7]+$") then invalid_params("mode: '%s' is not octal (e.g. \"644\", \"0755\")", mode) end
		local data = a.content
		if a.base64 then
			data = unbase64(a.content)
			if not data then invalid_params("content: not valid base64") end
		end
		local sb = box(a.id).sb
		local r = sb:exec({ "sh", "-c", WRITE, "sh", a.path, mode }, { stdin = data, timeout = S.opts.timeout })
		if r.status ~= 0 then fail("cannot write %s: %s", a.path, why_failed(r)) end
		return { path = a.path, bytes = #data, mode = mode }
	end,
}

TOOLS[#TOOLS + 1] = {
	name = "read_file",
	title = "Read a file from a sandbox",
	annotations = { readOnlyHint = true, openWorldHint = false },
	description = "Read a file from a sandbox. Returns content (text when it is UTF-8, else base64 with "
		.. "encoding: \"base64\"), bytes, and truncated when the file is longer than max_bytes.",
	inputSchema = obj({ id = ID, path = PATH,
		max_bytes = { type = "integer", minimum = 0, description = "read at most this much (default and limit: the server's --max-output)" } },
		{ "id", "path" }),
	call = function(a)
		local max = math.min(a.max_bytes or S.opts.max_output, S.opts.max_output)
		local sb = box(a.id).sb
		local r = sb:exec({ "sh", "-c", READ, "sh", a.path, tostring(max + 1) },
			{ timeout = S.opts.timeout, max_capture = max + 1 })
		if r.status ~= 0 then fail("cannot read %s: %s", a.path, why_failed(r)) end
		local data = r.stdout or ""
		local truncated = #data > max
		if truncated then data = data:sub(1, max) end
		local ok = json.utf8(data)
		return { path = a.path, bytes = #data, truncated = truncated, encoding = ok and "utf-8" or "base64",
			content = ok and data or json.base64(data) }
	end,
}

TOOLS[#TOOLS + 1] = {
	name = "stop",
	title = "Stop a sandbox",
	annotations = { readOnlyHint = false, destructiveHint = true, openWorldHint = false },
	description = "Destroy a sandbox from start: its VM, disk and everything in it.",
	inputSchema = obj({ id = ID }, { "id" }),
	call = function(a)
		local b = box(a.id)
		forget(a.id)
		local ok, errs = b.sb:destroy()
		if not ok then fail("sandbox %s stopped, but: %s", a.id, table.concat(errs, "; ")) end
		return { id = a.id, stopped = true }
	end,
}

TOOLS[#TOOLS + 1] = {
	name = "list",
	title = "List this session's sandboxes",
	annotations = { readOnlyHint = true, openWorldHint = false },
	description = "The sandboxes this server started and has not stopped.",
	inputSchema = obj({}),
	call = function()
		local list = json.array()
		for _, id in ipairs(S.order) do
			local b = S.boxes[id]
			list[#list + 1] = { id = id, image = b.image, boot = b.sb.how, age_s = os.time() - b.started }
		end
		return { sandboxes = list }
	end,
}

local BY_NAME = {}
for _, t in ipairs(TOOLS) do BY_NAME[t.name] = t end

-- ---- the methods ----

local function interrupted()
	return runtime.signal() ~= 0
end

local function call_tool(p)
	if type(p.name) ~= "string" then invalid_params('tools/call needs "name", a string') end
	local tool = BY_NAME[p.name]
	if not tool then
		error({ code = jsonrpc.INVALID_PARAMS, message = "Unknown tool: " .. p.name }, 0)
	end
	local args = p.arguments == nil and {} or p.arguments
	local ok, why = jsonrpc.validate(args, tool.inputSchema, "arguments")
	if not ok then invalid_params("%s (tool '%s')", why, tool.name) end
	local t0 = runtime.now()
	local done, out = pcall(tool.call, args)
	if not done then
		if interrupted() or type(out) == "table" then error(out, 0) end
		log.info("mcp: %s failed after %.0f ms: %s", tool.name, (runtime.now() - t0) * 1000, tostring(out))
		return { content = json.array { { type = "text", text = tostring(out) } }, isError = true }
	end
	log.info("mcp: %s in %.0f ms", tool.name, (runtime.now() - t0) * 1000)
	return { content = json.array { { type = "text", text = json.encode(out) } }, structuredContent = out, isError = false }
end

local METHODS = {}

function METHODS.initialize(p)
	if type(p.protocolVersion) ~= "string" then invalid_params('initialize needs "protocolVersion", a string') end
	S.initialized = true
	-- a version we do not speak gets ours: the client decides whether it can go on
	return {
		protocolVersion = PROTOCOL,
		capabilities = { tools = { listChanged = false } },
		serverInfo = { name = "fireclaw", title = "fireclaw microVM sandboxes", version = runtime.version },
		instructions = "Each sandbox is a throw-away Linux microVM (busybox userland, root, no network). "
			.. "run: one command in a fresh VM. start → exec/write_file/read_file → stop: a session. "
			.. "Requests are served one at a time.",
	}
end

function METHODS.ping()
	return {}
end

function METHODS.tools_list()
	local list = json.array()
	for _, t in ipairs(TOOLS) do
		list[#list + 1] = { name = t.name, title = t.title, description = t.description, inputSchema = t.inputSchema,
			annotations = t.annotations }
	end
	return { tools = list }
end

local NAMES = { initialize = METHODS.initialize, ping = METHODS.ping, ["tools/list"] = METHODS.tools_list,
	["tools/call"] = call_tool }

-- The response to one request (nil for notifications and responses).
local function handle(msg)
	if msg.kind == "response" then return nil end -- we send no requests
	if msg.kind == "notification" then
		if msg.method == "notifications/initialized" then S.initialized = true end
		return nil -- others (cancelled, progress…) need nothing: requests are served one at a time
	end
	local fn = NAMES[msg.method]
	if not fn then return jsonrpc.error(msg.id, jsonrpc.METHOD_NOT_FOUND, "Method not found: " .. msg.method) end
	if not S.initialized and msg.method ~= "initialize" and msg.method ~= "ping" then
		return jsonrpc.error(msg.id, jsonrpc.INVALID_REQUEST, "Invalid Request: send initialize first")
	end
	local ok, res = pcall(fn, msg.params)
	if ok then return jsonrpc.result(msg.id, res) end
	if interrupted() then error(res, 0) end
	if type(res) == "table" then return jsonrpc.error(msg.id, res.code, res.message) end
	return jsonrpc.error(msg.id, jsonrpc.INTERNAL_ERROR, "Internal error: " .. tostring(res))
end

local function serve(rd, send)
	while true do
		local kind, v = rd:next()
		if kind == "eof" then return "stdin closed" end
		local resp
		if kind == "too_big" then
			resp = jsonrpc.error(nil, jsonrpc.INVALID_REQUEST, string.format("Invalid Request: a message of %d bytes "
				.. "is over this server's limit of %d (fireclaw mcp --max-message)", v, S.opts.max_message))
		elseif v:find("%S") then
			local msg, err = jsonrpc.decode(v)
			resp = msg and handle(msg) or err
		end
		if resp and not send(resp) then return "stdout closed" end
	end
end

-- Every sandbox still up goes, in the reverse order of their starts.
local function stop_all(why)
	for i = #S.order, 1, -1 do
		local id = S.order[i]
		log.info("mcp: %s: destroying sandbox %s", why, id)
		S.boxes[id].sb:destroy()
		forget(id)
	end
end

local function main(args)
	S.opts = cli.parse(args, SPEC)
	local o = S.opts
	if o.max_sandboxes < 1 or o.max_sandboxes % 1 ~= 0 then cli.usage_error("--max-sandboxes must be a whole number >= 1") end
	if o.max_message < 1024 or o.max_message > 1024 * MiB then cli.usage_error("--max-message must be 1024 bytes to 1 GiB") end
	if o.max_output < 0 or o.max_output % 1 ~= 0 then cli.usage_error("--max-output must be a byte count") end
	if o.timeout <= 0 or o.timeout > 3600 then cli.usage_error("--timeout must be 0 to 3600 seconds") end
	if o.vmm and o.vmm ~= "auto" and o.vmm ~= "firecracker" and o.vmm ~= "qemu" then
		cli.usage_error("--vmm must be auto, firecracker or qemu, got '%s'", o.vmm)
	end
	-- stdout is the protocol's alone: it moves to a private descriptor, and fd 1 (Lua's
	-- io.stdout, helper programs) now goes to stderr, where a stray line does no harm
	local out = assert(sys.dup(1, 3))
	assert(sys.dup2(2, 1))
	if sys.isatty(0) then
		log.note("mcp: serving MCP (JSON-RPC, one message per line) on this terminal; an MCP client "
			.. "normally starts this command (docs/mcp.md). Ctrl-D ends it.")
	end
	local rd, send = jsonrpc.reader(0, o.max_message), jsonrpc.writer(out)
	local ok, why = pcall(serve, rd, send)
	stop_all(ok and why or "ending (" .. tostring(why) .. ")")
	if not ok then error(why, 0) end
	return 0
end

return cli.recipe({ tools = TOOLS }, main, ...)
