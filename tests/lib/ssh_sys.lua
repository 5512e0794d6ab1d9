-- ssh_sys.lua: the few system calls the SSH tests need that Lua has no word for
-- (spawning a server as our own child, waiting for it, pipes as raw fds), via LuaJIT's FFI.
-- All cdefs live here: ffi.cdef of the same name twice raises, so other helpers require this.
-- (The one place outside core/ with ffi.cdef, allowed by tests/lint.sh: fireclaw.sys has
-- no posix_spawn/waitpid because the library never needs them. Constants come from sys.)
local ffi = require "ffi"
local sys = require "fireclaw.sys"

ffi.cdef [[
typedef int pid_t;
int posix_spawnp(pid_t *pid, const char *file, const void *file_actions, const void *attrp,
                 char *const argv[], char *const envp[]);
extern char **environ;
int kill(pid_t pid, int sig);
pid_t waitpid(pid_t pid, int *status, int options);
long syscall(long number, ...);
struct pollfd { int fd; short events; short revents; };
int poll(struct pollfd *fds, unsigned long nfds, int timeout);
int pipe2(int fds[2], int flags);
long write(int fd, const void *buf, unsigned long n);
int open(const char *path, int flags, ...);
int close(int fd);
pid_t getpid(void);
char *strerror(int errnum);
]]

local C = ffi.C
local M = {}

M.SIGKILL, M.SIGTERM = sys.signal.SIGKILL, sys.signal.SIGTERM
local O_CLOEXEC, O_RDONLY = sys.O.CLOEXEC, sys.O.RDONLY
local POLLIN = 1 -- the same on every Linux architecture
local SYS_pidfd_open = 434 -- the unified syscall table (every architecture but alpha)

local function errno_text() return ffi.string(C.strerror(ffi.errno())) end

-- Start argv (a table of strings) as our child; returns its pid. The child inherits our
-- fds except O_CLOEXEC ones (every fd fireclaw opens is O_CLOEXEC).
function M.spawn(argv)
	local cargv = ffi.new("char *[?]", #argv + 1)
	local keep = {}
	for i, a in ipairs(argv) do
		keep[i] = ffi.new("char[?]", #a + 1, a)
		cargv[i - 1] = keep[i]
	end
	local pid = ffi.new("pid_t[1]")
	local rc = C.posix_spawnp(pid, argv[1], nil, nil, cargv, C.environ)
	if rc ~= 0 then error("spawn " .. argv[1] .. ": " .. ffi.string(C.strerror(rc)), 0) end
	return pid[0]
end

-- Wait up to timeout_ms for child pid to exit (pidfd + poll, no sleeping); reap it.
-- Returns true if it exited (and was reaped), false on timeout.
function M.wait_child(pid, timeout_ms)
	local pfd = tonumber(C.syscall(SYS_pidfd_open, ffi.cast("int", pid), ffi.cast("unsigned", 0)))
	if pfd >= 0 then
		local p = ffi.new("struct pollfd[1]")
		p[0].fd, p[0].events = pfd, POLLIN
		local r = C.poll(p, 1, timeout_ms)
		C.close(pfd)
		if r == 0 then return false end
	end
	local status = ffi.new("int[1]")
	return C.waitpid(pid, status, 0) == pid
end

-- TERM a child we spawned, KILL it if it has not gone after grace_ms; always reaped.
function M.stop_child(pid, grace_ms)
	C.kill(pid, M.SIGTERM)
	if not M.wait_child(pid, grace_ms or 5000) then
		C.kill(pid, M.SIGKILL)
		M.wait_child(pid, -1)
	end
end

function M.kill(pid, sig) return C.kill(pid, sig) == 0 end

-- A pipe as two raw O_CLOEXEC fds: r, w.
function M.pipe()
	local fds = ffi.new("int[2]")
	if C.pipe2(fds, O_CLOEXEC) ~= 0 then error("pipe2: " .. errno_text(), 0) end
	return fds[0], fds[1]
end

function M.write(fd, s)
	local off = 0
	while off < #s do
		local n = tonumber(C.write(fd, ffi.cast("const char *", s) + off, #s - off))
		if n < 0 then error("write: " .. errno_text(), 0) end
		off = off + n
	end
end

function M.open_read(path)
	local fd = C.open(path, O_RDONLY + O_CLOEXEC)
	if fd < 0 then error("open " .. path .. ": " .. errno_text(), 0) end
	return fd
end

function M.getpid() return C.getpid() end

-- Wait up to timeout_ms for a process that is not our child to be gone (pidfd + poll).
function M.wait_gone(pid, timeout_ms)
	local pfd = tonumber(C.syscall(SYS_pidfd_open, ffi.cast("int", pid), ffi.cast("unsigned", 0)))
	if pfd < 0 then return true end -- already gone
	local p = ffi.new("struct pollfd[1]")
	p[0].fd, p[0].events = pfd, POLLIN
	local r = C.poll(p, 1, timeout_ms)
	C.close(pfd)
	return r ~= 0
end

function M.close(fd) if fd and fd >= 0 then C.close(fd) end end

return M
