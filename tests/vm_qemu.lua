-- The QEMU microvm driver of fireclaw.vm on real guests: cold boot of the default image to
-- its readiness marker, pause/resume (QMP query-status), snapshot, two clones restored from
-- one snapshot running at once (each in its own namespace with its own disk copy), a
-- snapshot of a clone, failures, and destroy. Every VM dir is a temp dir; after the run no
-- VMM process, namespace or file is left.
local t = require "tap"
local vt = require "vmtest"
local vm = require "fireclaw.vm"
local proc = require "fireclaw.proc"

-- No VM needed: the -L rule and the snapshot groups of the mapped restores (QEMU >= 8.2;
-- tests/qemu_next.sh runs them)
do
	local q = require "fireclaw.vmm.qemu"
	local tmp = os.tmpname()
	os.remove(tmp)
	assert(os.execute("mkdir -p " .. tmp .. "/usr/share/qemu && touch " .. tmp .. "/usr/share/qemu/pvh.bin") == 0)
	t.is(q.data_dir("/usr/bin/qemu-system-x86_64"), nil, "the system's QEMU gets no -L")
	t.is(q.data_dir(tmp .. "/usr/bin/qemu-system-x86_64"), tmp .. "/usr/share/qemu", "an unpacked QEMU gets -L its share/qemu")
	t.is(q.data_dir("/nonexistent/bin/qemu-system-x86_64"), nil, "… when it has one")
	os.execute("rm -rf " .. tmp)
	local a, b = q.snapshot_gid("/s/snapshots/default"), q.snapshot_gid("/other/default/")
	t.is(a, b, "a snapshot's group depends on its name only")
	t.ok(a ~= q.snapshot_gid("/s/snapshots/other"), "another name, another group")
	t.ok(a >= q.SNAP_GID_BASE and a < q.SNAP_GID_BASE + 2 ^ 24 and q.SNAP_GID_BASE >= q.UID_BASE + 1 + 2 ^ 24
		and q.SNAP_GID_BASE + 2 ^ 24 <= 0x80000000, "snapshot groups: a range of their own, above the VM users")
	t.is(q.snapshot_gid("/x/00beef"), q.SNAP_GID_BASE + 0xbeef, "a hex id name is its own hash")
end

if os.getenv("FIRECLAW_TEST_SKIP_VM") == "1" then
	t.skip("FIRECLAW_TEST_SKIP_VM=1")
	return t.done()
end

local NS_PREFIX = "fct-vm-" .. vt.PID .. "-"
local MEM = 256

local d = vm.detect({ vmm = "qemu", accel = os.getenv("FIRECLAW_ACCEL") or "auto" })
if not d.vmm then
	t.skip("no usable QEMU: " .. d.why)
	return t.done()
end

-- The default image: use it, or build it when the image recipe exists.
local function default_image()
	local ok, image = pcall(require, "fireclaw.image")
	if not ok then return nil, "no fireclaw.image module" end
	if not image.exists("default") then
		local r = proc.run({ os.getenv("FIRECLAW") or "./fireclaw", "-q", "image", "build" },
			{ timeout = 900 })
		if r.status ~= 0 then return nil, "fireclaw image build failed: " .. r.stderr end
	end
	return image.load("default"), nil, image
end

local img, why = default_image()
if not img then
	t.skip("no default image (" .. tostring(why) .. ")")
	return t.done()
end
local READY = (img.guest and img.guest.ready_marker) or require("fireclaw.guest").READY

local all_pids = {} -- every VMM this test started: {pid, starttime}

local function new_vm(c, base, name, ns)
	-- no namespace, no network: a tap is only ever opened inside a test namespace
	local v = vm.new({ id = "fct-" .. name, dir = base .. "/" .. name, vmm = "qemu",
		accel = d.accel, netns = ns, tap = ns and "tap0", mac = ns and vt.GUEST_MAC })
	c:add(function() v:destroy() end)
	return v
end

local function spec_for(disk)
	-- the manifest's lists as they are: the driver joins them and adds the TCG args
	return { kernel = img.vmlinux, initrd = img.initrd, boot_args = img.boot_args,
		boot_args_tcg = img.boot_args_tcg, rootfs = disk, vcpu = 1, mem_mib = MEM }
end

