/* sys.c - fireclaw.sys: the system calls and constants the Lua code needs, in one place.
 *
 * Lua code never declares C functions or structs itself (no ffi.cdef outside core/,
 * checked by tests/lint.sh): struct layouts, flag values, errno and signal numbers differ
 * between architectures, and the C headers know them. Every constant here comes from
 * those headers.
 *
 * Convention (like luaposix): misuse (a wrong argument type, an unknown flag name, a bad
 * mode) raises; a failing call returns nil, strerror text, errno number — compare the
 * number with sys.errno.ENOENT etc. Modes are numbers or octal strings ("755").
 * Every descriptor made here is close-on-exec (O_CLOEXEC is always added).
 *
 *   sys.errno.ENOENT  sys.signal.SIGTERM  sys.O.RDONLY  sys.S.IROTH  sys.CLOCK.REALTIME
 *   sys.strerror(e)
 *   sys.open(path, flags [, mode]) -> fd   flags: a number (bit.bor of sys.O.*) or names
 *                                         "WRONLY|CREAT|TRUNC"
 *   sys.close(fd)  sys.write(fd, s) -> n (one write(2))  sys.dup(fd [, min]) -> fd
 *   sys.socketpair() -> fd, fd (unix stream sockets)
 *   sys.read(fd, max [, timeout_s]) -> data ("" at EOF): waits (interruptibly) until fd is
 *       readable, then one read(2) of at most max bytes (<= 16 MiB); timeout: nil, text, ETIMEDOUT
 *   sys.dup2(from, to) -> to   (to is not close-on-exec: it is meant for 0, 1, 2)
 *   sys.stat(path)  sys.lstat(path)  sys.fstat(fd) -> {type=, mode=, perm=, uid=, gid=,
 *       size=, dev=, ino=, nlink=, rdev=, blksize=, blocks=, atime=, mtime=, ctime=}
 *   sys.access(path [, "rwx"])  sys.mkdir(path [, mode])  sys.rmdir  sys.unlink
 *   sys.truncate(path, length)  (not following a final symlink)
 *   sys.rename(from, to)  sys.link(from, to)  sys.symlink(target, path)
 *   sys.readlink(path) -> target  sys.chmod(path, mode)  sys.fchmod(fd, mode)
 *   sys.fchown(fd, uid, gid)  (nil: unchanged)
 *   sys.memfd_create(name) -> fd  sys.isatty(fd) -> boolean
 *   sys.clock_gettime([clock]) -> seconds, nanoseconds  (default sys.CLOCK.REALTIME)
 *   sys.getpid() sys.getuid() sys.geteuid() sys.getgid() sys.getegid()
 *   sys.kill(pid, sig)  sys.setenv(name, value)   (value nil: unset)
 *   sys.pidfd_open(pid) -> fd  (readable once the process exits; check its start time after)
 */
#include "fc.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

struct constant {
	const char *name;
	long value;
};
/* {NV(EPERM)} is {"EPERM", EPERM}; {PV(O_, PATH)} is {"PATH", O_PATH} */
#define NV(x) #x, x
#define PV(prefix, x) #x, prefix##x

static const struct constant errnos[] = {
    {NV(EPERM)},	{NV(ENOENT)},	   {NV(ESRCH)},		{NV(EINTR)},
    {NV(EIO)},		{NV(ENXIO)},	   {NV(E2BIG)},		{NV(ENOEXEC)},
    {NV(EBADF)},	{NV(ECHILD)},	   {NV(EAGAIN)},	{NV(EWOULDBLOCK)},
    {NV(ENOMEM)},	{NV(EACCES)},	   {NV(EFAULT)},	{NV(EBUSY)},
    {NV(EEXIST)},	{NV(EXDEV)},	   {NV(ENODEV)},	{NV(ENOTDIR)},
    {NV(EISDIR)},	{NV(EINVAL)},	   {NV(ENFILE)},	{NV(EMFILE)},
    {NV(ENOTTY)},	{NV(ETXTBSY)},	   {NV(EFBIG)},		{NV(ENOSPC)},
    {NV(ESPIPE)},	{NV(EROFS)},	   {NV(EMLINK)},	{NV(EPIPE)},
    {NV(ERANGE)},	{NV(EDEADLK)},	   {NV(ENAMETOOLONG)},	{NV(ENOSYS)},
    {NV(ENOTEMPTY)},	{NV(ELOOP)},	   {NV(ENOTSUP)},	{NV(EOPNOTSUPP)},
    {NV(EOVERFLOW)},	{NV(ECANCELED)},   {NV(ETIMEDOUT)},	{NV(ECONNREFUSED)},
    {NV(ECONNRESET)},	{NV(EADDRINUSE)},  {NV(EADDRNOTAVAIL)}, {NV(ENETUNREACH)},
    {NV(EHOSTUNREACH)}, {NV(EINPROGRESS)}, {NV(EALREADY)},	{NV(ENOTCONN)},
    {NV(ESTALE)},	{NV(EDQUOT)},	   {NULL, 0},
};

