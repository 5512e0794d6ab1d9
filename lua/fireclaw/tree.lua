-- fireclaw.tree: directory trees in and out of a guest (fireclaw cp), over a sandbox's exec.
--
--   tree.put(sb, localdir, remotedir, {max_bytes =, max_entries =, timeout =}) -> count
--   tree.get(sb, remotedir, localdir, {max_bytes =, max_total =, max_entries =, timeout =}) -> count
--
-- Over SSH both are one exec carrying a tar stream (the guest's busybox tar); a transport
-- with tree operations of its own may replace them (sb:put_tree / sb:get_tree).
-- In: the local tree is checked first (regular files, directories and symlinks only;
-- each file at most max_bytes; at most max_entries entries), then the host's tar writes
-- it with owner root and the guest unpacks it into remotedir.
-- Out: the stream is the guest's, so it is data to check, never trusted (Isolation I):
-- every name is relative, without '..', empty or control-character components, at most
-- 255 bytes a component and 4096 in all; at most max_entries entries, max_bytes a file and
-- max_total in all; regular files, directories and symlinks whose target stays inside the
-- tree only (a hard link, device or FIFO is refused). Files are created with O_EXCL and
-- O_NOFOLLOW under directories this copy made, symlinks last; modes are the guest's
-- permission bits & 0777 & ~umask (no setuid, setgid, sticky); under sudo the files belong
-- to the user who ran sudo. The tree is built under a temporary name beside localdir and
-- renamed into place at the end: a refused or failed copy leaves nothing.
local fs = require "fireclaw.fs"
local opts_check = require "fireclaw.opts"
local proc = require "fireclaw.proc"
local runtime = require "fireclaw.runtime"
local ssh = require "fireclaw.ssh"
local sys = require "fireclaw.sys"

local M = {}

M.MAX_ENTRIES = 100000
local BLOCK = 512
local OPTS = { "max_bytes", "max_total", "max_entries", "timeout" }

local function octal(s)
	s = s:match("^[ %z]*([0-7]*)")
	return tonumber(s ~= "" and s or "0", 8)
end

local function umask()
	local st = fs.read("/proc/self/status") or ""
	return tonumber(st:match("Umask:%s*(%d+)") or "022", 8)
end

-- A name from the guest, as a list of checked components; nil and why not.
local function check_name(name)
	if #name > 4096 then return nil, "a name longer than 4096 bytes" end
	if name:find("^/") then return nil, "an absolute name" end
	local parts = {}
	for c in (name .. "/"):gmatch("([^/]*)/") do
		if c == ".." then return nil, "a '..' component" end
		if c:find("[%z\1-\31\127]") then return nil, "a control character" end
		if #c > 255 then return nil, "a component longer than 255 bytes" end
		if c ~= "" and c ~= "." then parts[#parts + 1] = c end
	end
	return parts
end

-- Whether symlink target `t` of the entry at `parts` stays inside the tree.
local function link_inside(parts, t)
	if t == "" or t:find("^/") or t:find("%z") then return false end
	local depth = #parts - 1
	for c in (t .. "/"):gmatch("([^/]*)/") do
		if c == ".." then depth = depth - 1 elseif c ~= "" and c ~= "." then depth = depth + 1 end
		if depth < 0 then return false end
	end
	return true
end

local function owner()
	local uid, gid = tonumber(os.getenv("SUDO_UID") or ""), tonumber(os.getenv("SUDO_GID") or "")
	if uid and gid then return uid, gid end
end

-- The streaming parser of a guest's tar, writing into tmp (a fresh directory).
local function unpacker(tmp, o, what)
	local mask = umask()
	local uid, gid = owner()
	local dirs = { [""] = { mode = 493 } } -- rel -> {mode}: the directories this copy made
	local links, entries, total = {}, 0, 0
	local st = { mode = "header", pend = {}, need = BLOCK, left = 0 }
	local cur, longname, longlink, zeros, ended = nil, nil, nil, 0, false
	local function refuse(fmt, ...)
		error(string.format("cp: refused %s: " .. fmt, what, ...), 0)
	end
	local function entry(h)
		local typ = h:sub(157, 157)
		local size = h:byte(125) >= 128 and math.huge or octal(h:sub(125, 136))
		local name = longname or ((h:sub(346, 500):match("^[^%z]*") ~= "" and h:sub(346, 500):match("^[^%z]*") .. "/" or "")
			.. h:match("^[^%z]*"))
		if typ == "L" or typ == "K" then -- GNU long name / long link target for the next entry
			if size > 4096 then refuse("a name longer than 4096 bytes") end
			st.mode, st.need, st.pend, st.long = "longname", size, {}, typ
			st.pad = (BLOCK - size % BLOCK) % BLOCK
			return
		end
		local link = longlink
		longname, longlink = nil, nil
		entries = entries + 1
		if entries > o.max_entries then refuse("more than %d entries (--max-entries)", o.max_entries) end
		local parts, why = check_name(name)
		if not parts then refuse("%s", why) end
		local rel = table.concat(parts, "/")
		local parent = table.concat(parts, "/", 1, math.max(0, #parts - 1))
		local mode = bit.band(octal(h:sub(101, 108)), 511)
		if rel ~= "" and not dirs[parent] then refuse("'%s' comes before its directory", rel) end
		if typ == "5" then
			if rel ~= "" and not dirs[rel] then
				if links[rel] then refuse("'%s' twice", rel) end
				local ok, err = sys.mkdir(tmp .. "/" .. rel, "700")
				if not ok then refuse("'%s': %s", rel, err) end
				dirs[rel] = {}
			end
			dirs[rel].mode = mode
		elseif typ == "0" or typ == "\0" or typ == "7" then
			if rel == "" then refuse("a file as the tree itself") end
			if size > o.max_bytes then refuse("'%s' is bigger than %d bytes (--max-transfer)", rel, o.max_bytes) end
			total = total + size
			if total > o.max_total then refuse("more than %d bytes in all (--max-transfer)", o.max_total) end
			local fd, err = sys.open(tmp .. "/" .. rel, "WRONLY|CREAT|EXCL|NOFOLLOW", bit.band(mode, bit.bnot(mask)))
			if not fd then refuse("'%s': %s", rel, err) end
			if uid then sys.fchown(fd, uid, gid) end
			cur = { fd = fd, rel = rel }
			st.mode, st.left = "data", size
			st.pad = (BLOCK - size % BLOCK) % BLOCK
			if size == 0 then sys.close(fd) cur = nil st.mode, st.left = "pad", st.pad end
		elseif typ == "2" then
			local target = link or h:sub(158, 257):match("^[^%z]*")
			if rel == "" or not link_inside(parts, target) then refuse("symlink '%s' -> '%s' points outside the tree", rel, target) end
			if links[rel] or dirs[rel] then refuse("'%s' twice", rel) end
			links[rel] = target
			links[#links + 1] = rel
		elseif typ == "1" then
			refuse("hard link '%s' (not copied: make it a file)", rel)
		else
			refuse("'%s' is not a file, directory or symlink (type %q)", rel, typ)
		end
	end
	local function block(h)
		if h == string.rep("\0", BLOCK) then
			zeros = zeros + 1
			if zeros >= 2 then ended = true end
			return
		end
		if ended then refuse("data after the end of the archive") end
		zeros = 0
		local sum = 0
		for i = 1, BLOCK do sum = sum + ((i >= 149 and i <= 156) and 32 or h:byte(i)) end
		if sum ~= octal(h:sub(149, 156)) then refuse("a damaged archive (bad header checksum)") end
		entry(h)
	end
	-- the stream itself is bounded too: headers, long names and padding beyond what the
	-- entries can need (a guest sending zeros or long-name headers forever) are refused
	local streamed = 0
	local function feed(chunk)
		local pos, n = 1, #chunk
		streamed = streamed + n
		while pos <= n do
			if st.mode == "data" then
				local k = math.min(st.left, n - pos + 1)
				local piece = chunk:sub(pos, pos + k - 1)
				local w = 0
				while w < #piece do
					local wrote, err = sys.write(cur.fd, w == 0 and piece or piece:sub(w + 1))
					if not wrote then refuse("writing '%s': %s", cur.rel, err) end
					w = w + wrote
				end
				pos, st.left = pos + k, st.left - k
				if st.left == 0 then
					sys.close(cur.fd)
					cur = nil
					st.mode, st.left = "pad", st.pad
				end
			elseif st.mode == "pad" then
				local k = math.min(st.left, n - pos + 1)
				pos, st.left = pos + k, st.left - k
				if st.left == 0 then st.mode, st.need, st.pend = "header", BLOCK, {} end
			else -- header or longname: collect st.need bytes
				local have = 0
				for _, p in ipairs(st.pend) do have = have + #p end
				local k = math.min(st.need - have, n - pos + 1)
				st.pend[#st.pend + 1] = chunk:sub(pos, pos + k - 1)
				pos = pos + k
				if have + k == st.need then
					local data = table.concat(st.pend)
					st.pend = {}
					if st.mode == "longname" then
						if st.long == "L" then longname = data:match("^[^%z]*") else longlink = data:match("^[^%z]*") end
						st.mode, st.left = "pad", st.pad
						if st.left == 0 then st.mode, st.need = "header", BLOCK end
					else
						block(data)
					end
				end
			end
		end
		-- (checked after the chunk: its headers count, a chunk is at most one read)
		if streamed > total + (entries + 1) * 12 * BLOCK + 20 * BLOCK then
			refuse("a stream longer than its entries need (more than %d bytes)", streamed)
		end
	end

	local function finish()
		if cur then refuse("a truncated archive") end
		for _, rel in ipairs(links) do
			local ok, err = sys.symlink(links[rel], tmp .. "/" .. rel)
			if not ok then refuse("symlink '%s': %s", rel, err) end
		end
		local order = {}
		for rel in pairs(dirs) do order[#order + 1] = rel end
		table.sort(order, function(a, b) return #a > #b end) -- deepest first
		for _, rel in ipairs(order) do
			local p = rel == "" and tmp or tmp .. "/" .. rel
			fs.chmod(p, string.format("%o", bit.band(dirs[rel].mode or 493, bit.bnot(mask))))
			if uid then
				local fd = sys.open(p, "RDONLY|DIRECTORY|NOFOLLOW")
				if fd then sys.fchown(fd, uid, gid) sys.close(fd) end
			end
		end
		return entries
	end
	local function abort() if cur then sys.close(cur.fd) cur = nil end end
	return feed, finish, abort
end

local function check_opts(where, o)
	o = opts_check.check(where, o, OPTS)
	o.max_bytes = o.max_bytes or 2 ^ 30
	o.max_total = o.max_total or o.max_bytes
	o.max_entries = o.max_entries or M.MAX_ENTRIES
	return o
end

local function first_line(s)
	return ((s or ""):match("[^\r\n]*"):sub(1, 200):gsub("[%c\128-\255]", "?"))
end

function M.get(sb, remote, localdir, o)
	o = check_opts("tree.get", o)
	if fs.exists(localdir) or sys.lstat(localdir) then
		error(string.format("cp: %s exists already (copy into a new name)", localdir), 0)
	end
	local parent = localdir:match("^(.*)/[^/]+/*$") or "."
	if parent == "" then parent = "/" end
	if not fs.is_dir(parent) then error(string.format("cp: no directory %s", parent), 0) end
	local tmp = string.format("%s/.fireclaw-cp-%d-%s", parent, proc.getpid(), require("fireclaw.state").new_id())
	fs.mkdir(tmp, "700")
	local feed, finish, abort = unpacker(tmp, o, "the tree from " .. sb.id .. ":" .. remote)
	local ok, res = pcall(function()
		local r = sb:exec("cd -- " .. ssh.quote({ remote }) .. " && exec tar -cf - .",
			{ on_stdout = feed, capture = false, timeout = o.timeout, max_capture = 65536 })
		if r.status ~= 0 then
			error(string.format("cp: %s:%s: the guest's tar exited %s: %s", sb.id, remote,
				tostring(r.status or r.signal or "(timed out)"), first_line(r.stderr)), 0)
		end
		local n = finish()
		fs.rename(tmp, localdir)
		return n
	end)
	if not ok then
		abort()
		pcall(fs.rm_rf, tmp)
		error(res, 0)
	end
	return res
end

-- The local tree, checked before anything is sent: count of entries, or raises.
local function check_local(dir, o)
	local n = 0
	local function walk(d)
		for _, name in ipairs(runtime.listdir(d) or {}) do
			local p = d .. "/" .. name
			local st = sys.lstat(p)
			n = n + 1
			if n > o.max_entries then error(string.format("cp: %s has more than %d entries (--max-entries)", dir, o.max_entries), 0) end
			if not st then error("cp: cannot read " .. p, 0) end
			if st.type == "directory" then
				walk(p)
			elseif st.type == "file" then
				if st.size > o.max_bytes then
					error(string.format("cp: %s is bigger than %d bytes (--max-transfer)", p, o.max_bytes), 0)
				end
			elseif st.type ~= "link" then
				error(string.format("cp: %s is a %s: only files, directories and symlinks are copied", p, st.type), 0)
			end
		end
	end
	walk(dir)
	return n
end

function M.put(sb, localdir, remote, o)
	o = check_opts("tree.put", o)
	local n = check_local(localdir, o)
	local tmp = sb.dir .. "/.cp-" .. require("fireclaw.state").new_id() .. ".tar"
	local ok, res = pcall(function()
		local r = proc.run({ "tar", "--owner=0", "--group=0", "--numeric-owner", "-C", localdir, "-cf", tmp, "." },
			{ timeout = 600 })
		if r.status ~= 0 then error("cp: tar of " .. localdir .. " failed: " .. first_line(r.stderr), 0) end
		local fd, err = sys.open(tmp, "RDONLY")
		if not fd then error("cp: " .. err, 0) end
		local rok, rr = pcall(sb.exec, sb, "mkdir -p -- " .. ssh.quote({ remote }) .. " && cd -- "
			.. ssh.quote({ remote }) .. " && exec tar -xf -", { stdin = fd, timeout = o.timeout })
		sys.close(fd)
		if not rok then error(rr, 0) end
		if rr.status ~= 0 then
			error(string.format("cp: unpacking into %s:%s failed (tar exited %s): %s", sb.id, remote,
				tostring(rr.status or rr.signal), first_line(rr.stderr)), 0)
		end
		return n
	end)
	os.remove(tmp)
	if not ok then error(res, 0) end
	return res
end

return M
