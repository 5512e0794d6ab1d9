-- Cold boot a VM from an image and wait until SSH answers (half of `run`)
--
-- As a library (cli.use "coldboot"): coldboot.boot(opts [, steps]) -> a sandbox ready for
-- exec; steps: sandbox.steps.coldboot(), edited (insert_after, swap, remove), by default as is.
-- Alone: boots, prints the stage times, runs CMD if one is given, and destroys the VM
-- (or keeps it with --keep).
local cli = require "fireclaw.cli"
local opts_check = require "fireclaw.opts"
local sandbox = require "fireclaw.sandbox"

local M = {}

-- opts: image, vcpu, mem_mib, vmm, accel, keep, boot_timeout (s), cpus (CPU limit),
-- disk (root disk size, "2G": the copy and its ext4 are grown before the VMM starts),
-- unsafe_no_jailer (Firecracker may run as root when no jailer is found).
-- The steps (sandbox.steps.coldboot): network (namespace fc-<id> with tap0), disk (this
-- VM's own copy of the image's disk, grown to opts.disk), cgroup (its limits), boot (the
-- VMM boots the kernel), connect (until the guest's sshd answers, pinned host key).
function M.boot(opts, steps)
	opts = opts_check.check("coldboot.boot", opts, sandbox.OPTIONS)
	return sandbox.build(opts, steps or sandbox.steps.coldboot())
end

local function main(args)
	local opts, cmd = cli.parse(args, {
		usage = "fireclaw coldboot [options] [-- CMD [ARGS…]]",
		about = "Cold boot a VM, print where the time went, run CMD if given, destroy the VM.",
		{ "--image NAME", "image to boot", default = "default" },
		{ "--vcpu N", "vCPUs", type = "number", default = 1 },
		{ "--mem MIB", "memory in MiB", type = "number", default = 256 },
		{ "--cpus N", "limit the VM to N CPUs' worth of time (fractions allowed: 0.5)", type = "number" },
		{ "--disk SIZE", "grow the VM's root disk to SIZE (e.g. 512M, 2G; sparse, never shrunk)" },
		{ "--vmm NAME", "auto, firecracker or qemu (default: $FIRECLAW_VMM, else auto)" },
		{ "--keep", "leave the VM running (remove it with fireclaw rm ID)" },
		{ "--unsafe-no-jailer", "let Firecracker run as root when no jailer is found (not confined)" },
		{ "--boot-timeout S", "how long to wait for the guest's agent or SSH", type = "number", default = 60 },
		{ "-v, --verbose", "progress lines" },
	})
	if opts.cpus and (opts.cpus < 0.01 or opts.cpus > 1024) then
		cli.usage_error("--cpus must be 0.01 to 1024, got %s", opts.cpus)
	end
	if opts.disk then
		local ok, err = sandbox.disk_bytes(opts.disk)
		if not ok then cli.usage_error("--disk: %s", err) end
	end
	local sb = M.boot { image = opts.image, vcpu = opts.vcpu, mem_mib = opts.mem, vmm = opts.vmm, keep = opts.keep,
		boot_timeout = opts.boot_timeout, cpus = opts.cpus, disk = opts.disk, unsafe_no_jailer = opts.unsafe_no_jailer }
	return sandbox.with(sb, function()
		io.stderr:write(sb:stage_report())
		local status = #cmd > 0 and sb:exec_streaming(cmd) or 0
		if opts.keep then io.stderr:write(sb:reach_hint()) end
		return status
	end)
end

return cli.recipe(M, main, ...)
