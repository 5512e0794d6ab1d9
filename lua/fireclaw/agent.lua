-- fireclaw.agent: the guest agent's channel from Lua (the C side: fireclaw.core.agent,
-- whose functions this module also has: attach, connect, wrap).
--
--   agent.attach_vm(id [, opts]) -> conn   a live VM, by id or record: from any process
--                                          (a kept VM's, another fireclaw's), through
--                                          the record: its run directory and ports;
--                                          opts: timeout, where, wait (s for a free port),
--                                          retry (s before a new hello: a restored QEMU)
--   conn:exec(argv, opts), conn:put(l, r, opts), conn:get(r, l, opts), conn:batch{…},
--   conn:handoff(ns, entropy), conn:info(), conn:close()   (core/agent.c)
--
--   agent.put_tree(conn, localdir, remote [, opts]) -> remote dir, skipped
--   agent.get_tree(conn, remote, localdir [, opts]) -> local dir, skipped
--       a directory tree, one file at a time (conn:put / conn:get: their caps and rules per
--       file, opts = {max_bytes =, stall =}); directories made with their permission bits
--       (| 0700 on the host, so the tree can be filled; umask applies); symlinks, devices,
--       FIFOs and sockets are not copied: `skipped` lists them. A tree may hold at most
--       MAX_TREE_ENTRIES entries and be MAX_TREE_DEPTH deep. A target that is an existing
--       directory, or ends in /, gets the source's name, as with cp -r.
--
-- A QEMU VM has several ports (guest.AGENT_PORTS), one host socket each; a process takes
-- a free one with flock(2) on dir/agent-K.lock for as long as its connection lives, so up
-- to that many processes exec in one VM at once and the next one waits for a port (up to
-- opts.wait s; sandbox.attach waits briefly, then takes SSH instead).
local core = require "fireclaw.core.agent"
local fs = require "fireclaw.fs"
local opts_check = require "fireclaw.opts"
local runtime = require "fireclaw.runtime"
local state = require "fireclaw.state"
local sys = require "fireclaw.sys"

local M = setmetatable({}, { __index = core })

M.ATTACH_OPTIONS = { "timeout", "where", "wait", "retry" }

-- seconds before attach_vm's hello is sent again on a new connection (sandbox.AGENT_RETRY too)
M.ATTACH_RETRY = 0.3

function M.attach_vm(id, opts)
	opts = opts_check.check("agent.attach_vm", opts, M.ATTACH_OPTIONS)
	local rec = type(id) == "table" and id or state.find(tostring(id))
	if not rec then error(string.format("agent: no live VM with id '%s' (see fireclaw ps)", tostring(id)), 0) end
	local ports = type(rec.agent) == "table" and tonumber(rec.agent.ports)
	if not ports then
		error(string.format("agent: VM %s has no agent channel (an image or snapshot without the agent: "
			.. "use SSH)", tostring(rec.id)), 0)
	end
	-- a port's first connection after a restore may never be read by QEMU (docs/guest-notes.md):
	-- unless told otherwise, a hello not answered is sent again on a new connection
	local retry = opts.retry
	if retry == nil then retry = M.ATTACH_RETRY end
	return core.attach { dir = rec.dir, ports = ports, timeout = opts.timeout or 10, wait = opts.wait,
		retry = retry,
		where = opts.where or ("VM " .. tostring(rec.id)) }
end

M.MAX_TREE_ENTRIES = 100000
M.MAX_TREE_DEPTH = 64

local basename = fs.basename
local function join(a, b) return (a:gsub("/+$", "")) .. "/" .. b end

-- A tree walk's budget: entries and depth, raising one line when spent.
local function budget(what)
	local n = 0
	return function(depth, path)
		n = n + 1
		if n > M.MAX_TREE_ENTRIES then
			error(string.format("agent: %s: more than %d entries under %s", what, M.MAX_TREE_ENTRIES, path), 0)
		end
		if depth > M.MAX_TREE_DEPTH then
			error(string.format("agent: %s: %s is more than %d directories deep", what, path, M.MAX_TREE_DEPTH), 0)
		end
	end
end

local function file_opts(opts)
	return { max_bytes = opts and opts.max_bytes, stall = opts and opts.stall }
end

function M.put_tree(conn, localdir, remote, opts)
	local st = sys.lstat(localdir)
	if not st or st.type ~= "directory" then error("agent: put_tree: " .. tostring(localdir) .. " is not a directory", 0) end
	local into = remote:match("/$") or pcall(conn.list, conn, remote)
	local top = into and join(remote, basename(localdir)) or remote
	local skipped, spend = {}, budget("put " .. localdir)
	local function walk(ldir, rdir, mode, depth)
		spend(depth, ldir)
		conn:mkdir(rdir, mode)
		local names = runtime.listdir(ldir) or error("agent: put_tree: cannot list " .. ldir, 0)
		table.sort(names)
		for _, name in ipairs(names) do
			local lp, rp = join(ldir, name), join(rdir, name)
			local e = sys.lstat(lp)
			if e and e.type == "directory" then
				walk(lp, rp, e.perm, depth + 1)
			elseif e and e.type == "file" then
				spend(depth + 1, lp)
				local o = file_opts(opts)
				o.mode = e.perm
				conn:put(lp, rp, o)
			else
				skipped[#skipped + 1] = lp
			end
		end
	end
	walk(localdir, top, st.perm, 1)
	return top, skipped
end

-- A directory made on the host for a got tree: never through a symlink; owned by the user
-- who ran sudo, like got files.
local function local_dir(path, mode)
	local st = sys.lstat(path)
	if st and st.type ~= "directory" then
		error(string.format("agent: get_tree: %s exists and is not a directory (a %s: not followed)", path, st.type), 0)
	end
	if not st then
		local ok, err = sys.mkdir(path, string.format("%o", bit.bor(bit.band(mode, 511), 448)))
		if not ok then error("agent: get_tree: mkdir " .. path .. ": " .. tostring(err), 0) end
	end
	local uid, gid = tonumber(os.getenv("SUDO_UID") or ""), tonumber(os.getenv("SUDO_GID") or "")
	if uid and gid and sys.geteuid() == 0 then
		local fd = sys.open(path, bit.bor(sys.O.RDONLY, sys.O.DIRECTORY, sys.O.NOFOLLOW))
		if fd then
			sys.fchown(fd, uid, gid)
			sys.close(fd)
		end
	end
end

function M.get_tree(conn, remote, localdir, opts)
	local st = sys.lstat(localdir)
	local top = (localdir:match("/$") or (st and st.type == "directory")) and join(localdir, basename(remote)) or localdir
	local skipped, spend = {}, budget("get " .. remote)
	local function walk(rdir, ldir, mode, depth)
		spend(depth, rdir)
		local entries = conn:list(rdir)
		local_dir(ldir, mode)
		for _, e in ipairs(entries) do
			local rp, lp = join(rdir, e.name), join(ldir, e.name)
			if e.kind == "directory" then
				walk(rp, lp, e.mode, depth + 1)
			elseif e.kind == "file" then
				spend(depth + 1, rp)
				conn:get(rp, lp, file_opts(opts))
			else
				skipped[#skipped + 1] = rp
			end
		end
	end
	walk(remote, top, 493, 1)
	return top, skipped
end

return M
