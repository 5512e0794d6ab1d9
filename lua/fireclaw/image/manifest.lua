-- fireclaw.image.manifest: what an image's manifest.json says — the boot arguments (and
-- the kernel command line for a boot: boot_args), the files, the packages, the guest.
local common = require "fireclaw.image.common"
local config = require "fireclaw.config"
local guest = require "fireclaw.guest"
local json = require "fireclaw.json"
local keys = require "fireclaw.image.keys"
local opts_check = require "fireclaw.opts"
local packages = require "fireclaw.image.packages"
local runtime = require "fireclaw.runtime"
local util = require "fireclaw.vmm.util"

local M = {}

M.FILES = { "vmlinux", "vmlinuz", "initrd", "rootfs.ext4", "host_key.pub" }

-- The host's TSC frequency in kHz (for tsc_early_khz= under TCG), or nil.
M.tsc_khz = util.tsc_khz

function M.default_boot_args()
	local n = config.net
	return {
		"console=ttyS0", "root=/dev/vda", "rw",
		string.format("ip=%s::%s:%s::eth0:off", n.guest_ip, n.host_ip, n.netmask),
		-- cryptomgr.notests: the crypto self-tests cost ~0.5 s of a TCG boot
		"panic=1", "pci=off", "quiet", "mitigations=off", "cryptomgr.notests",
	}
end

