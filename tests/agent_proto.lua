-- The guest agent's protocol, fast: the real agent binary (build/guest/fireclaw-agent) runs
-- on the host with --serve-fd on one end of a socketpair, fireclaw.core.agent on the other.
-- Exit statuses and signals, stdin (small, 20 MB, closed early), byte-exact interleaved
-- output, env and cwd, a timeout killing the whole process group, a PTY, concurrent
-- operations, put/get and their rules, hostile frames from a fake agent, flat fds and RSS
-- over 100 execs. Needs neither root nor a VM (the real-guest tests: tests/agent_vm.sh).
local t = require "tap"
local agent = require "fireclaw.agent"
local fs = require "fireclaw.fs"
local proc = require "fireclaw.proc"
local runtime = require "fireclaw.runtime"
local sys = require "fireclaw.sys"

local tests = os.getenv("FIRECLAW_TESTS") or "tests"
local bin = tests .. "/../build/guest/fireclaw-agent"
local tmp = proc.run({ "mktemp", "-d" }).stdout:gsub("%s+$", "")

local function start()
	local a, b = sys.socketpair()
	local p = proc.spawn { argv = { bin, "--serve-fd", "3" }, fds = { b }, stderr = "/dev/null" }
	sys.close(b)
	local c = agent.wrap(a, { timeout = 5, where = "test agent" })
	sys.close(a)
	return c, p
end

