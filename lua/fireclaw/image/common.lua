-- fireclaw.image.common: what every step of an image build shares — the constants, the
-- state-dir layout, messages (fail/log), running host commands, checksums and sizes.
-- File operations are fireclaw.fs's (their failures raise "fs: OP PATH: text").
local config = require "fireclaw.config"
local fs = require "fireclaw.fs"
local proc = require "fireclaw.proc"
local runtime = require "fireclaw.runtime"
local sys = require "fireclaw.sys"

local M = {}

-- Bump when the build produces a different image from the same packages.
M.FORMAT = 1
M.DEFAULT_SIZE = 64 * 1024 * 1024
M.KERNEL_PACKAGE = "linux-image-cloud-amd64"
-- the rootfs is built from these (busybox provides the userland, dropbear sshd,
-- sftp-server the SFTP subsystem dropbear runs from /usr/lib/sftp-server)
M.BASE_PACKAGES = { "busybox-static", "dropbear-bin" }
M.SFTP_PACKAGE = "openssh-sftp-server"
-- modules the initramfs loads (with their dependencies); optional ones may be missing
-- (ext4 and the serial console are built into the cloud kernel; ext4 is a module in the
-- generic one). virtio_rng: the VMM's entropy device (host /dev/urandom) feeds the guest's
-- pool all along; restores are reseeded at once by /usr/sbin/fireclaw-guest (see guest.lua)
M.MODULES = { "virtio_mmio", "virtio_rng", "virtio_blk", "ext4", "virtio_net", "vmw_vsock_virtio_transport",
	"virtio_console" }
-- virtio_console: the agent's ports under QEMU (virtio-serial); vsock: under Firecracker
M.OPTIONAL_MODULES = { vmw_vsock_virtio_transport = true, virtio_rng = true, virtio_console = true }

M.NOSPACE = "No space left on device"

function M.fail(fmt, ...)
	error("image: " .. string.format(fmt, ...), 0)
end
local fail = M.fail

function M.log(fmt, ...)
	if runtime.quiet then return end
	io.stderr:write("image: ", string.format(fmt, ...), "\n")
	io.stderr:flush()
end

function M.human(n)
	if n >= 1024 * 1024 * 1024 then return string.format("%.1f GiB", n / 2 ^ 30) end
	if n >= 1024 * 1024 then return string.format("%.1f MiB", n / 2 ^ 20) end
	if n >= 1024 then return string.format("%.0f KiB", n / 1024) end
	return string.format("%d B", n)
end

function M.secs(t0)
	return string.format("%.1f s", runtime.now() - t0)
end

-- ---- the state directory ----

function M.images_dir() return config.state_dir .. "/images" end
function M.keys_dir() return config.state_dir .. "/keys" end
function M.cache_dir() return config.state_dir .. "/cache" end

-- A directory of the state dir: one that exists already may belong to another user
-- (a shared state dir), so a chmod it refuses is not an error.
function M.mkdir_p(path, mode)
	fs.mkdir_p(path, mode, { chmod_may_fail = true })
end

function M.check_name(name)
	if type(name) ~= "string" or not name:match("^[%w][%w._-]*$") or #name > 64 then
		fail("bad image name '%s' (letters, digits, '.', '_', '-'; not starting with a dot)", tostring(name))
	end
	return name
end

-- "64M", "1.5G", "512K", "1048576" -> bytes (binary units)
function M.parse_size(s)
	if type(s) == "number" then return math.floor(s) end
	local num, unit = tostring(s):match("^%s*(%d+%.?%d*)%s*([kKmMgGtT]?)[iI]?[bB]?%s*$")
	if not num then fail("bad size '%s' (e.g. 64M, 1G)", tostring(s)) end
	local mult = ({ [""] = 1, k = 2 ^ 10, m = 2 ^ 20, g = 2 ^ 30, t = 2 ^ 40 })[unit:lower()]
	return math.floor(tonumber(num) * mult)
end

function M.is_root()
	return sys.geteuid() == 0
end

function M.pid_alive(pid)
	return proc.alive(tonumber(pid))
end

-- ---- host commands ----

-- proc.run, with a clear message when the program cannot be started (an interruption by
-- SIGINT/SIGTERM passes through as it is).
function M.try_run(argv, opts)
	local ok, r = pcall(proc.run, argv, opts)
	if ok then return r end
	if tostring(r):match("interrupted") then error(r, 0) end
	fail("cannot run %s (%s); install the packages listed in tools/deps.sh", argv[1], tostring(r))
end

-- Run a host command; raise "image: WHAT: …" unless it exits 0. Returns the result.
function M.run(what, argv, opts)
	local r = M.try_run(argv, opts)
	if r.status ~= 0 or r.signal then
		local text = (r.stderr or "") .. "\n" .. (r.stdout or "")
		if text:find(M.NOSPACE, 1, true) then
			fail("no space left on device while %s (free some space, e.g. fireclaw image rm NAME, or %s)",
				what, config.state_dir .. "/cache/debs")
		end
		local last
		for line in text:gmatch("[^\n]+") do
			if line:match("%S") then last = last or line end
		end
		fail("%s: %s %s%s", what, argv[1], r.signal and ("killed by signal " .. r.signal) or
			("exited with status " .. tostring(r.status)), last and (": " .. last) or "")
	end
	return r
end

function M.copy(src, dst)
	M.run("copying " .. src, { "cp", "-L", "--sparse=always", "--", src, dst })
end

-- sha256 of files: {path = hex}
function M.sha256(paths)
	local r = M.run("checksumming", { "sha256sum", "--", unpack(paths) })
	local out = {}
	for sum, file in r.stdout:gmatch("(%x+)  ([^\n]+)") do out[file] = sum end
	return out
end

-- apparent size and allocated bytes of files: {path = {size=, allocated=}}
function M.sizes(paths)
	local r = M.run("stat", { "stat", "-c", "%s %b %B %n", "--", unpack(paths) })
	local out = {}
	for size, blocks, bsize, file in r.stdout:gmatch("(%d+) (%d+) (%d+) ([^\n]+)") do
		out[file] = { size = tonumber(size), allocated = tonumber(blocks) * tonumber(bsize) }
	end
	return out
end

-- The manifest's `files`: {NAME = {sha256=, size=, allocated=}} for the names in dir.
function M.file_records(dir, names)
	local paths = {}
	for i, n in ipairs(names) do paths[i] = dir .. "/" .. n end
	local sums, sz = M.sha256(paths), M.sizes(paths)
	local files = {}
	for i, n in ipairs(names) do
		files[n] = { sha256 = sums[paths[i]], size = sz[paths[i]].size, allocated = sz[paths[i]].allocated }
	end
	return files
end

-- A hex sha256 of a string.
function M.sha256_of(what, data)
	return M.run(what, { "sha256sum" }, { stdin = data }).stdout:match("%x+")
end

return M
