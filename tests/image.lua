-- fireclaw.image and `fireclaw image`: pure helpers, errors, the default image (built once
-- in $FIRECLAW_STATE, default /var/lib/fireclaw, and cached for the other VM tests), its
-- manifest and contents, import/list/info/rm, and a real boot under QEMU microvm (TCG or
-- KVM) in a test network namespace, reached over SSH with the pinned host key.
-- Everything the test creates (namespaces fct-img-*, QEMU by pid, temp dirs and temp
-- images) is removed even when a check fails. FIRECLAW_TEST_SKIP_VM=1 skips the boot.
local t = require "tap"
local image = require "fireclaw.image"
local config = require "fireclaw.config"
local fs = require "fireclaw.fs"
local json = require "fireclaw.json"
local proc = require "fireclaw.proc"
local runtime = require "fireclaw.runtime"
local sys = require "fireclaw.sys"

local PID = proc.getpid()
local FIRECLAW -- set below: a copy of the binary running this test
local is_root = sys.geteuid() == 0

local cleanups = {}
local function defer(fn) table.insert(cleanups, 1, fn) end
local function cleanup_all()
	for _, fn in ipairs(cleanups) do
		local ok, err = pcall(fn)
		if not ok then t.diag("cleanup: " .. tostring(err)) end
	end
	cleanups = {}
end

local function read(path)
	local f = io.open(path, "rb")
	if not f then return nil end
	local s = f:read("*a")
	f:close()
	return s
end

local function write(path, s)
	local f = assert(io.open(path, "wb"))
	f:write(s)
	f:close()
end

local function sh(cmd, opts)
	return proc.run({ "/bin/sh", "-c", cmd }, opts)
end

local function q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

