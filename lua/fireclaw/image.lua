-- fireclaw.image: guest images. Builds the default image from Debian packages only
-- (kernel, initramfs, ext4 rootfs with busybox + dropbear, keys, manifest), imports a
-- user's own kernel and rootfs, lists, shows, loads and removes images.
--
--   image.build{name=, packages={…}, size="64M"|bytes, force=, kernel_package=}
--       -> manifest, built   (built = false when the image was already up to date)
--   image.build{…, base="debian", suite="bookworm"} -> a Debian tree made by mmdebstrap
--       (minbase + packages, maintainer scripts run) with fireclaw's box (/.fireclaw)
--   image.import_oci{name=, oci=PATH, size=, force=} -> manifest: a docker save tarball or an
--       OCI layout, layers applied safely (fireclaw.image.oci), the box injected
--   image.command_line(img, argv, env[, entrypoint]) -> shell line, env: what `run` executes —
--       for an imported OCI image its Entrypoint + (argv or Cmd), Env under env, WorkingDir,
--       User; entrypoint (docker's --entrypoint) replaces Entrypoint and Cmd
--   image.import{name=, kernel=, rootfs=, initrd=, host_key=, boot_args=, cmdline_devices=,
--                net_mode=, no_agent=, force=} -> manifest   (cmdline_devices: the kernel
--                finds virtio-mmio devices on its command line, so Firecracker < 1.8 can boot
--                it; unless no_agent, the agent is written into the copy at
--                /.fireclaw/bin/fireclaw-agent and boots as init=, its init shim)
--   image.load(name) -> manifest + absolute paths: dir, kernel (= vmlinux if there is one),
--       vmlinux, vmlinuz, initrd, rootfs, host_key_pub (path), host_key ("ssh-ed25519 AAAA…"),
--       client_key (private key path), client_key_pub
--   image.info(name) -> manifest;  image.list() -> {{name=, manifest=}…};  image.exists(name)
--   image.remove(name) -> names of the snapshots removed with it;  image.client_key() -> private key path, public key line
--   image.boot_args(img, {tcg=bool}) -> kernel command line string
--   image.default_boot_args(), image.built_boot_args() -> {args…}: an imported image's
--       defaults; an image fireclaw builds gets those plus image.BUILT_BOOT_ARGS
--   image.tsc_khz() -> host TSC kHz (for tsc_early_khz= under TCG) or nil
--   image.prune_cache() -> drop cached .debs/kernels no image was built from
--   pure helpers, tested on their own: parse_size, bzimage_to_elf, ko_info, module_order,
--       elf_info, resolve_depends, parse_records, resolve_in, unpack_into, in_tree
--
-- The steps live in fireclaw.image.*: common (constants, state-dir layout, host
-- commands), packages (apt), unpack (.debs into a tree, contained), elf (bzImage ->
-- vmlinux, ELF dynamic info), kernel (the kernel and its modules, cached), initrd, rootfs,
-- keys, manifest (and the boot arguments), store (images/, atomic replacement, cache
-- pruning), build (build and import). This module is their public face.
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
local common = require "fireclaw.image.common"
local fs = require "fireclaw.fs"
local guest = require "fireclaw.guest"
local keys = require "fireclaw.image.keys"
local manifest = require "fireclaw.image.manifest"
local packages = require "fireclaw.image.packages"
local store = require "fireclaw.image.store"

local M = {}

-- Module `mod`'s function `name`, loaded on the first call: every `run` loads this module
-- (load, boot_args, command_line …) but never builds, so the build and its steps (build,
-- kernel, elf, unpack, initrd, inject, oci, rootfs: ~0.25 ms of CPU) load only when used.
local function lazy(mod, name)
	return function(...)
		return require(mod)[name](...)
	end
end

M.DEBIAN_SUITE = require("fireclaw.image.debian").SUITE

for _, k in ipairs({ "FORMAT", "DEFAULT_SIZE", "KERNEL_PACKAGE", "BASE_PACKAGES", "SFTP_PACKAGE", "MODULES",
	"OPTIONAL_MODULES" }) do
	M[k] = common[k]
end

-- the public API
M.build, M.import = lazy("fireclaw.image.build", "build"), lazy("fireclaw.image.build", "import")
M.import_oci = lazy("fireclaw.image.build", "import_oci")
M.load, M.info, M.list, M.exists, M.remove = store.load, store.info, store.list, store.exists, store.remove
M.prune_cache, M.clean_stale = store.prune_cache, store.clean_stale
M.client_key, M.helper_sha256 = keys.client_key, keys.helper_sha256
M.boot_args, M.default_boot_args, M.tsc_khz = manifest.boot_args, manifest.default_boot_args, manifest.tsc_khz
M.shim_boot_args = manifest.shim_boot_args
M.built_boot_args, M.BUILT_BOOT_ARGS = manifest.built_boot_args, manifest.BUILT_BOOT_ARGS

-- helpers, tested on their own (and used by recipes: human, check_name, parse_size, log)
M.log, M.human, M.check_name, M.parse_size = common.log, common.human, common.check_name, common.parse_size
M.readlink = fs.readlink -- the target of a symlink, or nil if path is not one
M.parse_records, M.resolve_depends = packages.parse_records, packages.resolve_depends
M.le, M.bzimage_to_elf = lazy("fireclaw.image.elf", "le"), lazy("fireclaw.image.elf", "bzimage_to_elf")
M.elf_info = lazy("fireclaw.image.elf", "elf_info")
M.ko_info, M.module_order = lazy("fireclaw.image.kernel", "ko_info"), lazy("fireclaw.image.kernel", "module_order")
M.resolve_in, M.in_tree = lazy("fireclaw.image.unpack", "resolve_in"), lazy("fireclaw.image.unpack", "in_tree")
M.unpack_into = lazy("fireclaw.image.unpack", "unpack_into")

-- The command line `run` executes in `img` for argv (a list; may be empty), and the
-- environment (env: the user's {K = V}, which wins over the image's). An image without a
-- container config runs argv as it is. With one, docker's rules: Entrypoint followed by
-- argv, or by Cmd when argv is empty; Env under the user's; WorkingDir as the directory;
-- User (a name in the image's /etc/passwd, group ignored) through busybox su.
-- entrypoint (a string, docker run --entrypoint): replaces the Entrypoint ("" for none) and
-- drops Cmd.
function M.command_line(img, argv, env, entrypoint)
	local ssh = require "fireclaw.ssh"
	local c = img.container
	if type(c) ~= "table" then
		if entrypoint ~= nil then
			error(string.format("run: --entrypoint is for images imported with --oci; '%s' is not one", img.name), 0)
		end
		if #argv == 0 then error("run: no command given (fireclaw run -- CMD [ARGS…])", 0) end
		return ssh.quote(argv), env
	end
	local full = {}
	if entrypoint ~= nil then
		if type(entrypoint) ~= "string" then error("image.command_line: entrypoint must be a string", 2) end
		if entrypoint ~= "" then full[1] = entrypoint end
		for _, a in ipairs(argv) do full[#full + 1] = a end
	else
		for _, a in ipairs(c.entrypoint or {}) do full[#full + 1] = a end
		for _, a in ipairs(#argv > 0 and argv or c.cmd or {}) do full[#full + 1] = a end
	end
	if #full == 0 then
		error(string.format("run: image '%s' has no Entrypoint or Cmd: give a command (fireclaw run --image %s -- CMD)",
			img.name, img.name), 0)
	end
	local e = {}
	for _, kv in ipairs(c.env or {}) do
		local k, v = kv:match("^([%a_][%w_]*)=(.*)$")
		if k then e[k] = v end
	end
	for k, v in pairs(env or {}) do e[k] = v end
	local line = "exec " .. ssh.quote(full)
	local user = c.user and c.user:match("^([^:]+)")
	if user and user ~= "root" and user ~= "0" then
		local B = guest.BOX
		line = "exec " .. ssh.quote({ B .. "/bin/su", "-p", "-s", B .. "/bin/sh", user, "-c", line })
	end
	if c.working_dir then line = "cd " .. ssh.quote({ c.working_dir }) .. " && " .. line end
	return line, e
end

return M
