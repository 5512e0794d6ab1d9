/* vm.c - fireclaw.core.vm: the wire protocols between fireclaw and a VMM process.
 *
 *   api = vm.api_client(socket_path [, {timeout = 10, name = "firecracker"}])
 *   api:get(path)  api:put(path, t)  api:patch(path, t)
 *       -> the decoded JSON body, or true (204 / empty body); an HTTP error raises
 *          "firecracker: PUT /boot-source: 400 <fault_message>"
 *   api:close()
 *
 *   vm.wait_socket(path, timeout_s [, proc [, {log = path | {paths}, name =, what =}]])
 *       -> true once a connect() to the unix socket succeeds; raises on timeout or when
 *          `proc` (a fireclaw.proc) exits first, quoting the tail of its log files
 *   vm.log_tail(path | {paths} [, lines = 10]) -> the last lines of the files ("" if none)
 *
 *   q = vm.qmp_connect(path [, timeout_s = 5])   -- greeting read, qmp_capabilities sent
 *   q:execute(cmd [, args [, timeout_s [, fd]]]) -> the "return" value; an error raises
 *          "qmp: migrate: GenericError: <desc>". fd (an integer) goes along with the
 *          command (SCM_RIGHTS), as getfd and add-fd want; QEMU gets its own copy.
 *   q:events() -> queued asynchronous events (the queue is emptied)
 *   q:wait_event(name [, timeout_s]) -> the event, or nil on timeout
 *   q:greeting() -> the QMP greeting ({QMP = {version = …}})
 *   q:close()
 *
 *   vm.memfd(bytes [, src_path]) -> fd (an integer the caller closes)
 *       a memfd of `bytes` bytes; with src_path, the non-zero pages of that file's data
 *       ranges (its first `bytes` at most) are copied in, zero pages stay holes. A restore
 *       hands QEMU such a copy of a snapshot's memory (QEMU 7.2 opens its RAM file
 *       read-write, and a snapshot must stay out of every VMM's reach: docs/security.md,
 *       "Golden files"), and a kernel or initrd only root can read goes the same way.
 *   vm.memfd_fill(fd, src_path)   the same copy into an existing file (its size bounds it)
 *   vm.ram_save(src_path, dst_path)
 *       a new file dst_path (0600, created exclusively; removed again if the copy fails)
 *       of src_path's size holding its non-zero pages, every zero page a hole: how a
 *       snapshot's memory is written, so that restores find only data in its data ranges
 *       (a restore's copy costs per data page: the golden memory entries of docs/DECISIONS.md)
 *
 * The Firecracker client drives libcurl's multi interface from fc_poll, so a request is
 * interruptible by Ctrl-C like every other wait, and keeps one easy handle per VM so the
 * connection to the API socket is reused across requests. It lives in core/fc_vm_api.c
 * (shared declarations: core/fc_vm.h).
 */
#include "fc_vm.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <curl/curl.h>

#define QMP_MT "fireclaw.vm.qmp"
#define MAX_LOG_FILES 8

/* ---- JSON through fireclaw.json (one implementation of the null/array rules) ---- */

static void push_json_fn(lua_State *L, const char *fn)
{
	lua_getglobal(L, "require");
	lua_pushliteral(L, "fireclaw.json");
	lua_call(L, 1, 1);
	lua_getfield(L, -1, fn);
	lua_remove(L, -2);
}

/* Decode s; pushes the value and returns 1, or pushes the error message and returns 0. */
int vm_json_decode(lua_State *L, const char *s, size_t len)
{
	push_json_fn(L, "decode");
	lua_pushlstring(L, s, len);
	return lua_pcall(L, 1, 1, 0) == 0;
}

/* Encode the value at idx; pushes the string. Raises on values JSON cannot hold. */
const char *vm_json_encode(lua_State *L, int idx, size_t *len)
{
	idx = idx < 0 ? lua_gettop(L) + idx + 1 : idx;
	push_json_fn(L, "encode");
	lua_pushvalue(L, idx);
	lua_call(L, 1, 1);
	return lua_tolstring(L, -1, len);
}

/* ==== waiting for a socket ==== */

