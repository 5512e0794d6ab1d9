/* agent.c - fireclaw.core.agent: the host side of the guest agent's channel (the protocol:
 * guest/agent-proto.h, docs/agent-protocol.md).
 *
 *   agent.attach{dir=, ports=N, timeout=, wait=, retry=, hello=, watch_fd=, watch_msg=,
 *                where=} -> conn
 *       QEMU: take the first free port of a VM (dir/agent-K.lock, flock(2)) and connect to
 *       its socket dir/agent-K.sock; any process may attach (a kept VM's, from its record);
 *       all ports taken: waits up to opts.wait s (default: timeout) for one, then raises
 *       "... all N agent ports are busy ..."; hello = false: connected only, then
 *   conn:hello{timeout=, retry=} -> conn     the hello of such a connection
 *   agent.connect(path, opts) -> conn        a unix socket that is the byte stream
 *   agent.wrap(fd, opts) -> conn             a connected byte stream (a dup is kept):
 *                                            Firecracker's vsock, a socketpair
 *       every one says hello and waits (opts.timeout s, default 10) for the agent's answer
 *   conn:info() -> {version =, pid =, where =, broken =, reconnects =}
 *   conn:handoff(ns, entropy [, timeout])    restore hand-off: clock + entropy, acked
 *   conn:exec(argv, opts) -> {status=, signal=, stdout=, stderr=, timed_out=, duration_ms=,
 *                             stdout_truncated=, stderr_truncated=, interrupted=}
 *       opts: stdin (string or fd), on_stdout/on_stderr (fn(data)), capture, max_capture,
 *             env ({K = v}), cwd, uid, gid, timeout (s), pty (true or {rows =, cols =}),
 *             forward_sigint (the first Ctrl-C goes to the command; see fc_poll_sigint),
 *             tty (with pty, conn:exec only: a local terminal fd, raw for the exec and
 *             restored on every way out, its size sent as RESIZE now and on SIGWINCH)
 *   conn:mkdir(path [, mode]) -> path                    (an existing directory is fine)
 *   conn:list(path) -> {{name =, kind = "file"|"directory"|"link"|"other", mode =, size =}…}
 *   conn:put(local, remote [, opts]) -> remote path      opts: mode, max_bytes, stall
 *   conn:get(remote, local [, opts]) -> local path       opts: mode, max_bytes, stall, uid, gid
 *   conn:batch{ {exec = argv, <exec opts>}, {put = {local, remote}, ...}, {get = {remote,
 *               local}, ...} } -> results in order: all of them at once on this connection
 *   conn:close()                                         (idempotent, __gc)
 *
 * Every wait is fc_poll (Ctrl-C interrupts it) and also watches watch_fd (the VMM's pidfd):
 * a VMM that died fails the wait with watch_msg at once. An agent that stops answering is
 * pinged; one that says nothing for AGENT_DEAD_MS fails the wait. Everything the guest
 * sends is capped (frame size, count of stray frames, the window) and checked; a broken
 * frame marks the connection broken with one line, and the connection is not used again.
 */
#include "fc_agent.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define DEFAULT_TIMEOUT_S 10.0
#define MAX_PORTS 16
#define LOCK_RETRY_MS 20

void agent_fail(lua_State *L, struct agent_conn *c, int broken, const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	if (broken && c && !c->broken) {
		c->broken = 1;
		snprintf(c->broken_msg, sizeof c->broken_msg, "%.250s", msg);
	}
	/* a broken connection is not used again: its port goes back to the other processes
	 * now, not when the garbage collector gets to it (a failed attach included) */
	if (broken && c && c->lock_fd >= 0) {
		close(c->lock_fd);
		c->lock_fd = -1;
	}
	if (!c)
		fc_error(L, "agent: %s", msg);
	fc_error(L, "agent: %s: %s", c->where, msg);
}

