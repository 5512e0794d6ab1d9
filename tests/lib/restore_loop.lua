-- restore_loop.lua N [WIDTH]: N VMs restored from the default snapshot inside this one
-- fireclaw process, WIDTH of them alive at a time, each running a command. Prints
--   failures F          runs that did not restore, run or answer as expected (+ why)
--   fds A B             open fds after the first round and at the end
--   rss A B             VmRSS (kB) after the first round and at the end (after a full GC)
-- so tests/faults_load.sh can check that nothing grows with the number of VMs.
local cli = require "fireclaw.cli"
local runtime = require "fireclaw.runtime"

local restore = cli.use "restore"

local n, width = tonumber(arg[1]) or 100, tonumber(arg[2]) or 1

local function fds() return #runtime.listdir("/proc/self/fd") end

local function rss()
	collectgarbage("collect")
	collectgarbage("collect")
	local f = assert(io.open("/proc/self/status"))
	local s = f:read("*a")
	f:close()
	return tonumber(s:match("VmRSS:%s*(%d+)"))
end

local snap, why = restore.find {}
if not snap then
	print("failures " .. n .. " (no snapshot: " .. tostring(why) .. ")")
	return 1
end

local failures, done = 0, 0
local function round(k)
	local sbs = {}
	local ok, err = pcall(function()
		for i = 1, k do sbs[i] = restore.restore({}, snap) end
		for i, sb in ipairs(sbs) do
			local want = string.format("vm %d of round %d\n", i, done)
			local r = sb:exec({ "printf", "vm %d of round %d\\n", tostring(i), tostring(done) })
			if r.status ~= 0 or r.stdout ~= want then
				failures = failures + 1
				io.stderr:write(string.format("run %d: status %s, stdout %q\n", done + i, tostring(r.status), r.stdout))
			end
		end
	end)
	for _, sb in ipairs(sbs) do sb:destroy() end
	if not ok then
		failures = failures + k
		io.stderr:write("round " .. done .. ": " .. tostring(err) .. "\n")
	end
	done = done + k
end

round(width) -- the first round loads what stays loaded (modules, libssh2, QEMU probe)
local rss0 = rss() -- a full GC first: what the GC would free is not a leak
local fds0 = fds()
while done < n do round(math.min(width, n - done)) end
local rss1 = rss()
local fds1 = fds()
print("failures " .. failures)
print("fds " .. fds0 .. " " .. fds1)
print("rss " .. rss0 .. " " .. rss1)
return failures == 0 and 0 or 1
