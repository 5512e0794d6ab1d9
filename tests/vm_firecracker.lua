-- The Firecracker driver of fireclaw.vm and the API client under it, against the fake
-- Firecracker (tests/fake-firecracker: validates every request against the OpenAPI spec
-- of the version it plays, keeps Firecracker's state rules, records what it was sent),
-- as v1.16.1 and as v1.0.0. When FIRECLAW_FIRECRACKER names a real binary, the same
-- lifecycle runs on it too (the recorded-call checks only apply to the fake).
local t = require "tap"
local vt = require "vmtest"
local vm = require "fireclaw.vm"
-- this file drives the unjailed Firecracker (tests/jailer.lua the jailed one): without a
-- jailer that needs the explicit opt-in
require("fireclaw.config").unsafe_no_jailer = true
local core = require "fireclaw.core.vm"
local fcdrv = require "fireclaw.vmm.firecracker"
local proc = require "fireclaw.proc"
local runtime = require "fireclaw.runtime"
local sys = require "fireclaw.sys"

local FAKE = vt.TESTS .. "/fake-firecracker"
local NS_PREFIX = "fct-vm-" .. vt.PID .. "-"
local MOUNT = fcdrv.MOUNT
local BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off root=/dev/vda rw"

local function method_calls(log)
	local out = {}
	for _, r in ipairs(vt.read_jsonl(log)) do
		if r.method then out[#out + 1] = r end
	end
	return out
end

local function events(log, kind)
	local out = {}
	for _, r in ipairs(vt.read_jsonl(log)) do
		if r.event == kind then out[#out + 1] = r end
	end
	return out
end

local function sequence(calls)
	local s = {}
	for _, c in ipairs(calls) do s[#s + 1] = c.method .. " " .. c.path end
	return table.concat(s, ", ")
end

local function find_call(calls, method, path)
	for _, c in ipairs(calls) do
		if c.method == method and c.path == path then return c end
	end
end

local function count_calls(calls, method, path)
	local n = 0
	for _, c in ipairs(calls) do
		if c.method == method and c.path == path then n = n + 1 end
	end
	return n
end

local function gone(pid, starttime)
	return pid ~= nil and not proc.alive(pid, starttime)
end

local function kind(path)
	local st = sys.lstat(path)
	return st and st.type
end

-- One echo round trip on an agent channel (the fake's guest echoes): true when `data`
-- came back whole.
local function echo(ch, data)
	ch:send(data, 5)
	local got = ""
	while #got < #data do
		local d = ch:recv(65536, 5)
		if not d then break end
		got = got .. d
	end
	return got == data, got
end

-- Descriptors of this process, once the garbage of earlier tests (sockets closed by their
-- __gc) is collected: what stays open is held on purpose, or leaked.
local function open_fds()
	collectgarbage("collect")
	return #(runtime.listdir("/proc/self/fd") or {})
end

-- ---- targets: the fake as two versions, and a real binary if one is configured ----

local targets = {
	{ name = "fake v1.16.1", bin = FAKE, version = "1.16.1", fake = true },
	{ name = "fake v1.0.0", bin = FAKE, version = "1.0.0", fake = true },
}
local real = os.getenv("FIRECLAW_FIRECRACKER")
if real and real ~= "" and not real:find("fake%-firecracker$") and vt.exists(real) then
	targets[#targets + 1] = { name = "firecracker " .. real, bin = real, fake = false }
end

-- Kernel and disk for a target: empty files do for the fake (it only opens them); a
-- real Firecracker gets the default image.
local function guest_files(tg, base)
	if tg.fake then
		local k = base .. "/vmlinux"
		io.open(k, "w"):close()
		return { kernel = k, boot_args = BOOT_ARGS, disk = nil }
	end
	local ok, image = pcall(require, "fireclaw.image")
	local img = ok and image.exists and image.exists("default") and image.load("default")
	if not img then return nil end
	return { kernel = img.vmlinux, initrd = img.initrd, boot_args = table.concat(img.boot_args, " "),
		disk = img.rootfs, ready = img.guest and img.guest.ready_marker }
end

local function new_vm(tg, dir, log, extra)
	local opts = { id = "fct-" .. dir:match("([^/]+)$"), dir = dir, vmm = "firecracker",
		firecracker = tg.bin }
	if tg.fake then opts.env = { FAKE_FC_VERSION = tg.version, FAKE_FC_LOG = log } end
	for k, v in pairs(extra or {}) do opts[k] = v end
	if opts.netns then opts.tap, opts.mac = "tap0", vt.GUEST_MAC end
	return vm.new(opts)
end

local function make_disk(files, path)
	if files.disk then vt.copy(files.disk, path) else io.open(path, "w"):close() end
end

-- ---- cold boot, pause, snapshot, two clones at once, destroy ----

local function cold_boot(tg, c, base, files)
	local ns = vt.netns(c, NS_PREFIX .. "a")
	local log = base .. "/a.log"
	local dir = base .. "/a"
	local v = new_vm(tg, dir, log, { netns = ns })
	c:add(function() v:destroy() end)
	make_disk(files, dir .. "/disk.ext4")
	local spec = { kernel = files.kernel, initrd = files.initrd, boot_args = files.boot_args,
		rootfs = dir .. "/disk.ext4", vcpu = 1, mem_mib = 128 }
	t.lives(function() v:boot(spec) end, tg.name .. ": cold boot")
	t.is(v:state(), "running", tg.name .. ": state running after boot")
	t.ok(v.pid and proc.alive(v.pid, v.starttime), tg.name .. ": v.pid/v.starttime name the live VMM")
	if tg.fake then
		t.is(v.vmm_version, tg.version, tg.name .. ": version from GET /version")
		t.lives(function() v:wait_console("guest is running", 10) end,
			tg.name .. ": wait_console sees the boot marker on the serial console")
		-- console, stderr and logger (opened at /proc/self/fd/3) are pipes into capped files
		t.ok(v.sink_pid and proc.alive(v.sink_pid, v.sink_starttime), tg.name .. ": a log sink runs with the VMM")
		t.ok(require("fireclaw.vmm.util").poll(function()
			local f = io.open(dir .. "/firecracker.log", "rb")
			local s = f and f:read("*a") or ""
			if f then f:close() end
			return s:find("Running Firecracker", 1, true) and true or nil
		end, 10), tg.name .. ": the logger's lines reach firecracker.log")
		local calls = method_calls(log)
		-- the entropy device (virtio-rng) where the version's spec has PUT /entropy
		local rng = tg.version == "1.16.1"
		local nboot = rng and 9 or 8
		t.is(sequence({ unpack(calls, 1, nboot) }), "GET /version, PUT /logger, PUT /machine-config, PUT /boot-source, "
			.. "PUT /drives/rootfs, PUT /network-interfaces/eth0, " .. (rng and "PUT /entropy, " or "")
			.. "PUT /vsock, PUT /actions",
			tg.name .. ": the exact cold-boot sequence" .. (rng and " (with PUT /entropy)" or " (no /entropy in v1.0)"))
		local vsk = find_call(calls, "PUT", "/vsock") or {}
		t.same(vsk.body, { guest_cid = 3, uds_path = MOUNT .. "/v.sock" },
			tg.name .. ": PUT /vsock: guest CID 3, the socket at the fixed in-VMM path (checked against the spec)")
		t.is(vsk.status, 204, tg.name .. ": PUT /vsock answered 204")
		local bind = events(log, "vsock-bind")[1] or {}
		t.ok(kind(dir .. "/v.sock") == "socket" and bind.ino == vt.inode(dir .. "/v.sock"),
			tg.name .. ": Firecracker's vsock socket is the VM directory's v.sock")
		local fd, why = v:agent_channel(5)
		t.ok(type(fd) == "number" and (sys.fstat(fd) or {}).type == "socket",
			tg.name .. ": agent_channel: CONNECT 1024 answered OK; a socket descriptor", why)
		if fd then
			t.is(vt.fd_echo(fd, "ping " .. tg.version), "ping " .. tg.version,
				tg.name .. ": the descriptor is a byte stream to the guest's port 1024 (used by a child)")
			sys.close(fd)
		end
		local s2 = fcdrv.vsock_connect(v, 1024, 5)
		t.ok(s2 and echo(s2, "ping\0\255" .. tg.version), tg.name .. ": byte for byte, NUL and 0xff too")
		if s2 then s2:close() end
		local vc = events(log, "vsock-connect")[1] or {}
		t.is(vc.port, 1024, tg.name .. ": the connection asked for the agent's port")
		local ent = find_call(calls, "PUT", "/entropy")
		if rng then
			t.ok(ent and ent.status == 204 and next(ent.body) == nil,
				tg.name .. ": PUT /entropy {} accepted by the spec-checking server (204)")
		else
			t.is(ent, nil, tg.name .. ": no PUT /entropy to a version without it")
		end
		local ok2xx = #calls >= nboot
		for i = 1, nboot do ok2xx = ok2xx and calls[i].status < 300 end
		t.ok(ok2xx, tg.name .. ": every boot request answered 2xx")
		local bs = find_call(calls, "PUT", "/boot-source")
		t.same(bs and bs.body, { kernel_image_path = files.kernel, boot_args = BOOT_ARGS },
			tg.name .. ": boot-source with explicit boot_args")
		local dr = find_call(calls, "PUT", "/drives/rootfs")
		t.is(dr and dr.body.path_on_host, MOUNT .. "/disk.ext4",
			tg.name .. ": the disk is named by the fixed in-VMM path")
		local ni = find_call(calls, "PUT", "/network-interfaces/eth0")
		t.same(ni and ni.body, { iface_id = "eth0", host_dev_name = "tap0", guest_mac = vt.GUEST_MAC },
			tg.name .. ": network interface on tap0 with the guest MAC")
		local start = events(log, "start")[1] or {}
		t.is(start.vm_dir, vt.stat_id(dir), tg.name .. ": the VMM sees its VM dir at " .. MOUNT)
		t.is(start.netns, "net:[" .. tostring(vt.inode("/run/netns/" .. ns)) .. "]",
			tg.name .. ": the VMM runs in the VM's network namespace")
		local open = events(log, "open")[1] or {}
		t.is(open.ino, vt.inode(dir .. "/disk.ext4"), tg.name .. ": it opened the VM's own disk copy")
		t.ok(not vt.mounted_here(MOUNT), tg.name .. ": nothing mounted on " .. MOUNT .. " on the host")
	elseif files.ready and vm.kvm_kind() == "hardware" then
		t.lives(function() v:wait_console(files.ready, 60) end, tg.name .. ": guest ready")
	else
		t.skip(tg.name .. ": this host's KVM cannot boot guests; API lifecycle only")
	end
	t.lives(function() v:pause() end, tg.name .. ": pause")
	t.is(v:state(), "paused", tg.name .. ": state paused")
	t.lives(function() v:resume() end, tg.name .. ": resume")
	t.is(v:state(), "running", tg.name .. ": state running again")
	return v, spec, log
end

local function snapshot(tg, v, base, log)
	local snap = base .. "/snap"
	local info
	-- a snapshot resets the guest's vsock connections (TRANSPORT_RESET): the host's end
	-- sees the stream end
	local ch = tg.fake and fcdrv.vsock_connect(v, 1024, 5)
	t.lives(function() info = v:snapshot(snap) end, tg.name .. ": snapshot")
	info = info or {}
	t.ok(vt.exists(snap .. "/vmstate") and vt.exists(snap .. "/memory"),
		tg.name .. ": vmstate and memory written")
	t.is(v:state(), "paused", tg.name .. ": paused after the snapshot")
	if ch then
		local ok, d = pcall(ch.recv, ch, 100, 5)
		t.ok(ok and d == nil, tg.name .. ": an open agent channel ends with the snapshot (the guest reset it)", d)
		ch:close()
	end
	t.is(info.vmm, "firecracker", tg.name .. ": info.vmm")
	t.is(info.vmm_version, v.vmm_version, tg.name .. ": info.vmm_version")
	t.is(info.rootfs_path_in_vmm, MOUNT .. "/disk.ext4", tg.name .. ": info.rootfs_path_in_vmm")
	t.is(info.mem_mib, 128, tg.name .. ": info.mem_mib")
	if tg.fake then
		t.is(info.rng, tg.version == "1.16.1", tg.name .. ": info.rng says whether the snapshot has the entropy device")
		t.same(info.vsock, { guest_cid = 3, uds_path = MOUNT .. "/v.sock" },
			tg.name .. ": info.vsock: the snapshot keeps the device and the path it binds again")
	end
	if tg.fake then
		local calls, n = method_calls(log), 0
		for i, r in ipairs(calls) do
			if r.path == "/snapshot/create" then n = i end
		end
		local pause = calls[n - 1] or { body = {} }
		t.is(pause.method .. " " .. pause.path .. " " .. tostring(pause.body.state), "PATCH /vm Paused",
			tg.name .. ": PATCH /vm Paused right before the snapshot")
		t.same(calls[n] and calls[n].body, { snapshot_type = "Full",
			snapshot_path = snap .. "/vmstate", mem_file_path = snap .. "/memory" },
			tg.name .. ": PUT /snapshot/create body")
		t.is(count_calls(calls, "GET", "/version"), 1, tg.name .. ": GET /version once per process")
	end
	local pid, st = v.pid, v.starttime
	v:destroy()
	t.ok(gone(pid, st), tg.name .. ": destroy leaves no process")
	t.ok(not vt.exists(v.dir .. "/api.sock"), tg.name .. ": destroy removes the API socket")
	t.is(kind(v.dir .. "/v.sock"), nil, tg.name .. ": and the vsock socket (Firecracker never does)")
	local ch2, why2 = v:agent_channel(1)
	t.ok(not ch2 and why2:find("destroyed", 1, true), tg.name .. ": agent_channel of a destroyed VM: nil, why", why2)
	if tg.fake then
		local conns = {}
		for _, r in ipairs(method_calls(log)) do conns[r.conn] = true end
		local n = 0
		for _ in pairs(conns) do n = n + 1 end
		t.is(n, 1, tg.name .. ": every request went over one kept-alive connection")
	end
	t.lives(function() v:destroy() end, tg.name .. ": destroy twice is harmless")
	t.is(v:state(), "stopped", tg.name .. ": state stopped")
	return snap, info
end

local function clones(tg, c, base, _files, snap, info, spec)
	local vms = {}
	for i = 1, 2 do
		local ns = vt.netns(c, NS_PREFIX .. "c" .. i)
		local dir = base .. "/c" .. i
		local log = base .. "/c" .. i .. ".log"
		local v = new_vm(tg, dir, log, { netns = ns })
		c:add(function() v:destroy() end)
		vt.copy(base .. "/a/disk.ext4", dir .. "/disk.ext4")
		-- a stale socket file where the snapshot binds would fail the load (and end the VMM)
		if i == 1 then io.open(dir .. "/v.sock", "w"):close() end
		local cspec = vt.shallow_copy(spec, { rootfs = dir .. "/disk.ext4",
			rootfs_path_in_vmm = info.rootfs_path_in_vmm, vsock = info.vsock })
		t.lives(function() v:restore(snap, cspec) end, tg.name .. ": restore clone " .. i)
		vms[i] = { v = v, log = log, dir = dir }
	end
	for i, x in ipairs(vms) do
		t.is(x.v:state(), "running", tg.name .. ": clone " .. i .. " running (both at once)")
	end
	if tg.fake then
		for i, x in ipairs(vms) do
			local calls = method_calls(x.log)
			t.is(sequence(calls), "GET /version, PUT /logger, PUT /snapshot/load, GET /",
				tg.name .. ": clone " .. i .. " request sequence")
			local load = find_call(calls, "PUT", "/snapshot/load") or { body = {} }
			local want = { snapshot_path = snap .. "/vmstate", resume_vm = true }
			if tg.version == "1.0.0" then
				want.mem_file_path = snap .. "/memory"
			else
				want.mem_backend = { backend_type = "File", backend_path = snap .. "/memory" }
			end
			t.same(load.body, want, tg.name .. ": clone " .. i .. " /snapshot/load in v"
				.. tg.version .. "'s shape")
			local open = events(x.log, "open")[1] or {}
			t.is(open.ino, vt.inode(x.dir .. "/disk.ext4"),
				tg.name .. ": clone " .. i .. " opened its own disk copy")
			local bind = events(x.log, "vsock-bind")[1] or {}
			t.ok(bind.path == MOUNT .. "/v.sock" and kind(x.dir .. "/v.sock") == "socket"
				and bind.ino == vt.inode(x.dir .. "/v.sock"),
				tg.name .. ": clone " .. i .. ": the load bound the recorded vsock path, in its own directory"
				.. (i == 1 and " (a stale file there was removed first)" or ""))
		end
		-- both channels open at once, each to its own clone
		local chs = {}
		for i, x in ipairs(vms) do
			local why
			chs[i], why = fcdrv.vsock_connect(x.v, 1024, 5)
			t.ok(chs[i], tg.name .. ": clone " .. i .. ": agent channel", why)
		end
		for i, ch in ipairs(chs) do
			t.ok(echo(ch, "clone " .. i .. " " .. string.rep(tostring(i), 100000)),
				tg.name .. ": clone " .. i .. ": its own channel carries its own bytes (100 kB)")
		end
		for _, ch in ipairs(chs) do ch:close() end
		for i, x in ipairs(vms) do
			local vc = events(x.log, "vsock-connect")
			t.is(#vc, 1, tg.name .. ": clone " .. i .. ": one connection reached its VMM")
		end
	end
	for i, x in ipairs(vms) do
		local pid, st = x.v.pid, x.v.starttime
		x.v:destroy()
		t.ok(gone(pid, st) and not vt.exists(x.dir .. "/api.sock") and not kind(x.dir .. "/v.sock"),
			tg.name .. ": clone " .. i .. " destroyed: no process, no API or vsock socket")
	end
end

local function shutdown(tg, c, base, files)
	local dir = base .. "/s"
	local log = base .. "/s.log"
	local ns = vt.netns(c, NS_PREFIX .. "s")
	local v = new_vm(tg, dir, log, { netns = ns })
	c:add(function() v:destroy() end)
	make_disk(files, dir .. "/disk.ext4")
	v:boot({ kernel = files.kernel, initrd = files.initrd, boot_args = files.boot_args,
		rootfs = dir .. "/disk.ext4", mem_mib = 128 })
	local pid, st = v.pid, v.starttime
	if tg.fake then
		t.is(v:shutdown(10), true, tg.name .. ": shutdown is graceful (Ctrl-Alt-Del, VMM exits)")
		local calls = method_calls(log)
		local last = calls[#calls] or { body = {} }
		t.is(last.body.action_type, "SendCtrlAltDel", tg.name .. ": shutdown sent SendCtrlAltDel")
	else
		v:shutdown(2)
	end
	t.ok(gone(pid, st), tg.name .. ": no process after shutdown")
	t.is(v:state(), "stopped", tg.name .. ": state stopped after shutdown")
end

local function lifecycle(tg)
	local c = vt.cleanup()
	local ok, err = pcall(function()
		local base = vt.tmpdir()
		c:add(function() vt.rm_rf(base) end)
		local files = guest_files(tg, base)
		if not files then
			t.skip(tg.name .. ": no default image for a real Firecracker")
			return
		end
		local v, spec, log = cold_boot(tg, c, base, files)
		local snap, info = snapshot(tg, v, base, log)
		clones(tg, c, base, files, snap, info, spec)
		shutdown(tg, c, base, files)
	end)
	t.ok(ok, tg.name .. ": lifecycle ran to the end", err)
	c:run()
end

-- ---- faults surface as clear Lua errors ----

-- A bare fake and an API client on it, for requests the VM object would never send.
local function bare_fake(c, base, version, name)
	local sock = base .. "/" .. name .. ".sock"
	local p = proc.spawn{ argv = { FAKE, "--api-sock", sock }, stderr = base .. "/" .. name .. ".err",
		stdout = base .. "/" .. name .. ".out",
		env = { FAKE_FC_VERSION = version, FAKE_FC_LOG = base .. "/" .. name .. ".log" } }
	c:add(function() p:close() end)
	core.wait_socket(sock, 10, p, { log = base .. "/" .. name .. ".err", name = "firecracker" })
	local api = core.api_client(sock, { timeout = 10 })
	c:add(function() api:close() end)
	return api, p
end

local function api_faults(c, base)
	local api = bare_fake(c, base, "1.16.1", "f1")
	t.raises(function() api:put("/actions", { action_type = "InstanceStart" }) end,
		"^firecracker: PUT /actions: 400 Start microvm error: Cannot start microvm without kernel "
		.. "configuration%.$", "InstanceStart before boot-source: Firecracker's fault as the error")
	t.raises(function() api:patch("/vm", { state = "Paused" }) end,
		"^firecracker: PATCH /vm: 400 The requested operation is not supported before starting "
		.. "the microVM%.$", "PATCH /vm before start")
	t.raises(function() api:get("/nope") end,
		"^firecracker: GET /nope: 400 Invalid request method and/or path: GET /nope%.$",
		"unknown path")
	t.raises(function() api:put("/boot-source", { kernel_image_path = 5 }) end,
		"^firecracker: PUT /boot%-source: 400 An error occurred when deserializing the json body "
		.. "of a request: at `kernel_image_path`: 5 is not of type 'string'",
		"the validator rejects a wrongly typed body, naming the field")
	t.raises(function() api:put("/machine-config", { vcpu_count = 1, mem_size_mib = 128,
		bogus = true }) end, "'bogus' was unexpected", "the validator rejects unknown fields")
	t.raises(function() api:put("/boot-source", { kernel_image_path = base .. "/missing" }) end,
		"^firecracker: PUT /boot%-source: 400 Boot source error: The kernel file cannot be opened",
		"a missing kernel")
	t.same(api:get("/"), { app_name = "Firecracker", id = "anonymous-instance",
		state = "Not started", vmm_version = "1.16.1" }, "the connection survives faults (GET /)")
	t.raises(function() api:put("/snapshot/load", { snapshot_path = "/x",
		mem_backend = { backend_type = "File", backend_path = "/y" } }) end,
		"Loading a microVM snapshot not allowed after configuring boot%-specific resources",
		"/snapshot/load only on a fresh process")
	local old = bare_fake(c, base, "1.0.0", "f2")
	t.raises(function() old:put("/snapshot/load", { snapshot_path = "/x",
		mem_backend = { backend_type = "File", backend_path = "/y" } }) end,
		"^firecracker: PUT /snapshot/load: 400 .*'mem_backend' was unexpected",
		"v1.0.0 rejects the v1.16 /snapshot/load shape")
	api:close()
	t.lives(function() api:close() end, "api:close twice")
	t.raises(function() api:get("/") end, "API client is closed", "a closed client raises")
	local nobody = core.api_client(base .. "/nobody.sock", { timeout = 2 })
	t.raises(function() nobody:get("/version") end,
		"^firecracker: GET /version: cannot connect to the API socket .*nobody%.sock",
		"no server: a transport error naming the socket")
	nobody:close()
end

local function vm_faults(c, base)
	local tg = targets[1]
	local v = new_vm(tg, base .. "/k", base .. "/k.log")
	c:add(function() v:destroy() end)
	t.raises(function() v:boot({ kernel = base .. "/no-kernel", boot_args = BOOT_ARGS }) end,
		"^firecracker: PUT /boot%-source: 400 Boot source error: The kernel file cannot be opened",
		"boot with a missing kernel raises Firecracker's fault")
	t.ok(gone(v.pid, v.starttime), "a failed boot leaves no process")
	t.is(v:state(), "stopped", "a failed boot: state stopped")

	for _, version in ipairs({ "1.16.1", "1.0.0" }) do
		local tgv = { name = "fake v" .. version, bin = FAKE, version = version, fake = true }
		local log = base .. "/r" .. version .. ".log"
		local r = new_vm(tgv, base .. "/r" .. version, log)
		c:add(function() r:destroy() end)
		t.raises(function() r:restore(base .. "/no-snapshot", {}) end,
			"^firecracker: PUT /snapshot/load: 400 Load snapshot error: Failed to restore from "
			.. "snapshot: Failed to get snapshot state from file: Failed to open snapshot file: "
			.. "No such file or directory", "v" .. version .. ": restore from a missing snapshot")
		t.ok(gone(r.pid, r.starttime), "v" .. version .. ": the failed VMM is gone")
	end
	local w = new_vm(tg, base .. "/w", base .. "/w.log")
	c:add(function() w:destroy() end)
	io.open(base .. "/w/other.ext4", "w"):close()
	t.raises(function() w:restore(base .. "/snap-any", { rootfs = base .. "/w/other.ext4",
		rootfs_path_in_vmm = MOUNT .. "/disk.ext4" }) end,
		"the snapshot opens its disk at /run/fireclaw/vm/disk%.ext4.*put this clone's copy at "
		.. ".*/w/disk%.ext4", "a clone disk in the wrong place is refused before spawning")
	t.is(w.pid, nil, "nothing was spawned for it")

	local bare = NS_PREFIX .. "notap"
	c:add(function() vt.netns_delete(bare) end)
	vt.run({ "ip", "netns", "add", bare })
	local n = new_vm(tg, base .. "/n", base .. "/n.log", { netns = bare })
	c:add(function() n:destroy() end)
	t.raises(function() n:boot({ kernel = "/dev/null" }) end,
		"no tap0 in namespace " .. bare:gsub("%-", "%%-") .. ": create the tap first",
		"a namespace without the tap is refused (the VMM would make a dead one)")
	t.is(n.pid, nil, "nothing was spawned for it")
end

-- ---- the API socket never appears, or the VMM dies first ----

local function socket_faults(c, base)
	local tg = targets[1]
	local quiet = new_vm(tg, base .. "/q", base .. "/q.log", { socket_timeout = 0.5 })
	quiet.env.FAKE_FC_MODE = "no-listen"
	c:add(function() quiet:destroy() end)
	t.raises(function() quiet:boot({ kernel = "/dev/null" }) end,
		"^firecracker: API socket .*/q/api%.sock did not appear within 0%.5s",
		"a VMM that never listens: timeout error")
	t.ok(gone(quiet.pid, quiet.starttime), "the silent VMM was killed")

	local early = new_vm(tg, base .. "/e", base .. "/e.log")
	early.env.FAKE_FC_MODE = "exit-early"
	c:add(function() early:destroy() end)
	t.raises(function() early:boot({ kernel = "/dev/null" }) end,
		"^firecracker exited %(status 1%) before its API socket appeared: fake%-firecracker: "
		.. "starting\nfake%-firecracker: cannot create the VM: Bad file descriptor",
		"a VMM that exits early: error with its log tail")

	-- Firecracker refuses to start over an existing socket file (the driver removes stale
	-- ones; here the primitive sees the process die)
	local mute = new_vm(tg, base .. "/m", base .. "/m.log")
	mute.env.FAKE_FC_MODE = "mute"
	c:add(function() mute:destroy() end)
	local saved = fcdrv.REQUEST_TIMEOUT
	fcdrv.REQUEST_TIMEOUT = 0.5
	t.raises(function() mute:boot({ kernel = "/dev/null" }) end,
		"^firecracker: GET /version: [Oo]peration timed out", "a VMM that never answers: the "
		.. "request times out")
	fcdrv.REQUEST_TIMEOUT = saved
	t.ok(gone(mute.pid, mute.starttime), "and the VMM is killed")

	-- Ctrl-C during a request that never gets an answer: the wait is fc_poll, so the
	-- request is interrupted at once, and the VMM goes with the VM
	local script = base .. "/intr.lua"
	local f = io.open(script, "w")
	f:write(string.format([[
local vm = require "fireclaw.vm"
require("fireclaw.config").unsafe_no_jailer = true
local v = vm.new{ id = "intr", dir = %q, vmm = "firecracker", firecracker = %q,
	env = { FAKE_FC_MODE = "mute" } }
local core = require "fireclaw.core.vm"
local real = core.api_client
core.api_client = function(...) io.stdout:write("asking\n") io.stdout:flush() return real(...) end
v:boot{ kernel = "/dev/null" }
]], base .. "/i", FAKE))
	f:close()
	local p = proc.spawn{ argv = { os.getenv("FIRECLAW") or "./fireclaw", script },
		stdout = base .. "/intr.out", stderr = base .. "/intr.err" }
	c:add(function() p:close() end)
	local asking = require("fireclaw.vmm.util").poll(function()
		local o = io.open(base .. "/intr.out")
		local s = o and o:read("*a") or ""
		if o then o:close() end
		if s:find("asking", 1, true) then return true end
		if not p:alive() then return false end
	end, 30)
	t.ok(asking, "a fireclaw is waiting for an answer from a mute VMM")
	p:kill(2)
	local st = p:wait(30) or {}
	t.is(st.status, 130, "SIGINT ends it with status 130")
	t.like(vt.run({ "cat", base .. "/intr.err" }), "interrupted by SIGINT", "saying it was interrupted")

	local sock = base .. "/busy.sock"
	io.open(sock, "w"):close()
	local busy = proc.spawn{ argv = { FAKE, "--api-sock", sock }, stderr = base .. "/busy.err" }
	c:add(function() busy:close() end)
	t.raises(function() core.wait_socket(sock, 10, busy, { log = base .. "/busy.err",
		name = "firecracker", what = "API socket" }) end,
		"firecracker exited %(status 1%) before its API socket appeared: .*Address in use",
		"wait_socket: the process died over a stale socket file")
	t.is(core.log_tail(base .. "/busy.err", 1):match("Address in use") ~= nil, true,
		"log_tail returns the last line")
end

-- ---- the agent channel: a hostile or absent answer is one clear error, no hang, no leak ----

local function vsock_faults(c, base)
	local net = require "fireclaw.net"
	t.raises(function() net.unix_connect(base .. "/nobody.sock") end,
		"^net: connect to .*/nobody%.sock: No such file or directory", "net.unix_connect: no socket there")
	io.open(base .. "/plain", "w"):close()
	t.raises(function() net.unix_connect(base .. "/plain") end, "^net: connect to .*/plain: Connection refused",
		"net.unix_connect: a file that is not a listening socket")
	t.raises(function() net.unix_connect("/" .. string.rep("x", 120)) end, "path too long for a unix socket",
		"net.unix_connect: a path over 107 bytes")
	local tg = targets[1]
	local log = base .. "/vs.log"
	local ns = vt.netns(c, NS_PREFIX .. "vs")
	local v = new_vm(tg, base .. "/vs", log, { netns = ns })
	-- a program serving a connection on its descriptor 3, as the guest agent does
	local server = base .. "/serve-fd"
	local f = io.open(server, "w")
	f:write('#!/bin/sh\n[ "$1" = --serve-fd ] || exit 2\nexec /bin/cat <&"$2" >&"$2"\n')
	f:close()
	vt.run({ "chmod", "755", server })
	v.env.FAKE_FC_VSOCK = "1024=hello,2000=garbage,2001=long,2002=silent,2003=nonl,2004=late:3,2005=serve:" .. server
	c:add(function() v:destroy() end)
	io.open(base .. "/vs/disk.ext4", "w"):close()
	v:boot({ kernel = "/dev/null", rootfs = base .. "/vs/disk.ext4", mem_mib = 128 })
	local fds = open_fds()
	local ch, why = fcdrv.vsock_connect(v, 1024, 5)
	t.ok(ch, "a channel to a guest that speaks at once", why)
	if ch then
		t.is(ch:recv(100, 5), "HELLO\n", "nothing past the OK line was taken from the guest's stream")
		ch:close()
	end
	local function fails(port, timeout, pattern, name)
		local s, err = fcdrv.vsock_connect(v, port, timeout)
		t.ok(s == nil and type(err) == "string" and not err:find("\n") and err:find(pattern) ~= nil, name, err)
		if s then s:close() end
	end
	fails(2000, 5, "^vm fct%-vs: vsock CONNECT 2000: the answer was 'NOPE 1' instead of 'OK <port>'$",
		"an answer that is not OK: one line quoting it")
	fails(2001, 5, "^vm fct%-vs: vsock CONNECT 2001: an answer longer than 32 bytes without a newline: 'OK 9+…'$",
		"an overlong answer: refused after 32 bytes")
	fails(2002, 0.5, "^vm fct%-vs: no answer to CONNECT 2002 on the vsock socket within 0%.5 s",
		"silence: an error at the deadline, no hang")
	fails(2003, 5, "^vm fct%-vs: vsock CONNECT 2003: the answer 'OK 5' ended without a newline$",
		"an answer cut short")
	fails(1999, 0.3, "^vm fct%-vs: nothing accepted vsock port 1999 within 0%.3 s %(Firecracker closed %d+ connections?: "
		.. "no listener in the guest%)$", "a port nothing listens on: Firecracker closes, retried until the deadline")
	local served = fcdrv.vsock_connect(v, 2005, 5)
	t.ok(served and echo(served, "served\n"), "the API test server can hand a connection to a program (the agent's "
		.. "--serve-fd)")
	if served then served:close() end
	t.raises(function() fcdrv.vsock_connect(v, "1024\nCONNECT 7") end, "port must be an integer",
		"a port that is not a number is misuse (nothing reaches the socket)")
	local late, lwhy = fcdrv.vsock_connect(v, 2004, 5)
	t.ok(late and echo(late, "late"), "a listener that comes up later: retried until it answers", lwhy)
	if late then late:close() end
	local n = 0
	for _, e in ipairs(events(log, "vsock-connect")) do
		if e.port == 2004 then n = n + 1 end
	end
	t.is(n, 4, "three closed attempts, then the fourth connected")
	-- a paused guest does not answer: the deadline ends the wait; resumed, it answers
	v:pause()
	fails(1024, 0.5, "^vm fct%-vs: no answer to CONNECT 1024", "a paused guest: no answer until the deadline")
	v:resume()
	local fd = v:agent_channel(5)
	-- (this guest says HELLO first: the child reads that back)
	t.ok(fd and vt.fd_echo(fd, "again") == "HELLO", "resumed: the agent channel works again")
	if fd then sys.close(fd) end
	t.is(open_fds(), fds, "no descriptor left open by any of these attempts")
	v.proc:kill(9)
	v.proc:wait(5)
	fails(1024, 5, "^vm fct%-vs: no vsock connection: firecracker was killed", "a dead VMM: at once, saying so")
	v:destroy()
	t.is(kind(base .. "/vs/v.sock"), nil, "the socket goes with the VM")

	-- the real guest agent behind the fake's vsock port 1024: v:agent_connect wraps the
	-- channel (fireclaw.core.agent), one protocol over vsock as over virtio-serial
	local agent_bin = (os.getenv("FIRECLAW_TESTS") or "tests") .. "/../build/guest/fireclaw-agent"
	local va = new_vm(tg, base .. "/va", base .. "/va.log", { netns = vt.netns(c, NS_PREFIX .. "va") })
	va.env.FAKE_FC_VSOCK = "1024=serve:" .. agent_bin
	c:add(function() va:destroy() end)
	io.open(base .. "/va/disk.ext4", "w"):close()
	va:boot({ kernel = "/dev/null", rootfs = base .. "/va/disk.ext4", mem_mib = 128 })
	local conn, cwhy = va:agent_connect { timeout = 5, where = "vm fct-va" }
	t.ok(conn and conn:exec({ "echo", "over vsock" }).stdout == "over vsock\n",
		"v:agent_connect: the guest agent over Firecracker's vsock (CONNECT 1024), exec through it", cwhy)
	if conn then conn:close() end
	va:destroy()

	-- a snapshot of a jailed Firecracker binds /v.sock: refused before spawning here
	local w = new_vm(tg, base .. "/vw", base .. "/vw.log")
	c:add(function() w:destroy() end)
	t.raises(function() w:restore(base .. "/snap-any", { vsock = { guest_cid = 3, uds_path = "/v.sock" } }) end,
		"^vm fct%-vw: the snapshot binds its vsock socket at /v%.sock, but this VM's is /run/fireclaw/vm/v%.sock "
		.. "%(a snapshot of a jailed Firecracker: take it again%)$", "a snapshot's vsock path that is not this VM's: refused")
	t.is(w.pid, nil, "nothing was spawned for it")
	t.is(select(2, w:agent_channel(1)), "vm fct-vw: destroyed", "no channel to a VM whose restore failed")
end

-- ---- run ----

for _, tg in ipairs(targets) do lifecycle(tg) end

local c = vt.cleanup()
local ok, err = pcall(function()
	local base = vt.tmpdir()
	c:add(function() vt.rm_rf(base) end)
	api_faults(c, base)
	vm_faults(c, base)
	socket_faults(c, base)
	vsock_faults(c, base)
end)
t.ok(ok, "fault tests ran to the end", err)
c:run()

t.same(vt.netns_list(NS_PREFIX), {}, "no test namespace left behind")
t.ok(not vt.mounted_here(MOUNT), "nothing mounted on " .. MOUNT .. " on the host")
return t.done()
