-- Snapshots: create one from a warm VM, list, show, remove
--
--   fireclaw snapshot create [--image NAME] [--name SNAP] [--vcpu N] [--mem MIB] [--disk SIZE]
--   fireclaw snapshot list | info [SNAP] | rm SNAP
-- create: cold boot, wait until the agent and SSH answer (the snapshot is taken warm), zero
-- the guest's free memory, pause, save
-- device state + memory + the disk as of that moment + meta.json, destroy the VM.
local cli = require "fireclaw.cli"
local config = require "fireclaw.config"
local fault = require "fireclaw.fault"
local image = require "fireclaw.image"
local json = require "fireclaw.json"
local log = require "fireclaw.log"
local checkopts = require "fireclaw.opts"
local rootfs = require "fireclaw.rootfs"
local sandbox = require "fireclaw.sandbox"
local snapshot = require "fireclaw.snapshot"

local coldboot = cli.use "coldboot"

local M = {}
local create_from -- (below)

-- Before a snapshot, the guest's free memory is made zero: every restore copies the saved
-- memory's non-zero pages (QEMU), so stale bytes in free pages are paid for by every run.
-- A tmpfs bounded below MemFree (by 16 MiB + 1/32 of RAM, far above the kernel's
-- watermarks, so nothing is reclaimed or OOM-killed) is filled with zeros, then the file
-- and the mount go, and their pages return to the free lists holding zeros. At most 1 GiB
-- (TCG writes ~80 MiB/s): the allocator hands out the most recently freed pages first, the
-- ones likely to hold stale data. The page cache is kept: the first command after a
-- restore finds its files where they were. Measured: the golden memory entries of
-- docs/DECISIONS.md.
M.ZERO_FREE = [[
set -e
t=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
f=$(awk '/^MemFree:/ {print $2}' /proc/meminfo)
n=$((f - 16384 - t / 32))
[ "$n" -le 1048576 ] || n=1048576
[ "$n" -gt 0 ] || exit 0
d=$(mktemp -d /tmp/.fireclaw-zero.XXXXXX)
mount -t tmpfs -o size=${n}k,mode=0700 fireclaw-zero "$d"
dd if=/dev/zero of="$d/zero" bs=1M 2>/dev/null || : # it ends at the size bound
rm -f "$d/zero"
umount "$d"
rmdir "$d"
]]
-- What is left of a zeroing that was stopped half-way (a mount holding most of the RAM)
M.ZERO_UNDO = [[
for m in $(awk '$1 == "fireclaw-zero" {print $2}' /proc/mounts); do rm -f "$m/zero"; umount "$m"; rmdir "$m"; done
]]
M.ZERO_TIMEOUT = 60

-- Zero the guest's free memory; a failure costs only a larger snapshot (a note says so).
function M.zero_free(sb)
	local ok, r = pcall(sb.exec, sb, { "sh", "-c", M.ZERO_FREE }, { timeout = M.ZERO_TIMEOUT, max_capture = 4096 })
	if not ok and tostring(r):match("^interrupted") then error(r, 0) end -- Ctrl-C stops the snapshot
	if not ok or r.status ~= 0 then
		pcall(sb.exec, sb, { "sh", "-c", M.ZERO_UNDO }, { timeout = 10, max_capture = 4096 })
		local why
		if not ok then
			why = tostring(r)
		elseif r.timed_out then
			why = "timed out after " .. M.ZERO_TIMEOUT .. " s"
		else -- the guest's words: printable ASCII only, one line, cut
			local line = (r.stderr or ""):match("[^\n]*"):gsub("[^ -~]", "?"):sub(1, 160)
			why = "exit status " .. tostring(r.status) .. (line ~= "" and ": " .. line or "")
		end
		log.note("snapshot: the guest's free memory was not zeroed (%s); the snapshot is larger, restores copy more", why)
	end
	sb.timer:stage("guest free memory zeroed")
end

