-- fireclaw.sys: constants checked against Python's (both from the C headers), every call's
-- success and failure shape (nil, strerror text, errno), named open flags, close-on-exec,
-- misuse raising. Needs neither root nor a VM.
local t = require "tap"
local proc = require "fireclaw.proc"
local sys = require "fireclaw.sys"

local E = sys.errno
local tmp = proc.run({ "mktemp", "-d" }).stdout:gsub("%s+$", "")

-- ---- constants: the C headers' values, as an independent reader of them sees them ----

local py = [[
import errno, os, signal, stat, time
def show(group, name, v):
    print(group, name, int(v))
for n in dir(errno):
    if n.startswith("E"): show("errno", n, getattr(errno, n))
for s in signal.Signals: show("signal", s.name, s.value)
for n in dir(os):
    if n.startswith("O_"): show("O", n[2:], getattr(os, n))
for n in dir(stat):
    if n.startswith("S_I") and isinstance(getattr(stat, n), int): show("S", n[2:], getattr(stat, n))
for n in dir(time):
    if n.startswith("CLOCK_"): show("CLOCK", n[6:], getattr(time, n))
]]
local r = proc.run({ "/usr/bin/python3", "-c", py })
local theirs = {}
for group, name, v in r.stdout:gmatch("(%S+) (%S+) (%d+)\n") do
	theirs[group] = theirs[group] or {}
	theirs[group][name] = tonumber(v)