static const struct constant signals[] = {
    {NV(SIGHUP)},    {NV(SIGINT)},  {NV(SIGQUIT)},  {NV(SIGILL)},  {NV(SIGTRAP)}, {NV(SIGABRT)},
    {NV(SIGBUS)},    {NV(SIGFPE)},  {NV(SIGKILL)},  {NV(SIGUSR1)}, {NV(SIGSEGV)}, {NV(SIGUSR2)},
    {NV(SIGPIPE)},   {NV(SIGALRM)}, {NV(SIGTERM)},  {NV(SIGCHLD)}, {NV(SIGCONT)}, {NV(SIGSTOP)},
    {NV(SIGTSTP)},   {NV(SIGTTIN)}, {NV(SIGTTOU)},  {NV(SIGURG)},  {NV(SIGXCPU)}, {NV(SIGXFSZ)},
    {NV(SIGVTALRM)}, {NV(SIGPROF)}, {NV(SIGWINCH)}, {NV(SIGIO)},   {NV(SIGPWR)},  {NV(SIGSYS)},
    {NULL, 0},
};

static const struct constant oflags[] = {
    {PV(O_, RDONLY)},	{PV(O_, WRONLY)},    {PV(O_, RDWR)},	 {PV(O_, CREAT)},
    {PV(O_, EXCL)},	{PV(O_, NOCTTY)},    {PV(O_, TRUNC)},	 {PV(O_, APPEND)},
    {PV(O_, NONBLOCK)}, {PV(O_, DIRECTORY)}, {PV(O_, NOFOLLOW)}, {PV(O_, CLOEXEC)},
    {PV(O_, PATH)},	{PV(O_, SYNC)},	     {PV(O_, DSYNC)},	 {PV(O_, TMPFILE)},
    {PV(O_, NOATIME)},	{NULL, 0},
};

static const struct constant modes[] = {
    {PV(S_, IFMT)},  {PV(S_, IFREG)}, {PV(S_, IFDIR)},	{PV(S_, IFLNK)}, {PV(S_, IFCHR)},
    {PV(S_, IFBLK)}, {PV(S_, IFIFO)}, {PV(S_, IFSOCK)}, {PV(S_, ISUID)}, {PV(S_, ISGID)},
    {PV(S_, ISVTX)}, {PV(S_, IRWXU)}, {PV(S_, IRUSR)},	{PV(S_, IWUSR)}, {PV(S_, IXUSR)},
    {PV(S_, IRWXG)}, {PV(S_, IRGRP)}, {PV(S_, IWGRP)},	{PV(S_, IXGRP)}, {PV(S_, IRWXO)},
    {PV(S_, IROTH)}, {PV(S_, IWOTH)}, {PV(S_, IXOTH)},	{NULL, 0},
};

static const struct constant clocks[] = {
    {PV(CLOCK_, REALTIME)},	      {PV(CLOCK_, MONOTONIC)},	       {PV(CLOCK_, BOOTTIME)},
    {PV(CLOCK_, PROCESS_CPUTIME_ID)}, {PV(CLOCK_, THREAD_CPUTIME_ID)}, {NULL, 0},
};

/* Push a table name -> value of the constants and store it as field `field` of the module
 * table (on top of the stack). */