/* The last `lines` lines of one file, appended to b (nothing if it is missing or empty). */
static void tail_file(struct fc_buf *b, const char *path, int lines)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return;
	char chunk[8192];
	off_t size = lseek(fd, 0, SEEK_END);
	off_t from = size > (off_t)sizeof chunk - 1 ? size - (off_t)sizeof chunk + 1 : 0;
	ssize_t n = size > 0 ? pread(fd, chunk, (size_t)(size - from), from) : 0;
	close(fd);
	if (n <= 0)
		return;
	while (n > 0 && (chunk[n - 1] == '\n' || chunk[n - 1] == '\r' || chunk[n - 1] == ' '))
		n--;
	if (n == 0)
		return;
	ssize_t start = n;
	for (int seen = 0; start > 0; start--) {
		if (chunk[start - 1] == '\n' && ++seen == lines)
			break;
	}
	if (b->len)
		fc_buf_append(b, "\n", 1);
	fc_buf_append(b, chunk + start, (size_t)(n - start));
}

/* Push the tails of the file (a string) or files (an array) at idx, joined. */
static void push_tail(lua_State *L, int idx, int lines)
{
	struct fc_buf b = {0};
	if (lua_isstring(L, idx)) {
		tail_file(&b, lua_tostring(L, idx), lines);
	} else if (lua_istable(L, idx)) {
		int n = (int)lua_objlen(L, idx);
		for (int i = 1; i <= n && i <= MAX_LOG_FILES; i++) {
			lua_rawgeti(L, idx, i);
			if (lua_isstring(L, -1))
				tail_file(&b, lua_tostring(L, -1), lines);
			lua_pop(L, 1);
		}
	}
	lua_pushlstring(L, b.data ? b.data : "", b.len);
	fc_buf_free(&b);
}

static int l_log_tail(lua_State *L)
{
	int lines = (int)luaL_optinteger(L, 2, 10);
	push_tail(L, 1, lines < 1 ? 1 : lines);
	return 1;
}

/* Call method `name` of the object at idx with no arguments; one result pushed. */
static void call_method(lua_State *L, int idx, const char *name, int nargs_extra, double arg)
{
	lua_getfield(L, idx, name);
	lua_pushvalue(L, idx);
	if (nargs_extra)
		lua_pushnumber(L, arg);
	lua_call(L, 1 + nargs_extra, 1);
}

/* The process at idx is gone: raise "<name> exited (status 1) before its <what> appeared". */
static void raise_exited(lua_State *L, int proc, int opts, const char *name, const char *what)
{
	call_method(L, proc, "wait", 1, 0);
	char how[64] = "exited";
	if (lua_istable(L, -1)) {
		lua_getfield(L, -1, "status");
		lua_getfield(L, -2, "signal");
		if (lua_isnumber(L, -2))
			snprintf(how, sizeof how, "exited (status %d)", (int)lua_tointeger(L, -2));
		else if (lua_isnumber(L, -1))
			snprintf(how, sizeof how, "was killed (signal %d)",
				 (int)lua_tointeger(L, -1));
	}
	lua_getfield(L, opts, "log");
	push_tail(L, lua_gettop(L), 10);
	const char *tail = lua_tostring(L, -1);
	fc_error(L, "%s %s before its %s appeared: %s", name, how, what,
		 *tail ? tail : "(its log is empty)");
}

/* One connect() attempt: 0 on success, else -1 with errno. */
static int try_connect(const struct sockaddr_un *sa)
{
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	int rc = connect(fd, (const struct sockaddr *)sa, sizeof *sa);
	int e = errno;
	close(fd);
	errno = e;
	return rc;
}

static void fill_sockaddr(lua_State *L, struct sockaddr_un *sa, const char *path)
{
	memset(sa, 0, sizeof *sa);
	sa->sun_family = AF_UNIX;
	if (strlen(path) >= sizeof sa->sun_path)
		fc_error(L, "socket path too long for a unix socket: %s", path);
	strcpy(sa->sun_path, path);
}

/* Poll a unix socket until it accepts connections. Steps start at 1 ms and grow to
 * 10 ms: a VMM's socket appears within a few ms, and 100 ms steps would dominate a
 * restore. The wait also wakes as soon as the process exits (its pidfd is polled). */
