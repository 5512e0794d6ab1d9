-- The recipes' building blocks driving the Firecracker driver, against the API test
-- server (tests/fake-firecracker validates every request against the official spec and
-- answers like Firecracker). Its guest never boots, so each flow ends at the SSH wait; what
-- is asserted is the exact request sequence fireclaw sent, the clear error, and that
-- nothing is left behind. Where FIRECLAW_FIRECRACKER names a real binary on a host whose
-- KVM boots guests, tests/e2e.sh covers the full flow with FIRECLAW_VMM=firecracker.
local t = require "tap"
local json = require "fireclaw.json"
local fs = require "fireclaw.fs"
local net = require "fireclaw.net"
local proc = require "fireclaw.proc"

local tests = os.getenv("FIRECLAW_TESTS")
local tmp = proc.run({ "mktemp", "-d" }).stdout:gsub("%s+$", "")
local log = tmp .. "/requests.jsonl"

-- private run dir, namespace prefix and a state dir holding the real image and keys
local posix = { setenv = require("fireclaw.sys").setenv }
-- the suite's state (tests/run's, never the user's) holds the image this test borrows
local outer = os.getenv("FIRECLAW_STATE") or "/var/lib/fireclaw"
posix.setenv("FIRECLAW_RUN", tmp .. "/run")
posix.setenv("FIRECLAW_STATE", tmp .. "/state")
posix.setenv("FIRECLAW_NETNS_PREFIX", "fc-" .. (os.getenv("FIRECLAW_TEST_TAG") or "") .. "rfc")
posix.setenv("FIRECLAW_VMM", "firecracker")
posix.setenv("FIRECLAW_FIRECRACKER", tests .. "/fake-firecracker")
posix.setenv("FAKE_FC_LOG", log)
-- sections 1-5 drive the unjailed Firecracker (no jailer here): the explicit opt-in
posix.setenv("FIRECLAW_UNSAFE_NO_JAILER", "1")
fs.mkdir_p(tmp .. "/state/images", "700")
local image = require "fireclaw.image"
require("fireclaw.config").unsafe_no_jailer = true -- config read the environment at load
local real = outer .. "/images/default"
fs.symlink(fs.readlink(real) and (real:match("^(.*)/") .. "/" .. fs.readlink(real)) or real, tmp .. "/state/images/default")
fs.symlink(outer .. "/keys", tmp .. "/state/keys")

local cli = require "fireclaw.cli"
local sandbox = require "fireclaw.sandbox"
local snapshots = cli.use "snapshot"
local restore = cli.use "restore"

