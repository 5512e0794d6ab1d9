-- fireclaw.image.packages: Debian packages through apt — records (apt-cache show), the
-- dependency closure (apt-cache depends), and the .debs in cache/debs (apt-get download,
-- checked against the archive's SHA256).
-- Environment: FIRECLAW_APT_OPTIONS="Opt::A=x Opt::B=y" adds apt -o options (a proxy, a mirror).
local common = require "fireclaw.image.common"
local fs = require "fireclaw.fs"
local proc = require "fireclaw.proc"
local runtime = require "fireclaw.runtime"

local fail, log, try_run = common.fail, common.log, common.try_run
local cache_dir, human, mkdir_p = common.cache_dir, common.human, common.mkdir_p

local M = {}

-- Options for every apt call. Where apt keeps no binary cache (Debian's docker images set
-- Dir::Cache::pkgcache ""), each call rebuilds it (~1 s): then keep our own in cache/apt.
local system_pkgcache
local function apt_options()
	local o = {}
	if system_pkgcache == nil then
		local r = try_run({ "apt-config", "dump", "Dir::Cache::pkgcache" })
		system_pkgcache = r.stdout:match('pkgcache "([^"]+)"') ~= nil
	end
	if not system_pkgcache then
		mkdir_p(cache_dir() .. "/apt", "755")
		o = { "-o", "Dir::Cache::pkgcache=" .. cache_dir() .. "/apt/pkgcache.bin", "-o", "Dir::Cache::srcpkgcache=" }
	end
	-- FIRECLAW_APT_OPTIONS="Acquire::http::Proxy=http://… Other::Opt=x" (a mirror, a proxy)
	for opt in (os.getenv("FIRECLAW_APT_OPTIONS") or ""):gmatch("%S+") do
		o[#o + 1] = "-o"
		o[#o + 1] = opt
	end
	return o
end

local function apt_cache(_what, args)
	local argv = { "apt-cache" }
	for _, a in ipairs(apt_options()) do argv[#argv + 1] = a end
	for _, a in ipairs(args) do argv[#argv + 1] = a end
	return try_run(argv)
end

-- Parse deb822 stanzas (apt-cache show output) -> list of {Field = value}
function M.parse_records(text)
	local recs, cur, last = {}, nil, nil
	for line in (text .. "\n"):gmatch("([^\n]*)\n") do
		if line == "" then
			if cur then recs[#recs + 1] = cur end
			cur, last = nil, nil
		elseif line:match("^%s") then
			if cur and last then cur[last] = cur[last] .. "\n" .. line end
		else
			local k, v = line:match("^([%w-]+):%s*(.*)$")
			if k then
				cur = cur or {}
				cur[k] = v
				last = k
			end
		end
	end
	if cur then recs[#recs + 1] = cur end
	return recs
end

-- Candidate records of packages by name; raises for a name apt does not know.
function M.show(names)
	if #names == 0 then return {} end
	local args = { "show", "--no-all-versions" }
	for _, n in ipairs(names) do args[#args + 1] = n end
	local r = apt_cache("looking up packages", args)
	local by = {}
	for _, rec in ipairs(M.parse_records(r.stdout)) do
		if rec.Package and not by[rec.Package] then by[rec.Package] = rec end
	end
	for _, n in ipairs(names) do
		if not by[n] then
			fail("Debian package '%s' not found (apt-cache policy %s)", n, n)
		end
	end
	return by
end

-- The package names in a Depends/Pre-Depends field, first alternative of each group.
function M.depends_names(field)
	local out = {}
	for group in (field or ""):gmatch("[^,]+") do
		local first = group:match("^%s*([%w.+-]+)")
		if first then out[#out + 1] = first end
	end
	return out
end

-- `apt-cache depends --recurse` output -> {name = {groups = {{alt, …}, …}}} (a group: the
-- alternatives of one Depends/PreDepends; alt = {name=, virtual=, providers={…}})
local function depends_blocks(text)
	local blocks = {}
	local cur, group_open
	for line in text:gmatch("[^\n]+") do
		if not line:match("^%s") then
			local name = line:match("^(%S+)")
			if name:match("^<") then
				cur = nil
			else
				cur = { groups = {} }
				blocks[name] = cur
			end
			group_open = false
		elseif cur then
			local bar, kind, target = line:match("^ (.)(%a+): (%S+)")
			if kind then
				local alt = { name = target:match("^<(.*)>$") or target, virtual = target:match("^<") ~= nil,
					providers = {} }
				if (kind == "Depends" or kind == "PreDepends") then
					if group_open then
						table.insert(cur.groups[#cur.groups], alt)
					else
						cur.groups[#cur.groups + 1] = { alt }
					end
					group_open = bar == "|"
				else
					group_open = false
				end
				cur.last = alt
			else
				local provider = line:match("^    (%S+)$")
				if provider and cur.last then table.insert(cur.last.providers, provider) end
			end
		end
	end
	return blocks
end

-- Resolve the dependency closure from `apt-cache depends --recurse` output: follow
-- Depends and PreDepends from the roots; of alternatives (a | b) and of a virtual
-- package's providers take one already chosen, else the first real one.
-- Returns the sorted list of real package names.
function M.resolve_depends(text, roots)
	local blocks = depends_blocks(text)
	local chosen, list, queue = {}, {}, {}
	local function choose(name)
		if not chosen[name] and blocks[name] then
			chosen[name] = true
			list[#list + 1] = name
			queue[#queue + 1] = name
		end
	end
	for _, r in ipairs(roots) do choose(r) end
	local i = 1
	while i <= #queue do
		for _, group in ipairs(blocks[queue[i]].groups) do
			local done = false
			for _, alt in ipairs(group) do
				if chosen[alt.name] then done = true end
				for _, p in ipairs(alt.providers) do
					if chosen[p] then done = true end
				end
			end
			if not done then
				for _, alt in ipairs(group) do
					if not alt.virtual and blocks[alt.name] then
						choose(alt.name)
						break
					end
					for _, p in ipairs(alt.providers) do
						if blocks[p] then
							choose(p)
							done = true
							break
						end
					end
					if done then break end
				end
			end
		end
		i = i + 1
	end
	table.sort(list)
	return list
end

function M.closure(roots)
	local args = { "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
		"--no-breaks", "--no-replaces", "--no-enhances" }
	for _, n in ipairs(roots) do args[#args + 1] = n end
	local r = apt_cache("resolving dependencies", args)
	if r.status ~= 0 then fail("resolving dependencies of %s: %s", table.concat(roots, " "),
		(r.stderr:match("[^\n]+") or "apt-cache failed")) end
	return M.resolve_depends(r.stdout, roots)
end

function M.deb_filename(rec)
	return string.format("%s_%s_%s.deb", rec.Package, (rec.Version:gsub(":", "%%3a")), rec.Architecture)
end

-- Fetch the records' .debs with one apt-get call into the empty directory `part`; raise
-- with what went wrong (a name the archive lacks, no network, stale lists, a full disk).
local function fetch(recs, part, dir)
	local argv = { "apt-get", "download", "-q" }
	for _, o in ipairs(apt_options()) do argv[#argv + 1] = o end
	if common.is_root() then
		argv[#argv + 1] = "-o"
		argv[#argv + 1] = "APT::Sandbox::User=root"
	end
	for _, rec in ipairs(recs) do argv[#argv + 1] = rec.Package .. "=" .. rec.Version end
	local r = try_run(argv, { cwd = part })
	if r.status == 0 then return end
	local err = r.stderr
	if err:find(common.NOSPACE, 1, true) then
		fail("no space left on device while downloading packages into %s", dir)
	end
	local pkg = err:match("Unable to locate package (%S+)") or
		err:match("Can't find a source to download version '[^']*' of '([^':]+)")
	if pkg then fail("Debian package '%s' not found (apt-cache policy %s)", pkg, pkg) end
	local line = err:match("E: (Failed to fetch[^\n]*)") or err:match("E: ([^\n]+)") or
		"apt-get download failed"
	local hint = "check the network and /etc/apt/sources.list"
	if line:match("404") then hint = "the package lists are stale: run apt-get update" end
	fail("cannot download packages from the Debian repository (%s): %s", hint, line)
end

-- Check each fetched .deb in `part` against the archive's SHA256 and move it to paths[Package].
local function verify(recs, part, paths)
	for _, rec in ipairs(recs) do
		local got = part .. "/" .. M.deb_filename(rec)
		if not fs.exists(got) then
			fail("download: apt-get did not produce %s", M.deb_filename(rec))
		end
		local s = common.sha256({ got })[got]
		if s ~= rec.SHA256 then
			fail("download: %s has sha256 %s, the archive says %s (run apt-get update?)",
				M.deb_filename(rec), tostring(s), tostring(rec.SHA256))
		end
		os.rename(got, paths[rec.Package])
	end
end

-- Make sure every record's .deb is in the cache (verified against apt's SHA256);
-- download the missing ones in one apt-get call. Returns {Package = path}.
function M.download(recs)
	local dir = cache_dir() .. "/debs"
	mkdir_p(dir, "755")
	local paths, missing, bytes = {}, {}, 0
	local want = {}
	for _, rec in ipairs(recs) do
		local path = dir .. "/" .. M.deb_filename(rec)
		paths[rec.Package] = path
		want[path] = rec
		bytes = bytes + (tonumber(rec.Size) or 0)
	end
	local present = {}
	for path in pairs(want) do
		if fs.exists(path) then present[#present + 1] = path end
	end
	table.sort(present)
	local sums = #present > 0 and common.sha256(present) or {}
	for _, rec in ipairs(recs) do
		if sums[paths[rec.Package]] ~= rec.SHA256 then missing[#missing + 1] = rec end
	end
	if #missing == 0 then
		log("download: %d packages, %s, all cached in %s", #recs, human(bytes), dir)
		return paths
	end
	local t0 = runtime.now()
	local part = dir .. "/.partial~" .. proc.getpid()
	fs.rm_rf(part)
	mkdir_p(part, "755")
	local ok, err = pcall(function()
		fetch(missing, part, dir)
		verify(missing, part, paths)
	end)
	fs.rm_rf(part)
	if not ok then error(err, 0) end
	local mbytes = 0
	for _, rec in ipairs(missing) do mbytes = mbytes + (tonumber(rec.Size) or 0) end
	log("download: %d of %d packages, %s (%s)", #missing, #recs, human(mbytes), common.secs(t0))
	return paths
end

return M
