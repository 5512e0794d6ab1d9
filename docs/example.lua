-- Boot once, run three commands, copy a file out, snapshot the VM
local cli = require "fireclaw.cli"
local sandbox = require "fireclaw.sandbox"
local coldboot = cli.use "coldboot"       -- the built-in recipes are libraries too
local snapshots = cli.use "snapshot"

local sb = coldboot.boot { image = "default", vcpu = 1, mem_mib = 256 }
return sandbox.with(sb, function()
	for _, cmd in ipairs { { "uname", "-r" }, { "sh", "-c", "echo hello > /root/out.txt" }, { "cat", "/etc/hostname" } } do
		local r = sb:exec(cmd)
		io.write(r.stdout)
	end
	sb:get("/root/out.txt", "out.txt")
	local meta = snapshots.take(sb, "example")
	print("snapshot in " .. meta.dir)
	return 0
end)
