-- fireclaw.image.unpack: .deb packages into a directory tree that stands for the guest's
-- / — never writing outside it: symlinks from packages (bin -> usr/bin, etc/x -> /tmp/y,
-- ../../x) are resolved inside the tree as if it were the root. Also copies a program
-- with its shared-library closure from one such tree into another.
local common = require "fireclaw.image.common"
local elf = require "fireclaw.image.elf"
local fs = require "fireclaw.fs"
local proc = require "fireclaw.proc"
local runtime = require "fireclaw.runtime"

local fail = common.fail

local M = {}

-- Resolve `rel` inside `root` following symlinks as if root were / (absolute links in
-- unpacked packages must not lead to the host's files). Returns the path relative to root.
function M.resolve_in(root, rel)
	local parts, cur, i, hops = {}, {}, 1, 0
	for c in rel:gmatch("[^/]+") do parts[#parts + 1] = c end
	while i <= #parts do
		local c = parts[i]
		if c == ".." then
			cur[#cur] = nil
		elseif c ~= "." then
			local here = root .. "/" .. table.concat(cur, "/") .. (#cur > 0 and "/" or "") .. c
			local t = fs.readlink(here)
			if t then
				hops = hops + 1
				if hops > 40 then fail("too many levels of symlinks in %s/%s", root, rel) end
				local rest = {}
				for c2 in t:gmatch("[^/]+") do rest[#rest + 1] = c2 end
				for j = i + 1, #parts do rest[#rest + 1] = parts[j] end
				if t:sub(1, 1) == "/" then cur = {} end
				parts, i = rest, 0
			else
				cur[#cur + 1] = c
			end
		end
		i = i + 1
	end
	return table.concat(cur, "/")
end

-- `tree`/`rel` with every directory on the way resolved inside the tree (symlinks from
-- packages included), so that what is written there lands inside the tree; `whole` also
-- resolves the last component (a directory to create or enter).
function M.in_tree(tree, rel, whole)
	local dir, base = rel:match("^(.*)/([^/]+)$")
	if whole or not dir then
		dir, base = whole and rel or "", not whole and rel or nil
	end
	local r = M.resolve_in(tree, dir)
	return tree .. (r ~= "" and "/" .. r or "") .. (base and "/" .. base or "")
end

-- "link", "dir", "file" (anything else that exists) or nil; symlinks are not followed.
local function kind(path)
	if fs.readlink(path) then return "link" end
	if fs.is_dir(path) then return "dir" end
	if fs.exists(path) then return "file" end
	return nil
end

-- Move the entries of the directory `src` into `tree`/`rel` (`rel` names a directory
-- inside the tree and has no symlink in it). A directory the tree already has — also
-- through a symlink, resolved inside the tree as dpkg does for bin -> usr/bin — is merged
-- into; anything else is renamed into place, which replaces a file or symlink there
-- without following it.
local function merge_into(src, tree, rel, pkg)
	for _, e in ipairs(runtime.listdir(src) or {}) do
		local s, r = src .. "/" .. e, rel == "" and e or rel .. "/" .. e
		local d = tree .. "/" .. r
		local sk, dk = kind(s), kind(d)
		if sk == "dir" and dk then
			local into = dk == "link" and M.resolve_in(tree, r) or r
			if kind(tree .. "/" .. into) ~= "dir" then
				fail("cannot unpack %s: it has a directory /%s, but in the image /%s is %s; refusing to write outside the image",
					pkg, r, r, dk == "link" and ("a symlink to " .. fs.readlink(d) .. " that leads to no directory inside it")
						or "not a directory")
			end
			merge_into(s, tree, into, pkg)
		elseif dk == "dir" then
			fail("cannot unpack %s: its /%s would replace the image's directory /%s", pkg, r, r)
		else
			local ok, err = os.rename(s, d)
			if not ok then fail("cannot unpack %s: moving /%s into the image: %s", pkg, r, tostring(err)) end
		end
	end
end

-- Unpack the files of a .deb into `tree` as dpkg would, never writing outside it: tar
-- extracts into a fresh empty directory beside the tree (no symlink there to follow; GNU
-- tar also refuses to write below a symlink it extracted itself), then merge_into moves
-- the entries in, following the tree's symlinks only as if the tree were / — a package's
-- etc/foo -> /tmp/x or -> ../../../x cannot make a later one write to the host.
function M.unpack_into(deb, tree)
	local pkg = deb:match("[^/]+$")
	local staging = tree:gsub("/+$", "") .. ".unpack~" .. proc.getpid()
	fs.rm_rf(staging)
	fs.mkdir_p(staging, "755")
	local ok, err = pcall(function()
		common.run("unpacking " .. pkg, { "bash", "-o", "pipefail", "-c",
			'dpkg-deb --fsys-tarfile "$1" | tar -x -C "$2"', "unpack", deb, staging })
		merge_into(staging, tree, "", pkg)
	end)
	pcall(fs.rm_rf, staging)
	if not ok then error(err, 0) end
end

-- The real file in `stage` that path `rel` names, or nil.
function M.stage_file(stage, rel)
	local path = stage .. "/" .. M.resolve_in(stage, rel)
	return fs.exists(path) and path or nil
end
local stage_file = M.stage_file

local LIBDIRS = { "usr/lib/x86_64-linux-gnu", "usr/lib64", "usr/lib", "lib/x86_64-linux-gnu" }

-- The shared library `lib` (a DT_NEEDED name) in `stage`: its path relative to stage in
-- the first library directory that has it; raises naming `needed_by` if none does.
function M.find_lib(stage, lib, needed_by)
	for _, d in ipairs(LIBDIRS) do
		if stage_file(stage, d .. "/" .. lib) then return d .. "/" .. lib end
	end
	fail("library %s needed by %s is in none of the packages", lib, needed_by)
end

-- Copy an ELF and its shared-library closure from `stage` (unpacked packages, merged /usr)
-- into tree, under the same paths.
function M.copy_with_libs(stage, tree, relpath, done)
	local src = stage_file(stage, relpath)
	local data = src and fs.read(src)
	if not data then fail("%s is missing from the unpacked packages", relpath) end
	local dst = M.in_tree(tree, relpath)
	fs.mkdir_p(dst:match("^(.*)/"), "755")
	if not fs.exists(dst) then common.copy(src, dst) end
	local info = elf.elf_info(data)
	if not info then return end
	if info.interp and not done[info.interp] then
		done[info.interp] = true
		local rel = info.interp:gsub("^/", "")
		if not stage_file(stage, rel) then fail("loader %s (for %s) not in the packages", info.interp, relpath) end
		M.copy_with_libs(stage, tree, rel, done)
	end
	for _, lib in ipairs(info.needed) do
		if not done[lib] then
			done[lib] = true
			M.copy_with_libs(stage, tree, M.find_lib(stage, lib, relpath), done)
		end
	end
end

return M
