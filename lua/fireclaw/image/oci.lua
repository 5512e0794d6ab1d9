-- fireclaw.image.oci: a container image (`image import --oci PATH`) as a root filesystem
-- tree: a `docker save` tarball or an OCI image layout (directory or tarball). Reads its
-- manifest and config (digests checked), then applies the layers in order:
--
--   * each layer is extracted by GNU tar into a fresh empty staging directory: members
--     with '..' and hard links to outside the layer make tar fail, and the layer is refused
--     as a whole; tar never follows a symlink the layer made (it creates symlinks last), so
--     a layer's "symlink, then a file through it" is refused too;
--   * the staging tree is then merged into the image tree: whiteouts (.wh.NAME removes
--     NAME, .wh..wh..opq empties its directory of what lower layers put there) first,
--     then every entry — a directory the tree has (also through a symlink, resolved
--     inside the tree as if it were /) is merged into, anything else replaces what is
--     there without following it. Device nodes are skipped with a note (the guest's
--     devtmpfs has the real ones). Nothing is ever written outside the tree.
--
-- The config's Env, WorkingDir, User, Entrypoint and Cmd become the manifest's
-- `container` table (fireclaw.image.command makes the command line `run` uses).
local common = require "fireclaw.image.common"
local fs = require "fireclaw.fs"
local json = require "fireclaw.json"
local proc = require "fireclaw.proc"
local runtime = require "fireclaw.runtime"
local sys = require "fireclaw.sys"
local unpack = require "fireclaw.image.unpack"

local fail, log, run = common.fail, common.log, common.run

local M = {}

local MAX_JSON = 4 * 1024 * 1024
local INDEX_TYPES = { ["application/vnd.oci.image.index.v1+json"] = true,
	["application/vnd.docker.distribution.manifest.list.v2+json"] = true }

-- A relative path inside the source `root` (a docker save names its files so), checked.
local function inside(root, rel, what)
	if type(rel) ~= "string" or rel == "" or rel:sub(1, 1) == "/" or ("/" .. rel .. "/"):find("/../", 1, true) then
		fail("the image names %s '%s': not a plain relative path inside it", what, tostring(rel))
	end
	-- (an older docker save links equal layers to each other: followed inside root)
	local path = root .. "/" .. unpack.resolve_in(root, rel)
	local st = sys.lstat(path)
	if not st or st.type ~= "file" then fail("the image's %s '%s' is missing or not a regular file", what, rel) end
	return path
end

local function read_json(path, what)
	local st = sys.lstat(path) -- (a symlink from the archive would lead out of it)
	if not st then fail("the image has no %s (%s)", what, path) end
	if st.type ~= "file" then fail("the image's %s is not a regular file", what) end
	if st.size > MAX_JSON then fail("the image's %s is %d bytes: more than a JSON file here may be", what, st.size) end
	local ok, v = pcall(json.decode, fs.read(path))
	if not ok or type(v) ~= "table" then fail("the image's %s is not valid JSON: %s", what, tostring(v)) end
	return v
end

-- blobs/ALG/HEX for a digest, checked against the file's sha256.
local function blob(root, digest, what)
	local alg, hex = tostring(digest):match("^(%w+):(%x+)$")
	if alg ~= "sha256" or #hex ~= 64 then fail("the image's %s has an unsupported digest '%s' (sha256 only)", what, tostring(digest)) end
	local path = inside(root, "blobs/sha256/" .. hex, what)
	local sum = common.sha256({ path })[path]
	if sum ~= hex then fail("the image's %s does not match its digest %s (corrupt or tampered with)", what, digest) end
	return path
end

