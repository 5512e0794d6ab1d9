-- fireclaw.vmm.qemu: the QEMU microvm driver behind fireclaw.vm.
--
-- Guest RAM lives in a file (memory-backend-file, share=on) from the cold boot on, so a
-- snapshot is: stop, migrate the device state only (x-ignore-shared) to dir/vmstate, copy
-- the RAM file to dir/memory. A restore maps dir/memory with share=off (copy-on-write: the
-- file stays pristine for any number of clones) and migrates the device state back in.
-- A restore needs the very same machine and device options as the snapshot, so both go
-- through machine_args().
local core = require "fireclaw.core.vm"
local proc = require "fireclaw.proc"
local runtime = require "fireclaw.runtime"
local util = require "fireclaw.vmm.util"

local M = {}

M.SOCKET_TIMEOUT = 10
M.MIGRATE_TIMEOUT = 120
M.DEFAULT_BOOT_ARGS = "console=ttyS0 reboot=k panic=1"

local function qmp_path(v) return v.dir .. "/qmp.sock" end

-- The end of QEMU's log as one line, for an error message.
local function log_line(v)
	return (core.log_tail(v.dir .. "/vmm.log", 10):gsub("%s+$", ""):gsub("\n", " | "))
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
		local function run(argv)
			local ok, r = pcall(proc.run, argv, { timeout = 10 })
			return ok and r.status == 0 and r.stdout:match("version (%d+%.%d+%.?%d*)") or nil
		end
		local version = run({ binary, "-sandbox", "on", "-version" })
		local sandbox = version ~= nil
		version = version or run({ binary, "-version" })
		if not sandbox then
			util.verbose("qemu: %s has no -sandbox (seccomp); running without it", binary)
		end
		probes[binary] = { version = version, sandbox = sandbox }
	end
	return probes[binary]
end

function M.has_sandbox(binary)
	return M.probe(binary).sandbox
end
local has_sandbox = M.has_sandbox

-- The host TSC frequency in kHz: under TCG the guest kernel's TSC calibration hangs in
-- about 3 boots out of 5 without tsc_early_khz= (GUEST-NOTES.md).
local function host_tsc_khz()
	local info = util.read_file("/proc/cpuinfo") or ""
	local mhz = tonumber(info:match("cpu MHz%s*:%s*([%d%.]+)"))
	return mhz and math.floor(mhz * 1000 + 0.5) or nil
end

-- Boot args may come as a string or as a list (an image manifest keeps lists).
local function words(x)
	if type(x) == "table" then return table.concat(x, " ") end
	return x
end

-- The image's TCG extras carry the build host's tsc_early_khz: this host's is the one
-- that counts.
local function tcg_args(spec, args)
	local extra = words(spec.boot_args_tcg) or ""
	local khz = host_tsc_khz()
	if khz then
		extra = extra:gsub("tsc_early_khz=%d+", "tsc_early_khz=" .. khz)
		if not (extra .. " " .. args):find("tsc_early_khz=", 1, true) then
			extra = extra .. " tsc_early_khz=" .. khz
		end
	end
	return (extra:gsub("^%s+", ""))
end

local function boot_args(v, spec)
	local args = words(spec.boot_args) or M.DEFAULT_BOOT_ARGS
	if v.accel ~= "tcg" then return args end
	local extra = tcg_args(spec, args)
	return extra ~= "" and (args .. " " .. extra) or args
end

local function accel_args(v)
	if v.accel == "kvm" then
		-- `-cpu host` alone aborts on MSR 0x10a on some hosts (GUEST-NOTES.md)
		return { "-accel", "kvm", "-cpu", "host,-arch-capabilities" }
	end
	return { "-accel", "tcg", "-cpu", "max" }
end

