-- tests/rootfs.lua: fireclaw.rootfs on real files and real ext4 images (made with
-- mkfs.ext4 on sparse files in a fresh temp directory, checked with debugfs and e2fsck).
local t = require "tap"
local rootfs = require "fireclaw.rootfs"

local function sh(cmd)
	local p = io.popen(cmd .. " 2>&1")
	local out = p:read("*a")
	local ok = p:close()
	return out, ok
end

local function q(s) return "'" .. s:gsub("'", "'\\''") .. "'" end
local function esc(s) return (s:gsub("%p", "%%%0")) end

local TMP = sh("mktemp -d"):gsub("%s+$", "")
local SHM -- a second temp directory, on tmpfs, when there is one
assert(TMP:match("^/tmp/"), "mktemp -d failed: " .. TMP)

local function mkfs(name, size)
	local path = TMP .. "/" .. name
	local out, ok = sh("truncate -s " .. size .. " " .. q(path) .. " && mkfs.ext4 -q -F " .. q(path))
	assert(ok, "mkfs.ext4: " .. out)
	return path
end

local function fsck_clean(img)
	local _, ok = sh("e2fsck -fn " .. q(img))
	return ok
end

local function debugfs(img, req) return (sh("debugfs -R " .. q(req) .. " " .. q(img))) end

local function blocks(path) return tonumber((sh("stat -c %b " .. q(path)))) end

