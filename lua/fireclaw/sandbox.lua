-- fireclaw.sandbox: one throw-away VM with everything around it — its record, its network
-- namespace and tap, its disk copy, the VMM, and an SSH session to the guest. The recipes
-- (coldboot, restore, run, snapshot) are sequences of these steps:
--
--   local sb = sandbox.new{image = "default", vcpu = 1, mem_mib = 256, vmm = "auto"}
--   sb:network()              -- namespace fc-<id> with tap0 (172.16.0.1/30, fixed MACs)
--   sb:disk(img.rootfs)       -- this VM's own copy (reflink or sparse)
--   sb:boot()                 -- or sb:restore(snap): the VMM, cold or from a snapshot
--   sb:connect()              -- SSH with the image's pinned host key
--   local r = sb:exec({"uname", "-a"}, {on_stdout = …})
--   sb:destroy()              -- everything above, undone; safe twice, never raises
--
-- The record (fireclaw.state) is written before anything else exists, so a fireclaw that
-- dies at any point is cleaned up by `fireclaw cleanup`. sb.timer has the stage times.
-- fault.point(NAME) marks where tests stop a run (FIRECLAW_FAULT, see fireclaw.fault).
local config = require "fireclaw.config"
local fault = require "fireclaw.fault"
local image = require "fireclaw.image"
local log = require "fireclaw.log"
local net = require "fireclaw.net"
local rootfs = require "fireclaw.rootfs"
local ssh = require "fireclaw.ssh"
local state = require "fireclaw.state"
local util = require "fireclaw.vmm.util"
local vm = require "fireclaw.vm"

local M = {}
local Sandbox = {}
Sandbox.__index = Sandbox

-- The VMM goes into the record the moment it exists (a kept VM has no PR_SET_PDEATHSIG).
local function record_vmm(self)
	state.update(self.rec, { vmm = { pid = self.vm.pid, start = self.vm.starttime, name = self.vm.vmm } })
	fault.point("vmm-recorded")
end

function M.new(opts)
	opts = opts or {}
	local img = image.load(opts.image or config.image)
	state.reap_stale() -- what a killed fireclaw left behind (one listdir when there is none)
	local rec = state.create { image = img.name, keep = opts.keep }
	local self = setmetatable({
		id = rec.id, rec = rec, img = img, netns = rec.netns, dir = rec.dir,
		vcpu = opts.vcpu or config.vcpu, mem_mib = opts.mem_mib or config.mem_mib,
		keep = opts.keep, timer = log.timer("VM " .. rec.id),
	}, Sandbox)
	-- a sandbox nobody destroyed goes when it is collected, at the latest when fireclaw exits
	-- (a recipe that errors before sandbox.with leaves nothing behind either)
	self.guard = newproxy(true)
	getmetatable(self.guard).__gc = function() if not self.keep then self:destroy() end end
	local ok, err = pcall(function()
		fault.point("record")
		self.vm = vm.new { id = self.id, dir = self.dir, vmm = opts.vmm, accel = opts.accel,
			netns = self.netns, tap = config.net.tap, mac = config.net.guest_mac, keep = opts.keep,
			on_spawn = function() record_vmm(self) end }
	end)
	if not ok then
		self:destroy()
		error(err, 0)
	end
	self.timer:stage("record")
	return self
end

function Sandbox:network()
	local n = config.net
	net.netns_create(self.netns)
	fault.point("netns")
	net.tap_create(self.netns, { name = n.tap, addr = n.host_ip .. "/" .. n.prefix, mac = n.tap_mac,
		guest_ip = n.guest_ip, guest_mac = n.guest_mac })
	fault.point("tap")
	self.timer:stage("network")
end

function Sandbox:disk(src)
	self.disk_path = self.dir .. "/disk.ext4"
	self.disk_method = rootfs.copy(src, self.disk_path)
	fault.point("disk")
	self.timer:stage("disk copy (" .. self.disk_method .. ")")
end

-- What the VMM needs to boot this image (also what a restore must repeat exactly).
function Sandbox:boot_spec()
	local img = self.img
	return {
		kernel = self.vm.vmm == "firecracker" and (img.vmlinux or img.kernel) or img.kernel,
		initrd = img.initrd,
		boot_args = image.boot_args(img, { tcg = self.vm.vmm == "qemu" and self.vm.accel == "tcg" }),
		rootfs = self.disk_path, vcpu = self.vcpu, mem_mib = self.mem_mib,
	}
end

function Sandbox:boot()
	self.how = "cold"
	self.vm:boot(self:boot_spec())
	self.timer:stage("VMM boot (" .. self.vm.vmm .. ")")
end

