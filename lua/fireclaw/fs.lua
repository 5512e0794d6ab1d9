-- fireclaw.fs: the file operations the library needs, without spawning tools.
--   fs.exists(path)  fs.is_dir(path)  fs.read(path) -> data | nil, err
--   fs.write(path, data, mode)   atomic: temporary name in the same directory, then rename
--   fs.mkdir(path, mode) (exclusive)  fs.mkdir_p(path, mode)  fs.rm_rf(path)  fs.chmod(path, mode)  fs.rename(a, b)
--   fs.symlink(target, path)  fs.readlink(path)  fs.size(path)
-- Modes are octal strings ("600"). Failures raise "fs: <op> <path>: <errno text>".
local ffi = require "ffi"
local runtime = require "fireclaw.runtime"

ffi.cdef [[
int mkdir(const char *path, unsigned int mode);
int rmdir(const char *path);
int unlink(const char *path);
int chmod(const char *path, unsigned int mode);
int rename(const char *oldpath, const char *newpath);
int symlink(const char *target, const char *linkpath);
long readlink(const char *path, char *buf, unsigned long size);
int access(const char *path, int mode);
char *strerror(int errnum);
int getpid(void);
]]
local C = ffi.C
local EEXIST, ENOENT, EISDIR = 17, 2, 21

local M = {}

local function errstr(e) return ffi.string(C.strerror(e)) end

local function fail(op, path)
	error(string.format("fs: %s %s: %s", op, path, errstr(ffi.errno())), 0)
end

function M.exists(path)
	return C.access(path, 0) == 0 or M.readlink(path) ~= nil
end

function M.is_dir(path)
	return runtime.listdir(path) ~= nil
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
	if C.chmod(path, tonumber(mode, 8)) ~= 0 then fail("chmod", path) end
end

function M.rename(from, to)
	if C.rename(from, to) ~= 0 then fail("rename " .. from .. " to", to) end
end

-- Write through a temporary name and rename into place: readers see the old file or the
-- new one, never half of one; a failure (disk full) leaves no partial file behind.
function M.write(path, data, mode)
	local tmp = string.format("%s.tmp%d", path, C.getpid())
	local f, err = io.open(tmp, "wb")
	if not f then error("fs: write " .. path .. ": " .. tostring(err):gsub("^[^:]*: ", ""), 0) end
	if mode then C.chmod(tmp, tonumber(mode, 8)) end
	local ok, werr = f:write(data)
	local cok, cerr = f:close()
	if not ok or not cok then
		os.remove(tmp)
		error("fs: write " .. path .. ": " .. tostring(werr or cerr):gsub("^[^:]*: ", ""), 0)
	end
	if C.rename(tmp, path) ~= 0 then
		local e = ffi.errno()
		os.remove(tmp)
		error(string.format("fs: write %s: %s", path, errstr(e)), 0)
	end
end

-- Create one directory; it must not exist yet (that is how callers claim a name).
function M.mkdir(path, mode)
	if C.mkdir(path, tonumber(mode or "755", 8)) ~= 0 then fail("mkdir", path) end
end

function M.mkdir_p(path, mode)
	local m = tonumber(mode or "755", 8)
	local cur = path:sub(1, 1) == "/" and "" or "."
	for part in path:gmatch("[^/]+") do
		cur = cur .. "/" .. part
		if C.mkdir(cur, m) ~= 0 and ffi.errno() ~= EEXIST then fail("mkdir", cur) end
	end
	if mode then M.chmod(path, mode) end
end

-- Remove a file or a directory tree (symlinks are removed, never followed). Missing is fine.
function M.rm_rf(path)
	assert(path and path ~= "" and path ~= "/", "fs.rm_rf: refusing to remove '" .. tostring(path) .. "'")
	if C.unlink(path) == 0 then return end
	local e = ffi.errno()
	if e == ENOENT then return end
	if e ~= EISDIR then fail("remove", path) end
	for _, name in ipairs(runtime.listdir(path) or {}) do
		M.rm_rf(path .. "/" .. name)
	end
	if C.rmdir(path) ~= 0 and ffi.errno() ~= ENOENT then fail("rmdir", path) end
end

function M.symlink(target, path)
	if C.symlink(target, path) ~= 0 then fail("symlink " .. target .. " at", path) end
end

function M.readlink(path)
	local buf = ffi.new("char[4096]")
	local n = tonumber(C.readlink(path, buf, 4096))
	if n < 0 then return nil end
	return ffi.string(buf, n)
end

return M
