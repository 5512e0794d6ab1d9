-- fireclaw.sandbox: one throw-away VM with everything around it — its record, its network
-- namespace and tap, its disk copy, the VMM, and an SSH session to the guest. The recipes
-- (coldboot, restore, run, snapshot) are sequences of these steps:
--
--   local sb = sandbox.new{image = "default", vcpu = 1, mem_mib = 256, vmm = "auto",
--                          cpus = 0.5,    -- optional CPU limit (fireclaw.cgroup)
--                          disk = "2G"}   -- optional: a bigger root disk (cold boot)
--   sb:network()              -- namespace fc-<id> with tap0 (172.16.0.1/30, fixed MACs)
--   sb:network{mode = "nat", allow = {"pypi.org"}, publish = {"127.0.0.1:8080:80"}}
--                             -- … and a network policy (fireclaw.netpolicy; default: the
--                             -- `net` option of sandbox.new, else config.net.mode, "none")
--   sb:disk(img.rootfs)       -- this VM's own copy (reflink or sparse), grown to `disk`;
--                             -- with throwaway_disk (QEMU): a qcow2 overlay on it instead
--   sb:boot()                 -- or sb:restore(snap): the VMM, cold or from a snapshot, in
--                             -- its own cgroup (memory, pids, cpu limits) where there is one
--   sb:connect()              -- SSH with the image's pinned host key
--   sb:agent_connect()        -- or the guest agent on its private VMM channel (exec = "auto"
--                             -- or "agent" and the image has it: docs/agent-protocol.md)
--   sb:reseed()               -- after a restore: fresh host entropy + the clock (one exec;
--                             -- through the agent: its hand-off, sb:handoff())
--   local r = sb:exec({"uname", "-a"}, {on_stdout = …})
--   sb:destroy()              -- everything above, undone; safe twice, never raises
--
-- Each step that succeeds pushes its undo on the sandbox's cleanup stack (sb:on_destroy);
-- destroy runs them in reverse, every one of them, and reports each that fails. The
-- recipes' flows are lists of named steps (sandbox.steps.coldboot(), .restore(snap)) that
-- a recipe can edit (insert_after, swap, remove) before sandbox.build runs them.
--
-- The record (fireclaw.state) is written before anything else exists, so a fireclaw that
-- dies at any point is cleaned up by `fireclaw cleanup`; its undo (state.reap) is the
-- bottom of the stack and also removes what a failed step made but could not register.
-- sb.timer has the stage times.
-- fault.point(NAME) marks where tests stop a run (FIRECLAW_FAULT, see fireclaw.fault).
local cgroup = require "fireclaw.cgroup"
local config = require "fireclaw.config"
local fault = require "fireclaw.fault"
local fs = require "fireclaw.fs"
local agent = require "fireclaw.core.agent"
local guest = require "fireclaw.guest"
local image = require "fireclaw.image"
local log = require "fireclaw.log"
local net = require "fireclaw.net"
local netpolicy = require "fireclaw.netpolicy"
local opts_check = require "fireclaw.opts"
local proc = require "fireclaw.proc"
local rootfs = require "fireclaw.rootfs"
local runtime = require "fireclaw.runtime"
local ssh = require "fireclaw.ssh"
local state = require "fireclaw.state"
local sys = require "fireclaw.sys"
local util = require "fireclaw.vmm.util"
local vm = require "fireclaw.vm"

local M = {}
local Sandbox = {}
Sandbox.__index = Sandbox

-- Run fn(...) as stage `name`: when it fails, its time is still its own (labelled
-- "name (failed)" / "VMM boot (qemu, failed)"), not teardown's.
local function stage(self, name, fn, ...)
	local ok, err = pcall(fn, ...)
	if not ok then
		self.timer:stage(name:find("%)$") and name:gsub("%)$", ", failed)") or name .. " (failed)")
		error(err, 0)
	end
	self.timer:stage(name)
end

-- The VMM goes into the record the moment it exists (a kept VM has no PR_SET_PDEATHSIG),
-- with its agent ports (boot, restore: self.agent_ports), so another fireclaw can attach
-- (fireclaw.agent): one write.
local function record_vmm(self)
	state.update(self.rec, { vmm = { pid = self.vm.pid, start = self.vm.starttime, name = self.vm.vmm },
		agent = self.agent_ports and { ports = self.agent_ports } or self.rec.agent,
		sink = self.vm.sink_pid and { pid = self.vm.sink_pid, start = self.vm.sink_starttime } or nil,
		jail = self.vm.jail and { dir = self.vm.jail.dir, pid = self.vm.jail.pid, start = self.vm.jail.start } or nil })
	fault.point("vmm-recorded")
end

-- The options sandbox.new (and sandbox.build, coldboot.boot, restore.restore) takes;
-- boot_timeout is how long sb:connect() waits by default (s).
-- net: the network policy sb:network() applies ({mode =, allow =, publish =}, fireclaw.netpolicy).
-- keep: the VM outlives this process (fireclaw start, run --keep); name, ttl (s): a kept
-- VM's name and time to live (state.find, state.expired).
-- throwaway_disk: nobody reads this VM's disk after it (run without --keep, MCP): sb:disk
-- gives a QEMU VM a qcow2 overlay on the golden disk instead of a copy (not with keep).
M.OPTIONS = { "image", "vcpu", "mem_mib", "vmm", "accel", "keep", "boot_timeout", "cpus", "detected", "disk",
	"exec", "unsafe_no_jailer", "name", "ttl", "net", "throwaway_disk" }
M.EXEC_MODES = { auto = true, agent = true, ssh = true }

-- Does this image carry an agent that speaks this fireclaw's protocol? (an imported image
-- has it at guest.BOX_AGENT, started by its init shim)
local function image_has_agent(img)
	local g = img.guest
	return type(g) == "table" and (g.agent == guest.AGENT or g.agent == guest.BOX_AGENT)
		and g.agent_protocol == agent.VERSION
end
M.image_has_agent = image_has_agent

-- ---- disk size (--disk) ----

local MIB = 2 ^ 20
M.DISK_MAX = 2 ^ 40 -- 1 TiB: more is a typo, not a workload

-- 536870912 -> "512 MiB", 2^40 -> "1 TiB", 82887716864 -> "77.2 GiB"
local function mib(bytes)
	local n, unit = bytes / MIB, "MiB"
	if bytes >= 2 ^ 40 then n, unit = bytes / 2 ^ 40, "TiB" elseif bytes >= 2 ^ 30 then n, unit = bytes / 2 ^ 30, "GiB" end
	return (string.format("%.1f", n):gsub("%.0$", "")) .. " " .. unit
end
M.human_size = mib

-- The root disk size asked for ("512M", "2G", or bytes) in bytes, rounded up to a whole
-- MiB; or nil and why not. Only the value itself is checked here (the CLI calls this to
-- turn junk into a usage error); sandbox.new checks it against the image and the host.
function M.disk_bytes(value)
	local ok, bytes = pcall(image.parse_size, value)
	if not ok then
		return nil, string.format("bad disk size '%s' (e.g. 512M, 2G)", tostring(value))
	end
	if bytes < 1 then return nil, string.format("bad disk size '%s' (e.g. 512M, 2G)", tostring(value)) end
	bytes = math.ceil(bytes / MIB) * MIB
	if bytes > M.DISK_MAX then
		return nil, string.format("disk size %s is more than %s", tostring(value), mib(M.DISK_MAX))
	end
	return bytes
end

-- The disk size for this image, checked before anything exists: not smaller than the
-- image's disk (an ext4 is grown, never shrunk), not more than the run directory's
-- filesystem has free (the copy is sparse, but the guest may fill it).
local function disk_size(value, img)
	if value == nil then return nil end
	local bytes, err = M.disk_bytes(value)
	if not bytes then error("sandbox: " .. err, 0) end
	local have = fs.size(img.rootfs)
	if have and bytes < have then
		error(string.format("sandbox: disk size %s is smaller than the disk of image '%s' (%s): shrinking is not "
			.. "supported", mib(bytes), img.name, mib(have)), 0)
	end
	local dir = config.run_dir -- (made by the first VM: its nearest existing parent until then)
	while not fs.is_dir(dir) and dir:match("./") do dir = dir:match("^(.*)/[^/]*$") end
	local free = rootfs.space(dir ~= "" and dir or "/")
	if bytes - (have or 0) > free then
		error(string.format("sandbox: disk size %s is more than %s has free (%s)", mib(bytes), config.run_dir,
			mib(free)), 0)
	end
	return bytes
end

