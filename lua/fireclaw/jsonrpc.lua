-- fireclaw.jsonrpc: JSON-RPC 2.0 over newline-delimited streams (MCP's stdio transport).
--
--   local rd = jsonrpc.reader(fd, max_bytes)  -- rd:next() -> "line", text | "too_big", bytes | "eof"
--   local send = jsonrpc.writer(fd)           -- send(msg) -> true | nil, err (one line, all of it)
--   jsonrpc.decode(line) -> msg | nil, error response
--       msg = {kind = "request"|"notification"|"response", id =, method =, params =}
--   jsonrpc.result(id, result)  jsonrpc.error(id, code, message [, data]) -> a response table
--   jsonrpc.validate(value, schema [, where]) -> true | nil, "where.key: why"
--   jsonrpc.PARSE_ERROR  INVALID_REQUEST  METHOD_NOT_FOUND  INVALID_PARAMS  INTERNAL_ERROR
--
-- Everything read is a stranger's: a line longer than max_bytes is skipped as it streams in
-- (never held whole) and reported as "too_big"; text that is not UTF-8 or not JSON is a
-- parse error; a batch (a JSON array) is an invalid request, since MCP 2025-06-18 removed
-- JSON-RPC batching. Written messages are one line: json.encode escapes newlines in
-- strings, and bytes that are not UTF-8 (a guest's, in an error message) become U+FFFD.
local json = require "fireclaw.json"
local sys = require "fireclaw.sys"

local M = {
	PARSE_ERROR = -32700, INVALID_REQUEST = -32600, METHOD_NOT_FOUND = -32601,
	INVALID_PARAMS = -32602, INTERNAL_ERROR = -32603,
}

local CHUNK = 64 * 1024
local MAX_SAFE_INT = 2 ^ 53

-- ---- reading ----

local Reader = {}
Reader.__index = Reader

function M.reader(fd, max_bytes)
	assert(type(fd) == "number" and type(max_bytes) == "number" and max_bytes >= 1,
		"jsonrpc.reader(fd, max_bytes)")
	-- parts: the current line's pieces so far; skipping: bytes of an oversized line
	-- dropped so far (nil while the line is within the cap)
	return setmetatable({ fd = fd, max = max_bytes, pending = "", parts = {}, size = 0 }, Reader)
end

-- Take the data before the first newline of s into the current line; true when the line
-- ended, and the rest after the newline.
function Reader:take(s)
	local nl = s:find("\n", 1, true)
	local piece = nl and s:sub(1, nl - 1) or s
	if self.skipping then
		self.skipping = self.skipping + #piece
	elseif self.size + #piece > self.max then
		self.skipping = self.size + #piece
		self.parts, self.size = {}, 0
	else
		self.parts[#self.parts + 1] = piece
		self.size = self.size + #piece
	end
	return nl ~= nil, nl and s:sub(nl + 1) or ""
end

function Reader:finish()
	local skipped = self.skipping
	local line = table.concat(self.parts)
	self.parts, self.size, self.skipping = {}, 0, nil
	if skipped then return "too_big", skipped end
	return "line", (line:gsub("\r$", ""))
end

-- The next line ("line", text without its newline), an oversized one ("too_big", its
-- length), or "eof". A last line without a newline counts; errors reading raise.
function Reader:next()
	while true do
		if self.pending ~= "" then
			local ended, rest = self:take(self.pending)
			self.pending = rest
			if ended then return self:finish() end
		end
		if self.eof then
			if self.size > 0 or self.skipping then return self:finish() end
			return "eof"
		end
		local data, err = sys.read(self.fd, CHUNK)
		if not data then error("jsonrpc: reading the input: " .. tostring(err), 0) end
		if data == "" then self.eof = true end
		self.pending = data
	end
end

-- ---- writing ----

function M.writer(fd)
	return function(msg)
		local text = json.encode(msg)
		local ok, fixed = json.utf8(text)
		if not ok then text = fixed end
		text = text .. "\n"
		local off = 1
		while off <= #text do
			local n, err = sys.write(fd, off == 1 and text or text:sub(off))
			if not n then return nil, err end
			off = off + n
		end
		return true
	end
end

-- ---- messages ----

function M.result(id, result)
	return { jsonrpc = "2.0", id = id, result = result }
end

function M.error(id, code, message, data)
	return { jsonrpc = "2.0", id = id == nil and json.null or id, error = { code = code, message = message, data = data } }
end

-- MCP: an id is a string or an integer, never null
local function valid_id(id)
	if type(id) == "string" then return true end
	return type(id) == "number" and id % 1 == 0 and math.abs(id) <= MAX_SAFE_INT
end

function M.decode(line)
	local utf8 = json.utf8(line)
	if not utf8 then return nil, M.error(nil, M.PARSE_ERROR, "Parse error: the message is not UTF-8") end
	local ok, msg = pcall(json.decode, line)
	if not ok then return nil, M.error(nil, M.PARSE_ERROR, "Parse error: " .. tostring(msg)) end
	if type(msg) ~= "table" then
		return nil, M.error(nil, M.INVALID_REQUEST, "Invalid Request: a message is a JSON object, not "
			.. (msg == json.null and "null" or type(msg)))
	end
	if json.is_array(msg) then
		return nil, M.error(nil, M.INVALID_REQUEST, "Invalid Request: batches are not supported (MCP "
			.. "2025-06-18 removed JSON-RPC batching): send one message per line")
	end
	local id = msg.id
	if id ~= nil and not valid_id(id) then
		return nil, M.error(nil, M.INVALID_REQUEST, "Invalid Request: id must be a string or an integer")
	end
	if msg.jsonrpc ~= "2.0" then
		return nil, M.error(id, M.INVALID_REQUEST, 'Invalid Request: "jsonrpc" must be "2.0"')
	end
	if msg.method == nil and id ~= nil and (msg.result ~= nil or msg.error ~= nil) then
		return { kind = "response", id = id }
	end
	if type(msg.method) ~= "string" then
		return nil, M.error(id, M.INVALID_REQUEST, 'Invalid Request: "method" must be a string')
	end
	local params = msg.params
	if params ~= nil and (type(params) ~= "table" or json.is_array(params)) then
		if id == nil then return { kind = "notification", method = msg.method, bad_params = true } end
		return nil, M.error(id, M.INVALID_PARAMS, 'Invalid params: "params" must be an object')
	end
	return { kind = id == nil and "notification" or "request", id = id, method = msg.method, params = params or {} }
end

-- ---- a JSON Schema subset: what the tools' inputSchemas use ----
-- type (string, integer, number, boolean, object, array; or a list of them), properties,
-- required, additionalProperties (false or a schema), items, minItems, maxItems,
-- minLength, maxLength, minimum, maximum, enum, anyOf. Anything else in a schema raises.

local KNOWN = {
	type = true, properties = true, required = true, additionalProperties = true, items = true,
	minItems = true, maxItems = true, minLength = true, maxLength = true, minimum = true,
	maximum = true, enum = true, anyOf = true, description = true, default = true, title = true,
}

local function type_of(v)
	if v == json.null then return "null" end
	local t = type(v)
	if t == "table" then return json.is_array(v) and "array" or "object" end
	if t == "number" then return v % 1 == 0 and "integer" or "number" end
	return t
end

local function type_ok(v, want)
	local have = type_of(v)
	return have == want or (want == "number" and have == "integer")
end

local function describe(v)
	local t = type_of(v)
	return t == "integer" and "number" or t
end

-- length in characters, as JSON Schema counts (UTF-8: code points)
local function chars(s)
	local _, n = s:gsub("[^\128-\191]", "")
	return n
end

local validate

local function check_object(v, s, where)
	for _, k in ipairs(s.required or {}) do
		if v[k] == nil then return nil, string.format("%s: missing required '%s'", where, k) end
	end
	for k, x in pairs(v) do
		local sub = s.properties and s.properties[k]
		if sub == nil then sub = s.additionalProperties end
		if sub == false then
			return nil, string.format("%s: unknown property '%s'", where, tostring(k))
		elseif type(sub) == "table" then
			local ok, err = validate(x, sub, where .. "." .. tostring(k))
			if not ok then return nil, err end
		end
	end
	return true
end

local function check_array(v, s, where)
	if s.minItems and #v < s.minItems then return nil, string.format("%s: needs at least %d item(s)", where, s.minItems) end
	if s.maxItems and #v > s.maxItems then return nil, string.format("%s: at most %d item(s)", where, s.maxItems) end
	if s.items then
		for i, x in ipairs(v) do
			local ok, err = validate(x, s.items, string.format("%s[%d]", where, i - 1))
			if not ok then return nil, err end
		end
	end
	return true
end

local function check_scalar(v, s, where)
	if type(v) == "string" then
		if s.minLength and chars(v) < s.minLength then return nil, where .. ": too short" end
		if s.maxLength and chars(v) > s.maxLength then
			return nil, string.format("%s: longer than %d characters", where, s.maxLength)
		end
	elseif type(v) == "number" then
		if s.minimum and v < s.minimum then return nil, string.format("%s: must be >= %s", where, s.minimum) end
		if s.maximum and v > s.maximum then return nil, string.format("%s: must be <= %s", where, s.maximum) end
	end
	if s.enum then
		for _, e in ipairs(s.enum) do
			if e == v then return true end
		end
		return nil, string.format("%s: must be one of %s", where, table.concat(s.enum, ", "))
	end
	return true
end

validate = function(v, s, where)
	for k in pairs(s) do
		if not KNOWN[k] then error("jsonrpc.validate: schema keyword '" .. tostring(k) .. "' is not supported", 2) end
	end
	if s.anyOf then
		local whys = {}
		for _, alt in ipairs(s.anyOf) do
			local ok, why = validate(v, alt, where)
			if ok then return true end
			whys[#whys + 1] = why
		end
		return nil, table.concat(whys, "; or ")
	end
	if s.type then
		local types = type(s.type) == "table" and s.type or { s.type }
		local ok = false
		for _, t in ipairs(types) do ok = ok or type_ok(v, t) end
		if not ok then
			return nil, string.format("%s: expected %s, got %s", where, table.concat(types, " or "), describe(v))
		end
	end
	local t = type_of(v)
	if t == "object" then return check_object(v, s, where) end
	if t == "array" then return check_array(v, s, where) end
	return check_scalar(v, s, where)
end

function M.validate(value, schema, where)
	assert(type(schema) == "table", "jsonrpc.validate: schema must be a table")
	return validate(value, schema, where or "value")
end

return M
