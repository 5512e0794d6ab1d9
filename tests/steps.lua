-- Named steps and the cleanup stack (fireclaw.sandbox): the list API and its misuse; a
-- step whose run fails (the earlier undos run, the error names the step); an undo that
-- fails (the others still run, destroy reports it); and the example in docs/lua-api.md,
-- run as it is on a real VM (QEMU): the inserted step runs after its neighbour, its undo
-- runs first at teardown, nothing is left behind.
local t = require "tap"
local fs = require "fireclaw.fs"
local net = require "fireclaw.net"
local proc = require "fireclaw.proc"
local sys = require "fireclaw.sys"

local tests = os.getenv("FIRECLAW_TESTS") or "tests"
local fc = os.getenv("FIRECLAW") or "./fireclaw"
local tmp = proc.run({ "mktemp", "-d", "/tmp/fct-steps-XXXXXX" }).stdout:gsub("%s+$", "")
local prefix = "fc-" .. (os.getenv("FIRECLAW_TEST_TAG") or "") .. "stp"
-- a private run dir and namespace prefix (read by fireclaw.config when it is loaded)
sys.setenv("FIRECLAW_RUN", tmp .. "/run")
sys.setenv("FIRECLAW_NETNS_PREFIX", prefix)
sys.setenv("FIRECLAW_VMM", "qemu")

local sandbox = require "fireclaw.sandbox"
local state = require "fireclaw.state"

