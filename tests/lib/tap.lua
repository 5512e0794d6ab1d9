-- tap.lua: a tiny TAP producer for fireclaw's Lua tests.
--   local t = require "tap"
--   t.ok(cond, "name"); t.is(got, want, "name"); t.like(str, pattern, "name")
--   t.raises(fn, pattern, "name") -- fn must raise an error matching pattern
--   t.skip("reason"); t.done()  -- prints the plan; exit status 1 if anything failed
local M = {}
local n, failed = 0, 0

local function report(pass, name, diag)
	n = n + 1
	io.write(pass and "ok " or "not ok ", n, " - ", name or "", "\n")
	if not pass then
		failed = failed + 1
		-- the first frame outside this file (tail calls hide some levels)
		local level, info = 2
		repeat
			info = debug.getinfo(level, "Sl")
			level = level + 1
		until not info or not info.short_src:find("tap%.lua$")
		info = info or { short_src = "?", currentline = 0 }
		io.write("#   at ", info.short_src, ":", info.currentline, "\n")
		if diag then io.write("#   ", (tostring(diag):gsub("\n", "\n#   ")), "\n") end
	end
	io.flush()
	return pass
end

function M.ok(cond, name, diag) return report(not not cond, name, diag) end

local function show(v)
	if type(v) == "string" then return string.format("%q", v) end
	return tostring(v)
end

function M.is(got, want, name)
	return report(got == want, name, "got:  " .. show(got) .. "\nwant: " .. show(want))
end

function M.isnt(got, notwant, name)
	return report(got ~= notwant, name, "got: " .. show(got))
end

function M.like(s, pattern, name)
	return report(type(s) == "string" and s:find(pattern) ~= nil, name,
		"got:  " .. show(s) .. "\nlike: " .. pattern)
end

-- deep comparison of plain values and tables
local function deq(a, b)
	if type(a) ~= type(b) then return false end
	if type(a) ~= "table" then return a == b end
	for k, v in pairs(a) do if not deq(v, b[k]) then return false end end
	for k in pairs(b) do if a[k] == nil then return false end end
	return true
end
M.deep_equal = deq

function M.same(got, want, name)
	local json = require "fireclaw.json"
	local function enc(v) local ok, s = pcall(json.encode, v); return ok and s or tostring(v) end
	return report(deq(got, want), name, "got:  " .. enc(got) .. "\nwant: " .. enc(want))
end

function M.raises(fn, pattern, name)
	local ok, err = pcall(fn)
	if ok then return report(false, name, "no error raised") end
	err = type(err) == "table" and tostring(err.message) or tostring(err)
	return report(err:find(pattern) ~= nil, name, "error: " .. err .. "\nlike:  " .. pattern)
end

function M.lives(fn, name)
	local ok, err = pcall(fn)
	return report(ok, name, err)
end

function M.skip(reason)
	n = n + 1
	io.write("ok ", n, " # skip ", reason, "\n")
end

function M.diag(...)
	io.write("# ", table.concat({...}, " "), "\n")
end

function M.done()
	io.write("1..", n, "\n")
	io.flush()
	return failed == 0 and 0 or 1
end

return M