-- Where this VM's cgroups will be, in the record before they exist (cleanup removes them).
-- No usable controller: the VM runs without limits, which -v says.
-- The VM's cgroups, planned before its record exists so that the record's first write
-- names them (cleanup removes what exists of them): nothing is made yet (Sandbox:limit).
local function plan_cgroup(id, mem_mib, cpus)
	local cg = cgroup.plan(state.netns_name(id), cgroup.limits { mem_mib = mem_mib, cpus = cpus })
	if not cg then log.info("VM %s: no resource limits: cgroup %s", id, cgroup.describe()) end
	return cg
end

-- Push fn(sb) on the cleanup stack under `name`: sb:destroy() runs it (last pushed, first
-- run). A step's undo goes on once the step has succeeded.
function Sandbox:on_destroy(name, fn)
	assert(type(name) == "string" and type(fn) == "function", "sb:on_destroy(name, fn)")
	self.undo[#self.undo + 1] = { name = name, fn = fn }
end

-- The cgroups with this VM's limits (RAM known now: a restore takes the snapshot's).
-- Once: boot and restore make them when no step did, so a VMM never runs outside them.
function Sandbox:limit()
	if not self.cg or self.limited then return end
	self.limited = true
	self.cg.limits = cgroup.limits { mem_mib = self.mem_mib, cpus = self.cpus }
	cgroup.create(self.cg)
	self:on_destroy("cgroup", function() cgroup.remove(self.cg.dirs) end)
	fault.point("cgroup")
	self.timer:stage("cgroup")
end