-- counted from inside (a spawned ls would race with popen's own pipe ends)
local function open_fds() return #require("fireclaw.runtime").listdir("/proc/self/fd") end
local fds_before = open_fds()

-- rootfs.qcow2_overlay: files that qemu-img finds sane (check, info) for several sizes
-- and cluster layouts, that read exactly as their backing file and take a write without
-- touching it; bad arguments are one line each and leave no file.
local function qcow2_overlays()
	local json = require "fireclaw.json"
	if not select(2, sh("command -v qemu-img")) then
		for _ = 1, 59 do t.skip("qemu-img is missing (tools/deps.sh installs qemu-utils)") end
		return
	end
	local base = TMP .. "/golden.raw"
	sh("truncate -s 64M " .. q(base) .. " && printf golden | dd of=" .. q(base) .. " conv=notrunc status=none"
		.. " && printf middle | dd of=" .. q(base) .. " bs=1 seek=$((40 << 20 | 1024)) conv=notrunc status=none")
	local base_sum = sh("sha256sum <" .. q(base))
	local GiB = 2 ^ 30
	local cases = {
		{ 64 * 2 ^ 20 }, { 64 * 2 ^ 20, { extended_l2 = true } }, { 64 * 2 ^ 20, { cluster_size = 4096 } },
		{ 100 * 2 ^ 20 + 512 }, -- not a whole number of clusters
		{ 2 * GiB }, { 1024 * GiB }, { 1024 * GiB, { cluster_size = 4096 } },
		{ 1024 * GiB, { cluster_size = 2 ^ 21, extended_l2 = true } },
	}
	for i, c in ipairs(cases) do
		local size, opts = c[1], c[2]
		local what = string.format("qcow2_overlay %.0f bytes%s", size, opts and (" " .. json.encode(opts)) or "")
		local path = TMP .. "/ovl" .. i .. ".qcow2"
		local ok, err = pcall(rootfs.qcow2_overlay, path, size, base, opts)
		t.ok(ok, what .. ": made", err)
		local out, clean = sh("qemu-img check " .. q(path))
		t.ok(clean and out:match("No errors were found"), what .. ": qemu-img check finds no error", out)
		local info = json.decode((sh("qemu-img info --output=json " .. q(path))))
		local cs = opts and opts.cluster_size or 65536
		local data = info["format-specific"] and info["format-specific"].data or {}
		t.same({ info.format, info["virtual-size"], info["cluster-size"], info["backing-filename"],
			info["backing-filename-format"], data.compat, data["extended-l2"], data.corrupt, info["dirty-flag"] },
			{ "qcow2", size, cs, base, "raw", "1.1", opts and opts.extended_l2 or false, false, false },
			what .. ": qemu-img info: qcow2 v3, its size, clusters, backing file (raw), not dirty")
		t.ok(blocks(path) <= 64 and sh("stat -c %a " .. q(path)) == "600\n",
			what .. ": 0600, sparse (" .. tostring(blocks(path)) .. " blocks of 512 bytes held)")
		if i > 3 then os.remove(path) end
	end
	-- it reads exactly as its backing file, and a write goes into it only
	local ovl, ovl_ext = TMP .. "/ovl1.qcow2", TMP .. "/ovl2.qcow2"
	t.is(sh("qemu-img convert -O raw " .. q(ovl) .. " " .. q(TMP .. "/back.raw") .. " && sha256sum <" .. q(TMP .. "/back.raw")), base_sum,
		"an overlay reads exactly as its backing file")
	for _, p in ipairs({ ovl, ovl_ext, TMP .. "/ovl3.qcow2" }) do
		local out, ok = sh("qemu-io -f qcow2 -c 'write -P 0xab 4096 4096' -c 'write -P 0xcd 41943040 512' " .. q(p))
		t.ok(ok, "qemu-io writes into " .. p:match("[^/]+$"), out)
		local _, clean = sh("qemu-img check " .. q(p))
		t.ok(clean, "... which qemu-img check still finds clean")
	end
	os.remove(TMP .. "/back.raw")
	local back = sh("qemu-img convert -O raw " .. q(ovl_ext) .. " " .. q(TMP .. "/back.raw")
		.. " && dd if=" .. q(TMP .. "/back.raw") .. " bs=1 count=6 status=none"
		.. " && dd if=" .. q(TMP .. "/back.raw") .. " bs=4096 skip=1 count=1 status=none | tr -d '\\253' | wc -c"
		.. " && dd if=" .. q(TMP .. "/back.raw") .. " bs=1 skip=$((40 << 20)) count=512 status=none | tr -d '\\315' | wc -c"
		.. " && dd if=" .. q(TMP .. "/back.raw") .. " bs=1 skip=$((40 << 20 | 1024)) count=6 status=none")
	-- (the 512 bytes at 40 MiB share a 2 KiB subcluster with "middle": copied on write)
	t.is(back, "golden0\n0\nmiddle", "... the overlay reads the writes over the backing file's bytes")
	os.remove(TMP .. "/back.raw")
	t.is(sh("sha256sum <" .. q(base)), base_sum, "the backing file is unchanged by the writes")
	for i = 1, 3 do os.remove(TMP .. "/ovl" .. i .. ".qcow2") end
	-- bad arguments: one line each, no file left
	local bad = TMP .. "/bad.qcow2"
	local function refused(pattern, what, size, name, opts)
		t.raises(function() rootfs.qcow2_overlay(bad, size, name or base, opts) end, pattern, "qcow2_overlay: " .. what)
	end
	local SIZE = "the virtual size must be a multiple of 512 bytes, from 512 to 1 PiB, not "
	refused(esc(SIZE) .. "0$", "a size of 0", 0)
	refused(esc(SIZE) .. "1000$", "a size that is not a multiple of 512", 1000)
	refused(esc(SIZE) .. "%-512$", "a negative size", -512)
	refused(esc(SIZE) .. "2251799813685248$", "a size over 1 PiB", 2 ^ 51)
	refused("number expected", "a size that is not a number", "64M")
	refused("cluster_size must be a power of two from 512 to 2 MiB, not 1000$", "a cluster size of 1000", 512, nil,
		{ cluster_size = 1000 })
	refused("not 4194304$", "a cluster size of 4 MiB", 512, nil, { cluster_size = 2 ^ 22 })
	refused("extended_l2 needs a cluster size of 16 KiB or more$", "extended_l2 with 4 KiB clusters", 512, nil,
		{ cluster_size = 4096, extended_l2 = true })
	refused("a 1099511627776%-byte disk needs a bigger cluster size than 512$", "1 TiB in 512-byte clusters",
		1024 * GiB, nil, { cluster_size = 512 })
	refused("unknown option 'backing'", "an unknown option", 512, nil, { backing = "x" })
	refused("the backing file's name must be 1 to 1023 bytes .*not 0 bytes$", "an empty backing name", 512, "")
	refused("not 1024 bytes$", "a backing name of 1024 bytes", 512, ("x"):rep(1024))
	refused("not 3 bytes$", "a backing name with a NUL", 512, "a\0b")
	refused("not 400 bytes$", "a backing name that does not fit in a 512-byte cluster", 512, ("x"):rep(400),
		{ cluster_size = 512 })
	t.ok(not io.open(bad), "... and none of them left a file")
	sh("ln -s " .. q(TMP .. "/target") .. " " .. q(bad))
	refused("create " .. esc(bad) .. ": File exists$", "a symlink where the file goes (not followed)", 512)
	t.ok(not io.open(TMP .. "/target"), "... its target was not created")
	os.remove(bad)
	t.raises(function() rootfs.qcow2_overlay(TMP .. "/no/dir/x.qcow2", 512, base) end,
		"create " .. esc(TMP) .. "/no/dir/x.qcow2: No such file or directory$", "qcow2_overlay: a missing directory")
	os.remove(base)
end

local function body()
	-- ---- copy ----
	local src, dst = TMP .. "/sparse.img", TMP .. "/copy.img"
	sh("truncate -s 1G " .. q(src))
	sh("printf head | dd of=" .. q(src) .. " conv=notrunc status=none")
	sh("printf middle | dd of=" .. q(src) .. " bs=1M seek=300 conv=notrunc status=none")
	sh("printf tail | dd of=" .. q(src) .. " bs=1 seek=$((1024*1024*1024-4)) conv=notrunc status=none")
	local how = rootfs.copy(src, dst)
	t.ok(how == "sparse" or how == "reflink", "copy: returns the method (" .. tostring(how) .. ")")
	t.is(sh("stat -c %s " .. q(dst)), "1073741824\n", "copy: same size (1 GiB)")
	t.ok(blocks(dst) < 2048, "copy: holes kept (" .. tostring(blocks(dst)) .. " blocks of 512 bytes allocated)")
	-- (cmp over 2 GiB of holes takes seconds here: check the data, and that no more
	-- blocks are allocated than in the source; a full cmp follows on a real image below)
	t.is(sh("head -c 4 " .. q(dst)), "head", "copy: data at the start")
	t.is(sh("dd if=" .. q(dst) .. " bs=1 skip=$((300 << 20)) count=6 status=none"), "middle",
		"copy: data in the middle")
	t.is(sh("tail -c 4 " .. q(dst)), "tail", "copy: data at the end")
	t.is(blocks(dst), blocks(src), "copy: as many blocks allocated as the source")
	t.is(sh("stat -c %a " .. q(dst)), "600\n", "copy: created 0600")
	if how == "sparse" then
		t.skip("reflink: " .. TMP .. " is on a filesystem without FICLONE (ext4)")
	else
		t.ok(true, "copy: reflink")
	end
	t.raises(function() rootfs.copy(src, dst) end, "create " .. esc(dst) .. ": File exists",
		"copy: an existing destination is an error")
	t.ok(blocks(dst) < 2048, "copy: ... and the existing file is left alone")
	t.raises(function() rootfs.copy(TMP .. "/nope", TMP .. "/x") end, "open " .. esc(TMP) .. "/nope: No such file",
		"copy: missing source")
	t.raises(function() rootfs.copy(TMP, TMP .. "/x") end, "is not a regular file", "copy: source is a directory")
	t.raises(function() rootfs.copy(src, TMP .. "/no/dir/x") end, "No such file or directory",
		"copy: destination directory missing")
	t.is(sh("ls " .. q(TMP)), "copy.img\nsparse.img\n", "copy: failed copies leave nothing behind")
	os.remove(dst)

	-- ---- a copy in two parts: the head, then the rest (a restore's disk) ----
	how = rootfs.copy(src, dst, { head = 1048576 })
	if how == "sparse" then
		t.is(sh("stat -c %s " .. q(dst)), "1073741824\n", "copy head: the full size at once")
		t.is(sh("head -c 4 " .. q(dst)), "head", "copy head: the data below head")
		t.is(sh("dd if=" .. q(dst) .. " bs=1 skip=$((300 << 20)) count=6 status=none"), "\0\0\0\0\0\0",
			"copy head: nothing past head yet")
		rootfs.copy_rest(src, dst, 1048576)
		t.is(sh("dd if=" .. q(dst) .. " bs=1 skip=$((300 << 20)) count=6 status=none"), "middle",
			"copy_rest: the data past head")
		t.is(sh("tail -c 4 " .. q(dst)), "tail", "copy_rest: data at the end")
		t.is(blocks(dst), blocks(src), "copy_rest: holes kept (as many blocks as the source)")
	else
		for _ = 1, 6 do t.skip("copy head: a reflink copies the whole file at once") end
	end
	t.raises(function() rootfs.copy_rest(src, TMP .. "/nope", 1048576) end, "rest of .*: No such file",
		"copy_rest: a missing destination")
	sh("truncate -s 1M " .. q(TMP .. "/short.img"))
	t.raises(function() rootfs.copy_rest(src, TMP .. "/short.img", 1048576) end, "Invalid argument",
		"copy_rest: a destination of another size is not the copy begun")
	t.raises(function() rootfs.copy(src, TMP .. "/x", { tail = 1 }) end, "unknown option", "copy: unknown option")
	os.remove(TMP .. "/short.img")
	os.remove(src)
	os.remove(dst)

	-- ---- qcow2 overlays (a throw-away VM's disk), checked by qemu-img ----
	qcow2_overlays()

	-- ---- files into an ext4 image ----
	local img = mkfs("disk.ext4", "64M")
	local fs = rootfs.open(img, "rw")
	t.like(tostring(fs), "fireclaw%.rootfs%.image: .*disk%.ext4 %(rw%)", "open rw")
	fs:mkdir("/root/.ssh", { mode = "0700" })
	local key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTests fireclaw\n"
	fs:write("/root/.ssh/authorized_keys", key, { mode = "0600" })
	fs:write("/etc/empty", "")
	fs:write("/etc/hostname", "first\n")
	fs:write("/etc/hostname", "vm-1\n")
	fs:write("/home/user/.profile", "export A=1\n", { mode = tonumber("640", 8), uid = 1000, gid = 1001 })
	local binary = {}
	for i = 0, 255 do binary[#binary + 1] = string.char(i) end
	binary = table.concat(binary):rep(4096) -- 1 MiB, every byte value, NULs included
	fs:write("/var/lib/blob", binary)
	for i = 1, 300 do fs:write(string.format("/many/file-%03d", i), "n" .. i) end
	t.is(fs:read("/root/.ssh/authorized_keys"), key, "read back: authorized_keys")
	t.is(fs:read("/etc/hostname"), "vm-1\n", "write replaces an existing file")
	t.is(fs:read("/etc/empty"), "", "an empty file")
	t.ok(fs:read("/var/lib/blob") == binary, "read back: 1 MiB of binary data")
	t.same(fs:stat("/root/.ssh/authorized_keys"),
		{ type = "file", mode = tonumber("600", 8), uid = 0, gid = 0, size = #key,
			mtime = fs:stat("/root/.ssh/authorized_keys").mtime, nlink = 1 },
		"stat: file mode 0600, owner root")
	t.is(fs:stat("/root/.ssh").mode, tonumber("700", 8), "stat: directory mode 0700")
	t.is(fs:stat("/root/.ssh").type, "dir", "stat: type dir")
	local prof = fs:stat("/home/user/.profile")
	t.ok(prof.mode == tonumber("640", 8) and prof.uid == 1000 and prof.gid == 1001, "stat: mode and owner from opts")
	t.ok(fs:stat("/home/user").uid == 1000 and fs:stat("/home/user").mode == tonumber("755", 8),
		"parent directories made with 0755 and the file's owner")
	t.is(#fs:list("/many"), 300, "list: 300 entries (the directory grew)")
	t.same(fs:list("/"), { "etc", "home", "lost+found", "many", "root", "var" }, "list: sorted, no . or ..")
	t.is(fs:exists("/etc/hostname"), true, "exists: file")
	t.is(fs:exists("/etc/nope"), false, "exists: missing")
	t.is(fs:exists("/etc/hostname/x"), false, "exists: below a file")
	t.is(fs:exists("/"), true, "exists: root")
	fs:mkdir("/root/.ssh", { mode = "0700" })
	t.is(fs:stat("/root/.ssh").mode, tonumber("700", 8), "mkdir on an existing directory keeps it (mkdir -p)")
	fs:mkdir("/srv/a/b", { mode = "0750" })
	t.ok(fs:stat("/srv/a/b").mode == tonumber("750", 8) and fs:stat("/srv/a").mode == tonumber("755", 8),
		"mkdir: parents 0755, the last one as asked")
	fs:write("/opt/x/y", "z", { dir_mode = "0711" })
	t.is(fs:stat("/opt/x").mode, tonumber("711", 8), "write: dir_mode for created parents")
	t.is(fs:remove("/many/file-001"), true, "remove: a file")
	t.is(fs:remove("/many/file-001"), false, "remove: false when already gone")
	t.raises(function() fs:remove("/many") end, "remove /many in disk%.ext4: directory not empty", "remove: non-empty dir")
	t.is(fs:remove("/srv/a/b"), true, "remove: an empty directory")
	t.is(fs:exists("/srv/a/b"), false, "remove: directory gone")
	fs:close()
	fs:close()
	t.raises(function() fs:read("/etc/hostname") end, "is closed", "a closed handle raises")
	t.ok(fsck_clean(img), "e2fsck -fn: clean after writes, replacements and removals")
	local copy = TMP .. "/disk-copy.ext4"
	rootfs.copy(img, copy)
	local _, same = sh("cmp " .. q(img) .. " " .. q(copy))
	t.ok(same, "copy of the image: identical to the original (cmp)")
	t.ok(blocks(copy) <= blocks(img), "copy of the image: no more blocks than the original")
	t.ok(fsck_clean(copy), "copy of the image: e2fsck clean")
	t.is(rootfs.read(copy, "/root/.ssh/authorized_keys"), key, "copy of the image: files readable")
	os.remove(copy)
	-- to another filesystem (tmpfs): copy_file_range says EXDEV, read/write takes over
	local shm = sh("mktemp -d -p /dev/shm 2>/dev/null"):gsub("%s+$", "")
	if shm:match("^/dev/shm/") then
		SHM = shm
		t.is(rootfs.copy(img, shm .. "/disk.ext4"), "sparse", "copy to tmpfs: a sparse copy")
		local _, same2 = sh("cmp " .. q(img) .. " " .. q(shm .. "/disk.ext4"))
		t.ok(same2, "copy to tmpfs (read/write fallback): identical")
		t.ok(blocks(shm .. "/disk.ext4") <= blocks(img), "copy to tmpfs: holes kept")
	else
		t.skip("no /dev/shm to copy across filesystems")
		t.skip("no /dev/shm")
		t.skip("no /dev/shm")
	end

	-- the same, seen by debugfs
	local st = debugfs(img, "stat /root/.ssh/authorized_keys")
	t.like(st, "Type: regular%s+Mode:%s+0600", "debugfs: regular file, mode 0600")
	t.like(st, "User:%s+0%s+Group:%s+0", "debugfs: owned by root")
	t.like(debugfs(img, "stat /root/.ssh"), "Type: directory%s+Mode:%s+0700", "debugfs: .ssh is a 0700 directory")
	t.like(debugfs(img, "stat /home/user/.profile"), "User:%s+1000%s+Group:%s+1001", "debugfs: uid/gid 1000/1001")
	t.is(debugfs(img, "cat /root/.ssh/authorized_keys"):gsub("^debugfs [^\n]*\n", ""), key, "debugfs: same contents")
	sh("debugfs -R " .. q("dump /var/lib/blob " .. TMP .. "/blob") .. " " .. q(img))
	local f = io.open(TMP .. "/blob", "rb")
	t.ok(f and f:read("*a") == binary, "debugfs: same binary contents")
	if f then f:close() end

	-- symlinks resolve inside the image
	sh("debugfs -w -R " .. q("symlink /etc/alt /root/.ssh") .. " " .. q(img))
	rootfs.write(img, "/etc/alt/extra", "via link\n")
	t.is(rootfs.read(img, "/root/.ssh/extra"), "via link\n", "write through a symlinked directory")
	t.is(rootfs.read(img, "/etc/alt/authorized_keys"), key, "read through a symlink")
	t.is(rootfs.stat(img, "/etc/alt").type, "symlink", "stat does not follow the last symlink")
	t.is(rootfs.remove(img, "/etc/alt"), true, "remove a symlink")
	t.is(rootfs.exists(img, "/root/.ssh/extra"), true, "... not what it points to")

	-- module-level conveniences
	rootfs.mkdir(img, "/etc/network", { mode = "0755" })
	rootfs.write(img, "/etc/network/interfaces", "auto eth0\n")
	t.is(rootfs.read(img, "/etc/network/interfaces"), "auto eth0\n", "rootfs.write/read")
	t.same(rootfs.list(img, "/etc/network"), { "interfaces" }, "rootfs.list")
	t.is(rootfs.exists(img, "/etc/network/interfaces"), true, "rootfs.exists")
	t.is(rootfs.remove(img, "/etc/network/interfaces"), true, "rootfs.remove")
	t.ok(fsck_clean(img), "e2fsck -fn: clean after the conveniences")

	-- read-only handles
	local ro = rootfs.open(img)
	t.is(ro:read("/etc/hostname"), "vm-1\n", "open defaults to read-only, reads work")
	t.raises(function() ro:write("/etc/hostname", "x") end, "write /etc/hostname in disk%.ext4: image opened read%-only",
		"read-only handle refuses writes")
	ro:close()

	-- ---- failure paths ----
	t.raises(function() rootfs.read(TMP .. "/missing.ext4", "/x") end,
		"^rootfs: open " .. esc(TMP) .. "/missing%.ext4: no such file or directory$", "missing image")
	sh("truncate -s 1M " .. q(TMP .. "/zeros.img"))
	t.raises(function() rootfs.open(TMP .. "/zeros.img", "rw") end,
		"^rootfs: open " .. esc(TMP) .. "/zeros%.img: not an ext2/3/4 filesystem$", "not ext4: zeros")
	sh("echo hello > " .. q(TMP .. "/text.img"))
	t.raises(function() rootfs.open(TMP .. "/text.img") end, "text%.img: not an ext2/3/4 filesystem", "not ext4: small text file")
	t.raises(function() rootfs.open(TMP) end, "is a directory", "image path is a directory")
	t.raises(function() rootfs.read(img, "/etc") end, "^rootfs: read /etc in disk%.ext4: is a directory$", "read a directory")
	t.raises(function() rootfs.read(img, "/etc/nope") end, "read /etc/nope in disk%.ext4: no such file or directory",
		"read a missing file")
	t.raises(function() rootfs.write(img, "/etc", "x") end, "write /etc in disk%.ext4: is a directory", "write onto a directory")
	t.raises(function() rootfs.write(img, "/etc/hostname/x", "x") end, "not a directory", "write below a file")
	t.raises(function() rootfs.mkdir(img, "/etc/hostname") end, "mkdir /etc/hostname in disk%.ext4: not a directory",
		"mkdir over a file")
	t.raises(function() rootfs.list(img, "/etc/hostname") end, "not a directory", "list a file")
	t.lives(function() rootfs.mkdir(img, "/", { mode = "0755" }) end, "mkdir / (it exists) is fine")
	t.raises(function() rootfs.write(img, "etc/x", "x") end, "bad path 'etc/x'", "relative path refused")
	t.raises(function() rootfs.write(img, "/x", "y", { mode = "9" }) end, "bad octal mode", "bad mode string")
	t.raises(function() rootfs.open(img, "w") end, 'mode must be "r" or "rw"', "bad open mode")
	t.ok(fsck_clean(img), "e2fsck -fn: clean after the refused operations")

	-- a journal that needs recovery: no writing
	sh("debugfs -w -R " .. q("feature needs_recovery") .. " " .. q(img))
	t.raises(function() rootfs.open(img, "rw") end, "journal needs recovery.*e2fsck %-fy", "needs_recovery: rw refused")
	t.is(rootfs.read(img, "/etc/hostname"), "vm-1\n", "needs_recovery: reading still works")
	sh("debugfs -w -R " .. q("feature ^needs_recovery") .. " " .. q(img))

	-- a full image
	local tiny = mkfs("tiny.ext4", "1M")
	rootfs.write(tiny, "/keep", "old contents\n")
	t.raises(function() rootfs.write(tiny, "/big", ("x"):rep(2 * 1024 * 1024)) end,
		"^rootfs: write /big in tiny%.ext4: no space left on device$", "full image: clear error")
	t.ok(fsck_clean(tiny), "full image: e2fsck clean after the failed write")
	t.is(rootfs.exists(tiny, "/big"), false, "full image: no partial file left")
	t.raises(function() rootfs.write(tiny, "/keep", ("y"):rep(2 * 1024 * 1024)) end, "no space left on device",
		"full image: replacing a file with too much data fails ...")
	t.is(rootfs.read(tiny, "/keep"), "old contents\n", "... and the old file is intact")
	t.ok(fsck_clean(tiny), "full image: e2fsck clean after the failed replacement")
	local tfs = rootfs.open(tiny, "rw")
	local made, err = 0
	while true do
		local ok, e = pcall(tfs.mkdir, tfs, "/d" .. made .. "/sub")
		if not ok then err = e break end
		made = made + 1
	end
	tfs:close()
	t.like(err, "mkdir /d%d+/sub in tiny%.ext4: no space left on device", "full image: mkdir fails cleanly (" .. made .. " made)")
	t.ok(fsck_clean(tiny), "full image: e2fsck clean after running out of inodes/blocks in mkdir")
	local filled = 0
	tfs = rootfs.open(tiny, "rw")
	while pcall(tfs.write, tfs, "/f" .. filled, ("z"):rep(700)) do filled = filled + 1 end
	tfs:close()
	t.ok(fsck_clean(tiny), "full image: e2fsck clean after filling it with small files (" .. filled .. ")")
	t.is(rootfs.read(tiny, "/keep"), "old contents\n", "full image: earlier files still readable")
end

local ok, err = pcall(body)
t.ok(ok, "tests ran to the end", err)
sh("rm -rf " .. q(TMP))
if SHM then sh("rm -rf " .. q(SHM)) end
collectgarbage()
t.is(open_fds(), fds_before, "no file descriptor leaked")
t.ok(not io.open(TMP) and not (SHM and io.open(SHM)), "temp directories removed")
return t.done()
