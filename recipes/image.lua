-- Guest images: build the default one from Debian packages, import your own, list, info, rm
--
--   fireclaw image build [--name NAME] [--base busybox|debian] [--suite bookworm]
--                        [--packages python3,curl] [--size 256M] [--force]
--   fireclaw image import --oci PATH --name NAME [--size SIZE] [--force]
--   fireclaw image list
--   fireclaw image info [NAME]
--   fireclaw image rm NAME…
--   fireclaw image import --name NAME --kernel K --rootfs R [--initrd I] [--host-key PUB]
--                         [--boot-args "…"] [--cmdline-devices] [--net none|nat] [--no-agent]
--                         [--force]
--
-- The work is done by lua/fireclaw/image.lua; this file is the command line around it.
local cli = require "fireclaw.cli"
local config = require "fireclaw.config"
local image = require "fireclaw.image"
local json = require "fireclaw.json"
local runtime = require "fireclaw.runtime"

local args = { ... }

local USAGE = [[
usage: fireclaw image COMMAND [options]

Guest images live in $FIRECLAW_STATE/images (now: %s).

commands:
  build    build an image from Debian packages (kernel, initramfs, ext4 rootfs, keys)
  list     list the images
  info     print an image's manifest (JSON)
  rm       remove images
  import   import a container image (--oci: docker save tarball or OCI layout), or
           register your own kernel and rootfs as an image

'fireclaw image COMMAND --help' shows a command's options.
]]

local quiet_opt = { "-q, --quiet", "no progress lines on stderr" }

-- Creation times as `snapshot list` prints them: UTC, to the minute (the manifest has
-- 2026-01-02T03:04:05Z).
local function created(iso)
	local d, hm = tostring(iso):match("^(%d+%-%d+%-%d+)T(%d+:%d+)")
	return d and (d .. " " .. hm) or "?"
end

local commands = {}

