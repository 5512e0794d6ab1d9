-- Check that this machine can run fireclaw VMs, and say how to fix what is missing
--
--   fireclaw doctor
--
-- Checks: /dev/kvm and what backs it, firecracker (+ jailer; a version that cannot boot
-- the default image, < 1.8, or restore clones safely, < 1.16.1), qemu (microvm, seccomp, whether restores map or copy memory),
-- /dev/net/tun, network namespaces, cgroups for VM limits, how each VMM is confined, the
-- default image, the state and run dirs, and which VMM fireclaw would choose.
-- One line per check: ok / warn / fail, what was found, and (indented) the fix. Exit status
-- 0 when fireclaw can run a VM here (warnings allowed), 1 when it cannot.
local cli = require "fireclaw.cli"
local config = require "fireclaw.config"
local proc = require "fireclaw.proc"
local util = require "fireclaw.vmm.util"
local vm = require "fireclaw.vm"

cli.parse({ ... }, {
	usage = "fireclaw doctor", args = 0,
	about = "Check that this machine can run fireclaw VMs, and say how to fix what is missing.",
})

local failures, warnings = 0, 0

local function report(level, what, found, fix)
	if level == "fail" then failures = failures + 1 end
	if level == "warn" then warnings = warnings + 1 end
	io.stdout:write(string.format("%-5s %-12s %s\n", level, what, found))
	if fix then io.stdout:write(string.format("%-18s fix: %s\n", "", fix)) end
end

-- ---- KVM and the VMMs ----

-- the default image, if it loads: whether its kernel needs a Firecracker with ACPI devices
local img_ok, img = pcall(require("fireclaw.image").load, config.image)
if not img_ok then img = nil end
-- the same choice a run makes (flag > FIRECLAW_VMM > config > auto; doctor has no flag)
local d = vm.detect { cmdline_devices = img and img.cmdline_devices }
local vmm_want, vmm_source = config.choice("vmm")
local firecracker = require "fireclaw.vmm.firecracker"

local function check_kvm()
	if d.kvm == "hardware" then
		report("ok", "kvm", d.kvm_why)
	elseif d.kvm == "kvm_pvm" then
		report("warn", "kvm", d.kvm_why .. " (no VT-x/AMD-V): guests will run under QEMU TCG "
			.. "(slower), and Firecracker cannot boot guests here",
			"for KVM speed and Firecracker, use a host with VT-x/AMD-V (bare metal, or a VM "
			.. "with nested virtualization enabled)")
	else
		report("warn", "kvm", d.kvm_why .. ": guests will run under QEMU TCG (slower)",
			"enable VT-x/AMD-V in the firmware and load kvm_intel or kvm_amd; make /dev/kvm "
			.. "read-write for this user")
	end
end

-- What this Firecracker's version cannot do: boot a kernel that finds its devices only
-- through ACPI (< 1.8), or restore clones safely (< 1.16.1).
local function check_firecracker_version()
	local v = d.firecracker_version
	if not v then return end
	local old = firecracker.acpi_problem(v)
	if old and not (img and img.cmdline_devices) then
		report(vmm_want == "firecracker" and "fail" or "warn", "firecracker",
			string.format("%s: it cannot boot the '%s' image%s", old, config.image,
				vmm_want == "firecracker" and " (" .. vmm_source .. ")" or " (QEMU is used instead)"),
			firecracker.FIX_ACPI)
	elseif not util.version_at_least(v, firecracker.CLONE_SAFE_SINCE) then
		report("warn", "firecracker", string.format("firecracker %s is older than %s, which fixes clones "
			.. "restored from a snapshot (VMGenID, vsock after restore, monotonic clock)", v,
			firecracker.CLONE_SAFE_SINCE), "install Firecracker >= " .. firecracker.CLONE_SAFE_SINCE)
	end
end

-- The jailer's version, asked once (two checks print it).
local jailer_version_cache
local function jailer_version()
	if jailer_version_cache == nil then
		local jv = proc.run({ d.jailer, "--version" }, { timeout = 10 })
		jailer_version_cache = (jv.stdout .. jv.stderr):match("(%d+%.%d+%.%d+)") or false
	end
	return jailer_version_cache or nil
end