local function requests()
	local out = {}
	for line in (fs.read(log) or ""):gmatch("[^\n]+") do
		local rec = json.decode(line)
		if rec.method then out[#out + 1] = rec end -- not the process events
	end
	fs.write(log, "", "666") -- a jailed fake Firecracker writes it as the VM's user (section 6)
	return out
end

local function calls(list)
	local s = {}
	for _, r in ipairs(list) do s[#s + 1] = r.method .. " " .. r.path end
	return table.concat(s, ", ")
end

local function find(list, method, path)
	for _, r in ipairs(list) do
		if r.method == method and r.path == path then return r.body end
	end
end

local function nothing_left(name)
	local left = {}
	for _, n in ipairs(net.netns_list("fc-" .. (os.getenv("FIRECLAW_TEST_TAG") or "") .. "rfc")) do left[#left + 1] = n end
	for _, d in ipairs(require("fireclaw.runtime").listdir(tmp .. "/run/vms") or {}) do left[#left + 1] = d end
	t.is(table.concat(left, " "), "", "nothing left behind: " .. name)
end

t.ok(image.exists("default"), "the default image is visible through the temporary state dir")

-- 1. cold boot through the coldboot recipe: the documented sequence, explicit boot args
local coldboot = cli.use "coldboot"
-- (over SSH: this image has the guest agent, which the fake does not run)
local ok, err = pcall(coldboot.boot, { vmm = "firecracker", boot_timeout = 1, exec = "ssh" })
t.like(not ok and tostring(err) or "", "^ssh: 172%.16%.0%.2:22 in fc%-%w*rfc%x+: timed out",
	"the fake never answers SSH: a clear timeout")
t.like(tostring(err), "; likely cause: [^\n]+\nthe console ends with:\n  .*fake%-firecracker: InstanceStart",
	"with a likely cause and the console's last lines")
local r = requests()
t.is(calls(r), "GET /version, PUT /logger, PUT /machine-config, PUT /boot-source, "
	.. "PUT /drives/rootfs, PUT /network-interfaces/eth0, PUT /entropy, PUT /vsock, PUT /actions",
	"cold boot: the documented request sequence (v1.16: with the entropy device; the vsock device)")
t.same(find(r, "PUT", "/vsock"), { guest_cid = 3, uds_path = "/run/fireclaw/vm/v.sock" },
	"the vsock socket at the fixed path in the VMM's mount namespace")
t.same(find(r, "PUT", "/entropy"), {}, "PUT /entropy with the default (no rate limit)")
local bs = find(r, "PUT", "/boot-source") or {}
t.like(bs.boot_args or "", "^console=ttyS0 root=/dev/vda rw ip=172%.16%.0%.2::172%.16%.0%.1:", "explicit boot args")
t.ok(not (bs.boot_args or ""):find("nomodule"), "no nomodule in the boot args")
t.ok(not (bs.boot_args or ""):find("tsc_early_khz"), "no TCG-only args for Firecracker")
t.like(bs.kernel_image_path or "", "vmlinux$", "Firecracker boots the ELF vmlinux")
local drive = find(r, "PUT", "/drives/rootfs") or {}
t.is(drive.path_on_host, "/run/fireclaw/vm/disk.ext4", "the disk is seen at the fixed path in the VMM's mount namespace")
local nic = find(r, "PUT", "/network-interfaces/eth0") or {}
t.is(nic.host_dev_name, "tap0", "the tap in the VM's namespace")
t.is(nic.guest_mac, "06:00:ac:10:00:02", "the fixed guest MAC")
t.same(find(r, "PUT", "/machine-config"), { vcpu_count = 1, mem_size_mib = 256 }, "machine config")
t.same(find(r, "PUT", "/actions"), { action_type = "InstanceStart" }, "InstanceStart")
nothing_left("cold boot that timed out")

-- 2. snapshot: pause + full snapshot through the snapshot recipe's take()
local sb = sandbox.new { vmm = "firecracker" }
local meta
t.lives(function()
	sb:network()
	sb:disk(sb.img.rootfs)
	sb:boot()
	meta = snapshots.take(sb, "fc-test")
end, "snapshot.take on the Firecracker driver")
sb:destroy()
r = requests()
t.like(calls(r), "PUT /actions, PATCH /vm, PUT /snapshot/create$", "snapshot: PATCH /vm Paused, then PUT /snapshot/create")
t.same(find(r, "PATCH", "/vm"), { state = "Paused" }, "paused before the snapshot")
local sc = find(r, "PUT", "/snapshot/create") or {}
t.is(sc.snapshot_type, "Full", "a full snapshot")
t.like(sc.snapshot_path or "", "/snapshots/%.tmp%-fc%-test%-%d+/vmstate$", "written to a temporary directory first")
t.is(meta and meta.vmm, "firecracker", "meta.json records the VMM")
t.is(meta and meta.vmm_version, "1.16.1", "and its version")
t.is(meta and meta.vmm_info.rng, true, "and that the VM has an entropy device")
t.same(meta and meta.vmm_info.vsock, { guest_cid = 3, uds_path = "/run/fireclaw/vm/v.sock" },
	"and its vsock device, with the path a restore binds again")
nothing_left("snapshot")

-- 3. restore through the restore recipe: a fresh process loads the snapshot
local snap, why = restore.find { vmm = "firecracker", snapshot = "fc-test" }
t.ok(snap, "the snapshot is usable with the same VMM version", why)
if snap then
	t.raises(function() restore.restore({ vmm = "firecracker", boot_timeout = 1 }, snap) end,
		"timed out", "restore ends at the SSH wait")
end
r = requests()
t.is(calls(r), "GET /version, PUT /logger, PUT /snapshot/load", "restore: version, logger, load — nothing else")
local load = find(r, "PUT", "/snapshot/load") or {}
t.same(load.mem_backend, { backend_type = "File", backend_path = snap and snap.memory }, "v1.16: mem_backend")
t.is(load.resume_vm, true, "resumed by the load")
t.is(load.clock_realtime, true, "v1.16: clock_realtime asked")
t.is(load.vsock_override, nil, "no vsock_override: every clone binds the recorded path in its own directory")
nothing_left("restore")

-- 3b. a restored sandbox's agent channel (the steps up to the VMM: the fake never answers
-- SSH): the vsock device comes back from meta.json, bound in this VM's own directory
if snap then
	local steps = sandbox.steps.restore(snap)
	steps:remove("connect")
	steps:remove("reseed")
	local rsb, ch, cwhy
	t.lives(function()
		rsb = restore.restore({ vmm = "firecracker" }, snap, steps)
		ch, cwhy = rsb.vm:agent_channel(5)
	end, "a restored sandbox, up to its VMM")
	t.ok(ch, "its agent channel answers", cwhy)
	if ch then
		local got = require("vmtest").fd_echo(ch, "restored")
		t.is(got, "restored", "a byte stream to the restored guest's agent port")
		require("fireclaw.sys").close(ch)
	end
	local vdir = rsb and rsb.dir
	if rsb then rsb:destroy() end
	t.ok(vdir and not fs.exists(vdir .. "/v.sock"), "the vsock socket went with the sandbox")
	requests()
	nothing_left("restored sandbox with an agent channel")
	-- a snapshot taken before VMs had a vsock device is refused as stale
	local old = json.decode(fs.read(snap.dir .. "/meta.json"))
	old.vmm_info.vsock = nil
	local okc, whyc = require("fireclaw.snapshot").compatible(old, image.load("default"), "firecracker",
		"1.16.1", "kvm")
	t.ok(not okc and (whyc or ""):find("no vsock device"), "a Firecracker snapshot without a vsock device: stale", whyc)
end

-- 4. the same restore against Firecracker v1.0: mem_file_path, no clock_realtime
-- another binary path: fireclaw asks each binary its version once per process
fs.write(tmp .. "/fc-1.0", "#!/bin/sh\nFAKE_FC_VERSION=1.0.0 exec " .. tests .. "/fake-firecracker \"$@\"\n", "755")
posix.setenv("FIRECLAW_FIRECRACKER", tmp .. "/fc-1.0")
require("fireclaw.config").firecracker = tmp .. "/fc-1.0" -- config read the environment at load
local snap10, why10 = restore.find { vmm = "firecracker", snapshot = "fc-test" }
t.ok(not snap10 and (why10 or ""):find("taken with firecracker 1%.16%.1, this is 1%.0%.0"),
	"a snapshot from another Firecracker version is refused", why10)
if snap then
	snap.vmm_version = "1.0.0"
	pcall(restore.restore, { vmm = "firecracker", boot_timeout = 1 }, snap)
	r = requests()
	load = find(r, "PUT", "/snapshot/load") or {}
	t.is(load.mem_file_path, snap.memory, "v1.0: mem_file_path")
	t.is(load.mem_backend, nil, "v1.0: no mem_backend")
	t.is(load.clock_realtime, nil, "v1.0: no clock_realtime")
end
nothing_left("restore on v1.0")

-- 5. a cold boot on Firecracker v1.0 of an image whose kernel finds devices through ACPI
-- only (the default one): refused right after the version is known, nothing configured
t.raises(function() coldboot.boot { vmm = "firecracker", boot_timeout = 1 } end,
	"^vm %x+: cannot boot: firecracker 1%.0%.0 lists devices only on the kernel command line",
	"v1.0 + an ACPI-only kernel: refused")
t.is(calls(requests()), "GET /version", "refused before anything was configured")
nothing_left("refused cold boot on v1.0")

-- 6. the same flows through the jailer (tests/fake-jailer): the paths are the jail's, the
-- record names the jail, nothing is left
local config = require "fireclaw.config"
posix.setenv("FIRECLAW_FIRECRACKER", tests .. "/fake-firecracker")
config.firecracker = tests .. "/fake-firecracker"
config.jailer = tests .. "/fake-jailer"
config.unsafe_no_jailer = false
proc.run { "chmod", "711", tmp } -- the fake Firecracker appends to the request log as the VM's user
fs.write(log, "", "666")
local function jails()
	local out = {}
	for _, e in ipairs(require("fireclaw.runtime").listdir(tmp .. "/run/jail") or {}) do
		for _, id in ipairs(require("fireclaw.runtime").listdir(tmp .. "/run/jail/" .. e) or {}) do out[#out + 1] = id end
	end
	return table.concat(out, " ")
end
local jsb = sandbox.new { vmm = "firecracker" }
local jmeta, jrec
t.lives(function()
	jsb:network()
	jsb:disk(jsb.img.rootfs)
	jsb:boot()
	jrec = json.decode(fs.read(jsb.dir .. "/record.json"))
	jmeta = snapshots.take(jsb, "fc-jail")
end, "jailed: boot and snapshot.take through the jailer")
jsb:destroy()
t.like(jrec and jrec.jail and jrec.jail.dir or "", "/run/jail/fake%-firecracker/" .. jsb.id .. "$", "jailed: the record names the jail")
t.ok(jrec and jrec.jail and jrec.jail.pid and jrec.jail.start, "jailed: and Firecracker's pid + start time")
r = requests()
t.is((find(r, "PUT", "/boot-source") or {}).kernel_image_path, "/vmlinux", "jailed: the kernel at /vmlinux")
t.is((find(r, "PUT", "/drives/rootfs") or {}).path_on_host, "/disk.ext4", "jailed: the disk at /disk.ext4")
t.same(find(r, "PUT", "/snapshot/create"), { snapshot_type = "Full", snapshot_path = "/snap/vmstate",
	mem_file_path = "/snap/memory" }, "jailed: the snapshot written in the jail")
t.is(jmeta and jmeta.vmm_info.rootfs_path_in_vmm, "/disk.ext4", "jailed: meta.json records /disk.ext4")
t.same(jmeta and jmeta.vmm_info.vsock, { guest_cid = 3, uds_path = "/v.sock" }, "jailed: and the jail's /v.sock")
local mst = proc.run({ "stat", "-c", "%u %a", jmeta and jmeta.memory or "/nonexistent" }).stdout
t.is(mst, "0 644\n", "jailed: the snapshot's memory is root's, 0644")
nothing_left("jailed snapshot")
t.is(jails(), "", "no jail left: jailed snapshot")
local jsnap, jwhy = restore.find { vmm = "firecracker", snapshot = "fc-jail" }
t.ok(jsnap, "jailed: the snapshot is usable", jwhy)
if jsnap then
	t.raises(function() restore.restore({ vmm = "firecracker", boot_timeout = 1 }, jsnap) end,
		"timed out", "jailed: restore into another jail ends at the SSH wait")
end
r = requests()
t.is(calls(r), "GET /version, PUT /logger, PUT /snapshot/load", "jailed restore: version, logger, load")
local jload = find(r, "PUT", "/snapshot/load") or {}
t.is(jload.snapshot_path, "/vmstate", "jailed restore: /vmstate")
t.same(jload.mem_backend, { backend_type = "File", backend_path = "/memory" }, "jailed restore: /memory")
nothing_left("jailed restore")
t.is(jails(), "", "no jail left: jailed restore")
if snap then -- section 2's snapshot, taken unjailed, names its disk at /run/fireclaw/vm/…
	snap.vmm_version = "1.16.1"
	t.raises(function() restore.restore({ vmm = "firecracker", boot_timeout = 1 }, snap) end,
		"a snapshot of an unjailed Firecracker does not load in a jail", "an unjailed snapshot in a jail: refused, saying why")
	nothing_left("unjailed snapshot refused in a jail")
	t.is(jails(), "", "no jail left: refused restore")
end

proc.run { "rm", "-rf", tmp }
return t.done()
