-- fireclaw.image.build: image.build (the default image from Debian packages, step by
-- step: plan, download, kernel, initrd, rootfs, manifest, install) and image.import (a
-- user's own kernel and rootfs). See fireclaw.image for the options.
local common = require "fireclaw.image.common"
local config = require "fireclaw.config"
local debian = require "fireclaw.image.debian"
local elf = require "fireclaw.image.elf"
local fs = require "fireclaw.fs"
local guest = require "fireclaw.guest"
local initrd = require "fireclaw.image.initrd"
local inject = require "fireclaw.image.inject"
local json = require "fireclaw.json"
local kernel = require "fireclaw.image.kernel"
local keys = require "fireclaw.image.keys"
local manifest = require "fireclaw.image.manifest"
local oci = require "fireclaw.image.oci"
local opts_check = require "fireclaw.opts"
local packages = require "fireclaw.image.packages"
local proc = require "fireclaw.proc"
local rootfs = require "fireclaw.image.rootfs"
local runtime = require "fireclaw.runtime"
local store = require "fireclaw.image.store"

local fail, log, human, secs = common.fail, common.log, common.human, common.secs
local images_dir, mkdir_p = common.images_dir, common.mkdir_p

local M = {}

local function pv(list)
	local o = {}
	for _, r in ipairs(list) do o[#o + 1] = r.Package .. "=" .. r.Version end
	return o
end

-- The fingerprint of a build's inputs: the same fingerprint, the same image (existing
-- images and their snapshots stay valid while it does not change).
local function fingerprint(p, opts)
	local requested = {}
	for _, n in ipairs(opts.packages or {}) do requested[#requested + 1] = n end
	table.sort(requested)
	local inputs = json.encode({
		format = common.FORMAT, guest = guest.VERSION, helper = keys.helper_sha256(), agent = keys.agent_sha256(),
		init = keys.init_sha256(),
		guest_files = common.sha256_of("hashing",
			json.encode(guest.rootfs_files({ authorized_keys = opts.client_pub })) ..
			(opts.tree and guest.box_init("ld.so") or "")), -- (the busybox image's inputs as before)
		kernel = p.kernel.Package .. "=" .. p.kernel.Version,
		base = pv(p.base), sftp = p.sftp.Package .. "=" .. p.sftp.Version, extra = pv(p.extra),
		requested = requested, size = opts.size and common.parse_size(opts.size) or "auto",
		boot_args = manifest.built_boot_args(), modules = common.MODULES,
		client_key = opts.client_pub, debian = opts.debian,
		oci = opts.oci and { opts.oci.config_digest, opts.oci.manifest_digest or false },
	})
	return common.sha256_of("hashing", inputs)
end

-- The plan: every package with its candidate record, and the fingerprint of the inputs.
local function plan(opts)
	local kmeta = opts.kernel_package or common.KERNEL_PACKAGE
	local want = { kmeta }
	for _, p in ipairs(common.BASE_PACKAGES) do want[#want + 1] = p end
	want[#want + 1] = common.SFTP_PACKAGE
	local recs = packages.show(want)
	-- the metapackage depends on the real, versioned kernel package
	local kpkg = kmeta
	if not kmeta:match("^linux%-image%-%d") then
		for _, d in ipairs(packages.depends_names(recs[kmeta].Depends)) do
			if d:match("^linux%-image%-%d") then kpkg = d break end
		end
	end
	local base = packages.closure(common.BASE_PACKAGES)
	local need = { kpkg }
	for _, p in ipairs(base) do need[#need + 1] = p end
	local extra = {}
	if opts.packages and #opts.packages > 0 and not opts.debian then
		packages.show(opts.packages) -- clear error for an unknown name
		extra = packages.closure(opts.packages)
		for _, p in ipairs(extra) do need[#need + 1] = p end
	end
	local more = packages.show(need)
	for k, v in pairs(more) do recs[k] = v end
	local p = { kernel_meta = kmeta, kernel = recs[kpkg], base = {}, extra = {}, recs = recs,
		sftp = recs[common.SFTP_PACKAGE] }
	for _, n in ipairs(base) do p.base[#p.base + 1] = recs[n] end
	for _, n in ipairs(extra) do p.extra[#p.extra + 1] = recs[n] end
	p.fingerprint = fingerprint(p, opts)
	return p
end

local function up_to_date(name, fp)
	local ok, m, dir = pcall(store.info, name)
	if not ok or m.inputs ~= fp then return nil end
	for file, f in pairs(m.files or {}) do
		if fs.size(dir .. "/" .. file) ~= f.size then return nil end
	end
	return m
end

-- Every package of the plan once: kernel, sftp, base, extra.
local function all_packages(p)
	local all, seen = {}, {}
	for _, list in ipairs({ { p.kernel, p.sftp }, p.base, p.extra }) do
		for _, r in ipairs(list) do
			if not seen[r.Package] then all[#all + 1] = r end
			seen[r.Package] = true
		end
	end
	return all
end

-- The steps of a build in work/, ending with the image installed. Returns the manifest.
local function steps(name, p, opts, work, T0)
	local out, scratch = work .. "/out", work .. "/scratch"
	mkdir_p(out, "755")
	mkdir_p(scratch, "755")
	local debs = packages.download(all_packages(p))
	local itree = scratch .. "/initrd"
	local k = kernel.build(p, debs, scratch, out, itree)
	local isize = initrd.build(itree, k.modules, out)
	log("initrd: %s, %d modules %s (%s)", human(isize), #k.modules, table.concat(k.modules, ","),
		secs(k.t_modules))
	local rf
	if opts.tree then
		-- a userland that is not fireclaw's (Debian, an OCI image) with fireclaw's box in it
		local t0 = runtime.now()
		local tree = scratch .. "/rootfs"
		rf = { base = opts.tree(tree, scratch) }
		rf.box = inject.into(tree, rootfs.stage(p, debs, scratch), out, opts.client_pub)
		for key, v in pairs(rootfs.make_ext4(tree, out, opts.size)) do rf[key] = v end
		rf.t0 = t0
		log("rootfs: %s ext4 (sparse), tree %s in %d files, root's shell %s (%s)", human(rf.size), human(rf.used),
			rf.files, rf.box.shell, secs(t0))
	else
		rf = rootfs.build(p, debs, scratch, out, opts)
		log("rootfs: %s ext4 (sparse), tree %s in %d files, %d busybox applets%s (%s)", human(rf.size), human(rf.used),
			rf.files, rf.applets, #p.extra > 0 and string.format(", %d extra packages", #p.extra) or "", secs(rf.t0))
	end
	log("keys: client %s, host key ed25519 pinned in host_key.pub", opts.client_key)
	fs.rm_rf(scratch)
	local files = common.file_records(out, manifest.FILES)
	local m = manifest.built({ name = name, plan = p, kernel = k, rootfs = rf, files = files,
		requested = opts.packages, cache = kernel.cache_key(p.kernel), t0 = T0, debian = opts.debian,
		oci = opts.oci })
	fs.write(out .. "/manifest.json", json.encode(m, { pretty = true }) .. "\n", "644")
	local final = store.install(name, out)
	fs.rm_rf(work)
	store.prune_cache()
	local total, alloc = 0, 0
	for _, f in pairs(files) do
		total = total + f.size
		alloc = alloc + f.allocated
	end
	m.build_seconds = math.floor((runtime.now() - T0) * 10 + 0.5) / 10
	log("'%s' ready in %s: %s (%s allocated), built in %.1f s", name, images_dir() .. "/" .. name,
		human(total), human(alloc), m.build_seconds)
	return m, final
end

-- Run fn(work) in a fresh work directory of image `name` (images/.tmp~NAME~PID); the
-- directory is discarded when fn raises (store.install moves it into place on success).
local function in_work_dir(name, fn)
	local work = images_dir() .. "/.tmp~" .. name .. "~" .. proc.getpid()
	fs.rm_rf(work)
	mkdir_p(work, "755")
	local ok, res = pcall(fn, work)
	if not ok then
		store.discard(work)
		error(res, 0)
	end
	return res
end

-- Build image opts.name (default "default"). See fireclaw.image.
function M.build(opts)
	opts = opts_check.check("image.build", opts, { "name", "packages", "size", "force", "kernel_package", "base",
		"suite" })
	local o = {}
	for k, v in pairs(opts) do o[k] = v end
	opts = o -- the caller's table stays as it was (client_pub is added below)
	local T0 = runtime.now()
	local name = common.check_name(opts.name or config.image)
	if not common.is_root() then
		fail("building an image needs root (the rootfs files must belong to root and apt must fetch); run it as root or with sudo")
	end
	mkdir_p(images_dir(), "755")
	store.clean_stale()
	opts.client_key, opts.client_pub = keys.client_key()
	local base = opts.base or "busybox"
	if base == "debian" then
		opts.debian = debian.inputs(opts)
		opts.tree = function(tree, scratch) return debian.tree(opts.debian, tree, opts.force, scratch) end
	elseif base ~= "busybox" then
		fail("unknown base '%s' (busybox, the small default, or debian)", tostring(base))
	elseif opts.suite then
		fail("--suite goes with --base debian")
	end
	local p = plan(opts)
	if not opts.force then
		local ok, old = pcall(store.info, name)
		if ok and (old.source == "import" or old.source == "oci") then
			fail("image '%s' was imported, not built: --force replaces it (or give another --name)", name)
		end
		local m = up_to_date(name, p.fingerprint)
		if m then
			-- images built before the rootfs was made 0600 (it holds the guest's host key)
			pcall(fs.chmod, images_dir() .. "/" .. name .. "/rootfs.ext4", "600")
			log("'%s' is up to date (%s %s, built %s): nothing to do (--force rebuilds)", name,
				m.kernel_info and m.kernel_info.package or "?", m.kernel_info and m.kernel_info.version or "", m.created or "?")
			return m, false
		end
	end
	return in_work_dir(name, function(work) return steps(name, p, opts, work, T0) end), true
end

-- The kernel (and its vmlinux, when it is a bzImage), rootfs, initrd and host key of an
-- import, copied into out. Returns the kernel's compression (nil for an ELF).
local function import_files(opts, kernel_format, host_key, out)
	local compression
	if kernel_format == "elf" then
		common.copy(opts.kernel, out .. "/vmlinux")
	else
		common.copy(opts.kernel, out .. "/vmlinuz")
		local ok2, e = pcall(elf.bzimage_to_elf, out .. "/vmlinuz", out .. "/vmlinux")
		if ok2 then compression = e.compression else log("import: no vmlinux: %s", tostring(e)) end
	end
	common.run("copying the rootfs", { "cp", "--reflink=auto", "--sparse=always", "--", opts.rootfs,
		out .. "/rootfs.ext4" })
	fs.chmod(out .. "/rootfs.ext4", "600") -- it may hold keys (the guest's host key)
	if opts.initrd then common.copy(opts.initrd, out .. "/initrd") end
	-- cp keeps a 0600 source's mode: the VMM, which runs as a user of its own, reads
	-- the kernel and initrd by name (they hold no secret; the rootfs stays 0600)
	for _, n in ipairs({ "vmlinux", "vmlinuz", "initrd" }) do
		if fs.exists(out .. "/" .. n) then fs.chmod(out .. "/" .. n, "644") end
	end
	if host_key then fs.write(out .. "/host_key.pub", host_key .. "\n", "644") end
	return compression
end

-- What import is given, checked before anything is written. Returns the kernel's format
-- and the host key line.
local function check_import(name, opts)
	if not opts.kernel or not opts.rootfs then fail("import needs a kernel and a rootfs") end
	for _, k in ipairs({ "kernel", "rootfs", "initrd", "host_key" }) do
		if opts[k] and not fs.exists(opts[k]) then fail("no such file: %s (--%s)", opts[k], k:gsub("_", "-")) end
	end
	if store.exists(name) and not opts.force then
		fail("an image named '%s' exists (fireclaw image rm %s, or --force to replace it)", name, name)
	end
	local kernel_format = elf.kernel_kind(opts.kernel)
	if not kernel_format then fail("%s is neither an ELF vmlinux nor a bzImage", opts.kernel) end
	local host_key
	if opts.host_key then
		host_key = (fs.read(opts.host_key) or ""):match("(ssh%-[%w-]+ [A-Za-z0-9+/=]+)")
		if not host_key then fail("%s holds no public key line (ssh-ed25519 AAAA…)", opts.host_key) end
	end
	return kernel_format, host_key
end

-- Register a user's own kernel (ELF vmlinux or bzImage) and ext4 rootfs as image `name`.
function M.import(opts)
	opts = opts_check.check("image.import", opts,
		{ "name", "kernel", "rootfs", "initrd", "host_key", "boot_args", "force", "cmdline_devices", "net_mode",
			"no_agent" })
	if opts.net_mode ~= nil and opts.net_mode ~= "none" and opts.net_mode ~= "nat" then
		error(string.format("image: import: net_mode must be none or nat, got '%s'", tostring(opts.net_mode)), 0)
	end
	local T0 = runtime.now()
	local name = common.check_name(opts.name)
	local kernel_format, host_key = check_import(name, opts)
	mkdir_p(images_dir(), "755")
	store.clean_stale()
	return in_work_dir(name, function(work)
		local out = work .. "/out"
		mkdir_p(out, "755")
		local compression = import_files(opts, kernel_format, host_key, out)
		-- the agent, into our copy (the user's file is only read): its init shim is init=
		if not opts.no_agent then inject.agent_ext4(out .. "/rootfs.ext4") end
		local names = {}
		for _, n in ipairs(manifest.FILES) do
			if fs.exists(out .. "/" .. n) then names[#names + 1] = n end
		end
		local m = manifest.imported(name, opts, { compression = compression, format = kernel_format },
			common.file_records(out, names))
		fs.write(out .. "/manifest.json", json.encode(m, { pretty = true }) .. "\n", "644")
		store.install(name, out)
		fs.rm_rf(work)
		log("imported '%s' (%s kernel%s, %s) in %s", name, kernel_format, opts.initrd and ", initrd" or "",
			opts.no_agent and "no agent: SSH only" or "the agent at " .. guest.BOX_AGENT, secs(T0))
		return m
	end)
end

-- Import a container image (docker save tarball or OCI layout: fireclaw.image.oci) as
-- image opts.name: its layers as the root filesystem, with fireclaw's box injected, the
-- default image's kernel and initramfs, and its config's Entrypoint/Cmd/Env/WorkingDir/User
-- in the manifest's `container`.
function M.import_oci(opts)
	opts = opts_check.check("image.import_oci", opts, { "name", "oci", "size", "force", "kernel_package" })
	local T0 = runtime.now()
	local name = common.check_name(opts.name)
	if type(opts.oci) ~= "string" then fail("import --oci needs the path of a docker save tarball or an OCI layout") end
	if not common.is_root() then fail("importing an image needs root (its files must keep their owners); run it as root or with sudo") end
	if store.exists(name) and not opts.force then
		fail("an image named '%s' exists (fireclaw image rm %s, or --force to replace it)", name, name)
	end
	local o = { name = name, size = opts.size, kernel_package = opts.kernel_package }
	mkdir_p(images_dir(), "755")
	store.clean_stale()
	o.client_key, o.client_pub = keys.client_key()
	return in_work_dir(name, function(work)
		local src = oci.open(opts.oci, work)
		log("import: %s (%s, %d layers, config %s)", opts.oci, src.format, #src.layers, src.config_digest)
		o.oci = src
		o.tree = function(tree)
			local t = oci.tree(src, tree)
			fs.rm_rf(work .. "/src")
			return t
		end
		return steps(name, plan(o), o, work, T0)
	end)
end

return M