static int l_wait_socket(lua_State *L)
{
	const char *path = luaL_checkstring(L, 1);
	double timeout = luaL_checknumber(L, 2);
	int proc = lua_isnoneornil(L, 3) ? 0 : 3;
	lua_settop(L, 4);
	if (lua_isnil(L, 4)) {
		lua_newtable(L);
		lua_replace(L, 4);
	}
	static const char *const known[] = {"name", "what", "log", NULL};
	fc_opt_check(L, 4, "vm.wait_socket", known);
	const char *name = fc_opt_string(L, 4, "name", "the VMM");
	const char *what = fc_opt_string(L, 4, "what", "socket");
	struct sockaddr_un sa;
	fill_sockaddr(L, &sa, path);
	int pidfd = -1;
	if (proc) {
		call_method(L, proc, "pidfd", 0, 0);
		pidfd = (int)lua_tointeger(L, -1);
		lua_pop(L, 1);
	}
	double deadline = fc_now_ms() + timeout * 1000, step = 1;
	for (;;) {
		if (try_connect(&sa) == 0) {
			lua_pushboolean(L, 1);
			return 1;
		}
		if (errno != ENOENT && errno != ECONNREFUSED && errno != EAGAIN)
			fc_errno_error(L, errno, "%s: connect to %s %s", name, what, path);
		if (proc) {
			call_method(L, proc, "alive", 0, 0);
			if (!lua_toboolean(L, -1))
				raise_exited(L, proc, 4, name, what);
			lua_pop(L, 1);
		}
		int left = fc_ms_left(deadline);
		if (left == 0) {
			lua_getfield(L, 4, "log");
			push_tail(L, lua_gettop(L), 10);
			const char *tail = lua_tostring(L, -1);
			fc_error(L, "%s: %s %s did not appear within %gs%s%s", name, what, path,
				 timeout, *tail ? "; its log ends with:\n" : "", tail);
		}
		struct pollfd p = {.fd = pidfd, .events = POLLIN};
		fc_poll(L, &p, pidfd >= 0 ? 1 : 0, left < step ? left : (int)step);
		step = step * 1.5 > 10 ? 10 : step * 1.5;
	}
}

/* ==== QMP client ==== */

struct qmp {
	int fd;
	long next_id;
	struct fc_buf in; /* bytes read but not yet split into messages */
};

static int qmp_close(lua_State *L)
{
	struct qmp *q = fc_check(L, 1, QMP_MT);
	if (q->fd >= 0)
		close(q->fd);
	q->fd = -1;
	fc_buf_free(&q->in);
	return 0;
}

static struct qmp *check_qmp(lua_State *L)
{
	struct qmp *q = fc_check(L, 1, QMP_MT);
	if (q->fd < 0)
		fc_error(L, "qmp: connection is closed");
	return q;
}

/* Read what the socket has into q->in, waiting at most wait_ms. Returns 0 on timeout,
 * 1 when bytes arrived; raises when QEMU closed the connection. */
static int qmp_fill(lua_State *L, struct qmp *q, int wait_ms)
{
	struct pollfd p = {.fd = q->fd, .events = POLLIN};
	if (fc_poll(L, &p, 1, wait_ms) == 0)
		return 0;
	char chunk[16384];
	ssize_t n = recv(q->fd, chunk, sizeof chunk, 0);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return 1;
	if (n < 0)
		fc_errno_error(L, errno, "qmp: read");
	if (n == 0)
		fc_error(L, "qmp: QEMU closed the connection");
	if (fc_buf_append(&q->in, chunk, (size_t)n) < 0)
		fc_error(L, "qmp: out of memory");
	return 1;
}

/* Push the next complete message (decoded) and return 1, or return 0 if none arrived
 * before the deadline (monotonic ms; 0 = only what is already readable). */
static int qmp_next(lua_State *L, struct qmp *q, double deadline)
{
	for (;;) {
		char *nl = q->in.len ? memchr(q->in.data, '\n', q->in.len) : NULL;
		if (nl) {
			size_t len = (size_t)(nl - q->in.data);
			int ok = vm_json_decode(L, q->in.data, len);
			memmove(q->in.data, nl + 1, q->in.len - len - 1);
			q->in.len -= len + 1;
			if (!ok)
				fc_error(L, "qmp: bad JSON from QEMU (%s)", lua_tostring(L, -1));
			return 1;
		}
		if (q->in.len > MAX_MESSAGE)
			fc_error(L, "qmp: a message from QEMU is longer than %d bytes",
				 (int)MAX_MESSAGE);
		int left = deadline == 0 ? 0 : fc_ms_left(deadline);
		if (!qmp_fill(L, q, left) && left == 0)
			return 0;
	}
}

