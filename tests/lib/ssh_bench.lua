-- ssh_bench.lua: medians of N for fireclaw.ssh against local dropbear and sshd in a test
-- namespace (a measurement, not a test: run by hand).
--   LUA_PATH='tests/lib/?.lua;;' ./fireclaw tests/lib/ssh_bench.lua [N]
local ssh = require "fireclaw.ssh"
local server = require "ssh_server"
local now = require("fireclaw.runtime").now

local N = tonumber(arg and arg[1]) or 20

local function median(xs)
	table.sort(xs)
	local m = #xs
	if m % 2 == 1 then return xs[(m + 1) / 2] end
	return (xs[m / 2] + xs[m / 2 + 1]) / 2
end

local function measure(srv)
	local connect, exec = {}, {}
	for i = 1, N do
		local t0 = now()
		local s = ssh.connect(srv:opts())
		local t1 = now()
		local r = s:exec({"true"})
		local t2 = now()
		assert(r.status == 0)
		s:close()
		connect[i], exec[i] = (t1 - t0) * 1e3, (t2 - t1) * 1e3
	end
	local s = ssh.connect(srv:opts())
	local warm = {}
	for i = 1, N do
		local t0 = now()
		s:exec({"true"})
		warm[i] = (now() - t0) * 1e3
	end
	s:close()
	print(("%-8s connect (TCP+handshake+auth) %6.1f ms   first exec true %5.1f ms   exec true on a warm session %5.1f ms   (medians of %d)")
		:format(srv.kind, median(connect), median(exec), median(warm), N))
end

local lab = server.lab()
local ok, err = pcall(function()
	measure(lab:dropbear{port = 22})
	measure(lab:sshd{port = 2222})
end)
lab:close()
if not ok then error(err, 0) end