void agent_queue(lua_State *L, struct agent_conn *c, uint32_t stream, uint8_t type, const void *a,
		 size_t alen, const void *b, size_t blen)
{
	unsigned char h[AGP_HDR];
	agp_hdr_encode(h, (uint32_t)(alen + blen), stream, type);
	if (fc_buf_reserve(&c->out, AGP_HDR + alen + blen) != 0)
		fc_error(L, "agent: out of memory");
	fc_buf_append(&c->out, (const char *)h, AGP_HDR);
	if (alen)
		fc_buf_append(&c->out, a, alen);
	if (blen)
		fc_buf_append(&c->out, b, blen);
}

int agent_flush(struct agent_conn *c)
{
	while (c->out.len > 0) {
		ssize_t w = send(c->fd, c->out.data, c->out.len, MSG_DONTWAIT | MSG_NOSIGNAL);
		if (w < 0 && errno == ENOTSOCK)
			w = write(c->fd, c->out.data, c->out.len);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0 && errno == EAGAIN)
			return 0;
		if (w <= 0)
			return -1;
		memmove(c->out.data, c->out.data + w, c->out.len - (size_t)w);
		c->out.len -= (size_t)w;
	}
	return 0;
}

void agent_read(lua_State *L, struct agent_conn *c)
{
	size_t room = AGP_HDR + AGP_MAX_PAYLOAD - c->inlen;
	if (room == 0)
		return;
	ssize_t r = read(c->fd, c->in + c->inlen, room);
	if (r < 0 && (errno == EINTR || errno == EAGAIN))
		return;
	if (r < 0)
		agent_fail(L, c, 1, "reading the channel: %s", strerror(errno));
	if (r == 0)
		agent_fail(L, c, 1, "the channel closed (the VM or its agent is gone)");
	c->inlen += (size_t)r;
}

int agent_next_frame(lua_State *L, struct agent_conn *c, struct agent_frame *f, size_t *consumed)
{
	size_t have = c->inlen - *consumed;
	if (have < AGP_HDR)
		return 0;
	unsigned char *p = c->in + *consumed;
	if (agp_hdr_decode(p, &f->h) != 0)
		agent_fail(L, c, 1, "the guest sent a malformed frame (length %u, flags %u)",
			   agp_u32(p), p[9]);
	if (have < AGP_HDR + f->h.len)
		return 0;
	f->p = p + AGP_HDR;
	*consumed += AGP_HDR + f->h.len;
	return 1;
}

/* ---- connection setup ---- */

struct agent_conn *agent_check(lua_State *L, int idx)
{
	struct agent_conn *c = fc_check(L, idx, AGENT_MT);
	if (c->fd < 0)
		fc_error(L, "agent: connection is closed");
	if (c->broken)
		fc_error(L, "agent: %s: the connection is unusable after: %s", c->where,
			 c->broken_msg);
	if (c->busy)
		fc_error(L, "agent: %s: the connection is busy (called from one of its callbacks)",
			 c->where);
	return c;
}

static void conn_free(struct agent_conn *c)
{
	if (c->fd >= 0)
		close(c->fd);
	if (c->lock_fd >= 0)
		close(c->lock_fd); /* and with it the port's lock */
	if (c->watch_fd >= 0)
		close(c->watch_fd);
	c->fd = c->lock_fd = c->watch_fd = -1;
	free(c->in);
	c->in = NULL;
	fc_buf_free(&c->out);
}

static int l_close(lua_State *L)
{
	conn_free(fc_check(L, 1, AGENT_MT));
	return 0;
}

/* A new connection object on fd (owned from now on), options from the table at t. */
static struct agent_conn *conn_new(lua_State *L, int fd, int t, const char *where)
{
	struct agent_conn *c = fc_new(L, sizeof *c, AGENT_MT);
	c->fd = fd;
	c->lock_fd = c->watch_fd = -1;
	c->next_id = 1;
	snprintf(c->where, sizeof c->where, "%s", fc_opt_string(L, t, "where", where));
	c->in = malloc(AGP_HDR + AGP_MAX_PAYLOAD);
	if (!c->in)
		fc_error(L, "agent: out of memory");
	int flags = fcntl(fd, F_GETFL);
	fcntl(fd, F_SETFL, flags | O_NONBLOCK);
	double w = fc_opt_number(L, t, "watch_fd", -1);
	if (w >= 0) {
		c->watch_fd = fcntl((int)w, F_DUPFD_CLOEXEC, 3);
		if (c->watch_fd < 0)
			fc_errno_error(L, errno, "agent: watch_fd");
	}
	snprintf(c->watch_msg, sizeof c->watch_msg, "%s",
		 fc_opt_string(L, t, "watch_msg", "the VM is gone"));
	return c;
}