static void set_constants(lua_State *L, const char *field, const struct constant *c)
{
	lua_newtable(L);
	for (; c->name; c++) {
		lua_pushnumber(L, (lua_Number)c->value);
		lua_setfield(L, -2, c->name);
	}
	lua_setfield(L, -2, field);
}

/* A failed call: nil, strerror text, errno number. */
static int fail(lua_State *L, int err)
{
	lua_pushnil(L);
	lua_pushstring(L, strerror(err));
	lua_pushinteger(L, err);
	return 3;
}

static int ok_or_fail(lua_State *L, int rc)
{
	if (rc != 0)
		return fail(L, errno);
	lua_pushboolean(L, 1);
	return 1;
}

/* A number, or a non-negative result of a call; nil, err, errno on -1. */
static int number_or_fail(lua_State *L, long n)
{
	if (n < 0)
		return fail(L, errno);
	lua_pushnumber(L, (lua_Number)n);
	return 1;
}

static int check_fd(lua_State *L, int idx)
{
	lua_Integer fd = luaL_checkinteger(L, idx);
	if (fd < 0 || fd > INT_MAX)
		luaL_argerror(L, idx, "not a file descriptor");
	return (int)fd;
}

/* A mode: a number, or an octal string ("755"); at most 07777. def < 0: required. */
static mode_t check_mode(lua_State *L, int idx, long def)
{
	long m;
	if (lua_type(L, idx) == LUA_TSTRING) {
		const char *s = lua_tostring(L, idx);
		char *end = NULL;
		m = strtol(s, &end, 8);
		if (!*s || *end)
			luaL_argerror(L, idx, lua_pushfstring(L, "mode '%s' is not octal", s));
	} else if (def >= 0 && lua_isnoneornil(L, idx)) {
		m = def;
	} else {
		m = (long)luaL_checkinteger(L, idx);
	}
	if (m < 0 || m > 07777)
		luaL_argerror(L, idx, "mode out of range (0 to 7777 octal)");
	return (mode_t)m;
}

/* An id for fchown: nil keeps it (-1). */
static unsigned check_id(lua_State *L, int idx)
{
	if (lua_isnoneornil(L, idx))
		return (unsigned)-1;
	lua_Integer id = luaL_checkinteger(L, idx);
	if (id < 0 || id > (lua_Integer)UINT_MAX)
		luaL_argerror(L, idx, "not a user or group id");
	return (unsigned)id;
}

/* Look up `name` (length len) in c; raise on an unknown name. */
static long lookup(lua_State *L, int idx, const struct constant *c, const char *prefix,
		   const char *name, size_t len)
{
	size_t plen = strlen(prefix);
	if (len > plen && strncmp(name, prefix, plen) == 0)
		name += plen, len -= plen;
	for (; c->name; c++)
		if (strlen(c->name) == len && strncmp(c->name, name, len) == 0)
			return c->value;
	char buf[32];
	snprintf(buf, sizeof buf, "%.*s", (int)len, name);
	luaL_argerror(L, idx, lua_pushfstring(L, "unknown flag '%s'", buf));
	return 0;
}

/* Open flags: a number, or names joined by '|' ("WRONLY|CREAT", "O_RDONLY"). */
static int check_oflags(lua_State *L, int idx)
{
	if (lua_type(L, idx) != LUA_TSTRING)
		return (int)luaL_checkinteger(L, idx);
	const char *s = lua_tostring(L, idx);
	int flags = 0;
	while (*s) {
		size_t len = strcspn(s, "|");
		flags |= (int)lookup(L, idx, oflags, "O_", s, len);
		s += len;
		if (*s == '|')
			s++;
	}
	return flags;
}

static int l_strerror(lua_State *L)
{
	lua_pushstring(L, strerror((int)luaL_checkinteger(L, 1)));
	return 1;
}

static int l_open(lua_State *L)
{
	const char *path = luaL_checkstring(L, 1);
	int flags = check_oflags(L, 2) | O_CLOEXEC;
	mode_t mode = check_mode(L, 3, 0);
	return number_or_fail(L, open(path, flags, mode));
}

static int l_close(lua_State *L)
{
	return ok_or_fail(L, close(check_fd(L, 1)));
}