/* Append the message on top of the stack to the event queue (the userdata's env). */
static void queue_event(lua_State *L, int self)
{
	lua_getfenv(L, self);
	lua_getfield(L, -1, "events");
	lua_pushvalue(L, -3);
	lua_rawseti(L, -2, (int)lua_objlen(L, -2) + 1);
	lua_pop(L, 3);
}

static int is_event(lua_State *L, int idx)
{
	lua_getfield(L, idx, "event");
	int r = !lua_isnil(L, -1);
	lua_pop(L, 1);
	return r;
}

/* Send one message; when fd >= 0 it travels with the first bytes that go out. */
static void qmp_send(lua_State *L, struct qmp *q, const char *s, size_t len, int fd,
		     double deadline)
{
	size_t off = 0;
	while (off < len) {
		ssize_t n;
		if (fd >= 0) {
			union {
				char buf[CMSG_SPACE(sizeof(int))];
				struct cmsghdr align;
			} u;
			memset(&u, 0, sizeof u);
			struct iovec iov = {.iov_base = (char *)s + off, .iov_len = len - off};
			struct msghdr m = {.msg_iov = &iov,
					   .msg_iovlen = 1,
					   .msg_control = u.buf,
					   .msg_controllen = sizeof u.buf};
			struct cmsghdr *c = CMSG_FIRSTHDR(&m);
			c->cmsg_level = SOL_SOCKET;
			c->cmsg_type = SCM_RIGHTS;
			c->cmsg_len = CMSG_LEN(sizeof(int));
			memcpy(CMSG_DATA(c), &fd, sizeof fd);
			n = sendmsg(q->fd, &m, MSG_NOSIGNAL);
			if (n > 0)
				fd = -1;
		} else {
			n = send(q->fd, s + off, len - off, MSG_NOSIGNAL);
		}
		if (n > 0) {
			off += (size_t)n;
			continue;
		}
		if (n < 0 && errno != EAGAIN && errno != EINTR)
			fc_errno_error(L, errno, "qmp: write");
		struct pollfd p = {.fd = q->fd, .events = POLLOUT};
		if (fc_poll(L, &p, 1, fc_ms_left(deadline)) == 0)
			fc_error(L, "qmp: QEMU does not read its socket");
	}
}

/* Raise "qmp: <cmd>: <class>: <desc>" for the error response on top of the stack. */
static void raise_qmp_error(lua_State *L, const char *cmd)
{
	lua_getfield(L, -1, "error");
	if (!lua_istable(L, -1)) /* {"error": true}: not QMP's shape, say what little we can */
		lua_newtable(L);
	lua_getfield(L, -1, "class");
	lua_getfield(L, -2, "desc");
	fc_error(L, "qmp: %s: %s: %s", cmd, lua_isstring(L, -2) ? lua_tostring(L, -2) : "Error",
		 lua_isstring(L, -1) ? lua_tostring(L, -1) : "(no description)");
}

/* Send {"execute": cmd, "arguments": args, "id": n} and wait for the answer with that id;
 * events read meanwhile are queued. Pushes the "return" value. */
