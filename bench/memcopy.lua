-- Benchmark helper: the restore's memory copy on its own
--
--   fireclaw bench/memcopy.lua MEMORY RAM_BYTES N
-- copies the snapshot memory file MEMORY into a memfd of RAM_BYTES N times, as a QEMU
-- restore does (vm.memfd: its data ranges, zero pages skipped), and prints one JSON object:
--   {size, allocated (bytes the file holds on disk), nonzero (bytes in non-zero pages),
--    fill_cpu_ms = {…}, fill_ms = {…}, free_cpu_ms = {…}}
-- CPU is this process's (CLOCK_PROCESS_CPUTIME_ID); free_cpu_ms is the close of the
-- memfd, which frees its pages (in a run, fireclaw's last close after QEMU has exited).
local core = require "fireclaw.core.vm"
local json = require "fireclaw.json"
local runtime = require "fireclaw.runtime"
local sys = require "fireclaw.sys"

local path, ram, n = arg[1], tonumber(arg[2]), tonumber(arg[3] or 30)
if not (path and ram and n) then error("usage: fireclaw bench/memcopy.lua MEMORY RAM_BYTES N", 0) end

local function cpu_ms()
	local s, ns = sys.clock_gettime(sys.CLOCK.PROCESS_CPUTIME_ID)
	return s * 1e3 + ns / 1e6
end

local PAGE = 4096
local zero = string.rep("\0", PAGE)
local nonzero = 0
local f = assert(io.open(path, "rb"))
while true do
	local chunk = f:read(1048576)
	if not chunk then break end
	for i = 1, #chunk, PAGE do
		local p = chunk:sub(i, i + PAGE - 1)
		if p ~= zero:sub(1, #p) then nonzero = nonzero + #p end
	end
end
f:close()
local st = assert(sys.stat(path))

local out = { size = st.size, allocated = st.blocks * 512, nonzero = nonzero,
	fill_cpu_ms = json.array(), fill_ms = json.array(), free_cpu_ms = json.array() }
for i = 1, n do
	local c0, w0 = cpu_ms(), runtime.now()
	local fd = core.memfd(ram, path)
	local c1, w1 = cpu_ms(), runtime.now()
	sys.close(fd)
	out.fill_cpu_ms[i], out.fill_ms[i], out.free_cpu_ms[i] = c1 - c0, (w1 - w0) * 1e3, cpu_ms() - c1
end
io.stdout:write(json.encode(out), "\n")