/* Wait (interruptibly) for the channel to be readable, or writable while output is
 * queued; raises at the deadline (with `what`) and when the VMM is gone. */
static int wait_channel(lua_State *L, struct agent_conn *c, double deadline, const char *what)
{
	struct pollfd p[2] = {{.fd = c->fd, .events = POLLIN},
			      {.fd = c->watch_fd, .events = POLLIN}};
	if (c->out.len)
		p[0].events |= POLLOUT;
	int n = fc_poll(L, p, c->watch_fd >= 0 ? 2 : 1, fc_ms_left(deadline));
	if (n == 0 && !what)
		return 0;
	if (n == 0)
		agent_fail(L, c, 1, "%s", what);
	if (c->watch_fd >= 0 && p[1].revents && !(p[0].revents & POLLIN))
		agent_fail(L, c, 1, "%s", c->watch_msg);
	if (p[0].revents & POLLOUT && agent_flush(c) < 0)
		agent_fail(L, c, 1, "writing the channel: %s", strerror(errno));
	if (p[0].revents & (POLLIN | POLLHUP | POLLERR))
		agent_read(L, c);
	return 1;
}

/* Hello: frames before the answer are a previous connection's leftovers, skipped.
 * Returns 1 when answered; 0 when `soft` and nothing came by the deadline; raises
 * otherwise. */
static int hello(lua_State *L, struct agent_conn *c, double timeout_s, int soft, double total_s)
{
	unsigned char b[4];
	agp_put32(b, AGP_VERSION);
	agent_queue(L, c, 0, AGP_T_HELLO, b, 4, NULL, 0);
	double deadline = fc_now_ms() + timeout_s * 1e3;
	size_t skipped = 0;
	char what[128];
	snprintf(what, sizeof what, "the guest agent did not answer within %g s", total_s);
	for (;;) {
		if (agent_flush(c) < 0)
			agent_fail(L, c, 1, "writing the channel: %s", strerror(errno));
		if (!wait_channel(L, c, deadline, soft ? NULL : what))
			return 0;
		size_t used = 0;
		struct agent_frame f;
		while (agent_next_frame(L, c, &f, &used)) {
			if (f.h.type == AGP_T_HELLO && f.h.stream == 0 && f.h.len >= 8) {
				c->version = (int)agp_u32(f.p);
				c->agent_pid = (int)agp_u32(f.p + 4);
				memmove(c->in, c->in + used, c->inlen - used);
				c->inlen -= used;
				if (c->version != AGP_VERSION)
					agent_fail(
					    L, c, 1,
					    "the guest agent speaks version %d, fireclaw %d "
					    "(rebuild the image: fireclaw image build --force)",
					    c->version, AGP_VERSION);
				return 1;
			}
			skipped += AGP_HDR + f.h.len;
		}
		memmove(c->in, c->in + used, c->inlen - used);
		c->inlen -= used;
		if (skipped > AGENT_MAX_SKIP)
			agent_fail(L, c, 1, "the guest sent %zu bytes before answering hello",
				   skipped);
	}
}

static double opt_timeout(lua_State *L, int t)
{
	double v = fc_opt_number(L, t, "timeout", DEFAULT_TIMEOUT_S);
	if (!(v > 0 && v <= 1e6))
		fc_error(L, "agent: timeout must be seconds > 0");
	return v;
}

static const char *const OPEN_KNOWN[] = {"timeout", "watch_fd", "watch_msg", "where", "dir",
					 "ports",   "retry",	"wait",	     "hello", NULL};