static int l_write(lua_State *L)
{
	int fd = check_fd(L, 1);
	size_t len;
	const char *s = luaL_checklstring(L, 2, &len);
	return number_or_fail(L, (long)write(fd, s, len));
}

/* sys.read(fd, max [, timeout_s]): the wait goes through fc_poll, so SIGINT/SIGTERM raise
 * "interrupted by …" there instead of being restarted inside a blocking read(2) (the
 * handler uses SA_RESTART); a reader of stdin can then clean up. */
static int l_read(lua_State *L)
{
	int fd = check_fd(L, 1);
	lua_Integer max = luaL_checkinteger(L, 2);
	if (max < 1 || max > (16 << 20))
		luaL_argerror(L, 2, "must be 1 to 16 MiB");
	double timeout = luaL_optnumber(L, 3, -1);
	struct pollfd p = {.fd = fd, .events = POLLIN};
	if (fc_poll(L, &p, 1, timeout < 0 ? -1 : (int)(timeout * 1000)) == 0)
		return fail(L, ETIMEDOUT);
	/* the buffer is a userdata: the GC owns it, whatever raises */
	char *buf = lua_newuserdata(L, (size_t)max);
	ssize_t n;
	do
		n = read(fd, buf, (size_t)max);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return fail(L, errno);
	lua_pushlstring(L, buf, (size_t)n);
	return 1;
}

/* sys.dup2(from, to) -> to */
static int l_dup2(lua_State *L)
{
	int from = check_fd(L, 1), to = check_fd(L, 2);
	return number_or_fail(L, dup2(from, to));
}

/* sys.dup(fd [, min]) -> the lowest free fd >= min (default 0), close-on-exec */
static int l_dup(lua_State *L)
{
	int fd = check_fd(L, 1);
	lua_Integer min = luaL_optinteger(L, 2, 0);
	if (min < 0 || min > INT_MAX)
		luaL_argerror(L, 2, "not a file descriptor");
	return number_or_fail(L, fcntl(fd, F_DUPFD_CLOEXEC, (int)min));
}

/* sys.socketpair() -> fd, fd: a connected pair of unix stream sockets (O_CLOEXEC); the
 * tests run the guest agent on one end. */
static int l_socketpair(lua_State *L)
{
	int sv[2];
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
		return fail(L, errno);
	lua_pushinteger(L, sv[0]);
	lua_pushinteger(L, sv[1]);
	return 2;
}

static const char *file_type(mode_t m)
{
	switch (m & S_IFMT) {
	case S_IFREG:
		return "file";
	case S_IFDIR:
		return "directory";
	case S_IFLNK:
		return "link";
	case S_IFCHR:
		return "char";
	case S_IFBLK:
		return "block";
	case S_IFIFO:
		return "fifo";
	case S_IFSOCK:
		return "socket";
	}
	return "unknown";
}

static void set_number(lua_State *L, const char *key, lua_Number n)
{
	lua_pushnumber(L, n);
	lua_setfield(L, -2, key);
}

static int push_stat(lua_State *L, int rc, const struct stat *st)
{
	if (rc != 0)
		return fail(L, errno);
	lua_createtable(L, 0, 15);
	lua_pushstring(L, file_type(st->st_mode));
	lua_setfield(L, -2, "type");
	set_number(L, "mode", st->st_mode);
	set_number(L, "perm", st->st_mode & 07777);
	set_number(L, "uid", st->st_uid);
	set_number(L, "gid", st->st_gid);
	set_number(L, "size", (lua_Number)st->st_size);
	set_number(L, "dev", (lua_Number)st->st_dev);
	set_number(L, "ino", (lua_Number)st->st_ino);
	set_number(L, "nlink", (lua_Number)st->st_nlink);
	set_number(L, "rdev", (lua_Number)st->st_rdev);
	set_number(L, "blksize", (lua_Number)st->st_blksize);
	set_number(L, "blocks", (lua_Number)st->st_blocks);
	set_number(L, "atime", st->st_atim.tv_sec + st->st_atim.tv_nsec / 1e9);
	set_number(L, "mtime", st->st_mtim.tv_sec + st->st_mtim.tv_nsec / 1e9);
	set_number(L, "ctime", st->st_ctim.tv_sec + st->st_ctim.tv_nsec / 1e9);
	return 1;
}

