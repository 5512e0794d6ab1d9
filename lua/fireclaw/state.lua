-- fireclaw.state: the records of live VMs, so that nothing outlives its owner.
--
-- One directory per VM, $FIRECLAW_RUN/vms/<id>/ (0700), holding record.json and the VM's
-- files (sockets, logs, disk copy). The record is written *before* any resource exists
-- and updated as resources appear, so a fireclaw killed at any point leaves enough
-- behind for `fireclaw cleanup` to undo it:
--   {id, netns, owner = {pid, start}, vmm = {pid, start, name}, sink = {pid, start},
--    cgroups = {dir…}, jail = {dir, pid, start}, image, created, keep,
--    net = {mode, allow, publish, uplink, uplink_ifname, cidr, procs = {{role, pid, start}…}}}
--    (sink: the process writing the VM's capped logs, see proc.spawn; jail: a jailed
--    Firecracker's chroot and host pid, fireclaw.vmm.jailer; net: its network policy,
--    fireclaw.netpolicy: the resolver and port forwarders, the uplink's veth and table)
-- A VM is stale when its owner process is gone (pid + start time: pids are reused) and
-- it was not started with --keep, or when its time to live (expires) has passed. Reaping kills the VMM only if its pid still has the
-- recorded start time (a jailed Firecracker too), removes its cgroups (fireclaw.cgroup),
-- deletes the namespace, removes its jail (<run>/jail/*/<id>: also one made before the
-- record named it) and the directory.
local config = require "fireclaw.config"
local fault = require "fireclaw.fault"
local fs = require "fireclaw.fs"
local json = require "fireclaw.json"
local log = require "fireclaw.log"
local opts_check = require "fireclaw.opts"
local proc = require "fireclaw.proc"
local runtime = require "fireclaw.runtime"
local sys = require "fireclaw.sys"

local M = {}

local function vms_dir() return config.run_dir .. "/vms" end

-- A fresh VM id: 6 hex digits from the kernel's random source.
function M.new_id()
	local f = assert(io.open("/dev/urandom", "rb"))
	local b = f:read(3)
	f:close()
	return (b:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

function M.netns_name(id) return config.netns_prefix .. id end

local function record_path(dir) return dir .. "/record.json" end

-- The VMs this process created and has not reaped or released yet: a second Ctrl-C, which
-- exits at once, names them (runtime.interrupt_note) and says how to remove them.
local mine, mine_order = {}, {}

local function note_mine()
	local parts = {}
	for _, id in ipairs(mine_order) do
		local rec = mine[id]
		parts[#parts + 1] = string.format("VM %s (namespace %s, %s)", id, rec.netns, rec.dir)
	end
	runtime.interrupt_note(#parts > 0 and table.concat(parts, "; ") or nil)
end

local function remember(rec)
	mine[rec.id] = rec
	mine_order[#mine_order + 1] = rec.id
	note_mine()
end

local function forget(rec)
	if not rec or not mine[rec.id] then return end
	mine[rec.id] = nil
	for i, id in ipairs(mine_order) do
		if id == rec.id then table.remove(mine_order, i) break end
	end
	note_mine()
end

-- A VM kept on purpose (--keep) is not left behind by an interrupt.
M.release = forget

-- (dir: where to write it, when not yet where rec.dir says: state.create)
local function save(rec, dir)
	fs.write(record_path(dir or rec.dir), json.encode(rec, { pretty = true }), "600")
end

-- Create the record (and the VM directory) for a new VM owned by this process. The
-- directory is filled under a hidden name (.new-<id>-<pid>) and renamed into place with
-- its record inside: a VM directory without a record never exists, so a concurrent
-- cleanup can never mistake a VM being created for a broken one.
function M.create(fields)
	fields = opts_check.check("state.create", fields, { "id", "image", "keep", "name", "ttl", "cgroups" })
	local id = fields.id or M.new_id()
	local dir = config.vm_dir(id)
	local me = proc.getpid()
	local tmp = string.format("%s/.new-%s-%d", vms_dir(), id, me)
	local ok, err = pcall(function()
		fs.mkdir_p(vms_dir(), "700")
		fs.mkdir(tmp, "700")
	end)
	if not ok then
		error(string.format("state: cannot create the VM directory (%s); is %s writable? "
			.. "(FIRECLAW_RUN changes it)", err:gsub("^fs: ", ""), config.run_dir), 0)
	end
	-- (dir names where the record will be: readers take a record's dir from where they
	-- find it, and nobody reads the hidden one; so one write, not one before the rename and
	-- one after)
	local rec = {
		id = id, dir = dir, netns = M.netns_name(id),
		owner = { pid = me, start = proc.starttime(me) },
		created = os.time(), image = fields.image, keep = fields.keep or false,
		name = fields.name, expires = fields.ttl and os.time() + math.ceil(fields.ttl) or nil,
		cgroups = fields.cgroups, -- (planned, not made yet: cleanup removes what exists)
	}
	ok, err = pcall(function()
		save(rec, tmp)
		if fs.exists(dir) then error("fs: VM id " .. id .. " is taken", 0) end
		fs.rename(tmp, dir)
	end)
	if not ok then
		pcall(fs.rm_rf, tmp) -- no directory without a record (a full disk, say)
		error(string.format("state: cannot write the VM record (%s); is %s full? (FIRECLAW_RUN changes it)",
			tostring(err):gsub("^fs: ", ""), config.run_dir), 0)
	end
	remember(rec)
	return rec
end

-- Record new facts (e.g. the VMM's pid once it is spawned).
function M.update(rec, fields)
	for k, v in pairs(fields) do rec[k] = v end
	save(rec)
	return rec
end

function M.owner_alive(rec)
	local o = rec.owner
	return o ~= nil and o.pid ~= nil and proc.alive(o.pid, o.start)
end

function M.vmm_alive(rec)
	local v = rec.vmm
	return v ~= nil and v.pid ~= nil and proc.alive(v.pid, v.start)
end

-- All records, oldest first. A directory without a readable record (a crash before the
-- first write completed) is returned as {id=, dir=, broken=true} so cleanup removes it.
function M.list()
	local out = {}
	for _, id in ipairs(runtime.listdir(vms_dir()) or {}) do
		local dir = vms_dir() .. "/" .. id
		if id:sub(1, 1) == "." then goto continue end -- a VM being created
		local data = fs.read(record_path(dir))
		local ok, rec = pcall(json.decode, data or "")
		if ok and type(rec) == "table" and rec.id == id then
			rec.dir = dir
			out[#out + 1] = rec
		elseif fs.is_dir(dir) then
			out[#out + 1] = { id = id, dir = dir, netns = M.netns_name(id), broken = true, created = 0 }
		end
		::continue::
	end
	table.sort(out, function(a, b) return (a.created or 0) < (b.created or 0) end)
	return out
end

-- The record of VM `id`: its id, its namespace's name, or the name it was given (start
-- --name).
function M.find(id)
	for _, rec in ipairs(M.list()) do
		if rec.id == id or rec.netns == id or (rec.name ~= nil and rec.name == id) then return rec end
	end
	return nil
end

-- A kept VM whose time to live has passed.
function M.expired(rec, now)
	return type(rec.expires) == "number" and (now or os.time()) >= rec.expires
end

function M.is_stale(rec)
	return rec.broken or (not rec.keep and not M.owner_alive(rec)) or M.expired(rec)
end

-- What a VM is: "running", "paused" (saved, its VMM gone), "stopped" (its VMM died),
-- "starting" (its owner is still bringing it up), "expired".
function M.status(rec)
	if rec.broken then return "broken" end
	if M.expired(rec) then return "expired" end
	if rec.paused then return "paused" end
	if M.vmm_alive(rec) then return "running" end
	if M.owner_alive(rec) and not rec.vmm then return "starting" end
	return "stopped"
end

-- Undo everything a record says exists; safe to run twice and on partial records.
-- Returns a list of what was done, for `fireclaw cleanup -v`.
function M.reap(rec)
	local done = {}
	local v = rec.vmm
	if v and v.pid and not v.start then
		-- it was gone before its start time could be read: whatever has the pid now is
		-- another process (proc.kill refuses it too)
		done[#done + 1] = "VMM " .. v.pid .. " has no recorded start time: not signalled"
	elseif v and v.pid and proc.kill(v.pid, v.start, sys.signal.SIGKILL, 2) then
		done[#done + 1] = "killed VMM " .. v.pid
	end
	local j = rec.jail
	if j and j.pid and j.start and proc.kill(j.pid, j.start, 9, 2) then
		done[#done + 1] = "killed jailed Firecracker " .. j.pid
	end
	-- the log sink ends by itself once the VMM is gone; a stuck one goes too
	if rec.sink and rec.sink.pid and rec.sink.start and proc.kill(rec.sink.pid, rec.sink.start, sys.signal.SIGKILL, 2) then
		done[#done + 1] = "killed log sink " .. rec.sink.pid
	end
	fault.point("reap-vmm")
	-- the network policy's resolver and forwarders (they hold the namespace), the uplink's
	-- table and the veth (fireclaw.netpolicy)
	for _, what in ipairs(require("fireclaw.netpolicy").reap(rec)) do done[#done + 1] = what end
	if rec.cgroups then -- after the VMM: a cgroup with a task in it cannot go
		for _, what in ipairs(require("fireclaw.cgroup").remove(rec.cgroups)) do done[#done + 1] = what end
	end
	local net = require "fireclaw.net"
	if rec.netns and net.netns_exists(rec.netns) then
		net.netns_delete(rec.netns)
		done[#done + 1] = "deleted namespace " .. rec.netns
	end
	fault.point("reap-netns")
	local jails = config.run_dir .. "/jail"
	for _, exec in ipairs(rec.id and runtime.listdir(jails) or {}) do
		local d = jails .. "/" .. exec .. "/" .. rec.id
		if fs.exists(d) then
			fs.rm_rf(d)
			done[#done + 1] = "removed jail " .. d
		end
	end
	local paused = type(rec.paused) == "table" and rec.paused.dir
	if type(paused) == "string" and paused:find("/paused/", 1, true) and fs.exists(paused) then
		fs.rm_rf(paused)
		done[#done + 1] = "removed " .. paused
	end
	if rec.dir and fs.exists(rec.dir) then
		fs.rm_rf(rec.dir)
		done[#done + 1] = "removed " .. rec.dir
	end
	forget(rec)
	return done
end

-- Remove directories of VMs whose creator died between mkdir and the rename into place.
function M.clean_partial()
	for _, name in ipairs(runtime.listdir(vms_dir()) or {}) do
		local pid = name:match("^%.new%-%x+%-(%d+)$")
		if pid and not proc.alive(tonumber(pid)) then pcall(fs.rm_rf, vms_dir() .. "/" .. name) end
	end
end

-- Reap the kept VMs whose time to live has passed (the session commands run this first).
-- Returns the ids reaped.
function M.reap_expired()
	local reaped = {}
	for _, rec in ipairs(M.list()) do
		if M.expired(rec) then
			local ok, err = pcall(M.reap, rec)
			if not ok and runtime.signal() ~= 0 then error(err, 0) end
			if ok then
				reaped[#reaped + 1] = rec.id
			else
				log.note("expired VM %s cannot be reaped (%s); skipped: see fireclaw cleanup", rec.id, tostring(err))
			end
		end
	end
	return reaped
end

-- Reap every stale VM (owner gone). Cheap when there is nothing to do: one listdir.
-- A VM that cannot be reaped (a busy mount, a file that cannot be removed) is skipped with
-- a note: one broken record must not stop every later run; `fireclaw cleanup` reports it.
-- Returns the ids reaped, and {id =, error =} for each that could not be.
function M.reap_stale()
	M.clean_partial()
	local reaped, failed = {}, {}
	for _, rec in ipairs(M.list()) do
		if M.is_stale(rec) then
			local ok, err = pcall(M.reap, rec)
			if not ok and runtime.signal() ~= 0 then error(err, 0) end -- Ctrl-C is not "cannot"
			if ok then
				reaped[#reaped + 1] = rec.id
			else
				failed[#failed + 1] = { id = rec.id, error = tostring(err) }
				log.note("stale VM %s cannot be reaped (%s); skipped: see fireclaw cleanup",
					rec.id, tostring(err))
			end
		end
	end
	return reaped, failed
end

return M
