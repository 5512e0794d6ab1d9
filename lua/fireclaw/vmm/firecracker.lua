-- fireclaw.vmm.firecracker: the Firecracker driver behind fireclaw.vm.
--
-- Jailed (a jailer was found: fireclaw.vmm.jailer): Firecracker runs as a user of its own
-- in a chroot holding only what it needs, at fixed paths (/vmlinux, /disk.ext4, /vmstate,
-- /memory, /api.sock). Unjailed (no jailer, only with --unsafe-no-jailer): it runs as root
-- in the VM's network namespace and in a private mount namespace where the VM's own
-- directory is bind-mounted on the fixed path MOUNT, and sees its socket, logs and disk at
-- MOUNT/{api.sock,disk.ext4,...}. Either way a snapshot records only fixed names, and each
-- clone restored from one snapshot opens its own disk copy.
--
-- Every VM has a vsock device (guest CID 3) whose unix socket is at a fixed path in the
-- VMM's view (/v.sock in a jail, MOUNT/v.sock unjailed): a snapshot records that path, and
-- each clone's load binds it again inside its own jail or VM directory, so any number of
-- clones run at once, each with its own socket. v:agent_channel() connects to the guest
-- agent through it (fireclaw.vmm.vsock).
--
-- Version awareness: GET /version once per process; the request shapes follow the
-- OpenAPI spec of that version (v1.0: /snapshot/load takes mem_file_path; from v1.1 on,
-- mem_backend). Optional fields are sent only to versions whose spec has them.
local config = require "fireclaw.config"
local core = require "fireclaw.core.vm"
local fs = require "fireclaw.fs"
local jailer = require "fireclaw.vmm.jailer"
local proc = require "fireclaw.proc"
local runtime = require "fireclaw.runtime"
local sys = require "fireclaw.sys"
local util = require "fireclaw.vmm.util"
local vsock = require "fireclaw.vmm.vsock"

local M = {}

-- Where each Firecracker process sees its VM directory. A permanent, empty mount point on
-- the host (created on first use); nothing is mounted on it in the host's namespace.
M.MOUNT = "/run/fireclaw/vm"
M.SOCKET_TIMEOUT = 10
M.REQUEST_TIMEOUT = 30 -- a full snapshot of a large VM takes a while
-- The vsock device: the guest's CID (3 is the lowest a guest may have) and the port the
-- guest agent listens on.
M.GUEST_CID = 3
M.AGENT_PORT = 1024
M.AGENT_TIMEOUT = 10
M.VSOCK_NAME = "v.sock"
-- Firecracker's own defaults include `nomodule` and `8250.nr_uarts=0` (no console), so
-- boot args are always sent.
M.DEFAULT_BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off"

-- Firecracker describes its virtio-mmio devices to the guest through ACPI from 1.8 on;
-- older versions only on the kernel command line (virtio_mmio.device=…), which a kernel
-- without CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES (Debian's, the default image's) ignores: it
-- then finds no disk and no NIC, and the boot only ends at the SSH deadline.
M.ACPI_DEVICES_SINCE = "1.8"
-- Fixes for clones restored from a snapshot: VMGenID under the ACPI id Linux binds,
-- monotonic clock not jumping, clock_realtime (1.16.0); vsock after restore (1.16.1).
M.CLONE_SAFE_SINCE = "1.16.1"

-- Why firecracker `version` cannot boot a kernel that finds its devices only through
-- ACPI, or nil when it can (or the version is unknown).
function M.acpi_problem(version)
	if not version or util.version_at_least(version, M.ACPI_DEVICES_SINCE) then return nil end
	return string.format("firecracker %s lists devices only on the kernel command line "
		.. "(ACPI from %s on), which this image's kernel ignores", version, M.ACPI_DEVICES_SINCE)
end
M.FIX_ACPI = "install Firecracker >= " .. M.CLONE_SAFE_SINCE .. ", use --vmm qemu, or import a kernel "
	.. "built with VIRTIO_MMIO_CMDLINE_DEVICES with fireclaw image import --cmdline-devices"