-- Take snapshot NAME of a running sandbox (it ends paused; the caller destroys it).
-- opts: zero_free (default true: see M.zero_free; only in a guest already reached over its
-- exec channel, as every recipe's is: a sandbox nobody connected to is not waited for)
function M.take(sb, name, opts)
	opts = checkopts.check("snapshot.take", opts or {}, { "zero_free" })
	if sb.disk_backing then -- (sandbox.new's throwaway_disk: its disk is an overlay, not an ext4)
		error(string.format("snapshot: VM %s has a throw-away disk (a qcow2 overlay); a VM to snapshot is made "
			.. "without throwaway_disk", sb.id), 0)
	end
	local tmp = snapshot.begin(name)
	local ok, res = pcall(function()
		if opts.zero_free ~= false and (sb.session or sb.agent) then M.zero_free(sb) end
		-- a restored guest must not wake up holding a session to a client that is gone
		if sb.session then sb.session:close() end
		-- nor a connection on the agent's port (a restore's host connects anew)
		if sb.agent then sb.agent:close() end
		local info = sb.vm:snapshot(tmp)           -- pause; device state + memory
		sb.timer:stage("snapshot (" .. info.vmm .. ")")
		fault.point("snapshot-saved")
		rootfs.copy(sb.disk_path, tmp .. "/disk.ext4") -- the disk exactly as the memory knows it
		sb.timer:stage("disk saved")
		local n = config.net
		return snapshot.commit(tmp, name, {
			image = sb.img.name, image_sha256 = snapshot.image_sha256(sb.img),
			vmm = info.vmm, vmm_version = info.vmm_version, accel = info.accel,
			vcpu = sb.vcpu, mem_mib = sb.mem_mib, boot_args = sb:boot_spec().boot_args,
			guest_ip = n.guest_ip, guest_mac = n.guest_mac, tap_mac = n.tap_mac,
			host_key = sb.img.host_key, vmm_info = info,
			-- how restores reach the guest: "agent" only when its channel was there and
			-- the agent answered before the snapshot
			exec_channels = sb.exec_channels or { "ssh" },
			-- the agent protocol its restores speak (a snapshot of an older agent restores
			-- over SSH: sandbox.snap_has_agent)
			agent_protocol = sb.agent and sb.agent:info().version or nil,
		})
	end)
	if not ok then
		snapshot.abort(tmp)
		error(res, 0)
	end
	return res
end

-- opts: image, name (default: the image's), vcpu, mem_mib, vmm, accel, boot_timeout, disk
-- (a bigger root disk, "2G": every restore gets a copy of it), unsafe_no_jailer
function M.create(opts)
	opts = checkopts.check("snapshot.create", opts,
		{ "image", "name", "vcpu", "mem_mib", "vmm", "accel", "boot_timeout", "disk", "unsafe_no_jailer" })
	local img = image.load(opts.image or "default")
	snapshot.abort(snapshot.begin(opts.name or img.name)) -- a state dir we cannot write fails now, not after a boot
	local sb = coldboot.boot { image = img.name, vcpu = opts.vcpu, mem_mib = opts.mem_mib, vmm = opts.vmm,
		accel = opts.accel, boot_timeout = opts.boot_timeout, disk = opts.disk,
		unsafe_no_jailer = opts.unsafe_no_jailer }
	return sandbox.with(sb, function()
		-- a snapshot is taken once both channels answer: its restores may use either
		sb.exec_channels = { "ssh" }
		if sb:agent_usable() then
			if not sb.agent then sb:agent_connect() end
			sb.exec_channels = { "agent", "ssh" }
		end
		if not sb.session then sb:connect() end
		return M.take(sb, opts.name or img.name)
	end)
end

local function human(n)
	if n >= 2 ^ 30 then return string.format("%.1f GiB", n / 2 ^ 30) end
	return string.format("%.1f MiB", n / 2 ^ 20)
end

-- snapshot create --from ID: a live kept VM, paused for the save and resumed after; its
-- clones (run/start --snapshot NAME) are reseeded by the restore like any other (through
-- the agent's hand-off when the VM's agent answered before the save).
create_from = function(o)
	local name = o.name
	if not name then cli.usage_error("snapshot create --from needs --name SNAP") end
	snapshot.clean_temp()
	local t0 = require("fireclaw.runtime").now()
	local sb = sandbox.attach(o.from, { what = "snapshot", vmm = true, connect = false })
	local meta = sandbox.with(sb, function()
		-- its clones use the agent (commands, the restore hand-off) when it answers now,
		-- as a snapshot made by create does
		if sb:agent_usable() then
			sb:agent_connect()
			sb.exec_channels = { "agent", "ssh" }
		end
		local ok, res = pcall(M.take, sb, name)
		pcall(sb.vm.resume, sb.vm) -- the VM goes on, whatever happened to the snapshot
		if not ok then error(res, 0) end
		return res
	end)
	log.note("snapshot '%s' of VM %s created in %.1f s at %s", meta.name, sb.id,
		require("fireclaw.runtime").now() - t0, meta.dir)
	return 0
end

local function cmd_create(args)
	local o = cli.parse(args, {
		usage = "fireclaw snapshot create [options]", args = 0,
		{ "--image NAME", "image to boot", default = "default" },
		{ "--name SNAP", "snapshot name (default: the image's name, which run uses)" },
		{ "--vcpu N", "vCPUs", type = "number", default = 1 },
		{ "--mem MIB", "memory in MiB", type = "number", default = 256 },
		{ "--disk SIZE", "grow the root disk to SIZE (e.g. 512M, 2G); every restore gets a copy of it" },
		{ "--vmm NAME", "auto, firecracker or qemu (default: $FIRECLAW_VMM, else auto)" },
		{ "--unsafe-no-jailer", "let Firecracker run as root when no jailer is found (not confined)" },
		{ "--boot-timeout S", "how long to wait for the guest's agent or SSH", type = "number", default = 60 },
		{ "--from ID", "snapshot kept VM ID (or NAME) as it is now; it goes on running" },
		{ "-v, --verbose", "progress lines" },
	})
	if o.from then return create_from(o) end
	if o.disk then
		local ok, err = sandbox.disk_bytes(o.disk)
		if not ok then cli.usage_error("--disk: %s", err) end
	end
	snapshot.clean_temp()
	local t0 = require("fireclaw.runtime").now()
	local meta = M.create { image = o.image, name = o.name, vcpu = o.vcpu, mem_mib = o.mem, vmm = o.vmm,
		boot_timeout = o.boot_timeout, disk = o.disk, unsafe_no_jailer = o.unsafe_no_jailer }
	log.note("snapshot '%s' created in %.1f s (%s %s, %d MiB) at %s", meta.name,
		require("fireclaw.runtime").now() - t0, meta.vmm, meta.vmm_version or "", meta.mem_mib, meta.dir)
	return 0
end

-- Creation times as `image list` prints them: UTC, to the minute.
local function created(t)
	return tonumber(t) and os.date("!%Y-%m-%d %H:%M", tonumber(t)) or "?"
end

local function cmd_list(args)
	local o = cli.parse(args, { usage = "fireclaw snapshot list [--json]", about = "List the snapshots.", args = 0,
		{ "--json", "print a JSON array: the meta.json of each snapshot, or {name, error}" } })
	local list = snapshot.list()
	if o.json then
		local rows = json.array()
		for _, s in ipairs(list) do rows[#rows + 1] = s.meta or { name = s.name, error = s.error } end
		io.stdout:write(json.encode(rows), "\n")
		return 0
	end
	if #list == 0 then print("no snapshots (create one with: fireclaw snapshot create)") return 0 end
	print(string.format("%-16s %-10s %-12s %-6s %-8s %s", "NAME", "IMAGE", "VMM", "VCPU", "MEM", "CREATED (UTC)"))
	for _, s in ipairs(list) do
		local m = s.meta
		if m then
			print(string.format("%-16s %-10s %-12s %-6d %-8s %s", s.name, tostring(m.image),
				m.vmm .. " " .. tostring(m.vmm_version or ""), m.vcpu, m.mem_mib .. "M", created(m.created)))
		else
			print(string.format("%-16s (unusable: %s)", s.name, s.error))
		end
	end
	return 0
end

local function cmd_info(args)
	local _, rest = cli.parse(args, { usage = "fireclaw snapshot info [--json] [SNAP]", args = 1,
		about = "Print the meta.json of snapshot SNAP (default: default).",
		{ "--json", "(the output is JSON anyway)" } })
	local name = rest[1] or "default"
	local meta, why = snapshot.load(name)
	if not meta then
		if why:match("^no snapshot named") then
			why = why .. " (see: fireclaw snapshot list; make it with: fireclaw snapshot create"
				.. (name ~= "default" and " --name " .. name or "") .. ")"
		end
		error("snapshot: " .. why, 0)
	end
	io.stdout:write(json.encode(meta, { pretty = true }), "\n")
	return 0
end

local function cmd_rm(args)
	local _, rest = cli.parse(args, { usage = "fireclaw snapshot rm SNAP…", about = "Remove snapshots." })
	if #rest == 0 then cli.usage_error("snapshot rm needs a name (see: fireclaw snapshot list)") end
	for _, name in ipairs(rest) do snapshot.remove(name) log.note("removed snapshot '%s'", name) end
	return 0
end

local COMMANDS = { create = cmd_create, list = cmd_list, ls = cmd_list, info = cmd_info, rm = cmd_rm }

local function main(args)
	local sub = table.remove(args, 1)
	if sub == "-h" or sub == "--help" or not sub then
		local out = sub and io.stdout or io.stderr -- no command at all is a usage error
		out:write("usage: fireclaw snapshot create [--image NAME] [--name SNAP] [--vcpu N] [--mem MIB] [--disk SIZE]\n"
			.. "       fireclaw snapshot list [--json] | info [SNAP] | rm SNAP…\n"
			.. "'fireclaw snapshot COMMAND --help' shows a command's options.\n")
		return sub and 0 or 2
	end
	local fn = COMMANDS[sub]
	if not fn then cli.usage_error("unknown snapshot command '%s' (create, list, info, rm)", sub) end
	return fn(args)
end

M.human = human
return cli.recipe(M, main, ...)