static void qmp_execute(lua_State *L, int self, struct qmp *q, const char *cmd, int args,
			double timeout_s, int fd)
{
	long id = ++q->next_id;
	lua_createtable(L, 0, 3);
	lua_pushstring(L, cmd);
	lua_setfield(L, -2, "execute");
	if (args) {
		lua_pushvalue(L, args);
		lua_setfield(L, -2, "arguments");
	}
	lua_pushinteger(L, id);
	lua_setfield(L, -2, "id");
	size_t len;
	vm_json_encode(L, -1, &len);
	lua_pushliteral(L, "\n");
	lua_concat(L, 2);
	const char *msg = lua_tolstring(L, -1, &len);
	double deadline = fc_now_ms() + timeout_s * 1000;
	qmp_send(L, q, msg, len, fd, deadline);
	lua_pop(L, 2);
	for (;;) {
		if (!qmp_next(L, q, deadline))
			fc_error(L, "qmp: %s: no answer within %gs", cmd, timeout_s);
		if (!lua_istable(L, -1)) {
			lua_pop(L, 1);
			continue;
		}
		if (is_event(L, -1)) {
			queue_event(L, self);
			continue;
		}
		lua_getfield(L, -1, "id");
		int mine = lua_tointeger(L, -1) == id;
		lua_pop(L, 1);
		if (!mine) { /* the late answer to an interrupted command */
			lua_pop(L, 1);
			continue;
		}
		lua_getfield(L, -1, "error");
		int failed = !lua_isnil(L, -1);
		lua_pop(L, 1);
		if (failed)
			raise_qmp_error(L, cmd);
		lua_getfield(L, -1, "return");
		lua_remove(L, -2);
		return;
	}
}

static int qmp_l_execute(lua_State *L)
{
	struct qmp *q = check_qmp(L);
	const char *cmd = luaL_checkstring(L, 2);
	int args = 0;
	if (!lua_isnoneornil(L, 3)) {
		luaL_checktype(L, 3, LUA_TTABLE);
		args = 3;
	}
	double timeout = luaL_optnumber(L, 4, 30);
	int fd = luaL_optint(L, 5, -1);
	qmp_execute(L, 1, q, cmd, args, timeout, fd);
	return 1;
}

/* Queue every message that is already readable (events QEMU sent on its own). */
static void qmp_drain(lua_State *L, struct qmp *q)
{
	while (qmp_next(L, q, 0)) {
		if (lua_istable(L, -1) && is_event(L, -1))
			queue_event(L, 1);
		else
			lua_pop(L, 1);
	}
}

static int qmp_events(lua_State *L)
{
	struct qmp *q = check_qmp(L);
	qmp_drain(L, q);
	lua_getfenv(L, 1);
	lua_getfield(L, -1, "events");
	lua_newtable(L);
	lua_setfield(L, -3, "events");
	return 1;
}

/* Remove and push the first queued event called `name`; 0 if there is none. */
static int take_event(lua_State *L, const char *name)
{
	lua_getfenv(L, 1);
	lua_getfield(L, -1, "events");
	int list = lua_gettop(L), n = (int)lua_objlen(L, list);
	for (int i = 1; i <= n; i++) {
		lua_rawgeti(L, list, i);
		lua_getfield(L, -1, "event");
		int match = lua_isstring(L, -1) && strcmp(lua_tostring(L, -1), name) == 0;
		lua_pop(L, 1);
		if (!match) {
			lua_pop(L, 1);
			continue;
		}
		for (int j = i; j < n; j++) { /* close the gap */
			lua_rawgeti(L, list, j + 1);
			lua_rawseti(L, list, j);
		}
		lua_pushnil(L);
		lua_rawseti(L, list, n);
		lua_replace(L, list - 1);
		lua_settop(L, list - 1);
		return 1;
	}
	lua_pop(L, 2);
	return 0;
}

static int qmp_wait_event(lua_State *L)
{
	struct qmp *q = check_qmp(L);
	const char *name = luaL_checkstring(L, 2);
	double deadline = fc_now_ms() + luaL_optnumber(L, 3, 30) * 1000;
	for (;;) {
		if (take_event(L, name))
			return 1;
		if (!qmp_next(L, q, deadline))
			return 0;
		if (lua_istable(L, -1) && is_event(L, -1))
			queue_event(L, 1);
		else
			lua_pop(L, 1);
	}
}

static int qmp_greeting(lua_State *L)
{
	fc_check(L, 1, QMP_MT);
	lua_getfenv(L, 1);
	lua_getfield(L, -1, "greeting");
	return 1;
}

static int qmp_tostring(lua_State *L)
{
	struct qmp *q = fc_check(L, 1, QMP_MT);
	lua_pushfstring(L, "qmp connection (%s)", q->fd >= 0 ? "open" : "closed");
	return 1;
}