-- First version whose request schema has each optional field (the v1.0.0 spec has none of
-- them; mem_backend came with v1.1; the others are known from the v1.16.1 spec and are
-- gated there, conservatively).
local SINCE = { mem_backend = "1.1", network_overrides = "1.16", clock_realtime = "1.16", entropy = "1.16" }

local function supports(v, feature)
	return util.version_at_least(v.vmm_version or "0", SINCE[feature])
end

-- The path the VMM sees for a host path: inside the VM dir → under MOUNT. In a jail the
-- driver puts each file at a fixed name and passes that name itself.
local function in_vmm(v, path)
	path = util.abspath(path)
	if v.jail then return "/" .. path:match("([^/]+)$") end
	if path == v.dir then return M.MOUNT end
	if path:sub(1, #v.dir + 1) == v.dir .. "/" then return M.MOUNT .. path:sub(#v.dir + 1) end
	return path
end
M.in_vmm = in_vmm

local function sock_path(v)
	if v.jail then return jailer.socket(v.jail) end
	return v.dir .. "/api.sock"
end

-- The vsock socket as the VMM names it (the snapshot records this path).
local function vsock_in_vmm(v)
	return v.jail and ("/" .. M.VSOCK_NAME) or (M.MOUNT .. "/" .. M.VSOCK_NAME)
end
M.vsock_in_vmm = vsock_in_vmm

-- The same socket as fireclaw reaches it: through the jail's directory descriptor (a short
-- path, like the API socket's), or in the VM directory.
local function vsock_host(v)
	if v.jail then return jailer.socket(v.jail, "/" .. M.VSOCK_NAME) end
	return v.dir .. "/" .. M.VSOCK_NAME
end
M.vsock_host = vsock_host

function M.log_files(v)
	return { v.dir .. "/vmm.log", v.dir .. "/firecracker.log" }
end

-- Firecracker accepts only [A-Za-z0-9-] in --id.
local function instance_id(id)
	return (tostring(id):gsub("[^%w%-]", "-"):sub(1, 64))
end

-- Where Firecracker's logger writes: its descriptor 3, a pipe into firecracker.log (in a
-- jail: a FIFO the jail's init copies into that pipe).
M.LOGGER_PATH = "/proc/self/fd/3"

local function logger_path(v) return v.jail and jailer.LOGGER or M.LOGGER_PATH end

-- Why this Firecracker may not start: no jailer while fireclaw is root, unless the user
-- opted in (allowed: the sandbox/vm option unsafe_no_jailer, from --unsafe-no-jailer; or
-- FIRECLAW_UNSAFE_NO_JAILER=1 / config.unsafe_no_jailer for a whole process).
-- wanted: the FIRECLAW_JAILER that named nothing, for the message.
function M.unjailed_problem(jailer_path, wanted, allowed)
	if jailer_path or allowed or config.unsafe_no_jailer or not jailer.running_as_root() then return nil end
	return "no jailer found" .. (wanted and (" (FIRECLAW_JAILER=" .. wanted .. " does not exist)") or "")
		.. ", and Firecracker would run as root with the host's files in view; "
		.. jailer.FIX .. " (or pass --unsafe-no-jailer)"
end

local function connect(v, t0)
	core.wait_socket(sock_path(v), v.socket_timeout or M.SOCKET_TIMEOUT, v.proc,
		{ log = { v.dir .. "/vmm.log", v.console_path }, name = "firecracker", what = "API socket" })
	v.timings.api_ready = runtime.now() - t0
	v.api = core.api_client(sock_path(v), { timeout = M.REQUEST_TIMEOUT, name = "firecracker" })
	v.vmm_version = v.api:get("/version").firecracker_version
	util.verbose("VM %s: firecracker %s API ready in %.0f ms%s", v.id, v.vmm_version,
		v.timings.api_ready * 1e3, v.jail and (" (jailed: uid " .. v.jail.uid .. ", " .. v.jail.root .. ")") or "")
end

-- The jail: chroot filled by place(j) before the jailer runs (fireclaw.vmm.jailer).
local function spawn_jailed(v, place)
	local j = jailer.plan(v, v.jailer)
	v.jail = j
	jailer.prepare(j)
	local libs = jailer.copy_libs(j)
	if libs > 0 then
		util.verbose("VM %s: %s is dynamically linked: %d libraries copied into its jail (release "
			.. "builds are static)", v.id, j.exec, libs)
	end
	place(j)
	local t0 = runtime.now()
	local p = proc.spawn{
		argv = jailer.argv(j, v.netns),
		env = v.env,
		pdeathsig = not v.keep, -- unshare's: its death kills the jail's init, and so the jail
		stdout = { log = v.console_path },
		stderr = { log = v.dir .. "/vmm.log" },
		fds = { { log = v.dir .. "/firecracker.log" } }, -- the init's cat of the logger FIFO
		log_cap = config.log_cap,
		cgroup = v.cgroup, -- unshare joins them before exec: the whole jail is inside
	}
	v.proc = p
	j.pid = jailer.find_vmm(p, v.socket_timeout or M.SOCKET_TIMEOUT)
	if not j.pid then
		local st = p:wait(2)
		error(string.format("vm %s: the jailer %s before Firecracker started; its log ends with:\n%s",
			v.id, util.describe_exit(st), core.log_tail({ v.dir .. "/vmm.log" }, 10)), 0)
	end
	j.start = proc.starttime(j.pid)
	v.vmm_uid = j.uid
	v:_started(p)
	connect(v, t0)
end

-- Start a fresh Firecracker and connect to its API. Its serial console (stdout), stderr and
-- logger are pipes into capped files (proc.spawn's log sink): a guest flooding its console
-- cannot fill the host's disk. place(j): what to put into the jail, if there is one.
local function spawn(v, place)
	if v.jailer then return spawn_jailed(v, place) end
	local problem = M.unjailed_problem(nil, nil, v.unsafe_no_jailer)
	if problem then error("vm " .. v.id .. ": " .. problem, 0) end
	util.mkdir_p(M.MOUNT)
	-- Firecracker never removes its sockets, and refuses to start over an existing API
	-- socket; a stale vsock socket would make PUT /vsock or a snapshot load fail
	os.remove(sock_path(v))
	os.remove(vsock_host(v))
	local t0 = runtime.now()
	v:_started(proc.spawn{
		argv = { v.binary, "--api-sock", M.MOUNT .. "/api.sock", "--id", instance_id(v.id) },
		env = v.env,
		netns = v.netns,
		pdeathsig = not v.keep, -- a kept VM outlives this fireclaw
		mounts = { { type = "bind", source = v.dir, target = M.MOUNT } },
		stdout = { log = v.console_path }, -- the guest's serial console
		stderr = { log = v.dir .. "/vmm.log" },
		fds = { { log = v.dir .. "/firecracker.log" } }, -- M.LOGGER_PATH
		log_cap = config.log_cap,
		cgroup = v.cgroup, -- joined between fork and exec (fireclaw.cgroup)
	})
	connect(v, t0)
end

local function put_logger(v)
	-- Firecracker opens the path itself (read-write, non-blocking, as it does a FIFO)
	v.api:put("/logger", { log_path = logger_path(v), level = "Info",
		show_level = true, show_log_origin = false })
end

local function boot_source(v, spec)
	local args = spec.boot_args
	if type(args) == "table" then args = table.concat(args, " ") end -- a manifest's list
	local boot = { kernel_image_path = v.jail and "/vmlinux" or in_vmm(v, spec.kernel),
		boot_args = args or M.DEFAULT_BOOT_ARGS }
	if spec.initrd then boot.initrd_path = v.jail and "/initrd" or in_vmm(v, spec.initrd) end
	v.api:put("/boot-source", boot)
	return boot
end

local function devices(v, spec)
	-- (vm:takes_overlay says no: a qcow2 overlay is QEMU's)
	assert(not spec.rootfs_backing, "firecracker: a disk is a raw file, not an overlay (rootfs_backing)")
	local rootfs = spec.rootfs and (v.jail and "/disk.ext4" or in_vmm(v, spec.rootfs))
	if rootfs then
		v.api:put("/drives/rootfs", { drive_id = "rootfs", path_on_host = rootfs,
			is_root_device = true, is_read_only = spec.read_only or false })
	end
	if v.tap then
		v.api:put("/network-interfaces/eth0", { iface_id = "eth0", host_dev_name = v.tap,
			guest_mac = v.mac })
	end
	-- a virtio-rng device (Firecracker fills it from the host's CSPRNG); pre-boot only, a
	-- snapshot keeps it. Older versions have none: restores are reseeded over SSH anyway.
	local rng = spec.rng ~= false and supports(v, "entropy")
	if rng then v.api:put("/entropy", {}) end
	-- the private channel to the guest agent; Firecracker binds its socket at once (v1.0)
	local vs = { guest_cid = M.GUEST_CID, uds_path = vsock_in_vmm(v) }
	v.api:put("/vsock", vs)
	return rootfs, rng, vs
end

-- Cold boot: logger, (metrics), machine config, boot source, root drive, network,
-- (entropy), vsock, InstanceStart. spec.acpi_devices: the kernel finds its devices only
-- through ACPI (an older Firecracker is refused at once instead of booting a guest that
-- never answers).
function M.boot(v, spec)
	if not spec.kernel then error("vm: boot needs a kernel", 0) end
	-- the jail may get a copy of the disk (jailer.place_rw): it must be complete first
	if spec.prepare then spec.prepare() end
	util.check_tap(v)
	spawn(v, function(j)
		jailer.place_ro(j, spec.kernel, "vmlinux")
		if spec.initrd then jailer.place_ro(j, spec.initrd, "initrd") end
		if spec.rootfs and spec.read_only then jailer.place_ro(j, spec.rootfs, "disk.ext4")
		elseif spec.rootfs then jailer.place_rw(j, spec.rootfs, "disk.ext4") end
	end)
	local problem = spec.acpi_devices and M.acpi_problem(v.vmm_version)
	if problem then error(string.format("vm %s: cannot boot: %s; %s", v.id, problem, M.FIX_ACPI), 0) end
	put_logger(v)
	if spec.metrics then
		if v.jail then
			util.touch(v.jail.root .. "/metrics.json")
			jailer.chown(v.jail, v.jail.root .. "/metrics.json", "600")
			v.api:put("/metrics", { metrics_path = "/metrics.json" })
		else
			util.touch(v.dir .. "/metrics.json")
			v.api:put("/metrics", { metrics_path = M.MOUNT .. "/metrics.json" })
		end
	end
	local vcpu, mem = spec.vcpu or 1, spec.mem_mib or 256
	v.api:put("/machine-config", { vcpu_count = vcpu, mem_size_mib = mem })
	local boot = boot_source(v, spec)
	local rootfs, rng, vs = devices(v, spec)
	v.api:put("/actions", { action_type = "InstanceStart" })
	v.booted = { kernel = boot.kernel_image_path, initrd = boot.initrd_path,
		boot_args = boot.boot_args, vcpu = vcpu, mem_mib = mem, rootfs = rootfs,
		tap = v.tap, mac = v.mac, rng = rng, vsock = vs }
end

function M.pause(v) v.api:patch("/vm", { state = "Paused" }) end

function M.resume(v) v.api:patch("/vm", { state = "Resumed" }) end

local STATES = { Running = "running", Paused = "paused", ["Not started"] = "not started" }

function M.query_state(v)
	return STATES[v.api:get("/").state]
end

-- Move a file the jailed VMM wrote out of the jail, and make it root's (read-only for
-- every later VM user: restores hard-link it into their jails).
local function take_out(src, dst)
	local ok = pcall(fs.rename, src, dst)
	if not ok then -- another filesystem
		util.copy_sparse(src, dst)
		os.remove(src)
	end
	util.run({ "chown", "0:0", dst }, "chown " .. dst)
	fs.chmod(dst, "644")
end

-- Pause and write a full snapshot: dir/vmstate and dir/memory.
function M.snapshot(v, dir)
	if v._state ~= "paused" then M.pause(v) end
	if v.jail then -- written into the jail as the VM's user, then moved out
		local snap = jailer.writable_dir(v.jail, "snap")
		v.api:put("/snapshot/create", { snapshot_type = "Full",
			snapshot_path = "/snap/vmstate", mem_file_path = "/snap/memory" })
		take_out(snap .. "/vmstate", dir .. "/vmstate")
		take_out(snap .. "/memory", dir .. "/memory")
	else
		v.api:put("/snapshot/create", { snapshot_type = "Full",
			snapshot_path = in_vmm(v, dir .. "/vmstate"), mem_file_path = in_vmm(v, dir .. "/memory") })
	end
	local b = v.booted or {}
	return { mem_mib = b.mem_mib, vcpu = b.vcpu, kernel = b.kernel, initrd = b.initrd,
		boot_args = b.boot_args, rootfs_path_in_vmm = b.rootfs, tap = b.tap, mac = b.mac,
		vmstate = "vmstate", memory = "memory", rng = b.rng or false, vsock = b.vsock or false }
end

-- Each clone's disk must be where the snapshot says (inside the VMM's view).
local function check_disk(v, spec)
	if not spec.rootfs then return end
	local seen = v.jailer and "/disk.ext4" or in_vmm(v, spec.rootfs)
	if spec.rootfs_path_in_vmm and seen ~= spec.rootfs_path_in_vmm then
		error(string.format("vm %s: the snapshot opens its disk at %s, but %s is seen as %s%s", v.id,
			spec.rootfs_path_in_vmm, spec.rootfs, seen, v.jailer
				and " (a snapshot of an unjailed Firecracker does not load in a jail: take it again)"
				or (": put this clone's copy at " .. v.dir .. spec.rootfs_path_in_vmm:sub(#M.MOUNT + 1))), 0)
	end
	if not util.exists(spec.rootfs) then
		error("vm " .. v.id .. ": no disk copy at " .. spec.rootfs, 0)
	end
end

-- The snapshot binds its vsock socket again at the path it recorded: that must be this
-- VM's own (a jailed snapshot names /v.sock, an unjailed one MOUNT/v.sock).
local function check_vsock(v, spec)
	local vs = spec.vsock
	if not vs then return end
	if type(vs) ~= "table" or type(vs.uds_path) ~= "string" then
		error("vm " .. v.id .. ": the snapshot's vsock record is not {guest_cid =, uds_path =}", 0)
	end
	local want = v.jailer and ("/" .. M.VSOCK_NAME) or (M.MOUNT .. "/" .. M.VSOCK_NAME)
	if vs.uds_path ~= want then
		error(string.format("vm %s: the snapshot binds its vsock socket at %s, but this VM's is %s "
			.. "(a snapshot of a%s Firecracker: take it again)", v.id, vs.uds_path, want,
			v.jailer and "n unjailed" or " jailed"), 0)
	end
end

local function load_body(v, dir, spec)
	local body = { snapshot_path = in_vmm(v, dir .. "/vmstate"), resume_vm = true }
	local mem = in_vmm(v, dir .. "/memory")
	if supports(v, "mem_backend") then
		body.mem_backend = { backend_type = "File", backend_path = mem }
	else
		body.mem_file_path = mem
	end
	if spec.network_overrides then
		if not supports(v, "network_overrides") then
			error("vm: firecracker " .. v.vmm_version .. " cannot change the tap at restore", 0)
		end
		body.network_overrides = spec.network_overrides
	end
	if spec.clock_realtime and supports(v, "clock_realtime") then body.clock_realtime = true end
	return body
end

-- A fresh process loads the snapshot and resumes. A failed load leaves Firecracker
-- unusable (it exits), so the process is killed with the error.
function M.restore(v, dir, spec)
	-- the jail may get a copy of the disk (jailer.place_rw): it must be complete first
	if spec.prepare then spec.prepare() end
	check_disk(v, spec)
	check_vsock(v, spec)
	util.check_tap(v)
	spawn(v, function(j)
		jailer.place_ro(j, dir .. "/vmstate", "vmstate")
		jailer.place_ro(j, dir .. "/memory", "memory")
		if spec.rootfs then jailer.place_rw(j, spec.rootfs, "disk.ext4") end
	end)
	put_logger(v)
	local ok, err = pcall(v.api.put, v.api, "/snapshot/load", load_body(v, dir, spec))
	if not ok then
		M.destroy(v)
		error(err, 0)
	end
	v.booted = { kernel = spec.kernel, initrd = spec.initrd, boot_args = spec.boot_args,
		vcpu = spec.vcpu, mem_mib = spec.mem_mib,
		rootfs = spec.rootfs and (v.jail and "/disk.ext4" or in_vmm(v, spec.rootfs)),
		tap = v.tap, mac = v.mac, rng = spec.rng, vsock = spec.vsock or nil }
end

-- A connection (a fireclaw.net socket) to the guest's vsock port, or nil, err: the VM has
-- no vsock device (restored from a snapshot taken without one), the VMM is gone, or nothing
-- accepted within timeout_s (default AGENT_TIMEOUT: give it what is left of the boot
-- deadline). Right after a boot or restore the agent may not listen yet: Firecracker then
-- closes the connection, and the connect is retried until the deadline.
function M.vsock_connect(v, port, timeout_s)
	if type(port) ~= "number" or port < 0 or port > 0xffffffff or port % 1 ~= 0 then
		error("vm: vsock_connect: port must be an integer 0-4294967295, got " .. tostring(port), 2)
	end
	if not (v.booted and v.booted.vsock) then
		return nil, "vm " .. v.id .. ": no vsock device (restored from a snapshot taken without one: "
			.. "take it again)"
	end
	return vsock.connect(vsock_host(v), port, {
		timeout = timeout_s or M.AGENT_TIMEOUT, what = "vm " .. v.id,
		alive = function()
			if v.destroyed or not v.proc then return false, "the VM was destroyed" end
			if v.proc:alive() then return true end
			return false, "firecracker " .. util.describe_exit(v.proc:wait(0))
		end,
	})
end

-- The guest agent's channel (vsock port AGENT_PORT) as a descriptor the caller owns and
-- closes (sys.close; close-on-exec), or nil, err: what the agent's client wraps.
function M.agent_channel(v, timeout_s)
	local s, err = M.vsock_connect(v, M.AGENT_PORT, timeout_s)
	if not s then return nil, err end
	local fd, derr = sys.dup(s:fd())
	s:close()
	if not fd then return nil, "vm " .. v.id .. ": agent channel: dup: " .. derr end
	return fd
end

-- Ctrl-Alt-Del: the guest reboots, and Firecracker exits when its guest does.
function M.shutdown(v, timeout_s)
	if v._state == "paused" then M.resume(v) end
	v.api:put("/actions", { action_type = "SendCtrlAltDel" })
	return v.proc:wait(timeout_s) ~= nil
end

function M.destroy(v)
	if v.api then v.api:close() end
	local j = v.jail
	-- the jail dies with its init (unshare's child); killing Firecracker first means it is
	-- gone when this returns
	if j and j.pid and j.start then proc.kill(j.pid, j.start, 9, 2) end
	if v.proc then v.proc:close() end
	if j then
		-- its init reaps it as the namespace goes, a moment after unshare's death
		if j.pid and j.start then util.poll(function() return not proc.alive(j.pid, j.start) or nil end, 2) end
		jailer.close(j)
		jailer.remove(j.dir)
	else
		os.remove(sock_path(v))
		os.remove(vsock_host(v))
	end
end

return M
