-- fireclaw.image.inject: fireclaw's guest side written into a root filesystem tree whose
-- userland is not fireclaw's (a Debian tree from mmdebstrap, an imported OCI image), so
-- that the guest boots, answers SSH and is reseeded without the image's shell or libc:
--
--   /.fireclaw/bin/busybox (static) and its applets, /.fireclaw/init (guest.box_init)
--   /.fireclaw/sbin/dropbear, /.fireclaw/lib/sftp-server, their libraries and their own
--       ELF loader in /.fireclaw/lib (run as `loader --library-path /.fireclaw/lib prog`)
--   /.fireclaw/etc/dropbear_ed25519_host_key (new; its public half -> out/host_key.pub)
--   guest.programs() at their paths (the reseed helper; the agent when it lands)
--   root's login: its passwd entry keeps the image's shell when the tree has it, else
--       /bin/sh, else /.fireclaw/bin/sh; /etc/shells lists it; a locked shadow entry ('!')
--       becomes '*' (dropbear refuses key logins to locked accounts); the client key in
--       ~root/.ssh/authorized_keys; /usr/lib/sftp-server (dropbear runs that path) if the
--       tree has none: a script that runs fireclaw's sftp-server
--
-- Every path is resolved inside the tree (unpack.in_tree): an image's symlinks cannot make
-- the injection write outside it, and a last component that is a symlink is replaced.
local common = require "fireclaw.image.common"
local elf = require "fireclaw.image.elf"
local fs = require "fireclaw.fs"
local guest = require "fireclaw.guest"
local unpack = require "fireclaw.image.unpack"

local fail, run = common.fail, common.run
local in_tree, resolve_in, stage_file = unpack.in_tree, unpack.resolve_in, unpack.stage_file

local M = {}

-- A file of the tree at `rel` (parents resolved inside it), replacing what is there.
local function put(tree, rel, content, mode)
	local path = in_tree(tree, rel)
	fs.mkdir_p(path:match("^(.*)/"), "755")
	fs.rm_rf(path)
	fs.write(path, content, mode)
	return path
end

-- Copy the ELF `rel` of stage to dst, and its libraries and loader (flat) into libdir.
-- Returns the loader's file name.
local function copy_closure(stage, rel, dst, libdir, done)
	local src = stage_file(stage, rel)
	local data = src and fs.read(src)
	if not data then fail("%s is missing from the unpacked packages", rel) end
	if not fs.exists(dst) then common.copy(src, dst) end
	local info = elf.elf_info(data)
	if not info then return nil end
	local loader
	if info.interp then
		loader = info.interp:match("[^/]+$")
		if not done[loader] then
			done[loader] = true
			copy_closure(stage, info.interp:gsub("^/", ""), libdir .. "/" .. loader, libdir, done)
		end
	end
	for _, lib in ipairs(info.needed) do
		if not done[lib] then
			done[lib] = true
			copy_closure(stage, unpack.find_lib(stage, lib, rel), libdir .. "/" .. lib, libdir, done)
		end
	end
	return loader
end

-- /.fireclaw: busybox with its applets, dropbear, sftp-server, libraries, loader, init.
local function box(tree, stage)
	local B = tree .. guest.BOX
	fs.rm_rf(B) -- whatever the image had there (a symlink is removed, not followed)
	for _, d in ipairs({ "", "/bin", "/sbin", "/lib", "/etc" }) do fs.mkdir_p(B .. d, d == "/etc" and "700" or "755") end
	common.copy(stage_file(stage, "usr/bin/busybox") or fail("busybox is missing from the packages"), B .. "/bin/busybox")
	fs.chmod(B .. "/bin/busybox", "755")
	local applets = run("listing busybox applets", { B .. "/bin/busybox", "--list" }).stdout
	for a in applets:gmatch("[^\n]+") do
		if a ~= "busybox" and a:match("^[%w._-]+$") then fs.symlink("busybox", B .. "/bin/" .. a) end
	end
	local done = {}
	local loader = copy_closure(stage, "usr/sbin/dropbear", B .. "/sbin/dropbear", B .. "/lib", done)
	copy_closure(stage, "usr/lib/openssh/sftp-server", B .. "/lib/sftp-server", B .. "/lib", done)
	if not loader then fail("dropbear has no ELF interpreter: cannot run it from /.fireclaw") end
	fs.write(B .. "/init", guest.box_init(loader), "755")
	return loader
end

-- The guest's host key, made now; its public half goes to out/host_key.pub.
local function host_key(tree, out)
	local hk = tree .. guest.BOX .. "/etc/dropbear_ed25519_host_key"
	run("making the host key", { "dropbearkey", "-t", "ed25519", "-f", hk })
	fs.chmod(hk, "600")
	local pub = run("reading the host key", { "dropbearkey", "-y", "-f", hk }).stdout:match("(ssh%-ed25519 %S+)")
	if not pub then fail("dropbearkey -y printed no ssh-ed25519 line") end
	fs.write(out .. "/host_key.pub", pub .. "\n", "644")
end

-- The tree's regular file `rel` (resolved inside it), or nil.
local function read_in(tree, rel)
	local path = tree .. "/" .. resolve_in(tree, rel)
	if fs.is_dir(path) then return nil end
	return fs.read(path)
end

