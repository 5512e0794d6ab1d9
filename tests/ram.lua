-- Guest RAM files without a VM (fireclaw.core.vm): vm.ram_save, how a QEMU snapshot's
-- memory is written (non-zero pages only, every zero page a hole), and vm.memfd, how a
-- restore copies it back (the same bytes). A file with data pages, zero pages written as
-- data, holes and a last page cut short stands in for a VM's RAM file.
local t = require "tap"
local core = require "fireclaw.core.vm"
local proc = require "fireclaw.proc"
local sys = require "fireclaw.sys"

local PAGE = 4096
local tmp = proc.run({ "mktemp", "-d", "/tmp/fct-ram.XXXXXX" }).stdout:gsub("%s+$", "")
local src, dst = tmp .. "/ram", tmp .. "/memory"

local function page(c) return string.rep(c, PAGE) end
-- pages 0-3 data, 4-67 zeros written as data, 68 data with one byte at its very end,
-- 69-99 a hole, 100 a zero page whose last byte is not zero, then 100 bytes of data
-- (the file ends inside page 101)
local f = assert(io.open(src, "wb"))
f:write(page("a"), page("b"), page("c"), page("d"), string.rep(page("\0"), 64))
f:write(string.rep("\0", PAGE - 1), "x")
f:seek("set", 100 * PAGE)
f:write(string.rep("\0", PAGE - 1), "y", string.rep("z", 100))
f:close()
local size = 101 * PAGE + 100

local function read(path) local h = assert(io.open(path, "rb")) local s = h:read("*a") h:close() return s end
local function allocated(path) return sys.stat(path).blocks * 512 end

t.ok(allocated(src) >= 69 * PAGE, "the source holds its zero pages as data (" .. allocated(src) .. " bytes allocated)")
local ok, err = pcall(core.ram_save, src, dst)
t.ok(ok, "ram_save", err)
local st = sys.stat(dst)
t.is(st and st.size, size, "the copy has the source's size")
t.ok(read(dst) == read(src), "and its bytes")
t.is(st and st.mode % 512, tonumber("600", 8), "it is 0600")
-- 7 pages hold data: 0-3, 68, 100, 101 (a filesystem may add a block of metadata)
local a = allocated(dst)
t.ok(a >= 7 * PAGE and a <= 8 * PAGE, "only its 7 non-zero pages are allocated (" .. a .. " bytes)")

-- a restore's copy of it: the same bytes, in a memfd of the VM's RAM size
local fd = core.memfd(128 * PAGE, dst)
local mem = read("/proc/self/fd/" .. fd)
sys.close(fd)
t.is(#mem, 128 * PAGE, "vm.memfd: the RAM size")
t.ok(mem == read(src) .. string.rep("\0", 128 * PAGE - size), "vm.memfd of the saved memory: the source's bytes, zeros after")

-- it never writes through an existing file, and leaves nothing when it fails
err = select(2, pcall(core.ram_save, src, dst))
t.like(tostring(err), "create " .. dst:gsub("%p", "%%%0") .. ".*[Ff]ile exists", "an existing destination is an error")
t.ok(read(dst) == read(src), "and stays as it was")
err = select(2, pcall(core.ram_save, tmp, tmp .. "/dir-copy"))
t.like(tostring(err), "not a regular file", "a directory as the source: an error")
t.ok(not sys.stat(tmp .. "/dir-copy"), "that leaves no file")
err = select(2, pcall(core.ram_save, tmp .. "/missing", tmp .. "/missing-copy"))
t.like(tostring(err), "missing", "a missing source: an error naming it")
t.ok(not sys.stat(tmp .. "/missing-copy"), "that leaves no file")

proc.run({ "rm", "-rf", tmp })
t.done()
