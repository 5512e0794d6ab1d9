-- fireclaw.fs: mkdir_p's modes, and its {chmod_may_fail = true} variant (fireclaw.image's
-- state directories: one that exists and belongs to another user keeps its mode instead
-- of failing). Needs neither root nor a VM.
local t = require "tap"
local fs = require "fireclaw.fs"
local proc = require "fireclaw.proc"
local sys = require "fireclaw.sys"

local tmp = proc.run({ "mktemp", "-d" }).stdout:gsub("%s+$", "")

local function mode(path)
	return proc.run({ "stat", "-c", "%a", path }).stdout:gsub("%s+$", "")
end

local ok, err = pcall(function()
	fs.mkdir_p(tmp .. "/a/b/c", "700")
	t.ok(fs.is_dir(tmp .. "/a/b/c"), "mkdir_p makes every level")
	t.is(mode(tmp .. "/a/b/c"), "700", "... the last one with the mode given")
	fs.mkdir_p(tmp .. "/a/b/c", "750")
	t.is(mode(tmp .. "/a/b/c"), "750", "mkdir_p of an existing directory sets its mode")
	fs.mkdir_p(tmp .. "/a/b/c", "711", { chmod_may_fail = true })
	t.is(mode(tmp .. "/a/b/c"), "711", "chmod_may_fail: the mode is still set where it can be")
	-- a directory whose mode nobody may change, root included: /proc/PID
	local pdir = "/proc/" .. sys.getpid()
	t.raises(function() fs.mkdir_p(pdir, "700") end, "^fs: chmod /proc/%d+: ",
		"mkdir_p raises when the chmod fails")
	t.lives(function() fs.mkdir_p(pdir, "700", { chmod_may_fail = true }) end,
		"chmod_may_fail: a directory that cannot be chmodded is left as it is")
	t.raises(function() fs.mkdir_p(tmp .. "/x", "700", { chmod = true }) end,
		"fs.mkdir_p: unknown option 'chmod'", "mkdir_p: an unknown option raises")
	fs.write(tmp .. "/file", "x")
	t.raises(function() fs.mkdir_p(tmp .. "/file/sub", "700", { chmod_may_fail = true }) end,
		"^fs: mkdir " .. tmp:gsub("%p", "%%%0") .. "/file/sub: ", "chmod_may_fail: a failing mkdir still raises")
end)
if not ok then t.ok(false, "fs tests raised: " .. tostring(err)) end
proc.run({ "rm", "-rf", "--", tmp })
return t.done()