end
for _, group in ipairs({ "errno", "signal", "O", "S", "CLOCK" }) do
	local n, wrong = 0, {}
	for name, v in pairs(sys[group]) do
		if theirs[group] and theirs[group][name] then
			n = n + 1
			if theirs[group][name] ~= v then wrong[#wrong + 1] = name .. "=" .. v end
		end
	end
	t.ok(n >= 5 and #wrong == 0, "sys." .. group .. ": " .. n .. " constants as Python has them",
		table.concat(wrong, " "))
end
t.is(sys.errno.ENOENT, theirs.errno.ENOENT, "sys.errno.ENOENT")
t.is(sys.signal.SIGTERM, theirs.signal.SIGTERM, "sys.signal.SIGTERM")
t.is(sys.O.PATH, theirs.O.PATH, "sys.O.PATH")
t.is(sys.strerror(E.ENOENT), "No such file or directory", "strerror")

-- ---- files ----

local f = tmp .. "/f"
local fd, err = sys.open(f, "WRONLY|CREAT|EXCL", "640")
t.ok(fd and fd >= 3, "open with named flags creates a file", err)
local function cloexec(n)
	local info = io.open("/proc/self/fdinfo/" .. n):read("*a")
	return bit.band(tonumber(info:match("flags:%s*(%d+)"), 8), sys.O.CLOEXEC) ~= 0
end
t.ok(cloexec(fd), "every descriptor open makes is close-on-exec")
t.is(sys.write(fd, "hello"), 5, "write returns the bytes written")
local st = sys.fstat(fd)
t.is(st.type, "file", "fstat: type")
t.is(st.size, 5, "fstat: size")
t.is(st.uid, sys.geteuid(), "fstat: owner")
t.is(bit.band(st.mode, sys.S.IFMT), sys.S.IFREG, "fstat: mode has the file type bits")
t.ok(sys.close(fd), "close")
local e
fd, err, e = sys.open(f, "WRONLY|CREAT|EXCL")
t.ok(fd == nil and err == "File exists" and e == E.EEXIST, "O_EXCL on an existing file: nil, text, EEXIST")
fd, err, e = sys.open(tmp .. "/missing", bit.bor(sys.O.RDONLY, sys.O.NOFOLLOW))
t.ok(fd == nil and e == E.ENOENT and err == sys.strerror(E.ENOENT), "open a missing file: nil, text, ENOENT")
t.raises(function() sys.open(f, "RDONLY|BOGUS") end, "unknown flag 'BOGUS'", "an unknown flag name raises")
t.raises(function() sys.open(f, {}) end, "bad argument #2", "flags of a wrong type raise")
t.is(select(3, sys.close(12345)), E.EBADF, "close of a closed descriptor: EBADF")

t.ok(sys.chmod(f, "600"), "chmod with an octal string")
t.is(sys.stat(f).perm, tonumber("600", 8), "stat: perm")
t.ok(sys.chmod(f, tonumber("644", 8)), "chmod with a number")
t.is(sys.stat(f).perm, tonumber("644", 8), "stat: perm after a numeric mode")
t.raises(function() sys.chmod(f, "9") end, "not octal", "a mode that is not octal raises")
t.raises(function() sys.chmod(f, 65536) end, "out of range", "a mode out of range raises")
t.raises(function() sys.chmod(f) end, "bad argument #2", "chmod needs a mode")

t.ok(sys.access(f), "access: exists")
t.ok(sys.access(f, "r"), "access: readable")
t.is(select(3, sys.access(tmp .. "/missing")), E.ENOENT, "access of a missing file: ENOENT")
t.raises(function() sys.access(f, "q") end, "r, w and x", "access with a bad mode raises")

t.ok(sys.symlink("f", tmp .. "/l"), "symlink")
t.is(sys.readlink(tmp .. "/l"), "f", "readlink")
t.is(select(3, sys.readlink(f)), E.EINVAL, "readlink of a file that is no link: EINVAL")
t.is(sys.lstat(tmp .. "/l").type, "link", "lstat does not follow")
t.is(sys.stat(tmp .. "/l").type, "file", "stat follows")
t.ok(sys.link(f, tmp .. "/h"), "link")
t.is(sys.stat(f).nlink, 2, "stat: nlink")
t.is(select(3, sys.link(f, tmp .. "/h")), E.EEXIST, "link onto an existing name: EEXIST")
t.ok(sys.rename(tmp .. "/h", tmp .. "/h2"), "rename")
t.ok(sys.unlink(tmp .. "/h2"), "unlink")
t.is(select(3, sys.unlink(tmp .. "/h2")), E.ENOENT, "unlink a missing file: ENOENT")
local size_before = sys.stat(f).size
t.ok(sys.truncate(f, 4096), "truncate: longer")
t.is(sys.stat(f).size, 4096, "truncate: the new size")
t.is(select(3, sys.truncate(tmp .. "/l", 0)), E.ELOOP, "truncate through a symlink: ELOOP (not followed)")
t.is(sys.stat(f).size, 4096, "... and the file it names is untouched")
t.ok(sys.truncate(f, size_before), "truncate: back to its size")
t.is(select(3, sys.truncate(tmp .. "/missing", 0)), E.ENOENT, "truncate a missing file: ENOENT")
t.raises(function() sys.truncate(f, -1) end, "bad length", "a negative length raises")

t.ok(sys.mkdir(tmp .. "/d"), "mkdir with the default mode")
t.is(sys.stat(tmp .. "/d").type, "directory", "stat: directory")
t.is(select(3, sys.mkdir(tmp .. "/d", "700")), E.EEXIST, "mkdir of an existing directory: EEXIST")
t.is(select(3, sys.unlink(tmp .. "/d")), E.EISDIR, "unlink a directory: EISDIR")
t.ok(sys.rmdir(tmp .. "/d"), "rmdir")

-- ---- descriptors ----

fd = sys.open(f, sys.O.RDONLY)
local d = sys.dup(fd, 40)
t.ok(d and d >= 40, "dup: the lowest free descriptor from min on", tostring(d))
t.ok(cloexec(d), "dup: close-on-exec")
t.is(sys.fstat(d).ino, sys.fstat(fd).ino, "dup: the same file")
t.ok(not sys.isatty(fd), "isatty: a file is no terminal")
sys.close(d)
sys.close(fd)
t.ok(sys.fchown(sys.open(f, sys.O.RDONLY), nil, nil), "fchown with nil ids changes nothing")

local m = sys.memfd_create("fireclaw-test")
t.ok(m and cloexec(m), "memfd_create: a close-on-exec descriptor")
sys.write(m, "abc")
t.is(sys.fstat(m).size, 3, "memfd: written")
t.ok(sys.fchmod(m, "660"), "fchmod")
t.is(sys.fstat(m).perm, tonumber("660", 8), "fchmod: the mode")
if sys.geteuid() == 0 then
	t.ok(sys.fchown(m, 4321, nil), "fchown: the owner only")
	t.ok(sys.fstat(m).uid == 4321 and sys.fstat(m).gid == 0, "fchown: uid changed, gid kept")
else
	t.is(select(3, sys.fchown(m, 4321, nil)), E.EPERM, "fchown to another user as non-root: EPERM")
end
sys.close(m)
t.raises(function() sys.fstat(-1) end, "not a file descriptor", "a negative descriptor raises")

-- ---- processes, time, environment ----

t.is(sys.getpid(), proc.getpid(), "getpid")
local status = io.open("/proc/self/status"):read("*a")
local ruid, euid = status:match("\nUid:%s*(%d+)%s+(%d+)")
t.ok(sys.getuid() == tonumber(ruid) and sys.geteuid() == tonumber(euid), "getuid, geteuid")
local rgid, egid = status:match("\nGid:%s*(%d+)%s+(%d+)")
t.ok(sys.getgid() == tonumber(rgid) and sys.getegid() == tonumber(egid), "getgid, getegid")
t.ok(sys.kill(sys.getpid(), 0), "kill with signal 0 probes a process")
t.raises(function() sys.kill(0, sys.signal.SIGTERM) end, "not a process id", "kill(0) (the process group) raises")
t.raises(function() sys.kill(-1, sys.signal.SIGKILL) end, "not a process id", "kill(-1) raises")
t.raises(function() sys.kill(sys.getpid(), 9999) end, "not a signal", "a bad signal number raises")

local sec, nsec = sys.clock_gettime()
t.ok(math.abs(sec - os.time()) <= 2 and nsec >= 0 and nsec < 1e9, "clock_gettime: realtime by default")
local a = sys.clock_gettime(sys.CLOCK.MONOTONIC)
t.ok(a >= 0, "clock_gettime: monotonic")
t.ok(select(3, sys.clock_gettime(-999)) == E.EINVAL, "clock_gettime of no clock: EINVAL")

t.ok(sys.setenv("FIRECLAW_SYS_TEST", "x y"), "setenv")
t.is(os.getenv("FIRECLAW_SYS_TEST"), "x y", "setenv: seen by os.getenv")

proc.run({ "rm", "-rf", "--", tmp })
return t.done()
