-- Restore a VM from a snapshot and wait until SSH answers (the fast half of `run`)
--
-- As a library (cli.use "restore"):
--   restore.find(opts) -> snapshot meta, or nil and why it cannot be used
--   restore.restore(opts, snap [, steps]) -> a sandbox ready for exec (reseeded, clock set:
--     unique); steps: sandbox.steps.restore(snap), edited, by default as is
-- Alone: restores, prints the stage times, runs CMD if given, destroys the VM.
local cli = require "fireclaw.cli"
local fs = require "fireclaw.fs"
local image = require "fireclaw.image"
local opts_check = require "fireclaw.opts"
local sandbox = require "fireclaw.sandbox"
local snapshot = require "fireclaw.snapshot"
local vm = require "fireclaw.vm"

local M = {}

-- The options of find and restore: a sandbox's, and which snapshot (default: the image's).
local function check(where, opts)
	return opts_check.check(where, opts, sandbox.OPTIONS, { "snapshot" })
end

-- A restore keeps its snapshot's disk (the saved memory knows that filesystem): a `disk`
-- size other than the snapshot's cannot be had from it. Why not, or nil.
local function disk_mismatch(opts, snap)
	if opts.disk == nil then return nil end
	local want, err = sandbox.disk_bytes(opts.disk)
	if not want then return "sandbox: " .. err end
	-- (what snapshot.load checked against meta.json; a hand-made snap: the file itself)
	local f = type(snap.files) == "table" and snap.files["disk.ext4"]
	local have = type(f) == "table" and f.size or fs.size(snap.disk or "")
	if not have then return string.format("restore: snapshot '%s' has no disk.ext4", tostring(snap.name)) end
	if want == have then return nil end
	return string.format("snapshot '%s' cannot be used: its disk is %s, not %s (a restored VM keeps its snapshot's "
		.. "disk; make one with: fireclaw snapshot create --disk %s%s)", snap.name, sandbox.human_size(have),
		sandbox.human_size(want), type(opts.disk) == "string" and opts.disk or string.format("%dM", want / 2 ^ 20),
		snap.name ~= snap.image and " --name " .. snap.name or "")
end

-- The snapshot to restore for these options, if there is a usable one. opts.detected:
-- the run's vm.choose result (else it is made here); a VMM choice that cannot work raises.
function M.find(opts)
	opts = check("restore.find", opts)
	local img = image.load(opts.image or "default")
	local snap, why = snapshot.load(opts.snapshot or img.name)
	if not snap then return nil, why end
	local d = opts.detected
	if not d or d.versions == false then
		d = vm.choose { vmm = opts.vmm, accel = opts.accel, cmdline_devices = img.cmdline_devices,
			unsafe_no_jailer = opts.unsafe_no_jailer }
	end
	local version = d.vmm == "firecracker" and d.firecracker_version or d.qemu_version
	local ok, reason = snapshot.compatible(snap, img, d.vmm, version, d.accel, d.accel_source)
	if not ok then return nil, string.format("snapshot '%s' cannot be used: %s", snap.name, reason) end
	local mismatch = disk_mismatch(opts, snap)
	if mismatch then return nil, mismatch end
	return snap
end

-- The steps (sandbox.steps.restore): network (namespace fc-<id> with tap0, the same
-- addresses and MACs), disk (this clone's own copy of the snapshot-time disk), cgroup,
-- restore (a fresh VMM loads device state + memory, copy-on-write), connect (the guest's
-- sshd, running since the snapshot), reseed (fresh host entropy, CRNG reseeded, clock set).
function M.restore(opts, snap, steps)
	opts = check("restore.restore", opts)
	if type(snap) ~= "table" or not snap.dir then
		error("restore.restore: snap must be a snapshot from restore.find or snapshot.load", 0)
	end
	local why = disk_mismatch(opts, snap)
	if why then error(why, 0) end
	local sbopts = {}
	for k, v in pairs(opts) do
		if k ~= "snapshot" then sbopts[k] = v end
	end
	return sandbox.build(sbopts, steps or sandbox.steps.restore(snap, { exec = opts.exec }))
end

local function main(args)
	local opts, cmd = cli.parse(args, {
		usage = "fireclaw restore [options] [-- CMD [ARGS…]]",
		about = "Restore a VM from a snapshot, print where the time went, run CMD if given, destroy it.",
		{ "--image NAME", "image", default = "default" },
		{ "--snapshot NAME", "snapshot (default: the image's)" },
		{ "--vmm NAME", "auto, firecracker or qemu (default: $FIRECLAW_VMM, else auto)" },
		{ "--keep", "leave the VM running (remove it with fireclaw rm ID)" },
		{ "--unsafe-no-jailer", "let Firecracker run as root when no jailer is found (not confined)" },
		{ "--boot-timeout S", "how long to wait for the guest's agent or SSH", type = "number", default = 60 },
		{ "-v, --verbose", "progress lines" },
	})
	local o = { image = opts.image, snapshot = opts.snapshot, vmm = opts.vmm, keep = opts.keep,
		boot_timeout = opts.boot_timeout, unsafe_no_jailer = opts.unsafe_no_jailer }
	-- once, for the snapshot check and the VM
	o.detected = vm.choose { vmm = o.vmm, cmdline_devices = image.load(o.image).cmdline_devices,
		unsafe_no_jailer = o.unsafe_no_jailer }
	local snap, why = M.find(o)
	if not snap then error(why .. " (create one with: fireclaw snapshot create)", 0) end
	local sb = M.restore(o, snap)
	return sandbox.with(sb, function()
		io.stderr:write(sb:stage_report())
		local status = #cmd > 0 and sb:exec_streaming(cmd) or 0
		if opts.keep then io.stderr:write(sb:reach_hint()) end
		return status
	end)
end

return cli.recipe(M, main, ...)
