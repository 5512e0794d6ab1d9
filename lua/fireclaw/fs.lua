-- fireclaw.fs: the file operations the library needs, without spawning tools.
--   fs.exists(path)  fs.is_dir(path)  fs.read(path) -> data | nil, err
--   fs.write(path, data, mode)   atomic: temporary name in the same directory, then rename
--   fs.mkdir(path, mode) (exclusive)  fs.mkdir_p(path, mode[, {chmod_may_fail=true}])  fs.rm_rf(path)
--   fs.chmod(path, mode)  fs.rename(a, b)
--   fs.symlink(target, path)  fs.readlink(path)  fs.size(path)
--   fs.basename(path) -> last name (nil for "/")  fs.dirname(path) -> the rest ("." for none)
-- Modes are octal strings ("600"). Failures raise "fs: <op> <path>: <errno text>".
local opts_check = require "fireclaw.opts"
local runtime = require "fireclaw.runtime"
local sys = require "fireclaw.sys"

local E = sys.errno

local M = {}

function M.basename(path) return (path:gsub("/+$", ""):match("([^/]+)$")) end

function M.dirname(path) return (path:gsub("/+$", ""):match("^(.*)/[^/]+$")) or "." end

local function fail(op, path, err)
	error(string.format("fs: %s %s: %s", op, path, err), 0)
end

function M.exists(path)
	return sys.access(path) ~= nil or M.readlink(path) ~= nil
end

-- (a stat, following symlinks: listing the directory to find out cost a table of its names)
function M.is_dir(path)
	local st = sys.stat(path)
	return st ~= nil and st.type == "directory"
end

function M.read(path)
	local f, err = io.open(path, "rb")
	if not f then return nil, err end
	local s = f:read("*a")
	f:close()
	return s
end

function M.size(path)
	local f = io.open(path, "rb")
	if not f then return nil end
	local n = f:seek("end")
	f:close()
	return n
end

function M.chmod(path, mode)
	local ok, err = sys.chmod(path, mode)
	if not ok then fail("chmod", path, err) end
end

function M.rename(from, to)
	local ok, err = sys.rename(from, to)
	if not ok then fail("rename " .. from .. " to", to, err) end
end

-- Write through a temporary name and rename into place: readers see the old file or the
-- new one, never half of one; a failure (disk full) leaves no partial file behind.
function M.write(path, data, mode)
	local tmp = string.format("%s.tmp%d", path, sys.getpid())
	local f, err = io.open(tmp, "wb")
	if not f then error("fs: write " .. path .. ": " .. tostring(err):gsub("^[^:]*: ", ""), 0) end
	local ok, werr = true, nil
	if mode then ok, werr = sys.chmod(tmp, mode) end -- a file just made is ours: never expected
	if ok then ok, werr = f:write(data) end
	local cok, cerr = f:close()
	if not ok or not cok then
		os.remove(tmp)
		error("fs: write " .. path .. ": " .. tostring(werr or cerr):gsub("^[^:]*: ", ""), 0)
	end
	local rok, rerr = sys.rename(tmp, path)
	if not rok then
		os.remove(tmp)
		error(string.format("fs: write %s: %s", path, rerr), 0)
	end
end

-- Create one directory; it must not exist yet (that is how callers claim a name).
function M.mkdir(path, mode)
	local ok, err = sys.mkdir(path, mode or "755")
	if not ok then fail("mkdir", path, err) end
end

-- chmod_may_fail: a failing chmod of `path` is not an error — a directory that already
-- exists and belongs to another user (a shared state dir) keeps the mode it has.
function M.mkdir_p(path, mode, opts)
	opts = opts_check.check("fs.mkdir_p", opts, { "chmod_may_fail" })
	local cur = path:sub(1, 1) == "/" and "" or "."
	for part in path:gmatch("[^/]+") do
		cur = cur .. "/" .. part
		local ok, err, e = sys.mkdir(cur, mode or "755")
		if not ok and e ~= E.EEXIST then fail("mkdir", cur, err) end
	end
	if mode and opts.chmod_may_fail then
		sys.chmod(path, mode)
	elseif mode then
		M.chmod(path, mode)
	end
end

-- Remove a file or a directory tree (symlinks are removed, never followed). Missing is fine.
function M.rm_rf(path)
	assert(path and path ~= "" and path ~= "/", "fs.rm_rf: refusing to remove '" .. tostring(path) .. "'")
	local ok, err, e = sys.unlink(path)
	if ok or e == E.ENOENT then return end
	if e ~= E.EISDIR then fail("remove", path, err) end
	for _, name in ipairs(runtime.listdir(path) or {}) do
		M.rm_rf(path .. "/" .. name)
	end
	ok, err, e = sys.rmdir(path)
	if not ok and e ~= E.ENOENT then fail("rmdir", path, err) end
end

function M.symlink(target, path)
	local ok, err = sys.symlink(target, path)
	if not ok then fail("symlink " .. target .. " at", path, err) end
end

function M.readlink(path)
	return (sys.readlink(path))
end

return M
