-- fireclaw.image.kernel: the guest kernel from its Debian package — vmlinuz, the vmlinux
-- inside it, and the modules the initramfs loads (with their dependencies and soft
-- dependencies, in load order), extracted once per package into cache/kernel/KEY/.
local common = require "fireclaw.image.common"
local elf = require "fireclaw.image.elf"
local fs = require "fireclaw.fs"
local json = require "fireclaw.json"
local proc = require "fireclaw.proc"
local runtime = require "fireclaw.runtime"

local fail, log, run = common.fail, common.log, common.run
local cache_dir, mkdir_p = common.cache_dir, common.mkdir_p

local M = {}

-- every value of "\0key=value\0" in a .ko (plain finds: fast)
local function modinfo_fields(data, key)
	local out, pos, pat = {}, 1, "\0" .. key .. "="
	while true do
		local _, e = data:find(pat, pos, true)
		if not e then return out end
		local z = data:find("\0", e + 1, true) or #data + 1
		out[#out + 1] = data:sub(e + 1, z - 1)
		pos = e + 1
	end
end

-- name, depends, softdeps to load first (module names or aliases) and aliases of a kernel
-- module (.ko contents): {name=, depends={…}, softpre={…}, aliases={…}, vermagic=}
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

-- The cache key of a kernel package record (cache/kernel/KEY; the manifest's
-- kernel_info.cache).
function M.cache_key(krec)
	local h = 5381 -- the module list is part of the key (djb2)
	for c in table.concat(common.MODULES, ","):gmatch(".") do h = (h * 33 + c:byte()) % 4294967296 end
	return string.format("%s_%s_%s_f%d_%08x", krec.Package, (krec.Version:gsub(":", "%%3a")),
		(krec.SHA256 or "x"):sub(1, 16), common.FORMAT, h)
end

-- The kernel release (the one directory in /lib/modules) of the package unpacked in kdir.
local function release_of(kdir, krec)
	local release
	for _, e in ipairs(runtime.listdir(kdir .. "/lib/modules") or {}) do
		if not e:match("^%.") then release = e end
	end
	local bz = release and kdir .. "/boot/vmlinuz-" .. release
	if not bz or not fs.exists(bz) then fail("no /boot/vmlinuz-* in %s", krec.Package) end
	return release, bz
end

-- The modules of release in mdir: {files = {name = path}, builtin = {name = true},
-- builtin_alias = {alias = true}} (names with '_' for '-').
local function module_index(mdir)
	local found = run("listing modules", { "find", mdir .. "/kernel", "-name", "*.ko*" }).stdout
	local idx = { files = {}, builtin = {}, builtin_alias = {}, mdir = mdir }
	for path in found:gmatch("[^\n]+") do
		local n = path:match("([^/]+)%.ko[%.%w]*$")
		if n then idx.files[(n:gsub("-", "_"))] = path end
	end
	for line in (fs.read(mdir .. "/modules.builtin") or ""):gmatch("[^\n]+") do
		local n = line:match("([^/]+)%.ko$")
		if n then idx.builtin[(n:gsub("-", "_"))] = true end
	end
	for a in (fs.read(mdir .. "/modules.builtin.modinfo") or ""):gmatch("[%w_-]+%.alias=([^%z]+)") do
		idx.builtin_alias[a] = true
	end
	return idx
end

local function read_ko(path)
	if path:match("%.ko%.xz$") then return run("decompressing " .. path, { "xz", "-dc", path }).stdout end
	if path:match("%.ko%.zst$") then return run("decompressing " .. path, { "zstd", "-dc", path }).stdout end
	if path:match("%.ko%.gz$") then return run("decompressing " .. path, { "gzip", "-dc", path }).stdout end
	return fs.read(path)
end

-- alias -> module name, from the crypto and lib modules, preferring the generic
-- implementation (a softdep may name an alias: crypto-crc32c)
local function alias_index(idx)
	local index = {}
	for name, path in pairs(idx.files) do
		local rel = path:sub(#idx.mdir + 2)
		if rel:match("^kernel/crypto/") or rel:match("^kernel/arch/x86/crypto/") or rel:match("^kernel/lib/") then
			for _, al in ipairs(M.ko_info(read_ko(path)).aliases) do
				local cur = index[al]
				if not cur or (name:match("_generic$") and not cur:match("_generic$")) then
					index[al] = name
				end
			end
		end
	end
	return index
end

-- Read the wanted modules and everything they depend on: mods = {name = ko_info + soft},
-- contents = {name = .ko bytes}.
local function load_modules(idx, wanted)
	local files, builtin = idx.files, idx.builtin
	local aliases
	local function resolve(a) -- a softdep: a module name or an alias
		local n = a:gsub("-", "_")
		if files[n] or builtin[n] then return n end
		if idx.builtin_alias[a] then return nil end
		aliases = aliases or alias_index(idx)
		return aliases[a]
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
	for _, w in ipairs(wanted) do load_mod(w) end
	return mods, contents
end

-- Unpack the kernel package into kdir and fill tmp (the cache entry being made) with
-- vmlinuz, vmlinux, modules/*.ko and info.json. Returns the info.
local function fill_cache_entry(krec, deb, kdir, tmp)
	local t0 = runtime.now()
	run("unpacking the kernel", { "dpkg-deb", "-x", deb, kdir })
	local release, bz = release_of(kdir, krec)
	common.copy(bz, tmp .. "/vmlinuz")
	log("unpack: %s %s, kernel %s (%s)", krec.Package, krec.Version, release, common.secs(t0))
	t0 = runtime.now()
	local vmlinux = elf.bzimage_to_elf(tmp .. "/vmlinuz", tmp .. "/vmlinux")
	log("vmlinux: %s, %s-compressed in the bzImage (%s)", common.human(vmlinux.size), vmlinux.compression,
		common.secs(t0))
	-- modules: index every .ko, read depends= from each one we need
	local idx = module_index(kdir .. "/lib/modules/" .. release)
	local mods, contents = load_modules(idx, common.MODULES)
	local order, missing = M.module_order(mods, common.MODULES, idx.builtin)
	for _, m in ipairs(missing) do
		if not common.OPTIONAL_MODULES[m] then
			fail("kernel %s has no %s (neither a module nor built in)", release, m)
		end
	end
	for _, m in ipairs(order) do fs.write(tmp .. "/modules/" .. m .. ".ko", contents[m], "644") end
	local info = { release = release, compression = vmlinux.compression, modules = json.array(order),
		package = krec.Package, version = krec.Version, sha256 = krec.SHA256 }
	fs.write(tmp .. "/info.json", json.encode(info, { pretty = true }) .. "\n", "644")
	return info
end

-- The kernel of package record `krec`, extracted once per package file into
-- cache/kernel/KEY/: vmlinuz, vmlinux, modules/*.ko (the ones the initramfs loads) and
-- info.json {release, compression, modules (load order)}. Returns the dir and the info.
local function extract(krec, deb, scratch)
	local cdir = cache_dir() .. "/kernel/" .. M.cache_key(krec)
	local text = fs.read(cdir .. "/info.json")
	if text then
		local ok, info = pcall(json.decode, text)
		if ok and info.release then
			log("unpack: %s %s, kernel %s (cached in %s)", krec.Package, krec.Version, info.release, cdir)
			return cdir, info
		end
	end
	mkdir_p(cache_dir() .. "/kernel", "755")
	local tmp = cache_dir() .. "/kernel/.tmp~" .. M.cache_key(krec) .. "~" .. proc.getpid()
	fs.rm_rf(tmp)
	mkdir_p(tmp .. "/modules", "755")
	local kdir = scratch .. "/kernel"
	mkdir_p(kdir, "755")
	local info = fill_cache_entry(krec, deb, kdir, tmp)
	fs.rm_rf(kdir)
	if not os.rename(tmp, cdir) then -- another build cached it meanwhile
		fs.rm_rf(tmp)
	end
	return cdir, info
end

-- Kernel: vmlinuz and vmlinux into out/, modules into the initramfs tree. Returns info.
function M.build(p, debs, scratch, out, initrd_tree)
	local cdir, info = extract(p.kernel, debs[p.kernel.Package], scratch)
	local t0 = runtime.now()
	for _, f in ipairs({ "vmlinuz", "vmlinux" }) do
		run("copying the kernel", { "cp", "--reflink=auto", "--", cdir .. "/" .. f, out .. "/" .. f })
	end
	mkdir_p(initrd_tree .. "/lib/modules", "755")
	local total = 0
	for _, m in ipairs(info.modules) do
		local ko = cdir .. "/modules/" .. m .. ".ko"
		common.copy(ko, initrd_tree .. "/lib/modules/" .. m .. ".ko")
		total = total + (fs.size(ko) or 0)
	end
	return { release = info.release, compression = info.compression, modules = info.modules, modules_size = total,
		t_modules = t0, cache = cdir }
end

return M