-- How a Firecracker would be confined: jailed (a user of its own, a chroot), or not at all.
local function check_confinement()
	local jailer = require "fireclaw.vmm.jailer"
	if d.jailer then
		local v = jailer_version()
		local text = string.format("Firecracker jailed by %s: uid %d+1+id per VM, gid %d, chroot %s/<exec>/<id>/root, "
			.. "a pid namespace of its own", d.jailer, jailer.UID_BASE, jailer.UID_BASE, jailer.base())
		if v and d.firecracker_version and v ~= d.firecracker_version then
			report("warn", "confine fc", text .. string.format("; but jailer %s with firecracker %s", v,
				d.firecracker_version), "use the jailer of the same release as firecracker")
		else
			report("ok", "confine fc", text)
		end
	elseif config.unsafe_no_jailer then
		report("warn", "confine fc", "no jailer, and FIRECLAW_UNSAFE_NO_JAILER/config.unsafe_no_jailer: "
			.. "Firecracker runs as root with the host's files in view", jailer.FIX)
	else
		report("warn", "confine fc", "no jailer" .. (d.jailer_wanted and (" (FIRECLAW_JAILER=" .. d.jailer_wanted
			.. " does not exist)") or "") .. ": Firecracker is refused as root (auto picks QEMU; "
			.. "--unsafe-no-jailer runs it unconfined)", jailer.FIX)
	end
end

local function check_firecracker()
	if not d.firecracker then
		local where = d.firecracker_wanted and ("FIRECLAW_FIRECRACKER=" .. d.firecracker_wanted
			.. " does not exist") or "no firecracker on PATH"
		local fix = "install a Firecracker release binary and put it on PATH, or set "
			.. "FIRECLAW_FIRECRACKER"
		if vmm_want == "firecracker" then
			report("fail", "firecracker", where .. ", and " .. vmm_source .. " needs it", fix)
		else
			report("warn", "firecracker", where .. " (QEMU is used instead)", fix)
		end
		return
	end
	local what = string.format("firecracker %s at %s", d.firecracker_version or "(version?)",
		d.firecracker)
	if d.jailer then what = what .. string.format("; jailer %s", jailer_version() or "(version?)") end
	if d.kvm ~= "hardware" then
		report("warn", "firecracker", what .. ", but its guests cannot boot with this /dev/kvm"
			.. (d.vmm == "firecracker" and " (" .. vmm_source .. ": the API works, guests "
				.. "do not boot)" or " (QEMU is used instead)"),
			"run on a host with hardware virtualization")
	else
		report("ok", "firecracker", what)
	end
	check_firecracker_version()
end

local function qemu_machines()
	local r = proc.run({ d.qemu, "-M", "help" }, { timeout = 10 })
	return r.status == 0 and r.stdout:find("%f[%w]microvm%f[%W]") ~= nil
end

local function check_qemu()
	if not d.qemu then
		report(d.vmm and "warn" or "fail", "qemu", "no " .. config.qemu .. " found",
			"apt-get install qemu-system-x86 (or set FIRECLAW_QEMU)")
		return
	end
	local microvm = qemu_machines()
	local q = require("fireclaw.vmm.qemu")
	local sandbox = q.has_sandbox(d.qemu)
	-- >= 8.2: a throw-away restore maps the snapshot's memory instead of copying it
	local maps = d.qemu_version and require("fireclaw.vmm.util").version_at_least(d.qemu_version, q.MAP_VERSION)
	local found = string.format("qemu %s at %s: microvm %s, seccomp sandbox %s, restores %s the snapshot's memory",
		d.qemu_version or "?", d.qemu, microvm and "yes" or "NO", sandbox and "yes" or "no",
		maps and "map" or "copy")
	if not microvm then
		report(d.vmm == "qemu" and "fail" or "warn", "qemu", found,
			"use a QEMU built with the microvm machine (Debian's qemu-system-x86 has it)")
	elseif not sandbox then
		report("warn", "qemu", found .. " (QEMU runs without -sandbox)",
			"use a QEMU built with seccomp support")
	else
		report("ok", "qemu", found)
	end
end

-- ---- host plumbing ----

local function check_tun()
	local f = io.open("/dev/net/tun", "r+")
	if f then
		f:close()
		report("ok", "tun", "/dev/net/tun can be opened")
	else
		report("fail", "tun", "/dev/net/tun is missing or not accessible (no tap devices)",
			"modprobe tun; run fireclaw as root (it needs CAP_NET_ADMIN)")
	end