local function left()
	local out = {}
	for _, n in ipairs(net.netns_list(prefix)) do out[#out + 1] = n end
	for _, d in ipairs(require("fireclaw.runtime").listdir(tmp .. "/run/vms") or {}) do out[#out + 1] = d end
	return table.concat(out, " ")
end

local function finally()
	for _, rec in ipairs(state.list()) do pcall(state.reap, rec) end
	proc.run({ "rm", "-rf", tmp })
end

-- ---- the list API (no VM) ----
local s = sandbox.steps.coldboot()
t.is(table.concat(s:names(), " "), "network disk cgroup boot connect", "coldboot: the steps, in order")
local r = sandbox.steps.restore({ dir = "/nonexistent", disk = "/nonexistent/disk.ext4" })
t.is(table.concat(r:names(), " "), "network disk cgroup restore connect reseed", "restore: the steps, in order")
t.raises(function() sandbox.steps.restore() end, "snap must be a snapshot", "restore's steps need a snapshot")
local noop = function() end
s:insert_after("boot", { name = "a", run = noop })
s:insert_before("boot", { name = "b", run = noop })
s:append({ name = "z", run = noop })
t.is(table.concat(s:names(), " "), "network disk cgroup b boot a connect z", "insert_after, insert_before, append")
s:swap("a", { name = "a2", run = noop })
s:remove("b")
t.is(table.concat(s:names(), " "), "network disk cgroup boot a2 connect z", "swap (a new name), remove")
t.ok(s:has("a2") and not s:has("a"), "has")
t.raises(function() s:insert_after("nope", { name = "x", run = noop }) end,
	"no step named 'nope' %(there are: network, disk", "an unknown neighbour raises, naming the steps")
t.raises(function() s:remove("nope") end, "no step named 'nope'", "removing an unknown step raises")
t.raises(function() s:append({ name = "boot", run = noop }) end, "a step named 'boot' already", "a name twice raises")
t.raises(function() s:append({ name = "x" }) end, "needs run = function", "a step without run raises")
t.raises(function() s:append({ name = "x", run = noop, udno = noop }) end, "unknown option 'udno'",
	"a misspelt key raises")
t.raises(function() s:swap("z", { name = "boot", run = noop }) end, "a step named 'boot' already",
	"swapping in a name that is there raises")
t.raises(function() sandbox.build({}, { { name = "x", run = noop } }) end, "must be a list from sandbox.steps",
	"build takes a steps list, not a plain table")

-- ---- real sandboxes: the image must be there ----
local image = require "fireclaw.image"
if not image.exists("default") then
	local b = proc.run({ fc, "-q", "image", "build" }, { timeout = 900 })
	if b.status ~= 0 then
		t.skip("no default image: " .. b.stderr)
		finally()
		return t.done()
	end
end

local ok, err = pcall(function()
	-- a step whose run fails: what the earlier steps made is undone, the error names it
	local events, sb = {}, nil
	local flow = sandbox.steps.list {
		{ name = "network", run = function(b) sb = b; b:network() end },
		{ name = "mark", run = function() events[#events + 1] = "mark run" end,
			undo = function(b) events[#events + 1] = "mark undo, netns " .. tostring(net.netns_exists(b.netns)) end },
		{ name = "explode", run = function() error("kaboom", 0) end,
			undo = function() events[#events + 1] = "explode undo" end },
		{ name = "never", run = function() events[#events + 1] = "never run" end },
	}
	local bok, berr = pcall(sandbox.build, {}, flow)
	t.ok(not bok, "a failing step fails build")
	t.is(tostring(berr), "sandbox: step 'explode': kaboom", "the error names the step")
	t.is(table.concat(events, "; "), "mark run; mark undo, netns true",
		"the earlier undo ran (before the network's), the failed step's and the later ones not")
	t.ok(sb and sb.destroyed and not net.netns_exists(sb.netns), "the network step was undone")
	t.is(left(), "", "nothing left after a failed step")

	-- a swapped-in library step that fails: named, with what failed
	local lib = sandbox.steps.coldboot()
	lib:swap("disk", { name = "disk", run = function(b) b:disk(tmp .. "/no-such-disk") end })
	local lok, lerr = pcall(sandbox.build, {}, lib)
	t.ok(not lok and tostring(lerr):match("^sandbox: step 'disk': ") and tostring(lerr):match("no%-such%-disk"),
		"a swapped-in step's error names it and says what failed", tostring(lerr))
	t.is(left(), "", "nothing left after a failed disk step")

	-- undos that fail: every other one still runs, destroy reports each, never raises
	events = {}
	local flow2 = sandbox.steps.list {
		{ name = "network", run = function(b) b:network() end },
		{ name = "first", run = noop, undo = function() events[#events + 1] = "first" end },
		{ name = "broken", run = noop, undo = function() error("undo broke", 0) end },
		{ name = "broken2", run = noop, undo = function() error("again", 0) end },
		{ name = "last", run = noop, undo = function() events[#events + 1] = "last" end },
	}
	local sb2 = sandbox.build({}, flow2)
	t.is(table.concat(sb2.steps, " "), "network first broken broken2 last", "sb.steps: what build ran")
	local dok, failures = sb2:destroy()
	t.is(dok, nil, "destroy says it failed")
	t.same(failures, { "broken2: again", "broken: undo broke" }, "each failure, as 'step: error', last step first")
	t.is(table.concat(events, " "), "last first", "the other undos ran, in reverse")
	t.ok(not net.netns_exists(sb2.netns), "the network was still undone")
	t.is(left(), "", "nothing left after failing undos")
	t.is(sb2:destroy(), true, "destroy twice: nothing more to do")

	-- the example in docs/lua-api.md, as it is, on a real VM
	local doc = fs.read(tests .. "/../docs/lua-api.md") or ""
	local code = doc:match("```lua\n(%-%- steps example:.-)```")
	t.ok(code, "docs/lua-api.md has the steps example")
	local ex = tmp .. "/steps_example.lua"
	fs.write(ex, code or "error('no example')", "600")
	local res = proc.run({ fc, ex }, { cwd = tmp, timeout = 300 })
	t.is(res.status, 0, "the example runs", res.stderr)
	t.is(res.stdout, "network disk cgroup boot connect warmup\ntrue\ntrue\n",
		"the step ran after connect; every undo succeeded")
	local got = fs.read(tmp .. "/started.txt")
	t.ok(got and got:match("%d"), "its undo ran while the session was still open (first, before connect's)")
	t.is(left(), "", "nothing left after the example")
end)
t.ok(ok, "no unexpected error", tostring(err))
finally()
return t.done()