-- What images fireclaw builds (its own Debian kernel) boot with on top of the defaults:
-- cuts to a cold boot under TCG that held in A/B pairs booted side by side
-- (docs/DECISIONS.md, "A shorter cold boot under TCG"). Imported images keep the defaults
-- alone: their kernel and userland are the user's.
--   lsm=landlock: no AppArmor, TOMOYO, Yama, LoadPin, SafeSetID, BPF LSM or integrity
--   (IMA/EVM) in a throw-away guest (nothing of fireclaw's uses them; the guest
--   is hostile anyway, docs/security.md); landlock stays for programs that sandbox
--   themselves with it
--   initcall_blacklist: boot-time work of no use here (the kprobe_events and printk_formats
--   tracefs files, a self-test of the SP800-108 KDF, the built-in X.509 certificates: the
--   initramfs's modules then load unverified, as they would with a missing key; IMA and
--   EVM's setup)
M.BUILT_BOOT_ARGS = { "lsm=landlock", "initcall_blacklist=init_kprobe_trace,crypto_kdf108_init,"
	.. "init_trace_printk_function_export,load_system_certificate_list,init_ima,init_evm" }

function M.built_boot_args()
	local args = M.default_boot_args()
	for _, a in ipairs(M.BUILT_BOOT_ARGS) do args[#args + 1] = a end
	return args
end

-- The kernel command line for an image (a load() or manifest table). Under TCG the
-- tsc_early_khz of *this* host replaces the build host's (fireclaw.vmm.util.tcg_boot_args).
-- opts.dns: the guest's resolver, as the DNS0 field of ip= (the guest's rcS writes it to
-- /etc/resolv.conf at boot).
function M.boot_args(img, opts)
	opts = opts_check.check("image.boot_args", opts, { "tcg", "dns" })
	local args = table.concat(img.boot_args or M.default_boot_args(), " ")
	if opts.dns then
		if not tostring(opts.dns):match("^%d+%.%d+%.%d+%.%d+$") then error("image.boot_args: bad dns", 2) end
		args = args:gsub("(ip=[^ ]-:off)( ?)", "%1:" .. opts.dns .. "%2", 1)
	end
	if not opts.tcg then return args end
	return util.tcg_boot_args(args, img.boot_args_tcg or {})
end

-- boot_args_tcg of a new manifest: the build host's tsc_early_khz, if it has one.
local function boot_args_tcg()
	local khz = M.tsc_khz()
	return json.array(khz and { "tsc_early_khz=" .. khz } or {})
end

local function now()
	return os.date("!%Y-%m-%dT%H:%M:%SZ")
end

local function package_list(p)
	local out = json.array()
	local function add(list, role)
		for _, r in ipairs(list) do
			out[#out + 1] = { name = r.Package, version = r.Version, role = role, sha256 = r.SHA256,
				file = packages.deb_filename(r) }
		end
	end
	add({ p.kernel }, "kernel")
	add(p.base, "base")
	add({ p.sftp }, "base")
	add(p.extra, "extra")
	return out
end

local function guest_info()
	return { ip = config.net.guest_ip, gateway = config.net.host_ip, netmask = config.net.netmask,
		mac = config.net.guest_mac, user = "root", ssh_port = 22 }
end

-- The manifest of a built image. b = {name=, plan=, kernel= (kernel.build's result),
-- rootfs= (rootfs.build's), files=, requested=, cache=, t0=}.
function M.built(b)
	local p, k, rf = b.plan, b.kernel, b.rootfs
	local requested = json.array()
	for _, n in ipairs(b.requested or {}) do requested[#requested + 1] = n end
	local g = guest_info()
	g.ready_marker, g.helper, g.helper_sha256 = guest.READY, guest.HELPER, keys.helper_sha256()
	g.reseed = guest.HELPER .. " reseed NS < 32..4096 bytes of host entropy (the clock set to NS "
		.. "nanoseconds since 1970, then RNDADDENTROPY + RNDRESEEDCRNG)"
	g.agent, g.agent_sha256, g.agent_protocol = guest.AGENT, keys.agent_sha256(), require("fireclaw.core.agent").VERSION
	g.shutdown = "poweroff -f (QEMU: ACPI power off); reboot -f (Firecracker; QEMU with -no-reboot)"
	local boot_args = json.array(M.built_boot_args())
	local source, base = "debian", { kind = "busybox" }
	if rf.box then
		-- the image's userland is not fireclaw's: /.fireclaw/init is PID 1
		boot_args[#boot_args + 1] = "init=" .. guest.BOX .. "/init"
		g.box, g.login_shell = guest.BOX, rf.box.shell
	end
	if b.debian then
		base = { kind = "debian", suite = b.debian.suite, mirror = b.debian.mirror, variant = b.debian.variant,
			packages = json.array(b.debian.packages), mmdebstrap = b.debian.mmdebstrap, cache = rf.base.cache }
	elseif b.oci then
		source = "oci"
		local o = b.oci
		base = { kind = "oci", format = o.format, path = o.path, config_digest = o.config_digest,
			manifest_digest = o.manifest_digest, tags = o.tags, layers = #o.layers,
			devices_skipped = rf.base.devices_skipped }
	end
	return {
		format = common.FORMAT,
		name = b.name,
		source = source,
		created = now(),
		build_seconds = math.floor((runtime.now() - b.t0) * 10 + 0.5) / 10,
		kernel_info = { package = p.kernel.Package, version = p.kernel.Version, metapackage = p.kernel_meta,
			release = k.release, compression = k.compression, cache = b.cache },
		modules = json.array(k.modules),
		packages = package_list(p),
		requested_packages = requested,
		files = b.files,
		rootfs = { size = rf.size, used = rf.used, files = rf.files, fs = "ext4" },
		base = base,
		container = b.oci and b.oci.container or nil,
		boot_args = boot_args,
		boot_args_tcg = boot_args_tcg(),
		boot_notes = "boot_args are complete and explicit (give them to Firecracker as they are: its "
			.. "defaults add nomodule and 8250.nr_uarts=0, which break this kernel). boot_args_tcg are "
			.. "added under QEMU TCG only; tsc_early_khz is the build host's, use this host's "
			.. "(image.boot_args does). Devices are found through ACPI (QEMU microvm, Firecracker >= 1.8).",
		guest = g,
		inputs = p.fingerprint,
	}
end

-- The boot arguments with the agent's init shim as init=: the image's own init= (if any)
-- becomes fireclaw.init=, which the shim execs (a dotted parameter the kernel keeps from
-- init's environment); before a "--" (what follows it is init's arguments).
function M.shim_boot_args(args)
	local out, done = json.array(), false
	for _, a in ipairs(args) do
		if a == "--" and not done then
			out[#out + 1] = "init=" .. guest.BOX_AGENT
			done = true
		end
		out[#out + 1] = (not done and a:match("^init=")) and "fireclaw.init=" .. a:sub(6) or a
	end
	if not done then out[#out + 1] = "init=" .. guest.BOX_AGENT end
	return out
end

-- The manifest of an imported image (opts: image.import's; kernel_info = {compression=, format=}).
-- Unless opts.no_agent, the image has the agent at guest.BOX_AGENT, started by its init shim.
function M.imported(name, opts, kernel_info, files)
	local args = json.array()
	if opts.boot_args then
		for a in opts.boot_args:gmatch("%S+") do args[#args + 1] = a end
	else
		for _, a in ipairs(M.default_boot_args()) do args[#args + 1] = a end
	end
	local g = guest_info()
	if not opts.no_agent then
		args = M.shim_boot_args(args)
		g.agent, g.agent_sha256, g.agent_protocol = guest.BOX_AGENT, keys.agent_sha256(),
			require("fireclaw.core.agent").VERSION
		g.agent_start = "init-shim"
	end
	return {
		format = common.FORMAT, name = name, source = "import",
		created = now(),
		imported_from = { kernel = opts.kernel, rootfs = opts.rootfs, initrd = opts.initrd,
			host_key = opts.host_key },
		kernel_info = kernel_info,
		files = files,
		packages = json.array(),
		boot_args = args,
		boot_args_tcg = boot_args_tcg(),
		guest = g,
		-- absent: the kernel finds its devices through ACPI only (Firecracker >= 1.8)
		cmdline_devices = opts.cmdline_devices and true or nil,
		-- absent: "none"; the network mode its VMs get when neither --net nor FIRECLAW_NET
		-- says (fireclaw.netpolicy)
		net_mode = opts.net_mode,
	}
end

return M