local function usable_shell(tree, sh)
	if not sh or sh == "" or sh:match("nologin$") or sh:match("/false$") then return false end
	local path = tree .. "/" .. resolve_in(tree, sh)
	return fs.exists(path) and not fs.is_dir(path)
end

-- root's login for dropbear: passwd, shadow, shells, home and the client key. Returns the shell.
local function root_login(tree, client_pub)
	local passwd = read_in(tree, "etc/passwd") or ""
	local lines, shell, home = {}, nil, "/root"
	for line in passwd:gmatch("[^\n]+") do
		local f = {}
		for x in (line .. ":"):gmatch("([^:]*):") do f[#f + 1] = x end
		if f[1] == "root" and not shell then
			home = (f[6] and f[6]:match("^/")) and f[6] or "/root"
			shell = usable_shell(tree, f[7]) and f[7] or nil
			line = nil
		end
		if line then lines[#lines + 1] = line end
	end
	shell = shell or (usable_shell(tree, "/bin/sh") and "/bin/sh") or (guest.BOX .. "/bin/sh")
	table.insert(lines, 1, string.format("root:x:0:0:root:%s:%s", home, shell))
	put(tree, "etc/passwd", table.concat(lines, "\n") .. "\n", "644")
	local shadow = read_in(tree, "etc/shadow")
	if shadow then
		local out, seen = {}, false
		for line in shadow:gmatch("[^\n]+") do
			if line:match("^root:") then
				seen = true
				line = line:gsub("^root:[^:]*", "root:*")
			end
			out[#out + 1] = line
		end
		if not seen then table.insert(out, 1, "root:*:19000:0:99999:7:::") end
		put(tree, "etc/shadow", table.concat(out, "\n") .. "\n", "600")
	end
	local shells = read_in(tree, "etc/shells") or ""
	if not ("\n" .. shells):find("\n" .. shell .. "\n", 1, true) then
		put(tree, "etc/shells", shells .. (shells:match("\n$") or shells == "" and "" or "\n") .. shell .. "\n", "644")
	end
	local h = in_tree(tree, home:sub(2), true)
	fs.mkdir_p(h, "700")
	fs.rm_rf(h .. "/.ssh")
	fs.mkdir_p(h .. "/.ssh", "700")
	fs.write(h .. "/.ssh/authorized_keys", client_pub .. "\n", "600")
	return shell
end

-- Write fireclaw's guest side into `tree` (stage: the unpacked busybox-static, dropbear-bin
-- and openssh-sftp-server). Returns {shell=, loader=}.
function M.into(tree, stage, out, client_pub)
	for _, d in ipairs({ { "dev", "755" }, { "proc", "555" }, { "sys", "555" }, { "run", "755" }, { "tmp", "1777" } }) do
		local p = in_tree(tree, d[1], true)
		if not fs.is_dir(p) then
			fs.rm_rf(p)
			fs.mkdir_p(p, d[2])
		end
	end
	local loader = box(tree, stage)
	host_key(tree, out)
	for _, f in ipairs(guest.programs()) do put(tree, f.path, f.content, f.mode) end
	local shell = root_login(tree, client_pub)
	if not fs.exists(in_tree(tree, "usr/lib/sftp-server")) and not fs.readlink(in_tree(tree, "usr/lib/sftp-server")) then
		put(tree, "usr/lib/sftp-server", string.format("#!%s/bin/sh\nexec %s/lib/%s --library-path %s/lib %s/lib/sftp-server \"$@\"\n",
			guest.BOX, guest.BOX, loader, guest.BOX, guest.BOX), "755")
	end
	fs.chmod(tree, "755")
	return { shell = shell, loader = loader }
end

-- ---- the agent alone, into an imported ext4 image (image import --kernel/--rootfs) ----

-- What is at `path` of the open image: nil (nothing), "dir", "file", "symlink", …
local function kind(img, path)
	if not img:exists(path) then return nil end
	return img:stat(path).type
end

-- Write guest.agent() at guest.BOX_AGENT of the ext4 image `path` (our copy of the user's
-- rootfs) with fireclaw's ext4 writer: no mount, nothing of the image run. /.fireclaw is
-- fireclaw's name in any image; it may be absent or a real directory, never a symlink or a
-- file (the image is the user's: its links are not followed, its files not replaced), and
-- only the agent's own file in it is replaced. Raises one line naming what is in the way.
function M.agent_ext4(path)
	local opened, img = pcall(require("fireclaw.rootfs").open, path, "rw")
	if not opened then
		fail("cannot write the agent into the rootfs: %s (import with --no-agent to leave it as it is)",
			(tostring(img):gsub("\n.*", "")))
	end
	local ok, err = pcall(function()
		local bin = guest.BOX_AGENT:match("^(.*)/")
		for _, p in ipairs({ guest.BOX, bin, guest.BOX_AGENT }) do
			local k = kind(img, p)
			local want = p == guest.BOX_AGENT and "file" or "dir"
			if k and k ~= want then
				fail("the rootfs has %s as a %s, not a %s: fireclaw puts its agent at %s (move it away, or import "
					.. "with --no-agent)", p, k, want == "dir" and "directory" or "file", guest.BOX_AGENT)
			end
		end
		img:mkdir(bin, { mode = "0755" })
		img:write(guest.BOX_AGENT, guest.agent(), { mode = "0755" })
	end)
	img:close()
	if not ok then error(err, 0) end
end

return M
