-- fireclaw.vmm.qemu: the QEMU microvm driver behind fireclaw.vm.
--
-- Guest RAM is a shared file (memory-backend-file, share=on; a memfd), so a snapshot is:
-- stop, migrate the device state only (x-ignore-shared) to dir/vmstate, copy the RAM file's
-- non-zero pages to dir/memory (zero pages as holes). A restore copies them into a memfd
-- of its own (QEMU 7.2 opens a RAM file read-write, whatever share= says, so it never sees
-- the snapshot's file) and migrates the device state back in; a restored VM is then like
-- a cold booted one, and can be snapshotted the same way. With QEMU >= 8.2 a throw-away
-- restore maps the snapshot's file itself instead, privately and read-only
-- (readonly=on,rom=off: opened O_RDONLY, guest writes stay in the VMM's own pages),
-- readable through a group of that snapshot's own (see map_memory).
-- A restore needs the very same machine and device options as the snapshot, so both go
-- through machine_args(). Every VM has a virtio-rng device reading the host's /dev/urandom
-- (spec.rng = false leaves it out: a restore of a snapshot taken without one).
--
-- Least privilege: QEMU gets every file it uses as a descriptor opened here — tap, QMP
-- socket, disk, console, /dev/urandom, RAM file, kernel, initrd, migration streams (QMP getfd) — and runs
-- as a user of its own (uid UID_BASE + 1 + the VM id, group UID_BASE shared by all VMMs),
-- with no capabilities, no access to fireclaw's directories, under a seccomp filter that
-- also denies exec, set*id and resource control (-sandbox). FIRECLAW_VMM_USER=root keeps
-- root; "UID:GID" picks the user. Never root otherwise: a kernel or initrd others cannot
-- read goes in as a memfd copy, and what cannot be fixed (a tap outside a namespace,
-- /dev/kvm closed to the user) is an error naming the fix. See docs/security.md.
local config = require "fireclaw.config"
local core = require "fireclaw.core.vm"
local fault = require "fireclaw.fault"
local fs = require "fireclaw.fs"
local proc = require "fireclaw.proc"
local runtime = require "fireclaw.runtime"
local sys = require "fireclaw.sys"
local util = require "fireclaw.vmm.util"

local M = {}

-- above systemd's container range (524288..1879048191), below its dynamic userns range
M.UID_BASE = 0x70000000
-- The groups that may read a snapshot's memory, one per snapshot (SNAP_GID_BASE + a 24-bit
-- hash of its name): above the per-VM users (UID_BASE + 1 + a 24-bit id) and their group
-- (UID_BASE), still below systemd's dynamic userns range (0x80000000).
M.SNAP_GID_BASE = M.UID_BASE + 0x02000000
-- The QEMU from which a restore maps the snapshot's memory instead of copying it.
M.MAP_VERSION = "8.2"

local O, S = sys.O, sys.S
local O_RDONLY, O_WRONLY, O_RDWR, O_CREAT, O_TRUNC, O_PATH = O.RDONLY, O.WRONLY, O.RDWR, O.CREAT, O.TRUNC, O.PATH

M.SOCKET_TIMEOUT = 10
M.MIGRATE_TIMEOUT = 120
M.DEFAULT_BOOT_ARGS = "console=ttyS0 reboot=k panic=1"

local function qmp_path(v) return v.dir .. "/qmp.sock" end
local AGENT_PREFIX = require("fireclaw.core.agent").PORT_PREFIX
function M.agent_path(v, k) return string.format("%s/agent-%d.sock", v.dir, k) end

-- The end of QEMU's log as one line, for an error message.
-- QEMU names the files it was given by their descriptors: say which files they are.
local function log_line(v)
	local line = core.log_tail(v.dir .. "/vmm.log", 10):gsub("%s+$", ""):gsub("\n", " | ")
	return (line:gsub("/proc/self/fd/%d+", v._fd_paths or {}):gsub("/dev/fdset/%d+", v._fd_paths or {}))
end

function M.log_files(v) return { v.dir .. "/vmm.log" } end

-- QEMU option values are comma-separated: a comma in a path is written twice.
local function optval(s)
	return (tostring(s):gsub(",", ",,"))
end

local probes = {}

-- Version and seccomp support of a QEMU binary, once per binary. Options are parsed in
-- order, so `-sandbox on -version` fails at once on a build without seccomp and prints the
-- version otherwise: one process answers both questions.
function M.probe(binary)
	if not probes[binary] then
		probes[binary] = util.cached_probe("qemu", binary, function()
			local function run(argv)
				local ok, r = pcall(proc.run, argv, { timeout = 10 })
				return ok and r.status == 0 and r.stdout:match("version (%d+%.%d+%.?%d*)") or nil
			end
			local version = run({ binary, "-sandbox", "on", "-version" })
			local sandbox = version ~= nil
			version = version or run({ binary, "-version" })
			return version and { version = version, sandbox = sandbox } or nil
		end) or { sandbox = false }
		if not probes[binary].sandbox then
			util.verbose("qemu: %s has no -sandbox (seccomp); running without it", binary)
		end
	end
	return probes[binary]
end

function M.has_sandbox(binary)
	return M.probe(binary).sandbox
end
local has_sandbox = M.has_sandbox

-- Boot args may come as a string or as a list (an image manifest keeps lists).
local function words(x)
	if type(x) == "table" then return table.concat(x, " ") end
	return x
end

-- A QEMU that is not the system's (bin/ under some prefix other than /usr, as
-- tools/qemu-next.sh unpacks one) reads its firmware (pvh.bin, …) from its own share/qemu,
-- which its build does not look for: -L names it. nil for the system's QEMU.
function M.data_dir(binary)
	local prefix = tostring(binary):match("^(/.+)/bin/[^/]+$")
	if not prefix or prefix == "/usr" or prefix == "/usr/local" then return nil end
	local dir = prefix .. "/share/qemu"
	return util.exists(dir .. "/pvh.bin") and dir or nil