static int l_wrap(lua_State *L)
{
	int fd = (int)luaL_checkinteger(L, 1);
	fc_opt_check(L, 2, "agent.wrap", OPEN_KNOWN);
	int own = fcntl(fd, F_DUPFD_CLOEXEC, 3);
	if (own < 0)
		fc_errno_error(L, errno, "agent.wrap: fd %d", fd);
	struct agent_conn *c = conn_new(L, own, 2, "channel");
	hello(L, c, opt_timeout(L, 2), 0, opt_timeout(L, 2));
	return 1;
}

static int unix_connect(const char *path)
{
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	if (strlen(path) >= sizeof a.sun_path) {
		errno = ENAMETOOLONG;
		return -1;
	}
	strcpy(a.sun_path, path);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
		int e = errno;
		close(fd);
		errno = e;
		return -1;
	}
	return fd;
}

static int l_connect(lua_State *L)
{
	const char *path = luaL_checkstring(L, 1);
	fc_opt_check(L, 2, "agent.connect", OPEN_KNOWN);
	int fd = unix_connect(path);
	if (fd < 0)
		fc_errno_error(L, errno, "agent: connect %s", path);
	struct agent_conn *c = conn_new(L, fd, 2, path);
	hello(L, c, opt_timeout(L, 2), 0, opt_timeout(L, 2));
	return 1;
}

/* The first port of dir whose lock is free: its locked fd, port number in *port; -1 when
 * all are taken. */
static int take_port(lua_State *L, const char *dir, int ports, int *port)
{
	for (int k = 0; k < ports; k++) {
		char path[PATH_MAX];
		snprintf(path, sizeof path, "%s/agent-%d.lock", dir, k);
		int fd = open(path, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
		if (fd < 0)
			fc_errno_error(L, errno, "agent: %s", path);
		if (flock(fd, LOCK_EX | LOCK_NB) == 0) {
			*port = k;
			return fd;
		}
		int e = errno;
		close(fd);
		if (e != EWOULDBLOCK)
			fc_errno_error(L, e, "agent: flock %s", path);
	}
	return -1;
}

/* Hello, then wait for the answer up to timeout s. A hello not answered within `retry` s
 * is sent again on a new connection to c->path (the wait doubling each time): a restored
 * QEMU may accept a connection made after the VM runs again while the port cannot take
 * input yet and then never read from it (docs/guest-notes.md, "The agent's virtio-serial
 * ports"); the agent answers a new hello at any time. */
static void hello_retry(lua_State *L, struct agent_conn *c, double deadline, double timeout,
			double retry)
{
	if (!(retry > 0))
		fc_error(L, "agent.attach: retry must be seconds > 0");
	for (double try_s = retry;; try_s *= 2) {
		double left = fc_ms_left(deadline) / 1e3 + 0.001;
		int soft = left > try_s && c->path[0];
		if (hello(L, c, soft ? try_s : left, soft, timeout))
			return;
		c->reconnects++;
		close(c->fd);
		c->fd = unix_connect(c->path);
		if (c->fd < 0)
			agent_fail(L, c, 1, "connect %s: %s", c->path, strerror(errno));
		fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK);
		c->inlen = c->out.len = 0;
	}
}

