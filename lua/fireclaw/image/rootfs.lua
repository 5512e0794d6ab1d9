-- fireclaw.image.rootfs: the guest's ext4 root filesystem — a merged-/usr tree with
-- busybox (and its applets), dropbear, sftp-server and their libraries, the extra packages
-- unpacked whole, the guest helper and guest.rootfs_files, a fresh host key; then
-- mkfs.ext4 -d into out/rootfs.ext4 (sparse, 0600), sized for the tree unless --size says.
local common = require "fireclaw.image.common"
local fs = require "fireclaw.fs"
local guest = require "fireclaw.guest"
local runtime = require "fireclaw.runtime"
local unpack = require "fireclaw.image.unpack"

local fail, human, run = common.fail, common.human, common.run
local in_tree = unpack.in_tree

local M = {}

local MERGED_USR = { { "bin", "usr/bin" }, { "sbin", "usr/sbin" }, { "lib", "usr/lib" }, { "lib64", "usr/lib64" } }

-- Debian 12 layout: merged /usr
local function merged_usr(dir)
	for _, l in ipairs(MERGED_USR) do fs.mkdir_p(dir .. "/" .. l[2], "755") end
	for _, l in ipairs(MERGED_USR) do fs.symlink(l[2], dir .. "/" .. l[1]) end
end

-- The programs the guest runs, with their libraries, and busybox's applets where no
-- package put a real program. Returns the number of applet links.
local function programs(tree, stage)
	local done = {}
	unpack.copy_with_libs(stage, tree, "usr/bin/busybox", done)
	unpack.copy_with_libs(stage, tree, "usr/sbin/dropbear", done)
	unpack.copy_with_libs(stage, tree, "usr/bin/dropbearkey", done)
	unpack.copy_with_libs(stage, tree, "usr/lib/openssh/sftp-server", done)
	local sftp = in_tree(tree, "usr/lib/sftp-server")
	if not fs.exists(sftp) then fs.symlink("openssh/sftp-server", sftp) end
	local applets = run("listing busybox applets", { stage .. "/usr/bin/busybox", "--list-full" }).stdout
	local nlinks = 0
	for rel in applets:gmatch("[^\n]+") do
		local dst = in_tree(tree, rel)
		if rel ~= "bin/busybox" and rel ~= "usr/bin/busybox" and not fs.exists(dst) then
			fs.mkdir_p(dst:match("^(.*)/"), "755")
			fs.symlink("/bin/busybox", dst)
			nlinks = nlinks + 1
		end
	end
	return nlinks
end

-- fireclaw's own files in the guest (helper, rootfs_files, the host key, whose public
-- half goes to out/host_key.pub so the host can pin it), and the ld.so cache.
local function guest_files(tree, out, client_pub)
	for _, d in ipairs(guest.rootfs_dirs) do fs.mkdir_p(in_tree(tree, d[1], true), d[2]) end
	local var_run = in_tree(tree, "var/run")
	if not fs.exists(var_run) then fs.symlink("/run", var_run) end
	-- fireclaw's programs (the reseed + clock helper), compiled into fireclaw
	for _, f in ipairs(guest.programs()) do fs.write(in_tree(tree, f.path), f.content, f.mode) end
	for _, f in ipairs(guest.rootfs_files({ authorized_keys = client_pub .. "\n" })) do
		local path = in_tree(tree, f.path)
		fs.mkdir_p(path:match("^(.*)/"), nil)
		os.remove(path)
		fs.write(path, f.content, f.mode)
	end
	local hk = in_tree(tree, "etc/dropbear/dropbear_ed25519_host_key")
	os.remove(hk)
	run("making the host key", { "dropbearkey", "-t", "ed25519", "-f", hk })
	fs.chmod(hk, "600")
	local pub = run("reading the host key", { "dropbearkey", "-y", "-f", hk }).stdout:match("(ssh%-ed25519 %S+)")
	if not pub then fail("dropbearkey -y printed no ssh-ed25519 line") end
	fs.write(out .. "/host_key.pub", pub .. "\n", "644")
	fs.mkdir_p(in_tree(tree, "var/cache/ldconfig", true), "700")
	run("running ldconfig for the rootfs", { "ldconfig", "-r", tree })
	fs.chmod(tree, "755")
