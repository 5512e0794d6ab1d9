-- entropy_api.lua SNAP: two VMs restored from snapshot SNAP through the Lua API alone
-- (restore.restore, no run recipe), each asked at once for 16 random bytes, a UUID and its
-- clock. Prints, per VM, "vm I RANDHEX UUID GUEST_TIME HOST_BEFORE HOST_AFTER" (times in
-- seconds with microseconds; HOST_* taken around that exec), for tests/hostile_entropy.sh.
-- The first VM is restored through the agent (its hand-off), the second over SSH (exec =
-- "ssh": the helper's reseed). On the second VM, sb:reseed() again with a failing helper ("failing helper: ERROR") and as
-- for an image without one ("no helper: ok GUEST_SECONDS HOST_SECONDS", a note on stderr).
local cli = require "fireclaw.cli"
local sandbox = require "fireclaw.sandbox"
local sys = require "fireclaw.sys"

local restore = cli.use "restore"

local function now()
	local sec, nsec = sys.clock_gettime(sys.CLOCK.REALTIME)
	return sec + math.floor(nsec / 1e3) / 1e6
end

local PROBE = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; cat /proc/sys/kernel/random/uuid; "
	.. "adjtimex | awk '/tv_sec/ { s = $2 } /tv_usec/ { u = $2 } END { printf \"%d.%06d\\n\", s, u }'"

local snap, why = restore.find { snapshot = arg[1] }
if not snap then
	print("no snapshot: " .. tostring(why))
	return 1
end
for i = 1, 2 do
	-- the first through the agent's hand-off, the second over SSH (the helper's reseed,
	-- whose failures it checks)
	local sb = restore.restore({ exec = i == 2 and "ssh" or nil }, snap)
	sandbox.with(sb, function()
		local t0 = now()
		local r = sb:exec(PROBE)
		local t1 = now()
		local rand, uuid, gt = r.stdout:match("^(%x+)\n(%S+)\n([%d.]+)\n$")
		print(string.format("vm %d %s %s %s %.6f %.6f", i, tostring(rand), tostring(uuid), tostring(gt), t0, t1))
		if i == 2 then
			-- a helper that fails: the reseed raises (a run stops there)
			sb:exec("printf '#!/bin/sh\\necho broken >&2; exit 1\\n' >/tmp/broken && chmod 755 /tmp/broken"
				.. " && mount --bind /tmp/broken /usr/sbin/fireclaw-guest")
			local ok, err = pcall(sb.reseed, sb)
			print("failing helper: " .. (ok and "no error" or tostring(err)))
			-- an image without the helper (imported, older): bytes mixed in, whole seconds, a note
			sb:exec("date -s @1000000000 >/dev/null")
			sb.img = setmetatable({ guest = {} }, { __index = sb.img })
			ok, err = pcall(sb.reseed, sb)
			local r2 = sb:exec("date +%s")
			print(string.format("no helper: %s %s %d", ok and "ok" or tostring(err), r2.stdout:match("%d+"), os.time()))
		end
	end)
end
return 0