-- An OCI image layout: index.json -> (index ->) manifest for linux/amd64.
local function oci_layout(root)
	local index = read_json(root .. "/index.json", "index.json")
	local desc
	for _ = 1, 4 do
		local list = index.manifests
		if type(list) ~= "table" or #list == 0 then fail("the image's index lists no manifest") end
		desc = nil
		for _, d in ipairs(list) do
			local pl = d.platform
			if not pl or (pl.os == "linux" and pl.architecture == "amd64") then
				desc = d
				break
			end
		end
		if not desc then fail("the image has no linux/amd64 manifest") end
		if not INDEX_TYPES[desc.mediaType] then break end
		index = read_json(blob(root, desc.digest, "index"), "index")
	end
	local m = read_json(blob(root, desc.digest, "manifest"), "manifest")
	if type(m.config) ~= "table" or type(m.layers) ~= "table" then fail("the image's manifest has no config or layers") end
	local layers = {}
	for i, l in ipairs(m.layers) do
		local mt = tostring(l.mediaType)
		if mt:find("zstd", 1, true) then fail("layer %d is zstd-compressed: not supported (gzip or plain tar only)", i) end
		layers[i] = { path = blob(root, l.digest, "layer " .. i), digest = l.digest }
	end
	return { format = "oci", manifest_digest = desc.digest, config_digest = m.config.digest,
		config = blob(root, m.config.digest, "config"), layers = layers,
		tags = json.array({ desc.annotations and desc.annotations["org.opencontainers.image.ref.name"] or nil }) }
end

-- A docker save tarball's manifest.json (extracted into root).
local function docker_save(root)
	local list = read_json(root .. "/manifest.json", "manifest.json")
	local m = list[1]
	if type(m) ~= "table" or type(m.Layers) ~= "table" then fail("the image's manifest.json lists no image") end
	if #list > 1 then log("import: the tarball holds %d images; importing the first (%s)", #list,
		table.concat(type(m.RepoTags) == "table" and m.RepoTags or {}, ",")) end
	local config = inside(root, m.Config, "config")
	local layers = {}
	for i, l in ipairs(m.Layers) do layers[i] = { path = inside(root, l, "layer " .. i), digest = nil } end
	local sums = common.sha256({ config })
	return { format = "docker-save", config_digest = "sha256:" .. sums[config], config = config, layers = layers,
		tags = json.array(type(m.RepoTags) == "table" and m.RepoTags or {}) }
end

-- Open `path` (a directory or a tarball; tarballs are extracted into scratch/src).
function M.open(path, scratch)
	local st = sys.stat(path)
	if not st then fail("no such file or directory: %s (--oci)", path) end
	local root = path
	if st.type ~= "directory" then
		root = scratch .. "/src"
		fs.mkdir_p(root, "700")
		run("unpacking the image archive " .. path, { "tar", "--no-same-owner", "--no-same-permissions", "-xf", path, "-C", root })
	end
	local src
	if sys.lstat(root .. "/manifest.json") then
		src = docker_save(root)
	elseif sys.lstat(root .. "/index.json") then
		src = oci_layout(root)
	else
		fail("%s is neither a docker save tarball (manifest.json) nor an OCI image layout (index.json)", path)
	end
	local cfg = read_json(src.config, "config")
	if cfg.architecture and cfg.architecture ~= "amd64" then fail("the image is for %s, not amd64", tostring(cfg.architecture)) end
	src.container = M.container(cfg.config or {})
	src.path = path
	return src
end

local function strings(v, what)
	if v == nil or v == json.null then return json.array() end
	if type(v) ~= "table" then fail("the image config's %s is not a list", what) end
	local out = json.array()
	for i, s in ipairs(v) do
		if type(s) ~= "string" then fail("the image config's %s has a non-string entry", what) end
		out[i] = s
	end
	return out
end

-- The container settings `run` honours, from the config's `config` object.
function M.container(c)
	local env = strings(c.Env, "Env")
	for _, e in ipairs(env) do
		if not e:match("^[%a_][%w_]*=") then fail("the image config's Env has a bad entry '%s'", e) end
	end
	local function str(v) return type(v) == "string" and v ~= "" and v or nil end
	return { entrypoint = strings(c.Entrypoint, "Entrypoint"), cmd = strings(c.Cmd, "Cmd"), env = env,
		working_dir = str(c.WorkingDir), user = str(c.User) }
