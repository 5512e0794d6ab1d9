-- fireclaw.image.initrd: the initramfs — its /init (guest.init(): guest/fireclaw-init.c,
-- static) and the kernel modules (put into tree/lib/modules by fireclaw.image.kernel) with
-- their load order in lib/modules/order, as a reproducible newc cpio owned by root. No
-- shell: /init forks nothing before the agent (every exec is slow under TCG).
local common = require "fireclaw.image.common"
local fs = require "fireclaw.fs"
local guest = require "fireclaw.guest"

local run = common.run

local M = {}

-- Write out/initrd from tree (which holds lib/modules/*.ko already); modules is the load
-- order. Returns the size in bytes.
function M.build(tree, modules, out)
	for _, d in ipairs({ "dev", "proc", "sys", "newroot", "lib/modules" }) do fs.mkdir_p(tree .. "/" .. d, "755") end
	fs.write(tree .. "/init", guest.init(), "755")
	fs.write(tree .. "/lib/modules/order", table.concat(modules, "\n") .. "\n", "644")
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
