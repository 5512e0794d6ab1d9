-- Start a kept, named VM and print its id (exec, cp, shell, pause, stop it later)
--
--   fireclaw start [--name N] [--ttl DURATION] [--snapshot S | --image I] [options]
-- The VM outlives this command: `fireclaw exec ID -- CMD` from any process (several at
-- once), `cp`, `shell`, `ssh`, `logs`, `pause`/`resume`, `snapshot create --from ID`,
-- `stop ID`. A VM whose --ttl has passed is removed by the next fireclaw command that
-- looks at VMs (start, exec, ps, …) and by `fireclaw cleanup`.
local cli = require "fireclaw.cli"
local image = require "fireclaw.image"
local json = require "fireclaw.json"
local log = require "fireclaw.log"
local runtime = require "fireclaw.runtime"

local run = cli.use "run"

local M = {}

-- "90", "90s", "15m", "2h", "1d" -> seconds; nil if it is not a duration.
function M.parse_duration(s)
	local n, unit = tostring(s):match("^(%d+%.?%d*)([smhd]?)$")
	n = tonumber(n)
	if not n or n <= 0 then return nil end
	return n * ({ [""] = 1, s = 1, m = 60, h = 3600, d = 86400 })[unit]
end

local SPEC = {
	usage = "fireclaw start [options]",
	about = "Start a kept VM and print its id; it runs until fireclaw stop ID (or its --ttl).",
	args = 0,
	{ "--name N", "a name to use instead of the id (unique)" },
	{ "--ttl DURATION", "remove the VM after this long: 90s, 15m, 2h, 1d" },
	{ "--image NAME", "image to run (default: the snapshot's with --snapshot, else default)" },
	{ "--snapshot NAME", "restore this snapshot (default: the image's)" },
	{ "--no-snapshot", "always cold boot" },
	{ "--vcpu N", "vCPUs (cold boot; a snapshot keeps its own)", type = "number", default = 1 },
	{ "--mem MIB", "memory in MiB (cold boot)", type = "number", default = 256 },
	{ "--cpus N", "limit the VM to N CPUs' worth of time", type = "number" },
	{ "--disk SIZE", "grow the root disk to SIZE (cold boot)" },
	{ "--vmm NAME", "auto, firecracker or qemu" },
	{ "--boot-timeout S", "how long to wait for the guest's SSH", type = "number", default = 60 },
	{ "--unsafe-no-jailer", "let Firecracker run as root when no jailer is found (not confined)" },
	{ "--json", "print {id, name, expires, boot, image, duration_ms}" },
	{ "-v, --verbose", "progress lines" },
}
-- --net, --allow, -p (fireclaw.netpolicy; checked by run.check_options), before --json
do
	local at = #SPEC - 1 -- (--json)
	for i, opt in ipairs(require("fireclaw.netpolicy").CLI) do table.insert(SPEC, at + i - 1, opt) end
end

local function main(args)
	local o = cli.parse(args, SPEC)
	o.sized = run.sized(args)
	if o.ttl then
		local ttl = M.parse_duration(o.ttl)
		if not ttl then cli.usage_error("--ttl wants a duration such as 90s, 15m, 2h or 1d, got '%s'", o.ttl) end
		o.ttl = ttl
	end
	if o.name and (not o.name:match("^%a[%w._-]*$") or #o.name > 64) then
		cli.usage_error("--name: a letter, then letters, digits, '.', '_' or '-' (at most 64), got '%s'", o.name)
	end
	if o.name and o.name:match("^%x%x%x%x%x%x$") then
		cli.usage_error("--name: '%s' looks like a VM id; choose another", o.name)
	end
	-- run's checks, with the options start does not have
	o.put, o.get, o.env, o.max_transfer, o.max_output = {}, {}, {}, "1G", 0
	run.check_options(o, { "true" })
	if not image.exists(o.image) then
		if o.image ~= "default" then error(string.format("image: no image named '%s'", o.image), 0) end
		log.note("no default image yet: building it (once)")
		image.build { name = "default" }
	end
	local t0 = runtime.now()
	o.keep = true
	local sb = run.start_vm(o)
	sb:release()
	local ms = math.floor((runtime.now() - t0) * 1000 + 0.5)
	if o.json then
		io.stdout:write(json.encode { id = sb.id, name = o.name or json.null, image = sb.img.name,
			expires = sb.rec.expires or json.null, boot = sb.how, duration_ms = ms, vmm = sb.vm.vmm }, "\n")
	else
		print(sb.id)
	end
	log.info("VM %s started (%s) in %d ms", sb.id, sb.how, ms)
	return 0
end

return cli.recipe(M, main, ...)
