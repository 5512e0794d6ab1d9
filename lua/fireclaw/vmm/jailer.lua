-- fireclaw.vmm.jailer: Firecracker through its jailer (docs/security.md, "Least privilege").
--
-- Every Firecracker started while a jailer is found runs as a user of its own (uid
-- UID_BASE + 1 + the VM id, group UID_BASE shared by every VMM: QEMU's scheme), chrooted
-- in <run dir>/jail/<exec name>/<id>/root, in the VM's network namespace, with no
-- capabilities. fireclaw fills the chroot before the jailer runs (the jailer keeps what
-- is there and only chmods/chowns the chroot's root):
--   /vmlinux /initrd      the image's kernel/initrd: a hard link to a root-owned,
--                         world-readable file (else a root-owned 0444 copy)
--   /vmstate /memory      a snapshot's files, the same way (restore)
--   /disk.ext4            this VM's own disk copy, hard-linked and chowned to the uid
--   /snap/                where a snapshot is written (the uid's); fireclaw moves the
--                         files out and gives them to root
--   /v.sock               the vsock device's socket: Firecracker binds it (PUT /vsock, or a
--                         snapshot load at the path the snapshot recorded)
--   /firecracker.log      a FIFO: Firecracker's logger; the jail's init copies it to the
--                         capped log (the jailer closes every descriptor above 2)
-- The paths inside are the same for every VM, so a snapshot taken in one jail loads in
-- another.
--
-- Parent death: the jailer drops privileges itself, which clears PR_SET_PDEATHSIG, and
-- its --new-pid-ns orphans Firecracker to the host's init. So fireclaw starts the jailer
-- under an init of its own instead: `unshare --pid --fork --kill-child=SIGKILL sh -c …`.
-- unshare (fireclaw's child) has the parent-death signal; the shell is pid 1 of a new
-- pid namespace, stays root and keeps --kill-child's SIGKILL; the jailer (its child) execs
-- in place into Firecracker. fireclaw dies → unshare dies → the shell gets SIGKILL → the
-- kernel kills everything in the namespace. Firecracker's exit status comes back
-- through the shell and unshare, so fireclaw waits on unshare as before.
local bit = require "bit"
local config = require "fireclaw.config"
local fs = require "fireclaw.fs"
local proc = require "fireclaw.proc"
local runtime = require "fireclaw.runtime"
local sys = require "fireclaw.sys"
local util = require "fireclaw.vmm.util"

local M = {}

-- QEMU's per-VM users (fireclaw.vmm.qemu): above systemd's container range
M.UID_BASE = 0x70000000
M.NO_FILE = 1024 -- descriptors: disk, tap, sockets, eventfds, a few dozen in all
M.API_SOCK = "/api.sock"
M.LOGGER = "/firecracker.log"
M.FIX = "get jailer from the Firecracker release of the same version (jailer-v<version>-x86_64 "
	.. "in release-v<version>-x86_64.tgz) and put it beside firecracker, on PATH, or in FIRECLAW_JAILER"

-- The jailer to use: FIRECLAW_JAILER (config.jailer), else a `jailer` beside the
-- firecracker binary, else one on PATH. Returns path (or nil) and what was asked for.
function M.find(firecracker)
	local want = config.jailer
	if want and want ~= "" then return util.which(want), want end
	local dir = firecracker and firecracker:match("^(.*/)[^/]+$")
	local beside = dir and util.which(dir .. "jailer")
	if beside then return beside end
	return util.which("jailer"), nil
end

-- Is fireclaw root? (Without root there is nothing for the jailer to drop.)
function M.running_as_root()
	local status = fs.read("/proc/self/status") or ""
	return status:match("\nUid:%s*%d+%s+(%d+)") == "0"
end

-- The jailer's --id: 1-64 characters of [A-Za-z0-9-] (Rust's is_alphanumeric would
-- take other letters too; fireclaw keeps to ASCII).
function M.instance_id(id)
	local s = tostring(id)
	if #s < 1 or #s > 64 or s:find("[^%w%-]") then
		error("jailer: VM id '" .. s .. "' is not 1-64 characters of letters, digits and '-'", 0)
	end
	return s
end

function M.uid_gid(id) return M.UID_BASE + 1 + util.id_number(id), M.UID_BASE end

function M.base() return config.run_dir .. "/jail" end

-- Where the jail of VM `id` lives for this firecracker binary: the jailer names the
-- chroot's parent after the canonical exec-file (symlinks resolved).
function M.plan(v, jailer)
	local id = M.instance_id(v.id)
	local r = util.run({ "realpath", "-e", v.binary }, "realpath " .. v.binary)
	local exec = r.stdout:gsub("\n$", "")
	local uid, gid = M.uid_gid(id)
	local base = M.base()
	local dir = base .. "/" .. exec:match("([^/]+)$") .. "/" .. id
	return { jailer = jailer, id = id, exec = exec, uid = uid, gid = gid, base = base,
		dir = dir, root = dir .. "/root" }
end

-- An empty chroot (a stale one from an earlier VM of this id is removed first: the
-- jailer fails on its device nodes, Firecracker on its socket).
function M.prepare(j)
	fs.mkdir_p(j.base, "700")
	fs.rm_rf(j.dir)
	fs.mkdir_p(j.root, "700")
	util.run({ "mkfifo", "-m", "600", j.root .. M.LOGGER }, "mkfifo")
	M.chown(j, j.root .. M.LOGGER)
end

-- Is `path` a dynamically linked ELF executable (a PT_INTERP program header)? Release
-- builds of Firecracker are static; a distribution's or a local build may not be.
function M.dynamic(path)
	local f = io.open(path, "rb")
	if not f then return false end
	local h = f:read(64) or ""
	local function u(off, n)
		local v = 0
		for i = n, 1, -1 do v = v * 256 + (h:byte(off + i) or 0) end
		return v
	end
	if #h < 64 or h:sub(1, 4) ~= "\127ELF" or h:byte(5) ~= 2 then f:close() return false end
	local phoff, phentsize, phnum = u(32, 8), u(54, 2), u(56, 2)
	local found = false
	for i = 0, math.min(phnum, 64) - 1 do
		f:seek("set", phoff + i * phentsize)
		local ph = f:read(4) or ""
		if #ph == 4 and ph:byte(1) == 3 and ph:byte(2) == 0 and ph:byte(3) == 0 and ph:byte(4) == 0 then
			found = true
			break
		end
	end
	f:close()
	return found
end

-- A dynamically linked exec-file cannot start in the chroot without its loader and
-- libraries: copy what ldd lists to the same paths inside (root's, modes kept). Returns
-- how many, or 0 for a static binary.
function M.copy_libs(j)
	if not M.dynamic(j.exec) then return 0 end
	local r = util.run({ "ldd", j.exec }, "ldd " .. j.exec)
	local n = 0
	for path in r.stdout:gmatch("(/[^%s]+) %(0x") do
		local dst = j.root .. path
		fs.mkdir_p(dst:match("^(.*)/"), "755")
		util.run({ "cp", "-L", "--preserve=mode", path, dst }, "copy " .. path .. " into the jail")
		n = n + 1
	end
	return n
end

function M.chown(j, path, mode)
	util.run({ "chown", j.uid .. ":" .. j.gid, path }, "chown " .. path)
	if mode then fs.chmod(path, mode) end
end

-- A file the VMM only reads, at /name in the chroot: a hard link when the file is
-- root's and open to reading by all and to writing by none (nothing to chown, so the
-- shared inode is not touched), else a root-owned read-only copy.
function M.place_ro(j, src, name)
	local dst = j.root .. "/" .. name
	local st = runtime.stat(src)
	if not st then error("jailer: no file " .. src .. " to put into the jail", 0) end
	local safe = st.uid == 0 and bit.band(st.mode, 4) ~= 0 and bit.band(st.mode, 18) == 0
	if safe and proc.run({ "ln", "-T", src, dst }).status == 0 then return "link" end
	os.remove(dst)
	util.copy_sparse(src, dst)
	util.run({ "chown", "0:0", dst }, "chown " .. dst)
	fs.chmod(dst, "444")
	return "copy"
end

-- This VM's own writable file (its disk copy) at /name: hard-linked (same filesystem)
-- or copied, then the VM user's. It is a per-run copy: chowning the inode is fine.
function M.place_rw(j, src, name)
	local dst = j.root .. "/" .. name
	if proc.run({ "ln", "-T", src, dst }).status ~= 0 then
		os.remove(dst)
		util.copy_sparse(src, dst)
	end
	M.chown(j, dst, "600")
end

-- A directory the VMM writes into (a snapshot's target).
function M.writable_dir(j, name)
	local d = j.root .. "/" .. name
	fs.mkdir_p(d, "700")
	M.chown(j, d)
	return d
end

-- The init script: run the jailer, copy the logger FIFO to descriptor 3 (the capped log),
-- return the jailer's (Firecracker's) status. cat opens the FIFO read-write: it never
-- sees an end of file between two writers, and dies with the namespace when the shell,
-- its pid 1, exits.
local INIT = 'f=$1; shift; "$@" & j=$!; cat 0<>"$f" >&3 & wait "$j"; exit $?'

function M.argv(j, netns)
	local a = { "unshare", "--pid", "--fork", "--kill-child=SIGKILL", "--",
		"/bin/sh", "-c", INIT, "fireclaw-jail-init", j.root .. M.LOGGER,
		j.jailer, "--id", j.id, "--exec-file", j.exec, "--uid", tostring(j.uid), "--gid", tostring(j.gid),
		"--chroot-base-dir", j.base }
	if netns then
		a[#a + 1] = "--netns"
		a[#a + 1] = "/run/netns/" .. netns
	end
	for _, x in ipairs({ "--resource-limit", "no-file=" .. M.NO_FILE, "--", "--api-sock", M.API_SOCK }) do
		a[#a + 1] = x
	end
	return a
end

local function children(pid)
	local s = fs.read(string.format("/proc/%d/task/%d/children", pid, pid)) or ""
	local out = {}
	for p in s:gmatch("%d+") do out[#out + 1] = tonumber(p) end
	return out
end

-- The jailer's (then Firecracker's) host pid: the init shell's first child, pid 2 in the
-- jail's pid namespace (cat, forked after it, is 3).
function M.find_vmm(p, timeout_s)
	return util.poll(function()
		if not p:alive() then return false end
		for _, init in ipairs(children(p:pid())) do
			for _, c in ipairs(children(init)) do
				local nspid = (fs.read("/proc/" .. c .. "/status") or ""):match("\nNSpid:[^\n]-(%d+)\n")
				if nspid == "2" then return c end
			end
		end
		return nil
	end, timeout_s)
end

-- A socket in the jail (default: the API socket; also the vsock socket, /v.sock) by a
-- short path: the chroot's host path may exceed the 107 bytes of a unix socket address;
-- /proc/self/fd/N/api.sock, through a descriptor of the chroot held by fireclaw (j.fd,
-- closed by M.close), never does.
function M.socket(j, name)
	if not j.fd then
		local fd, err = sys.open(j.root, "PATH|DIRECTORY") -- close-on-exec, as every sys.open
		if not fd then error("jailer: cannot open " .. j.root .. ": " .. err, 0) end
		j.fd = fd
	end
	return "/proc/self/fd/" .. j.fd .. (name or M.API_SOCK)
end

function M.close(j)
	if j.fd then sys.close(j.fd) end
	j.fd = nil
end

-- Remove the jail (links and copies go, their sources stay).
function M.remove(dir)
	if dir and dir:find("/jail/", 1, true) then fs.rm_rf(dir) end
end

return M
