-- fireclaw.vmm.vsock: the host side of Firecracker's vsock device (docs/guest-notes.md,
-- "Firecracker's vsock").
--
-- Firecracker listens on one unix socket per VM (the device's uds_path). A host-initiated
-- connection is: connect to it, send `CONNECT <port>\n`, read `OK <host port>\n`; from
-- then on the connection is a byte stream to the guest's AF_VSOCK listener on <port>.
-- When nothing listens on that port in the guest, Firecracker closes the connection; while
-- the guest has not activated its vsock driver yet (early boot), or is paused, the request
-- gets no answer at all and the connection stays open. Everything read here comes from
-- the VMM (a guest that took it over could write anything): the answer line is read byte
-- by byte (nothing past its newline is taken from the stream, which is the guest's), is
-- capped in length and waited for until a deadline.
--
--   vsock.connect(path, port, {timeout =, alive = fn() -> true | false, why, what =})
--     -> socket (fireclaw.net's: s:fd(), s:send, s:recv, s:close) | nil, err
local net = require "fireclaw.net"
local runtime = require "fireclaw.runtime"

local M = {}

-- "OK 1073741824" is 13 bytes; anything longer than this is not Firecracker's answer.
M.MAX_LINE = 32
-- Backoff between attempts that Firecracker closed (nobody listens on the port yet): the
-- guest starting its listener is not an event the host can wait for, so fireclaw polls,
-- from 10 ms up to 200 ms, within the caller's deadline.
M.BACKOFF_MIN, M.BACKOFF_MAX = 0.01, 0.2

-- Guest/VMM bytes in an error message: printable ASCII only, cut short.
local function shown(s)
	s = s:gsub("[^\32-\126]", "?")
	if #s > M.MAX_LINE then s = s:sub(1, M.MAX_LINE) .. "…" end
	return "'" .. s .. "'"
end

-- Call fn(...) and turn its error into nil, err; an interrupt (Ctrl-C) goes on up.
local function try(fn, ...)
	local ok, a = pcall(fn, ...)
	if ok then return a end
	runtime.check_interrupt()
	return nil, tostring(a)
end

-- One attempt on a connected socket. Returns true (the stream is the guest's now), or
-- nil, why, retry: retry when Firecracker closed the connection without a word.
local function handshake(s, port, deadline)
	local _, err = try(s.send, s, "CONNECT " .. port .. "\n", math.max(deadline - runtime.now(), 0))
	if err then return nil, "sending CONNECT " .. port .. ": " .. err, true end
	local line = ""
	while true do
		local left = deadline - runtime.now()
		if left <= 0 then return nil, "timeout" end
		local c
		c, err = try(s.recv, s, 1, left)
		if err then
			if runtime.now() >= deadline then return nil, "timeout" end
			return nil, err, true -- e.g. reset by the VMM: try again
		end
		if c == nil then
			if line == "" then return nil, "closed", true end
			return nil, "the answer " .. shown(line) .. " ended without a newline"
		end
		if c == "\n" then break end
		line = line .. c
		if #line > M.MAX_LINE then
			return nil, "an answer longer than " .. M.MAX_LINE .. " bytes without a newline: " .. shown(line)
		end
	end
	if not line:match("^OK %d+$") then
		return nil, "the answer was " .. shown(line) .. " instead of 'OK <port>'"
	end
	return true
end

-- Connect to the guest's vsock port through the VMM's unix socket at path, retrying while
-- Firecracker closes the connection (the guest's listener is not up yet) until
-- opts.timeout seconds have passed. opts.alive(): false, why when the VMM is gone (no
-- point in waiting). opts.what names the VM in messages.
function M.connect(path, port, opts)
	local what = opts.what or "vsock"
	local deadline = runtime.now() + (opts.timeout or 10)
	local delay, closed, last = M.BACKOFF_MIN, 0, nil
	while true do
		if opts.alive then
			local alive, why = opts.alive()
			if not alive then return nil, string.format("%s: no vsock connection: %s", what, why) end
		end
		local s, err = try(net.unix_connect, path)
		if s then
			local ok, why, retry = handshake(s, port, deadline)
			if ok then return s end
			s:close()
			if why == "timeout" then
				return nil, string.format("%s: no answer to CONNECT %d on the vsock socket within %g s (the "
					.. "guest's vsock driver or its agent is not up)", what, port, opts.timeout or 10)
			end
			if not retry then return nil, string.format("%s: vsock CONNECT %d: %s", what, port, why) end
			if why == "closed" then closed = closed + 1 else last = why end
		else
			last = err
		end
		if runtime.now() + delay >= deadline then
			return nil, string.format("%s: nothing accepted vsock port %d within %g s (%s)", what, port,
				opts.timeout or 10, closed > 0 and string.format("Firecracker closed %d connection%s: no "
					.. "listener in the guest", closed, closed == 1 and "" or "s") or last or "no attempt")
		end
		runtime.sleep(delay) -- no event says when the guest starts listening: bounded backoff
		delay = math.min(delay * 2, M.BACKOFF_MAX)
	end
end

return M
