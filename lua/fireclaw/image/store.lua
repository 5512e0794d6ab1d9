-- fireclaw.image.store: the images in $FIRECLAW_STATE/images — the atomic replacement of
-- an image (images/NAME -> .img~NAME~STAMP~PID/, a symlink swapped by each build), what
-- interrupted builds left behind, and the cache/ entries no image uses any more.
local common = require "fireclaw.image.common"
local config = require "fireclaw.config"
local fs = require "fireclaw.fs"
local json = require "fireclaw.json"
local proc = require "fireclaw.proc"
local runtime = require "fireclaw.runtime"

local fail, log = common.fail, common.log
local images_dir, check_name, pid_alive = common.images_dir, common.check_name, common.pid_alive

local M = {}

local seq = 0
local function stamp()
	seq = seq + 1
	return os.date("!%Y%m%dT%H%M%S") .. seq
end

-- Remove what interrupted builds left behind: build dirs and link names of dead pids,
-- image versions of dead pids that no image name points to.
function M.clean_stale()
	local dir = images_dir()
	local entries = runtime.listdir(dir) or {}
	local used = {}
	for _, e in ipairs(entries) do
		local t = fs.readlink(dir .. "/" .. e)
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
			local ok, err = pcall(fs.rm_rf, dir .. "/" .. e)
			if not ok then log("could not remove %s yet: %s", e, tostring(err)) end
		end
	end
end

-- Move the finished directory `ready` into place as image `name`.
function M.install(name, ready)
	local dir = images_dir()
	local vname = ".img~" .. name .. "~" .. stamp() .. "~" .. proc.getpid()
	local ok, err = os.rename(ready, dir .. "/" .. vname)
	if not ok then fail("cannot move the new image into %s: %s", dir, tostring(err)) end
	local final = dir .. "/" .. name
	local old = fs.readlink(final)
	local aside
	if not old and fs.is_dir(final) then -- a plain directory (made by hand): move it aside
		aside = ".tmp~" .. name .. "-old~" .. proc.getpid()
		os.rename(final, dir .. "/" .. aside)
	end
	local lnk = dir .. "/.lnk~" .. name .. "~" .. proc.getpid()
	os.remove(lnk)
	fs.symlink(vname, lnk)
	ok, err = os.rename(lnk, final)
	if not ok then
		os.remove(lnk)
		fail("cannot install image %s: %s", name, tostring(err))
	end
	if old and old:match("^%.img~") then fs.rm_rf(dir .. "/" .. old) end
	if aside then fs.rm_rf(dir .. "/" .. aside) end
	return dir .. "/" .. vname
end

-- Real directory of image `name`, or nil.
local function image_path(name)
	local link = images_dir() .. "/" .. name
	local t = fs.readlink(link)
	if t then
		local real = t:sub(1, 1) == "/" and t or (images_dir() .. "/" .. t)
		return fs.is_dir(real) and real or nil
	end
	return fs.is_dir(link) and link or nil
end

function M.exists(name)
	check_name(name)
	local p = image_path(name)
	return p ~= nil and fs.exists(p .. "/manifest.json")
end

local function missing_image(name)
	fail("no image named '%s' (build it with: fireclaw image build --name %s)", name, name)
end

function M.info(name)
	name = check_name(name or config.image)
	local p = image_path(name)
	local text = p and fs.read(p .. "/manifest.json")
	if not text then missing_image(name) end
	local ok, m = pcall(json.decode, text)
	if not ok then fail("'%s' has a broken manifest %s/manifest.json: %s", name, p, tostring(m)) end
	return m, p
end

-- What M.load found, by image directory: a run loads its image several times (the CLI's
-- checks, the VMM choice, the snapshot's, the sandbox's). Checked against the manifest's
-- identity each time, so a rebuilt (or hand-edited) image is read again.
local loaded = {}

local function manifest_id(p)
	local st = runtime.stat(p .. "/manifest.json")
	return st and table.concat({ st.ino, st.dev, st.size, st.mtime }, ":")
end

-- (a deep copy: callers may change what they were given)
local function copy(t)
	local c = {}
	for k, v in pairs(t) do c[k] = type(v) == "table" and copy(v) or v end
	return setmetatable(c, getmetatable(t))
end

local function load_dir(name)
	local m, p = M.info(name)
	local img = copy(m)
	img.dir = p
	local function f(file) return fs.exists(p .. "/" .. file) and (p .. "/" .. file) or nil end
	img.vmlinux, img.vmlinuz = f("vmlinux"), f("vmlinuz")
	img.kernel = img.vmlinux or img.vmlinuz
	img.initrd, img.rootfs = f("initrd"), f("rootfs.ext4")
	img.host_key_pub = f("host_key.pub")
	img.host_key = img.host_key_pub and (fs.read(img.host_key_pub):gsub("%s+$", "")) or nil
	if not img.kernel or not img.rootfs then
		fail("'%s' in %s is incomplete (no kernel or rootfs.ext4): rebuild it with --force", name, p)
	end
	local key = common.keys_dir() .. "/id_ed25519"
	img.client_key = fs.exists(key) and key or nil
	img.client_key_pub = fs.exists(key .. ".pub") and (key .. ".pub") or nil
	return img
end

function M.load(name)
	name = check_name(name or config.image)
	local p = image_path(name)
	local id = p and manifest_id(p)
	local hit = id and loaded[p]
	if hit and hit.id == id then return copy(hit.img) end
	local img = load_dir(name)
	if id and img.dir == p then loaded[p] = { id = id, img = copy(img) } end
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
	local t = fs.readlink(link)
	if not t and not fs.is_dir(link) then
		fail("no image named '%s' (see: fireclaw image list)", name)
	end
	if t then
		os.remove(link)
		if t:match("^%.img~") then fs.rm_rf(images_dir() .. "/" .. t) end
	else
		fs.rm_rf(link)
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
	local keep_debs, keep_kernels, keep_rootfs = {}, {}, {}
	for _, e in ipairs(M.list()) do
		local m = e.manifest
		if not m then return end -- unreadable manifest: do not guess
		for _, pkg in ipairs(m.packages or {}) do
			if pkg.file then keep_debs[pkg.file] = true end
		end
		if m.kernel_info and m.kernel_info.cache then keep_kernels[m.kernel_info.cache] = true end
		if type(m.base) == "table" and m.base.cache then keep_rootfs[m.base.cache] = true end
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
				pcall(fs.rm_rf, dir .. "/" .. e)
			end
		end
	end
	sweep(common.cache_dir() .. "/debs", keep_debs)
	sweep(common.cache_dir() .. "/kernel", keep_kernels)
	sweep(common.cache_dir() .. "/rootfs", keep_rootfs) -- mmdebstrap tarballs (fireclaw.image.debian)
end

-- Remove the work dir of a failed build. A command interrupted halfway may still run:
-- collecting its process object kills and reaps it first (proc's __gc).
function M.discard(work)
	collectgarbage("collect")
	collectgarbage("collect")
	if not pcall(fs.rm_rf, work) then pcall(fs.rm_rf, work) end
end

return M