-- Restore from a loaded snapshot (fireclaw.snapshot.load); the disk must be a copy of the
-- snapshot's own disk.ext4.
function Sandbox:restore(snap)
	self.how = "snapshot"
	local spec = self:boot_spec()
	spec.vcpu, spec.mem_mib = snap.vcpu, snap.mem_mib
	spec.rootfs_path_in_vmm = snap.vmm_info and snap.vmm_info.rootfs_path_in_vmm
	spec.clock_realtime = true -- Firecracker sets the guest clock where it can (>= 1.16)
	self.vcpu, self.mem_mib = snap.vcpu, snap.mem_mib
	self.vm:restore(snap.dir, spec)
	self.timer:stage("VMM restore (" .. self.vm.vmm .. ")")
end

-- err, or when the VMM has exited, one line saying how (and what the guest said last).
local function vmm_gone(self, err, when, console)
	local st = self.vm and self.vm.proc and self.vm.proc:wait(0)
	if not st then return err end
	local last = {}
	for line in vm.log_tail(self.vm.console_path, 3):gmatch("[^\r\n]+") do last[#last + 1] = line end
	return string.format("VM %s: %s %s %s%s", self.id, self.vm.vmm, util.describe_exit(st), when,
		console and #last > 0 and ("; its console ends with: " .. table.concat(last, " | ")) or "")
end

-- Every wait on the guest also watches the VMM: a VM whose VMM died never answers again.
function Sandbox:connect(timeout)
	local ok, session = pcall(ssh.connect, {
		netns = self.netns, host = config.net.guest_ip, port = 22, user = "root",
		key = self.img.client_key, host_key = self.img.host_key, timeout = timeout or 60,
		watch_fd = self.vm.proc and self.vm.proc:pidfd(),
		watch_msg = string.format("the VM is gone (%s, pid %s, exited)", self.vm.vmm, tostring(self.vm.pid)),
	})
	if not ok then error(vmm_gone(self, session, "before its SSH server answered", true), 0) end
	self.session = session
	fault.point("ssh-ready")
	self.timer:stage("SSH ready")
	return self.session
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

-- Run a command in the guest (argv table or shell string); see fireclaw.ssh for opts.
function Sandbox:exec(cmd, opts)
	if not self.session then self:connect() end
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

-- Set the guest clock to the host's (a restored guest wakes up at snapshot time).
function Sandbox:set_clock()
	local r = self:exec(string.format("date -s @%d >/dev/null", os.time()))
	if r.status ~= 0 then error("sandbox: setting the guest clock failed: " .. (r.stderr or ""), 0) end
	self.timer:stage("clock set")
end

-- Copy files in and out (SFTP); opts is a mode or {mode =, max_bytes =, stall =, uid =, gid =}
-- (see fireclaw.ssh: a got file is data, never privileges; both are capped and time out
-- when they stall). Each returns the path it wrote (a directory target gets the basename).
function Sandbox:put(localpath, remote, opts) return self.session:put(localpath, remote, opts) end
function Sandbox:get(remote, localpath, opts) return self.session:get(remote, localpath, opts) end

-- How to reach a VM kept with --keep, and how to remove it.
-- The guest's host key goes into a known_hosts file in the VM's directory, so the hint
-- keeps the pinning (no StrictHostKeyChecking=no).
function Sandbox:reach_hint()
	local known = self.dir .. "/known_hosts"
	require("fireclaw.fs").write(known, config.net.guest_ip .. " " .. self.img.host_key .. "\n", "600")
	return string.format("VM %s is still running (vmm pid %s).\n"
		.. "  reach it: ip netns exec %s ssh -i %s -o UserKnownHostsFile=%s root@%s\n"
		.. "  remove it: fireclaw rm %s\n",
		self.id, tostring(self.vm.pid), self.netns, self.img.client_key, known, config.net.guest_ip, self.id)
end

-- Tear everything down; never raises (it runs on error paths and from signals).
function Sandbox:destroy()
	if self.destroyed then return end
	self.destroyed = true
	if self.session then pcall(self.session.close, self.session) end
	fault.point("teardown-session")
	if self.vm then pcall(self.vm.destroy, self.vm) end
	fault.point("teardown-vmm")
	local ok, err = pcall(state.reap, self.rec)
	if not ok then log.note("VM %s: cleanup incomplete (%s); run: fireclaw cleanup", self.id, tostring(err)) end
	self.timer:stage("teardown")
end

-- Leave the VM running after fireclaw exits (--keep): its record says so, and cleanup
-- leaves it alone until `fireclaw rm ID` or `cleanup --all`.
function Sandbox:release()
	if self.session then pcall(self.session.close, self.session) end
	if self.vm and self.vm.proc then self.vm.proc:detach() end
	self.destroyed = true
end

-- A new sandbox brought up by steps(sb); if a step fails, what the earlier ones made is
-- destroyed before the error goes on. Returns the sandbox, ready for exec.
function M.build(opts, steps)
	local sb = M.new(opts)
	local ok, err = pcall(steps, sb)
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
