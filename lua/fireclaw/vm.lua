-- fireclaw.vm: one VM object for both VMMs (Firecracker, QEMU microvm), the choice between
-- them, and what the host's KVM can do.
--
--   local v = vm.new{ id = "1a2b3c", dir = "/run/fireclaw/vms/1a2b3c",
--                     vmm = "auto" | "firecracker" | "qemu", accel = "auto" | "kvm" | "tcg",
--                     netns = "fc-1a2b3c", tap = "tap0", mac = "06:00:ac:10:00:02",
--                     -- optional: firecracker = path, qemu = path, env = {K = V} for the
--                     -- VMM process, socket_timeout = s (VMM start to API/QMP socket),
--                     -- on_spawn = fn(v): called as soon as v.pid is known (to record it),
--                     -- user = "auto" | "root" | "UID:GID": who QEMU runs as (config.vmm_user),
--                     -- detected = a vm.choose result (no second detection),
--                     -- cmdline_devices = the kernel takes virtio-mmio devices on its cmdline,
--                     -- cgroup = {cgroup.procs path…}: the VMM joins these before exec,
--                     -- unsafe_no_jailer = true: Firecracker may run as root without a jailer }
--   v:boot{ kernel =, initrd =, boot_args =, boot_args_tcg =, rootfs =, vcpu = 1, mem_mib = 256,
--           acpi_devices = true: the kernel finds devices through ACPI only (Firecracker < 1.8
--           refuses at once), prepare = fn: runs before the VMM reads the disk (QEMU: while
--           it starts, paused (-S) until fn returns; Firecracker: first),
--           rootfs_backing = path: rootfs is a qcow2 overlay on this raw disk, given to the
--           VMM read-only (QEMU; see v:takes_overlay) }
--   v:wait_console(text, timeout_s)   -- plain text, searched from the start of the console
--   v:pause()  v:resume()
--   local info = v:snapshot(dir)      -- dir/vmstate + dir/memory; info for meta.json
--   v:restore(dir, spec)              -- a fresh VMM loads dir (spec as for boot, rootfs =
--                                     -- this clone's own disk copy) and resumes; spec.prepare,
--                                     -- a function, runs before the VMM reads the disk (QEMU:
--                                     -- while it starts, after the RAM copy; Firecracker: first)
--   v:shutdown(timeout_s) -> true if the guest/VMM stopped by itself; destroys either way
--   v:agent_channel([timeout_s]) -> fd | nil, err   -- a byte stream to the guest agent
--                                     -- (Firecracker: vsock port 1024; the caller closes
--                                     -- fd), retried until the deadline while the agent is
--                                     -- not listening yet
--   v:kill()                          -- SIGKILL, no wait (destroy reaps); never raises
--   v:destroy()                       -- idempotent, never raises
--   v:state() -> "not started" | "running" | "paused" | "stopped"
--   v:saved_spec() -> the boot/restore spec's plain fields (for a kept VM's record)
--   v:takes_overlay() -> true | nil, why: can its disk be a qcow2 overlay (spec.rootfs) on a
--                                     golden disk the VMM gets read-only (spec.rootfs_backing)?
--                                     QEMU running unprivileged only; Firecracker: never
--   vm.attach{id =, dir =, netns =, tap =, mac =, vmspec = (a record's), pid =, starttime =}
--       -> a VM object driving a kept VM's VMM that another process started (QEMU: its QMP
--          socket); it may pause, resume, snapshot and destroy it, not boot it
--   v.console_path  v.vmm  v.vmm_version  v.accel  v.pid  v.starttime  v.timings
--   v.sink_pid  v.sink_starttime: the log sink writing console.log and the VMM's logs, each
--                                 capped at config.log_cap (first half + most recent rest)
--   v.api (Firecracker) / v.qmp (QEMU): the VMM's client, for what the object does not wrap
--
--   vm.detect([opts]) -> {kvm = "hardware" | "kvm_pvm" | "none", kvm_why =, firecracker =,
--                         firecracker_version =, qemu =, qemu_version =, vmm =, accel =, why =,
--                         vmm_source =, accel_source =}   (opts.vmm/accel: the flags; the
--                         environment and config apply through config.choice)
--   vm.choose([opts]) -> the same, or raises "vm: cannot run a VM: <why>" (a run's one choice)
--   vm.api_client, vm.qmp_connect, vm.wait_socket, vm.log_tail: see core/vm.c
local core = require "fireclaw.core.vm"
local config = require "fireclaw.config"
local fault = require "fireclaw.fault"
local opts_check = require "fireclaw.opts"
local proc = require "fireclaw.proc"
local runtime = require "fireclaw.runtime"
local util = require "fireclaw.vmm.util"

local M = {}

M.api_client = core.api_client
M.qmp_connect = core.qmp_connect
M.wait_socket = core.wait_socket
M.log_tail = core.log_tail

-- ---- what this host can do ----

local function cpu_virt_flag()
	local info = util.read_file("/proc/cpuinfo") or ""
	local flags = info:match("\nflags%s*:([^\n]*)") or info:match("^flags%s*:([^\n]*)") or ""
	if flags:find("%f[%w]vmx%f[%W]") then return "VT-x" end
	if flags:find("%f[%w]svm%f[%W]") then return "AMD-V" end
	return nil
end

-- What backs /dev/kvm, and a sentence saying so.
function M.kvm_kind()
	local f = io.open("/dev/kvm", "r+")
	if not f then
		return "none", "/dev/kvm is missing or cannot be opened read-write"
	end
	f:close()
	if util.is_dir("/sys/module/kvm_pvm") then
		-- PVM runs guests without hardware virtualization; stock guest kernels stop on
		-- emulation failures under it (docs/guest-notes.md, "The host's KVM")
		return "kvm_pvm", "/dev/kvm is kvm_pvm, a software nested hypervisor that cannot boot "
			.. "stock guest kernels"
	end
	local flag = cpu_virt_flag()
	if flag then return "hardware", "/dev/kvm with hardware virtualization (" .. flag .. ")" end
	if util.is_dir("/sys/module/kvm_intel") or util.is_dir("/sys/module/kvm_amd") then
		return "hardware", "/dev/kvm (kvm_intel/kvm_amd loaded; no vmx/svm flag shown)"
	end
	return "none", "/dev/kvm exists but the CPU shows no VT-x/AMD-V"
end

local version_cache = {}

-- The first dotted version number `argv` prints (cached per command line).
local function tool_version(argv)
	local key = table.concat(argv, "\0")
	if version_cache[key] == nil then
		local ok, r = pcall(proc.run, argv, { timeout = 10 })
		local out = ok and r.status == 0 and (r.stdout .. r.stderr) or ""
		version_cache[key] = out:match("(%d+%.%d+%.?%d*)") or false
	end
	return version_cache[key] or nil
end

-- A configured binary that does not exist is reported, not silently replaced by $PATH.
local function find_firecracker(opts)
	local want = opts.firecracker or config.firecracker
	if want and want ~= "" then
		return util.which(want), want
	end
	return util.which("firecracker"), nil
end

local FIX_FIRECRACKER = "install Firecracker and put it on PATH, or point FIRECLAW_FIRECRACKER at it; "
	.. "or use --vmm qemu"

-- want: auto | firecracker | qemu; src: where that came from (config.choice), for messages.
local function choose_vmm(want, src, d)
	if want == "auto" then
		local old = not d.cmdline_devices and d.firecracker
			and require("fireclaw.vmm.firecracker").acpi_problem(d.firecracker_version)
		if d.firecracker and d.kvm == "hardware" and old then
			return "qemu", old .. " (upgrade Firecracker to use it)"
		end
		local unjailed = d.firecracker and d.kvm == "hardware"
			and require("fireclaw.vmm.firecracker").unjailed_problem(d.jailer, d.jailer_wanted, d.unsafe_no_jailer)
		if unjailed then -- QEMU runs confined; an unjailed Firecracker would be root
			return "qemu", "firecracker found, but no jailer (" .. require("fireclaw.vmm.jailer").FIX
				.. "; or --vmm firecracker --unsafe-no-jailer)"
		end
		if d.firecracker and d.kvm == "hardware" then
			return "firecracker", "firecracker " .. (d.firecracker_version or "?")
				.. " found and " .. d.kvm_why .. (d.jailer and ", jailed" or ", NOT jailed (--unsafe-no-jailer)")
		end
		if not d.firecracker then
			return "qemu", "no firecracker binary (set FIRECLAW_FIRECRACKER or put it on PATH)"
		end
		return "qemu", "firecracker found, but " .. d.kvm_why
	end
	if want == "firecracker" then
		if not d.firecracker then
			return nil, src .. ", but " .. (d.firecracker_wanted
				and ("FIRECLAW_FIRECRACKER=" .. d.firecracker_wanted .. " does not exist")
				or "there is no firecracker on PATH") .. " (" .. FIX_FIRECRACKER .. ")"
		end
		local unjailed = require("fireclaw.vmm.firecracker").unjailed_problem(d.jailer, d.jailer_wanted,
			d.unsafe_no_jailer)
		if unjailed then return nil, src .. ", but " .. unjailed end
		if d.kvm ~= "hardware" then
			return "firecracker", "firecracker as asked (" .. src .. "; warning: " .. d.kvm_why
				.. "; its guests will not boot)"
		end
		return "firecracker", "firecracker as asked (" .. src .. ")"
	end
	if want == "qemu" then
		if not d.qemu then
			return nil, src .. ", but there is no " .. (config.qemu or "qemu")
				.. " (apt-get install qemu-system-x86, or set FIRECLAW_QEMU)"
		end
		return "qemu", "qemu as asked (" .. src .. ")"
	end
	return nil, "unknown vmm '" .. tostring(want) .. "' (" .. src .. "; use auto, firecracker or qemu)"
end

local function choose_accel(vmm, want, src, d)
	if vmm == "firecracker" then return "kvm" end
	if want == "auto" then
		if d.kvm == "hardware" then return "kvm", "KVM: " .. d.kvm_why end
		return "tcg", "TCG, " .. d.kvm_why .. " (slower)"
	end
	if want == "kvm" then
		if d.kvm == "none" then return nil, src .. ", but " .. d.kvm_why .. " (unset it to use TCG)" end
		if d.kvm == "kvm_pvm" then
			return "kvm", "KVM as asked (" .. src .. "; warning: " .. d.kvm_why .. ": guests will not boot)"
		end
		return "kvm", "KVM as asked (" .. src .. ")"
	end
	if want == "tcg" then return "tcg", "TCG as asked (" .. src .. ")" end
	return nil, "unknown accel '" .. tostring(want) .. "' (" .. src .. "; use auto, kvm or tcg)"
end
M.choose_vmm, M.choose_accel = choose_vmm, choose_accel

-- Probe the host and pick a VMM and accelerator. opts: vmm, accel (the flags' values: nil
-- when not given; config.choice applies the environment and the defaults), firecracker,
-- qemu, cmdline_devices (the image's kernel takes virtio-mmio devices from its command
-- line, so an older Firecracker can boot it); unsafe_no_jailer (Firecracker may run as root
-- without a jailer: --unsafe-no-jailer); versions = false skips running the binaries
-- for their versions (vm.new does: the VMM reports its version itself; auto still asks an
-- installed Firecracker on a hardware-KVM host, to know whether it can boot the image's
-- kernel). Never raises: an impossible choice leaves vmm (or accel) nil and says why.
-- d.vmm_source / d.accel_source say who chose ("--vmm qemu", "FIRECLAW_ACCEL=kvm", "auto").
function M.detect(opts)
	opts = opts_check.check("vm.detect", opts, { "vmm", "accel", "firecracker", "qemu", "versions", "cmdline_devices",
		"unsafe_no_jailer" })
	local d = { unsafe_no_jailer = opts.unsafe_no_jailer or nil }
	d.kvm, d.kvm_why = M.kvm_kind()
	d.firecracker, d.firecracker_wanted = find_firecracker(opts)
	local versions = opts.versions ~= false
	d.versions = versions
	if d.firecracker then
		d.firecracker_version = versions and tool_version({ d.firecracker, "--version" }) or nil
		d.jailer, d.jailer_wanted = require("fireclaw.vmm.jailer").find(d.firecracker)
	end
	d.qemu = util.which(opts.qemu or config.qemu or "qemu-system-x86_64")
	if d.qemu and versions then d.qemu_version = require("fireclaw.vmm.qemu").probe(d.qemu).version end
	local vmm_want, accel_want
	vmm_want, d.vmm_source = config.choice("vmm", opts.vmm)
	accel_want, d.accel_source = config.choice("accel", opts.accel)
	-- auto picks Firecracker only if it can boot the image's kernel, which its version says
	d.cmdline_devices = opts.cmdline_devices
	if d.firecracker and not d.firecracker_version and vmm_want == "auto" and d.kvm == "hardware" then
		d.firecracker_version = tool_version({ d.firecracker, "--version" })
	end
	local vmm_why, accel_why
	d.vmm, vmm_why = choose_vmm(vmm_want, d.vmm_source, d)
	if d.vmm then
		d.accel, accel_why = choose_accel(d.vmm, accel_want, d.accel_source, d)
	end
	d.why = d.vmm and (vmm_why .. (accel_why and "; " .. accel_why or "")) or vmm_why
	if d.vmm and not d.accel then d.why = accel_why end
	return d
end

-- The choice as a run makes it: the detection, or an error saying why no VM can run.
function M.choose(opts)
	local d = M.detect(opts)
	if not d.vmm or not d.accel then error("vm: cannot run a VM: " .. d.why, 0) end
	return d
end

-- ---- the VM object ----

local VM = {}
VM.__index = VM

local DRIVERS = { firecracker = "fireclaw.vmm.firecracker", qemu = "fireclaw.vmm.qemu" }

M.OPTIONS = { "id", "dir", "vmm", "accel", "netns", "tap", "mac", "firecracker", "qemu", "env",
	"socket_timeout", "on_spawn", "user", "keep", "detected", "cmdline_devices", "cgroup", "unsafe_no_jailer" }
-- What v:boot and v:restore take (the drivers read these).
M.SPEC = { "kernel", "initrd", "boot_args", "boot_args_tcg", "rootfs", "vcpu", "mem_mib", "read_only",
	"rootfs_backing", "metrics", "network_overrides", "rootfs_path_in_vmm", "clock_realtime", "rng", "acpi_devices", "vsock",
	"agent_ports", "prepare", "agent_early" }

function M.new(opts)
	if type(opts) ~= "table" then error("vm.new: options table expected (id =, dir =, …)", 0) end
	opts_check.check("vm.new", opts, M.OPTIONS)
	if not opts.id or not opts.dir then error("vm: new needs id and dir", 0) end
	-- a run detects once (vm.choose) and hands the result down as opts.detected
	local d = opts.detected or M.detect(setmetatable({ versions = false }, { __index = opts }))
	if not d.vmm or not d.accel then error("vm: cannot run a VM: " .. d.why, 0) end
	util.verbose("VM %s: %s chosen: %s", opts.id,
		d.vmm .. (d.vmm == "qemu" and " with " .. d.accel or ""), d.why)
	local dir = util.abspath(opts.dir):gsub("/+$", "")
	util.mkdir_p(dir)
	local self = setmetatable({
		id = opts.id, dir = dir, netns = opts.netns, tap = opts.tap, mac = opts.mac,
		env = opts.env, socket_timeout = opts.socket_timeout, keep = opts.keep, on_spawn = opts.on_spawn,
		user = opts.user, cgroup = opts.cgroup, unsafe_no_jailer = opts.unsafe_no_jailer or d.unsafe_no_jailer,
		vmm = d.vmm, accel = d.accel, why = d.why, vmm_source = d.vmm_source,
		accel_source = d.accel_source, kvm = d.kvm, kvm_why = d.kvm_why,
		binary = d.vmm == "firecracker" and d.firecracker or d.qemu,
		jailer = d.vmm == "firecracker" and d.jailer or nil, -- fireclaw.vmm.jailer
		console_path = dir .. "/console.log",
		timings = {},
		_state = "not started",
	}, VM)
	self.driver = require(DRIVERS[d.vmm])
	return self
end

local function check_state(self, allowed, what)
	if self.destroyed then error("vm " .. self.id .. ": cannot " .. what .. " a destroyed VM", 0) end
	for _, s in ipairs(allowed) do
		if self._state == s then return end
	end
	error(string.format("vm %s: cannot %s a VM that is %s", self.id, what, self._state), 0)
end

-- Remember the VMM process for state records (pid + start time identify it later).
function VM:_started(p)
	self.proc = p
	self.pid = p:pid()
	self.starttime = proc.starttime(self.pid)
	-- the process copying its console and logs into capped files (see proc.spawn)
	self.sink_pid = p:sink_pid()
	self.sink_starttime = self.sink_pid and proc.starttime(self.sink_pid)
	if self.on_spawn then self.on_spawn(self) end
	fault.point("vmm-spawned")
end

-- Run a driver step; on failure, kill the VMM so nothing half-started stays around.
local function guarded(self, fn, ...)
	local ok, err = pcall(fn, ...)
	if not ok then
		self:destroy()
		error(err, 0)
	end
end

function VM:boot(spec)
	check_state(self, { "not started" }, "boot")
	local t0 = runtime.now()
	guarded(self, self.driver.boot, self, opts_check.check("vm:boot", spec, M.SPEC))
	self.boot_spec = spec
	self._state = "running"
	self.timings.boot = runtime.now() - t0
	util.verbose("VM %s: %s started (pid %d)", self.id, self.vmm, self.pid)
end

function VM:restore(dir, spec)
	check_state(self, { "not started" }, "restore into")
	local t0 = runtime.now()
	guarded(self, self.driver.restore, self, util.abspath(dir), opts_check.check("vm:restore", spec, M.SPEC))
	self.boot_spec = spec
	self._state = "running"
	self.timings.restore = runtime.now() - t0
	util.verbose("VM %s: restored from %s in %.0f ms", self.id, dir, self.timings.restore * 1e3)
end

function VM:pause()
	check_state(self, { "running", "paused" }, "pause")
	self.driver.pause(self)
	self._state = "paused"
end

function VM:resume()
	check_state(self, { "running", "paused" }, "resume")
	self.driver.resume(self)
	self._state = "running"
end

-- Pauses the VM (it stays paused: resume it, or destroy it).
function VM:snapshot(dir)
	check_state(self, { "running", "paused" }, "snapshot")
	dir = util.abspath(dir)
	util.mkdir_p(dir)
	local t0 = runtime.now()
	local info = self.driver.snapshot(self, dir)
	self._state = "paused"
	self.timings.snapshot = runtime.now() - t0
	info.vmm, info.vmm_version, info.accel = self.vmm, self.vmm_version, self.accel
	return info
end

-- A connection to the guest agent (fireclaw.core.agent, hello done), or nil and why not.
-- opts: timeout, watch_fd, watch_msg, where. The driver gives it: QEMU through
-- driver.agent_connect (a virtio-serial port of its own, flock'ed); a driver with
-- driver.agent_channel(v, timeout) -> fd (a connected byte stream: Firecracker's vsock)
-- is wrapped here.
function VM:agent_connect(opts)
	opts = opts or {}
	if self.driver.agent_connect then return self.driver.agent_connect(self, opts) end
	if self.driver.agent_channel then
		local fd, err = self.driver.agent_channel(self, opts.timeout or 10)
		if not fd then return nil, err end
		local ok, conn = pcall(require("fireclaw.core.agent").wrap, fd, opts)
		require("fireclaw.sys").close(fd)
		if not ok then error(conn, 0) end
		return conn
	end
	return nil, self.vmm .. " has no agent channel in this fireclaw"
end

function VM:takes_overlay()
	if not self.driver.takes_overlay then return nil, self.vmm .. " takes raw disks only" end
	return self.driver.takes_overlay(self)
end

function VM:saved_spec()
	local out = {}
	for k, v in pairs(self.boot_spec or {}) do
		if type(v) ~= "table" and type(v) ~= "function" then out[k] = v end
	end
	-- how its RAM is mapped decides how a snapshot from another process saves it
	out.ram_shared = self.ram == nil or self.ram.share ~= false
	return out
end

-- A kept VM's VMM, reached from another process (see the header).
function M.attach(o)
	opts_check.check("vm.attach", o, { "id", "dir", "netns", "tap", "mac", "vmspec", "pid", "starttime" })
	local vs = o.vmspec
	if type(vs) ~= "table" or not DRIVERS[vs.vmm] then
		error("vm " .. tostring(o.id) .. ": its record does not say how to reach its VMM (made by an older fireclaw?)", 0)
	end
	local self = setmetatable({
		id = o.id, dir = o.dir, netns = o.netns, tap = o.tap, mac = o.mac, keep = true, attached = true,
		vmm = vs.vmm, accel = vs.accel, vmm_version = vs.vmm_version, pid = o.pid, starttime = o.starttime,
		console_path = o.dir .. "/console.log", timings = {}, _state = "running", boot_spec = vs.spec,
	}, VM)
	self.driver = require(DRIVERS[vs.vmm])
	if not self.driver.attach then
		error(string.format("vm %s: driving a kept %s VM from another process is not supported yet", o.id, vs.vmm), 0)
	end
	local fd = require("fireclaw.sys").pidfd_open(o.pid)
	if not fd or not proc.alive(o.pid, o.starttime) then
		if fd then require("fireclaw.sys").close(fd) end
		error(string.format("vm %s: its %s (pid %s) is gone", o.id, vs.vmm, tostring(o.pid)), 0)
	end
	self.pidfd = fd
	self.driver.attach(self)
	return self
end

function VM:_alive()
	if self.attached then return not self.destroyed and proc.alive(self.pid, self.starttime) end
	return self.proc ~= nil and not self.destroyed and self.proc:alive()
end

function VM:state()
	if self._state == "not started" and not self.proc then return "not started" end
	if not self:_alive() then return "stopped" end
	local ok, s = pcall(self.driver.query_state, self)
	if ok and s then return s end
	return self:_alive() and self._state or "stopped"
end

-- A reader of the console log that keeps its place: each call returns whether `text`
-- appeared in what was added since, with enough carried over for a match that spans two
-- reads.
local function console_reader(path, text)
	local offset, carry = 0, ""
	return function()
		local f = io.open(path, "rb")
		if not f then return false end
		f:seek("set", offset)
		local new = f:read("*a") or ""
		f:close()
		offset = offset + #new
		local s = carry .. new
		if s:find(text, 1, true) then return true end
		carry = s:sub(-(#text - 1))
		return false
	end
end

-- Wait until the console log contains `text` (plain text, not a pattern), searching the
-- whole log from its start. The log is capped (config.log_cap): past the cap only its
-- first half stays in place, so a marker must come early (a boot's does).
function VM:wait_console(text, timeout_s)
	timeout_s = timeout_s or 60
	local seen = console_reader(self.console_path, text)
	local found = util.poll(function()
		if seen() then return true end
		if not self:_alive() then return seen() or false end
		return nil
	end, timeout_s)
	if found then return true end
	local tail = core.log_tail(self.console_path, 15)
	if found == false then
		local how = util.describe_exit(self.proc:wait(0))
		local log = core.log_tail(self.driver.log_files(self), 10)
		error(string.format("vm %s: %s %s before its console showed '%s'; console ends with:\n%s%s",
			self.id, self.vmm, how, text, tail ~= "" and tail or "(empty)",
			log ~= "" and ("\n" .. self.vmm .. " log ends with:\n" .. log) or ""), 0)
	end
	error(string.format("vm %s: the console did not show '%s' within %gs; it ends with:\n%s",
		self.id, text, timeout_s, tail ~= "" and tail or "(empty)"), 0)
end

-- A connected byte stream to the guest agent, as a descriptor the caller owns (close it
-- with sys.close; close-on-exec), or nil, err (one line). timeout_s bounds the whole wait,
-- retries included: give it what is left of the boot deadline. driver.agent_channel(v,
-- timeout_s) gives it (Firecracker: its vsock device).
function VM:agent_channel(timeout_s)
	if self.destroyed then return nil, "vm " .. self.id .. ": destroyed" end
	if self._state == "not started" then return nil, "vm " .. self.id .. ": not started" end
	if not self.driver.agent_channel then
		return nil, "vm " .. self.id .. ": " .. self.vmm .. " has no agent channel here"
	end
	return self.driver.agent_channel(self, timeout_s)
end

-- Ask the guest (then the VMM) to stop; destroy the VM either way.
function VM:shutdown(timeout_s)
	if not self:_alive() then
		self:destroy()
		return false
	end
	local ok, graceful = pcall(self.driver.shutdown, self, timeout_s or 10)
	self:destroy()
	return ok and graceful or false
end

-- SIGKILL the VMM without waiting for it (v:destroy reaps it): its exit, which frees the
-- guest's RAM, runs while the caller removes other things. Never raises.
function VM:kill()
	if self.destroyed or self.attached or not self.proc then return end
	self.killed = pcall(self.proc.kill, self.proc)
end

-- Kill the VMM, reap it, close the clients, remove the sockets. Safe to call twice;
-- never raises (it runs on error paths).
function VM:destroy()
	if self.destroyed then return end
	pcall(self.driver.destroy, self)
	if self.proc then pcall(self.proc.close, self.proc) end
	if self.pidfd then require("fireclaw.sys").close(self.pidfd) self.pidfd = nil end
	self.destroyed = true
	if self.proc then self._state = "stopped" end
end

M.VM = VM
return M