end

local function boot_args(v, spec)
	local args = words(spec.boot_args) or M.DEFAULT_BOOT_ARGS
	if v.accel ~= "tcg" then return args end
	return util.tcg_boot_args(args, spec.boot_args_tcg)
end

M.TCG_CPU = "max,-erms,-fsrm"

local function accel_args(v)
	if v.accel == "kvm" then
		-- `-cpu host` alone aborts on MSR 0x10a on some hosts (docs/guest-notes.md, "The host's KVM")
		return { "-accel", "kvm", "-cpu", "host,-arch-capabilities" }
	end
	-- without ERMS/FSRM the guest kernel copies and clears with unrolled loops and rep movsq
	-- instead of `rep movsb`/`rep stosb`, which TCG runs one byte per loop: ~20% less guest
	-- CPU to boot (docs/guest-notes.md, "Booting under TCG")
	return { "-accel", "tcg", "-cpu", M.TCG_CPU }
end

local function append(t, ...)
	for _, x in ipairs({ ... }) do t[#t + 1] = x end
end

-- A throw-away disk (spec.rootfs_backing): the qcow2 overlay (fd set 1: read-write and
-- read-only descriptors, as for a copy) over the golden disk as a raw node QEMU has only
-- an O_RDONLY descriptor of (fd set 4; root's 0600 file: it can neither write it nor
-- open it again). The node the device uses is named `root` like a copy's drive, so the
-- device, and what a snapshot saved of it, are the same; werror/rerror move to the
-- device (a -blockdev has no error policy of its own), still `report`.
local function overlay_args(fd)
	return { "-add-fd", "fd=" .. fd.disk .. ",set=1", "-add-fd", "fd=" .. fd.disk_ro .. ",set=1",
		"-add-fd", "fd=" .. fd.backing .. ",set=4",
		"-blockdev", "driver=file,node-name=golden-file,filename=/dev/fdset/4,read-only=on,locking=off",
		"-blockdev", "driver=raw,node-name=golden,file=golden-file,read-only=on",
		"-blockdev", "driver=file,node-name=root-file,filename=/dev/fdset/1,locking=off",
		"-blockdev", "driver=qcow2,node-name=root,file=root-file,backing=golden",
		"-device", "virtio-blk-device,drive=root,werror=report,rerror=report" }
end

-- The command line for a boot (ram = {}) or a restore (ram = {from =, incoming = true}, or
-- {share = false, incoming = true}: see M.restore).
-- Everything that shapes the machine is here, for both. fd names the descriptors QEMU
-- inherits (see open_fds); paths only appear for what it opens itself.
local function machine_args(v, spec, ram, fd)
	local mem, vcpu = spec.mem_mib or 256, spec.vcpu or 1
	local self = function(n) return "/proc/self/fd/" .. n end
	-- the VM's directory names the process (ps, leak checks): QEMU opens nothing in it
	local a = { v.binary, "-name", optval(v.dir) }
	local data = M.data_dir(v.binary)
	if data then append(a, "-L", data) end
	append(a, "-M", "microvm,memory-backend=mem")
	append(a, unpack(accel_args(v)))
	-- a mapped snapshot: opened O_RDONLY, mapped privately and writable (QEMU >= 8.2)
	local share = ram.map and "off,readonly=on,rom=off" or ram.share == false and "off" or "on"
	append(a, "-smp", tostring(vcpu), "-m", mem .. "M",
		-- QEMU opens mem-path itself: through /proc/self/fd it reaches the file it was given
		"-object", string.format("memory-backend-file,id=mem,size=%dM,mem-path=%s,share=%s",
			mem, self(fd.ram), share),
		"-nodefaults", "-no-user-config", "-nographic",
		-- a guest reboot or panic ends the VMM, as with Firecracker
		"-no-reboot",
		"-add-fd", "fd=" .. fd.console .. ",set=2", "-chardev", "file,id=ser0,path=/dev/fdset/2,append=on", -- a pipe: no O_TRUNC
		"-serial", "chardev:ser0",
		"-chardev", "socket,id=qmp,fd=" .. fd.qmp .. ",server=on,wait=off", "-mon", "chardev=qmp,mode=control",
		"-kernel", self(fd.kernel), "-append", boot_args(v, spec))
	if spec.initrd then append(a, "-initrd", self(fd.initrd)) end
	if spec.rootfs and fd.backing then
		append(a, unpack(overlay_args(fd)))
	elseif spec.rootfs then
		-- a full host disk is an I/O error in the guest, not a VM paused forever (QEMU's
		-- default werror=enospc stops the VM and the command never ends). The disk is this
		-- VM's own copy: no image locking (with an fd set it would trip over itself).
		append(a, "-add-fd", "fd=" .. fd.disk .. ",set=1", "-add-fd", "fd=" .. fd.disk_ro .. ",set=1",
			"-drive", "id=root,if=none,format=raw,werror=report,rerror=report,file.locking=off,file=/dev/fdset/1",
			"-device", "virtio-blk-device,drive=root")
	end
	if fd.rng then
		-- an entropy device fed from the host's /dev/urandom (given as an fd, like every file)
		append(a, "-add-fd", "fd=" .. fd.rng .. ",set=3", "-object", "rng-random,id=rng0,filename=/dev/fdset/3",
			"-device", "virtio-rng-device,rng=rng0")
	end
	if fd.agent then
		-- the guest agent's ports (docs/agent-protocol.md): one virtio-serial device, one
		-- port per host socket; a chardev socket takes one client at a time, so several
		-- fireclaw processes each take a port of their own (flock on dir/agent-K.lock)
		append(a, "-device", "virtio-serial-device,max_ports=" .. (#fd.agent + 1))
		for k, n in ipairs(fd.agent) do
			append(a, "-chardev", string.format("socket,id=agent%d,fd=%d,server=on,wait=off", k - 1, n),
				"-device", string.format("virtserialport,chardev=agent%d,name=%s%d,nr=%d", k - 1,
					AGENT_PREFIX, k - 1, k))
		end
	end
	if v.tap then
		local how = fd.tap and ("fd=" .. fd.tap) or ("ifname=" .. optval(v.tap) .. ",script=no,downscript=no")
		append(a, "-netdev", "tap,id=net0," .. how,
			"-device", "virtio-net-device,netdev=net0" .. (v.mac and (",mac=" .. v.mac) or ""))
	end
	if has_sandbox(v.binary) then
		-- migration streams come as fds (getfd), so QEMU never needs to run a program
		append(a, "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny")
	end
	if ram.incoming then append(a, "-incoming", "defer") end
	return a
end

-- ---- descriptors and the unprivileged user ----

local function open_fd(path, flags, mode)
	local fd, err = sys.open(path, flags, mode) -- O_CLOEXEC always
	if not fd then error(string.format("qemu: open %s: %s", path, err), 0) end
	return fd
end

local function fstat(fd)
	local st, err = sys.fstat(fd)
	if not st then error("qemu: fstat: " .. err, 0) end
	return st
end

-- uid, gid QEMU should run as, or nil for root.
local function wanted_user(v)
	local want = tostring(v.user or config.vmm_user or "auto")
	if want == "root" then return nil end
	if want == "auto" then return M.UID_BASE + 1 + util.id_number(v.id), M.UID_BASE end
	local uid, gid = want:match("^(%d+):(%d+)$")
	if not uid then error("vm: FIRECLAW_VMM_USER is auto, root or UID:GID, not '" .. want .. "'", 0) end
	return tonumber(uid), tonumber(gid)
end

-- Can this VM's disk be a qcow2 overlay on a golden disk (overlay_args)? Only when QEMU
-- runs as a user of its own: root could open /proc/self/fd/N of its read-only descriptor
-- again for writing, and write the golden disk.
function M.takes_overlay(v)
	if not wanted_user(v) then return nil, "a VMM running as root gets a copy" end
	return true
end

local ROOT_HINT = "(or FIRECLAW_VMM_USER=root to run QEMU as root)"

-- Raise when QEMU cannot run as an unprivileged user here and fireclaw cannot fix that:
-- no silent root. Returns the extra groups it needs (/dev/kvm's), or nil. v: {id, tap,
-- netns, accel} (doctor asks with {accel}).
function M.confinement(v)
	if v.tap and not v.netns then
		error(string.format("vm %s: qemu would open its tap %s by name in the host's namespace, "
			.. "which needs root: give the VM a network namespace %s", v.id, v.tap, ROOT_HINT), 0)
	end
	if v.accel ~= "kvm" then return nil end
	local fd = sys.open("/dev/kvm", O_PATH)
	if not fd then return nil end -- QEMU will say
	local st = fstat(fd)
	sys.close(fd)
	local others, group = bit.bor(S.IROTH, S.IWOTH), bit.bor(S.IRGRP, S.IWGRP)
	if bit.band(st.mode, others) == others then return nil end
	if bit.band(st.mode, group) == group then return { st.gid } end
	error(string.format("%s/dev/kvm is open to root only (mode %o): chmod 0660 /dev/kvm and "
		.. "chgrp it to a kvm group %s", v.id and ("vm " .. v.id .. ": ") or "", bit.band(st.mode, 511),
		ROOT_HINT), 0)
end

-- A file QEMU opens by name (kernel, initrd: through /proc/self/fd, which checks the file's
-- own mode) that others cannot read: a memfd copy owned by the VMM user, or nil when the
-- file itself will do.
local function readable_copy(fd, path, uid, gid)
	local st = fstat(fd)
	if not uid or bit.band(st.mode, S.IROTH) ~= 0 then return nil end
	util.verbose("qemu: %s is not readable by others: the VMM gets a copy", path)
	local copy = core.memfd(tonumber(st.size), path)
	local cok, err = sys.fchown(copy, uid, gid)
	if not cok then
		sys.close(copy)
		error("qemu: chown a copy of " .. path .. ": " .. err, 0)
	end
	return copy
end

-- Open everything QEMU gets as a descriptor, appending each to `fds` (QEMU sees them as
-- 3, 4, … in that order) as it goes, so the caller closes them whatever happens. Returns
-- their numbers in QEMU by name. uid, gid: the VMM's user (nil: root).
local function open_fds(v, spec, ram, fds, uid, gid)
	local num, paths = {}, {}
	v._fd_paths = paths -- for QEMU's messages (log_line)
	local function pass(name, fd, path)
		fds[#fds + 1] = fd
		num[name] = #fds + 2
		if path then paths["/proc/self/fd/" .. num[name]] = path end
		return fd
	end
	if v.tap and v.netns then
		local tap = require("fireclaw.net").tap_open(v.netns, v.tap)
		v._tap = tap -- closed with the rest (see spawn)
		pass("tap", tap:fd())
	end
	local qmp = require("fireclaw.net").unix_listen(qmp_path(v))
	v._qmp_listen = qmp
	pass("qmp", qmp:fd())
	v._agent_listen = {}
	for k = 0, (spec.agent_ports or 0) - 1 do
		os.remove(M.agent_path(v, k))
		local l = require("fireclaw.net").unix_listen(M.agent_path(v, k))
		v._agent_listen[#v._agent_listen + 1] = l
		num.agent = num.agent or {}
		pass("agent_" .. k, l:fd())
		num.agent[k + 1] = num["agent_" .. k]
	end
	-- the console and QEMU's own output are pipes into capped files (proc.spawn's log
	-- sink): a guest flooding its serial port cannot fill the host's disk
	pass("console", { log = v.console_path })
	paths["/dev/fdset/2"] = v.console_path
	local function by_name(name, path)
		local fd = pass(name, open_fd(path, O_RDONLY), path)
		local copy = readable_copy(fd, path, uid, gid)
		if copy then sys.close(fd) fds[#fds] = copy end
	end
	by_name("kernel", spec.kernel)
	if spec.initrd then by_name("initrd", spec.initrd) end
	if spec.rootfs then
		pass("disk", open_fd(spec.rootfs, O_RDWR))
		pass("disk_ro", open_fd(spec.rootfs, O_RDONLY))
		paths["/dev/fdset/1"] = spec.rootfs
	end
	if spec.rootfs and spec.rootfs_backing then -- never writable: see overlay_args
		pass("backing", open_fd(spec.rootfs_backing, O_RDONLY))
		paths["/dev/fdset/4"] = spec.rootfs_backing
	end
	if spec.rng ~= false then -- a restore repeats what its snapshot had (older ones: none)
		pass("rng", open_fd("/dev/urandom", O_RDONLY))
		paths["/dev/fdset/3"] = "/dev/urandom"
	end
	-- Guest RAM: a memfd, empty for a boot; a restore fills it with a copy of the
	-- snapshot's memory (see spawn). The snapshot's file itself is handed to QEMU only
	-- read-only, to be mapped privately (ram.map: see map_memory), so no VMM can write it.
	if ram.map then
		pass("ram", open_fd(ram.map, O_RDONLY), ram.map)
		return num
	end
	local r = pass("ram", core.memfd((spec.mem_mib or 256) * 1024 * 1024),
		ram.from and ("guest RAM from " .. ram.from) or "guest RAM")
	if uid then
		local cok, cerr = sys.fchown(r, uid, gid)
		if not cok then error("qemu: chown guest RAM: " .. cerr, 0) end
	end
	-- our own copy stays open until QEMU has its own (spawn fills it, then closes it)
	local derr
	ram.fd, derr = sys.dup(r, 3)
	if not ram.fd then error("qemu: dup: " .. derr, 0) end
	return num
end

local function close_fds(v, fds)
	for _, fd in ipairs(fds) do
		-- a {log = path} is made and closed by proc.spawn
		local owned = v._tap and fd == v._tap:fd() or v._qmp_listen and fd == v._qmp_listen:fd()
		for _, l in ipairs(v._agent_listen or {}) do owned = owned or fd == l:fd() end
		if type(fd) == "number" and not owned then sys.close(fd) end
	end
	for _, l in ipairs(v._agent_listen or {}) do l:close() end
	v._agent_listen = nil
	if v._tap then v._tap:close() end
	if v._qmp_listen then v._qmp_listen:close() end
	v._tap, v._qmp_listen = nil, nil
end

local function close_ram(v)
	if v.ram and v.ram.fd and v.ram.fd >= 0 then
		sys.close(v.ram.fd)
		v.ram.fd = -1
	end
end

-- Start QEMU. A restore's RAM (and what spec.prepare does: the rest of its disk copy) is
-- filled while QEMU starts: proc.spawn returns at the fork (wait_exec = false), and the
-- child's cgroup joins (an RCU grace period each time, ~13 ms here), its exec and QEMU's
-- own start-up (~40 ms) run while fireclaw copies. QEMU 7.2 reads or writes no guest RAM
-- before the incoming migration, and of the disk only its size and its first sector
-- (virtio-blk's geometry guess), which the caller copies before (the DECISIONS.md entry
-- on restores overlapping their copies with QEMU's start). The migration waits for both.
-- A cold boot with spec.prepare (the rest of its disk copy) starts QEMU paused (-S): it
-- reads no more of the disk than a restore's QEMU before `cont` (M.boot), sent once
-- prepare is done (the DECISIONS.md entry on cold boots overlapping their disk copy).
local function spawn(v, spec, ram)
	if not spec.kernel then error("vm: boot needs a kernel", 0) end
	local uid, gid = wanted_user(v)
	if uid then v._vmm_groups = M.confinement(v) end
	if uid and ram.group then -- the mapped snapshot's group (map_memory)
		v._vmm_groups = v._vmm_groups or {}
		table.insert(v._vmm_groups, ram.group)
	end
	util.check_tap(v)
	os.remove(qmp_path(v))
	util.touch(v.console_path) -- no stale output from an earlier VM in this dir
	local t0 = runtime.now()
	local fds = {}
	v.ram = ram -- destroy closes our copy of its memfd, even when the spawn fails
	local ok, err = pcall(function()
		local num = open_fds(v, spec, ram, fds, uid, gid)
		local argv = machine_args(v, spec, ram, num)
		if spec.prepare and not ram.incoming then argv[#argv + 1] = "-S" end -- (see M.boot)
		v:_started(proc.spawn{
			argv = argv,
			env = v.env,
			netns = v.netns,
			pdeathsig = not v.keep, -- a kept VM outlives this fireclaw
			stdin = "/dev/null",
			stdout = { log = v.dir .. "/vmm.log" },
			stderr = { log = v.dir .. "/vmm.log" },
			log_cap = config.log_cap,
			fds = fds, uid = uid, gid = gid, groups = uid and v._vmm_groups or nil,
			cgroup = v.cgroup, -- joined between fork and exec (fireclaw.cgroup)
			wait_exec = false, -- (p:wait_exec below, after the copies)
			-- with no copy to make meanwhile (memory mapped, disk an overlay) fireclaw may
			-- as well wait for the exec: sharing its memory until then spares it the fork's
			-- page tables and copy-on-write faults
			vfork = not ram.from and not spec.prepare,
		})
		v.vmm_uid = uid or 0
	end)
	-- QEMU has its copies now (or failed): ours go, so that the QMP socket closes with QEMU
	close_fds(v, fds)
	if not ok then error(err, 0) end
	if ram.incoming then
		if ram.from then core.memfd_fill(ram.fd, ram.from) end
		fault.point("ram-filled")
	end
	if spec.prepare then spec.prepare() end
	-- QEMU holds the RAM from the fork on: with ours closed, its pages are freed by QEMU's
	-- exit rather than by our teardown (~9 ms of CPU for 60 MiB); a snapshot reads the
	-- RAM through QEMU's descriptor (ram_path)
	close_ram(v)
	v.proc:wait_exec() -- "proc: cannot run …" as the spawn itself used to say
	local qok, q = pcall(core.qmp_connect, qmp_path(v), v.socket_timeout or M.SOCKET_TIMEOUT)
	if not qok then
		-- the socket is ours and listens at once, QEMU may still fail on its options
		-- (kernel, disk, tap): say so with its own words rather than the reset connection
		local st = v.proc:wait(2)
		if st then
			error(string.format("qemu %s before answering on its QMP socket: %s",
				util.describe_exit(st), log_line(v)), 0)
		end
		error(q, 0)
	end
	v.qmp = q
	v.timings.api_ready = runtime.now() - t0
	local ver = v.qmp:greeting().QMP.version.qemu
	v.vmm_version = string.format("%d.%d.%d", ver.major, ver.minor, ver.micro)
	v.spec = spec
	util.verbose("VM %s: qemu %s QMP ready in %.0f ms", v.id, v.vmm_version,
		v.timings.api_ready * 1e3)
end

-- Guest RAM is a memfd shared with QEMU (share=on, so a snapshot can leave it out of the
-- migration stream and copy it as a file): it lives in memory wherever the run directory
-- is, costs no file to create, fill and unlink, and goes with the last fd.
function M.boot(v, spec)
	spawn(v, spec, {})
	-- started paused (-S) while spec.prepare copied the rest of the disk: run it now
	if spec.prepare then v.qmp:execute("cont") end
end

function M.pause(v) v.qmp:execute("stop") end

function M.resume(v) v.qmp:execute("cont") end

function M.query_state(v)
	local s = v.qmp:execute("query-status")
	if s.running then return "running" end
	if s.status == "shutdown" or s.status == "guest-panicked" or s.status == "internal-error" then
		return "stopped"
	end
	return "paused"
end

-- The device state goes through the migration stream; RAM in a shared file is left out
-- (x-ignore-shared) and copied as a file.
local function set_ignore_shared(v, on)
	v.qmp:execute("migrate-set-capabilities",
		{ capabilities = { { capability = "x-ignore-shared", state = on ~= false } } })
end

-- The guest RAM memfd of a running QEMU, as a path another process can open (root may
-- open /proc/PID/fd/N of any process): the memfd of the RAM's size (the others, copies
-- of the kernel and initrd, are far smaller).
local function ram_of(pid, bytes)
	local dir = "/proc/" .. tostring(pid) .. "/fd"
	for _, n in ipairs(runtime.listdir(dir) or {}) do
		local target = sys.readlink(dir .. "/" .. n)
		local st = target and target:find("^/memfd:") and sys.stat(dir .. "/" .. n)
		if st and tonumber(st.size) == bytes then return dir .. "/" .. n end
	end
	return nil
end

-- A kept VM that another process started: its QMP socket (QEMU holds the listening
-- socket; one client at a time) and its guest RAM, QEMU's memfd (a shared one is copied
-- from /proc/PID/fd like our own; a privately mapped one travels in the stream).
function M.attach(v)
	v.qmp = core.qmp_connect(qmp_path(v), v.socket_timeout or M.SOCKET_TIMEOUT)
	v.ram = { share = false }
	if (v.boot_spec or {}).ram_shared ~= false then
		local path = ram_of(v.pid, (v.boot_spec.mem_mib or 256) * 1024 * 1024)
		if not path then error("qemu: VM " .. v.id .. ": cannot find its guest RAM (pid " .. tostring(v.pid) .. ")", 0) end
		v.ram = { share = true, path = path }
	end
	v.spec = v.boot_spec or {}
	local ver = v.qmp:greeting().QMP.version.qemu
	v.vmm_version = string.format("%d.%d.%d", ver.major, ver.minor, ver.micro)
end

local function migration_done(v)
	local m = v.qmp:execute("query-migrate")
	if m.status == "completed" then return true end
	if m.status == "failed" or m.status == "cancelled" then
		error("qemu: migration " .. m.status .. ": " .. tostring(m["error-desc"] or "(no reason)"), 0)
	end
	return nil
end

-- Hand QEMU the migration stream (QMP getfd) as "vmstate": it needs no access to dir, and
-- runs no program for it.
local function give_stream(v, path, flags)
	local fd = open_fd(path, flags, "600")
	local ok, err = pcall(v.qmp.execute, v.qmp, "getfd", { fdname = "vmstate" }, nil, fd)
	sys.close(fd)
	if not ok then error(err, 0) end
end

function M.snapshot(v, dir)
	M.pause(v)
	set_ignore_shared(v)
	give_stream(v, dir .. "/vmstate", O_WRONLY + O_CREAT + O_TRUNC)
	v.qmp:execute("migrate", { uri = "fd:vmstate" })
	if not util.poll(function() return migration_done(v) end, M.MIGRATE_TIMEOUT) then
		error("qemu: saving the device state to " .. dir .. "/vmstate did not finish within "
			.. M.MIGRATE_TIMEOUT .. "s", 0)
	end
	local mem = v.spec.mem_mib or 256
	if v.ram.share ~= false then
		-- 0600 root: no VMM ever opens it; zero pages become holes, so a restore's copy
		-- reads only pages that hold data. QEMU's memfd (ours is closed once it runs).
		local path = v.ram.path or ram_of(v.pid, mem * 1024 * 1024)
		if not path then error("qemu: VM " .. v.id .. ": cannot find its guest RAM (pid " .. tostring(v.pid) .. ")", 0) end
		core.ram_save(path, dir .. "/memory")
	else
		-- RAM mapped privately (see M.restore) was not ignored: the stream above holds it
		util.sparse_file(dir .. "/memory", mem * 1024 * 1024)
	end
	local s = v.spec
	return { mem_mib = mem, vcpu = s.vcpu or 1, kernel = s.kernel, initrd = s.initrd,
		boot_args = s.boot_args, boot_args_tcg = s.boot_args_tcg, rootfs_path_in_vmm = s.rootfs,
		tap = v.tap, mac = v.mac, vmstate = "vmstate", memory = "memory", rng = s.rng ~= false,
		agent_ports = s.agent_ports }
end

local basename, dirname = fs.basename, fs.dirname

-- The group that may read the memory of the snapshot in dir (map_memory): deterministic
-- from its name, so concurrent restores agree on it, and in a range of its own.
function M.snapshot_gid(dir)
	return M.SNAP_GID_BASE + util.id_number(basename(dir))
end

-- A snapshot's memory file, made 0600 if an older fireclaw gave it to the VMM group (0660);
-- 0640 root:<its own group> (map_memory) stays.
-- Returns true when its RAM is in the stream instead: a snapshot of a restored clone taken
-- by an older fireclaw (which mapped the file privately) leaves `memory` one hole, and
-- x-ignore-shared refuses a stream with shared RAM in it, so such a restore maps an empty
-- memfd privately.
local function check_memory(path, mem_mib)
	local fd = open_fd(path, O_RDONLY)
	local st = fstat(fd)
	-- the copy fills a memfd of the VM's RAM size: a file of another size is a damaged
	-- snapshot (mapping the file itself, QEMU used to refuse it; a copy would boot garbage)
	local want = mem_mib * 1024 * 1024
	if tonumber(st.size) ~= want then
		sys.close(fd)
		error(string.format("qemu: restore failed (a damaged snapshot?): %s is %d bytes, the VM's RAM is "
			.. "%d MiB (%d bytes)", path, tonumber(st.size), mem_mib, want), 0)
	end
	local ok, err = true, nil
	local granted = st.perm == tonumber("640", 8) and st.uid == 0 and st.gid == M.snapshot_gid(dirname(path))
	if bit.band(st.mode, bit.bor(S.IRWXG, S.IRWXO)) ~= 0 and not granted then ok, err = sys.fchmod(fd, "600") end
	sys.close(fd)
	if not ok then error("qemu: chmod 0600 " .. path .. ": " .. err, 0) end
	return tonumber(st.blocks) == 0
end

-- Another snapshot beside dir whose memory has group gid (a hash collision of two names),
-- or nil.
local function gid_taken(dir, gid)
	local root, own = dirname(dir), basename(dir)
	for _, name in ipairs(runtime.listdir(root) or {}) do
		local st = name ~= own and sys.stat(root .. "/" .. name .. "/memory")
		if st and st.gid == gid then return name end
	end
	return nil
end

-- With QEMU >= 8.2, a throw-away restore maps the snapshot's memory file itself, privately
-- (copy-on-write: guest writes land in QEMU's own anonymous pages, never in the file)
-- instead of fireclaw copying it into a memfd (~30 ms of CPU per restore, plus ~7 ms to
-- free). QEMU reopens mem-path (/proc/self/fd/N of an O_RDONLY descriptor) with a permission
-- check, so its user must be able to read the file: the file becomes root:G 0640, G a group
-- of this snapshot's own (snapshot_gid), and the VMM gets G as a supplementary group. So a
-- VMM reads only the memory it restores anyway and writes none (owner root, no group write,
-- an O_RDONLY descriptor). A snapshot made 0600 (every one: snapshots are) is given its group
-- at its first such restore: chown, then chmod (readable by G only once it is G's). Not
-- mapped, a copy as with QEMU 7.2: kept VMs (start, run --keep, resume: pause, snapshot
-- create --from and attach copy their RAM from the shared memfd), a VMM running as root,
-- and a group already held by another snapshot's memory (two names hashing alike).
-- Returns the group, or nil and why not.
local function map_memory(v, dir, uid)
	local version = M.probe(v.binary).version
	if not version or not util.version_at_least(version, M.MAP_VERSION) then return nil end
	if v.keep then return nil, "a kept VM gets a copy (its RAM is snapshotted from a shared memfd)" end
	if not uid then return nil, "a VMM running as root gets a copy" end
	local gid = M.snapshot_gid(dir)
	local other = gid_taken(dir, gid)
	if other then return nil, string.format("group %d is snapshot %s's", gid, other) end
	local path = dir .. "/memory"
	local fd = open_fd(path, O_RDONLY)
	local st = fstat(fd)
	local ok, err = true, nil
	if st.uid ~= 0 then
		ok, err = false, "not owned by root"
	elseif st.gid ~= gid or st.perm ~= tonumber("640", 8) then
		ok, err = sys.fchown(fd, 0, gid)
		if ok then ok, err = sys.fchmod(fd, "640") end
	end
	sys.close(fd)
	if not ok then return nil, "cannot give " .. path .. " to its group: " .. tostring(err) end
	-- two first restores of colliding names at once: both may have granted; neither maps
	other = gid_taken(dir, gid)
	if other then return nil, string.format("group %d is snapshot %s's", gid, other) end
	return gid
end

local function incoming_done(v)
	local s = v.qmp:execute("query-status")
	if s.status ~= "inmigrate" then return s.status end
	return migration_done(v) and nil
end

-- Why a restore failed: QEMU exits when an incoming migration fails, so its log says more
-- than the closed QMP connection does.
local function restore_error(v, err)
	if v.proc and v.proc:wait(1) then
		local tail = log_line(v)
		error(string.format("qemu: restore failed (a damaged snapshot?), qemu %s: %s",
			util.describe_exit(v.proc:wait(0)), tail ~= "" and tail or tostring(err)), 0)
	end
	error(err, 0)
end

-- A restore's agent port is connected before `cont`: connected after, QEMU left the
-- connection unread in 16 of 100 restores on a loaded host (the port could not take input
-- when it was accepted, and nothing made QEMU look again: waking its main loop did not),
-- costing a new connection after agent.attach's retry; connected before, in none of 100
-- (docs/guest-notes.md). M.agent_connect says hello on it. An optimisation only: if it
-- fails, the agent step connects as before.
local function connect_agent_early(v, spec)
	if not spec.agent_early or (spec.agent_ports or 0) < 1 then return end
	local ok, c = pcall(require("fireclaw.core.agent").attach, {
		dir = v.dir, ports = spec.agent_ports, hello = false, wait = 0, where = "VM " .. v.id,
		watch_fd = v.proc:pidfd(), watch_msg = string.format("the VM is gone (qemu, pid %s, exited)", tostring(v.pid)),
	})
	if not ok then return util.verbose("VM %s: agent port not connected early: %s", v.id, c) end
	v._agent_early = c
	util.verbose("VM %s: agent port connected before the VM runs", v.id)
end

function M.restore(v, dir, spec)
	for _, f in ipairs({ dir .. "/vmstate", dir .. "/memory" }) do
		if not util.exists(f) then error("vm " .. v.id .. ": no snapshot file " .. f, 0) end
	end
	for _, f in ipairs({ spec.rootfs, spec.rootfs_backing }) do
		if not util.exists(f) then error("vm " .. v.id .. ": no disk at " .. f, 0) end
	end
	if check_memory(dir .. "/memory", spec.mem_mib or 256) then
		spawn(v, spec, { share = false, incoming = true })
	else
		local gid, why = map_memory(v, dir, (wanted_user(v)))
		if gid then
			util.verbose("VM %s: guest RAM: %s/memory mapped privately (group %d)", v.id, dir, gid)
			-- share = false: a snapshot of this VM sends its RAM in the stream (M.snapshot)
			spawn(v, spec, { map = dir .. "/memory", group = gid, share = false, incoming = true })
		else
			if why then util.verbose("VM %s: guest RAM: a copy of %s/memory (%s)", v.id, dir, why) end
			spawn(v, spec, { from = dir .. "/memory", incoming = true })
		end
	end
	local ok, err = pcall(function()
		set_ignore_shared(v)
		give_stream(v, dir .. "/vmstate", O_RDONLY)
		v.qmp:execute("migrate-incoming", { uri = "fd:vmstate" })
		-- a `cont` sent while the state is still coming in is lost (docs/guest-notes.md, "QEMU snapshots and restores")
		if not util.poll(function() return incoming_done(v) end, M.MIGRATE_TIMEOUT) then
			error("qemu: loading " .. dir .. "/vmstate did not finish within "
				.. M.MIGRATE_TIMEOUT .. "s", 0)
		end
		connect_agent_early(v, spec)
		v.qmp:execute("cont")
	end)
	if not ok then restore_error(v, err) end
end

-- ACPI power button first (a guest that handles it powers off cleanly), then `quit`.
function M.shutdown(v, timeout_s)
	pcall(v.qmp.execute, v.qmp, "system_powerdown")
	if v.proc:wait(timeout_s) then return true end
	pcall(v.qmp.execute, v.qmp, "quit")
	return v.proc:wait(5) ~= nil
end

-- A connection to the guest agent (fireclaw.core.agent): the first free port, any process.
function M.agent_connect(v, opts)
	local n = v.spec and v.spec.agent_ports
	if not n or n < 1 then return nil, "this VM has no agent ports" end
	local early = v._agent_early
	if early then -- connected before the restored VM ran (connect_agent_early)
		v._agent_early = nil
		local ok, err = pcall(early.hello, early, { timeout = opts and opts.timeout, retry = opts and opts.retry })
		if not ok then
			early:close()
			error(err, 0)
		end
		return early
	end
	local o = {}
	for k, x in pairs(opts or {}) do o[k] = x end
	o.dir, o.ports = v.dir, n
	return require("fireclaw.core.agent").attach(o)
end

function M.destroy(v)
	if v.attached then
		if v.qmp then v.qmp:close() end
		return -- the VMM and its socket are the kept VM's
	end
	-- SIGKILL first: QEMU's exit (which frees the guest's RAM) runs while we tidy up
	if v.proc then pcall(v.proc.kill, v.proc) end
	if v._agent_early then v._agent_early:close() end
	v._agent_early = nil
	if v.qmp then v.qmp:close() end
	os.remove(qmp_path(v))
	for k = 0, ((v.spec and v.spec.agent_ports) or 0) - 1 do
		os.remove(M.agent_path(v, k))
		os.remove(string.format("%s/agent-%d.lock", v.dir, k))
	end
	close_ram(v) -- (if the spawn failed before it did)
	if v.proc then v.proc:close() end -- reaped
end

return M