local function remember(v)
	if v.pid then all_pids[#all_pids + 1] = { v.pid, v.starttime } end
end

local function gone(v)
	return v.pid ~= nil and not proc.alive(v.pid, v.starttime)
end

local function reachable(ns)
	return vt.tcp_probe(ns, "172.16.0.2", 22, 3000)
end

-- ---- cold boot → pause/resume → snapshot → destroy ----

local function cold(c, base)
	local ns = vt.netns(c, NS_PREFIX .. "a")
	local v = new_vm(c, base, "a", ns)
	local disk = v.dir .. "/disk.ext4"
	vt.copy(img.rootfs, disk)
	t.lives(function() v:boot(spec_for(disk)) end, "cold boot (qemu " .. d.accel .. ")")
	remember(v)
	t.is(v.vmm, "qemu", "v.vmm")
	t.is(v.vmm_version, d.qemu_version, "v.vmm_version from the QMP greeting")
	t.lives(function() v:wait_console(READY, 120) end, "console shows '" .. READY .. "'")
	t.is(v:state(), "running", "query-status: running")
	t.ok(reachable(ns), "the guest answers on 172.16.0.2:22 inside its namespace")
	t.lives(function() v:pause() end, "pause")
	t.is(v:state(), "paused", "query-status: paused")
	local stop = v.qmp:wait_event("STOP", 5)
	t.is(stop and stop.event, "STOP", "QMP STOP event queued and waited for")
	t.lives(function() v:resume() end, "resume")
	t.is(v:state(), "running", "query-status: running again")
	local evs = v.qmp:events()
	local names = {}
	for _, e in ipairs(evs) do names[#names + 1] = e.event end
	t.ok(table.concat(names, ","):find("RESUME", 1, true), "q:events() has the RESUME event",
		table.concat(names, ","))
	t.same(v.qmp:events(), {}, "q:events() empties the queue")
	local ver = v.qmp:execute("query-version")
	t.is(type(ver) == "table" and ver.qemu and ver.qemu.major, tonumber(d.qemu_version:match("^%d+")),
		"q:execute returns the decoded 'return' value")
	t.raises(function() v.qmp:execute("no-such-command") end,
		"^qmp: no%-such%-command: CommandNotFound: ", "a QMP error raises class and description")

	local snap = base .. "/snap"
	local info
	t.lives(function() info = v:snapshot(snap) end, "snapshot")
	info = info or {}
	t.is(v:state(), "paused", "paused after the snapshot")
	t.ok(vt.exists(snap .. "/vmstate"), "vmstate written")
	local size = tonumber(vt.run({ "stat", "-c", "%s", snap .. "/memory" }))
	t.is(size, MEM * 1024 * 1024, "memory file has the guest's RAM size")
	t.is(info.vmm, "qemu", "info.vmm")
	t.is(info.accel, d.accel, "info.accel")
	t.is(info.mem_mib, MEM, "info.mem_mib")
	t.is(info.rootfs_path_in_vmm, disk, "info.rootfs_path_in_vmm")
	-- the disk as it was at snapshot time goes with the snapshot (clones copy this one)
	vt.copy(disk, snap .. "/disk.ext4")
	t.lives(function() v:resume() end, "resume after the snapshot")
	t.is(v:state(), "running", "the original runs on after its snapshot")
	t.ok(reachable(ns), "and still answers on port 22")
	local pid_ram = v.dir .. "/memory"
	v:destroy()
	t.ok(gone(v), "destroy: no process")
	t.ok(not vt.exists(v.dir .. "/qmp.sock"), "destroy: no QMP socket")
	t.ok(not vt.exists(pid_ram), "destroy: the boot RAM file is removed")
	t.is(v:state(), "stopped", "state stopped")
	t.lives(function() v:destroy() end, "destroy twice")
	return snap, info, snap .. "/disk.ext4"
end

-- ---- two clones at once from one snapshot, then a snapshot of a clone ----

local function clones(c, base, snap, disk)
	local mtime = vt.run({ "stat", "-c", "%Y.%s", snap .. "/memory" })
	local vs = {}
	for i = 1, 2 do
		local ns = vt.netns(c, NS_PREFIX .. "c" .. i)
		local v = new_vm(c, base, "c" .. i, ns)
		vt.copy(disk, v.dir .. "/disk.ext4")
		t.lives(function() v:restore(snap, spec_for(v.dir .. "/disk.ext4")) end, "restore clone " .. i)
		remember(v)
		vs[i] = { v = v, ns = ns }
	end
	for i, x in ipairs(vs) do
		t.is(x.v:state(), "running", "clone " .. i .. " running (both at once)")
		t.ok(reachable(x.ns), "clone " .. i .. " answers on port 22 in its own namespace")
	end
	t.isnt(vt.inode(vs[1].v.dir .. "/disk.ext4"), vt.inode(vs[2].v.dir .. "/disk.ext4"),
		"the clones have separate disk copies")
	t.is(vt.run({ "stat", "-c", "%Y.%s", snap .. "/memory" }), mtime,
		"the snapshot's memory file stays pristine (each restore copies it)")

	-- a clone's RAM is a memfd of its own, like a cold boot's: its snapshot copies it
	local snap2 = base .. "/snap2"
	t.lives(function() vs[1].v:snapshot(snap2) end, "snapshot of a clone")
	vt.copy(vs[1].v.dir .. "/disk.ext4", base .. "/disk2.ext4")
	for i, x in ipairs(vs) do
		x.v:destroy()
		t.ok(gone(x.v) and not vt.exists(x.v.dir .. "/qmp.sock"), "clone " .. i .. " destroyed")
	end
	local ns3 = vt.netns(c, NS_PREFIX .. "c3")
	local v3 = new_vm(c, base, "c3", ns3)
	vt.copy(base .. "/disk2.ext4", v3.dir .. "/disk.ext4")
	t.lives(function() v3:restore(snap2, spec_for(v3.dir .. "/disk.ext4")) end,
		"restore from the clone's snapshot")
	remember(v3)
	t.ok(reachable(ns3), "that one answers on port 22 too")
	local graceful
	t.lives(function() graceful = v3:shutdown(3) end, "shutdown")
	t.ok(graceful ~= nil and gone(v3), "after shutdown no process is left (graceful: "
		.. tostring(graceful) .. ")")
	t.is(v3:state(), "stopped", "state stopped after shutdown")
end

-- ---- failures ----

local function failures(c, base, _snap)
	local v = new_vm(c, base, "bad-kernel", nil)
	-- QEMU gets its files as descriptors: a missing one is found before it starts
	t.raises(function() v:boot({ kernel = base .. "/no-such-kernel", mem_mib = 64 }) end,
		"^qemu: open .*/no%-such%-kernel: No such file", "a missing kernel: no QEMU started")
	t.ok(v.pid == nil, "no process after the failed start")
	v = new_vm(c, base, "bad-kernel2", nil)
	vt.run({ "touch", base .. "/empty-kernel" })
	t.raises(function() v:boot({ kernel = base .. "/empty-kernel", mem_mib = 64 }) end,
		"^qemu exited %(status 1%) before .*QMP socket.*: .*empty%-kernel",
		"QEMU exiting at start: error with its log tail, naming the file it was given")
	remember(v)
	t.ok(gone(v), "no process after the failed start")

	local broken = base .. "/broken"
	vt.run({ "mkdir", "-p", broken })
	local f = io.open(broken .. "/vmstate", "w")
	f:write("this is not a migration stream\n")
	f:close()
	vt.run({ "truncate", "-s", tostring(MEM * 1024 * 1024), broken .. "/memory" })
	local r = new_vm(c, base, "bad-state", nil)
	local disk = r.dir .. "/disk.ext4"
	vt.copy(img.rootfs, disk)
	local spec = spec_for(disk)
	t.raises(function() r:restore(broken, spec) end, "^qemu: restore failed %(a damaged snapshot%?%), qemu exited",
		"a corrupt vmstate: the restore fails with QEMU's reason")
	remember(r)
	t.ok(gone(r), "no process after the failed restore")
	local m = new_vm(c, base, "no-snap", nil)
	t.raises(function() m:restore(base .. "/nothing", spec) end, "no snapshot file .*/nothing/vmstate",
		"a missing snapshot is refused before starting QEMU")
	t.is(m.pid, nil, "nothing was started for it")
end

local c = vt.cleanup()
local base
local ok, err = pcall(function()
	base = vt.tmpdir()
	c:add(function() vt.rm_rf(base) end)
	local snap, _, disk = cold(c, base)
	clones(c, base, snap, disk)
	failures(c, base, snap)
end)
t.ok(ok, "QEMU tests ran to the end", err)
c:run()

local alive = {}
for _, p in ipairs(all_pids) do
	if proc.alive(p[1], p[2]) then alive[#alive + 1] = p[1] end
end
t.same(alive, {}, "no VMM process left")
t.same(vt.netns_list(NS_PREFIX), {}, "no test namespace left")
t.ok(base and not vt.exists(base), "the temp dir is gone")
return t.done()