-- fireclaw image ARGS… with extra environment
local function fc(args, env)
	local argv = { FIRECLAW, "image" }
	for _, a in ipairs(args) do argv[#argv + 1] = a end
	return proc.run(argv, { env = env, timeout = 900 })
end

local tmp = sh("mktemp -d /tmp/fct-img.XXXXXX").stdout:gsub("%s+$", "")
defer(function() proc.run({ "rm", "-rf", "--one-file-system", tmp }) end)
sh("chmod 755 " .. q(tmp))

-- the fireclaw running this test, copied: others may rebuild ./fireclaw meanwhile
FIRECLAW = tmp .. "/fireclaw"
proc.run({ "cp", "/proc/" .. PID .. "/exe", FIRECLAW })

-- ---- pure helpers ----

local function test_helpers()
	t.is(image.parse_size("64M"), 64 * 2 ^ 20, "parse_size 64M")
	t.is(image.parse_size("1G"), 2 ^ 30, "parse_size 1G")
	t.is(image.parse_size("1.5g"), 1.5 * 2 ^ 30, "parse_size 1.5g")
	t.is(image.parse_size("512KiB"), 512 * 1024, "parse_size 512KiB")
	t.is(image.parse_size("4096"), 4096, "parse_size plain bytes")
	t.raises(function() image.parse_size("lots") end, "bad size 'lots'", "parse_size rejects junk")

	local ko = image.ko_info("junk\0license=GPL\0depends=virtio_ring,foo\0name=virtio\0vermagic=6.1 SMP\0")
	t.same(ko.depends, { "virtio_ring", "foo" }, "ko_info: depends")
	t.is(ko.name, "virtio", "ko_info: name")
	t.same(image.ko_info("\0depends=\0name=x\0").depends, {}, "ko_info: no depends")
	ko = image.ko_info("\0alias=fs-ext4\0softdep=pre: crypto-crc32c post: foo\0alias=ext3\0depends=jbd2,mbcache\0")
	t.same(ko.softpre, { "crypto-crc32c" }, "ko_info: softdep pre")
	t.same(ko.aliases, { "fs-ext4", "ext3" }, "ko_info: aliases")

	local mods = {
		virtio_ring = { depends = {} }, virtio = { depends = { "virtio_ring" } },
		virtio_mmio = { depends = { "virtio", "virtio_ring" } }, virtio_blk = { depends = { "virtio" } },
		failover = { depends = {} }, net_failover = { depends = { "failover" } },
		virtio_net = { depends = { "net_failover", "virtio", "virtio_ring" } },
	}
	local order, missing = image.module_order(mods, { "virtio_mmio", "virtio_blk", "virtio_net", "vsockx" })
	t.same(order, { "virtio_ring", "virtio", "virtio_mmio", "virtio_blk", "failover", "net_failover", "virtio_net" },
		"module_order: dependencies first, in the docs/guest-notes.md order")
	t.same(missing, { "vsockx" }, "module_order: missing modules reported")
	order = image.module_order(mods, { "virtio_blk" }, { virtio = true })
	t.same(order, { "virtio_blk" }, "module_order: built-in modules are skipped")
	order, missing = image.module_order({ ext4 = { depends = { "jbd2" }, soft = { "crc32c_generic", "gone" } },
		jbd2 = { depends = {} }, crc32c_generic = { depends = {} } }, { "ext4" })
	t.same(order, { "jbd2", "crc32c_generic", "ext4" }, "module_order: soft dependencies first when present")
	t.same(missing, {}, "module_order: a missing soft dependency is not an error")

	local deps = table.concat({
		"app",
		"  Depends: libc6",
		" |Depends: media-types",
		"  Depends: mime-support",
		"  PreDepends: <debconf-2.0>",
		"    cdebconf",
		"    debconf",
		"  Depends: libssl3",
		"libc6",
		"  Depends: libgcc-s1",
		"media-types",
		"mime-support",
		"  Depends: media-types",
		"<debconf-2.0>",
		"cdebconf",
		"  Depends: libnewt",
		"debconf",
		"libnewt",
		"libgcc-s1",
		"libssl3",
		"  Depends: libc6",
	}, "\n") .. "\n"
	t.same(image.resolve_depends(deps, { "app" }), { "app", "cdebconf", "libc6", "libgcc-s1", "libnewt", "libssl3",
		"media-types" }, "resolve_depends: one alternative, first provider of a virtual, recursion")
	t.same(image.resolve_depends(deps, { "app", "debconf" }), { "app", "debconf", "libc6", "libgcc-s1", "libssl3",
		"media-types" }, "resolve_depends: a chosen provider satisfies the virtual")

	local recs = image.parse_records("Package: a\nVersion: 1:2\nDescription: x\n more\n\nPackage: b\nVersion: 3\n")
	t.is(#recs, 2, "parse_records: two stanzas")
	t.is(recs[1].Version, "1:2", "parse_records: field")
	t.is(recs[1].Description, "x\n more", "parse_records: continuation line")

	t.is(image.tsc_khz("processor\t: 0\ncpu MHz\t\t: 2445.428\n"), 2445428, "tsc_khz from cpu MHz")
	t.is(image.tsc_khz("nothing"), nil, "tsc_khz: nil without cpu MHz")
	local args = image.boot_args({ boot_args = { "console=ttyS0", "rw" }, boot_args_tcg = { "tsc_early_khz=1" } },
		{ tcg = true })
	t.like(args, "^console=ttyS0 rw tsc_early_khz=%d+$", "boot_args: TCG adds this host's tsc_early_khz")
	t.is(image.boot_args({ boot_args = { "a" }, boot_args_tcg = { "b" } }), "a", "boot_args: no TCG args by default")

	-- ELF dynamic info of a host binary
	local info = image.elf_info(read("/usr/bin/ssh-keygen"))
	t.is(info and info.interp, "/lib64/ld-linux-x86-64.so.2", "elf_info: interpreter")
	local has_libc = false
	for _, n in ipairs(info and info.needed or {}) do has_libc = has_libc or n == "libc.so.6" end
	t.ok(has_libc, "elf_info: DT_NEEDED has libc.so.6")
	t.is(image.elf_info("not an elf at all, not at all, not at all, not at all, not at all!!"), nil,
		"elf_info: nil for non-ELF")

	-- symlinks resolved inside a root, absolute ones included
	local root = tmp .. "/root"
	sh("mkdir -p " .. q(root .. "/usr/lib/x") .. " && ln -s usr/lib " .. q(root .. "/lib") ..
		" && ln -s /lib/x/real " .. q(root .. "/usr/lib/x/link") .. " && echo hi > " .. q(root .. "/usr/lib/x/real"))
	t.is(image.resolve_in(root, "lib/x/link"), "usr/lib/x/real", "resolve_in: absolute link stays inside the root")
end

-- bzImage -> ELF for every compression the kernel can use, from synthetic images
local function le32(n)
	return string.char(n % 256, math.floor(n / 256) % 256, math.floor(n / 65536) % 256, math.floor(n / 16777216) % 256)
end

local function test_bzimage()
	local elf = read("/usr/bin/ssh-keygen")
	local tools = {
		{ "lz4", { "lz4", "-l", "-9", "-c" } }, -- the kernel's legacy lz4 frame
		{ "xz", { "xz", "--check=crc32", "-c" } },
		{ "zstd", { "zstd", "-19", "-c" } },
		{ "gzip", { "gzip", "-9", "-c" } },
	}
	for _, tool in ipairs(tools) do
		local comp = proc.run(tool[2], { stdin = elf }).stdout
		local payload = comp .. le32(#elf)
		-- boot protocol header: setup_sects = 1 -> protected-mode code at 1024
		local hdr = { string.rep("\0", 0x1f1), "\1", string.rep("\0", 0x202 - 0x1f2), "HdrS", "\15\2",
			string.rep("\0", 0x248 - 0x208), le32(64), le32(#payload) }
		local head = table.concat(hdr)
		head = head .. string.rep("\0", 1024 + 64 - #head)
		local bz = tmp .. "/bz-" .. tool[1]
		write(bz, head .. payload .. string.rep("T", 300))
		local out = tmp .. "/elf-" .. tool[1]
		local ok, r = pcall(image.bzimage_to_elf, bz, out)
		t.ok(ok and r.compression == tool[1], "bzimage_to_elf: " .. tool[1] .. " payload found by the header",
			not ok and r or nil)
		t.ok(read(out) == elf, "bzimage_to_elf: " .. tool[1] .. " output is the original ELF")
		-- no boot header: found by scanning for the magic
		write(bz, string.rep("J", 777) .. comp .. string.rep("\0", 100))
		os.remove(out)
		ok, r = pcall(image.bzimage_to_elf, bz, out)
		t.ok(ok and read(out) == elf, "bzimage_to_elf: " .. tool[1] .. " found by its magic without a header",
			not ok and r or nil)
	end
	write(tmp .. "/bz-none", string.rep("x", 5000))
	t.raises(function() image.bzimage_to_elf(tmp .. "/bz-none", tmp .. "/elf-none") end,
		"no ELF kernel found inside", "bzimage_to_elf: clear error without a payload")
end

-- ---- errors that need no image ----

-- Unpacking packages never writes outside the tree: one package ships directory symlinks
-- (absolute, ../../.., dangling), the next ships files below them. dpkg-deb --build makes
-- real .debs; unpack_into is what the image build runs for every package.
local function test_unpack_contained()
	local d = tmp .. "/unpack"
	local outside, never = d .. "/outside", d .. "/never" -- host paths the links name
	local function deb(name, script)
		local root = d .. "/" .. name
		sh("mkdir -p " .. q(root .. "/DEBIAN"))
		write(root .. "/DEBIAN/control", "Package: " .. name ..
			"\nVersion: 1\nArchitecture: all\nMaintainer: t <t@example.org>\nDescription: t\n")
		local r = sh("cd " .. q(root) .. " && " .. script .. " && dpkg-deb --root-owner-group --build " ..
			q(root) .. " " .. q(root .. ".deb"))
		assert(r.status == 0, "dpkg-deb: " .. r.stderr)
		return root .. ".deb"
	end
	sh("mkdir -p " .. q(outside))
	local links = deb("fct-links", "mkdir -p etc ." .. q(outside) .. " && ln -s " .. q(outside) .. " etc/abs" ..
		" && ln -s ../../../../../../../../../.." .. q(outside) .. " etc/rel && ln -s " .. q(never) .. " etc/dangling")
	local files = deb("fct-files", "mkdir -p etc/abs etc/rel && echo abs > etc/abs/x && echo rel > etc/rel/y")
	local dangling = deb("fct-dangling", "mkdir -p etc/dangling && echo z > etc/dangling/z")
	local tree = d .. "/tree"
	sh("mkdir -p " .. q(tree))
	image.unpack_into(links, tree)
	t.is(image.readlink(tree .. "/etc/abs"), outside, "unpack: a package's absolute symlink is kept as it is")
	local ok, err = pcall(image.unpack_into, files, tree)
	t.ok(ok, "unpack: files below a package's directory symlinks unpack", err)
	t.same(runtime.listdir(outside), {}, "unpack: nothing written to the host directory the symlinks name")
	t.is(read(tree .. outside .. "/x"), "abs\n", "unpack: below an absolute symlink the file lands inside the tree")
	t.is(read(tree .. outside .. "/y"), "rel\n", "unpack: below a ../../.. symlink likewise")
	t.raises(function() image.unpack_into(dangling, tree) end,
		"cannot unpack fct%-dangling.*: it has a directory /etc/dangling, but in the image /etc/dangling is a symlink to "
			.. never:gsub("%p", "%%%0") .. " that leads to no directory inside it; refusing to write outside the image",
		"unpack: a directory symlink leading nowhere inside the tree is refused in one line")
	t.is(runtime.stat(never), nil, "unpack: the host path it names was not created")
	-- what the build itself writes into the tree is placed the same way
	t.is(image.in_tree(tree, "etc/abs/key"), tree .. outside .. "/key", "in_tree: below an absolute symlink: inside the tree")
	t.is(image.in_tree(tree, "etc/rel", true), tree .. outside, "in_tree: a directory symlink is resolved inside the tree")
	t.is(image.in_tree(tree, "etc/abs"), tree .. "/etc/abs", "in_tree: a last component that is a symlink is not followed")
	t.is(image.in_tree(tree, "etc/dangling/x/y"), tree .. never .. "/x/y", "in_tree: a dangling link leads inside the tree")
	t.same(runtime.listdir(d), { "fct-dangling", "fct-dangling.deb", "fct-files", "fct-files.deb", "fct-links",
		"fct-links.deb", "outside", "tree" }, "unpack: no staging directory left behind")
end

local function test_errors()
	local r = fc({ "info", "fct-img-nosuch" })
	t.is(r.status, 1, "info of an unknown image fails")
	t.is(r.stderr, "fireclaw: image: no image named 'fct-img-nosuch' (build it with: fireclaw image build --name fct-img-nosuch)\n",
		"info of an unknown image: one clear line")
	t.raises(function() image.load("fct-img-nosuch") end,
		"^image: no image named 'fct%-img%-nosuch' %(build it with: fireclaw image build %-%-name fct%-img%-nosuch%)$",
		"image.load of an unknown image raises the documented message")
	r = fc({ "rm", "fct-img-nosuch" })
	t.ok(r.status == 1 and r.stderr:find("no image named 'fct-img-nosuch'", 1, true), "rm of an unknown image fails clearly")
	t.raises(function() image.load("../etc") end, "bad image name", "image names cannot escape the images dir")
	r = fc({ "frobnicate" })
	t.ok(r.status == 2 and r.stderr:find("unknown command 'frobnicate'", 1, true), "unknown subcommand: usage error")
	r = fc({ "build", "--size", "lots" })
	t.ok(r.status ~= 0 and r.stderr:find("bad size 'lots'", 1, true), "build --size junk: clear error")
	r = fc({ "import", "--name", "fct-img-x" })
	t.ok(r.status == 2 and r.stderr:find("needs --kernel", 1, true), "import without --kernel: usage error")

	if not is_root then
		t.skip("not root: build error checks")
		return
	end
	r = fc({ "build", "--name", "fct-img-nosuch-" .. PID, "--packages", "nosuch-package-xyz" })
	-- (a first build in a fresh state dir also notes the client key it made)
	t.is((r.stderr:gsub("^image: keys: client key [^\n]* %(new%)\n", "")),
		"fireclaw: image: Debian package 'nosuch-package-xyz' not found (apt-cache policy nosuch-package-xyz)\n",
		"build --packages nosuch-package-xyz: one clear line")
	t.is(r.status, 1, "... and exit status 1")

	-- the repository unreachable: apt through a proxy on a closed loopback port, empty cache
	local state = tmp .. "/state-unreachable"
	r = fc({ "build", "-q" }, { FIRECLAW_STATE = state,
		FIRECLAW_APT_OPTIONS = "Acquire::http::Proxy=http://127.0.0.1:9 Acquire::https::Proxy=http://127.0.0.1:9 Acquire::Retries=0" })
	t.like(r.stderr, "^fireclaw: image: cannot download packages from the Debian repository %(check the network and /etc/apt/sources.list%): ",
		"repository unreachable: clear error")
	t.is(select(2, r.stderr:gsub("\n", "")), 1, "... on one line")
	t.is(#(runtime.listdir(state .. "/images") or {}), 0, "... and no image or temp dir left behind")

	-- not root
	local state2 = tmp .. "/state-user"
	sh("mkdir -p " .. q(state2) .. " && chmod 777 " .. q(state2))
	r = proc.run({ "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", FIRECLAW, "image", "build" },
		{ env = { FIRECLAW_STATE = state2 } })
	t.like(r.stderr, "image: building an image needs root", "not root: clear error")
end

-- ---- the default image ----

local function stat_mode(path)
	return (proc.run({ "stat", "-c", "%a", path }).stdout:gsub("%s+$", ""))
end

local function debugfs(img, cmd)
	return proc.run({ "debugfs", "-R", cmd, img }).stdout
end

local function test_default_image()
	local name = config.image
	local t0 = runtime.now()
	local r = fc({ "build" })
	t.is(r.status, 0, "image build (default) succeeds", r.stderr)
	t.diag(string.format("first build this run: %.1f s", runtime.now() - t0))
	if r.status ~= 0 then return nil end
	t0 = runtime.now()
	r = fc({ "build" })
	t.is(r.status, 0, "second build succeeds")
	t.like(r.stderr, "'" .. name .. "' is up to date .*nothing to do", "second build does nothing and says so")
	t.diag(string.format("cached build: %.1f s", runtime.now() - t0))
	r = fc({ "build", "-q" })
	t.is(r.stderr, "", "-q: nothing on stderr")

	local img = image.load(name)
	t.ok(img.dir and not img.dir:match("/" .. name .. "$"), "load resolves the image link to its real directory")
	for _, k in ipairs({ "kernel", "vmlinux", "vmlinuz", "initrd", "rootfs", "host_key_pub", "client_key" }) do
		t.ok(type(img[k]) == "string" and img[k]:sub(1, 1) == "/" and read(img[k]) ~= nil, "load: " .. k .. " is an absolute path to a file")
	end
	t.is(img.kernel, img.vmlinux, "load: kernel is the ELF vmlinux")
	t.like(img.host_key, "^ssh%-ed25519 [A-Za-z0-9+/]+=*$", "load: host_key is the public key line")
	t.is(read(img.vmlinux):sub(1, 4), "\127ELF", "vmlinux is an ELF")
	t.is(read(img.vmlinuz):sub(0x203, 0x206), "HdrS", "vmlinuz is a bzImage")

	-- manifest
	local m = img
	for file, f in pairs(m.files) do
		local path = img.dir .. "/" .. file
		t.is(proc.run({ "sha256sum", path }).stdout:match("^(%x+)"), f.sha256, "manifest sha256 of " .. file)
		local st = proc.run({ "stat", "-c", "%s", path }).stdout
		t.is(tonumber(st), f.size, "manifest size of " .. file)
	end
	t.ok(m.files["rootfs.ext4"].allocated < m.files["rootfs.ext4"].size, "rootfs.ext4 is sparse")
	t.is(m.files["rootfs.ext4"].size, 64 * 2 ^ 20, "rootfs.ext4 is 64 MiB by default")
	t.like(m.kernel_info.package, "^linux%-image%-%d", "manifest: real versioned kernel package")
	t.is(m.kernel_info.metapackage, "linux-image-cloud-amd64", "manifest: from the cloud metapackage")
	t.ok(m.kernel_info.release and m.kernel_info.version and m.kernel_info.compression, "manifest: kernel release, version, compression")
	local names = {}
	for _, p in ipairs(m.packages) do names[p.name] = p.version end
	t.ok(names["busybox-static"] and names["dropbear-bin"] and names["libc6"], "manifest: packages with versions")
	t.ok(json.is_array(m.boot_args) and table.concat(m.boot_args, " "):find("console=ttyS0 root=/dev/vda rw ip=172.16.0.2::172.16.0.1:255.255.255.252::eth0:off", 1, true),
		"manifest: boot_args list")
	local common = table.concat(m.boot_args, " ")
	t.ok(not common:find("nomodule") and not common:find("8250.nr_uarts"), "manifest: no nomodule / 8250.nr_uarts=0")
	t.like(table.concat(m.boot_args_tcg, " "), "tsc_early_khz=%d+", "manifest: boot_args_tcg has tsc_early_khz")
	t.is(m.boot_args[#m.boot_args], image.BUILT_BOOT_ARGS[#image.BUILT_BOOT_ARGS], "manifest: boot_args end with the built images' extras")
	t.ok(m.created and m.build_seconds and m.inputs, "manifest: created, build time, inputs fingerprint")
	t.same(m.modules, { "virtio_ring", "virtio", "virtio_mmio", "virtio_rng", "virtio_blk", "failover", "net_failover",
		"virtio_net", "vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport", "virtio_console" },
		"manifest: modules in load order (virtio_rng for the entropy device, virtio_console for the agent's ports)")

	-- keys
	t.is(stat_mode(config.state_dir .. "/keys"), "700", "keys dir is 0700")
	t.is(stat_mode(img.client_key), "600", "client private key is 0600")

	-- initrd and rootfs contents, read without mounting
	local list = proc.run({ "cpio", "-it", "--quiet" }, { stdin = read(img.initrd) }).stdout
	t.ok(list:find("\ninit\n", 1, true) or list:find("^init\n"), "initrd has /init")
	t.ok(list:find("lib/modules/virtio_blk.ko", 1, true) and list:find("lib/modules/order", 1, true),
		"initrd has the modules and their load order")
	t.ok(not list:find("busybox", 1, true), "initrd has no shell: /init is fireclaw-init", list)
	local itree = config.state_dir .. "/initrd-check"
	fs.mkdir_p(itree, "700")
	proc.run({ "cpio", "-id", "--quiet", "init", "lib/modules/order" }, { stdin = read(img.initrd), cwd = itree })
	t.is(read(itree .. "/init"), require("fireclaw.guest").init(), "initrd's /init is fireclaw-init, compiled into fireclaw")
	t.is(read(itree .. "/lib/modules/order"), table.concat(m.modules, "\n") .. "\n", "lib/modules/order: the manifest's load order")
	fs.rm_rf(itree)
	t.like(debugfs(img.rootfs, "cat /etc/shadow"), "^root:%*:", "rootfs: root's shadow entry is '*'")
	local pub = read(img.client_key_pub):match("^(%S+ %S+)")
	t.ok(pub and debugfs(img.rootfs, "cat /root/.ssh/authorized_keys"):find(pub, 1, true), "rootfs: authorized_keys holds the client key")
	t.like(debugfs(img.rootfs, "stat /root/.ssh/authorized_keys"), "Mode:%s+0600", "rootfs: authorized_keys is 0600")
	t.like(debugfs(img.rootfs, "stat /root/.ssh"), "Mode:%s+0700", "rootfs: /root/.ssh is 0700")
	t.like(debugfs(img.rootfs, "stat /usr/sbin/dropbear"), "User:%s+0%s+Group:%s+0", "rootfs: files belong to root")
	t.like(debugfs(img.rootfs, "stat /usr/lib/openssh/sftp-server"), "Type: regular", "rootfs: sftp-server for SFTP")
	local helper = require("fireclaw.guest").helper()
	local hstat = debugfs(img.rootfs, "stat /usr/sbin/fireclaw-guest")
	t.like(hstat, "Mode:%s+0755", "rootfs: /usr/sbin/fireclaw-guest is 0755")
	t.like(hstat, "User:%s+0%s+Group:%s+0", "rootfs: ... owned by root")
	t.is(tonumber(hstat:match("Size:%s*(%d+)")), #helper, "rootfs: ... the helper compiled into fireclaw")
	t.is(m.guest.helper, "/usr/sbin/fireclaw-guest", "manifest: guest.helper")
	t.is(m.guest.helper_sha256, image.helper_sha256(), "manifest: guest.helper_sha256 is the helper's")
	t.is(#helper > 0 and helper:sub(1, 4), "\127ELF", "the helper is an ELF")
	t.ok(not m.guest.clock, "manifest: no fireclaw-clock any more (the helper sets the clock)")
	local agent_bytes = require("fireclaw.guest").agent()
	local astat = debugfs(img.rootfs, "stat /usr/sbin/fireclaw-agent")
	t.like(astat, "Mode:%s+0755", "rootfs: /usr/sbin/fireclaw-agent is 0755")
	t.is(tonumber(astat:match("Size:%s*(%d+)")), #agent_bytes, "rootfs: ... the agent compiled into fireclaw")
	t.ok(m.guest.agent == "/usr/sbin/fireclaw-agent" and m.guest.agent_protocol == require("fireclaw.agent").VERSION,
		"manifest: guest.agent and its protocol version")
	local rcs = debugfs(img.rootfs, "cat /etc/init.d/rcS")
	t.ok(rcs:find("dropbear", 1, true) and not rcs:find("fireclaw-agent", 1, true),
		"rcS starts sshd only (the initramfs's /init started the agent)", rcs)
	return img
end

local function test_stale_cleanup()
	local dead = proc.spawn({ argv = { "true" } })
	local dpid = dead:pid()
	dead:wait()
	dead:close()
	local stale = config.state_dir .. "/images/.tmp~fct-img-stale~" .. dpid
	sh("mkdir -p " .. q(stale .. "/out"))
	defer(function() proc.run({ "rm", "-rf", stale }) end)
	local r = fc({ "build" })
	t.ok(r.status == 0 and read(stale .. "/out") == nil and not runtime.listdir(stale),
		"a temp dir left by an interrupted build is removed by the next build", r.stderr)
end

local function test_import_list_rm(img)
	local name = "fct-img-imp-" .. PID
	defer(function() pcall(image.remove, name) end)
	local r = fc({ "import", "--name", name, "--kernel", img.vmlinuz, "--rootfs", img.rootfs, "--initrd", img.initrd,
		"--host-key", img.host_key_pub, "-q", "--no-agent" })
	t.is(r.status, 0, "import of a bzImage + rootfs + initrd", r.stderr)
	local ok, m = pcall(image.load, name)
	t.ok(ok, "imported image loads", not ok and m or nil)
	if not ok then return end
	t.is(m.source, "import", "import: manifest source")
	t.is(read(m.vmlinux), read(img.vmlinux), "import: vmlinux recovered from the bzImage")
	t.is(m.host_key, img.host_key, "import: host key pinned")
	t.ok(not table.concat(m.boot_args, " "):find("lsm=", 1, true),
		"import: the user's kernel gets the defaults, not the built images' extras (lsm=)")
	t.is(m.files["rootfs.ext4"].sha256, img.files["rootfs.ext4"].sha256, "import: rootfs copied intact")
	t.ok(m.files["rootfs.ext4"].allocated < m.files["rootfs.ext4"].size, "import: copy is sparse")
	r = fc({ "list" })
	t.like(r.stdout, "\n" .. name:gsub("%-", "%%-") .. "%s+import ", "list shows the imported image")
	t.like(r.stdout, "\n" .. config.image .. "%s+debian ", "list shows the default image")
	r = fc({ "info", name })
	local okj, info = pcall(json.decode, r.stdout)
	t.ok(okj and info.name == name, "info prints the manifest as JSON")
	r = fc({ "import", "--name", name, "--kernel", img.vmlinux, "--rootfs", img.rootfs })
	t.ok(r.status == 1 and r.stderr:find("exists", 1, true), "import over an existing image needs --force")
	r = fc({ "import", "--name", name, "--kernel", img.vmlinux, "--rootfs", img.rootfs, "--force", "-q",
		"--boot-args", "console=ttyS0 root=/dev/vda" })
	t.is(r.status, 0, "import --force replaces it")
	t.same(image.info(name).boot_args, { "console=ttyS0", "root=/dev/vda", "init=/.fireclaw/bin/fireclaw-agent" },
		"import: --boot-args stored as a list, the agent's init shim as init=")
	t.is(image.info(name).guest.agent, "/.fireclaw/bin/fireclaw-agent", "import: the manifest names the agent")
	-- image.load remembers what it read (a run loads its image several times): a replaced
	-- image is read anew, and what one caller changes is not what the next one gets
	local loaded = image.load(name)
	t.same(loaded.boot_args, { "console=ttyS0", "root=/dev/vda", "init=/.fireclaw/bin/fireclaw-agent" },
		"image.load after a replacement by another process: the new image, not the one this process loaded")
	loaded.boot_args[1], loaded.files = "changed", nil
	local again = image.load(name)
	t.ok(again.boot_args[1] == "console=ttyS0" and again.files ~= nil,
		"image.load: a caller's changes to what it got do not reach the next caller")
	t.same(image.shim_boot_args({ "ro", "init=/sbin/x", "quiet", "--", "init=arg", "-s" }),
		{ "ro", "fireclaw.init=/sbin/x", "quiet", "init=/.fireclaw/bin/fireclaw-agent", "--", "init=arg", "-s" },
		"shim_boot_args: the image's init= kept as fireclaw.init=, init= before '--', init's arguments as they were")
	r = fc({ "build", "--name", name })
	t.ok(r.status == 1 and r.stderr:find("was imported, not built: --force replaces it", 1, true),
		"build does not replace an imported image without --force", r.stderr)
	r = fc({ "import", "--name", name .. "x", "--kernel", "/etc/hostname", "--rootfs", img.rootfs })
	t.ok(r.status == 1 and r.stderr:find("neither an ELF vmlinux nor a bzImage", 1, true), "import: not a kernel")
	r = fc({ "rm", name })
	t.is(r.status, 0, "rm removes the image")
	t.ok(not image.exists(name), "... it is gone")
	t.ok(not fc({ "list" }).stdout:find(name, 1, true), "... and not listed")
	local left = {}
	for _, e in ipairs(runtime.listdir(config.state_dir .. "/images") or {}) do
		if e:find(name, 1, true) then left[#left + 1] = e end
	end
	t.same(left, {}, "... nothing of it is left in the images dir")
end

local function test_size_too_small()
	local name = "fct-img-small-" .. PID
	defer(function() pcall(image.remove, name) end)
	local r = fc({ "build", "--name", name, "--size", "8M", "-q" })
	t.ok(r.status == 1 and r.stderr:find("give a larger --size", 1, true), "--size too small: clear error", r.stderr)
	local left = {}
	for _, e in ipairs(runtime.listdir(config.state_dir .. "/images") or {}) do
		if e:find(name, 1, true) then left[#left + 1] = e end
	end
	t.same(left, {}, "... and nothing left behind")
end

local function test_extra_packages()
	local name = "fct-img-pkg-" .. PID
	defer(function() pcall(image.remove, name) end)
	local r = fc({ "build", "--name", name, "--packages", "jq" })
	t.is(r.status, 0, "build --packages jq", r.stderr)
	t.like(r.stderr, "rootfs: .*, %d+ extra packages", "progress line counts the extra packages")
	if r.status ~= 0 then return end
	local img = image.load(name)
	local extra = {}
	for _, p in ipairs(img.packages) do
		if p.role == "extra" then extra[p.name] = p.version end
	end
	t.ok(extra.jq and extra.libjq1, "manifest: jq and its dependency libjq1 as extra packages")
	t.same(img.requested_packages, { "jq" }, "manifest: requested packages")
	t.like(debugfs(img.rootfs, "stat /usr/bin/jq"), "Type: regular", "rootfs: /usr/bin/jq unpacked")
	t.like(debugfs(img.rootfs, "stat /usr/bin/busybox"), "Type: regular", "rootfs: busybox still there")
	t.isnt(img.host_key, image.load(config.image).host_key, "each image gets its own host key")
	r = fc({ "rm", name })
	t.is(r.status, 0, "rm the package image")
	local used = false
	for _, e in ipairs(image.list()) do
		for _, p in ipairs(e.manifest and e.manifest.packages or {}) do used = used or p.name == "jq" end
	end
	local cached = false
	for _, f in ipairs(runtime.listdir(config.state_dir .. "/cache/debs") or {}) do
		cached = cached or f:match("^jq_") ~= nil
	end
	if used then
		t.skip("another image uses jq: cache pruning not checked")
	else
		t.ok(not cached, "rm prunes the cached .debs no image uses any more")
	end
end

-- ---- boot it ----

local function ip(args)
	local argv = { "ip" }
	for _, a in ipairs(args) do argv[#argv + 1] = a end
	local r = proc.run(argv)
	if r.status ~= 0 then error("ip " .. table.concat(args, " ") .. ": " .. r.stderr, 0) end
end

local function kvm_usable()
	local accel = config.choice("accel")
	if accel == "tcg" then return false end
	if accel == "kvm" then return true end
	local f = io.open("/dev/kvm", "rb")
	if not f then return false end
	f:close()
	if runtime.listdir("/sys/module/kvm_pvm") then return false end
	local cpu = read("/proc/cpuinfo") or ""
	return cpu:find(" vmx") ~= nil or cpu:find(" svm") ~= nil
end

local function boot(img, n, opts)
	opts = opts or {}
	local ns = "fct-img-" .. PID .. "-" .. n
	local dir = tmp .. "/boot" .. n
	sh("mkdir -p " .. q(dir))
	ip({ "netns", "add", ns })
	defer(function() proc.run({ "ip", "netns", "del", ns }) end)
	local net = config.net
	ip({ "-n", ns, "link", "set", "lo", "up" })
	ip({ "-n", ns, "tuntap", "add", "dev", net.tap, "mode", "tap" })
	ip({ "-n", ns, "link", "set", net.tap, "address", net.tap_mac })
	ip({ "-n", ns, "addr", "add", net.host_ip .. "/" .. net.prefix, "dev", net.tap })
	ip({ "-n", ns, "link", "set", net.tap, "up" })
	ip({ "-n", ns, "neigh", "add", net.guest_ip, "lladdr", net.guest_mac, "dev", net.tap, "nud", "permanent" })
	local disk = dir .. "/disk.ext4"
	proc.run({ "cp", "--sparse=always", "--reflink=auto", img.rootfs, disk })
	write(dir .. "/known_hosts", net.guest_ip .. " " .. img.host_key .. "\n")
	local kvm = kvm_usable()
	local console = dir .. "/console"
	local argv = { config.qemu, "-M", "microvm", "-accel", kvm and "kvm" or "tcg", "-cpu",
		kvm and "host,-arch-capabilities" or "max", "-m", "256", "-smp", "1", "-nodefaults", "-no-user-config",
		"-display", "none", "-no-reboot", "-serial", "file:" .. console,
		"-kernel", img.kernel, "-initrd", img.initrd,
		"-append", image.boot_args(img, { tcg = not kvm }) .. (opts.append and " " .. opts.append or ""),
		"-drive", "id=root,file=" .. disk .. ",format=raw,if=none", "-device", "virtio-blk-device,drive=root",
		"-netdev", "tap,id=n0,ifname=" .. net.tap .. ",script=no,downscript=no",
		"-device", "virtio-net-device,netdev=n0,mac=" .. net.guest_mac }
	if opts.no_disk then -- drop the -drive/-device pair of the disk
		for i = #argv, 1, -1 do
			if argv[i] == "-drive" or argv[i] == "-device" and argv[i + 1]:match("^virtio%-blk") then
				table.remove(argv, i)
				table.remove(argv, i)
			end
		end
	end
	local t0 = runtime.now()
	local vm = proc.spawn({ argv = argv, netns = ns, stdout = dir .. "/qemu.out", stderr = dir .. "/qemu.err" })
	defer(function() vm:close() end)
	local ssh_base = { "ssh", "-F", "/dev/null", "-i", img.client_key, "-o", "UserKnownHostsFile=" .. dir .. "/known_hosts",
		"-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=2",
		"-o", "ServerAliveInterval=1", "-o", "ServerAliveCountMax=3", "-o", "LogLevel=ERROR", "root@" .. net.guest_ip }
	local function ssh(cmd, run_opts)
		local a = {}
		for _, x in ipairs(ssh_base) do a[#a + 1] = x end
		a[#a + 1] = cmd
		run_opts = run_opts or {}
		run_opts.netns = ns
		run_opts.timeout = run_opts.timeout or 60
		return proc.run(a, run_opts)
	end
	local res = { ns = ns, dir = dir, vm = vm, ssh = ssh, kvm = kvm, console_path = console }
	if opts.no_disk then return res end
	-- readiness marker on the console (deadline generous: TCG on a busy host)
	local deadline = t0 + 180
	local text = ""
	while runtime.now() < deadline do
		text = read(console) or ""
		if text:find(img.guest.ready_marker, 1, true) or not vm:alive() then break end
		runtime.sleep(0.02)
	end
	res.t_ready = runtime.now() - t0
	res.console = text
	res.ready = text:find(img.guest.ready_marker, 1, true) ~= nil
	if not res.ready then return res end
	-- ssh `true`, retried until the deadline
	local r
	repeat
		r = ssh("true", { timeout = 10 })
	until r.status == 0 or runtime.now() > deadline or not vm:alive()
	res.t_ssh = runtime.now() - t0
	res.ssh_ok = r.status == 0
	res.ssh_err = r.stderr
	return res
end

local function test_boot(img)
	if os.getenv("FIRECLAW_TEST_SKIP_VM") == "1" then
		t.skip("FIRECLAW_TEST_SKIP_VM=1: no boot")
		return
	end
	if not is_root then
		t.skip("not root: no boot")
		return
	end
	local b = boot(img, 1)
	t.ok(b.ready, "guest prints '" .. img.guest.ready_marker .. "' on the console", b.console)
	t.ok(b.ssh_ok, "ssh true succeeds (pinned host key, client key)", b.ssh_err)
	t.diag(string.format("boot (%s): ready marker %.2f s, ssh true %.2f s after QEMU start", b.kvm and "KVM" or "TCG",
		b.t_ready or -1, b.t_ssh or -1))
	if not b.ssh_ok then return end
	local r = b.ssh("uname -r")
	t.is(r.stdout, img.kernel_info.release .. "\n", "uname -r over ssh is the image's kernel")
	r = b.ssh("hostname; id -u; ip addr show dev eth0; ip route show")
	t.like(r.stdout, "^fireclaw\n0\n", "hostname fireclaw, logged in as root")
	t.like(r.stdout, "inet 172%.16%.0%.2/30", "eth0 configured from ip= (172.16.0.2/30)")
	t.like(r.stdout, "default via 172%.16%.0%.1 dev eth0", "default route via the tap")
	-- the initramfs loads the drivers of the devices present only (guest/init-modules.h):
	-- this VM has a disk and a NIC (no virtio-serial, entropy or vsock device)
	r = b.ssh("cut -d' ' -f1 /proc/modules | sort | tr '\\n' ' '")
	t.is(r.stdout, "failover net_failover virtio virtio_blk virtio_mmio virtio_net virtio_ring ",
		"modules: the drivers of this VM's devices only (no console, rng or vsock)", r.stderr)
	-- the helper: entropy on stdin, the time in ns (checked: 32..4096 bytes, digits only)
	r = b.ssh("fireclaw-guest reseed 1700000000123456789 && date +%s", { stdin = string.rep("\1\2\3\4", 16) })
	t.like(r.stdout, "^17000000%d%d\n$", "fireclaw-guest reseed NS: credits stdin, sets the clock", r.stderr)
	r = b.ssh("fireclaw-guest clock 1700000000500000000 && adjtimex")
	local sec, usec = r.stdout:match("tv_sec:%s*(%d+)"), tonumber(r.stdout:match("tv_usec:%s*(%d+)"))
	t.ok(sec == "1700000000" and usec and usec >= 500000, "the clock is set to the nanosecond, not whole seconds",
		string.format("tv_sec %s tv_usec %s", tostring(sec), tostring(usec)))
	r = b.ssh("fireclaw-guest reseed", { stdin = "short" })
	t.is(r.status, 2, "reseed refuses less than 32 bytes of entropy (status 2)")
	t.like(r.stderr, "32 to 4096 bytes", "... saying what it wants")
	r = b.ssh("fireclaw-guest clock 17e8; fireclaw-guest clock 1700000100000000000 && date +%s")
	t.like(r.stdout, "^17000001%d%d\n$", "fireclaw-guest clock NS; a non-digit time is refused", r.stderr)
	t.like(r.stderr, "digits only", "... with one line saying why")
	r = b.ssh("ls -ld /root/.ssh /root/.ssh/authorized_keys; mount")
	t.like(r.stdout, "drwx%-%-%-%-%-%-.* /root/.ssh\n%-rw%-%-%-%-%-%-%-.*authorized_keys", "authorized_keys 0600 in a 0700 dir")
	t.like(r.stdout, "/dev/vda on / type ext4 %(rw", "root is /dev/vda, ext4, read-write")
	t.like(r.stdout, "devpts on /dev/pts", "devpts mounted")
	-- SFTP (the subsystem dropbear runs from /usr/lib/sftp-server)
	write(b.dir .. "/payload", "hello sftp\n")
	write(b.dir .. "/batch", "put " .. b.dir .. "/payload /tmp/payload\n")
	local a = { "sftp", "-b", b.dir .. "/batch", "-F", "/dev/null", "-i", img.client_key, "-o",
		"UserKnownHostsFile=" .. b.dir .. "/known_hosts", "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
		"-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", "root@" .. config.net.guest_ip }
	r = proc.run(a, { netns = b.ns, timeout = 60 })
	t.is(r.status, 0, "sftp put works", r.stderr)
	t.is(b.ssh("cat /tmp/payload").stdout, "hello sftp\n", "... the file arrived")
	-- a clean power-off from SSH ends QEMU (the ssh may not see the exit: bounded)
	b.ssh("poweroff -f", { timeout = 15 })
	local st = b.vm:wait(60)
	t.ok(st ~= nil, "poweroff -f over ssh stops the VM (QEMU exits)")
	local console = read(b.dir .. "/console") or ""
	t.ok(not console:find("Kernel panic", 1, true) and not console:find("fireclaw-initrd:", 1, true),
		"console: no panic, no initramfs complaint", console)
end

local function test_reboot_halts(img)
	if os.getenv("FIRECLAW_TEST_SKIP_VM") == "1" or not is_root then
		t.skip("no VM boot")
		return
	end
	local b = boot(img, 2)
	t.ok(b.ssh_ok, "second boot: ssh true", b.ssh_err or b.console)
	t.diag(string.format("boot 2: ready marker %.2f s, ssh true %.2f s", b.t_ready or -1, b.t_ssh or -1))
	if not b.ssh_ok then return end
	b.ssh("reboot -f", { timeout = 15 })
	t.ok(b.vm:wait(60) ~= nil, "reboot -f halts the VM (QEMU -no-reboot exits)")
end

-- without a disk the initramfs gives up after fireclaw.rootwait, says why on the console
-- and reboots, which ends QEMU (-no-reboot)
local function test_no_root_disk(img)
	if os.getenv("FIRECLAW_TEST_SKIP_VM") == "1" or not is_root then
		t.skip("no VM boot")
		return
	end
	local b = boot(img, 3, { no_disk = true, append = "fireclaw.rootwait=2" })
	local st = b.vm:wait(180)
	t.ok(st ~= nil, "no root disk: the VM stops by itself")
	t.like(read(b.console_path) or "", "fireclaw%-initrd: root device /dev/vda did not appear within 2 s",
		"no root disk: the console says why")
end

local ok, err = pcall(function()
	test_helpers()
	test_bzimage()
	test_errors()
	test_unpack_contained()
	if not is_root then
		t.skip("not root: the image build needs root")
		return
	end
	local img = test_default_image()
	if not img then return end
	test_stale_cleanup()
	test_import_list_rm(img)
	test_size_too_small()
	test_extra_packages()
	test_boot(img)
	test_reboot_halts(img)
	test_no_root_disk(img)
end)
if not ok then t.ok(false, "test script error", err) end
cleanup_all()
-- nothing of ours left: namespaces, temp images
local ns = proc.run({ "ip", "netns", "list" }).stdout
t.ok(not ns:find("fct%-img%-" .. PID), "no fct-img namespace left behind")
local left = {}
for _, e in ipairs(runtime.listdir(config.state_dir .. "/images") or {}) do
	if e:find("fct-img", 1, true) then left[#left + 1] = e end
end
t.same(left, {}, "no test images or their temp dirs left in the images dir")
return t.done()