static int l_attach(lua_State *L)
{
	luaL_checktype(L, 1, LUA_TTABLE);
	fc_opt_check(L, 1, "agent.attach", OPEN_KNOWN);
	const char *dir = fc_opt_string(L, 1, "dir", NULL);
	if (!dir)
		fc_error(L, "agent.attach: dir (the VM's run directory) is required");
	int ports = (int)fc_opt_number(L, 1, "ports", 1);
	if (ports < 1 || ports > MAX_PORTS)
		fc_error(L, "agent.attach: ports must be 1 to %d", MAX_PORTS);
	double timeout = opt_timeout(L, 1);
	double deadline = fc_now_ms() + timeout * 1e3;
	/* opts.wait: how long to wait for a free port (default: timeout); a caller with
	 * another way in (SSH) waits less and takes it rather than queue */
	double wait = fc_opt_number(L, 1, "wait", timeout);
	if (!(wait >= 0 && wait <= timeout))
		fc_error(L, "agent.attach: wait must be seconds from 0 to timeout");
	double port_deadline = fc_now_ms() + wait * 1e3;
	int port = -1, lock;
	while ((lock = take_port(L, dir, ports, &port)) < 0) {
		if (fc_ms_left(port_deadline) == 0)
			fc_error(L,
				 "agent: %s: all %d agent ports are busy (other fireclaw processes "
				 "use them) after %g s",
				 fc_opt_string(L, 1, "where", dir), ports, wait);
		fc_poll(L, NULL, 0, LOCK_RETRY_MS);
	}
	int *guard = fc_fd_guard(L, lock);
	char path[sizeof((struct agent_conn *)0)->path];
	snprintf(path, sizeof path, "%s/agent-%d.sock", dir, port);
	int fd = unix_connect(path);
	if (fd < 0)
		fc_errno_error(L, errno, "agent: connect %s", path);
	char where[200];
	snprintf(where, sizeof where, "%s (agent port %d)", fc_opt_string(L, 1, "where", dir),
		 port);
	struct agent_conn *c = conn_new(L, fd, 1, where);
	snprintf(c->where, sizeof c->where, "%s", where);
	snprintf(c->path, sizeof c->path, "%s", path);
	c->lock_fd = fc_fd_release(guard);
	if (fc_opt_bool(L, 1, "hello", 1))
		hello_retry(L, c, deadline, timeout, fc_opt_number(L, 1, "retry", timeout));
	return 1;
}

/* conn:hello{timeout =, retry =}: the hello of a connection made with attach{hello =
 * false} (a restore connects before its VM runs: see the QEMU driver). */
static int l_hello(lua_State *L)
{
	struct agent_conn *c = fc_check(L, 1, AGENT_MT);
	static const char *const known[] = {"timeout", "retry", NULL};
	fc_opt_check(L, 2, "conn:hello", known);
	if (c->broken)
		agent_fail(L, c, 0, "%s", c->broken_msg);
	double timeout = opt_timeout(L, 2);
	hello_retry(L, c, fc_now_ms() + timeout * 1e3, timeout,
		    fc_opt_number(L, 2, "retry", timeout));
	lua_settop(L, 1);
	return 1;
}

static int l_info(lua_State *L)
{
	struct agent_conn *c = fc_check(L, 1, AGENT_MT);
	lua_createtable(L, 0, 5);
	lua_pushinteger(L, c->version);
	lua_setfield(L, -2, "version");
	lua_pushinteger(L, c->agent_pid);
	lua_setfield(L, -2, "pid");
	lua_pushstring(L, c->where);
	lua_setfield(L, -2, "where");
	lua_pushboolean(L, c->broken);
	lua_setfield(L, -2, "broken");
	lua_pushinteger(L, c->reconnects);
	lua_setfield(L, -2, "reconnects");
	return 1;
}

static int l_fd(lua_State *L)
{
	struct agent_conn *c = fc_check(L, 1, AGENT_MT);
	lua_pushinteger(L, c->fd);
	return 1;
}

/* Wait for the RESULT on stream 0 that answers a frame of ours (what: "the hand-off").
 * A failure in the guest raises without breaking the connection. */
