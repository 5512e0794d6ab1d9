-- fireclaw.image: guest images. Builds the default image from Debian packages only
-- (kernel, initramfs, ext4 rootfs with busybox + dropbear, keys, manifest), imports a
-- user's own kernel and rootfs, lists, shows, loads and removes images.
--
--   image.build{name=, packages={…}, size="64M"|bytes, force=, kernel_package=}
--       -> manifest, built   (built = false when the image was already up to date)
--   image.import{name=, kernel=, rootfs=, initrd=, host_key=, boot_args=, cmdline_devices=,
--                force=} -> manifest   (cmdline_devices: the kernel finds virtio-mmio devices
--                on its command line, so Firecracker < 1.8 can boot it)
--   image.load(name) -> manifest + absolute paths: dir, kernel (= vmlinux if there is one),
--       vmlinux, vmlinuz, initrd, rootfs, host_key_pub (path), host_key ("ssh-ed25519 AAAA…"),
--       client_key (private key path), client_key_pub
--   image.info(name) -> manifest;  image.list() -> {{name=, manifest=}…};  image.exists(name)
--   image.remove(name) -> names of the snapshots removed with it;  image.client_key() -> private key path, public key line
--   image.boot_args(img, {tcg=bool}) -> kernel command line string
--   image.tsc_khz() -> host TSC kHz (for tsc_early_khz= under TCG) or nil
--   image.prune_cache() -> drop cached .debs/kernels no image was built from
--   pure helpers, tested on their own: parse_size, bzimage_to_elf, ko_info, module_order,
--       elf_info, resolve_depends, parse_records, resolve_in, unpack_into, in_tree
--
-- Layout in $FIRECLAW_STATE (config.state_dir):
--   images/NAME -> .img~NAME~STAMP~PID/   a symlink swapped atomically by each build, so a
--       reader sees the old image or the new one, never half of one. image.load resolves
--       the link once and returns paths in the real directory.
--   images/.tmp~NAME~PID/                 a build in progress (removed when its pid is gone)
--   keys/id_ed25519{,.pub}                the client key pair shared by all images (0600/0700)
--   cache/debs/*.deb                      downloaded packages (checked against apt's SHA256)
--   cache/kernel/PKG_VERSION_SHA_fN/      the kernel extracted from its package once
--                                         (cache/ keeps only what existing images use)
--   cache/apt/pkgcache.bin                apt's binary cache, where the system keeps none
-- Environment: FIRECLAW_STATE; FIRECLAW_APT_OPTIONS="Opt::A=x Opt::B=y" adds apt -o options
-- (a proxy, a mirror).
local config = require "fireclaw.config"
local guest = require "fireclaw.guest"
local json = require "fireclaw.json"
local opts_check = require "fireclaw.opts"
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
M.MODULES = { "virtio_mmio", "virtio_rng", "virtio_blk", "ext4", "virtio_net", "vmw_vsock_virtio_transport" }
M.OPTIONAL_MODULES = { vmw_vsock_virtio_transport = true, virtio_rng = true }

-- ---- small helpers ----

local function fail(fmt, ...)
	error("image: " .. string.format(fmt, ...), 0)
end

local function log(fmt, ...)
	if runtime.quiet then return end
	io.stderr:write("image: ", string.format(fmt, ...), "\n")
	io.stderr:flush()
end
M.log = log

local function human(n)
	if n >= 1024 * 1024 * 1024 then return string.format("%.1f GiB", n / 2 ^ 30) end
	if n >= 1024 * 1024 then return string.format("%.1f MiB", n / 2 ^ 20) end
	if n >= 1024 then return string.format("%.0f KiB", n / 1024) end
	return string.format("%d B", n)
end
M.human = human

local function secs(t0)
	return string.format("%.1f s", runtime.now() - t0)
end

local NOSPACE = "No space left on device"

-- proc.run, with a clear message when the program cannot be started (an interruption by
-- SIGINT/SIGTERM passes through as it is).
local function try_run(argv, opts)
	local ok, r = pcall(proc.run, argv, opts)
	if ok then return r end
	if tostring(r):match("interrupted") then error(r, 0) end
	fail("cannot run %s (%s); install the packages listed in tools/deps.sh", argv[1], tostring(r))
end

-- Run a host command; raise "image: WHAT: …" unless it exits 0. Returns the result.
local function run(what, argv, opts)
	local r = try_run(argv, opts)
	if r.status ~= 0 or r.signal then
		local text = (r.stderr or "") .. "\n" .. (r.stdout or "")
		if text:find(NOSPACE, 1, true) then
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

local function exists(path)
	local f = io.open(path, "rb")
	if f then f:close() return true end
	return M.readlink(path) ~= nil
end

local function is_dir(path)
	return runtime.listdir(path) ~= nil
end

local function read_file(path)
	local f, err = io.open(path, "rb")
	if not f then return nil, err end
	local s = f:read("*a")
	f:close()
	return s
end

-- Write a file through a temporary name and rename it into place.
local function write_file(path, content, mode)
	local tmp = path .. ".tmp" .. proc.getpid()
	local f, err = io.open(tmp, "wb")
	if not f then fail("cannot write %s: %s", path, err) end
	local ok, werr = f:write(content)
	local cok, cerr = f:close()
	if not ok or not cok then
		os.remove(tmp)
		local e = tostring(werr or cerr)
		if e:find(NOSPACE, 1, true) then fail("no space left on device writing %s", path) end
		fail("cannot write %s: %s", path, e)
	end
	if mode then sys.chmod(tmp, mode) end
	local rok, rerr = os.rename(tmp, path)
	if not rok then
		os.remove(tmp)
		fail("cannot rename %s into place: %s", path, tostring(rerr))
	end
end

local function mkdir_p(path, mode)
	local cur = path:sub(1, 1) == "/" and "" or "."
	for part in path:gmatch("[^/]+") do
		cur = cur .. "/" .. part
		local ok, err = sys.mkdir(cur, mode or "755")
		if not ok and not is_dir(cur) then fail("cannot create directory %s: %s", cur, err) end
	end
	if mode then sys.chmod(path, mode) end
end

-- rm -rf in Lua: symlinks are removed, never followed. No child process, so it also works
-- while unwinding from SIGINT (when running a command would raise "interrupted" again).
local function rm_rf(path)
	if not path or path == "" or path == "/" then return end
	if not M.readlink(path) then
		local entries = runtime.listdir(path)
		if entries then
			for _, e in ipairs(entries) do
				if e ~= "." and e ~= ".." then rm_rf(path .. "/" .. e) end
			end
		end
	end
	local ok, err = os.remove(path)
	if not ok and exists(path) then fail("cannot remove %s: %s", path, tostring(err)) end
end

local function symlink(target, path)
	local ok, err = sys.symlink(target, path)
	if not ok then fail("cannot create symlink %s -> %s: %s", path, target, err) end
end

-- The target of a symlink, or nil if path is not one.
function M.readlink(path)
	return (sys.readlink(path))
end

local function chmod(path, mode)
	local ok, err = sys.chmod(path, mode)
	if not ok then fail("cannot chmod %s: %s", path, err) end
end

-- sha256 of files: {path = hex}
local function sha256(paths)
	local r = run("checksumming", { "sha256sum", "--", unpack(paths) })
	local out = {}
	for sum, file in r.stdout:gmatch("(%x+)  ([^\n]+)") do out[file] = sum end
	return out
end

-- apparent size and allocated bytes of files: {path = {size=, allocated=}}
local function sizes(paths)
	local r = run("stat", { "stat", "-c", "%s %b %B %n", "--", unpack(paths) })
	local out = {}
	for size, blocks, bsize, file in r.stdout:gmatch("(%d+) (%d+) (%d+) ([^\n]+)") do
		out[file] = { size = tonumber(size), allocated = tonumber(blocks) * tonumber(bsize) }
	end
	return out
end

local function file_size(path)
	local f = io.open(path, "rb")
	if not f then return nil end
	local n = f:seek("end")
	f:close()
	return n
end

local function is_root()
	return sys.geteuid() == 0
end

local function pid_alive(pid)
	return proc.alive(tonumber(pid))
end

-- ---- names and paths ----

local function check_name(name)
	if type(name) ~= "string" or not name:match("^[%w][%w._-]*$") or #name > 64 then
		fail("bad image name '%s' (letters, digits, '.', '_', '-'; not starting with a dot)", tostring(name))
	end
	return name
end
M.check_name = check_name

local function images_dir() return config.state_dir .. "/images" end
local function keys_dir() return config.state_dir .. "/keys" end
local function cache_dir() return config.state_dir .. "/cache" end

-- "64M", "1.5G", "512K", "1048576" -> bytes (binary units)
function M.parse_size(s)
	if type(s) == "number" then return math.floor(s) end
	local num, unit = tostring(s):match("^%s*(%d+%.?%d*)%s*([kKmMgGtT]?)[iI]?[bB]?%s*$")
	if not num then fail("bad size '%s' (e.g. 64M, 1G)", tostring(s)) end
	local mult = ({ [""] = 1, k = 2 ^ 10, m = 2 ^ 20, g = 2 ^ 30, t = 2 ^ 40 })[unit:lower()]
	return math.floor(tonumber(num) * mult)
end

-- ---- the client key (shared by all images) ----

-- Path of the client private key and its public line; made on first use (ssh-keygen).
-- The private key is created with link(2) (fails if it exists), so concurrent first uses
-- agree on one key; the .pub is always derived from the private key.
function M.client_key()
	local dir = keys_dir()
	local key = dir .. "/id_ed25519"
	mkdir_p(dir, "700")
	if not exists(key) then
		local tmp = dir .. "/.new-" .. proc.getpid()
		os.remove(tmp)
		os.remove(tmp .. ".pub")
		run("creating the client key", { "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
			"fireclaw", "-f", tmp })
		chmod(tmp, "600")
		sys.link(tmp, key) -- EEXIST: someone else won, use theirs
		os.remove(tmp)
		os.remove(tmp .. ".pub")
		log("keys: client key %s (new)", key)
	end
	local pub = dir .. "/id_ed25519.pub"
	local line = read_file(pub)
	if not line or not line:match("^ssh%-ed25519 ") then
		line = run("reading the client key", { "ssh-keygen", "-y", "-f", key }).stdout
		line = line:gsub("%s+$", "") .. " fireclaw\n"
		write_file(pub, line, "644")
	end
	return key, (line:gsub("%s+$", ""))
end

-- sha256 of the guest helper fireclaw installs (part of an image's identity: a changed
-- helper makes `image build` build anew, and snapshots of the old image stale)
function M.helper_sha256()
	if not M._helper_sha then
		M._helper_sha = run("hashing the guest helper", { "sha256sum" }, { stdin = guest.helper() }).stdout:match("%x+")
	end
	return M._helper_sha
end

-- ---- host facts ----

-- The host's TSC frequency in kHz, for tsc_early_khz= (TCG guests otherwise often hang
-- calibrating the TSC). From /proc/cpuinfo "cpu MHz" (constant_tsc hosts).
function M.tsc_khz(cpuinfo)
	cpuinfo = cpuinfo or read_file("/proc/cpuinfo") or ""
	local mhz = cpuinfo:match("cpu MHz%s*:%s*([%d.]+)")
	if not mhz then return nil end
	return math.floor(tonumber(mhz) * 1000 + 0.5)
end

local function default_boot_args()
	local n = config.net
	return {
		"console=ttyS0", "root=/dev/vda", "rw",
		string.format("ip=%s::%s:%s::eth0:off", n.guest_ip, n.host_ip, n.netmask),
		-- cryptomgr.notests: the crypto self-tests cost ~0.5 s of a TCG boot
		"panic=1", "pci=off", "quiet", "mitigations=off", "cryptomgr.notests",
	}
end
M.default_boot_args = default_boot_args

-- The kernel command line for an image (a load() or manifest table). Under TCG the
-- tsc_early_khz of *this* host replaces the build host's.
function M.boot_args(img, opts)
	opts = opts_check.check("image.boot_args", opts, { "tcg" })
	local args = {}
	for _, a in ipairs(img.boot_args or default_boot_args()) do args[#args + 1] = a end
	if opts.tcg then
		local khz = M.tsc_khz()
		for _, a in ipairs(img.boot_args_tcg or {}) do
			if a:match("^tsc_early_khz=") then
				if khz then args[#args + 1] = "tsc_early_khz=" .. khz end
			else
				args[#args + 1] = a
			end
		end
	end
	return table.concat(args, " ")
end

-- ---- apt ----

-- Options for every apt call. Where apt keeps no binary cache (Debian's docker images set
-- Dir::Cache::pkgcache ""), each call rebuilds it (~1 s): then keep our own in cache/apt.
local system_pkgcache
local function apt_options()
	local o = {}
	if system_pkgcache == nil then
		local r = try_run({ "apt-config", "dump", "Dir::Cache::pkgcache" })
		system_pkgcache = r.stdout:match('pkgcache "([^"]+)"') ~= nil
	end
	if not system_pkgcache then
		mkdir_p(cache_dir() .. "/apt", "755")
		o = { "-o", "Dir::Cache::pkgcache=" .. cache_dir() .. "/apt/pkgcache.bin", "-o", "Dir::Cache::srcpkgcache=" }
	end
	-- FIRECLAW_APT_OPTIONS="Acquire::http::Proxy=http://… Other::Opt=x" (a mirror, a proxy)
	for opt in (os.getenv("FIRECLAW_APT_OPTIONS") or ""):gmatch("%S+") do
		o[#o + 1] = "-o"
		o[#o + 1] = opt
	end
	return o
end

local function apt_cache(_what, args)
	local argv = { "apt-cache" }
	for _, a in ipairs(apt_options()) do argv[#argv + 1] = a end
	for _, a in ipairs(args) do argv[#argv + 1] = a end
	return try_run(argv)
end

-- Parse deb822 stanzas (apt-cache show output) -> list of {Field = value}
function M.parse_records(text)
	local recs, cur, last = {}, nil, nil
	for line in (text .. "\n"):gmatch("([^\n]*)\n") do
		if line == "" then
			if cur then recs[#recs + 1] = cur end
			cur, last = nil, nil
		elseif line:match("^%s") then
			if cur and last then cur[last] = cur[last] .. "\n" .. line end
		else
			local k, v = line:match("^([%w-]+):%s*(.*)$")
			if k then
				cur = cur or {}
				cur[k] = v
				last = k
			end
		end
	end
	if cur then recs[#recs + 1] = cur end
	return recs
end

-- Candidate records of packages by name; raises for a name apt does not know.
local function apt_show(names)
	if #names == 0 then return {} end
	local args = { "show", "--no-all-versions" }
	for _, n in ipairs(names) do args[#args + 1] = n end
	local r = apt_cache("looking up packages", args)
	local by = {}
	for _, rec in ipairs(M.parse_records(r.stdout)) do
		if rec.Package and not by[rec.Package] then by[rec.Package] = rec end
	end
	for _, n in ipairs(names) do
		if not by[n] then
			fail("Debian package '%s' not found (apt-cache policy %s)", n, n)
		end
	end
	return by
end

-- The package names in a Depends/Pre-Depends field, first alternative of each group.
local function depends_names(field)
	local out = {}
	for group in (field or ""):gmatch("[^,]+") do
		local first = group:match("^%s*([%w.+-]+)")
		if first then out[#out + 1] = first end
	end
	return out
end

-- Resolve the dependency closure from `apt-cache depends --recurse` output: follow
-- Depends and PreDepends from the roots; of alternatives (a | b) and of a virtual
-- package's providers take one already chosen, else the first real one.
-- Returns the sorted list of real package names.
function M.resolve_depends(text, roots)
	local blocks = {}
	local cur, group_open
	for line in text:gmatch("[^\n]+") do
		if not line:match("^%s") then
			local name = line:match("^(%S+)")
			if name:match("^<") then
				cur = nil
			else
				cur = { groups = {} }
				blocks[name] = cur
			end
			group_open = false
		elseif cur then
			local bar, kind, target = line:match("^ (.)(%a+): (%S+)")
			if kind then
				local alt = { name = target:match("^<(.*)>$") or target, virtual = target:match("^<") ~= nil,
					providers = {} }
				if (kind == "Depends" or kind == "PreDepends") then
					if group_open then
						table.insert(cur.groups[#cur.groups], alt)
					else
						cur.groups[#cur.groups + 1] = { alt }
					end
					group_open = bar == "|"
				else
					group_open = false
				end
				cur.last = alt
			else
				local provider = line:match("^    (%S+)$")
				if provider and cur.last then table.insert(cur.last.providers, provider) end
			end
		end
	end
	local chosen, list, queue = {}, {}, {}
	local function choose(name)
		if not chosen[name] and blocks[name] then
			chosen[name] = true
			list[#list + 1] = name
			queue[#queue + 1] = name
		end
	end
	for _, r in ipairs(roots) do choose(r) end
	local i = 1
	while i <= #queue do
		for _, group in ipairs(blocks[queue[i]].groups) do
			local done = false
			for _, alt in ipairs(group) do
				if chosen[alt.name] then done = true end
				for _, p in ipairs(alt.providers) do
					if chosen[p] then done = true end
				end
			end
			if not done then
				for _, alt in ipairs(group) do
					if not alt.virtual and blocks[alt.name] then
						choose(alt.name)
						break
					end
					for _, p in ipairs(alt.providers) do
						if blocks[p] then
							choose(p)
							done = true
							break
						end
					end
					if done then break end
				end
			end
		end
		i = i + 1
	end
	table.sort(list)
	return list
end

local function apt_closure(roots)
	local args = { "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
		"--no-breaks", "--no-replaces", "--no-enhances" }
	for _, n in ipairs(roots) do args[#args + 1] = n end
	local r = apt_cache("resolving dependencies", args)
	if r.status ~= 0 then fail("resolving dependencies of %s: %s", table.concat(roots, " "),
		(r.stderr:match("[^\n]+") or "apt-cache failed")) end
	return M.resolve_depends(r.stdout, roots)
end

local function deb_filename(rec)
	return string.format("%s_%s_%s.deb", rec.Package, (rec.Version:gsub(":", "%%3a")), rec.Architecture)
end

-- Make sure every record's .deb is in the cache (verified against apt's SHA256);
-- download the missing ones in one apt-get call. Returns {Package = path}.
local function download(recs)
	local dir = cache_dir() .. "/debs"
	mkdir_p(dir, "755")
	local paths, missing, bytes = {}, {}, 0
	local want = {}
	for _, rec in ipairs(recs) do
		local path = dir .. "/" .. deb_filename(rec)
		paths[rec.Package] = path
		want[path] = rec
		bytes = bytes + (tonumber(rec.Size) or 0)
	end
	local present = {}
	for path in pairs(want) do
		if exists(path) then present[#present + 1] = path end
	end
	table.sort(present)
	local sums = #present > 0 and sha256(present) or {}
	for _, rec in ipairs(recs) do
		local path = paths[rec.Package]
		if sums[path] ~= rec.SHA256 then missing[#missing + 1] = rec end
	end
	if #missing == 0 then
		log("download: %d packages, %s, all cached in %s", #recs, human(bytes), dir)
		return paths
	end
	local t0 = runtime.now()
	local part = dir .. "/.partial~" .. proc.getpid()
	rm_rf(part)
	mkdir_p(part, "755")
	local argv = { "apt-get", "download", "-q" }
	for _, o in ipairs(apt_options()) do argv[#argv + 1] = o end
	if is_root() then
		argv[#argv + 1] = "-o"
		argv[#argv + 1] = "APT::Sandbox::User=root"
	end
	local mbytes = 0
	for _, rec in ipairs(missing) do
		argv[#argv + 1] = rec.Package .. "=" .. rec.Version
		mbytes = mbytes + (tonumber(rec.Size) or 0)
	end
	local ok, r = pcall(try_run, argv, { cwd = part })
	if not ok then
		rm_rf(part)
		error(r, 0)
	end
	if r.status ~= 0 then
		rm_rf(part)
		local err = r.stderr
		if err:find(NOSPACE, 1, true) then
			fail("no space left on device while downloading packages into %s", dir)
		end
		local pkg = err:match("Unable to locate package (%S+)") or
			err:match("Can't find a source to download version '[^']*' of '([^':]+)")
		if pkg then fail("Debian package '%s' not found (apt-cache policy %s)", pkg, pkg) end
		local line = err:match("E: (Failed to fetch[^\n]*)") or err:match("E: ([^\n]+)") or
			"apt-get download failed"
		local hint = "check the network and /etc/apt/sources.list"
		if line:match("404") then hint = "the package lists are stale: run apt-get update" end
		fail("cannot download packages from the Debian repository (%s): %s", hint, line)
	end
	for _, rec in ipairs(missing) do
		local got = part .. "/" .. deb_filename(rec)
		if not exists(got) then
			rm_rf(part)
			fail("download: apt-get did not produce %s", deb_filename(rec))
		end
		local s = sha256({ got })[got]
		if s ~= rec.SHA256 then
			rm_rf(part)
			fail("download: %s has sha256 %s, the archive says %s (run apt-get update?)",
				deb_filename(rec), tostring(s), tostring(rec.SHA256))
		end
		os.rename(got, paths[rec.Package])
	end
	rm_rf(part)
	log("download: %d of %d packages, %s (%s)", #missing, #recs, human(mbytes), secs(t0))
	return paths
end

-- ---- kernel ----

local function le(s, off, n) -- little-endian unsigned integer of n bytes at 0-based off
	local v = 0
	for i = n, 1, -1 do v = v * 256 + s:byte(off + i) end
	return v
end
M.le = le

local COMPRESSION = {
	{ "gzip", "\31\139", { "gzip", "-dc" } },
	{ "xz", "\253\55\122\88\90\0", { "xz", "-dc", "--single-stream" } },
	{ "lz4", "\2\33\76\24", { "lz4", "-dc" } },
	{ "zstd", "\40\181\47\253", { "zstd", "-dc" } },
	{ "bzip2", "BZh", { "bzip2", "-dc" } },
	{ "lzma", "\93\0\0", { "xz", "-dc", "--format=lzma" } },
}

-- Is s a complete ELF64 (headers and section table inside the string)?
local function elf_ok(s)
	if #s < 64 or s:sub(1, 4) ~= "\127ELF" then return false end
	local shoff, shentsize, shnum = le(s, 0x28, 8), le(s, 0x3a, 2), le(s, 0x3c, 2)
	return shoff + shentsize * shnum <= #s
end

-- Recover the ELF vmlinux from a bzImage at bzpath, written to outpath.
-- Uses the boot protocol header's payload_offset/length when there is one (the last 4
-- bytes of the payload are the uncompressed size, checked), else scans for a known
-- compression magic. Returns {compression=, size=}.
function M.bzimage_to_elf(bzpath, outpath)
	local data = read_file(bzpath)
	if not data then fail("cannot read kernel %s", bzpath) end
	if data:sub(1, 4) == "\127ELF" then fail("%s is already an ELF (vmlinux)", bzpath) end
	local candidates = {}
	if #data > 0x250 and data:sub(0x203, 0x206) == "HdrS" and le(data, 0x206, 2) >= 0x208 then
		local setup = data:byte(0x1f2)
		if setup == 0 then setup = 4 end
		local start = (setup + 1) * 512 + le(data, 0x248, 4)
		local len = le(data, 0x24c, 4)
		if len > 4 and start + len <= #data then
			candidates[1] = { start = start, len = len, expect = le(data, start + len - 4, 4) }
		end
	end
	for _, c in ipairs(COMPRESSION) do -- fallback: every occurrence of every magic
		local pos = 1
		while #candidates < 64 do
			local at = data:find(c[2], pos, true)
			if not at then break end
			candidates[#candidates + 1] = { start = at - 1, len = #data - at + 1 }
			pos = at + 1
		end
	end
	for _, cand in ipairs(candidates) do
		local payload = data:sub(cand.start + 1, cand.start + cand.len)
		for _, c in ipairs(COMPRESSION) do
			if payload:sub(1, #c[2]) == c[2] then
				-- trailing bytes (the size field, the rest of the image) make some
				-- decompressors exit non-zero after writing everything: judge the output
				local out = try_run(c[3], { stdin = payload }).stdout
				if elf_ok(out) and (not cand.expect or cand.expect == #out) then
					write_file(outpath, out, "644")
					return { compression = c[1], size = #out }
				end
			end
		end
	end
	fail("no ELF kernel found inside %s (compression not recognised)", bzpath)
end

-- name, depends, softdeps to load first (module names or aliases) and aliases of a kernel
-- module (.ko contents): {name=, depends={…}, softpre={…}, aliases={…}, vermagic=}
local function modinfo_fields(data, key) -- every value of "\0key=value\0" (plain finds: fast)
	local out, pos, pat = {}, 1, "\0" .. key .. "="
	while true do
		local _, e = data:find(pat, pos, true)
		if not e then return out end
		local z = data:find("\0", e + 1, true) or #data + 1
		out[#out + 1] = data:sub(e + 1, z - 1)
		pos = e + 1
	end
end

function M.ko_info(data)
	local info = { depends = {}, softpre = {}, aliases = modinfo_fields(data, "alias") }
	for d in (modinfo_fields(data, "depends")[1] or ""):gmatch("[^,]+") do info.depends[#info.depends + 1] = d end
	for _, soft in ipairs(modinfo_fields(data, "softdep")) do
		local pre = soft:match("pre:(.-)post:") or soft:match("pre:(.*)$") or ""
		for d in pre:gmatch("%S+") do info.softpre[#info.softpre + 1] = d end
	end
	info.name = modinfo_fields(data, "name")[1]
	info.vermagic = modinfo_fields(data, "vermagic")[1]
	return info
end

-- Load order for `wanted` given mods = {name = {depends = {…}, soft = {…}}}: dependencies
-- (and soft dependencies that are there) first. Returns the ordered list and the names
-- that are neither in mods nor in `builtin`.
function M.module_order(mods, wanted, builtin)
	builtin = builtin or {}
	local order, seen, missing = {}, {}, {}
	local function visit(name, chain)
		if seen[name] then return end
		if builtin[name] then seen[name] = true return end
		local m = mods[name]
		if not m then
			missing[#missing + 1] = name
			seen[name] = true
			return
		end
		if chain[name] then fail("module dependency loop at %s", name) end
		chain[name] = true
		for _, d in ipairs(m.depends) do visit(d, chain) end
		for _, d in ipairs(m.soft or {}) do
			if mods[d] then visit(d, chain) end
		end
		chain[name] = nil
		seen[name] = true
		order[#order + 1] = name
	end
	for _, w in ipairs(wanted) do visit(w, {}) end
	return order, missing
end

-- ---- ELF dynamic info (for the shared-library closure) ----

-- {interp = "/lib64/ld-linux-x86-64.so.2" | nil, needed = {"libc.so.6", …}} or nil (not ELF64)
function M.elf_info(s)
	if #s < 64 or s:sub(1, 4) ~= "\127ELF" or s:byte(5) ~= 2 or s:byte(6) ~= 1 then return nil end
	local phoff, phentsize, phnum = le(s, 0x20, 8), le(s, 0x36, 2), le(s, 0x38, 2)
	local loads, dyn, info = {}, nil, { needed = {} }
	for i = 0, phnum - 1 do
		local p = phoff + i * phentsize
		local ptype, off, vaddr, filesz = le(s, p, 4), le(s, p + 8, 8), le(s, p + 16, 8), le(s, p + 32, 8)
		if ptype == 1 then
			loads[#loads + 1] = { off = off, vaddr = vaddr, filesz = filesz }
		elseif ptype == 2 then
			dyn = { off = off, size = filesz }
		elseif ptype == 3 then
			info.interp = s:sub(off + 1, off + filesz):match("^[^%z]+")
		end
	end
	if not dyn then return info end
	local strtab, needed = nil, {}
	for p = dyn.off, dyn.off + dyn.size - 16, 16 do
		local tag, val = le(s, p, 8), le(s, p + 8, 8)
		if tag == 0 then break end
		if tag == 1 then needed[#needed + 1] = val end
		if tag == 5 then strtab = val end
	end
	if strtab then
		local stroff
		for _, l in ipairs(loads) do
			if strtab >= l.vaddr and strtab < l.vaddr + l.filesz then stroff = l.off + strtab - l.vaddr end
		end
		for _, n in ipairs(needed) do
			if stroff then info.needed[#info.needed + 1] = s:match("^[^%z]+", stroff + n + 1) end
		end
	end
	return info
end

-- ---- the image directory and its atomic replacement ----

local function stamp()
	M._seq = (M._seq or 0) + 1
	return os.date("!%Y%m%dT%H%M%S") .. M._seq
end

-- Remove what interrupted builds left behind: build dirs and link names of dead pids,
-- image versions of dead pids that no image name points to.
local function clean_stale()
	local dir = images_dir()
	local entries = runtime.listdir(dir) or {}
	local used = {}
	for _, e in ipairs(entries) do
		local t = M.readlink(dir .. "/" .. e)
		if t then used[t] = true end
	end
	for _, e in ipairs(entries) do
		local pid = e:match("^%.tmp~.*~(%d+)$") or e:match("^%.lnk~.*~(%d+)$")
		local vpid = e:match("^%.img~.*~[%w]+~(%d+)$")
		local why = (pid and not pid_alive(pid) and "left by an interrupted build") or
			(vpid and not used[e] and not pid_alive(vpid) and "no image uses it")
		if why then
			log("removing %s (%s)", e, why)
			-- a command of the dead build may still be finishing: not our failure
			local ok, err = pcall(rm_rf, dir .. "/" .. e)
			if not ok then log("could not remove %s yet: %s", e, tostring(err)) end
		end
	end
end
M.clean_stale = clean_stale

-- Move the finished directory `ready` into place as image `name`.
local function install(name, ready)
	local dir = images_dir()
	local vname = ".img~" .. name .. "~" .. stamp() .. "~" .. proc.getpid()
	local ok, err = os.rename(ready, dir .. "/" .. vname)
	if not ok then fail("cannot move the new image into %s: %s", dir, tostring(err)) end
	local final = dir .. "/" .. name
	local old = M.readlink(final)
	local aside
	if not old and is_dir(final) then -- a plain directory (made by hand): move it aside
		aside = ".tmp~" .. name .. "-old~" .. proc.getpid()
		os.rename(final, dir .. "/" .. aside)
	end
	local lnk = dir .. "/.lnk~" .. name .. "~" .. proc.getpid()
	os.remove(lnk)
	symlink(vname, lnk)
	ok, err = os.rename(lnk, final)
	if not ok then
		os.remove(lnk)
		fail("cannot install image %s: %s", name, tostring(err))
	end
	if old and old:match("^%.img~") then rm_rf(dir .. "/" .. old) end
	if aside then rm_rf(dir .. "/" .. aside) end
	return dir .. "/" .. vname
end

-- Real directory of image `name`, or nil.
local function image_path(name)
	local link = images_dir() .. "/" .. name
	local t = M.readlink(link)
	if t then
		local real = t:sub(1, 1) == "/" and t or (images_dir() .. "/" .. t)
		return is_dir(real) and real or nil
	end
	return is_dir(link) and link or nil
end

function M.exists(name)
	check_name(name)
	local p = image_path(name)
	return p ~= nil and exists(p .. "/manifest.json")
end

local function missing_image(name)
	fail("no image named '%s' (build it with: fireclaw image build --name %s)", name, name)
end

function M.info(name)
	name = check_name(name or config.image)
	local p = image_path(name)
	local text = p and read_file(p .. "/manifest.json")
	if not text then missing_image(name) end
	local ok, m = pcall(json.decode, text)
	if not ok then fail("'%s' has a broken manifest %s/manifest.json: %s", name, p, tostring(m)) end
	return m, p
end

function M.load(name)
	name = name or config.image
	local m, p = M.info(name)
	local img = {}
	for k, v in pairs(m) do img[k] = v end
	img.dir = p
	local function f(file) return exists(p .. "/" .. file) and (p .. "/" .. file) or nil end
	img.vmlinux, img.vmlinuz = f("vmlinux"), f("vmlinuz")
	img.kernel = img.vmlinux or img.vmlinuz
	img.initrd, img.rootfs = f("initrd"), f("rootfs.ext4")
	img.host_key_pub = f("host_key.pub")
	img.host_key = img.host_key_pub and (read_file(img.host_key_pub):gsub("%s+$", "")) or nil
	if not img.kernel or not img.rootfs then
		fail("'%s' in %s is incomplete (no kernel or rootfs.ext4): rebuild it with --force", name, p)
	end
	local key = keys_dir() .. "/id_ed25519"
	img.client_key = exists(key) and key or nil
	img.client_key_pub = exists(key .. ".pub") and (key .. ".pub") or nil
	return img
end

function M.list()
	local out = {}
	for _, e in ipairs(runtime.listdir(images_dir()) or {}) do
		if not e:match("^%.") then
			local ok, m = pcall(M.info, e)
			out[#out + 1] = { name = e, manifest = ok and m or nil, error = not ok and tostring(m) or nil }
		end
	end
	return out
end

-- Remove image `name` and the snapshots taken from it (they restore only with this very
-- image: left alone they would be refused forever). Returns the removed snapshots' names.
function M.remove(name)
	check_name(name)
	local link = images_dir() .. "/" .. name
	local t = M.readlink(link)
	if not t and not is_dir(link) then
		fail("no image named '%s' (see: fireclaw image list)", name)
	end
	if t then
		os.remove(link)
		if t:match("^%.img~") then rm_rf(images_dir() .. "/" .. t) end
	else
		rm_rf(link)
	end
	local snapshot = require "fireclaw.snapshot"
	local snaps = snapshot.of_image(name)
	for _, s in ipairs(snaps) do snapshot.remove(s) end
	M.prune_cache()
	return snaps
end

-- Keep in cache/ only what an existing image was built from: the .debs its manifest
-- lists and its extracted kernel; leftovers of dead processes go too. Skipped while
-- another build of this state dir runs (it may be using files no manifest lists yet).
function M.prune_cache()
	for _, e in ipairs(runtime.listdir(images_dir()) or {}) do
		local pid = e:match("^%.tmp~.*~(%d+)$")
		if pid and tonumber(pid) ~= proc.getpid() and pid_alive(pid) then return end
	end
	local keep_debs, keep_kernels = {}, {}
	for _, e in ipairs(M.list()) do
		local m = e.manifest
		if not m then return end -- unreadable manifest: do not guess
		for _, pkg in ipairs(m.packages or {}) do
			if pkg.file then keep_debs[pkg.file] = true end
		end
		if m.kernel_info and m.kernel_info.cache then keep_kernels[m.kernel_info.cache] = true end
	end
	local function sweep(dir, keep)
		for _, e in ipairs(runtime.listdir(dir) or {}) do
			local pid = e:match("~(%d+)$")
			local stale
			if pid then
				stale = not pid_alive(pid)
			else
				stale = not keep[e]
			end
			if stale and e ~= "." and e ~= ".." then
				pcall(rm_rf, dir .. "/" .. e)
			end
		end
	end
	sweep(cache_dir() .. "/debs", keep_debs)
	sweep(cache_dir() .. "/kernel", keep_kernels)
end

-- ---- build ----

-- "link", "dir", "file" (anything else that exists) or nil; symlinks are not followed.
local function kind(path)
	if M.readlink(path) then return "link" end
	if is_dir(path) then return "dir" end
	if exists(path) then return "file" end
	return nil
end

-- Move the entries of the directory `src` into `tree`/`rel` (`rel` names a directory
-- inside the tree and has no symlink in it). A directory the tree already has — also
-- through a symlink, resolved inside the tree as dpkg does for bin -> usr/bin — is merged
-- into; anything else is renamed into place, which replaces a file or symlink there
-- without following it.
local function merge_into(src, tree, rel, pkg)
	for _, e in ipairs(runtime.listdir(src) or {}) do
		local s, r = src .. "/" .. e, rel == "" and e or rel .. "/" .. e
		local d = tree .. "/" .. r
		local sk, dk = kind(s), kind(d)
		if sk == "dir" and dk then
			local into = dk == "link" and M.resolve_in(tree, r) or r
			if kind(tree .. "/" .. into) ~= "dir" then
				fail("cannot unpack %s: it has a directory /%s, but in the image /%s is %s; refusing to write outside the image",
					pkg, r, r, dk == "link" and ("a symlink to " .. M.readlink(d) .. " that leads to no directory inside it")
						or "not a directory")
			end
			merge_into(s, tree, into, pkg)
		elseif dk == "dir" then
			fail("cannot unpack %s: its /%s would replace the image's directory /%s", pkg, r, r)
		else
			local ok, err = os.rename(s, d)
			if not ok then fail("cannot unpack %s: moving /%s into the image: %s", pkg, r, tostring(err)) end
		end
	end
end

-- Unpack the files of a .deb into `tree` as dpkg would, never writing outside it: tar
-- extracts into a fresh empty directory beside the tree (no symlink there to follow; GNU
-- tar also refuses to write below a symlink it extracted itself), then merge_into moves
-- the entries in, following the tree's symlinks only as if the tree were / — a package's
-- etc/foo -> /tmp/x or -> ../../../x cannot make a later one write to the host.
function M.unpack_into(deb, tree)
	local pkg = deb:match("[^/]+$")
	local staging = tree:gsub("/+$", "") .. ".unpack~" .. proc.getpid()
	rm_rf(staging)
	mkdir_p(staging, "755")
	local ok, err = pcall(function()
		run("unpacking " .. pkg, { "bash", "-o", "pipefail", "-c",
			'dpkg-deb --fsys-tarfile "$1" | tar -x -C "$2"', "unpack", deb, staging })
		merge_into(staging, tree, "", pkg)
	end)
	pcall(rm_rf, staging)
	if not ok then error(err, 0) end
end
local unpack_into = M.unpack_into

local function copy(src, dst)
	run("copying " .. src, { "cp", "-L", "--sparse=always", "--", src, dst })
end

-- The plan: every package with its candidate record, and the fingerprint of the inputs.
local function plan(opts)
	local kmeta = opts.kernel_package or M.KERNEL_PACKAGE
	local want = { kmeta }
	for _, p in ipairs(M.BASE_PACKAGES) do want[#want + 1] = p end
	want[#want + 1] = M.SFTP_PACKAGE
	local recs = apt_show(want)
	-- the metapackage depends on the real, versioned kernel package
	local kpkg = kmeta
	if not kmeta:match("^linux%-image%-%d") then
		for _, d in ipairs(depends_names(recs[kmeta].Depends)) do
			if d:match("^linux%-image%-%d") then kpkg = d break end
		end
	end
	local base = apt_closure(M.BASE_PACKAGES)
	local need = { kpkg }
	for _, p in ipairs(base) do need[#need + 1] = p end
	local extra = {}
	if opts.packages and #opts.packages > 0 then
		apt_show(opts.packages) -- clear error for an unknown name
		extra = apt_closure(opts.packages)
		for _, p in ipairs(extra) do need[#need + 1] = p end
	end
	local more = apt_show(need)
	for k, v in pairs(more) do recs[k] = v end
	local p = { kernel_meta = kmeta, kernel = recs[kpkg], base = {}, extra = {}, recs = recs,
		sftp = recs[M.SFTP_PACKAGE] }
	for _, n in ipairs(base) do p.base[#p.base + 1] = recs[n] end
	for _, n in ipairs(extra) do p.extra[#p.extra + 1] = recs[n] end
	local function pv(list)
		local o = {}
		for _, r in ipairs(list) do o[#o + 1] = r.Package .. "=" .. r.Version end
		return o
	end
	local requested = {}
	for _, n in ipairs(opts.packages or {}) do requested[#requested + 1] = n end
	table.sort(requested)
	local inputs = json.encode({
		format = M.FORMAT, guest = guest.VERSION, helper = M.helper_sha256(),
		guest_files = run("hashing", { "sha256sum" }, { stdin = guest.initrd_init({}) ..
			json.encode(guest.rootfs_files({ authorized_keys = opts.client_pub })) }).stdout:match("%x+"),
		kernel = p.kernel.Package .. "=" .. p.kernel.Version,
		base = pv(p.base), sftp = p.sftp.Package .. "=" .. p.sftp.Version, extra = pv(p.extra),
		requested = requested, size = opts.size and M.parse_size(opts.size) or "auto",
		boot_args = default_boot_args(), modules = M.MODULES,
		client_key = opts.client_pub,
	})
	p.fingerprint = run("hashing", { "sha256sum" }, { stdin = inputs }).stdout:match("%x+")
	return p
end

local function up_to_date(name, fingerprint)
	local ok, m, dir = pcall(M.info, name)
	if not ok or m.inputs ~= fingerprint then return nil end
	for file, f in pairs(m.files or {}) do
		if file_size(dir .. "/" .. file) ~= f.size then return nil end
	end
	return m
end

-- The kernel of package record `krec`, extracted once per package file into
-- cache/kernel/KEY/: vmlinuz, vmlinux, modules/*.ko (the ones the initramfs loads) and
-- info.json {release, compression, modules (load order)}. Returns the dir and the info.
local function kernel_key(krec)
	local h = 5381 -- the module list is part of the key (djb2)
	for c in table.concat(M.MODULES, ","):gmatch(".") do h = (h * 33 + c:byte()) % 4294967296 end
	return string.format("%s_%s_%s_f%d_%08x", krec.Package, (krec.Version:gsub(":", "%%3a")),
		(krec.SHA256 or "x"):sub(1, 16), M.FORMAT, h)
end

local function extract_kernel(krec, deb, scratch)
	local cdir = cache_dir() .. "/kernel/" .. kernel_key(krec)
	local text = read_file(cdir .. "/info.json")
	if text then
		local ok, info = pcall(json.decode, text)
		if ok and info.release then
			log("unpack: %s %s, kernel %s (cached in %s)", krec.Package, krec.Version, info.release, cdir)
			return cdir, info
		end
	end
	local t0 = runtime.now()
	mkdir_p(cache_dir() .. "/kernel", "755")
	local tmp = cache_dir() .. "/kernel/.tmp~" .. kernel_key(krec) .. "~" .. proc.getpid()
	rm_rf(tmp)
	mkdir_p(tmp .. "/modules", "755")
	local kdir = scratch .. "/kernel"
	mkdir_p(kdir, "755")
	run("unpacking the kernel", { "dpkg-deb", "-x", deb, kdir })
	local release
	for _, e in ipairs(runtime.listdir(kdir .. "/lib/modules") or {}) do
		if not e:match("^%.") then release = e end
	end
	local bz = release and kdir .. "/boot/vmlinuz-" .. release
	if not bz or not exists(bz) then fail("no /boot/vmlinuz-* in %s", krec.Package) end
	copy(bz, tmp .. "/vmlinuz")
	log("unpack: %s %s, kernel %s (%s)", krec.Package, krec.Version, release, secs(t0))
	t0 = runtime.now()
	local elf = M.bzimage_to_elf(tmp .. "/vmlinuz", tmp .. "/vmlinux")
	log("vmlinux: %s, %s-compressed in the bzImage (%s)", human(elf.size), elf.compression, secs(t0))
	-- modules: index every .ko, read depends= from each one we need
	local mdir = kdir .. "/lib/modules/" .. release
	local found = run("listing modules", { "find", mdir .. "/kernel", "-name", "*.ko*" }).stdout
	local files = {}
	for path in found:gmatch("[^\n]+") do
		local n = path:match("([^/]+)%.ko[%.%w]*$")
		if n then files[(n:gsub("-", "_"))] = path end
	end
	local builtin = {}
	for line in (read_file(mdir .. "/modules.builtin") or ""):gmatch("[^\n]+") do
		local n = line:match("([^/]+)%.ko$")
		if n then builtin[(n:gsub("-", "_"))] = true end
	end
	local builtin_alias = {}
	for a in (read_file(mdir .. "/modules.builtin.modinfo") or ""):gmatch("[%w_-]+%.alias=([^%z]+)") do
		builtin_alias[a] = true
	end
	local function read_ko(path)
		if path:match("%.ko%.xz$") then return run("decompressing " .. path, { "xz", "-dc", path }).stdout end
		if path:match("%.ko%.zst$") then return run("decompressing " .. path, { "zstd", "-dc", path }).stdout end
		if path:match("%.ko%.gz$") then return run("decompressing " .. path, { "gzip", "-dc", path }).stdout end
		return read_file(path)
	end
	-- a softdep names a module or an alias (crypto-crc32c): aliases are looked up in the
	-- crypto and lib modules, preferring the generic implementation
	local alias_index
	local function resolve(a)
		local n = a:gsub("-", "_")
		if files[n] or builtin[n] then return n end
		if builtin_alias[a] then return nil end
		if not alias_index then
			alias_index = {}
			for name, path in pairs(files) do
				local rel = path:sub(#mdir + 2)
				if rel:match("^kernel/crypto/") or rel:match("^kernel/arch/x86/crypto/") or rel:match("^kernel/lib/") then
					for _, al in ipairs(M.ko_info(read_ko(path)).aliases) do
						local cur = alias_index[al]
						if not cur or (name:match("_generic$") and not cur:match("_generic$")) then
							alias_index[al] = name
						end
					end
				end
			end
		end
		return alias_index[a]
	end
	local mods, contents = {}, {}
	local function load_mod(name)
		if mods[name] ~= nil or not files[name] then return end
		local data = read_ko(files[name])
		contents[name] = data
		mods[name] = M.ko_info(data)
		mods[name].soft = {}
		for _, d in ipairs(mods[name].depends) do load_mod(d) end
		for _, sd in ipairs(mods[name].softpre) do
			local r = resolve(sd)
			if r and not builtin[r] then
				table.insert(mods[name].soft, r)
				load_mod(r)
			end
		end
	end
	for _, w in ipairs(M.MODULES) do load_mod(w) end
	local order, missing = M.module_order(mods, M.MODULES, builtin)
	for _, m in ipairs(missing) do
		if not M.OPTIONAL_MODULES[m] then
			fail("kernel %s has no %s (neither a module nor built in)", release, m)
		end
	end
	for _, m in ipairs(order) do write_file(tmp .. "/modules/" .. m .. ".ko", contents[m], "644") end
	local info = { release = release, compression = elf.compression, modules = json.array(order),
		package = krec.Package, version = krec.Version, sha256 = krec.SHA256 }
	write_file(tmp .. "/info.json", json.encode(info, { pretty = true }) .. "\n", "644")
	rm_rf(kdir)
	if not os.rename(tmp, cdir) then -- another build cached it meanwhile
		rm_rf(tmp)
	end
	return cdir, info
end

-- Kernel: vmlinuz and vmlinux into out/, modules into the initramfs tree. Returns info.
local function build_kernel(p, debs, scratch, out, initrd_tree)
	local cdir, info = extract_kernel(p.kernel, debs[p.kernel.Package], scratch)
	local t0 = runtime.now()
	for _, f in ipairs({ "vmlinuz", "vmlinux" }) do
		run("copying the kernel", { "cp", "--reflink=auto", "--", cdir .. "/" .. f, out .. "/" .. f })
	end
	mkdir_p(initrd_tree .. "/lib/modules", "755")
	local total = 0
	for _, m in ipairs(info.modules) do
		local ko = cdir .. "/modules/" .. m .. ".ko"
		copy(ko, initrd_tree .. "/lib/modules/" .. m .. ".ko")
		total = total + (file_size(ko) or 0)
	end
	return { release = info.release, compression = info.compression, modules = info.modules, modules_size = total,
		t_modules = t0, cache = cdir }
end

local function build_initrd(busybox, tree, modules, out)
	for _, d in ipairs({ "bin", "dev", "proc", "sys", "newroot" }) do mkdir_p(tree .. "/" .. d, "755") end
	copy(busybox, tree .. "/bin/busybox")
	chmod(tree .. "/bin/busybox", "755")
	write_file(tree .. "/init", guest.initrd_init(modules), "755")
	chmod(tree, "755")
	local list = run("listing the initramfs", { "find", ".", "-mindepth", "1" }, { cwd = tree }).stdout
	local names = {}
	for l in list:gmatch("[^\n]+") do names[#names + 1] = l end
	table.sort(names)
	local r = run("making the initramfs", { "cpio", "--quiet", "-o", "-H", "newc", "--reproducible",
		"-R", "0:0" }, { cwd = tree, stdin = table.concat(names, "\n") .. "\n" })
	write_file(out .. "/initrd", r.stdout, "644")
	return #r.stdout
end

-- Resolve `rel` inside `root` following symlinks as if root were / (absolute links in
-- unpacked packages must not lead to the host's files). Returns the path relative to root.
function M.resolve_in(root, rel)
	local parts, cur, i, hops = {}, {}, 1, 0
	for c in rel:gmatch("[^/]+") do parts[#parts + 1] = c end
	while i <= #parts do
		local c = parts[i]
		if c == ".." then
			cur[#cur] = nil
		elseif c ~= "." then
			local here = root .. "/" .. table.concat(cur, "/") .. (#cur > 0 and "/" or "") .. c
			local t = M.readlink(here)
			if t then
				hops = hops + 1
				if hops > 40 then fail("too many levels of symlinks in %s/%s", root, rel) end
				local rest = {}
				for c2 in t:gmatch("[^/]+") do rest[#rest + 1] = c2 end
				for j = i + 1, #parts do rest[#rest + 1] = parts[j] end
				if t:sub(1, 1) == "/" then cur = {} end
				parts, i = rest, 0
			else
				cur[#cur + 1] = c
			end
		end
		i = i + 1
	end
	return table.concat(cur, "/")
end

-- `tree`/`rel` with every directory on the way resolved inside the tree (symlinks from
-- packages included), so that what is written there lands inside the tree; `whole` also
-- resolves the last component (a directory to create or enter).
local function in_tree(tree, rel, whole)
	local dir, base = rel:match("^(.*)/([^/]+)$")
	if whole or not dir then
		dir, base = whole and rel or "", not whole and rel or nil
	end
	local r = M.resolve_in(tree, dir)
	return tree .. (r ~= "" and "/" .. r or "") .. (base and "/" .. base or "")
end
M.in_tree = in_tree

-- The real file in `stage` that path `rel` names, or nil.
local function stage_file(stage, rel)
	local path = stage .. "/" .. M.resolve_in(stage, rel)
	return exists(path) and path or nil
end

local LIBDIRS = { "usr/lib/x86_64-linux-gnu", "usr/lib64", "usr/lib" }

-- Copy an ELF and its shared-library closure from `stage` (unpacked packages, merged /usr)
-- into tree, under the same paths.
local function copy_with_libs(stage, tree, relpath, done)
	local src = stage_file(stage, relpath)
	local data = src and read_file(src)
	if not data then fail("%s is missing from the unpacked packages", relpath) end
	local dst = in_tree(tree, relpath)
	mkdir_p(dst:match("^(.*)/"), "755")
	if not exists(dst) then copy(src, dst) end
	local info = M.elf_info(data)
	if not info then return end
	if info.interp and not done[info.interp] then
		done[info.interp] = true
		local rel = info.interp:gsub("^/", "")
		if not stage_file(stage, rel) then fail("loader %s (for %s) not in the packages", info.interp, relpath) end
		copy_with_libs(stage, tree, rel, done)
	end
	for _, lib in ipairs(info.needed) do
		if not done[lib] then
			done[lib] = true
			local found
			for _, d in ipairs(LIBDIRS) do
				if stage_file(stage, d .. "/" .. lib) then
					found = d .. "/" .. lib
					break
				end
			end
			if not found then fail("library %s needed by %s is in none of the packages", lib, relpath) end
			copy_with_libs(stage, tree, found, done)
		end
	end
end

local function build_rootfs(p, debs, scratch, out, opts)
	local t0 = runtime.now()
	local tree, stage = scratch .. "/rootfs", scratch .. "/stage"
	mkdir_p(tree, "755")
	mkdir_p(stage, "755")
	-- Debian 12 layout: merged /usr
	for _, d in ipairs({ "usr/bin", "usr/sbin", "usr/lib", "usr/lib64" }) do mkdir_p(tree .. "/" .. d, "755") end
	for _, l in ipairs({ { "bin", "usr/bin" }, { "sbin", "usr/sbin" }, { "lib", "usr/lib" }, { "lib64", "usr/lib64" } }) do
		symlink(l[2], tree .. "/" .. l[1])
	end
	for _, l in ipairs({ { "usr/bin", "usr/bin" }, { "usr/sbin", "usr/sbin" }, { "usr/lib", "usr/lib" },
		{ "usr/lib64", "usr/lib64" } }) do
		mkdir_p(stage .. "/" .. l[1], "755")
	end
	for _, l in ipairs({ { "bin", "usr/bin" }, { "sbin", "usr/sbin" }, { "lib", "usr/lib" }, { "lib64", "usr/lib64" } }) do
		symlink(l[2], stage .. "/" .. l[1])
	end
	-- extra packages: unpacked whole into the tree (no maintainer scripts run)
	for _, rec in ipairs(p.extra) do unpack_into(debs[rec.Package], tree) end
	-- base packages: unpacked aside, then only what the guest needs is copied
	for _, rec in ipairs(p.base) do unpack_into(debs[rec.Package], stage) end
	unpack_into(debs[p.sftp.Package], stage)
	local done = {}
	copy_with_libs(stage, tree, "usr/bin/busybox", done)
	copy_with_libs(stage, tree, "usr/sbin/dropbear", done)
	copy_with_libs(stage, tree, "usr/bin/dropbearkey", done)
	copy_with_libs(stage, tree, "usr/lib/openssh/sftp-server", done)
	local sftp = in_tree(tree, "usr/lib/sftp-server")
	if not exists(sftp) then symlink("openssh/sftp-server", sftp) end
	-- busybox applets, where no package put a real program
	local applets = run("listing busybox applets", { stage .. "/usr/bin/busybox", "--list-full" }).stdout
	local nlinks = 0
	for rel in applets:gmatch("[^\n]+") do
		local dst = in_tree(tree, rel)
		if rel ~= "bin/busybox" and rel ~= "usr/bin/busybox" and not exists(dst) then
			mkdir_p(dst:match("^(.*)/"), "755")
			symlink("/bin/busybox", dst)
			nlinks = nlinks + 1
		end
	end
	for _, d in ipairs(guest.rootfs_dirs) do mkdir_p(in_tree(tree, d[1], true), d[2]) end
	local var_run = in_tree(tree, "var/run")
	if not exists(var_run) then symlink("/run", var_run) end
	-- the guest helper (reseed + clock after a restore), compiled into fireclaw
	write_file(in_tree(tree, guest.HELPER:sub(2)), guest.helper(), "755")
	for _, f in ipairs(guest.rootfs_files({ authorized_keys = opts.client_pub .. "\n" })) do
		local path = in_tree(tree, f.path)
		mkdir_p(path:match("^(.*)/"), nil)
		os.remove(path)
		write_file(path, f.content, f.mode)
	end
	-- host key, made here so the host can pin it
	local hk = in_tree(tree, "etc/dropbear/dropbear_ed25519_host_key")
	os.remove(hk)
	run("making the host key", { "dropbearkey", "-t", "ed25519", "-f", hk })
	chmod(hk, "600")
	local pub = run("reading the host key", { "dropbearkey", "-y", "-f", hk }).stdout:match("(ssh%-ed25519 %S+)")
	if not pub then fail("dropbearkey -y printed no ssh-ed25519 line") end
	write_file(out .. "/host_key.pub", pub .. "\n", "644")
	mkdir_p(in_tree(tree, "var/cache/ldconfig", true), "700")
	run("running ldconfig for the rootfs", { "ldconfig", "-r", tree })
	chmod(tree, "755")
	-- size: what the tree needs (+ room for users), or what was asked for
	local du = run("measuring the rootfs tree", { "du", "-s", "-B1", "--apparent-size", tree }).stdout
	local used = tonumber(du:match("^(%d+)"))
	local nfiles = 0
	for _ in run("counting files", { "find", tree }).stdout:gmatch("\n") do nfiles = nfiles + 1 end
	local size = opts.size and M.parse_size(opts.size)
	if not size then
		local want = used * 1.5 + 32 * 2 ^ 20
		size = M.DEFAULT_SIZE
		while size < want do size = size * 2 end
	end
	if size < used + 8 * 2 ^ 20 then
		fail("the rootfs needs about %s but --size is %s: give a larger --size (e.g. %dM)", human(used + 8 * 2 ^ 20),
			human(size), math.ceil((used * 1.5 + 32 * 2 ^ 20) / 2 ^ 20))
	end
	local inodes = math.max(8192, nfiles * 2)
	local img = out .. "/rootfs.ext4"
	run("making the rootfs file", { "truncate", "-s", tostring(size), img })
	chmod(img, "600") -- before mkfs writes the guest's private host key into it
	local r = try_run({ "mkfs.ext4", "-q", "-F", "-b", "4096", "-N", tostring(inodes), "-L", "fireclaw-root",
		"-d", tree, img })
	if r.status ~= 0 then
		local text = r.stderr .. r.stdout
		if text:find("Could not allocate block") or text:find("No free space") or text:find("inode") then
			fail("the rootfs tree (%s, %d files) does not fit in %s: give a larger --size", human(used), nfiles, human(size))
		end
		if text:find(NOSPACE, 1, true) then fail("no space left on device while writing %s", img) end
		fail("mkfs.ext4 -d %s failed: %s", tree, (text:match("[^\n]+") or "?"))
	end
	return { used = used, files = nfiles, size = size, applets = nlinks, t0 = t0 }
end

-- Remove the work dir of a failed build. A command interrupted halfway may still run:
-- collecting its process object kills and reaps it first (proc's __gc).
local function discard(work)
	collectgarbage("collect")
	collectgarbage("collect")
	if not pcall(rm_rf, work) then pcall(rm_rf, work) end
end

-- Build image opts.name (default "default"). See the module comment.
function M.build(opts)
	opts = opts_check.check("image.build", opts, { "name", "packages", "size", "force", "kernel_package" })
	local o = {}
	for k, v in pairs(opts) do o[k] = v end
	opts = o -- the caller's table stays as it was (client_pub is added below)
	local T0 = runtime.now()
	local name = check_name(opts.name or config.image)
	if not is_root() then
		fail("building an image needs root (the rootfs files must belong to root and apt must fetch); run it as root or with sudo")
	end
	mkdir_p(images_dir(), "755")
	clean_stale()
	local client_key, client_pub = M.client_key()
	opts.client_pub = client_pub
	local p = plan(opts)
	if not opts.force then
		local ok, old = pcall(M.info, name)
		if ok and old.source == "import" then
			fail("image '%s' was imported, not built: --force replaces it (or give another --name)", name)
		end
		local m = up_to_date(name, p.fingerprint)
		if m then
			-- images built before the rootfs was made 0600 (it holds the guest's host key)
			pcall(chmod, images_dir() .. "/" .. name .. "/rootfs.ext4", "600")
			log("'%s' is up to date (%s %s, built %s): nothing to do (--force rebuilds)", name,
				m.kernel_info and m.kernel_info.package or "?", m.kernel_info and m.kernel_info.version or "", m.created or "?")
			return m, false
		end
	end
	local work = images_dir() .. "/.tmp~" .. name .. "~" .. proc.getpid()
	rm_rf(work)
	mkdir_p(work, "755")
	local ok, res = pcall(function()
		local out, scratch = work .. "/out", work .. "/scratch"
		mkdir_p(out, "755")
		mkdir_p(scratch, "755")
		local all, seen = {}, {}
		for _, list in ipairs({ { p.kernel, p.sftp }, p.base, p.extra }) do
			for _, r in ipairs(list) do
				if not seen[r.Package] then all[#all + 1] = r end
				seen[r.Package] = true
			end
		end
		local debs = download(all)
		local itree = scratch .. "/initrd"
		local k = build_kernel(p, debs, scratch, out, itree)
		local busybox_deb
		for _, r in ipairs(p.base) do if r.Package == "busybox-static" then busybox_deb = debs[r.Package] end end
		local bbdir = scratch .. "/busybox"
		mkdir_p(bbdir, "755")
		run("unpacking busybox-static", { "dpkg-deb", "-x", busybox_deb, bbdir })
		local isize = build_initrd(bbdir .. "/bin/busybox", itree, k.modules, out)
		log("initrd: %s, %d modules %s (%s)", human(isize), #k.modules, table.concat(k.modules, ","),
			secs(k.t_modules))
		local rf = build_rootfs(p, debs, scratch, out, opts)
		log("rootfs: %s ext4 (sparse), tree %s in %d files, %d busybox applets%s (%s)", human(rf.size), human(rf.used),
			rf.files, rf.applets, #p.extra > 0 and string.format(", %d extra packages", #p.extra) or "", secs(rf.t0))
		log("keys: client %s, host key ed25519 pinned in host_key.pub", client_key)
		rm_rf(scratch)
		local names = { "vmlinux", "vmlinuz", "initrd", "rootfs.ext4", "host_key.pub" }
		local paths = {}
		for i, n in ipairs(names) do paths[i] = out .. "/" .. n end
		local sums, sz = sha256(paths), sizes(paths)
		local files = {}
		for i, n in ipairs(names) do
			files[n] = { sha256 = sums[paths[i]], size = sz[paths[i]].size, allocated = sz[paths[i]].allocated }
		end
		local function pkgs(list, role, out_list)
			for _, r in ipairs(list) do
				out_list[#out_list + 1] = { name = r.Package, version = r.Version, role = role, sha256 = r.SHA256,
					file = deb_filename(r) }
			end
			return out_list
		end
		local plist = pkgs({ p.kernel }, "kernel", json.array())
		pkgs(p.base, "base", plist)
		pkgs({ p.sftp }, "base", plist)
		pkgs(p.extra, "extra", plist)
		local requested = json.array()
		for _, n in ipairs(opts.packages or {}) do requested[#requested + 1] = n end
		local khz = M.tsc_khz()
		local manifest = {
			format = M.FORMAT,
			name = name,
			source = "debian",
			created = os.date("!%Y-%m-%dT%H:%M:%SZ"),
			build_seconds = math.floor((runtime.now() - T0) * 10 + 0.5) / 10,
			kernel_info = { package = p.kernel.Package, version = p.kernel.Version, metapackage = p.kernel_meta,
				release = k.release, compression = k.compression, cache = kernel_key(p.kernel) },
			modules = json.array(k.modules),
			packages = plist,
			requested_packages = requested,
			files = files,
			rootfs = { size = rf.size, used = rf.used, files = rf.files, fs = "ext4" },
			boot_args = json.array(default_boot_args()),
			boot_args_tcg = json.array(khz and { "tsc_early_khz=" .. khz } or {}),
			boot_notes = "boot_args are complete and explicit (give them to Firecracker as they are: its "
				.. "defaults add nomodule and 8250.nr_uarts=0, which break this kernel). boot_args_tcg are "
				.. "added under QEMU TCG only; tsc_early_khz is the build host's, use this host's "
				.. "(image.boot_args does). Devices are found through ACPI (QEMU microvm, Firecracker >= 1.8).",
			guest = { ip = config.net.guest_ip, gateway = config.net.host_ip, netmask = config.net.netmask,
				mac = config.net.guest_mac, user = "root", ssh_port = 22, ready_marker = guest.READY,
				helper = guest.HELPER, helper_sha256 = M.helper_sha256(),
				reseed = guest.HELPER .. " reseed NS < 32..4096 bytes of host entropy (the clock set to NS "
					.. "nanoseconds since 1970, then RNDADDENTROPY + RNDRESEEDCRNG)",
				shutdown = "poweroff -f (QEMU: ACPI power off); reboot -f (Firecracker; QEMU with -no-reboot)" },
			inputs = p.fingerprint,
		}
		write_file(out .. "/manifest.json", json.encode(manifest, { pretty = true }) .. "\n", "644")
		local final = install(name, out)
		rm_rf(work)
		M.prune_cache()
		local total, alloc = 0, 0
		for _, f in pairs(files) do
			total = total + f.size
			alloc = alloc + f.allocated
		end
		manifest.build_seconds = math.floor((runtime.now() - T0) * 10 + 0.5) / 10
		log("'%s' ready in %s: %s (%s allocated), built in %.1f s", name, images_dir() .. "/" .. name,
			human(total), human(alloc), manifest.build_seconds)
		return manifest, final
	end)
	if not ok then
		discard(work)
		error(res, 0)
	end
	return res, true
end

-- ---- import ----

local function kernel_kind(path)
	local f = io.open(path, "rb")
	if not f then fail("cannot read %s", path) end
	local head = f:read(0x210) or ""
	f:close()
	if head:sub(1, 4) == "\127ELF" then return "elf" end
	if head:sub(0x203, 0x206) == "HdrS" then return "bzimage" end
	return nil
end

-- Register a user's own kernel (ELF vmlinux or bzImage) and ext4 rootfs as image `name`.
function M.import(opts)
	opts = opts_check.check("image.import", opts,
		{ "name", "kernel", "rootfs", "initrd", "host_key", "boot_args", "force", "cmdline_devices" })
	local T0 = runtime.now()
	local name = check_name(opts.name)
	if not opts.kernel or not opts.rootfs then fail("import needs a kernel and a rootfs") end
	for _, k in ipairs({ "kernel", "rootfs", "initrd", "host_key" }) do
		if opts[k] and not exists(opts[k]) then fail("no such file: %s (--%s)", opts[k], k:gsub("_", "-")) end
	end
	if M.exists(name) and not opts.force then
		fail("an image named '%s' exists (fireclaw image rm %s, or --force to replace it)", name, name)
	end
	local kernel_format = kernel_kind(opts.kernel)
	if not kernel_format then fail("%s is neither an ELF vmlinux nor a bzImage", opts.kernel) end
	local host_key
	if opts.host_key then
		host_key = (read_file(opts.host_key) or ""):match("(ssh%-[%w-]+ [A-Za-z0-9+/=]+)")
		if not host_key then fail("%s holds no public key line (ssh-ed25519 AAAA…)", opts.host_key) end
	end
	mkdir_p(images_dir(), "755")
	clean_stale()
	local work = images_dir() .. "/.tmp~" .. name .. "~" .. proc.getpid()
	rm_rf(work)
	mkdir_p(work .. "/out", "755")
	local ok, res = pcall(function()
		local out = work .. "/out"
		local compression
		if kernel_format == "elf" then
			copy(opts.kernel, out .. "/vmlinux")
		else
			copy(opts.kernel, out .. "/vmlinuz")
			local ok2, e = pcall(M.bzimage_to_elf, out .. "/vmlinuz", out .. "/vmlinux")
			if ok2 then compression = e.compression else log("import: no vmlinux: %s", tostring(e)) end
		end
		run("copying the rootfs", { "cp", "--reflink=auto", "--sparse=always", "--", opts.rootfs, out .. "/rootfs.ext4" })
		chmod(out .. "/rootfs.ext4", "600") -- it may hold keys (the guest's host key)
		if opts.initrd then copy(opts.initrd, out .. "/initrd") end
		-- cp keeps a 0600 source's mode: the VMM, which runs as a user of its own, reads
		-- the kernel and initrd by name (they hold no secret; the rootfs stays 0600)
		for _, n in ipairs({ "vmlinux", "vmlinuz", "initrd" }) do
			if exists(out .. "/" .. n) then chmod(out .. "/" .. n, "644") end
		end
		if host_key then write_file(out .. "/host_key.pub", host_key .. "\n", "644") end
		local names = {}
		for _, n in ipairs({ "vmlinux", "vmlinuz", "initrd", "rootfs.ext4", "host_key.pub" }) do
			if exists(out .. "/" .. n) then names[#names + 1] = n end
		end
		local paths = {}
		for i, n in ipairs(names) do paths[i] = out .. "/" .. n end
		local sums, sz = sha256(paths), sizes(paths)
		local files = {}
		for i, n in ipairs(names) do
			files[n] = { sha256 = sums[paths[i]], size = sz[paths[i]].size, allocated = sz[paths[i]].allocated }
		end
		local args = json.array()
		if opts.boot_args then
			for a in opts.boot_args:gmatch("%S+") do args[#args + 1] = a end
		else
			for _, a in ipairs(default_boot_args()) do args[#args + 1] = a end
		end
		local khz = M.tsc_khz()
		local manifest = {
			format = M.FORMAT, name = name, source = "import",
			created = os.date("!%Y-%m-%dT%H:%M:%SZ"),
			imported_from = { kernel = opts.kernel, rootfs = opts.rootfs, initrd = opts.initrd,
				host_key = opts.host_key },
			kernel_info = { compression = compression, format = kernel_format },
			files = files,
			packages = json.array(),
			boot_args = args,
			boot_args_tcg = json.array(khz and { "tsc_early_khz=" .. khz } or {}),
			guest = { ip = config.net.guest_ip, gateway = config.net.host_ip, netmask = config.net.netmask,
				mac = config.net.guest_mac, user = "root", ssh_port = 22 },
			-- absent: the kernel finds its devices through ACPI only (Firecracker >= 1.8)
			cmdline_devices = opts.cmdline_devices and true or nil,
		}
		write_file(out .. "/manifest.json", json.encode(manifest, { pretty = true }) .. "\n", "644")
		install(name, out)
		rm_rf(work)
		log("imported '%s' (%s kernel%s) in %s", name, kernel_format, opts.initrd and ", initrd" or "", secs(T0))
		return manifest
	end)
	if not ok then
		discard(work)
		error(res, 0)
	end
	return res
end

return M
