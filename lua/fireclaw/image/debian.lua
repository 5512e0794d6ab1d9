-- fireclaw.image.debian: a real Debian root filesystem (`image build --base debian`) made
-- by mmdebstrap: the minbase variant plus the requested packages, installed by apt and
-- dpkg with their maintainer scripts, inside mmdebstrap's own user and mount namespaces
-- (--mode=unshare: nothing is ever mounted on the host, so a failed or killed build
-- leaves no mount behind). Its output is a tarball, cached under
-- cache/rootfs/debian-KEY.tar, KEY = sha256 of (suite, mirror, sorted packages, variant,
-- mmdebstrap's version): a second build with the same inputs unpacks the cached tarball
-- instead of fetching again (`--force` fetches afresh).
--
-- The mirror is the host's own: the first Debian archive its apt sources name
-- (/etc/apt/sources.list and sources.list.d/*.list, *.sources) for a plain suite (not
-- -security/-updates); nothing else is ever contacted.
local common = require "fireclaw.image.common"
local fs = require "fireclaw.fs"
local proc = require "fireclaw.proc"
local runtime = require "fireclaw.runtime"

local fail, run = common.fail, common.run

local M = {}

M.SUITE = "bookworm"
M.VARIANT = "minbase"

-- Debian archive URIs of one sources file, in order (one-line and deb822 formats).
local function uris_of(text, out)
	for line in text:gmatch("[^\n]+") do
		local uri, suite = line:match("^%s*deb%s+([%w+.-]+://%S+)%s+(%S+)")
		if not uri then
			uri, suite = line:match("^%s*deb%s+%[[^%]]*%]%s+([%w+.-]+://%S+)%s+(%S+)")
		end
		if uri and not suite:find("-", 1, true) then out[#out + 1] = uri end
	end
	for stanza in (text .. "\n\n"):gmatch("(.-)\n%s*\n") do
		local types = stanza:match("\n?Types:%s*([^\n]+)")
		local uris = stanza:match("\n?URIs:%s*([^\n]+)")
		local suites = stanza:match("\n?Suites:%s*([^\n]+)") or ""
		if types and types:match("%f[%w]deb%f[^%w-]") and uris and not stanza:match("\nEnabled:%s*no") then
			local plain = false
			for s in suites:gmatch("%S+") do
				if not s:find("-", 1, true) then plain = true end
			end
			if plain then
				for u in uris:gmatch("%S+") do out[#out + 1] = u end
			end
		end
	end
end

-- The host's Debian mirror (what its apt uses), or a clear failure.
function M.host_mirror()
	local files = { "/etc/apt/sources.list" }
	local d = "/etc/apt/sources.list.d"
	local names = runtime.listdir(d) or {}
	table.sort(names)
	for _, n in ipairs(names) do
		if n:match("%.list$") or n:match("%.sources$") then files[#files + 1] = d .. "/" .. n end
	end
	local uris = {}
	for _, f in ipairs(files) do
		local text = fs.exists(f) and fs.read(f)
		if text then uris_of(text, uris) end
	end
	for _, u in ipairs(uris) do
		if u:match("/debian/?$") then return (u:gsub("/$", "")) end
	end
	fail("no Debian archive in the host's apt sources (/etc/apt/sources.list*): --base debian uses the host's mirror")
end

local function mmdebstrap_version()
	local r = common.try_run({ "mmdebstrap", "--version" })
	if r.status ~= 0 then fail("mmdebstrap does not run (install it: apt-get install mmdebstrap; tools/deps.sh)") end
	return (r.stdout:match("[%d.]+[%w.+~-]*") or "?")
end

-- What the cache key and the image fingerprint are made of.
function M.inputs(opts)
	local pk = {}
	for _, n in ipairs(opts.packages or {}) do
		if not n:match("^[a-z0-9][a-z0-9+.-]*$") then fail("bad Debian package name '%s'", n) end
		pk[#pk + 1] = n
	end
	table.sort(pk)
	local suite = opts.suite or M.SUITE
	if not suite:match("^[a-z][a-z0-9-]*$") then fail("bad Debian suite '%s' (e.g. bookworm)", suite) end
	return { base = "debian", suite = suite, mirror = M.host_mirror(), packages = pk, variant = M.VARIANT,
		mmdebstrap = mmdebstrap_version() }
end

function M.cache_name(inputs)
	local json = require "fireclaw.json"
	return "debian-" .. common.sha256_of("hashing", json.encode(inputs)):sub(1, 32) .. ".tar"
end

-- The tarball for `inputs`: from the cache, or made by mmdebstrap (force: made afresh).
-- Returns its path, whether it came from the cache, and the seconds mmdebstrap took.
local function tarball(inputs, force, scratch)
	local dir = common.cache_dir() .. "/rootfs"
	common.mkdir_p(dir, "755")
	local tar = dir .. "/" .. M.cache_name(inputs)
	if fs.exists(tar) and not force then return tar, true, 0 end
	local t0 = runtime.now()
	local tmp = tar .. ".new~" .. proc.getpid()
	os.remove(tmp)
	-- in a pid namespace of its own whose init dies with fireclaw (unshare --kill-child; the
	-- parent-death signal alone would reach only mmdebstrap's first process, not its helpers)
	local argv = { "unshare", "--pid", "--fork", "--kill-child",
		"mmdebstrap", "--mode=unshare", "--variant=" .. inputs.variant, "--format=tar" }
	if #inputs.packages > 0 then argv[#argv + 1] = "--include=" .. table.concat(inputs.packages, ",") end
	argv[#argv + 1] = inputs.suite
	argv[#argv + 1] = tmp
	argv[#argv + 1] = string.format("deb %s %s main", inputs.mirror, inputs.suite)
	common.log("debian: mmdebstrap %s (%s) from %s%s", inputs.suite, inputs.variant, inputs.mirror,
		#inputs.packages > 0 and (" with " .. table.concat(inputs.packages, ",")) or "")
	-- its temporary tree goes below the build's own directory, which the next build removes
	-- if this one is killed (1777: in unshare mode its root is a subordinate uid)
	local tmpdir = scratch .. "/mmdebstrap-tmp"
	fs.mkdir_p(tmpdir, "1777")
	local ok, r = pcall(common.try_run, argv, { env = { TMPDIR = tmpdir } })
	if not ok or r.status ~= 0 or r.signal then
		os.remove(tmp)
		if not ok then error(r, 0) end
		-- apt's own reason ("Unable to locate package x") rather than mmdebstrap's summary
		local why
		for line in (r.stderr or ""):gmatch("[^\n]+") do
			if line:match("^E: ") and not line:match("^E: setup failed") and not line:match("^E: mmdebstrap failed") then
				why = why or line
			end
		end
		why = why or (r.stderr or ""):match("(E: [^\n]+)") or "no error message"
		fail("mmdebstrap failed (%s): %s", r.signal and ("signal " .. r.signal) or ("status " .. tostring(r.status)), why)
	end
	local ok2, err2 = os.rename(tmp, tar)
	if not ok2 then fail("cannot move the tarball into %s: %s", dir, tostring(err2)) end
	fs.chmod(tar, "600")
	return tar, false, runtime.now() - t0
end

-- The Debian tree in `tree` (empty); scratch: the build's scratch directory. Returns
-- {cache=, cached=, seconds=}.
function M.tree(inputs, tree, force, scratch)
	local tar, cached, secs = tarball(inputs, force, scratch)
	fs.mkdir_p(tree, "755")
	-- a tarball mmdebstrap made from Debian packages; GNU tar still refuses '..' members and
	-- defers symlinks it would have to follow
	run("unpacking the Debian tree", { "tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf", tar, "-C", tree })
	return { cache = tar:match("[^/]+$"), cached = cached, seconds = secs }
end

return M