static void wait_result(lua_State *L, struct agent_conn *c, double deadline, const char *what)
{
	char timeout_msg[96];
	snprintf(timeout_msg, sizeof timeout_msg, "the guest agent did not acknowledge %s", what);
	unsigned long stray = 0;
	for (int first = 1;; first = 0) {
		if (agent_flush(c) < 0)
			agent_fail(L, c, 1, "writing the channel: %s", strerror(errno));
		if (!first) /* first: what is in the buffer already */
			wait_channel(L, c, deadline, timeout_msg);
		size_t used = 0;
		struct agent_frame f;
		while (agent_next_frame(L, c, &f, &used)) {
			if (f.h.stream == 0 && f.h.type == AGP_T_RESULT && f.h.len >= 4) {
				int err = (int)agp_u32(f.p);
				int len = (int)(f.h.len - 4 > 200 ? 200 : f.h.len - 4);
				char msg[256];
				snprintf(msg, sizeof msg, "%.*s", len, (const char *)f.p + 4);
				for (char *q = msg; *q; q++)
					if ((unsigned char)*q < 32 || (unsigned char)*q > 126)
						*q = '?';
				memmove(c->in, c->in + used, c->inlen - used);
				c->inlen -= used;
				if (err)
					agent_fail(L, c, 0, "%s failed in the guest: %s", what, msg);
				return;
			}
			if (f.h.stream == 0 && f.h.type == AGP_T_ERROR)
				agent_fail(L, c, 1, "the guest agent refused %s", what);
			if (++stray > AGENT_MAX_STRAY)
				agent_fail(L, c, 1, "the guest sent too many stray frames");
		}
		memmove(c->in, c->in + used, c->inlen - used);
		c->inlen -= used;
	}
}

/* conn:handoff(ns, entropy [, timeout [, resolver]]): set the guest clock to ns (0: leave
 * it), credit the entropy and reseed the CRNG; with resolver (an IPv4 address), also make
 * it the guest's /etc/resolv.conf, in the same write (the agent handles stream 0's frames
 * in order). Returns when the agent acked both. */
static int l_handoff(lua_State *L)
{
	struct agent_conn *c = agent_check(L, 1);
	double ns = luaL_checknumber(L, 2);
	size_t n, rn = 0;
	const char *ent = luaL_checklstring(L, 3, &n);
	double timeout = luaL_optnumber(L, 4, DEFAULT_TIMEOUT_S);
	const char *resolver = luaL_optlstring(L, 5, NULL, &rn);
	struct in_addr a;
	if (!(ns >= 0 && ns < 1.8e19))
		fc_error(L, "agent: handoff: ns must be nanoseconds since 1970");
	if (n < AGP_MIN_ENTROPY || n > AGP_MAX_ENTROPY)
		fc_error(L, "agent: handoff: %d to %d bytes of entropy", AGP_MIN_ENTROPY,
			 AGP_MAX_ENTROPY);
	if (resolver && (rn >= INET_ADDRSTRLEN || inet_pton(AF_INET, resolver, &a) != 1))
		fc_error(L, "agent: handoff: the resolver must be an IPv4 address");
	unsigned char b[8];
	agp_put64(b, (uint64_t)ns);
	agent_queue(L, c, 0, AGP_T_HANDOFF, b, 8, ent, n);
	if (resolver)
		agent_queue(L, c, 0, AGP_T_RESOLVER, resolver, rn, NULL, 0);
	double deadline = fc_now_ms() + timeout * 1e3;
	wait_result(L, c, deadline, "the restore hand-off");
	if (resolver)
		wait_result(L, c, deadline, "setting the resolver");
	return 0;
}

int luaopen_fireclaw_agent(lua_State *L)
{
	static const luaL_Reg methods[] = {
	    {"exec", agent_l_exec},   {"put", agent_l_put},   {"get", agent_l_get},
	    {"batch", agent_l_batch}, {"handoff", l_handoff}, {"info", l_info},
	    {"hello", l_hello},	      {"fd", l_fd},	      {"close", l_close},
	    {"mkdir", agent_l_mkdir}, {"list", agent_l_list}, {NULL, NULL},
	};
	static const luaL_Reg fns[] = {
	    {"attach", l_attach},
	    {"connect", l_connect},
	    {"wrap", l_wrap},
	    {NULL, NULL},
	};
	fc_class(L, AGENT_MT, methods);
	lua_newtable(L);
	luaL_register(L, NULL, fns);
	lua_pushinteger(L, AGP_VSOCK_PORT);
	lua_setfield(L, -2, "VSOCK_PORT");
	lua_pushstring(L, AGP_PORT_PREFIX);
	lua_setfield(L, -2, "PORT_PREFIX");
	lua_pushinteger(L, AGP_VERSION);
	lua_setfield(L, -2, "VERSION");
	return 1;
}