local function append(t, ...)
	for _, x in ipairs({ ... }) do t[#t + 1] = x end
end

-- The command line for a boot (ram = {path, share = true}) or a restore (share = false,
-- incoming = true). Everything that shapes the machine is here, for both.
local function machine_args(v, spec, ram)
	local mem, vcpu = spec.mem_mib or 256, spec.vcpu or 1
	local a = { v.binary, "-M", "microvm,memory-backend=mem" }
	append(a, unpack(accel_args(v)))
	append(a, "-smp", tostring(vcpu), "-m", mem .. "M",
		"-object", string.format("memory-backend-file,id=mem,size=%dM,mem-path=%s,share=%s",
			mem, optval(ram.path), ram.share and "on" or "off"),
		"-nodefaults", "-no-user-config", "-nographic",
		-- a guest reboot or panic ends the VMM, as with Firecracker
		"-no-reboot",
		"-serial", "file:" .. v.console_path,
		"-qmp", "unix:" .. optval(qmp_path(v)) .. ",server=on,wait=off",
		"-kernel", spec.kernel, "-append", boot_args(v, spec))
	if spec.initrd then append(a, "-initrd", spec.initrd) end
	if spec.rootfs then
		-- a full host disk is an I/O error in the guest, not a VM paused forever (QEMU's
		-- default werror=enospc stops the VM and the command never ends)
		append(a, "-drive", "id=root,if=none,format=raw,werror=report,rerror=report,file=" .. optval(spec.rootfs),
			"-device", "virtio-blk-device,drive=root")
	end
	if v.tap then
		append(a, "-netdev", "tap,id=net0,ifname=" .. optval(v.tap) .. ",script=no,downscript=no",
			"-device", "virtio-net-device,netdev=net0" .. (v.mac and (",mac=" .. v.mac) or ""))
	end
	if has_sandbox(v.binary) then append(a, "-sandbox", "on") end
	if ram.incoming then append(a, "-incoming", "defer") end
	return a
end

local function spawn(v, spec, ram)
	if not spec.kernel then error("vm: boot needs a kernel", 0) end
	util.check_tap(v)
	os.remove(qmp_path(v))
	util.touch(v.console_path) -- no stale output from an earlier VM in this dir
	local t0 = runtime.now()
	v:_started(proc.spawn{
		argv = machine_args(v, spec, ram),
		env = v.env,
		netns = v.netns,
		pdeathsig = not v.keep, -- a kept VM outlives this fireclaw
		stdin = "/dev/null",
		stdout = v.dir .. "/vmm.log",
		stderr = v.dir .. "/vmm.log",
	})
	core.wait_socket(qmp_path(v), v.socket_timeout or M.SOCKET_TIMEOUT, v.proc,
		{ log = v.dir .. "/vmm.log", name = "qemu", what = "QMP socket" })
	local ok, q = pcall(core.qmp_connect, qmp_path(v), v.socket_timeout or M.SOCKET_TIMEOUT)
	if not ok then
		-- QEMU creates the socket early and may still fail on its options (kernel, disk,
		-- tap): say so with its own words rather than the reset connection
		local st = v.proc:wait(2)
		if st then
			error(string.format("qemu %s before answering on its QMP socket: %s",
				util.describe_exit(st), log_line(v)), 0)
		end
		error(q, 0)
	end
	v.qmp = q
	v.timings.api_ready = runtime.now() - t0
	local q = v.qmp:greeting().QMP.version.qemu
	v.vmm_version = string.format("%d.%d.%d", q.major, q.minor, q.micro)
	v.ram = ram
	v.spec = spec
	util.verbose("VM %s: qemu %s QMP ready in %.0f ms", v.id, v.vmm_version,
		v.timings.api_ready * 1e3)
end

function M.boot(v, spec)
	spawn(v, spec, { path = v.dir .. "/memory", share = true, owned = true })
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
local function set_ignore_shared(v)
	v.qmp:execute("migrate-set-capabilities",
		{ capabilities = { { capability = "x-ignore-shared", state = true } } })
end

local function migration_done(v)
	local m = v.qmp:execute("query-migrate")
	if m.status == "completed" then return true end
	if m.status == "failed" or m.status == "cancelled" then
		error("qemu: migration " .. m.status .. ": " .. tostring(m["error-desc"] or "(no reason)"), 0)
	end
	return nil
end

function M.snapshot(v, dir)
	M.pause(v)
	set_ignore_shared(v)
	v.qmp:execute("migrate", { uri = "exec:cat > " .. util.shell_quote(dir .. "/vmstate") })
	if not util.poll(function() return migration_done(v) end, M.MIGRATE_TIMEOUT) then
		error("qemu: saving the device state to " .. dir .. "/vmstate did not finish within "
			.. M.MIGRATE_TIMEOUT .. "s", 0)
	end
	local mem = v.spec.mem_mib or 256
	if v.ram.share then
		util.copy_sparse(v.ram.path, dir .. "/memory")
	else
		-- a restored clone maps its RAM privately: it was not ignored, the stream above
		-- holds all of it, and the restore only needs a file of the right size to map
		util.sparse_file(dir .. "/memory", mem * 1024 * 1024)
	end
	local s = v.spec
	return { mem_mib = mem, vcpu = s.vcpu or 1, kernel = s.kernel, initrd = s.initrd,
		boot_args = s.boot_args, boot_args_tcg = s.boot_args_tcg, rootfs_path_in_vmm = s.rootfs,
		tap = v.tap, mac = v.mac, vmstate = "vmstate", memory = "memory" }
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

function M.restore(v, dir, spec)
	for _, f in ipairs({ dir .. "/vmstate", dir .. "/memory" }) do
		if not util.exists(f) then error("vm " .. v.id .. ": no snapshot file " .. f, 0) end
	end
	if spec.rootfs and not util.exists(spec.rootfs) then
		error("vm " .. v.id .. ": no disk copy at " .. spec.rootfs, 0)
	end
	spawn(v, spec, { path = dir .. "/memory", share = false, incoming = true })
	local ok, err = pcall(function()
		set_ignore_shared(v)
		v.qmp:execute("migrate-incoming", { uri = "exec:cat " .. util.shell_quote(dir .. "/vmstate") })
		-- a `cont` sent while the state is still coming in is lost (GUEST-NOTES.md)
		if not util.poll(function() return incoming_done(v) end, M.MIGRATE_TIMEOUT) then
			error("qemu: loading " .. dir .. "/vmstate did not finish within "
				.. M.MIGRATE_TIMEOUT .. "s", 0)
		end
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

function M.destroy(v)
	if v.qmp then v.qmp:close() end
	if v.proc then v.proc:close() end
	os.remove(qmp_path(v))
	-- the boot RAM file is the dead VMM's memory; a restore's is the snapshot's: keep that
	if v.ram and v.ram.owned then os.remove(v.ram.path) end
end

return M