/* Connect to QEMU's QMP socket, read the greeting and leave capabilities negotiation. */
static int l_qmp_connect(lua_State *L)
{
	const char *path = luaL_checkstring(L, 1);
	double timeout = luaL_optnumber(L, 2, 5);
	struct sockaddr_un sa;
	fill_sockaddr(L, &sa, path);
	struct qmp *q = fc_new(L, sizeof *q, QMP_MT);
	int self = lua_gettop(L);
	q->fd = -1;
	lua_createtable(L, 0, 2);
	lua_newtable(L);
	lua_setfield(L, -2, "events");
	lua_setfenv(L, self);
	q->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (q->fd < 0)
		fc_errno_error(L, errno, "qmp: socket");
	if (connect(q->fd, (struct sockaddr *)&sa, sizeof sa) < 0)
		fc_errno_error(L, errno, "qmp: connect to %s", path);
	double deadline = fc_now_ms() + timeout * 1000;
	if (!qmp_next(L, q, deadline))
		fc_error(L, "qmp: no greeting from %s within %gs", path, timeout);
	if (!lua_istable(L, -1))
		fc_error(L, "qmp: %s does not speak QMP (no greeting)", path);
	lua_getfield(L, -1, "QMP");
	if (lua_isnil(L, -1))
		fc_error(L, "qmp: %s does not speak QMP (no greeting)", path);
	lua_pop(L, 1);
	lua_getfenv(L, self);
	lua_insert(L, -2);
	lua_setfield(L, -2, "greeting");
	lua_pop(L, 1);
	qmp_execute(L, self, q, "qmp_capabilities", 0, timeout, -1);
	lua_settop(L, self);
	return 1;
}

/* ---- guest RAM ---- */

#define RAM_PAGE 4096

/* A page of data usually shows a non-zero byte in its first cache line: stop there (a
 * snapshot's memory holds zero pages as holes, so nearly every page scanned has data). */
static int page_is_zero(const unsigned char *p)
{
	const unsigned long *w = (const unsigned long *)p;
	for (size_t i = 0; i < RAM_PAGE / sizeof *w; i += 8) {
		unsigned long acc = 0;
		for (size_t j = 0; j < 8; j++)
			acc |= w[i + j];
		if (acc)
			return 0;
	}
	return 1;
}

/* Write the non-zero pages of map[off, end) to fd at the same offsets, one pwrite per run
 * of non-zero pages: zero pages stay holes (no memory for them until the guest writes).
 * off is page-aligned; end may not be (a file's last page: the mapping reads zeros past
 * its end). Returns 0 or -errno. */
static int ram_copy_range(int fd, const unsigned char *map, off_t off, off_t end)
{
	off_t run = -1;
	for (off_t p = off;; p += RAM_PAGE) {
		int data = p < end && !page_is_zero(map + p);
		if (data && run < 0)
			run = p;
		if (data || run < 0) {
			if (p >= end)
				return 0;
			continue;
		}
		off_t stop = p < end ? p : end;
		for (off_t w = run; w < stop;) {
			ssize_t r = pwrite(fd, map + w, (size_t)(stop - w), w);
			if (r < 0 && errno == EINTR)
				continue;
			if (r <= 0)
				return r < 0 ? -errno : -EIO;
			w += r;
		}
		run = -1;
		if (p >= end)
			return 0;
	}
}

/* Copy the data ranges of in's first len bytes into fd. */
static int ram_copy(int fd, int in, off_t len)
{
	if (len == 0)
		return 0;
	unsigned char *map = mmap(NULL, (size_t)len, PROT_READ, MAP_PRIVATE, in, 0);
	if (map == MAP_FAILED)
		return -errno;
	int err = 0;
	for (off_t off = 0; off < len && !err;) {
		off_t data = lseek(in, off, SEEK_DATA);
		if (data < 0 || data >= len) {
			err = data < 0 && errno != ENXIO ? -errno : 0;
			break; /* ENXIO: only a hole is left */
		}
		off_t hole = lseek(in, data, SEEK_HOLE);
		if (hole < 0) {
			err = -errno;
			break;
		}
		data &= ~(off_t)(RAM_PAGE - 1);
		hole = (hole + RAM_PAGE - 1) & ~(off_t)(RAM_PAGE - 1);
		hole = hole > len ? len : hole;
		madvise(map + data, (size_t)(hole - data), MADV_SEQUENTIAL);
		err = ram_copy_range(fd, map, data, hole);
		off = hole;
	}
	munmap(map, (size_t)len);
	return err;
}