static int l_stat(lua_State *L)
{
	struct stat st;
	return push_stat(L, stat(luaL_checkstring(L, 1), &st), &st);
}

static int l_lstat(lua_State *L)
{
	struct stat st;
	return push_stat(L, lstat(luaL_checkstring(L, 1), &st), &st);
}

static int l_fstat(lua_State *L)
{
	struct stat st;
	return push_stat(L, fstat(check_fd(L, 1), &st), &st);
}

/* sys.access(path [, "rwx"]): "" or nil asks whether it exists */
static int l_access(lua_State *L)
{
	const char *path = luaL_checkstring(L, 1);
	const char *how = luaL_optstring(L, 2, "");
	int mode = F_OK;
	for (const char *c = how; *c; c++) {
		if (*c == 'r')
			mode |= R_OK;
		else if (*c == 'w')
			mode |= W_OK;
		else if (*c == 'x')
			mode |= X_OK;
		else
			luaL_argerror(L, 2, "r, w and x only");
	}
	return ok_or_fail(L, access(path, mode));
}

static int l_mkdir(lua_State *L)
{
	const char *path = luaL_checkstring(L, 1);
	return ok_or_fail(L, mkdir(path, check_mode(L, 2, 0755)));
}

static int l_rmdir(lua_State *L)
{
	return ok_or_fail(L, rmdir(luaL_checkstring(L, 1)));
}

static int l_unlink(lua_State *L)
{
	return ok_or_fail(L, unlink(luaL_checkstring(L, 1)));
}

