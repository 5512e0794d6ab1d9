-- Print a VM's console log (-f: keep following it until the VM is gone)
--
-- The console is the guest's: on a terminal, its escape sequences and control bytes are
-- shown as '?' (a guest must not drive your terminal); into a pipe it is passed as is.
local cli = require "fireclaw.cli"
local runtime = require "fireclaw.runtime"
local state = require "fireclaw.state"
local sys = require "fireclaw.sys"

local CHUNK = 65536

local function main(args)
	local o, ref = cli.parse_vm(args, { usage = "fireclaw logs [-f] ID|NAME",
		about = "Print the console log of VM ID (or NAME).",
		{ "-f, --follow", "keep printing what the console adds until the VM is gone" } })
	state.reap_expired()
	local rec = state.find(ref)
	if not rec then error(string.format("no VM '%s' (see fireclaw ps)", ref), 0) end
	local tty = sys.isatty(1)
	local path, pos = rec.dir .. "/console.log", 0
	local function pump()
		local f = io.open(path, "rb")
		if not f then return false end
		local size = f:seek("end")
		if size < pos then pos = 0 end -- the capped log was rewritten
		f:seek("set", pos)
		while true do
			local data = f:read(CHUNK)
			if not data then break end
			pos = pos + #data
			if tty then data = data:gsub("\27", "?"):gsub("[%z\1-\8\11\12\14-\31\127]", "?") end
			io.stdout:write(data)
		end
		io.stdout:flush()
		f:close()
		return true
	end
	if not pump() then error(string.format("VM %s has no console log", rec.id), 0) end
	while o.follow and state.find(rec.id) do
		runtime.sleep(0.2)
		if not pump() then break end
	end
	return 0
end

return cli.recipe({}, main, ...)