function commands.build(argv)
	local opts = cli.parse(argv, {
		usage = "fireclaw image build [options]", args = 0,
		about = "Build a guest image from Debian packages: linux-image-cloud-amd64 (vmlinux + vmlinuz),\n"
			.. "an initramfs with the virtio modules, an ext4 rootfs with busybox + dropbear, the\n"
			.. "client key and a pinned host key. Cached: a second build with nothing changed does\n"
			.. "nothing. Needs root and apt access to a Debian repository.\n"
			.. "--base debian: a real Debian system instead (mmdebstrap minbase + --packages, installed\n"
			.. "with their maintainer scripts, from the host's apt mirror; cached), with fireclaw's\n"
			.. "guest side in /.fireclaw.",
		{ "--name NAME", "image name", default = config.image },
		{ "--base BASE", "busybox (small, fast; the default) or debian" },
		{ "--suite SUITE", "Debian suite for --base debian (default: " .. image.DEBIAN_SUITE .. ")" },
		{ "--packages LIST", "extra Debian packages (comma-separated, repeatable), with dependencies", multi = true },
		{ "--size SIZE", "rootfs size, e.g. 256M, 1G (default: 64M, more if the packages need it)" },
		{ "--kernel PKG", "kernel package", default = image.KERNEL_PACKAGE },
		{ "--force", "rebuild even if the image is up to date" },
		quiet_opt,
	})
	if opts.quiet then runtime.quiet = true end
	local packages = {}
	for _, list in ipairs(opts.packages) do
		for p in list:gmatch("[^,%s]+") do packages[#packages + 1] = p end
	end
	if opts.size then image.parse_size(opts.size) end
	image.build({ name = opts.name, packages = packages, size = opts.size, force = opts.force,
		kernel_package = opts.kernel, base = opts.base, suite = opts.suite })
	return 0
end

-- What an image is made of, in a few words: busybox, debian/bookworm+python3, oci:TAG@sha256:1234…
local function base_of(m)
	local b = type(m.base) == "table" and m.base or nil
	if not b then return m.source == "import" and "import" or "busybox" end
	if b.kind == "debian" then
		return "debian/" .. tostring(b.suite) .. (#(b.packages or {}) > 0 and ("+" .. table.concat(b.packages, ",")) or "")
	elseif b.kind == "oci" then
		local tag = (b.tags or {})[1]
		return "oci:" .. (tag and (tag .. "@") or "") .. tostring(b.manifest_digest or b.config_digest):sub(1, 19)
	end
	local extra = m.requested_packages or {}
	return "busybox" .. (#extra > 0 and ("+" .. table.concat(extra, ",")) or "")
end

local function sizes(m)
	local size, alloc = 0, 0
	for _, f in pairs(m.files or {}) do
		size = size + (f.size or 0)
		alloc = alloc + (f.allocated or 0)
	end
	return size, alloc
end

function commands.list(argv)
	local o = cli.parse(argv, { usage = "fireclaw image list [--json]", about = "List the images.", args = 0,
		{ "--json", "print a JSON array: {name, source, base, base_info, kernel, size, allocated, rootfs_used,\n"
			.. "created}, or {name, error}" } })
	local list = image.list()
	if o.json then
		local rows = json.array()
		for _, e in ipairs(list) do
			local m = e.manifest
			if m then
				local size, alloc = sizes(m)
				local k = m.kernel_info or {}
				rows[#rows + 1] = { name = e.name, source = m.source or json.null, kernel = k.release or k.format or json.null,
					size = size, allocated = alloc, created = m.created or json.null, base = base_of(m),
					base_info = m.base or json.null, rootfs_used = (m.rootfs or {}).used or json.null }
			else
				rows[#rows + 1] = { name = e.name, error = e.error }
			end
		end
		io.stdout:write(json.encode(rows), "\n")
		return 0
	end
	if #list == 0 then
		io.stderr:write("no images (build one with: fireclaw image build)\n")
		return 0
	end
	io.stdout:write(string.format("%-16s %-7s %-26s %9s %9s  %-28s %s\n", "NAME", "SOURCE", "KERNEL", "SIZE",
		"ALLOCATED", "BASE", "CREATED (UTC)"))
	for _, e in ipairs(list) do
		local m = e.manifest
		if m then
			local size, alloc = sizes(m)
			local k = m.kernel_info or {}
			io.stdout:write(string.format("%-16s %-7s %-26s %9s %9s  %-28s %s\n", e.name, m.source or "?",
				k.release or k.format or "?", image.human(size), image.human(alloc), base_of(m), created(m.created)))
		else
			io.stdout:write(string.format("%-16s (broken: %s)\n", e.name, e.error))
		end
	end
	return 0
end

function commands.info(argv)
	local _, rest = cli.parse(argv, { usage = "fireclaw image info [--json] [NAME]", args = 1,
		about = "Print the manifest of image NAME (default: " .. config.image .. ") as JSON: base (busybox,\n"
			.. "debian: suite, mirror, packages; oci: source, digests, layers), sizes, packages, container.",
		{ "--json", "the same (the manifest is JSON already)" } })
	local m = image.info(rest[1] or config.image)
	io.stdout:write(json.encode(m, { pretty = true }), "\n")
	return 0
end

commands["rm"] = function(argv)
	local _, rest = cli.parse(argv, { usage = "fireclaw image rm NAME…",
		about = "Remove images, and the snapshots taken from them (no image can restore them)." })
	if #rest == 0 then cli.usage_error("image rm: which image? (see: fireclaw image list)") end
	for _, name in ipairs(rest) do
		local snaps = image.remove(name)
		if not runtime.quiet then
			io.stderr:write("image: removed '", name, "'", #snaps > 0 and string.format(" and its snapshot%s '%s'",
				#snaps == 1 and "" or "s", table.concat(snaps, "', '")) or "", "\n")
		end
	end
	return 0
end
commands.remove = commands["rm"]

function commands.import(argv)
	local opts = cli.parse(argv, {
		usage = "fireclaw image import --name NAME (--oci PATH | --kernel K --rootfs R) [options]", args = 0,
		about = "--oci PATH: import a container image — a docker save tarball or an OCI image layout\n"
			.. "(directory or tar) — as a root filesystem with fireclaw's guest side injected in\n"
			.. "/.fireclaw, booted with the default image's kernel; run honours its Entrypoint, Cmd,\n"
			.. "Env, WorkingDir and User.\n"
			.. "--kernel/--rootfs: register your own kernel (ELF vmlinux or bzImage) and ext4 rootfs as\n"
			.. "an image (copied). fireclaw writes its guest agent into the copy at\n"
			.. "/.fireclaw/bin/fireclaw-agent and boots it as init=: it starts the agent, then execs\n"
			.. "the image's own init (its init= from --boot-args, else /sbin/init); the kernel needs\n"
			.. "virtio_console (QEMU) or vsock (Firecracker) for it, else its VMs use SSH. For SSH\n"
			.. "(fireclaw ssh, --exec ssh, --no-agent) the guest must run sshd for root with the\n"
			.. "client key (" .. config.state_dir .. "/keys/id_ed25519.pub).",
		{ "--name NAME", "image name" },
		{ "--oci PATH", "docker save tarball or OCI image layout (directory or tarball)" },
		{ "--size SIZE", "with --oci: rootfs size (default: from the content)" },
		{ "--kernel FILE", "kernel: vmlinux (ELF) or bzImage" },
		{ "--rootfs FILE", "root filesystem image (ext4)" },
		{ "--initrd FILE", "initramfs" },
		{ "--host-key FILE", "the guest's SSH host public key (ssh-ed25519 AAAA…), to pin it" },
		{ "--boot-args ARGS", "kernel command line (default: the built image's)" },
		{ "--cmdline-devices", "its kernel takes virtio-mmio devices on the command line (Firecracker < 1.8)" },
		{ "--net MODE", "the network mode its VMs get by default: none or nat (run --net overrides)" },
		{ "--no-agent", "leave the rootfs and boot arguments as they are (no agent: SSH only)" },
		{ "--force", "replace an existing image of that name" },
		quiet_opt,
	})
	if opts.quiet then runtime.quiet = true end
	if opts.oci then
		if not opts.name then cli.usage_error("image import --oci needs --name") end
		for _, k in ipairs({ "kernel", "rootfs", "initrd", "host_key", "boot_args", "no_agent" }) do
			if opts[k] then cli.usage_error("image import: --oci and --%s exclude each other", k:gsub("_", "-")) end
		end
		if opts.size then image.parse_size(opts.size) end
		image.import_oci({ name = opts.name, oci = opts.oci, size = opts.size, force = opts.force })
		return 0
	end
	if opts.size then cli.usage_error("image import: --size goes with --oci") end
	for _, k in ipairs({ "name", "kernel", "rootfs" }) do
		if not opts[k] then cli.usage_error("image import needs --%s (see 'fireclaw image import --help')", k) end
	end
	image.import({ name = opts.name, kernel = opts.kernel, rootfs = opts.rootfs, initrd = opts.initrd,
		host_key = opts.host_key, boot_args = opts.boot_args, cmdline_devices = opts.cmdline_devices,
		net_mode = opts.net, no_agent = opts.no_agent,
		force = opts.force })
	return 0
end

local cmd = args[1]
if cmd == nil or cmd == "-h" or cmd == "--help" or cmd == "help" then
	local out = cmd == nil and io.stderr or io.stdout
	out:write(string.format(USAGE, config.state_dir .. "/images"))
	return cmd == nil and 2 or 0
end
if not commands[cmd] then
	cli.usage_error("image: unknown command '%s' (build, list, info, rm, import)", cmd)
end
local rest = {}
for i = 2, #args do rest[#rest + 1] = args[i] end
return commands[cmd](rest)
