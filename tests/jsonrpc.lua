-- fireclaw.jsonrpc without a VM: the capped line reader (chunk boundaries, CRLF, a last
-- line without newline, oversized lines), the writer, message checks, the schema subset;
-- and sys.read on a pipe that a signal interrupts. No root needed.
local t = require "tap"
local fs = require "fireclaw.fs"
local json = require "fireclaw.json"
local jsonrpc = require "fireclaw.jsonrpc"
local sys = require "fireclaw.sys"

local tmp = os.tmpname()

-- a reader over a file holding `data`
local function reader_of(data, max)
	fs.write(tmp, data, "600")
	local fd = assert(sys.open(tmp, "RDONLY"))
	return jsonrpc.reader(fd, max), fd
end

local function all(rd)
	local out = {}
	repeat
		local kind, v = rd:next()
		out[#out + 1] = kind == "eof" and "eof" or kind .. ":" .. tostring(v)
	until kind == "eof"
	return table.concat(out, " ")
end

local rd, fd = reader_of("a\nb\r\n\nlast", 100)
t.is(all(rd), "line:a line:b line: line:last eof", "lines, CRLF, an empty line, a last line without newline")
sys.close(fd)

rd, fd = reader_of(string.rep("x", 10) .. "\n" .. string.rep("y", 11) .. "\nz\n", 10)
t.is(all(rd), "line:xxxxxxxxxx too_big:11 line:z eof", "a line of max bytes is kept, one more is too_big; the next line is fine")
sys.close(fd)

-- lines across the reader's 64 KiB chunks, and an oversized one that spans several
local long = string.rep("0123456789", 20000) -- 200000 bytes
rd, fd = reader_of("a\n" .. long .. "\n" .. string.rep("w", 300000) .. "\n" .. long, 250000)
local k1, v1 = rd:next()
local k2, v2 = rd:next()
local k3, v3 = rd:next()
local k4, v4 = rd:next()
t.ok(k1 == "line" and v1 == "a" and k2 == "line" and v2 == long, "a 200000-byte line across chunks, intact")
t.ok(k3 == "too_big" and v3 == 300000, "a 300000-byte line over the cap: too_big with its length", tostring(v3))
t.ok(k4 == "line" and v4 == long and rd:next() == "eof", "then the last line, then eof")
sys.close(fd)

-- the writer: one line, valid UTF-8 whatever the strings held
local wfd = assert(sys.open(tmp, "WRONLY|TRUNC"))
local send = jsonrpc.writer(wfd)
t.ok(send(jsonrpc.result(1, { text = "two\nlines \255" })), "writer: sent")
sys.close(wfd)
local written = fs.read(tmp)
t.is(written, '{"id":1,"jsonrpc":"2.0","result":{"text":"two\\nlines \239\191\189"}}\n',
	"writer: one line, newline escaped, a byte that is not UTF-8 made U+FFFD")
t.is(jsonrpc.decode(written:sub(1, -2)).kind, "response", "what it wrote reads back as a response")

-- messages
local function code(line)
	local m, err = jsonrpc.decode(line)
	return m and m.kind or err.error.code
end
t.is(code('{"jsonrpc":"2.0","id":1,"method":"ping"}'), "request", "request")
t.is(code('{"jsonrpc":"2.0","id":"a","method":"x","params":{}}'), "request", "string id")
t.is(code('{"jsonrpc":"2.0","method":"notifications/initialized"}'), "notification", "notification")
t.is(code('{"jsonrpc":"2.0","id":1,"result":{}}'), "response", "response")
t.is(code("{"), -32700, "truncated JSON: -32700")
t.is(code('{"a":"\255"}'), -32700, "not UTF-8: -32700")
t.is(code("[]"), -32600, "an empty batch: -32600")
t.is(code("true"), -32600, "true: -32600")
t.is(code('{"jsonrpc":"2.0","id":1.5,"method":"x"}'), -32600, "a fractional id: -32600")
t.is(code('{"jsonrpc":"2.0","id":{},"method":"x"}'), -32600, "an object id: -32600")
t.is(code('{"id":1,"method":"x"}'), -32600, "no jsonrpc member: -32600")
t.is(code('{"jsonrpc":"2.0","id":1}'), -32600, "no method: -32600")
t.is(code('{"jsonrpc":"2.0","id":1,"method":"x","params":"p"}'), -32602, "string params: -32602")
local _, err = jsonrpc.decode('{"jsonrpc":"2.0","id":7,"method":"x","params":[]}')
t.is(err.id, 7, "an error about a request carries its id")
_, err = jsonrpc.decode("nope")
t.is(err.id, json.null, "an error about an unreadable message has id null")

-- the schema subset
local S = {
	type = "object", additionalProperties = false, required = json.array { "cmd" },
	properties = {
		cmd = { anyOf = json.array { { type = "string", minLength = 1 },
			{ type = "array", items = { type = "string" }, minItems = 1 } } },
		n = { type = "integer", minimum = 0, maximum = 10 },
		x = { type = "number" },
		e = { type = "object", additionalProperties = { type = "string" } },
		mode = { type = "string", enum = json.array { "a", "b" } },
		name = { type = "string", maxLength = 3 },
	},
}
local function valid(s)
	local ok, why = jsonrpc.validate(json.decode(s), S, "args")
	return ok and "ok" or why
end
t.is(valid('{"cmd":"ls"}'), "ok", "a string command")
t.is(valid('{"cmd":["ls","-l"],"n":3,"x":1.5,"e":{"A":"b"},"mode":"a"}'), "ok", "all of them")
t.is(valid('{"cmd":"ls","x":2}'), "ok", "an integer is a number")
t.like(valid("{}"), "^args: missing required 'cmd'$", "missing required")
t.like(valid('{"cmd":"ls","zz":1}'), "unknown property 'zz'", "unknown property")
t.like(valid('{"cmd":[]}'), "at least 1 item", "empty argv")
t.like(valid('{"cmd":["a",2]}'), "args%.cmd%[1%]: expected string, got number", "argv element: where and why")
t.like(valid('{"cmd":"a","n":1.5}'), "args%.n: expected integer, got number", "a fraction is not an integer")
t.like(valid('{"cmd":"a","n":11}'), "must be <= 10", "maximum")
t.like(valid('{"cmd":"a","e":{"A":1}}'), "args%.e%.A: expected string", "additionalProperties schema")
t.like(valid('{"cmd":"a","mode":"c"}'), "one of a, b", "enum")
t.is(valid('{"cmd":"a","name":"\226\130\172\226\130\172\226\130\172"}'), "ok", "maxLength counts characters, not bytes")
t.like(valid('{"cmd":"a","name":"abcd"}'), "longer than 3", "maxLength")
t.like(valid('[1]'), "expected object, got array", "an array is not an object")
t.raises(function() jsonrpc.validate({}, { type = "object", pattern = "x" }) end, "not supported",
	"a keyword the validator does not know raises (misuse)")

-- sys.read on a FIFO we hold both ends of: data, then a timeout
local fifo = tmp .. ".fifo"
os.remove(fifo)
t.ok(os.execute("mkfifo -m 600 " .. fifo) == 0, "mkfifo")
local rfd = assert(sys.open(fifo, "RDWR"))
local wfd2 = assert(sys.open(fifo, "WRONLY"))
sys.write(wfd2, "hello")
t.is(sys.read(rfd, 3), "hel", "sys.read: at most max bytes")
t.is(sys.read(rfd, 100), "lo", "sys.read: what is there, without waiting for more")
local data, why, errno = sys.read(rfd, 10, 0.05)
t.ok(data == nil and errno == sys.errno.ETIMEDOUT, "sys.read: nothing within the timeout: nil, ETIMEDOUT", tostring(why))
sys.close(wfd2)
sys.close(rfd)
os.remove(fifo)
t.raises(function() sys.read(0, 0) end, "1 to 16 MiB", "sys.read: max 0 is misuse")
os.remove(tmp)
return t.done()