end

-- The image size: what the tree needs (+ room for users), or what was asked for.
local function image_size(used, asked)
	local size = asked and common.parse_size(asked)
	if not size then
		local want = used * 1.5 + 32 * 2 ^ 20
		size = common.DEFAULT_SIZE
		while size < want do size = size * 2 end
	end
	if size < used + 8 * 2 ^ 20 then
		fail("the rootfs needs about %s but --size is %s: give a larger --size (e.g. %dM)", human(used + 8 * 2 ^ 20),
			human(size), math.ceil((used * 1.5 + 32 * 2 ^ 20) / 2 ^ 20))
	end
	return size
end

-- mkfs.ext4 -d tree into out/rootfs.ext4. Returns {used=, files=, size=}.
function M.make_ext4(tree, out, asked)
	local du = run("measuring the rootfs tree", { "du", "-s", "-B1", "--apparent-size", tree }).stdout
	local used = tonumber(du:match("^(%d+)"))
	local nfiles = 0
	for _ in run("counting files", { "find", tree }).stdout:gmatch("\n") do nfiles = nfiles + 1 end
	local size = image_size(used, asked)
	local inodes = math.max(8192, nfiles * 2)
	local img = out .. "/rootfs.ext4"
	run("making the rootfs file", { "truncate", "-s", tostring(size), img })
	fs.chmod(img, "600") -- before mkfs writes the guest's private host key into it
	local r = common.try_run({ "mkfs.ext4", "-q", "-F", "-b", "4096", "-N", tostring(inodes), "-L", "fireclaw-root",
		"-d", tree, img })
	if r.status ~= 0 then
		local text = r.stderr .. r.stdout
		if text:find("Could not allocate block") or text:find("No free space") or text:find("inode") then
			fail("the rootfs tree (%s, %d files) does not fit in %s: give a larger --size", human(used), nfiles, human(size))
		end
		if text:find(common.NOSPACE, 1, true) then fail("no space left on device while writing %s", img) end
		fail("mkfs.ext4 -d %s failed: %s", tree, (text:match("[^\n]+") or "?"))
	end
	return { used = used, files = nfiles, size = size }
end

-- The base packages (busybox-static, dropbear-bin) and sftp-server unpacked into a fresh
-- merged-/usr directory scratch/stage, whose files are copied into images from there.
function M.stage(p, debs, scratch)
	local stage = scratch .. "/stage"
	fs.mkdir_p(stage, "755")
	merged_usr(stage)
	for _, rec in ipairs(p.base) do unpack.unpack_into(debs[rec.Package], stage) end
	unpack.unpack_into(debs[p.sftp.Package], stage)
	return stage
end

-- Build out/rootfs.ext4 and out/host_key.pub from the plan's packages.
-- Returns {used=, files=, size=, applets=, t0=}.
function M.build(p, debs, scratch, out, opts)
	local t0 = runtime.now()
	local tree = scratch .. "/rootfs"
	fs.mkdir_p(tree, "755")
	merged_usr(tree)
	-- extra packages: unpacked whole into the tree (no maintainer scripts run)
	for _, rec in ipairs(p.extra) do unpack.unpack_into(debs[rec.Package], tree) end
	-- base packages: unpacked aside, then only what the guest needs is copied
	local stage = M.stage(p, debs, scratch)
	local nlinks = programs(tree, stage)
	guest_files(tree, out, opts.client_pub)
	local r = M.make_ext4(tree, out, opts.size)
	r.applets, r.t0 = nlinks, t0
	return r
end

return M