local c, p = start()
t.is(c:info().version, agent.VERSION, "hello: the agent speaks our version")
-- the hand-off itself is not run here (it would set this host's clock and resolver); its
-- arguments are checked before anything is sent
for _, bad in ipairs({ "nameserver 1.1.1.1", "1.2.3", "::1", string.rep("1", 64) }) do
	local ok, err = pcall(c.handoff, c, 0, string.rep("x", 64), nil, bad)
	t.ok(not ok and tostring(err):find("resolver must be an IPv4 address", 1, true),
		"handoff: resolver " .. bad:sub(1, 20) .. " refused before sending", tostring(err))
end
t.is(c:exec({ "true" }).status, 0, "… and the connection is unharmed")

-- ---- exit statuses and signals ----
for _, want in ipairs({ 0, 1, 3 }) do
	t.is(c:exec({ "sh", "-c", "exit " .. want }).status, want, "exit status " .. want)
end
local r = c:exec({ "no-such-command-here" })
t.is(r.status, 127, "a missing command: 127")
t.like(r.stderr, "no%-such%-command%-here: not found", "… with a line saying so, as a shell would")
-- a bare name is searched in the command's PATH, not the agent's own (an imported image's
-- init runs the agent with PATH=/.fireclaw/bin)
proc.run({ "mkdir", "-p", tmp .. "/pathbin" })
fs.write(tmp .. "/pathbin/fc-path-probe", "#!/bin/sh\necho found in PATH\n")
proc.run({ "chmod", "755", tmp .. "/pathbin/fc-path-probe" })
r = c:exec({ "fc-path-probe" }, { env = { PATH = "/nonexistent:" .. tmp .. "/pathbin" } })
t.is(r.stdout, "found in PATH\n", "a bare command name is looked up in the request's PATH", r.stderr)
r = c:exec({ "fc-path-probe" })
t.is(r.status, 127, "… and not found without it (the default PATH)")
r = c:exec({ "sh", "-c", "kill -TERM $$" })
t.ok(r.status == nil and r.signal == "TERM", "killed by a signal: signal = TERM, no status", r.signal)

-- ---- stdin ----
t.is(c:exec({ "cat" }, { stdin = "small\n" }).stdout, "small\n", "stdin: small")
local big = string.rep("0123456789abcdef", 20 * 65536) -- 20 MiB
r = c:exec({ "sha256sum" }, { stdin = big })
local want = proc.run({ "sha256sum" }, { stdin = big }).stdout
t.is(r.stdout, want, "stdin: 20 MiB arrive byte for byte")
r = c:exec({ "head", "-c", "5" }, { stdin = big, timeout = 30 })
t.ok(r.status == 0 and r.stdout == "01234" and not r.timed_out, "stdin closed early by the command: no hang",
	tostring(r.status))
local f = io.open(tmp .. "/in", "wb") f:write("from an fd\n") f:close()
local fd = sys.open(tmp .. "/in", "RDONLY")
t.is(c:exec({ "cat" }, { stdin = fd }).stdout, "from an fd\n", "stdin from an fd")
sys.close(fd)

-- ---- output: bytes exact, both streams, interleaved in time ----
local all = {}
for i = 0, 255 do all[#all + 1] = string.char(i) end
all = table.concat(all)
f = io.open(tmp .. "/bytes", "wb") f:write(all, "\255\254 not utf-8 \192") f:close()
r = c:exec({ "sh", "-c", "cat " .. tmp .. "/bytes; cat " .. tmp .. "/bytes >&2" })
t.ok(r.stdout == all .. "\255\254 not utf-8 \192" and r.stderr == r.stdout, "stdout and stderr: every byte value, "
	.. "non-UTF-8, exact")
local order = {}
c:exec({ "sh", "-c", "echo 1; sleep 0.1; echo 2 >&2; sleep 0.1; echo 3" }, {
	on_stdout = function(d) order[#order + 1] = "o" .. d:gsub("\n", "") end,
	on_stderr = function(d) order[#order + 1] = "e" .. d:gsub("\n", "") end,
})
t.is(table.concat(order, " "), "o1 e2 o3", "callbacks see the streams as they come")
r = c:exec({ "sh", "-c", "head -c 3000000 /dev/zero" }, { max_capture = 1000 })
t.ok(#r.stdout == 1000 and r.stdout_truncated, "max_capture caps the capture and says so")

-- ---- env and cwd ----
r = c:exec({ "sh", "-c", 'echo "$FOO|$HOME|$(pwd)"' }, { env = { FOO = "b a r" }, cwd = tmp })
t.is(r.stdout, "b a r|/root|" .. tmp .. "\n", "env and cwd")
r = c:exec({ "true" }, { cwd = tmp .. "/nonexistent" })
t.ok(r.status ~= 0, "a cwd that does not exist fails the command")

-- ---- timeout: the whole process group dies ----
local pidfile = tmp .. "/bg.pid"
r = c:exec({ "sh", "-c", "sleep 100 & echo $! > " .. pidfile .. "; sleep 100" }, { timeout = 0.5 })
t.ok(r.timed_out and r.status == nil, "timeout: timed_out, no status")
local bg = tonumber(fs.read(pidfile) or "")
local gone = false
for _ = 1, 100 do
	if not bg or not fs.exists("/proc/" .. bg) or (fs.read("/proc/" .. bg .. "/stat") or ""):match("^%d+ %b() Z") then
		gone = true
		break
	end
	runtime.sleep(0.02)
end
t.ok(bg and gone, "timeout: the command's background child was killed too (process group)")

-- ---- PTY ----
r = c:exec({ "sh", "-c", 'stty size; read -r k; echo "key=$k"' }, { pty = { rows = 33, cols = 101 }, stdin = "q\n" })
t.ok(r.stdout:match("33 101") and r.stdout:match("key=q"), "PTY: window size and a key read", r.stdout)

-- ---- files ----
f = io.open(tmp .. "/src", "wb") f:write(all) f:close()
sys.chmod(tmp .. "/src", "4755")
t.is(c:put(tmp .. "/src", tmp .. "/dst"), tmp .. "/dst", "put returns where it wrote")
t.is(fs.read(tmp .. "/dst"), all, "put: the bytes")
t.is(c:put(tmp .. "/src", tmp .. "/"), tmp .. "/src", "put into a directory keeps the name")
fs.mkdir_p(tmp .. "/out", "700")
sys.symlink("/etc/passwd-should-not-be-written", tmp .. "/out/dst")
local mask = tonumber(proc.run({ "sh", "-c", "umask" }).stdout, 8)
t.is(c:get(tmp .. "/src", tmp .. "/out/dst"), tmp .. "/out/dst", "get returns where it wrote")
local st = sys.lstat(tmp .. "/out/dst")
t.ok(st and st.type == "file", "get: a symlink at the target is replaced, not followed")
t.is(st and st.perm, bit.band(493, bit.bnot(mask)), "get: mode & 0777 & ~umask (no setuid)")
t.is(fs.read(tmp .. "/out/dst"), all, "get: the bytes")
t.raises(function() c:get(tmp .. "/src", tmp .. "/out/capped", { max_bytes = 100 }) end,
	"bigger than the host's cap", "get: over max_bytes fails with one line (the agent checks too)")
t.ok(not fs.exists(tmp .. "/out/capped"), "… and leaves no file")
t.is(#runtime.listdir(tmp .. "/out"), 1, "… nor a temporary one")
t.raises(function() c:get(tmp, tmp .. "/out/x") end, "is a directory", "get: a directory is refused (get_tree takes it)")
t.raises(function() c:put(tmp, tmp .. "/y") end, "not a regular file", "put: a directory is refused")
proc.run({ "mkfifo", tmp .. "/fifo" })
t.raises(function() c:get(tmp .. "/fifo", tmp .. "/out/fifo") end, "not a regular file",
	"get: a FIFO is refused at once (nobody's end to wait for)")

-- ---- directory trees ----
proc.run({ "sh", "-c", "mkdir -p $0/tree/a/b && printf x > $0/tree/a/b/f && printf y > $0/tree/g && "
	.. "ln -s /etc/passwd $0/tree/link && mkfifo $0/tree/fifo && chmod 750 $0/tree/a", tmp })
local top, skipped = agent.put_tree(c, tmp .. "/tree", tmp .. "/tree2")
t.is(top, tmp .. "/tree2", "put_tree: the target")
t.ok(fs.read(tmp .. "/tree2/a/b/f") == "x" and fs.read(tmp .. "/tree2/g") == "y", "put_tree: the files")
t.is(sys.stat(tmp .. "/tree2/a").perm, 488, "put_tree: a directory's mode")
t.is(#skipped, 2, "put_tree: the symlink and the FIFO are skipped, and said")
t.ok(not sys.lstat(tmp .. "/tree2/link"), "… not copied")
t.is(agent.put_tree(c, tmp .. "/tree", tmp .. "/tree2/"), tmp .. "/tree2/tree", "put_tree into a directory: its name")
local names = {}
for _, e in ipairs(c:list(tmp .. "/tree")) do names[#names + 1] = e.name .. ":" .. e.kind end
table.sort(names)
t.is(table.concat(names, " "), "a:directory fifo:other g:file link:link", "list: names and kinds")
fs.mkdir_p(tmp .. "/back", "700")
top, skipped = agent.get_tree(c, tmp .. "/tree", tmp .. "/back/")
t.is(top, tmp .. "/back/tree", "get_tree into a directory: its name")
t.ok(fs.read(tmp .. "/back/tree/a/b/f") == "x" and #skipped == 2 and not sys.lstat(tmp .. "/back/tree/link"),
	"get_tree: the files, not the symlink or the FIFO")
sys.symlink("/nonexistent-target", tmp .. "/back/evil")
t.raises(function() agent.get_tree(c, tmp .. "/tree", tmp .. "/back/evil") end, "not followed",
	"get_tree: a symlink at the target is not followed")
proc.run({ "sh", "-c", "mkdir -p $0/deep && cd $0/deep && for i in $(seq 70); do mkdir d && cd d; done", tmp })
t.raises(function() agent.get_tree(c, tmp .. "/deep", tmp .. "/back/deep") end, "directories deep",
	"get_tree: a tree deeper than 64 stops with one line")

-- ---- several operations at once on one connection ----
local t0 = runtime.now()
local res = c:batch {
	{ exec = { "sh", "-c", "sleep 0.4; echo A" } },
	{ exec = { "sh", "-c", "sleep 0.4; echo B" } },
	{ get = { tmp .. "/src", tmp .. "/out/batch" } },
}
local dt = runtime.now() - t0
t.ok(res[1].stdout == "A\n" and res[2].stdout == "B\n" and res[3] == tmp .. "/out/batch"
	and fs.read(tmp .. "/out/batch") == all, "batch: two execs and a get, each with its result")
t.ok(dt < 0.75, string.format("… at once (%.2f s for two 0.4 s commands)", dt))

-- ---- leaks: 100 execs, flat fds and RSS ----
local function nfds() return #runtime.listdir("/proc/self/fd") end
local function rss() return tonumber((fs.read("/proc/self/status") or ""):match("VmRSS:%s+(%d+)")) end
for _ = 1, 10 do c:exec({ "true" }) end
collectgarbage() collectgarbage()
local fd0, rss0 = nfds(), rss()
t0 = runtime.now()
for _ = 1, 100 do c:exec({ "true" }) end
local per = (runtime.now() - t0) * 10
collectgarbage() collectgarbage()
t.is(nfds(), fd0, "100 execs: no descriptor more")
t.ok(rss() - rss0 < 2048, string.format("100 execs: RSS flat (%d KiB more)", rss() - rss0))
t.diag(string.format("%.2f ms per exec of true (host agent, socketpair)", per))

-- ---- a request refused while it is being built: one line, nothing sent, nothing kept ----
local long = string.rep("a", 200 * 1024)
local refused = {
	{ { long, "x\0y" }, nil, "contains a NUL byte" },
	{ { "env" }, { env = { ["A=B"] = "1" } }, "bad environment name 'A=B'" },
	{ { "env" }, { env = { A = "1\0" } }, "bad or too big environment" },
	{ { long, long }, nil, "the request is too big" },
}
for _, bad in ipairs(refused) do
	local bok, berr = pcall(c.exec, c, bad[1], bad[2])
	t.ok(not bok and tostring(berr):find(bad[3], 1, true) and not tostring(berr):find("\n"),
		"exec refused before sending: " .. bad[3], tostring(berr):sub(1, 200))
end
-- (under ASan freed memory sits in its quarantine, so RSS says nothing; its leak checker
-- reports a lost buffer at exit instead)
local asan = (fs.read("/proc/self/maps") or ""):find("libasan", 1, true)
collectgarbage() collectgarbage()
rss0 = rss()
for _ = 1, 200 do pcall(c.exec, c, { long, "x\0y" }) pcall(c.exec, c, { long, long }) end
collectgarbage() collectgarbage()
if asan then
	t.skip("400 refused requests: RSS not measured under ASan (LeakSanitizer checks at exit)")
else
	t.ok(rss() - rss0 < 8192, string.format("400 refused requests of ~200 KiB: RSS flat (%d KiB more)", rss() - rss0))
end
t.is(c:exec({ "echo", "still" }).stdout, "still\n", "… and the connection is unharmed")

c:close()
p:wait(5)

-- ---- the agent dies mid-command ----
c, p = start()
local agent_pid = c:info().pid
local ok, err = pcall(c.exec, c, { "sh", "-c", "kill -9 " .. agent_pid .. "; sleep 5" }, { timeout = 20 })
t.ok(not ok and tostring(err):match("^agent: test agent: the channel closed"), "the agent killed: one line", err)
t.raises(function() c:exec({ "true" }) end, "unusable after", "… and the connection is not used again")
c:close()
p:wait(5)

-- ---- hostile frames from the guest side: a fake agent (this test writes its bytes) ----
local function frame(len, stream, typ, payload, flags)
	local function u32(v) return string.char(v % 256, math.floor(v / 256) % 256, math.floor(v / 65536) % 256,
		math.floor(v / 16777216) % 256) end
	return u32(len) .. u32(stream) .. string.char(typ, flags or 0, 0, 0) .. (payload or "")
end
local HELLO = frame(8, 0, 1, string.char(agent.VERSION) .. "\0\0\0\42\0\0\0") -- our version, pid 42
local hostile = {
	{ "an oversized frame", frame(0x7fffffff, 1, 32), "malformed frame" },
	{ "flags set", frame(1, 1, 32, "x", 1), "malformed frame" },
	{ "an unknown frame type", frame(0, 1, 99), "unexpected frame" },
	{ "output after its end", frame(0, 1, 32) .. frame(1, 1, 32, "x"), "output after its end" },
	{ "a window too big", frame(4, 1, 35, "\255\255\255\127"), "window" },
	{ "an exit frame of the wrong size", frame(3, 1, 34, "abc"), "bad exit frame" },
	{ "the agent restarted", frame(8, 0, 40, "\1\0\0\0\1\0\0\0"), "restarted" },
	{ "an error frame with escapes", frame(9, 0, 38, "\27[31mbad\n"), "refused our input: %?%[31mbad%?$" },
	{ "EOF in the middle of a frame", frame(100, 1, 32, "short"), "the channel", true },
	{ "a get's file over the cap, announced", frame(12, 1, 37, "\164\1\0\0\0\0\0\1\0\0\0\0"), "over the cap", "get" },
	{ "a get's data over the cap", frame(12, 1, 37, "\164\1\0\0\1\0\0\0\0\0\0\0") .. frame(2, 1, 8, "ab"),
		"more than the cap", "get" },
	{ "too many stray frames", string.rep(frame(0, 999, 32), 100001), "too many stray frames" },
	{ "a directory entry '..'", frame(15, 1, 41, "\2\237\1\0\0\0\0\0\0\0\0\0\0..") .. frame(4, 1, 36, "\0\0\0\0"),
		"not a plain name", "list" },
	{ "a directory entry with a slash", frame(16, 1, 41, "\1\164\1\0\0\0\0\0\0\0\0\0\0a/b"), "not a plain name",
		"list" },
}
for _, h in ipairs(hostile) do
	local a, b = sys.socketpair()
	fs.write(tmp .. "/frames", HELLO .. h[2], "600")
	-- the fake agent: a child writes its bytes (more than a socket buffer holds) and exits
	-- (it reads what fireclaw sends first: a socket closed with unread data resets the peer)
	local w = proc.spawn { argv = { "/bin/sh", "-c", 'cat "$0" >&3; head -c "$1" <&3 >/dev/null; [ "$2" ] || sleep 30',
		tmp .. "/frames", ({ get = "48", list = "30" })[h[4]] or "58", h[4] == true and "eof" or "" }, fds = { b } }
	sys.close(b)
	local hc = agent.wrap(a, { timeout = 5, where = "fake agent" })
	sys.close(a)
	if h[4] == "list" then
		ok, err = pcall(agent.get_tree, hc, "/x", tmp .. "/out/hostile-tree")
	elseif h[4] == "get" then
		ok, err = pcall(hc.get, hc, "/x/y/z/abcd", tmp .. "/out/hostile", { max_bytes = 1 })
	else
		ok, err = pcall(hc.exec, hc, { "true" }, { timeout = 10 })
	end
	local line = tostring(err)
	t.ok(not ok and line:match("^agent: fake agent: ") and line:match(h[3]) and not line:find("\n"),
		"hostile: " .. h[1] .. " -> one line", line:sub(1, 300))
	hc:close()
	w:kill(9)
	w:wait(5)
end
t.lives(function() c, p = start() c:exec({ "true" }) c:close() p:wait(5) end, "fireclaw unharmed: a new connection works")

-- ---- attach: every port held by another process: wait `wait` s, then one line ----
fs.mkdir_p(tmp .. "/ports", "700")
local holders = {}
for k = 0, 1 do
	holders[#holders + 1] = proc.spawn { argv = { "flock", "-x", tmp .. "/ports/agent-" .. k .. ".lock", "sleep", "30" },
		stderr = "/dev/null" }
end
local held = false
for _ = 1, 100 do -- until flock(1) holds both (bounded)
	local one = proc.run({ "flock", "-n", tmp .. "/ports/agent-1.lock", "true" })
	if one.status ~= 0 and proc.run({ "flock", "-n", tmp .. "/ports/agent-0.lock", "true" }).status ~= 0 then
		held = true
		break
	end
	runtime.sleep(0.05)
end
t.ok(held, "attach: two ports held by other processes")
local w0 = runtime.now()
local attached, werr = pcall(agent.attach, { dir = tmp .. "/ports", ports = 2, timeout = 10, wait = 0.3, where = "VM x" })
local took = runtime.now() - w0
t.ok(not attached and tostring(werr):match("all 2 agent ports are busy") and took >= 0.3 and took < 3,
	"attach: every port busy -> one line after `wait` s, not `timeout`", string.format("%s (%.2f s)", tostring(werr), took))
for _, h in ipairs(holders) do h:kill(9) h:wait(5) end

-- ---- attach: a port whose first connection the VMM accepts and never reads (a restored
-- QEMU sometimes does): the hello again on a new connection; a failed attach frees its port ----
local net = require "fireclaw.net"
local function stuck(mode)
	fs.mkdir_p(tmp .. "/stuck", "700")
	os.remove(tmp .. "/stuck/agent-0.sock")
	local l = net.unix_listen(tmp .. "/stuck/agent-0.sock")
	local fake = proc.spawn { argv = { "python3", tests .. "/lib/stuck_port.py", bin, mode }, fds = { l:fd() } }
	l:close()
	return fake
end
local fake = stuck("reconnect")
local ok_r, rc = pcall(agent.attach, { dir = tmp .. "/stuck", ports = 1, timeout = 5, retry = 0.1, where = "VM stuck" })
t.ok(ok_r and rc:info().reconnects >= 1, "attach: a first connection never read -> the hello again on a new "
	.. "connection after `retry` s", ok_r and ("reconnects " .. rc:info().reconnects) or tostring(rc))
t.is(ok_r and rc:exec({ "echo", "second" }).stdout, "second\n", "… which then execs")
if ok_r then rc:close() end
fake:kill(9)
fake:wait(5)
-- attach{hello = false} (a restore connects before its VM runs), then conn:hello: the same
-- retry on a new connection
fake = stuck("reconnect")
local ok_e, ec = pcall(agent.attach, { dir = tmp .. "/stuck", ports = 1, hello = false, where = "VM stuck" })
t.ok(ok_e and ec:info().version == 0, "attach{hello = false}: connected, nothing said yet", tostring(ec))
local ok_h, herr = pcall(function() return ec:hello { timeout = 5, retry = 0.1 } end)
t.ok(ok_h and herr == ec and ec:info().version == agent.VERSION and ec:info().reconnects >= 1,
	"conn:hello: answered, on a new connection when the first went unread", tostring(herr))
t.is(ok_h and ec:exec({ "echo", "early" }).stdout, "early\n", "… which then execs")
t.raises(function() ec:hello { bogus = 1 } end, "unknown option", "conn:hello: an unknown option is misuse")
if ok_e then ec:close() end
fake:kill(9)
fake:wait(5)
fake = stuck("never")
local ok_n, nerr = pcall(agent.attach, { dir = tmp .. "/stuck", ports = 1, timeout = 1, retry = 0.2, where = "VM stuck" })
t.ok(not ok_n and tostring(nerr):match("^agent: VM stuck %(agent port 0%): the guest agent did not answer within 1 s$"),
	"attach: no connection ever read -> one line at the timeout", tostring(nerr))
-- the failed attach's port lock is gone with it, not when the garbage collector runs
t.ok(proc.run({ "flock", "-n", tmp .. "/stuck/agent-0.lock", "true" }).status == 0,
	"… and its port is free again at once")
fake:kill(9)
fake:wait(5)

proc.run({ "rm", "-rf", tmp })
return t.done()
