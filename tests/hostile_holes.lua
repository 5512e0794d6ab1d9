-- Small holes a hostile guest, a reused pid or a broken record could open (issue 12), each
-- checked on the primitive that had it:
--   capped logs (proc.spawn's {log = path} and its log sink), proc.kill without a start
--   time, proc.run with a child that closed its output, a user's FIRECLAW_EXEC_TAG,
--   interface names on their way to nft, a stale record that cannot be reaped.
local t = require "tap"
local proc = require "fireclaw.proc"
local fs = require "fireclaw.fs"
local net = require "fireclaw.net"
local runtime = require "fireclaw.runtime"

local FIRECLAW = os.getenv("FIRECLAW") or "./fireclaw"
local tmp = proc.run({ "mktemp", "-d", "/tmp/fct-holes.XXXXXX" }).stdout:gsub("%s+$", "")
local function read(path) return fs.read(path) or "" end
-- wait (bounded) until cond() is true
local function wait_until(cond, seconds)
	local deadline = runtime.now() + seconds
	while not cond() do
		if runtime.now() > deadline then return false end
		runtime.sleep(0.02)
	end
	return true
end
local function sinks_for(path)
	local n = 0
	for _, pid in ipairs(runtime.listdir("/proc") or {}) do
		local cmd = pid:match("^%d+$") and fs.read("/proc/" .. pid .. "/cmdline") or ""
		if cmd:find("--log-sink", 1, true) and cmd:find(path, 1, true) then n = n + 1 end
	end
	return n
end

-- ---- capped logs ----
local function test_capped_logs()
	local out, fd3 = tmp .. "/out.log", tmp .. "/fd3.log"
	local cap = 65536
	-- 3000 numbered lines, 3 MB of filler, then the last lines; stderr and stdout share a file
	local p = proc.spawn {
		argv = { "sh", "-c", "echo FIRST; i=0; while [ $i -lt 3000 ]; do echo line $i; i=$((i+1)); done;"
			.. " head -c 3000000 /dev/zero | tr '\\0' x; echo; echo LAST >&2; echo to-fd3 >&3" },
		stdout = { log = out }, stderr = { log = out }, fds = { { log = fd3 } }, log_cap = cap,
	}
	-- the sink is not waited for at spawn (its exec may still be under way): wait for its name
	t.ok(p:sink_pid() and wait_until(function() return sinks_for(out) == 1 end, 10),
		"one log sink process, named after its files")
	local st = p:wait(30)
	t.is(st and st.status, 0, "the writer ends")
	t.is(p:sink_pid(), nil, "wait let the sink finish and reaped it")
	local s = read(out)
	t.is(#s, cap, "the log is exactly at its cap after 3 MB")
	t.like(s:sub(1, 30), "^FIRST\nline 0\nline 1\n", "it starts with the first bytes")
	t.like(s, "\n%[fireclaw: %d+ bytes dropped here[^\n]*\n", "a line says what was dropped")
	t.like(s, "xxxx\nLAST\n$", "it ends with the last bytes, stderr after stdout")
	t.is(read(fd3), "to-fd3\n", "an fd entry {log = path} is a capped log too")
	local vm = require "fireclaw.vm"
	t.is(vm.log_tail(out, 1), "LAST", "vm.log_tail gives the last line of a capped log")
	p:close()

	-- a small log is left as it is
	p = proc.spawn { argv = { "sh", "-c", "echo small" }, stdout = { log = out } }
	p:wait(10)
	t.is(read(out), "small\n", "a log under the cap is the plain output")
	p:close()

	-- close() of a running writer: writer killed, sink gone (EOF) and reaped
	p = proc.spawn { argv = { "sleep", "30" }, stdout = { log = out } }
	local sink = p:sink_pid()
	p:close()
	t.ok(sink and not proc.alive(sink), "close kills the writer; its sink ends and is reaped")

	-- the sink outlives a detached writer, and ends at the writer's end
	p = proc.spawn { argv = { "sh", "-c", "read x; echo bye" }, stdin = "/dev/null",
		stdout = { log = out }, pdeathsig = false }
	local pid, start = p:pid(), proc.starttime(p:pid())
	p:wait(10)
	p:close()
	t.ok(pid and not proc.alive(pid, start), "(writer done)")
	t.raises(function() proc.spawn { argv = { "true" }, stdout = { log = out }, log_cap = 10 } end,
		"log_cap 10", "a cap too small is refused")
	t.raises(function() proc.spawn { argv = { "true" }, stdout = { nolog = out } } end,
		"{log = path} expected", "a table without log is refused")
end

-- ---- proc.kill needs a start time ----
local function test_kill_needs_start()
	local p = proc.spawn { argv = { "sleep", "30" } }
	for _, st in ipairs({ 0, -1 }) do
		t.raises(function() proc.kill(p:pid(), st, 9, 0) end, "no start time",
			"proc.kill with start time " .. st .. " refuses")
	end
	t.ok(p:alive(), "and the process with that pid lives")
	t.ok(proc.kill(p:pid(), proc.starttime(p:pid()), 9, 2), "with its start time it is killed")
	t.ok(p:wait(5), "(gone)")
	p:close()
end

-- ---- proc.run with a child that closed stdout and stderr ----
local function test_run_closed_output()
	local t0 = runtime.now()
	local r = proc.run({ "sh", "-c", "exec >&- 2>&-; sleep 30" }, { timeout = 1 })
	t.is(r.timed_out, true, "proc.run: the timeout holds when the child closed its output")
	t.is(r.signal, 9, "the child was killed")
	t.diag(string.format("returned after %.1f s", runtime.now() - t0))
	r = proc.run({ "sh", "-c", "exec >&- 2>&-; exit 3" }, { timeout = 10 })
	t.same({ r.status, r.timed_out }, { 3, false }, "a child that closed its output and exits: its status")

	-- Ctrl-C: a fireclaw in such a proc.run (no timeout) ends on SIGINT
	local marker = tmp .. "/started"
	local code = string.format([[require("fireclaw.proc").run({"sh", "-c", "echo > %s; exec >&- 2>&-; exec sleep 29.5"})]],
		marker)
	local p = proc.spawn { argv = { FIRECLAW, "-e", code }, stdout = "/dev/null", stderr = "/dev/null" }
	t.ok(wait_until(function() return fs.exists(marker) end, 20), "the child runs")
	p:kill(2)
	local st = p:wait(10)
	t.is(st and st.status, 130, "SIGINT ends fireclaw while its child runs on with closed output")
	p:close()
	-- the sleep went with it (proc.run's child dies with fireclaw: PR_SET_PDEATHSIG)
	t.ok(wait_until(function()
		return not proc.run({ "pgrep", "-fx", "sleep 29.5" }).stdout:match("%d")
	end, 10), "and its child is gone")
end

-- ---- FIRECLAW_EXEC_TAG from the user's env ----
local function test_exec_tag()
	local ok, server = pcall(require, "ssh_server")
	if not ok then return t.skip("no ssh test server: " .. tostring(server)) end
	local lab = server.lab()
	local pass, err = pcall(function()
		local ssh = require "fireclaw.ssh"
		local d = lab:dropbear { port = 22 }
		local s = ssh.connect(d:opts())
		local r = s:exec("sleep 31.5", { timeout = 1, env = { FIRECLAW_EXEC_TAG = "user" } })
		t.is(r.timed_out, true, "exec with env FIRECLAW_EXEC_TAG=user: timed out")
		t.ok(wait_until(function()
			return not proc.run({ "pgrep", "-fx", "sleep 31.5" }).stdout:match("%d")
		end, 5), "and the command was still killed (the user cannot replace the kill tag)")
		r = s:exec([[printf %s "$FIRECLAW_EXEC_TAG"]], { env = { FIRECLAW_EXEC_TAG = "user" } })
		t.like(r.stdout, "^%x+$", "the command sees fireclaw's tag, not the user's")
		s:close()
	end)
	lab:close()
	if not pass then t.ok(false, "exec tag tests ran", err) end
end

-- ---- interface names never reach nft unless plain ----
local function test_ifnames()
	local ns = "fct-holes-none-" .. proc.getpid() -- never created
	for _, name in ipairs({ 'a"b', "x;y", "v{0}", "a\nb", "a b", "veth'0", "0123456789abcdef", ".", "" }) do
		t.raises(function() net.egress_enable(ns, { ifname = name }) end, "bad interface name",
			"egress ifname " .. string.format("%q", name) .. " refused")
		t.raises(function() net.egress_enable(ns, { uplink_ifname = name }) end, "bad interface name",
			"egress uplink_ifname " .. string.format("%q", name) .. " refused")
	end
	t.raises(function() net.tap_create(ns, { name = 'tap"0' }) end, "bad interface name",
		"tap_create refuses a quote")
	-- plain names get past the check (and fail on the missing namespace)
	local ok, err = pcall(net.egress_enable, ns, { ifname = "veth_0.a-b", uplink_ifname = "fcv-1" })
	t.ok(not ok and not tostring(err):find("bad interface name"), "a plain name passes the check", err)
end

-- ---- a stale record that cannot be reaped ----
local function test_unreapable_record()
	local config = require "fireclaw.config"
	local json = require "fireclaw.json"
	local state = require "fireclaw.state"
	local run = tmp .. "/run"
	config.run_dir, config.netns_prefix = run, "fct-holes-"
	runtime.quiet = true -- reap_stale's note
	local function record(id)
		local dir = run .. "/vms/" .. id
		fs.mkdir_p(dir, "700")
		-- no owner: stale
		fs.write(dir .. "/record.json", json.encode({ id = id, netns = "fct-holes-" .. id, created = 1 }), "600")
		return dir
	end
	local stuck, fine, busy = record("aaaaaa"), record("bbbbbb"), record("cccccc")
	fs.write(stuck .. "/pinned", "x", "600")
	local ok = proc.run({ "chattr", "+i", stuck .. "/pinned" }).status == 0
	if not ok then return t.skip("chattr +i does not work on " .. tmp) end
	fs.mkdir_p(busy .. "/mnt", "700")
	local mounted = proc.run({ "mount", "-t", "tmpfs", "fct-holes", busy .. "/mnt" }).status == 0
	local pass, err = pcall(function()
		local lives, reaped, failed = pcall(state.reap_stale)
		t.ok(lives, "reap_stale does not raise on records it cannot remove", reaped)
		t.same(reaped, { "bbbbbb" }, "the other stale VM is reaped")
		local ids = {}
		for _, f in ipairs(type(failed) == "table" and failed or {}) do ids[#ids + 1] = f.id end
		table.sort(ids)
		t.same(ids, mounted and { "aaaaaa", "cccccc" } or { "aaaaaa" },
			"the immutable file's and the busy mount's are returned as failed")
		t.ok(fs.exists(stuck) and not fs.exists(fine), "(directories)")
		if mounted then proc.run({ "umount", busy .. "/mnt" }) end
		-- (cwd: not a directory with a recipes/ of its own)
		local env = { FIRECLAW_RUN = run, FIRECLAW_NETNS_PREFIX = "fct-holes-" }
		local r = proc.run({ FIRECLAW, "cleanup" }, { env = env, cwd = tmp, timeout = 60 })
		t.is(r.status, 1, "cleanup exits 1 while a VM cannot be reaped")
		t.like(r.stderr, "VM aaaaaa cannot be reaped: .*Operation not permitted", "and says which and why")
		proc.run({ "chattr", "-i", stuck .. "/pinned" })
		r = proc.run({ FIRECLAW, "cleanup" }, { env = env, cwd = tmp, timeout = 60 })
		t.is(r.status, 0, "once released, cleanup reaps it")
		t.ok(not fs.exists(stuck), "(gone)")
	end)
	proc.run({ "chattr", "-i", stuck .. "/pinned" })
	if mounted then proc.run({ "umount", busy .. "/mnt" }) end
	runtime.quiet = false
	if not pass then t.ok(false, "stale record tests ran", err) end
end

-- each group on its own: one that raises does not hide the others
for _, group in ipairs({ { "capped logs", test_capped_logs }, { "proc.kill", test_kill_needs_start },
	{ "proc.run", test_run_closed_output }, { "exec tag", test_exec_tag },
	{ "interface names", test_ifnames }, { "stale records", test_unreapable_record } }) do
	local ok, err = xpcall(group[2], debug.traceback)
	if not ok then t.ok(false, group[1] .. ": tests ran to the end", err) end
end
proc.run({ "chattr", "-R", "-i", tmp })
proc.run({ "rm", "-rf", tmp })
return t.done()
