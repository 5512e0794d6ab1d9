-- fireclaw.ssh against real servers (dropbear and OpenSSH sshd) started in a test network
-- namespace by tests/lib/ssh_server.lua. Everything started is torn down even on failure.
local t = require "tap"
local ssh = require "fireclaw.ssh"
local server = require "ssh_server"
local sys = require "ssh_sys"

local q, sh, read_file, write_file = server.q, server.sh, server.read_file, server.write_file

local function random_bytes(n)
	local f = assert(io.open("/dev/urandom", "rb"))
	local s = f:read(n)
	f:close()
	return s
end

-- n random bytes without NUL (a command line cannot carry NUL)
local function random_arg(n)
	local s = random_bytes(n):gsub("%z", "\1")
	return s
end

local function all_bytes(times)
	local b = {}
	for i = 0, 255 do b[#b + 1] = string.char(i) end
	return string.rep(table.concat(b), times)
end

-- ---- checks that need no server ----

local function test_quote()
	t.is(ssh.quote({"ls", "-l", "/tmp"}), "ls -l /tmp", "quote: plain words stay as they are")
	t.is(ssh.quote({"echo", "a b", "", "it's"}), [[echo 'a b' '' 'it'\''s']],
		"quote: spaces, empty and single quotes")
	t.is(ssh.quote({"$HOME;rm", "`x`"}), [['$HOME;rm' '`x`']], "quote: $ ; ` are quoted")
	t.raises(function() ssh.quote({"a\0b"}) end, "NUL", "quote: NUL refused")
	t.raises(function() ssh.quote({}) end, "empty argv", "quote: empty argv refused")
end

local function test_connect_errors_without_server(lab)
	t.raises(function() ssh.connect{host = lab.host, key = lab.key, netns = lab.netns} end,
		"no host key given", "connect: no host key at all is refused")
	local loose = lab.dir .. "/loose_key"
	sh("cp " .. q(lab.key) .. " " .. q(loose) .. " && chmod 644 " .. q(loose))
	t.raises(function()
		ssh.connect{host = lab.host, key = loose, netns = lab.netns, insecure_ignore_host_key = true}
	end, "mode 0644: it must be private", "connect: key file with mode 0644 refused")
	local ok, err = pcall(ssh.connect, {host = lab.host, port = 2999, netns = lab.netns,
		key = lab.key, insecure_ignore_host_key = true, timeout = 1})
	t.ok(not ok, "connect: closed port fails")
	t.like(err, "^ssh: 172%.16%.0%.2:2999 in " .. lab.netns:gsub("%-", "%%-")
		.. ": timed out after 1 s %(last: connection refused%)$", "connect: closed port message")
	t.raises(function()
		ssh.connect{host = lab.host, netns = "fct-ssh-no-such-ns", key = lab.key,
			insecure_ignore_host_key = true}
	end, "fct%-ssh%-no%-such%-ns", "connect: missing namespace is an immediate error")
end

-- a listener that accepts and closes at once: an sshd that is still starting
local function test_handshake_retry(lab)
	local pid = lab:spawn("closer", ("exec socat TCP-LISTEN:2001,bind=%s,fork,reuseaddr SYSTEM:true")
		:format(lab.host))
	local ok, err = pcall(ssh.connect, {host = lab.host, port = 2001, netns = lab.netns,
		key = lab.key, insecure_ignore_host_key = true, timeout = 2})
	sys.stop_child(pid)
	t.ok(not ok, "connect: server closing during banner exchange fails after the deadline")
	t.like(err, "timed out after 2 s %(last: handshake failed: ", "connect: ... and says so")
end

-- ---- checks against one server ----

local function test_exec_basics(s, name)
	local r = s:exec({"true"})
	t.is(r.status, 0, name .. ": exit status 0")
	t.is(r.signal, nil, name .. ": no signal")
	t.is(r.timed_out, false, name .. ": not timed out")
	t.ok(type(r.duration_ms) == "number", name .. ": duration_ms")
	t.is(s:exec("exit 1").status, 1, name .. ": exit status 1")
	r = s:exec({"no-such-command-fct"})
	t.is(r.status, 127, name .. ": exit status 127")
	t.like(r.stderr, "not found", name .. ": 127 explains on stderr")
	r = s:exec({"sh", "-c", "echo out; echo err >&2; exit 3"})
	t.same({r.status, r.stdout, r.stderr}, {3, "out\n", "err\n"}, name .. ": stdout and stderr apart")
	r = s:exec("kill -KILL $$")
	t.is(r.signal, "KILL", name .. ": signal-terminated command reports KILL")
	t.is(r.status, nil, name .. ": ... and no status")
end

local function test_big_streams(s, name, lab)
	local a, b = lab.dir .. "/big_a", lab.dir .. "/big_b"
	local da, db = random_bytes(10 * 1024 * 1024), random_bytes(10 * 1024 * 1024)
	write_file(a, da)
	write_file(b, db)
	-- the server sees the same filesystem: both files go out at once, one per stream
	local r = s:exec(("cat %s & cat %s >&2; wait"):format(q(a), q(b)))
	t.is(r.status, 0, name .. ": 10 MB + 10 MB interleaved: status")
	t.ok(#r.stdout == #da and r.stdout == da, name .. ": 10 MB stdout intact",
		("got %d bytes"):format(#r.stdout))
	t.ok(#r.stderr == #db and r.stderr == db, name .. ": 10 MB stderr intact",
		("got %d bytes"):format(#r.stderr))
	os.remove(a)
	os.remove(b)

	local bytes = all_bytes(64)
	local f = lab.dir .. "/bytes"
	write_file(f, bytes)
	t.is(s:exec({"cat", f}).stdout, bytes, name .. ": all 256 byte values intact on stdout")
	t.is(s:exec({"cat"}, {stdin = bytes}).stdout, bytes, name .. ": all 256 byte values through stdin")

	local input = random_bytes(5 * 1024 * 1024)
	r = s:exec({"cat"}, {stdin = input})
	t.ok(r.status == 0 and r.stdout == input, name .. ": 5 MB stdin echoed back by cat",
		("status %s, %d bytes"):format(tostring(r.status), #r.stdout))
	-- stdin from a host fd (a regular file) until EOF
	local fd = sys.open_read(f)
	local ok, res = pcall(s.exec, s, "cat; echo end", {stdin = fd})
	sys.close(fd)
	t.ok(ok and res.stdout == bytes .. "end\n", name .. ": stdin streamed from an fd, then EOF",
		ok and #res.stdout or res)
	-- the command ends without reading its input: the rest is dropped, no error
	r = s:exec("true", {stdin = input})
	t.is(r.status, 0, name .. ": unread stdin is dropped when the command ends")
end

local function test_argv(s, name)
	local hostile = {"", " ", "a b", "'", "''", "\"", "$HOME", "$(id)", "`id`", ";", "&&", "|",
		"\\", "\\'", "*", "?", "~", "#x", "\n", "a\nb", "-n", "--", "!", "%s", "\t", "\255\254",
		"é", "'\\''"}
	local function roundtrip(args)
		local argv = {"sh", "-c", [[printf '%s\0' "$@"]], "sh"}
		for _, a in ipairs(args) do argv[#argv + 1] = a end
		local r = s:exec(argv)
		return r.status == 0 and r.stdout == table.concat(args, "\0") .. "\0", r
	end
	local ok, r = roundtrip(hostile)
	t.ok(ok, name .. ": hostile argv arrives verbatim", r.stdout)
	local bad
	for _ = 1, 30 do
		local args = {}
		for j = 1, math.random(1, 6) do args[j] = random_arg(math.random(0, 40)) end
		if not roundtrip(args) then bad = args break end
	end
	t.ok(not bad, name .. ": 30 fuzzed random-byte argvs arrive byte-identical",
		bad and ssh.quote(bad))
	local r2 = s:exec("echo $1 ; printf '%s' \"x y\"")
	t.is(r2.stdout, "\nx y", name .. ": a string runs as a shell command line")
end

local function test_env(s, name)
	local r = s:exec([[printf '%s|%s|%s' "$A" "$B" "$C_1"]],
		{env = {A = "x y'z", B = "$HOME;`id` \\ \"", C_1 = ""}})
	t.is(r.stdout, "x y'z|$HOME;`id` \\ \"|", name .. ": env values arrive verbatim")
	t.raises(function() s:exec("true", {env = {["A-B"] = "1"}}) end, "bad variable name",
		name .. ": bad env name refused")
end

local function test_timeout(s, name)
	local r = s:exec("sleep 30", {timeout = 1})
	t.is(r.timed_out, true, name .. ": timeout: timed_out")
	t.is(r.status, nil, name .. ": timeout: no status")
	t.is(r.signal, "KILL", name .. ": timeout: the command was killed")
	t.diag(("%s: sleep 30 with timeout=1 returned after %.0f ms"):format(name, r.duration_ms))
	r = s:exec("echo fine", {timeout = 5})
	t.same({r.stdout, r.status, r.timed_out}, {"fine\n", 0, false},
		name .. ": session usable after a timeout; a quick command with a timeout")
end

local function test_capture(s, name)
	local r = s:exec("head -c 100000 /dev/zero; echo e >&2", {max_capture = 1000})
	t.same({#r.stdout, r.stdout_truncated, r.stderr, r.stderr_truncated, r.status},
		{1000, true, "e\n", false, 0}, name .. ": max_capture truncates and flags")
end

-- The callback must see the first line while the command still waits for stdin: the
-- callback itself writes the line the command's `read` waits for, so the command cannot end
-- before the callback ran.
local function test_streaming(s, name)
	local rfd, wfd = sys.pipe()
	local seen, got_first_live = {}, false
	local ok, r = pcall(s.exec, s, [[echo first; read x; echo "got $x"; echo e >&2]], {
		stdin = rfd,
		on_stdout = function(data)
			seen[#seen + 1] = data
			if not got_first_live and table.concat(seen):find("first\n", 1, true) then
				got_first_live = true
				sys.write(wfd, "hello\n")
				sys.close(wfd)
				wfd = nil
			end
		end,
	})
	sys.close(rfd)
	sys.close(wfd)
	t.ok(ok, name .. ": streaming exec ran", r)
	if not ok then return end
	t.ok(got_first_live, name .. ": on_stdout saw the first line while the command was waiting")
	t.is(table.concat(seen), "first\ngot hello\n", name .. ": on_stdout got everything")
	t.is(r.stdout, "", name .. ": with a callback stdout is not captured")
	t.is(r.stderr, "e\n", name .. ": stderr without a callback is still captured")
	local parts = {}
	r = s:exec("echo a; echo b >&2", {capture = true,
		on_stdout = function(d) parts[#parts + 1] = d end,
		on_stderr = function(d) parts[#parts + 1] = "E" .. d end})
	t.same({r.stdout, r.stderr}, {"a\n", "b\n"}, name .. ": capture=true captures as well")
	t.ok(table.concat(parts):find("a\n", 1, true) and table.concat(parts):find("Eb\n", 1, true),
		name .. ": both callbacks called")
	t.raises(function()
		s:exec("echo x", {on_stdout = function() s:exec("true") end})
	end, "session busy", name .. ": exec from a callback of the same session is refused")
	t.raises(function()
		s:exec("echo x", {on_stdout = function() error("boom", 0) end})
	end, "^boom$", name .. ": a callback's error propagates")
	t.is(s:exec("echo after").stdout, "after\n", name .. ": session fine after a callback error")
	-- a callback error while the command would run on: the command is killed, not left over
	t.raises(function()
		s:exec("echo x; sleep 37; echo never", {on_stdout = function() error("stop", 0) end})
	end, "^stop$", name .. ": callback error in a long command propagates")
	t.is(sh("ps -eo args | grep -c '^sleep 37$' || true"):match("%d+"), "0",
		name .. ": ... and the remote command was killed")
	t.is(s:exec("echo after").stdout, "after\n", name .. ": ... and the session goes on")
	local errs = 0
	for _ = 1, 20 do
		local aborted_ok = pcall(s.exec, s, "echo x; echo y >&2", {on_stdout = function() error("b", 0) end})
		local after = s:exec("echo z")
		if aborted_ok or after.stdout ~= "z\n" then errs = errs + 1 end
	end
	t.is(errs, 0, name .. ": 20 aborted execs in a row leave the session healthy")
end

local function test_pty(s, name)
	local r = s:exec("tty", {pty = true})
	t.like(r.stdout, "^/dev/pts/", name .. ": pty=true runs on a terminal")
	t.like(s:exec("tty").stdout, "not a tty", name .. ": without pty no terminal")
	local sized = s:exec("stty size; echo $TERM", {pty = {term = "vt100", cols = 123, rows = 45}})
	t.like(sized.stdout, "^45 123\r?\nvt100", name .. ": pty {term, cols, rows} reaches the guest")
	t.raises(function() s:exec("true", {pty = {cols = 0}}) end, "cols/rows must be 1 to 10000",
		name .. ": a pty of 0 columns is refused")
	t.raises(function() s:exec("true", {pty = {term = "a b"}}) end, "short terminal name",
		name .. ": a pty term with a space is refused")
	t.raises(function() s:exec("true", {pty = {colour = 1}}) end, "unknown option 'colour'",
		name .. ": pty: unknown keys refused")
	local null = require("fireclaw.sys").open("/dev/null", "RDONLY")
	t.raises(function() s:exec("true", {tty = null}) end, "is not a terminal",
		name .. ": tty that is not a terminal is refused")
	require("fireclaw.sys").close(null)
end

local function test_sftp(s, name, lab)
	local src, dst, back = lab.dir .. "/up", lab.dir .. "/remote_" .. name, lab.dir .. "/down"
	local data = random_bytes(3 * 1024 * 1024 + 7)
	write_file(src, data)
	t.lives(function() s:put(src, dst, tonumber("640", 8)) end, name .. ": sftp put 3 MB")
	t.ok(read_file(dst) == data, name .. ": put arrived intact")
	t.is(sh("stat -c %a " .. q(dst)):match("%d+"), "640", name .. ": put set the mode")
	t.lives(function() s:get(dst, back) end, name .. ": sftp get")
	t.ok(read_file(back) == data, name .. ": get round trip intact")
	local sum1 = sh("sha256sum < " .. q(src)):match("%x+")
	local sum2 = sh("sha256sum < " .. q(back)):match("%x+")
	t.is(sum2, sum1, name .. ": sha256 of the round trip")
	t.is(sh("stat -c %a " .. q(back)):match("%d+"), "640", name .. ": get kept the remote mode")
	t.raises(function() s:put(lab.dir .. "/nope", dst) end,
		"^ssh: put .*/nope → .*: local .*/nope does not exist", name .. ": put of a missing file")
	t.raises(function() s:get(lab.dir .. "/nope", back) end,
		"^ssh: get .*/nope → .*/down: remote .*/nope: no such file", name .. ": get of a missing file")
	t.raises(function() s:put(src, lab.dir .. "/no/such/dir/x") end, "remote .*: no such file",
		name .. ": put into a missing directory")
	local left = sh("ls -a " .. q(lab.dir) .. " | grep -c fctmp || true"):match("%d+")
	t.is(left, "0", name .. ": failed get leaves no temp file")
	t.ok(read_file(back) == data, name .. ": failed get kept the old target")
	os.remove(src)
	os.remove(dst)
	os.remove(back)
end

-- What comes back is data: no privileges, no symlink followed, bounded in size and time.
-- Runs last on a session: the stall case cuts its connection.
local function test_sftp_hostile(s, name, lab)
	local fsys = require "fireclaw.sys"
	local d = lab.dir .. "/hostile_" .. name
	sh("rm -rf " .. q(d) .. " && mkdir -p " .. q(d .. "/in/rdir") .. " " .. q(d .. "/out/sub"))
	local src = d .. "/in/suid"
	write_file(src, "#!/bin/sh\n")
	sh("chmod 6777 " .. q(src))
	local function mode(p) return tonumber(sh("stat -c %a " .. q(p)):match("%d+"), 8) end
	local function temps() return sh("ls -A " .. q(d .. "/out") .. " | grep -c fctmp || true"):match("%d+") end
	local umask = tonumber(sh("umask"):match("%d+"), 8)
	local got = s:get(src, d .. "/out/x")
	t.is(got, d .. "/out/x", name .. ": get returns the path it wrote")
	t.is(mode(got), bit.band(tonumber("777", 8), bit.bnot(umask)),
		name .. ": get drops setuid, setgid and sticky (mode & 0777 & ~umask)")
	t.is(s:get(src, d .. "/out/"), d .. "/out/suid", name .. ": get into DIR/ takes the remote basename")
	t.is(s:get(src, d .. "/out/sub"), d .. "/out/sub/suid", name .. ": get into an existing directory")
	write_file(d .. "/precious", "precious\n")
	sh("ln -s " .. q(d .. "/precious") .. " " .. q(d .. "/out/link"))
	s:get(src, d .. "/out/link")
	t.is(sh("test -L " .. q(d .. "/out/link") .. " && echo link || echo file"), "file\n",
		name .. ": a symlink at the target is replaced")
	t.is(read_file(d .. "/precious"), "precious\n", name .. ": ... and its target is untouched")
	t.raises(function() s:get(src, d .. "/nodir/x") end, "local directory .*/nodir does not exist %(create it first%)$",
		name .. ": get into a missing directory: one line")
	t.raises(function() s:get(src, d .. "/out/y", tonumber("4755", 8)) end, "bad mode .*never setuid",
		name .. ": get refuses an explicit setuid mode")
	t.raises(function() s:get("/", d .. "/out/") end, "remote / has no file name",
		name .. ": get of / into a directory: no name to give it")
	s:get(src, d .. "/out/owned", { uid = 12345, gid = 23456 })
	t.is(sh("stat -c %u:%g " .. q(d .. "/out/owned")), "12345:23456\n", name .. ": get with uid/gid")
	fsys.setenv("SUDO_UID", "4242")
	fsys.setenv("SUDO_GID", "4343")
	local ok = pcall(s.get, s, src, d .. "/out/sudo")
	fsys.setenv("SUDO_UID", "x")
	t.raises(function() s:get(src, d .. "/out/sudo2") end, "SUDO_UID/SUDO_GID %('x', '4343'%) are not user and group ids",
		name .. ": a malformed SUDO_UID is refused")
	fsys.setenv("SUDO_UID", nil)
	fsys.setenv("SUDO_GID", nil)
	t.ok(ok, name .. ": get under sudo")
	t.is(sh("stat -c %u:%g " .. q(d .. "/out/sudo")), "4242:4343\n", name .. ": ... belongs to SUDO_UID:SUDO_GID")
	-- puts: directory targets, caps, what is not a file
	t.is(s:put(src, d .. "/in/rdir/"), d .. "/in/rdir/suid", name .. ": put into DIR/")
	t.is(s:put(src, d .. "/in/rdir"), d .. "/in/rdir/suid", name .. ": put into an existing directory")
	t.raises(function() s:put(d .. "/in", d .. "/in/x") end, "local .*/in is a directory; directory trees are not supported yet",
		name .. ": put of a directory")
	sh("mkfifo " .. q(d .. "/in/fifo"))
	t.raises(function() s:put(d .. "/in/fifo", d .. "/in/x") end, "local .*/fifo is not a regular file",
		name .. ": put of a FIFO: refused at once, not waited on")
	write_file(d .. "/in/2k", string.rep("x", 2048))
	t.raises(function() s:put(d .. "/in/2k", d .. "/in/x", { max_bytes = 1024 }) end,
		"local .*/2k is 2 KiB, more than 1 KiB %(%-%-max%-transfer / max_bytes raises it%)$", name .. ": put over max_bytes")
	t.is((ssh.check_source(d .. "/in/2k")), 2048, name .. ": check_source gives the size")
	t.is(select(2, ssh.check_source(d .. "/in/2k", 1024)), "is 2 KiB, more than 1 KiB (--max-transfer / max_bytes raises it)",
		name .. ": check_source says why not")
	sh("cp " .. q(d .. "/precious") .. " " .. q(d .. "/out/keep"))
	t.raises(function() s:get(d .. "/in/2k", d .. "/out/keep", { max_bytes = 1024 }) end,
		"the guest's file is 2 KiB, more than 1 KiB %(", name .. ": get of a file said to be over max_bytes")
	t.raises(function() s:get("/proc/self/pagemap", d .. "/out/keep", { max_bytes = 65536 }) end,
		"the guest sent more than 64 KiB %(", name .. ": get of a file that is bigger than it says: cut at max_bytes")
	t.is(read_file(d .. "/out/keep"), "precious\n", name .. ": ... the old target stays")
	t.is(temps(), "0", name .. ": ... and no partial file is left")
	-- a FIFO nobody writes: sftp-server's open never returns
	local t0 = require("fireclaw.runtime").now()
	t.raises(function() s:get(d .. "/in/fifo", d .. "/out/f", { stall = 1 }) end,
		"no progress for 1 s: the guest stalled", name .. ": get of a FIFO nobody writes ends at the stall limit")
	t.ok(require("fireclaw.runtime").now() - t0 < 30, name .. ": ... (not after the default 30 s)")
	sh("timeout 5 sh -c 'echo > " .. d .. "/in/fifo' || true") -- let that sftp-server go
	t.is(temps(), "0", name .. ": ... no partial file")
end

local function test_many_channels(srv, name)
	local s1, s2 = ssh.connect(srv:opts()), ssh.connect(srv:opts())
	local ok = true
	for i = 1, 25 do
		local a, b = s1:exec({"echo", "one" .. i}), s2:exec({"echo", "two" .. i})
		ok = ok and a.stdout == "one" .. i .. "\n" and b.stdout == "two" .. i .. "\n"
	end
	t.ok(ok, name .. ": two sessions, 50 execs alternating, each on its own channel")
	s1:close()
	t.is(s2:exec("echo x").stdout, "x\n", name .. ": closing one session leaves the other")
	s2:close()
end

local function test_auth_errors(srv, other, lab, name)
	local o = srv:opts{host_key = other.host_key}
	local ok, err = pcall(ssh.connect, o)
	t.ok(not ok, name .. ": wrong host key refused")
	t.like(err, "host key mismatch: expected SHA256:[%w+/]+ got SHA256:[%w+/]+", name .. ": ... names both fingerprints")
	local want = sh("ssh-keygen -lf " .. q(srv.host_key_file)):match("(SHA256:%S+)")
	t.like(err, "got " .. want:gsub("%p", "%%%0"), name .. ": ... the fingerprint ssh-keygen shows")
	-- the line's base64 is decoded strictly: an '=' inside the key data is no zero digit
	local typ, b64 = other.host_key:match("^(%S+) (%S+)")
	local connected, why = pcall(ssh.connect, srv:opts{host_key = typ .. " " .. b64:sub(1, 39) .. "=" .. b64:sub(41)})
	t.like(connected and "connected" or why, "host_key: expected a public key line",
		name .. ": a key line with '=' inside its base64 is refused")
	o = srv:opts{host_key_file = srv.host_key_file}
	o.host_key = nil
	local s = ssh.connect(o)
	t.is(s:exec("echo k").stdout, "k\n", name .. ": host_key_file works")
	s:close()
	o = srv:opts{insecure_ignore_host_key = true}
	o.host_key = nil
	s = ssh.connect(o)
	t.ok(s, name .. ": insecure_ignore_host_key=true accepts any key")
	s:close()
	local stranger = lab.stranger or lab:new_key("stranger")
	lab.stranger = stranger
	t.raises(function() ssh.connect(srv:opts{key = stranger}) end,
		"authentication refused for root with key " .. stranger:gsub("%p", "%%%0"),
		name .. ": wrong client key refused")
	local listdir = require("fireclaw.runtime").listdir
	local before = #listdir("/proc/self/fd")
	for _ = 1, 10 do
		pcall(ssh.connect, srv:opts{key = stranger})
		pcall(ssh.connect, srv:opts{host_key = other.host_key})
	end
	t.is(#listdir("/proc/self/fd"), before, name .. ": failed connects leave no fd behind (no GC needed)")
end

local function test_close(srv, name)
	local s = ssh.connect(srv:opts())
	t.like(tostring(s), "root@172%.16%.0%.2:" .. srv.port, name .. ": tostring shows user@host")
	s:close()
	t.lives(function() s:close() end, name .. ": close twice")
	t.like(tostring(s), "closed", name .. ": tostring says closed")
	t.raises(function() s:exec("true") end, "is closed", name .. ": exec after close")
end

-- Ctrl-C in the middle of an exec, in a child fireclaw (the signal marks the process):
-- the error reaches the script, and the channel/session are freed.
local function test_interrupt(srv, name, lab)
	local script = lab.dir .. "/interrupt.lua"
	local o = srv:opts()
	write_file(script, ([[
local ssh, sys = require "fireclaw.ssh", require "ssh_sys"
local s = ssh.connect{netns=%q, host=%q, port=%d, key=%q, host_key=%q}
local ok, err = pcall(s.exec, s, "echo go; sleep 30", {on_stdout = function() sys.kill(sys.getpid(), 2) end})
print("error:", err)
local ok2, err2 = pcall(s.exec, s, "echo again")
print("after:", ok2 and err2.stdout or err2)
s:close()
print("closed")
]]):format(o.netns, o.host, o.port, o.key, o.host_key))
	local out = sh(os.getenv("FIRECLAW") .. " " .. q(script) .. " || true")
	t.like(out, "error:%s+interrupted by SIGINT", name .. ": Ctrl-C interrupts a running exec")
	t.like(out, "after:%s+again", name .. ": the session answers after the interrupt", out)
	t.like(out, "closed", name .. ": and closes cleanly", out)
end

local function run_server_suite(lab, srv, other)
	local name = srv.kind
	local s = ssh.connect(srv:opts())
	t.ok(s, name .. ": connected")
	test_exec_basics(s, name)
	test_big_streams(s, name, lab)
	test_argv(s, name)
	test_env(s, name)
	test_timeout(s, name)
	test_capture(s, name)
	test_streaming(s, name)
	test_pty(s, name)
	test_sftp(s, name, lab)
	test_sftp_hostile(s, name, lab)
	s:close()
	test_many_channels(srv, name)
	test_auth_errors(srv, other, lab, name)
	test_close(srv, name)
	test_interrupt(srv, name, lab)
end

local function main(lab)
	test_quote()
	test_connect_errors_without_server(lab)
	test_handshake_retry(lab)
	local d = lab:dropbear{port = 22}
	local o = lab:sshd{port = 2222}
	run_server_suite(lab, d, o)
	run_server_suite(lab, o, d)
end

math.randomseed(os.time())
local lab = server.lab()
local ok, err = xpcall(main, debug.traceback, lab)
if not ok then t.ok(false, "test body raised", err) end
local cok, cerr = pcall(lab.close, lab)
t.ok(cok, "everything torn down", cerr)
return t.done()