end

-- Create and delete a throw-away namespace (never touches the host's own network).
local function check_netns()
	local name = "fct-doctor-" .. proc.getpid()
	local ok, net = pcall(require, "fireclaw.net")
	local created, err
	if ok and type(net) == "table" and net.netns_create then
		created, err = pcall(net.netns_create, name)
		if created then pcall(net.netns_delete, name) end
	else
		local r = proc.run({ "ip", "netns", "add", name }, { timeout = 10 })
		created, err = r.status == 0, r.stderr
		if created then proc.run({ "ip", "netns", "delete", name }, { timeout = 10 }) end
	end
	if created then
		report("ok", "netns", "network namespaces: created and deleted " .. name)
	else
		report("fail", "netns", "cannot create a network namespace: "
			.. tostring(err):gsub("%s+$", ""), "run fireclaw as root (CAP_SYS_ADMIN, CAP_NET_ADMIN)")
	end
end

-- What --net nat / --allow need: nftables through libnftables (tried in a throw-away
-- namespace, never the host's), dnsmasq, and an upstream resolver a VM can reach. Optional:
-- without them VMs still run with --net none, so this warns.
local function check_egress()
	local netpolicy = require "fireclaw.netpolicy"
	local problems = {}
	local name = "fct-doctor-nft-" .. proc.getpid()
	local ok, err = pcall(function()
		local net = require "fireclaw.net"
		net.netns_create(name)
		local nft_ok, nft_err = pcall(net.nft, name, "add table ip t\ndelete table ip t\n")
		net.netns_delete(name)
		if not nft_ok then error(nft_err, 0) end
	end)
	if not ok then problems[#problems + 1] = "nftables: " .. tostring(err) end
	local fs = require "fireclaw.fs"
	if not (fs.exists("/usr/sbin/dnsmasq") or fs.exists("/sbin/dnsmasq")) then
		problems[#problems + 1] = "no dnsmasq (Debian package dnsmasq-base)"
	end
	local ups_ok, ups = pcall(netpolicy.upstreams)
	if not ups_ok then problems[#problems + 1] = tostring(ups):gsub("^network: ", "") end
	if #problems == 0 then
		report("ok", "egress", "--net nat / --allow: nftables, dnsmasq, resolvers " .. table.concat(ups, ","))
	else
		report("warn", "egress", "--net nat / --allow cannot work: " .. table.concat(problems, "; "),
			"apt-get install nftables libnftables1 dnsmasq-base; FIRECLAW_DNS=IP for the resolver")
	end
end

-- The cgroup layout fireclaw.cgroup uses for VM limits (memory, pids, cpu).
local function check_cgroup()
	local cgroup = require "fireclaw.cgroup"
	local l = cgroup.detect()
	if l.version then
		report("ok", "cgroup", cgroup.describe(l) .. " (per-VM limits: memory, tasks, --cpus)")
	else
		report("warn", "cgroup", cgroup.describe(l),
			"mount cgroup2 on /sys/fs/cgroup (or the v1 memory, pids, cpu hierarchies)")
	end
end

-- How each VMM is confined (docs/security.md, "Least privilege"): one line per VMM.
local function check_confine_qemu()
	if not d.qemu then return end
	local qemu = require "fireclaw.vmm.qemu"
	local user = tostring(config.vmm_user or "auto")
	local who = user == "auto" and string.format("uid 0x%x+1+<VM id>, gid 0x%x", qemu.UID_BASE, qemu.UID_BASE)
		or user == "root" and "root (FIRECLAW_VMM_USER=root)" or ("uid:gid " .. user .. " (FIRECLAW_VMM_USER)")
	local sandbox = qemu.has_sandbox(d.qemu) and "on" or "off"
	local cg = require("fireclaw.cgroup").detect()
	local found = string.format("QEMU as %s, seccomp -sandbox %s, cgroup %s", who, sandbox,
		cg.version and ("v" .. cg.version) or "none")
	local ok, err = true, nil
	if user ~= "root" then ok, err = pcall(qemu.confinement, { accel = d.accel }) end
	if not ok then
		report("fail", "confine qemu", found .. ": " .. tostring(err))
	elseif user == "root" or sandbox == "off" or not cg.version then
		report("warn", "confine qemu", found, user == "root" and "unset FIRECLAW_VMM_USER" or nil)
	else
		report("ok", "confine qemu", found)
	end
end

-- Firecracker's confinement: jailed (check_confinement, above) when there is a Firecracker;
-- without one, only whether a jailer binary is there.
local function check_confine_firecracker()
	if d.firecracker then return check_confinement() end
	report("ok", "confine fc", "jailer: " .. (d.jailer and ("found at " .. d.jailer) or "not found")
		.. " (no firecracker: nothing to confine)")
end

local function check_image()
	local ok, image = pcall(require, "fireclaw.image")
	if not ok then
		report("warn", "image", "no fireclaw.image module in this build")
		return
	end
	if not image.exists(config.image) then
		report("warn", "image", "no '" .. config.image .. "' image in " .. config.image_dir(),
			"fireclaw image build")
		return
	end
	local loaded, manifest = pcall(image.load, config.image)
	if not loaded then
		report("fail", "image", "'" .. config.image .. "' is broken: " .. tostring(manifest),
			"fireclaw image build --force")
		return
	end
	local missing = {}
	for _, k in ipairs({ "kernel", "initrd", "rootfs" }) do
		if manifest[k] and not util.exists(manifest[k]) then missing[#missing + 1] = manifest[k] end
	end
	if #missing > 0 then
		report("fail", "image", "'" .. config.image .. "' lacks " .. table.concat(missing, ", "),
			"fireclaw image build --force")
		return
	end
	-- a built image knows its kernel release, an imported one only the kernel's format
	local k = type(manifest.kernel_info) == "table" and manifest.kernel_info or {}
	local kernel = k.release or k.format or "?"
	report("ok", "image", string.format("'%s' in %s (kernel %s, built %s)", config.image,
		config.image_dir(config.image), kernel, manifest.created or "?"))
end

-- Writable, or creatable below its nearest existing parent.
local function writable(dir)
	local probe = dir
	while probe ~= "" and not util.is_dir(probe) do probe = probe:match("^(.*)/[^/]*$") or "" end
	if probe == "" then probe = "/" end
	local f = io.open(probe .. "/.fireclaw-doctor-" .. proc.getpid(), "w")
	if not f then return false, probe end
	f:close()
	os.remove(probe .. "/.fireclaw-doctor-" .. proc.getpid())
	return true, probe
end

local function check_dir(what, dir, env, fatal)
	local ok, probe = writable(dir)
	if ok then
		report("ok", what, dir .. (probe == dir and " is writable" or " will be created in " .. probe))
	else
		report(fatal and "fail" or "warn", what, dir .. " is not writable (" .. probe .. ")",
			"run fireclaw as root, or set " .. env .. " to a writable directory")
	end
end

local function check_choice()
	local old = d.vmm == "firecracker" and not (img and img.cmdline_devices)
		and firecracker.acpi_problem(d.firecracker_version)
	if old then
		report("fail", "vm", string.format("fireclaw would use firecracker (%s), which cannot boot the '%s' "
			.. "image: %s", vmm_source, config.image, old), firecracker.FIX_ACPI)
	elseif d.vmm and d.accel then
		report("ok", "vm", string.format("fireclaw will use %s%s: %s", d.vmm,
			d.vmm == "qemu" and (" with " .. d.accel) or "", d.why))
	else
		report("fail", "vm", "no VMM can run here: " .. d.why,
			"fix the firecracker/qemu lines above, or unset FIRECLAW_VMM/FIRECLAW_ACCEL")
	end
end

check_kvm()
check_firecracker()
check_qemu()
check_tun()
check_netns()
check_egress()
check_cgroup()
check_confine_qemu()
check_confine_firecracker()
check_image()
check_dir("state dir", config.state_dir, "FIRECLAW_STATE", false)
check_dir("run dir", config.run_dir, "FIRECLAW_RUN", true)
check_choice()

if failures > 0 then
	io.stdout:write(string.format("\nfireclaw cannot run VMs here: %d problem%s (see 'fail' above)\n",
		failures, failures == 1 and "" or "s"))
	return 1
end
io.stdout:write(string.format("\nfireclaw can run VMs here (%s%s)%s\n", d.vmm,
	d.vmm == "qemu" and ", " .. d.accel or "",
	warnings > 0 and string.format("; %d warning%s", warnings, warnings == 1 and "" or "s") or ""))
return 0