/* Open src for reading: a regular file. Returns the fd and its size, or raises. */
static int ram_open_src(lua_State *L, const char *src, off_t *size)
{
	int in = open(src, O_RDONLY | O_CLOEXEC);
	if (in < 0)
		fc_errno_error(L, errno, "vm: open %s", src);
	struct stat st;
	int e = fstat(in, &st) < 0 ? errno : S_ISREG(st.st_mode) ? 0 : EINVAL;
	if (e) {
		close(in);
		fc_errno_error(L, e, "vm: %s: not a regular file", src);
	}
	*size = st.st_size;
	return in;
}

static int l_memfd(lua_State *L)
{
	lua_Number n = luaL_checknumber(L, 1);
	const char *src = luaL_optstring(L, 2, NULL);
	if (!(n >= 0 && n <= (lua_Number)(1ull << 42) && (off_t)n == n))
		fc_error(L, "vm: memfd: bad size %.0f", n);
	off_t size = (off_t)n, src_size = 0;
	int in = src ? ram_open_src(L, src, &src_size) : -1;
	int fd = memfd_create("fireclaw", MFD_CLOEXEC);
	int err = fd < 0 || ftruncate(fd, size) < 0 ? -errno : 0;
	if (!err && in >= 0)
		err = ram_copy(fd, in, src_size < size ? src_size : size);
	if (in >= 0)
		close(in);
	if (err) {
		if (fd >= 0)
			close(fd);
		fc_errno_error(L, -err, "vm: memfd of %.0f bytes%s%s", n, src ? " from " : "",
			       src ? src : "");
	}
	lua_pushinteger(L, fd);
	return 1;
}

static int l_memfd_fill(lua_State *L)
{
	int fd = luaL_checkinteger(L, 1);
	const char *src = luaL_checkstring(L, 2);
	struct stat st;
	if (fstat(fd, &st) < 0)
		fc_errno_error(L, errno, "vm: memfd_fill %d from %s", fd, src);
	off_t src_size;
	int in = ram_open_src(L, src, &src_size);
	int err = ram_copy(fd, in, src_size < st.st_size ? src_size : st.st_size);
	close(in);
	if (err)
		fc_errno_error(L, -err, "vm: memfd_fill from %s", src);
	return 0;
}

static int l_ram_save(lua_State *L)
{
	const char *src = luaL_checkstring(L, 1), *dst = luaL_checkstring(L, 2);
	off_t size;
	int in = ram_open_src(L, src, &size);
	int out = open(dst, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (out < 0) {
		int e = errno;
		close(in);
		fc_errno_error(L, e, "vm: ram_save %s: create %s", src, dst);
	}
	int err = ftruncate(out, size) < 0 ? -errno : ram_copy(out, in, size);
	close(in);
	if (close(out) < 0 && !err)
		err = -errno;
	if (err) {
		unlink(dst);
		fc_errno_error(L, -err, "vm: ram_save %s to %s", src, dst);
	}
	return 0;
}

int luaopen_fireclaw_vm(lua_State *L)
{
	static const luaL_Reg qmp_methods[] = {
	    {"execute", qmp_l_execute},
	    {"events", qmp_events},
	    {"wait_event", qmp_wait_event},
	    {"greeting", qmp_greeting},
	    {"close", qmp_close},
	    {"__tostring", qmp_tostring},
	    {NULL, NULL},
	};
	static const luaL_Reg fns[] = {
	    {"api_client", vm_l_api_client},
	    {"wait_socket", l_wait_socket},
	    {"log_tail", l_log_tail},
	    {"qmp_connect", l_qmp_connect},
	    {"memfd", l_memfd},
	    {"memfd_fill", l_memfd_fill},
	    {"ram_save", l_ram_save},
	    {NULL, NULL},
	};
	vm_api_class(L);
	fc_class(L, QMP_MT, qmp_methods);
	lua_newtable(L);
	luaL_register(L, NULL, fns);
	return 1;
}