function M.new(opts)
	opts = opts_check.check("sandbox.new", opts, M.OPTIONS)
	local img = image.load(opts.image or config.image)
	local disk_bytes = disk_size(opts.disk, img)
	local policy = netpolicy.check(opts.net, img.net_mode) -- (no mode: FIRECLAW_NET, else the image's)
	state.reap_stale() -- what a killed fireclaw left behind (one listdir when there is none)
	local exec = opts.exec or config.exec or "auto"
	if not M.EXEC_MODES[exec] then error(string.format("sandbox: exec must be auto, agent or ssh, not '%s'", tostring(exec)), 0) end
	if exec == "agent" and not image_has_agent(img) then
		error(string.format("sandbox: image '%s' has no guest agent (%s; or use exec = \"ssh\")", img.name,
			img.source == "import" and "it was imported with --no-agent: import it again without it"
				or "rebuild it: fireclaw image build --force"), 0)
	end
	if opts.name ~= nil and (type(opts.name) ~= "string" or not opts.name:match("^[%a][%w._-]*$") or #opts.name > 64) then
		error(string.format("sandbox: bad VM name %q (a letter, then letters, digits, '.', '_', '-'; at most 64)",
			tostring(opts.name)), 0)
	end
	if opts.ttl ~= nil and (type(opts.ttl) ~= "number" or opts.ttl <= 0) then
		error("sandbox: ttl must be a positive number of seconds", 0)
	end
	if opts.throwaway_disk ~= nil and type(opts.throwaway_disk) ~= "boolean" then
		error("sandbox: throwaway_disk must be a boolean", 2)
	end
	-- a kept VM's disk is read again (pause, resume, snapshot create --from): a real copy
	if opts.throwaway_disk and opts.keep then error("sandbox: throwaway_disk and keep exclude each other", 2) end
	if opts.name and (opts.name:match("^%x%x%x%x%x%x$") or opts.name:sub(1, #config.netns_prefix) == config.netns_prefix) then
		error(string.format("sandbox: VM name '%s' could be taken for a VM id or namespace; choose another", opts.name), 0)
	end
	if opts.name and state.find(opts.name) then
		error(string.format("sandbox: there is a VM named '%s' already (see fireclaw ps)", opts.name), 0)
	end
	local id = state.new_id()
	local cg = plan_cgroup(id, opts.mem_mib or config.mem_mib, opts.cpus)
	local rec = state.create { id = id, image = img.name, keep = opts.keep, name = opts.name, ttl = opts.ttl,
		cgroups = cg and cg.dirs }
	local self = setmetatable({
		id = rec.id, rec = rec, img = img, netns = rec.netns, dir = rec.dir,
		vcpu = opts.vcpu or config.vcpu, mem_mib = opts.mem_mib or config.mem_mib,
		keep = opts.keep, boot_timeout = opts.boot_timeout, timer = log.timer("VM " .. rec.id),
		disk_bytes = disk_bytes, undo = {}, exec_mode = exec, net_policy = policy, net_procs = {},
		throwaway_disk = opts.throwaway_disk or nil, cg = cg, cpus = opts.cpus,
	}, Sandbox)
	-- the bottom of the stack: whatever the record still lists (the VMM of a boot that
	-- failed halfway, a namespace whose tap failed), the run directory, the record itself
	self:on_destroy("record", function()
		local ok, err = pcall(state.reap, self.rec)
		if not ok then error(string.format("cleanup incomplete (%s); run: fireclaw cleanup", tostring(err)), 0) end
	end)
	-- a sandbox nobody destroyed goes when it is collected, at the latest when fireclaw exits
	-- (a recipe that errors before sandbox.with leaves nothing behind either)
	self.guard = newproxy(true)
	getmetatable(self.guard).__gc = function() if not self.keep then self:destroy() end end
	local ok, err = pcall(function()
		fault.point("record")
		self.vm = vm.new { id = self.id, dir = self.dir, vmm = opts.vmm, accel = opts.accel,
			detected = opts.detected, cmdline_devices = img.cmdline_devices, unsafe_no_jailer = opts.unsafe_no_jailer,
			netns = self.netns, tap = config.net.tap, mac = config.net.guest_mac, keep = opts.keep,
			cgroup = self.cg and self.cg.procs, on_spawn = function() record_vmm(self) end }
	end)
	if not ok then
		self:destroy()
		error(err, 0)
	end
	self.timer:stage("record")
	return self
end

-- The VM's namespace and tap, then its network policy (policy: sb:network's argument,
-- else sandbox.new's `net`): egress, resolver, published ports (fireclaw.netpolicy).
function Sandbox:network(policy)
	if policy ~= nil then self.net_policy = netpolicy.check(policy) end
	local n = config.net
	net.netns_create(self.netns)
	-- (the tap goes with its namespace)
	self:on_destroy("network", function()
		if net.netns_exists(self.netns) then net.netns_delete(self.netns) end
	end)
	fault.point("netns")
	net.tap_create(self.netns, { name = n.tap, addr = n.host_ip .. "/" .. n.prefix, mac = n.tap_mac,
		guest_ip = n.guest_ip, guest_mac = n.guest_mac })
	fault.point("tap")
	self.timer:stage("network")
	local p = self.net_policy
	if p.mode ~= "none" or #p.publish > 0 then
		netpolicy.apply(self, p)
		self.timer:stage("network policy (" .. netpolicy.describe(p) .. ")")
	end
end

-- The guest's resolver: dnsmasq on the tap's address, when the VM has egress.
function Sandbox:resolver()
	return self.net_policy.mode ~= "none" and config.net.host_ip or nil
end

-- Grow the disk copy (a sparse file) and its ext4 to `bytes`, offline, before any VMM
-- has it: resize2fs extends the file itself and writes only the new metadata. The guest's
-- virtio-blk sees the file's size at boot, and its / is already that big.
local function grow(self, bytes)
	local have = fs.size(self.disk_path)
	if bytes == have then return end
	if bytes < have then
		error(string.format("sandbox: VM %s: disk size %s is smaller than its disk (%s): shrinking is not supported",
			self.id, mib(bytes), mib(have)), 0)
	end
	local ok, r = pcall(proc.run, { "resize2fs", "-f", self.disk_path, math.floor(bytes / 1024) .. "K" },
		{ timeout = 120 })
	if not ok then
		if tostring(r):match("^interrupted") then error(r, 0) end
		error(string.format("sandbox: cannot run resize2fs (%s): install e2fsprogs", tostring(r)), 0)
	end
	if r.timed_out or r.status ~= 0 then
		local last = ((r.stderr or "") .. "\n" .. (r.stdout or "")):match("([^\n]*%S[^\n]*)\n*$") or ""
		error(string.format("sandbox: VM %s: growing its disk to %s failed (resize2fs %s): %s", self.id, mib(bytes),
			r.timed_out and "timed out" or "exited " .. tostring(r.status or r.signal), last), 0)
	end
	self.disk_grown = true
	fault.point("disk-grown")
	self.timer:stage("disk grown to " .. mib(bytes))
end

local function remove_disk(self)
	local ok, err, errno = sys.unlink(self.disk_path)
	if not ok and errno ~= sys.errno.ENOENT then error("remove " .. self.disk_path .. ": " .. err, 0) end
end

-- Why a throw-away disk of src is a copy after all, or nil: it may be a qcow2 overlay.
local function overlay_refused(self, src)
	local size = fs.size(src)
	-- (a `disk` of src's own size, as `run --disk` with a snapshot made with it, grows nothing)
	if self.disk_bytes and self.disk_bytes ~= size then
		return "a disk grown with --disk is a copy (resize2fs grows its ext4)"
	end
	if not size or size % 512 ~= 0 then return "its size is not a whole number of 512-byte sectors" end
	if #src > 1023 then return "its path is longer than a qcow2 header holds (1023 bytes)" end
	local ok, why = self.vm:takes_overlay()
	return not ok and why or nil
end

-- A throw-away disk: an empty qcow2 file in the run directory whose every cluster reads
-- from src until the guest writes it (the QEMU driver gives the VMM src as a read-only
-- node below it: spec.rootfs_backing). Nothing to copy now, nothing to empty at teardown.
-- The overlay's clusters are 64 KiB with 2 KiB subclusters (extended L2 entries), so a
-- guest's 4 KiB write copies nothing from src (docs/DECISIONS.md, the entry on overlays).
M.OVERLAY = { cluster_size = 65536, extended_l2 = true }
local function overlay(self, src)
	self.disk_path = self.dir .. "/disk.qcow2"
	rootfs.qcow2_overlay(self.disk_path, fs.size(src), src, M.OVERLAY)
	self.disk_backing, self.disk_method = src, "overlay"
	self:on_destroy("disk", remove_disk)
	fault.point("disk")
	self.timer:stage("disk overlay (qcow2)")
	util.verbose("VM %s: disk: a qcow2 overlay on %s (read-only to the VMM; nothing copied)", self.id, src)
end

-- This VM's own copy of src (the image's disk, or a snapshot's) in its run directory,
-- grown to the size sandbox.new was given (`disk`), if any. opts.overlap (a restore's, a
-- cold boot's without --disk): a sparse copy takes only the disk's head now and the rest
-- while the VMM starts (sb:boot, sb:restore, through spec.prepare; any other use of the
-- disk finishes it first).
-- With throwaway_disk (sandbox.new) and a VMM that takes one, the VM gets a qcow2 overlay on
-- src instead (overlay below): nothing is copied.
M.DISK_HEAD = 65536 -- what QEMU reads of a disk before the guest runs: its first sector
function Sandbox:disk(src, opts)
	if self.throwaway_disk then
		local why = overlay_refused(self, src)
		if not why then return overlay(self, src) end
		util.verbose("VM %s: disk: a copy of %s (not an overlay: %s)", self.id, src, why)
	end
	self.disk_path = self.dir .. "/disk.ext4"
	local overlap = opts and opts.overlap and not self.disk_bytes
	self.disk_method = rootfs.copy(src, self.disk_path, overlap and { head = M.DISK_HEAD } or nil)
	self:on_destroy("disk", remove_disk)
	if overlap and self.disk_method == "sparse" and (fs.size(src) or 0) > M.DISK_HEAD then
		self.disk_rest = src
	end
	fault.point("disk")
	self.timer:stage(self.disk_rest and "disk head (sparse)" or "disk copy (" .. self.disk_method .. ")")
	if self.disk_bytes then grow(self, self.disk_bytes) end
end

-- The rest of a disk copy begun with its head (sb:disk{overlap = true}); nothing if none.
local function finish_disk(self)
	local src = self.disk_rest
	if not src then return end
	local t0 = runtime.now()
	rootfs.copy_rest(src, self.disk_path, M.DISK_HEAD)
	self.disk_rest = nil
	fault.point("disk-rest")
	util.verbose("VM %s: rest of the disk copy (sparse) %.1f ms", self.id, (runtime.now() - t0) * 1e3)
end

-- What the VMM needs to boot this image (also what a restore must repeat exactly).
function Sandbox:boot_spec()
	local img = self.img
	return {
		kernel = self.vm.vmm == "firecracker" and (img.vmlinux or img.kernel) or img.kernel,
		initrd = img.initrd,
		boot_args = image.boot_args(img, { tcg = self.vm.vmm == "qemu" and self.vm.accel == "tcg",
			dns = self:resolver() }),
		rootfs = self.disk_path, vcpu = self.vcpu, mem_mib = self.mem_mib,
		rootfs_backing = self.disk_backing, -- (a qcow2 overlay's golden disk: sb:disk)
		-- unless its manifest says otherwise (image import --cmdline-devices), an image's
		-- kernel finds its virtio devices through ACPI only
		acpi_devices = not img.cmdline_devices,
		-- the agent's channel (QEMU: virtio-serial ports), when the image has the agent
		agent_ports = self.vm.vmm == "qemu" and image_has_agent(img) and guest.AGENT_PORTS or nil,
	}
end

-- What another process needs to reach this VM's VMM again (sandbox.attach: exec, pause,
-- snapshot --from) and to restore it after a pause: in the record of a kept VM.
local function record_vmspec(self)
	if not self.keep then return end
	local v = self.vm
	state.update(self.rec, { vmspec = {
		vmm = v.vmm, accel = v.accel, vmm_version = v.vmm_version, vcpu = self.vcpu, mem_mib = self.mem_mib,
		cpus = self.cpus, spec = v:saved_spec(),
	} })
end

-- Is an undo called `name` still on the cleanup stack?
local function pending(self, name)
	for _, u in ipairs(self.undo) do
		if u.name == name then return true end
	end
	return false
end

-- The VMM's undo: kill it, reap it, close its clients (vm:destroy never raises).
local function push_vmm_undo(self, name)
	self:on_destroy(name, function()
		-- SIGKILL first: the VMM's exit (which frees a restored VM's RAM, ~9 ms for 60 MiB)
		-- runs while we empty this VM's disk copy, when its undo (which removes it) is still
		-- to come: its page cache and blocks are freed by us now rather than after the
		-- VMM's last descriptor; then the VMM is reaped
		self.vm:kill()
		-- (an overlay holds only what the guest wrote: nothing worth emptying first)
		if self.disk_path and not self.disk_backing and pending(self, "disk") then sys.truncate(self.disk_path, 0) end
		self.vm:destroy()
		fault.point("teardown-vmm")
	end)
end

function Sandbox:boot()
	self.how = "cold"
	self:limit()
	local spec = self:boot_spec()
	-- the rest of the disk copy, while the VMM starts (QEMU: paused until it is done)
	if self.disk_rest then spec.prepare = function() finish_disk(self) end end
	self.agent_ports = spec.agent_ports -- (recorded with the VMM: record_vmm)
	stage(self, "VMM boot (" .. self.vm.vmm .. ")", self.vm.boot, self.vm, spec)
	push_vmm_undo(self, "boot")
	record_vmspec(self)
end

-- Restore from a loaded snapshot (fireclaw.snapshot.load); the disk must be a copy of the
-- snapshot's own disk.ext4.
function Sandbox:restore(snap)
	self.how = "snapshot"
	-- the saved VM's memory knows its disk as it was: a grown one would be corrupted
	if self.disk_grown then
		error(string.format("sandbox: VM %s: a restore keeps its snapshot's disk (%s); a different disk size "
			.. "needs a cold boot", self.id, mib(fs.size(snap.disk) or 0)), 0)
	end
	local spec = self:boot_spec()
	spec.vcpu, spec.mem_mib = snap.vcpu, snap.mem_mib
	spec.rootfs_path_in_vmm = snap.vmm_info and snap.vmm_info.rootfs_path_in_vmm
	spec.clock_realtime = true -- Firecracker sets the guest clock where it can (>= 1.16)
	spec.rng = snap.vmm_info and snap.vmm_info.rng -- the same devices as the snapshot
	spec.agent_ports = snap.vmm_info and snap.vmm_info.agent_ports
	-- the agent's port connected before the VM runs (QEMU: see its driver's restore)
	spec.agent_early = self.exec_mode ~= "ssh" and image_has_agent(self.img)
	spec.vsock = snap.vmm_info and snap.vmm_info.vsock or nil -- Firecracker: rebound at its path
	-- the rest of the disk copy, while the VMM starts (before it reads the disk)
	if self.disk_rest then spec.prepare = function() finish_disk(self) end end
	self.vcpu, self.mem_mib = snap.vcpu, snap.mem_mib
	self:limit()
	self.agent_ports = spec.agent_ports -- (recorded with the VMM: record_vmm)
	stage(self, "VMM restore (" .. self.vm.vmm .. ")", self.vm.restore, self.vm, snap.dir, spec)
	push_vmm_undo(self, "restore")
	record_vmspec(self)
end

-- The guest's console is the guest's: a line of it is printed only as printable ASCII
-- (no escape sequences reach the user's terminal), cut at CONSOLE_LINE bytes.
local CONSOLE_LINES, CONSOLE_LINE = 8, 160

local function printable(line)
	line = line:gsub("\27%[[%d;?]*[%a@]", ""):gsub("[%z\1-\31\127-\255]", "?")
	if #line > CONSOLE_LINE then line = line:sub(1, CONSOLE_LINE) .. "…" end
	return line
end

-- The console's tail (the last 8 KiB at most: the file may be capped, only its tail is
-- read) as text to search, and its last lines made printable.
local function console_tail(self)
	local text = self.vm and vm.log_tail(self.vm.console_path, 200) or ""
	local lines = {}
	for line in text:gmatch("[^\r\n]+") do
		if line:find("%S") then lines[#lines + 1] = printable(line) end
	end
	return text, { unpack(lines, math.max(1, #lines - CONSOLE_LINES + 1)) }
end

-- The first console line containing `pattern`, printable, or nil.
local function console_line(text, pattern)
	for line in text:gmatch("[^\r\n]+") do
		if line:find(pattern) then return printable((line:gsub("^%[[%s%d.]+%]%s*", ""))) end
	end
end

-- Why a guest likely never answered, from its console and how its VMM was chosen.
local function likely_cause(self, text, exited)
	local v = self.vm
	local root = console_line(text, "VFS: Unable to mount root") or console_line(text, "Cannot open root device")
		or console_line(text, "fireclaw%-initrd: root device .- did not appear")
		or console_line(text, "fireclaw%-initrd: cannot mount")
	if root then
		return "the kernel cannot find or mount its root disk (check root= in the image's boot args, and that "
			.. "its kernel or initrd has virtio_mmio and virtio_blk); the console says: " .. root
	end
	local panic = console_line(text, "Kernel panic %- not syncing")
	if panic then return "the guest kernel panicked: " .. panic end
	if v.vmm == "qemu" and v.accel == "kvm" and v.kvm == "kvm_pvm" then
		return "KVM was forced (" .. tostring(v.accel_source) .. "), but this host's " .. tostring(v.kvm_why)
			.. ": unset it, and fireclaw uses QEMU with TCG"
	end
	if v.vmm == "firecracker" and v.kvm ~= "hardware" then
		return "Firecracker needs hardware KVM, and " .. tostring(v.kvm_why) .. " (" .. tostring(v.vmm_source)
			.. "; use --vmm qemu)"
	end
	if v.vmm == "qemu" and v.accel_source ~= "auto" then
		return "the accelerator was forced (" .. tostring(v.accel_source) .. ")" .. (v.accel == "tcg"
			and ": TCG boots far slower than KVM (give it longer with --boot-timeout, or unset it)"
			or ": unset it to let fireclaw choose")
	end
	if not text:find("%S") then
		return "the guest printed nothing on its console: its kernel did not start"
	end
	if exited then return "the VM stopped before it finished booting (its console is below)" end
	if text:find(guest.READY, 1, true) then
		return "the guest says it is ready, but its SSH server did not answer on " .. config.net.guest_ip
			.. ":22 (its network setup: ip= in the boot args; its sshd)"
	end
	return "the guest did not finish booting in time (its console is below; --boot-timeout gives it longer)"
end

-- err, or when the VMM has exited, one line saying how; with `diagnose`, the likely cause
-- and the console's last lines follow (a boot that never answered).
local function vmm_gone(self, err, when, diagnose)
	local oom = self.cg and cgroup.oom_kills(self.cg.dirs) > 0
	-- an OOM kill may reach us (a dropped connection) before the VMM is reaped
	-- a VMM that exits closes the agent's socket a moment before it can be reaped
	local closed = type(err) == "string" and err:match("^agent: .*the channel closed")
	local st = self.vm and self.vm.proc and self.vm.proc:wait((oom and 2) or (closed and 1) or 0)
	if oom and st then
		return string.format("VM %s: %s was killed by the kernel's OOM killer %s: the VM's memory limit "
			.. "(%d MiB, cgroup %s) was reached", self.id, self.vm.vmm, when,
			math.floor(self.cg.limits.memory / 1048576), self.cg.dirs[1])
	end
	local msg = type(err) == "table" and tostring(err.message or err) or tostring(err)
	if st then
		msg = string.format("VM %s: %s %s %s", self.id, self.vm.vmm, util.describe_exit(st), when)
	end
	if not diagnose then
		if not st then return err end
		return msg
	end
	local text, lines = console_tail(self)
	msg = msg .. "; likely cause: " .. likely_cause(self, text, st ~= nil)
	if #lines == 0 then return msg .. " (the console is empty)" end
	return msg .. "\nthe console ends with:\n  " .. table.concat(lines, "\n  ")
end

-- A sandbox that was destroyed cannot be used again: say so, not what its dead VMM says.
local function alive(self, what)
	if self.released then
		error(string.format("sandbox: cannot %s: VM %s was released (kept running; remove it with "
			.. "fireclaw rm %s)", what, self.id, self.id), 0)
	elseif self.destroyed then
		error(string.format("sandbox: cannot %s: VM %s was destroyed (sb:destroy()); make a new sandbox",
			what, self.id), 0)
	end
end

-- Every wait on the guest also watches the VMM: a VM whose VMM died never answers again.
function Sandbox:connect(timeout)
	alive(self, "connect")
	timeout = timeout or self.boot_timeout
	local ok, session = pcall(ssh.connect, {
		netns = self.netns, host = config.net.guest_ip, port = 22, user = "root",
		key = self.img.client_key, host_key = self.img.host_key, timeout = timeout or 60,
		watch_fd = self.vm.proc and self.vm.proc:pidfd() or self.vm.pidfd,
		watch_msg = string.format("the VM is gone (%s, pid %s, exited)", self.vm.vmm, tostring(self.vm.pid)),
	})
	if not ok then
		self.timer:stage("SSH wait (failed)") -- the wait's time is the wait's, not teardown's
		if type(session) ~= "string" or session:match("^interrupted") then error(session, 0) end -- Ctrl-C
		error(vmm_gone(self, session, "before its SSH server answered", not self.attached), 0)
	end
	if not self.session then
		self:on_destroy("connect", function()
			self.session:close()
			fault.point("teardown-session")
		end)
	end
	self.session = session
	fault.point("ssh-ready")
	self.timer:stage("SSH ready")
	return self.session
end

-- The rest of the first complete console line starting with `prefix`, read as it grows;
-- nil when the VMM exited or `timeout` s passed without it (then also "gone" or "timeout").
local function console_wait_line(self, prefix, timeout)
	local path, offset, carry = self.vm.console_path, 0, ""
	local function look()
		local f = io.open(path, "rb")
		if f then
			f:seek("set", offset)
			local new = f:read(65536) or ""
			f:close()
			offset = offset + #new
			carry = carry .. new
			for line in carry:gmatch("([^\n]*)\n") do
				local at = line:find(prefix, 1, true)
				if at then return line:sub(at + #prefix) end
			end
			carry = carry:match("[^\n]*$"):sub(-4096) -- (a line longer than that is not ours)
		end
		if not self.vm:_alive() then return false end
		return nil
	end
	local rest = util.poll(look, timeout)
	if rest then return rest end
	return nil, rest == false and "gone" or "timeout"
end

-- An imported image's agent is started by its init shim, whose console line names the
-- channels it serves (guest.AGENT_CHANNELS): the image's own kernel may have neither
-- virtio_console (QEMU's channel) nor vsock (Firecracker's). A cold boot reads that line
-- rather than wait its whole timeout for an agent that cannot answer. Returns whether the
-- VMM's channel is there; without it, self.agent_missing says why and the VM's record no
-- longer offers agent ports. A VMM that exits first: false, and the SSH wait that follows
-- says why it exited.
function Sandbox:shim_channels(timeout)
	if self.shim_ok ~= nil then return self.shim_ok end
	local rest, why = console_wait_line(self, guest.AGENT_CHANNELS, timeout or self.boot_timeout or 60)
	if why == "timeout" then
		self.timer:stage("agent line wait (failed)")
		error(vmm_gone(self, string.format("VM %s: no '%s' line on its console within %gs (the image's agent "
			.. "starts as init=%s: is the console on ttyS0, console=ttyS0 in its boot args? or import it with "
			.. "--no-agent)", self.id, guest.AGENT_CHANNELS, timeout or self.boot_timeout or 60, guest.BOX_AGENT),
			"", true), 0)
	end
	if why == "gone" and self.exec_mode == "agent" then
		error(vmm_gone(self, "the VMM exited", "before its agent started", true), 0)
	end
	-- (the guest's bytes: a line that does not parse is no channel)
	local ports, vsock = (rest or ""):match("ports=(%d+) vsock=(%d)")
	local want_ports = (self.vm.spec and self.vm.spec.agent_ports or 0) > 0
	self.shim_ok = rest ~= nil and ((want_ports and (tonumber(ports) or 0) > 0)
		or (self.vm.driver.agent_channel ~= nil and vsock == "1")) or false
	if not self.shim_ok then
		self.agent_missing = rest and string.format("its kernel gave the agent no %s (the agent found ports=%s "
			.. "vsock=%s; its kernel needs %s)", want_ports and "virtio-serial port" or "vsock device", ports or "?",
			vsock or "?", want_ports and "virtio_console" or "vsock and vmw_vsock_virtio_transport")
			or "the VMM exited before the agent started"
		if self.rec then state.update(self.rec, { agent = { ports = 0 } }) end
		log.info("VM %s: no agent channel: %s", self.id, self.agent_missing)
	end
	self.timer:stage("agent line")
	return self.shim_ok
end

-- Can this VM's commands go through the agent? (exec mode, image, a channel in the VMM;
-- for an image whose agent an init shim starts, the channels its console line names)
function Sandbox:agent_usable()
	if self.exec_mode == "ssh" or not image_has_agent(self.img) or not self.vm then return false end
	if self.img.guest.agent_start == "init-shim" and self.how == "cold" and not self:shim_channels() then
		return false
	end
	if self.vm.driver.agent_channel then return true end
	return (self.vm.spec and self.vm.spec.agent_ports or 0) > 0
end

-- Connect to the guest agent (waiting up to the boot timeout for it to answer), watching
-- the VMM like connect() does. Any process can do this for a kept VM (fireclaw.agent).
-- A restored guest answers at once, but QEMU may not read the first connection of a restore:
-- after AGENT_RETRY s without an answer, a new one (agent.attach's retry). A cold boot's
-- agent answers once the guest is up: no retry.
M.AGENT_RETRY = 0.3

function Sandbox:agent_connect(timeout)
	alive(self, "connect")
	timeout = timeout or self.boot_timeout or 60
	local ok, conn, why = pcall(self.vm.agent_connect, self.vm, {
		timeout = timeout, where = "VM " .. self.id, retry = self.how == "snapshot" and M.AGENT_RETRY or nil,
		watch_fd = self.vm.proc and self.vm.proc:pidfd(),
		watch_msg = string.format("the VM is gone (%s, pid %s, exited)", self.vm.vmm, tostring(self.vm.pid)),
	})
	if ok and not conn then ok, conn = false, string.format("sandbox: VM %s: no agent: %s", self.id, why) end
	if not ok then
		self.timer:stage("agent wait (failed)")
		if type(conn) ~= "string" or conn:match("^interrupted") then error(conn, 0) end
		error(vmm_gone(self, conn, "before its agent answered", true), 0)
	end
	if not self.agent then
		self:on_destroy("agent", function()
			if self.agent then self.agent:close() end
			fault.point("teardown-agent")
		end)
	end
	self.agent = conn
	local info = conn:info()
	if (info.reconnects or 0) > 0 then
		util.verbose("VM %s: the agent answered on connection %d (a restored QEMU did not read the "
			.. "first: docs/guest-notes.md)", self.id, info.reconnects + 1)
	end
	fault.point("agent-ready")
	self.timer:stage("agent ready")
	return conn
end

-- The channel commands use: the agent when usable (exec = "auto" | "agent"), else SSH.
function Sandbox:connect_exec(timeout)
	if self:agent_usable() then
		local a = self:agent_connect(timeout)
		self:guest_network()
		return a
	end
	if self.exec_mode == "agent" then
		if self.agent_missing then
			error(string.format("sandbox: VM %s has no agent channel: %s (use --exec ssh)", self.id,
				self.agent_missing), 0)
		end
		error(string.format("sandbox: VM %s has no agent channel (a snapshot taken without one? make a new one: "
			.. "fireclaw snapshot create)", self.id), 0)
	end
	return self:connect(timeout)
end

-- dropbear refuses an exec request longer than 9000 bytes (its MAX_CMD_LEN) and drops the
-- connection: a longer command line is written to a file in the guest first (the stdin of
-- a short command) and run from there; the file removes itself.
local MAX_EXEC_LINE = 8000

local function short_command(self, cmd)
	local line = type(cmd) == "table" and ssh.quote(cmd) or cmd
	if type(line) ~= "string" or #line <= MAX_EXEC_LINE then return cmd end
	local file = "/tmp/.fireclaw-cmd-" .. state.new_id()
	local r = self.session:exec("umask 077 && cat > " .. file, { stdin = 'rm -f -- "$0"\n' .. line .. "\n" })
	if r.status ~= 0 then
		error(string.format("sandbox: cannot write the %d-byte command line to %s in the guest: %s",
			#line, file, r.stderr or ""), 0)
	end
	return "sh " .. file
end

-- Through the agent: an argv as it is, a shell string through /bin/sh -c.
local function agent_exec(self, cmd, opts)
	-- a shell line goes through the image's shell (a boxed image's own, /.fireclaw's)
	local g = type(self.img.guest) == "table" and self.img.guest or {}
	local argv = type(cmd) == "table" and cmd or { g.login_shell or "/bin/sh", "-c", cmd }
	if opts and type(opts.pty) == "table" and opts.pty.term then -- TERM goes in the environment
		local o, env = {}, {}
		for k, v in pairs(opts) do o[k] = v end
		for k, v in pairs(opts.env or {}) do env[k] = v end
		env.TERM = env.TERM or opts.pty.term
		o.env, o.pty = env, { rows = opts.pty.rows, cols = opts.pty.cols }
		opts = o
	end
	local ok, r = pcall(self.agent.exec, self.agent, argv, opts)
	if not ok then error(vmm_gone(self, r, "during the command"), 0) end
	return r
end

-- Run a command in the guest (argv table or shell string); opts: fireclaw.ssh's exec
-- options (the agent also takes cwd, uid, gid, forward_sigint; SSH ignores forward_sigint).
function Sandbox:exec(cmd, opts)
	alive(self, "exec")
	if not self.session and not self.agent then self:connect_exec() end
	-- a terminal forwarded as it is (run -it, shell, exec -it: opts.tty) goes raw to the
	-- guest's PTY over either channel; its size follows SIGWINCH (RESIZE frames / SSH's
	-- window-change)
	if self.agent then
		fault.point("exec")
		return agent_exec(self, cmd, opts)
	end
	if opts and opts.forward_sigint ~= nil then
		local o = {}
		for k, v in pairs(opts) do if k ~= "forward_sigint" then o[k] = v end end
		opts = o
	end
	fault.point("exec")
	local ok, r = pcall(function() return self.session:exec(short_command(self, cmd), opts) end)
	if not ok then error(vmm_gone(self, r, "during the command"), 0) end
	return r
end

-- Run a command with its output streamed to ours; its exit status (128 if it had none).
function Sandbox:exec_streaming(cmd, opts)
	opts = opts or {}
	opts.on_stdout = function(d) io.stdout:write(d) io.stdout:flush() end
	opts.on_stderr = function(d) io.stderr:write(d) io.stderr:flush() end
	local r = self:exec(cmd, opts)
	return r.status or 128, r
end

local function host_entropy(n)
	local f = io.open("/dev/urandom", "rb")
	local b = f and f:read(n)
	if f then f:close() end
	if not b or #b ~= n then error("sandbox: cannot read " .. n .. " bytes from the host's /dev/urandom", 0) end
	return b
end

local function now_ns()
	local sec, nsec = sys.clock_gettime(sys.CLOCK.REALTIME)
	if not sec then return os.time() * 1e9 end
	return sec * 1e9 + nsec
end

-- The guest's words, capped: one line for an error message.
local function first_line(s)
	return ((s or ""):match("[^\r\n]*"):sub(1, 200):gsub("[%c\128-\255]", "?"))
end

local warned_helper = {}

-- Make this VM unique and current before anything else runs in it: host entropy (64 bytes
-- of /dev/urandom) credited to the guest's pool and its CRNG reseeded at once, and its clock
-- set to the host's with sub-second precision — one exec, one round trip (the helper
-- /usr/sbin/fireclaw-guest, see guest/fireclaw-guest.c). Every clone of a snapshot wakes up
-- with the same CRNG state and the snapshot's clock: without this, clones print the same
-- "random" bytes and UUIDs. An image without the helper (imported, or built by an older
-- fireclaw) only gets the bytes mixed in (not reseeded at once) and whole seconds, with a note.
function Sandbox:reseed()
	if self.agent then return self:handoff() end
	local entropy = host_entropy(guest.RESEED_BYTES)
	local g = self.img.guest
	if type(g) == "table" and g.helper == guest.HELPER then
		local r = self:exec(guest.reseed_command(now_ns(), self:resolver()), { stdin = entropy })
		if r.status ~= 0 then
			error(string.format("sandbox: VM %s: reseeding the guest failed (%s exited %s): %s", self.id, guest.HELPER,
				tostring(r.status or r.signal), first_line(r.stderr)), 0)
		end
	else
		local dns = self:resolver()
		local r = self:exec(string.format("cat >/dev/urandom && date -s @%d >/dev/null", os.time())
			.. (dns and string.format(" && echo 'nameserver %s' >/etc/resolv.conf", dns) or ""), { stdin = entropy })
		if r.status ~= 0 then error("sandbox: setting the guest clock failed: " .. first_line(r.stderr), 0) end
		if not warned_helper[self.img.name] then
			warned_helper[self.img.name] = true
			log.note("image '%s' has no %s: restored VMs are not reseeded at once (rebuild it: fireclaw image build --force)",
				self.img.name, guest.HELPER)
		end
	end
	fault.point("reseeded")
	self.timer:stage("reseed + clock")
end

-- The restore hand-off through the agent: the host's clock (ns) and 64 bytes of its
-- entropy in one frame; the agent sets the clock, credits the bytes, reseeds the CRNG and
-- acks — before any command (frames on a channel are handled in order). With egress, the
-- VM's resolver goes in the same write (the snapshot's /etc/resolv.conf is the snapshot's).
function Sandbox:handoff()
	if not self.agent then self:agent_connect() end
	local ok, err = pcall(self.agent.handoff, self.agent, now_ns(), host_entropy(guest.RESEED_BYTES), nil,
		self:resolver())
	if not ok then error(vmm_gone(self, err, "during the restore hand-off"), 0) end
	fault.point("reseeded")
	self.timer:stage("hand-off (clock + entropy)")
end

-- Does the image's init configure the network before its agent answers? fireclaw's own
-- images: yes (the initramfs's /init, guest/fireclaw-init.c, sets the network, then starts
-- the agent). An imported image's agent (started by its init shim) runs beside the image's
-- own init, which configures the network when it gets to it.
local function network_before_agent(img)
	local g = img.guest
	return image_has_agent(img) and g.agent_start ~= "init-shim"
end

-- A cold boot through the agent, with a network policy, in an image whose agent may answer
-- before its init has configured the network: one exec waits (bounded) for the guest's
-- default route and writes its resolver. (Over SSH it is not needed: sshd starts after the
-- network. fireclaw's own images configure the network before the agent starts, from ip=,
-- the resolver included.)
function Sandbox:guest_network()
	local p = self.net_policy
	if not self.agent or (p.mode == "none" and #p.publish == 0) then return end
	if network_before_agent(self.img) then return end
	local line = "n=500; until ip route 2>/dev/null | grep -q '^default'; do n=$((n - 1)); "
		.. "[ $n -gt 0 ] || exit 3; usleep 10000; done"
	local dns = self:resolver()
	if dns then line = line .. string.format(" && echo 'nameserver %s' >/etc/resolv.conf", dns) end
	local r = self:exec(line)
	if r.status ~= 0 then
		error(string.format("sandbox: VM %s: the guest's network is not configured (%s)", self.id,
			r.status == 3 and "no default route after 5 s" or first_line(r.stderr)), 0)
	end
	self.timer:stage("guest network")
end

-- The clock is set with the reseed (one path, one round trip).
Sandbox.set_clock = Sandbox.reseed

-- Copy files in and out (SFTP); opts is a mode or {mode =, max_bytes =, stall =, uid =, gid =}
-- (see fireclaw.ssh: a got file is data, never privileges; both are capped and time out
-- when they stall). Each returns the path it wrote (a directory target gets the basename).
-- Through the agent a directory goes as a tree (fireclaw.agent.put_tree / get_tree: file by
-- file, with the same caps; symlinks and special files are left out, with a note).
local function tree_opts(opts)
	return type(opts) == "table" and { max_bytes = opts.max_bytes, stall = opts.stall } or nil
end

local function note_skipped(self, what, skipped)
	if #skipped > 0 then
		log.note("VM %s: %s: %d symlinks or special files not copied (e.g. %s)", self.id, what, #skipped,
			printable(skipped[1]))
	end
end

function Sandbox:put(localpath, remote, opts)
	alive(self, "put")
	if not self.session and not self.agent then self:connect_exec() end
	if self.agent and fs.is_dir(localpath) then
		local top, skipped = require("fireclaw.agent").put_tree(self.agent, localpath, remote, tree_opts(opts))
		note_skipped(self, "put " .. localpath, skipped)
		return top
	end
	if self.agent then return self.agent:put(localpath, remote, opts) end
	return self.session:put(localpath, remote, opts)
end
function Sandbox:get(remote, localpath, opts)
	alive(self, "get")
	if not self.session and not self.agent then self:connect_exec() end
	if self.agent then
		local ok, res = pcall(self.agent.get, self.agent, remote, localpath, opts)
		if ok then return res end
		if not tostring(res):match(": is a directory$") then error(res, 0) end
		local top, skipped = require("fireclaw.agent").get_tree(self.agent, remote, localpath, tree_opts(opts))
		note_skipped(self, "get " .. remote, skipped)
		return top
	end
	return self.session:get(remote, localpath, opts)
end

-- Directory trees in and out (fireclaw cp); see fireclaw.tree for the checks and caps
-- (opts: max_bytes, max_total, max_entries, timeout). Over SSH: a tar stream in one exec.
-- Each returns the number of entries copied.
function Sandbox:put_tree(localdir, remote, opts)
	alive(self, "put")
	return require("fireclaw.tree").put(self, localdir, remote, opts)
end
function Sandbox:get_tree(remote, localdir, opts)
	alive(self, "get")
	return require("fireclaw.tree").get(self, remote, localdir, opts)
end

-- How to reach a VM kept with --keep, and how to remove it.
-- The guest's host key goes into a known_hosts file in the VM's directory, so the hint
-- keeps the pinning (no StrictHostKeyChecking=no).
function Sandbox:reach_hint()
	local known = self.dir .. "/known_hosts"
	require("fireclaw.fs").write(known, config.net.guest_ip .. " " .. self.img.host_key .. "\n", "600")
	return string.format("VM %s is still running (vmm pid %s).\n"
		.. "  reach it: ip netns exec %s ssh -i %s -o UserKnownHostsFile=%s root@%s\n"
		.. "  use it: fireclaw exec %s -- CMD, fireclaw shell %s, fireclaw cp FILE %s:/root/\n"
		.. "  remove it: fireclaw rm %s\n",
		self.id, tostring(self.vm.pid), self.netns, self.img.client_key, known, config.net.guest_ip, self.id,
		self.id, self.id, self.id)
end

-- Tear everything down: the cleanup stack, last step first, every undo tried even when one
-- fails. Never raises (it runs on error paths and from signals); returns true, or nil and
-- the failures as a list of "step: error" (each also a note: visible unless -q; what the
-- record still lists, `fireclaw cleanup` reaps). A second call returns true at once.
-- While it runs, an undo can still use what is not undone yet (sb:exec, sb:get before
-- the session's undo).
function Sandbox:destroy()
	if self.destroyed or self.destroying then return true end
	self.destroying = true
	local failed, took = {}, {}
	for i = #self.undo, 1, -1 do
		local u = self.undo[i]
		self.undo[i] = nil
		local t0 = runtime.now()
		local ok, err = pcall(u.fn, self)
		took[#took + 1] = string.format("%s %.1f", u.name, (runtime.now() - t0) * 1e3)
		if not ok then
			failed[#failed + 1] = u.name .. ": " .. tostring(err)
			log.note("VM %s: %s", self.id, u.name == "record" and tostring(err) or "teardown of step '" .. u.name
				.. "' failed: " .. tostring(err))
		end
	end
	self.destroyed = true
	log.info("VM %s: teardown: %s ms", self.id, table.concat(took, ", "))
	self.timer:stage("teardown")
	if #failed > 0 then return nil, failed end
	return true
end

-- Leave the VM running after fireclaw exits (--keep): its record says so, and cleanup
-- leaves it alone until `fireclaw rm ID` or `cleanup --all`.
function Sandbox:release()
	if self.attached then -- another process's VM: only what this process opened goes
		self:destroy()
		self.released = true
		return
	end
	if self.session then pcall(self.session.close, self.session) end
	if self.agent then pcall(self.agent.close, self.agent) end
	if self.vm and self.vm.proc then self.vm.proc:detach() end
	for _, p in ipairs(self.net_procs) do p:detach() end -- its resolver and forwarders stay too
	state.release(self.rec)
	self.destroyed, self.released = true, true
end

-- ---- kept VMs, from any process ----
--
-- `fireclaw start` leaves a VM running with a record that says how to reach it (vmspec);
-- exec, cp, shell, pause, snapshot --from, from any process and several at once, attach:
-- each gets a sandbox of its own with its own channel (an agent port, else an SSH
-- session), whose destroy closes only that channel. Stopping the VM is state.reap (fireclaw stop).

-- The record of kept VM `ref` (id, name or namespace), checked for `what` ("exec into",
-- "pause", …): one line saying why not otherwise. allow_paused: a paused VM is fine.
function M.find_kept(ref, what, allow_paused)
	if type(ref) ~= "string" or ref == "" then error("sandbox: a VM id or name expected", 2) end
	state.reap_expired() -- an expired VM goes before anyone uses it
	local rec = state.find(ref)
	if not rec then
		error(string.format("no VM '%s' (see fireclaw ps; an expired one was removed)", ref), 0)
	end
	if not rec.keep then
		error(string.format("cannot %s VM %s: it is not a kept VM (it belongs to the fireclaw run of pid %s); "
			.. "start one with: fireclaw start", what, rec.id, tostring(rec.owner and rec.owner.pid)), 0)
	end
	local st = state.status(rec)
	if st == "paused" and not allow_paused then
		error(string.format("cannot %s VM %s: it is paused (fireclaw resume %s)", what, rec.id, ref), 0)
	elseif st == "stopped" then
		error(string.format("cannot %s VM %s: it is stopped, its VMM is gone (fireclaw stop %s removes it)", what,
			rec.id, ref), 0)
	elseif st ~= "running" and st ~= "paused" then
		error(string.format("cannot %s VM %s: it is %s", what, rec.id, st), 0)
	end
	return rec
end

-- A sandbox object for a kept VM's record, with no VMM yet and an empty cleanup stack.
local function adopt(rec)
	local vs = rec.vmspec or {}
	local self = setmetatable({
		id = rec.id, rec = rec, img = image.load(rec.image), netns = rec.netns, dir = rec.dir,
		vcpu = vs.vcpu or config.vcpu, mem_mib = vs.mem_mib or config.mem_mib, keep = true, attached = true,
		timer = log.timer("VM " .. rec.id), undo = {}, disk_path = rec.dir .. "/disk.ext4", how = "attached",
		exec_mode = config.exec or "auto",
		-- its network policy as made (its resolver and forwarders run on, owned by the record)
		net_policy = { mode = type(rec.net) == "table" and rec.net.mode or "none", publish = {} }, net_procs = {},
	}, Sandbox)
	return self
end

-- How long an attaching process waits for one of the agent's ports when all are taken
-- (exec = "auto": then it takes SSH, which has no such limit; exec = "agent" waits up to
-- its timeout and fails).
M.AGENT_PORT_WAIT = 2

-- The attached VM's channel: its agent (a free port of the record's, flock'ed) when the
-- image has it and exec is not "ssh", else SSH; SSH too when every port stays busy.
local function attach_channel(self, rec, timeout)
	local ports = type(rec.agent) == "table" and tonumber(rec.agent.ports)
	if self.exec_mode == "ssh" or not ports or ports < 1 or not image_has_agent(self.img) then
		if self.exec_mode == "agent" then
			error(string.format("VM %s has no agent channel (exec = agent; its image or snapshot has none: "
				.. "use --exec ssh)", rec.id), 0)
		end
		return self:connect(timeout)
	end
	local wait = self.exec_mode == "agent" and timeout or M.AGENT_PORT_WAIT
	local ok, conn = pcall(require("fireclaw.agent").attach_vm, rec,
		-- a restored VM's QEMU (start --snapshot, resume) may not read a port's first
		-- connection: a new hello after AGENT_RETRY s (the agent answers one at any time)
		{ timeout = timeout, wait = wait, retry = M.AGENT_RETRY, where = "VM " .. rec.id })
	if not ok then
		if self.exec_mode == "agent" or not tostring(conn):match("agent ports are busy") then
			error(vmm_gone(self, conn, "before its agent answered"), 0)
		end
		log.info("VM %s: every agent port is busy: over SSH", rec.id)
		return self:connect(timeout)
	end
	self:on_destroy("agent", function()
		if self.agent then self.agent:close() end
	end)
	self.agent = conn
	self.timer:stage("agent ready")
	return conn
end

-- A sandbox for running kept VM `ref`, connected (the agent, else SSH) and ready for
-- exec/put/get. opts.vmm = true: also drive its VMM (pause, snapshot; QEMU).
function M.attach(ref, opts)
	opts = opts_check.check("sandbox.attach", opts, { "what", "vmm", "timeout", "connect", "exec" })
	local rec = M.find_kept(ref, opts.what or "attach to")
	local self = adopt(rec)
	self.exec_mode = opts.exec or self.exec_mode
	if not M.EXEC_MODES[self.exec_mode] then
		error(string.format("exec must be auto, agent or ssh, not '%s' (--exec, FIRECLAW_EXEC)",
			tostring(self.exec_mode)), 0)
	end
	local v = rec.vmm
	if opts.vmm then
		self.vm = vm.attach { id = rec.id, dir = rec.dir, netns = rec.netns, tap = config.net.tap,
			mac = config.net.guest_mac, vmspec = rec.vmspec, pid = v.pid, starttime = v.start }
		self:on_destroy("attach", function() self.vm:destroy() end)
	else
		local fd = sys.pidfd_open(v.pid)
		if not fd or not proc.alive(v.pid, v.start) then
			if fd then sys.close(fd) end
			error(string.format("VM %s: its VMM (pid %s) is gone", rec.id, tostring(v.pid)), 0)
		end
		self.vm = { vmm = rec.vmspec and rec.vmspec.vmm or v.name, pid = v.pid, pidfd = fd,
			console_path = rec.dir .. "/console.log" }
		self:on_destroy("pidfd", function() sys.close(fd) end)
	end
	if opts.connect ~= false then attach_channel(self, rec, opts.timeout or 30) end
	return self
end

-- Bring paused kept VM `ref` back (fireclaw resume): a fresh VMM restores its saved
-- state, with its own disk, in its namespace; reseeded and its clock set (through the agent's
-- hand-off when the VM has it and exec is not "ssh", else over SSH). The saved state
-- goes once the guest answers; a resume that fails leaves the VM paused.
function M.resume_kept(ref)
	local rec = M.find_kept(ref, "resume", true)
	local p = rec.paused
	if not p then error(string.format("cannot resume VM %s: it is not paused", rec.id), 0) end
	local self = adopt(rec)
	local vs = rec.vmspec
	self.vm = vm.new { id = self.id, dir = self.dir, vmm = vs.vmm, accel = vs.accel,
		cmdline_devices = self.img.cmdline_devices, netns = self.netns, tap = config.net.tap,
		mac = config.net.guest_mac, keep = true, cgroup = nil, on_spawn = function() record_vmm(self) end }
	self.cpus = vs.cpus
	self.cg = plan_cgroup(self.id, self.mem_mib, vs.cpus)
	if self.cg then
		state.update(self.rec, { cgroups = self.cg.dirs })
		self.vm.cgroup = self.cg.procs
	end
	local snap = { dir = p.dir, vcpu = vs.vcpu, mem_mib = vs.mem_mib, vmm_info = p.info, disk = self.disk_path }
	local ok, err = pcall(function()
		self:restore(snap)
		self:connect_exec(self.boot_timeout or 60) -- its agent when it has one (then the hand-off), else SSH
		self:reseed()
	end)
	if not ok then
		self:destroy() -- the new VMM and its cgroups; the saved state stays
		error(err, 0)
	end
	rec.paused = nil
	state.update(rec, {})
	fs.rm_rf(p.dir)
	self.attached = false -- the VMM is ours now: released, not destroyed
	self:release()
	return self
end

-- Save kept VM `ref` (memory, devices; its disk stays in its run directory) under
-- $FIRECLAW_STATE/paused/<id> and end its VMM, freeing its RAM (fireclaw pause).
function M.pause_kept(ref)
	local sb = M.attach(ref, { what = "pause", vmm = true, connect = false })
	local dir = config.state_dir .. "/paused/" .. sb.id
	return M.with(sb, function()
		if fs.exists(dir) then fs.rm_rf(dir) end
		fs.mkdir_p(dir, "700")
		local ok, err = pcall(function()
			local info = sb.vm:snapshot(dir)
			sb.timer:stage("saved (" .. info.vmm .. ")")
			state.update(sb.rec, { paused = { dir = dir, info = info, at = os.time() } })
			local v, rec = sb.rec.vmm, sb.rec
			if not proc.kill(v.pid, v.start, sys.signal.SIGKILL, 5) and proc.alive(v.pid, v.start) then
				error("cannot stop its VMM (pid " .. tostring(v.pid) .. ")", 0)
			end
			if rec.sink and rec.sink.pid and rec.sink.start then proc.kill(rec.sink.pid, rec.sink.start, 9, 2) end
			if rec.cgroups then cgroup.remove(rec.cgroups) end
			rec.vmm, rec.sink, rec.cgroups = nil, nil, nil
			state.update(rec, {})
			sb.timer:stage("VMM stopped")
		end)
		if not ok then
			if sb.rec.paused and sb.rec.vmm then -- the VMM still runs: it goes on, not paused
				sb.rec.paused = nil
				state.update(sb.rec, {})
				pcall(sb.vm.resume, sb.vm)
			end
			if not sb.rec.paused then pcall(fs.rm_rf, dir) end
			error(string.format("cannot pause VM %s: %s", sb.id, tostring(err)), 0)
		end
		return sb
	end)
end

-- ---- named steps ----
--
-- A flow is a list of steps {name =, run = function(sb), undo = function(sb)}, run in order
-- by sandbox.build. The library's own steps register their undo themselves (the sb:network()
-- … methods do, so a hand-written flow is undone the same way); a step a recipe adds may
-- give `undo`, pushed on the cleanup stack once its run has succeeded. Modelled on
-- firecracker-go-sdk's handler lists (Append, AppendAfter, Swap, Remove).

local Steps = {}
Steps.__index = Steps
local STEP_KEYS = { "name", "run", "undo" }
local own_steps = setmetatable({}, { __mode = "k" }) -- the library's: their errors go on as they are

local function check_step(step, where)
	if type(step) ~= "table" then error(where .. ": a step is a table {name =, run =, undo =}", 2) end
	opts_check.check(where, step, STEP_KEYS)
	if type(step.name) ~= "string" or step.name == "" then error(where .. ": a step needs a name", 3) end
	if type(step.run) ~= "function" then error(where .. ": step '" .. step.name .. "' needs run = function(sb)", 3) end
	if step.undo ~= nil and type(step.undo) ~= "function" then
		error(where .. ": step '" .. step.name .. "': undo must be a function(sb)", 3)
	end
	return step
end

-- The position of step `name`; misuse (no such step) raises, naming the ones there are.
function Steps:index(name)
	for i, step in ipairs(self) do
		if step.name == name then return i end
	end
	error(string.format("sandbox steps: no step named '%s' (there are: %s)", tostring(name),
		table.concat(self:names(), ", ")), 2)
end

function Steps:has(name)
	for _, step in ipairs(self) do
		if step.name == name then return true end
	end
	return false
end

function Steps:names()
	local out = {}
	for i, step in ipairs(self) do out[i] = step.name end
	return out
end

local function add(self, pos, step, where)
	check_step(step, where)
	if self:has(step.name) then error(where .. ": there is a step named '" .. step.name .. "' already", 3) end
	table.insert(self, pos, step)
	return self
end

function Steps:append(step) return add(self, #self + 1, step, "steps:append") end
function Steps:insert_after(name, step) return add(self, self:index(name) + 1, step, "steps:insert_after") end
function Steps:insert_before(name, step) return add(self, self:index(name), step, "steps:insert_before") end

-- Replace step `name` with `step` (which may have another name).
function Steps:swap(name, step)
	local i = self:index(name)
	check_step(step, "steps:swap")
	if step.name ~= name and self:has(step.name) then
		error("steps:swap: there is a step named '" .. step.name .. "' already", 2)
	end
	self[i] = step
	return self
end

function Steps:remove(name)
	table.remove(self, self:index(name))
	return self
end

-- A list of steps: sandbox.steps.list{step, …}; the recipes' flows below.
local function list(steps)
	local l = setmetatable({}, Steps)
	for _, step in ipairs(steps or {}) do l:append(step) end
	return l
end

local function own(steps)
	local l = list(steps)
	for _, step in ipairs(l) do own_steps[step] = true end
	return l
end

M.steps = { list = list }

-- Cold boot from the image: network, disk, cgroup, boot, connect.
function M.steps.coldboot()
	return own {
		{ name = "network", run = function(sb) sb:network() end },        -- namespace fc-<id> with tap0
		{ name = "disk", run = function(sb) sb:disk(sb.img.rootfs, { overlap = true }) end }, -- the VM's copy (grown to `disk`; else its rest while the VMM starts)
		{ name = "cgroup", run = function(sb) sb:limit() end },           -- its limits, if there are cgroups
		{ name = "boot", run = function(sb) sb:boot() end },              -- the VMM boots the kernel
		{ name = "connect", run = function(sb) sb:connect_exec() end },   -- the agent, else sshd (pinned key)
	}
end

-- Does a snapshot have the agent's channel, speaking this fireclaw's protocol? (its
-- meta.json says which exec channels it has, and since protocol 2 which protocol; one of
-- an older agent restores over SSH)
local function snap_has_agent(snap)
	local ch = snap.exec_channels
	if type(ch) ~= "table" or snap.agent_protocol ~= agent.VERSION then return false end
	for _, c in ipairs(ch) do if c == "agent" then return true end end
	return false
end
M.snap_has_agent = snap_has_agent

-- Restore from a loaded snapshot: network, disk, cgroup, restore, then agent + handoff
-- when the snapshot has the agent (and exec is not "ssh"), else connect + reseed.
function M.steps.restore(snap, opts)
	if type(snap) ~= "table" or not snap.dir then
		error("sandbox.steps.restore: snap must be a snapshot from restore.find or snapshot.load", 2)
	end
	local exec = (opts and opts.exec) or config.exec or "auto"
	if exec ~= "ssh" and snap_has_agent(snap) then
		return own {
			{ name = "network", run = function(sb) sb:network() end },
			{ name = "disk", run = function(sb) sb:disk(snap.disk, { overlap = true }) end },
			{ name = "cgroup", run = function(sb)
				sb.vcpu, sb.mem_mib = snap.vcpu, snap.mem_mib
				sb:limit()
			end },
			{ name = "restore", run = function(sb) sb:restore(snap) end },
			{ name = "agent", run = function(sb) sb:agent_connect() end }, -- the agent's port, reconnected
			{ name = "handoff", run = function(sb) sb:handoff() end },     -- clock + entropy, acked
		}
	end
	if exec == "agent" then
		error(string.format("sandbox: snapshot '%s' has no agent channel (make a new one: fireclaw snapshot create)",
			tostring(snap.name)), 0)
	end
	return own {
		{ name = "network", run = function(sb) sb:network() end }, -- the same addresses and MACs
		{ name = "disk", run = function(sb) sb:disk(snap.disk, { overlap = true }) end }, -- the clone's copy (its rest: while the VMM starts)
		{ name = "cgroup", run = function(sb)                      -- limits for the snapshot's RAM
			sb.vcpu, sb.mem_mib = snap.vcpu, snap.mem_mib
			sb:limit()
		end },
		{ name = "restore", run = function(sb) sb:restore(snap) end }, -- device state + a copy of its memory
		{ name = "connect", run = function(sb) sb:connect() end },     -- the sshd running since the snapshot
		{ name = "reseed", run = function(sb) sb:reseed() end },       -- fresh entropy + clock: one exec
	}
end

-- Run one step; an error of a step a recipe brought names the step (the library's own
-- messages already say what failed, and stay one line).
local function run_step(sb, step)
	local ok, err = pcall(step.run, sb)
	if ok then
		if step.undo then sb:on_destroy(step.name, step.undo) end
		return
	end
	log.info("VM %s: step %s failed", sb.id, step.name)
	if own_steps[step] or type(err) ~= "string" or err:match("^interrupted") then error(err, 0) end
	error(string.format("sandbox: step '%s': %s", step.name, err), 0)
end

-- A new sandbox brought up by the steps (a list from sandbox.steps; or a function(sb));
-- if a step fails, the cleanup stack is run before the error goes on. Returns the
-- sandbox, ready for exec.
function M.build(opts, steps)
	opts_check.check("sandbox.build", opts, M.OPTIONS)
	if type(steps) == "function" then steps = list { { name = "steps", run = steps } } end
	if getmetatable(steps) ~= Steps then
		error("sandbox.build: steps must be a list from sandbox.steps (or a function(sb))", 2)
	end
	local sb = M.new(opts)
	sb.steps = steps:names()
	local ok, err = pcall(function()
		for _, step in ipairs(steps) do run_step(sb, step) end
	end)
	if not ok then
		sb:destroy()
		error(err, 0)
	end
	return sb
end

-- Where the time went, one line per stage (the standalone recipes print it).
function Sandbox:stage_report()
	local out = {}
	for _, s in ipairs(self.timer.stages) do out[#out + 1] = string.format("%-28s %8.1f ms\n", s.name, s.ms) end
	return table.concat(out)
end

-- Run fn(sb) and destroy the sandbox afterwards, whatever happens (error, Ctrl-C); a kept
-- sandbox is released instead when fn succeeds.
function M.with(sb, fn, ...)
	local res = { pcall(fn, sb, ...) }
	if sb.keep and res[1] then sb:release() else sb:destroy() end
	if not res[1] then error(res[2], 0) end
	return unpack(res, 2)
end

M.Sandbox = Sandbox
return M