end

-- ---- layers ----

local function ltype(path)
	local st = sys.lstat(path)
	return st and st.type or nil
end

-- Empty the directory `dir` of the tree (an opaque whiteout).
local function empty_dir(dir)
	for _, e in ipairs(runtime.listdir(dir) or {}) do
		if e ~= "." and e ~= ".." then fs.rm_rf(dir .. "/" .. e) end
	end
end

-- Merge staging directory `src` into tree/`rel` (a real directory of the tree).
local function merge(src, tree, rel, notes)
	local names = runtime.listdir(src) or {}
	table.sort(names)
	local dir = rel == "" and tree or (tree .. "/" .. rel)
	for _, e in ipairs(names) do
		if e == ".wh..wh..opq" then empty_dir(dir) end
	end
	for _, e in ipairs(names) do
		local gone = e:match("^%.wh%.(.+)$")
		if gone and e ~= ".wh..wh..opq" then
			if gone ~= "." and gone ~= ".." and not gone:find("/", 1, true) then fs.rm_rf(dir .. "/" .. gone) end
		end
	end
	for _, e in ipairs(names) do
		if not e:match("^%.wh%.") then
			local s, d, r = src .. "/" .. e, dir .. "/" .. e, rel == "" and e or (rel .. "/" .. e)
			local sk, dk = ltype(s), ltype(d)
			if sk == "char" or sk == "block" or sk == "socket" then
				notes.devices = notes.devices + 1
				if notes.devices <= 3 then log("import: skipping /%s (a %s device node; the guest's /dev has the real ones)", r, sk) end
			elseif sk == "directory" and dk == "directory" then
				local st = sys.lstat(s)
				sys.chmod(d, st.perm)
				merge(s, tree, r, notes)
			elseif sk == "directory" and dk == "link" then
				-- bin -> usr/bin and the like: merged into where it leads, inside the tree
				local into = unpack.resolve_in(tree, r)
				if into ~= "" and ltype(tree .. "/" .. into) == "directory" then
					merge(s, tree, into, notes)
				else
					fs.rm_rf(d)
					assert(os.rename(s, d))
				end
			else
				if dk then fs.rm_rf(d) end
				local ok, err = os.rename(s, d)
				if not ok then fail("applying a layer: moving /%s into the image: %s", r, tostring(err)) end
			end
		end
	end
end

-- Apply layer `i` (file) to tree. notes counts skipped device nodes.
function M.apply(layer, tree, i, notes)
	local staging = tree:gsub("/+$", "") .. ".layer~" .. proc.getpid()
	fs.rm_rf(staging)
	fs.mkdir_p(staging, "755")
	local ok, err = pcall(function()
		-- (xattrs: file capabilities live there)
		local r = common.try_run({ "tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf", layer.path,
			"-C", staging })
		if r.status ~= 0 or r.signal then
			local first -- tar's first error (its "Removing leading" lines are warnings)
			for line in (r.stderr or ""):gmatch("tar: ([^\n]+)") do
				if not line:match("^Removing leading") and not line:match("^Exiting with failure") then
					first = first or line
				end
			end
			first = first or ("tar exited with status " .. tostring(r.status))
			fail("layer %d%s refused: %s (a layer may not name paths outside the image, hard links out of "
				.. "it, or files below its own symlinks)", i, layer.digest and (" (" .. layer.digest:sub(1, 19) .. ")") or "", first)
		end
		merge(staging, tree, "", notes)
	end)
	pcall(fs.rm_rf, staging)
	if not ok then error(err, 0) end
end

-- Apply every layer of `src` to `tree` (empty). Returns {layers=, devices_skipped=}.
function M.tree(src, tree)
	fs.mkdir_p(tree, "755")
	local notes = { devices = 0 }
	for i, l in ipairs(src.layers) do M.apply(l, tree, i, notes) end
	if notes.devices > 3 then log("import: skipped %d device nodes in all", notes.devices) end
	return { layers = #src.layers, devices_skipped = notes.devices }
end

return M
