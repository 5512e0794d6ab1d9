-- fireclaw.image.initrd: the initramfs — busybox, the kernel modules in load order (put
-- into tree/lib/modules by fireclaw.image.kernel) and guest.initrd_init, as a
-- reproducible newc cpio owned by root.
local common = require "fireclaw.image.common"
local fs = require "fireclaw.fs"
local guest = require "fireclaw.guest"

local run = common.run

local M = {}

-- The static busybox of the base packages, unpacked into scratch/busybox. Returns its path.
function M.busybox(p, debs, scratch)
	local busybox_deb
	for _, r in ipairs(p.base) do if r.Package == "busybox-static" then busybox_deb = debs[r.Package] end end
	local bbdir = scratch .. "/busybox"
	fs.mkdir_p(bbdir, "755")
	run("unpacking busybox-static", { "dpkg-deb", "-x", busybox_deb, bbdir })
	return bbdir .. "/bin/busybox"
end

-- Write out/initrd from tree (which holds lib/modules/*.ko already); modules is the load
-- order. Returns the size in bytes.
function M.build(busybox, tree, modules, out)
	for _, d in ipairs({ "bin", "dev", "proc", "sys", "newroot" }) do fs.mkdir_p(tree .. "/" .. d, "755") end
	common.copy(busybox, tree .. "/bin/busybox")
	fs.chmod(tree .. "/bin/busybox", "755")
	fs.write(tree .. "/init", guest.initrd_init(modules), "755")
	fs.chmod(tree, "755")
	local list = run("listing the initramfs", { "find", ".", "-mindepth", "1" }, { cwd = tree }).stdout
	local names = {}
	for l in list:gmatch("[^\n]+") do names[#names + 1] = l end
	table.sort(names)
	local r = run("making the initramfs", { "cpio", "--quiet", "-o", "-H", "newc", "--reproducible",
		"-R", "0:0" }, { cwd = tree, stdin = table.concat(names, "\n") .. "\n" })
	fs.write(out .. "/initrd", r.stdout, "644")
	return #r.stdout
end

return M
