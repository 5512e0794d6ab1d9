-- Copy files and directory trees to or from a kept VM: cp SRC DST, with ID:path on one side
--
--   fireclaw cp ./src box:/root/src      fireclaw cp box:/root/out ./out
-- A directory is copied as a tree (fireclaw.tree: a tree from the guest is checked entry
-- by entry and refused whole if anything in it is hostile); a file as with run's
-- --put/--get. DST inside the VM: an existing directory gets SRC's name inside it. DST
-- here for a tree must not exist yet.
local cli = require "fireclaw.cli"
local fs = require "fireclaw.fs"
local log = require "fireclaw.log"
local sandbox = require "fireclaw.sandbox"
local ssh = require "fireclaw.ssh"
local state = require "fireclaw.state"
local sys = require "fireclaw.sys"

local run = cli.use "run"

-- "ID:path" where ID is a VM's id or name -> id, path; else nil (a local path).
local function remote_of(arg)
	local ref, path = arg:match("^([%w._-]+):(.*)$")
	if ref and state.find(ref) then
		if path == "" then cli.usage_error("'%s': a path inside the VM is needed after ':'", arg) end
		return ref, path
	end
end

local function basename(p) return (p:gsub("/+$", ""):match("([^/]+)$")) or p end

local function main(args)
	local o, rest = cli.parse(args, {
		usage = "fireclaw cp [options] SRC DST", args = 2,
		about = "Copy a file or a directory tree to (DST = ID:path) or from (SRC = ID:path) kept VM ID.",
		{ "--max-transfer SIZE", "cap on each file, and on a tree from the VM in all: 64K, 512M, 2G…", default = "1G" },
		{ "--max-entries N", "cap on the entries of a tree", type = "number", default = 100000 },
		{ "--timeout S", "give up after S seconds", type = "number" },
		{ "-v, --verbose", "progress lines" },
	})
	if #rest ~= 2 then cli.usage_error("cp needs SRC and DST, one of them ID:path (see fireclaw cp --help)") end
	local max = run.parse_size(o.max_transfer)
	if not max then cli.usage_error("--max-transfer wants a size such as 64K, 512M or 2G") end
	if o.max_entries < 1 or o.max_entries % 1 ~= 0 then cli.usage_error("--max-entries must be a positive count") end
	state.reap_expired()
	local sref, spath = remote_of(rest[1])
	local dref, dpath = remote_of(rest[2])
	if sref and dref then cli.usage_error("cp copies between this host and a VM, not between two VMs") end
	if not sref and not dref then
		cli.usage_error("cp: neither '%s' nor '%s' names a VM (ID:path; see fireclaw ps)", rest[1], rest[2])
	end
	local topts = { max_bytes = max, max_entries = o.max_entries, timeout = o.timeout }
	if dref then
		local src = rest[1]
		local st = sys.lstat(src)
		if not st then cli.usage_error("cp: no such file '%s'", src) end
		local sb = sandbox.attach(dref, { what = "copy into" })
		return sandbox.with(sb, function()
			local r = sb:exec("test -d " .. ssh.quote({ dpath }), {})
			local target = r.status == 0 and dpath:gsub("/+$", "") .. "/" .. basename(src) or dpath
			if st.type == "directory" then
				local n = sb:put_tree(src, target, topts)
				log.info("copied %d entries to %s:%s", n, sb.id, target)
			else
				local size, why = ssh.check_source(src, max)
				if not size then error(string.format("cp: '%s' %s", src, why), 0) end
				sb:put(src, target, { max_bytes = max })
			end
			return 0
		end)
	end
	local dst = rest[2]
	local sb = sandbox.attach(sref, { what = "copy from" })
	return sandbox.with(sb, function()
		local r = sb:exec("test -d " .. ssh.quote({ spath }), {})
		if r.status == 0 then
			local target = fs.is_dir(dst) and dst:gsub("/+$", "") .. "/" .. basename(spath) or dst
			local n = sb:get_tree(spath, target, topts)
			log.info("copied %d entries from %s:%s to %s", n, sb.id, spath, target)
		else
			sb:get(spath, dst, { max_bytes = max })
		end
		return 0
	end)
end

return cli.recipe({}, main, ...)
