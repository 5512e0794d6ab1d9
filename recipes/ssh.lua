-- OpenSSH into a kept VM, host key pinned (for tools that want real ssh): ssh ID|NAME [ARGS…]
--
-- OpenSSH's ssh, inside the VM's network namespace, with fireclaw's client key and the
-- guest's host key pinned (a known_hosts file in the VM's directory; never "accept any").
local cli = require "fireclaw.cli"
local config = require "fireclaw.config"
local fs = require "fireclaw.fs"
local sandbox = require "fireclaw.sandbox"
local ssh = require "fireclaw.ssh"

local function main(args)
	local _, rest = cli.parse(args, { usage = "fireclaw ssh ID|NAME [SSH ARGS…]",
		about = "ssh into kept VM ID (or NAME) with OpenSSH (host key pinned)." })
	local ref = table.remove(rest, 1)
	if not ref then cli.usage_error("ssh needs a VM id or name (see fireclaw ps)") end
	if rest[1] == "--" then table.remove(rest, 1) end
	local rec = sandbox.find_kept(ref, "ssh into")
	local img = require("fireclaw.image").load(rec.image)
	local known = rec.dir .. "/known_hosts"
	fs.write(known, config.net.guest_ip .. " " .. img.host_key .. "\n", "600")
	local argv = { "ip", "netns", "exec", rec.netns, "ssh", "-i", img.client_key, "-o", "UserKnownHostsFile=" .. known,
		"-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
		"-o", "LogLevel=ERROR", "root@" .. config.net.guest_ip }
	for _, a in ipairs(rest) do argv[#argv + 1] = a end
	local a, b, c = os.execute(ssh.quote(argv))
	if type(a) == "number" then return a > 255 and math.floor(a / 256) or a end -- Lua 5.1: the wait status
	if b == "exit" then return c end
	return 128 + (c or 0)
end

return cli.recipe({}, main, ...)