/* truncate(2) through an O_NOFOLLOW descriptor: a symlink at path is an error (ELOOP) */
static int l_truncate(lua_State *L)
{
	const char *path = luaL_checkstring(L, 1);
	lua_Number len = luaL_checknumber(L, 2);
	if (!(len >= 0 && len <= 1e18))
		fc_error(L, "sys.truncate: bad length %.0f", len);
	int fd = open(path, O_WRONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
	if (fd < 0)
		return ok_or_fail(L, -1);
	int rc = ftruncate(fd, (off_t)len);
	int e = errno;
	close(fd);
	errno = e;
	return ok_or_fail(L, rc);
}

static int l_rename(lua_State *L)
{
	return ok_or_fail(L, rename(luaL_checkstring(L, 1), luaL_checkstring(L, 2)));
}

static int l_link(lua_State *L)
{
	return ok_or_fail(L, link(luaL_checkstring(L, 1), luaL_checkstring(L, 2)));
}

static int l_symlink(lua_State *L)
{
	return ok_or_fail(L, symlink(luaL_checkstring(L, 1), luaL_checkstring(L, 2)));
}

static int l_readlink(lua_State *L)
{
	char buf[PATH_MAX];
	ssize_t n = readlink(luaL_checkstring(L, 1), buf, sizeof buf);
	if (n < 0)
		return fail(L, errno);
	if ((size_t)n == sizeof buf) /* may be cut short */
		return fail(L, ENAMETOOLONG);
	lua_pushlstring(L, buf, (size_t)n);
	return 1;
}

static int l_chmod(lua_State *L)
{
	const char *path = luaL_checkstring(L, 1);
	return ok_or_fail(L, chmod(path, check_mode(L, 2, -1)));
}

static int l_fchmod(lua_State *L)
{
	int fd = check_fd(L, 1);
	return ok_or_fail(L, fchmod(fd, check_mode(L, 2, -1)));
}

static int l_fchown(lua_State *L)
{
	int fd = check_fd(L, 1);
	return ok_or_fail(L, fchown(fd, check_id(L, 2), check_id(L, 3)));
}

/* sys.memfd_create(name) -> fd of an anonymous tmpfs file (close-on-exec) */
static int l_memfd_create(lua_State *L)
{
	return number_or_fail(L, memfd_create(luaL_checkstring(L, 1), MFD_CLOEXEC));
}

static int l_isatty(lua_State *L)
{
	lua_pushboolean(L, isatty(check_fd(L, 1)));
	return 1;
}

static int l_clock_gettime(lua_State *L)
{
	struct timespec ts;
	if (clock_gettime((clockid_t)luaL_optinteger(L, 1, CLOCK_REALTIME), &ts) != 0)
		return fail(L, errno);
	lua_pushnumber(L, (lua_Number)ts.tv_sec);
	lua_pushnumber(L, (lua_Number)ts.tv_nsec);
	return 2;
}

static int l_getpid(lua_State *L)
{
	lua_pushnumber(L, getpid());
	return 1;
}

static int l_getuid(lua_State *L)
{
	lua_pushnumber(L, getuid());
	return 1;
}

static int l_geteuid(lua_State *L)
{
	lua_pushnumber(L, geteuid());
	return 1;
}

static int l_getgid(lua_State *L)
{
	lua_pushnumber(L, getgid());
	return 1;
}

static int l_getegid(lua_State *L)
{
	lua_pushnumber(L, getegid());
	return 1;
}

static int l_kill(lua_State *L)
{
	lua_Integer pid = luaL_checkinteger(L, 1);
	lua_Integer sig = luaL_checkinteger(L, 2);
	/* 0 and -1 signal process groups or everything we may signal: never what a caller
	 * holding a pid means */
	if (pid <= 0 || pid > INT_MAX)
		luaL_argerror(L, 1, "not a process id");
	if (sig < 0 || sig >= NSIG)
		luaL_argerror(L, 2, "not a signal number");
	return ok_or_fail(L, kill((pid_t)pid, (int)sig));
}

static int l_pidfd_open(lua_State *L)
{
	lua_Integer pid = luaL_checkinteger(L, 1);
	if (pid <= 0 || pid > INT_MAX)
		luaL_argerror(L, 1, "not a process id");
	long fd = syscall(SYS_pidfd_open, (pid_t)pid, 0);
	if (fd < 0)
		return fail(L, errno);
	if (fcntl((int)fd, F_SETFD, FD_CLOEXEC) < 0) {
		int e = errno;
		close((int)fd);
		return fail(L, e);
	}
	lua_pushinteger(L, fd);
	return 1;
}

static int l_setenv(lua_State *L)
{
	const char *name = luaL_checkstring(L, 1);
	if (lua_isnoneornil(L, 2)) /* nil: unset */
		return ok_or_fail(L, unsetenv(name));
	return ok_or_fail(L, setenv(name, luaL_checkstring(L, 2), 1));
}

int luaopen_fireclaw_sys(lua_State *L)
{
	static const luaL_Reg fns[] = {
	    {"strerror", l_strerror}, {"open", l_open},
	    {"close", l_close},	      {"write", l_write},
	    {"dup", l_dup},	      {"stat", l_stat},
	    {"read", l_read},	      {"dup2", l_dup2},
	    {"lstat", l_lstat},	      {"fstat", l_fstat},
	    {"access", l_access},     {"mkdir", l_mkdir},
	    {"rmdir", l_rmdir},	      {"unlink", l_unlink},
	    {"truncate", l_truncate},
	    {"rename", l_rename},     {"link", l_link},
	    {"symlink", l_symlink},   {"readlink", l_readlink},
	    {"chmod", l_chmod},	      {"fchmod", l_fchmod},
	    {"fchown", l_fchown},     {"memfd_create", l_memfd_create},
	    {"isatty", l_isatty},     {"clock_gettime", l_clock_gettime},
	    {"getpid", l_getpid},     {"getuid", l_getuid},
	    {"geteuid", l_geteuid},   {"getgid", l_getgid},
	    {"getegid", l_getegid},   {"kill", l_kill},
	    {"setenv", l_setenv},     {"pidfd_open", l_pidfd_open},
	    {NULL, NULL},
	};
	lua_newtable(L);
	luaL_register(L, NULL, fns);
	lua_pushcfunction(L, l_socketpair); /* (outside the table: it keeps its two columns) */
	lua_setfield(L, -2, "socketpair");
	set_constants(L, "errno", errnos);
	set_constants(L, "signal", signals);
	set_constants(L, "O", oflags);
	set_constants(L, "S", modes);
	set_constants(L, "CLOCK", clocks);
	return 1;
}
