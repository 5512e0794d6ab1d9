-- C primitives keep the strings they read out of Lua tables alive until they are done:
-- a pointer from lua_tostring is valid only while its stack slot holds the string, a
-- number is converted in that slot only, and a string made by __index is referenced by
-- nothing else. Each case lets Lua code run a full GC in the middle of a primitive (an
-- __index on the options table) and then reuses the freed memory with other strings.
local t = require "tap"
local proc = require "fireclaw.proc"
local ssh = require "fireclaw.ssh"

-- free every unreferenced string, then fill the memory with strings of the same sizes
local function churn()
	collectgarbage("collect")
	collectgarbage("collect")
	local junk = {}
	for i = 1, 20000 do junk[i] = string.format("%.1f", 3e6 + i + 0.5) end
	for i = 1, 2000 do junk[#junk + 1] = "/junk" .. string.rep("/x", 1500) .. i end
end

-- an option made up by __index (referenced by nothing), used after another option
-- lookup ran the GC
local opts = setmetatable({}, { __index = function(_, k)
	if k == "cwd" then return "/tmp" .. string.rep("/.", 1500) end
	churn()
end })
local ok, r = pcall(proc.run, { "/bin/pwd" }, opts)
t.ok(ok and r.status == 0, "proc.run: an option string from __index survives a GC in the same call", tostring(r))
t.is(ok and r.stdout, "/tmp\n", "... and is the string that was given")

-- numbers where a string option is expected: refused, not converted in a slot that is
-- popped (the pointer would outlive the string)
t.raises(function() proc.run({ "/bin/true" }, { cwd = 12345 }) end, "option 'cwd': string expected, got number",
	"proc.run: a number for a string option is refused")
t.raises(function() proc.run({ "/bin/true" }, { stdin = 42 }) end, "option 'stdin': string expected, got number",
	"proc.run: stdin must be a string")
t.raises(function() proc.spawn({ argv = { "/bin/true" }, stdout = 1 }) end, "option 'stdout': string expected, got number",
	"proc.spawn: a number for a path option is refused")

-- numbers in argv and env are fine: converted into strings kept with their table
local argv, want = { "/bin/echo" }, {}
for i = 1, 200 do
	argv[#argv + 1] = 1e6 + i + 0.5
	want[#want + 1] = tostring(1e6 + i + 0.5)
end
r = proc.run(argv, setmetatable({}, { __index = function() churn() end }))
t.is(r.stdout, table.concat(want, " ") .. "\n", "proc.run: numbers in argv arrive as their text, GC or not")
r = proc.run({ "/bin/sh", "-c", 'echo "$N"' }, { env = { N = 1.5 } })
t.is(r.stdout, "1.5\n", "proc.run: a number in env arrives as its text")
t.raises(function() proc.run({ "/bin/true" }, { env = { [1] = "x" } }) end,
	"proc: env: variable names must be strings, got number", "proc.run: a number as a variable name is refused")
t.raises(function() proc.run({ "/bin/true" }, { env = { X = {} } }) end, "proc: env X: string expected, got table",
	"proc.run: a table as a value is refused")
t.is(ssh.quote({ "echo", 1.5, "a b" }), "echo 1.5 'a b'", "ssh.quote: numbers in argv")
collectgarbage("setpause", 0)
collectgarbage("setstepmul", 100000)
local words, expect = {}, {}
for i = 1, 3000 do
	words[i] = 1e6 + i + 0.25
	expect[i] = tostring(1e6 + i + 0.25)
end
t.is(ssh.quote(words), table.concat(expect, " "), "ssh.quote: thousands of numbers under constant GC")
collectgarbage("setpause", 200)
collectgarbage("setstepmul", 200)

return t.done()
