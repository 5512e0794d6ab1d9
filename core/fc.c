/* fc.c - the helper layer: errors, userdata classes, options, time, interrupts, netns. */
#include "fc.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <time.h>
#include <termios.h>
#include <unistd.h>

/* ---- errors ---- */

int fc_error(lua_State *L, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	lua_pushvfstring(L, fmt, ap);
	va_end(ap);
	lua_error(L);
	__builtin_unreachable();
}

int fc_errno_error(lua_State *L, int err, const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	lua_pushfstring(L, "%s: %s", msg, strerror(err));
	lua_error(L);
	__builtin_unreachable();
}

/* ---- userdata classes ---- */

static int default_tostring(lua_State *L)
{
	lua_getmetatable(L, 1);
	lua_getfield(L, -1, "__name");
	lua_pushfstring(L, "%s: %p", lua_tostring(L, -1), lua_topointer(L, 1));
	return 1;
}

void fc_class(lua_State *L, const char *tname, const luaL_Reg *methods)
{
	luaL_newmetatable(L, tname);
	lua_pushstring(L, tname);
	lua_setfield(L, -2, "__name");
	lua_pushcfunction(L, default_tostring);
	lua_setfield(L, -2, "__tostring");
	lua_newtable(L); /* __index */
	for (const luaL_Reg *r = methods; r->name; r++) {
		lua_pushcfunction(L, r->func);
		if (r->name[0] == '_' && r->name[1] == '_') {
			lua_setfield(L, -3, r->name);
		} else {
			if (strcmp(r->name, "close") == 0) {
				lua_pushvalue(L, -1);
				lua_setfield(L, -4, "__gc");
			}
			lua_setfield(L, -2, r->name);
		}
	}
	lua_setfield(L, -2, "__index");
	lua_pop(L, 1);
}

void *fc_new(lua_State *L, size_t size, const char *tname)
{
	void *p = lua_newuserdata(L, size);
	memset(p, 0, size);
	luaL_getmetatable(L, tname);
	lua_setmetatable(L, -2);
	return p;
}

void *fc_check(lua_State *L, int idx, const char *tname)
{
	return luaL_checkudata(L, idx, tname);
}

#define FDGUARD_MT "fireclaw.fdguard"

static int fdguard_gc(lua_State *L)
{
	int *fd = luaL_checkudata(L, 1, FDGUARD_MT);
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
	return 0;
}

int *fc_fd_guard(lua_State *L, int fd)
{
	int *g = lua_newuserdata(L, sizeof *g);
	*g = fd;
	if (luaL_newmetatable(L, FDGUARD_MT)) {
		lua_pushcfunction(L, fdguard_gc);
		lua_setfield(L, -2, "__gc");
	}
	lua_setmetatable(L, -2);
	return g;
}

int fc_fd_release(int *guard)
{
	int fd = *guard;
	*guard = -1;
	return fd;
}

/* ---- options ---- */

void fc_opt_check(lua_State *L, int t, const char *where, const char *const known[])
{
	if (lua_isnoneornil(L, t))
		return;
	t = t < 0 && t > LUA_REGISTRYINDEX ? lua_gettop(L) + t + 1 : t;
	/* one implementation of the check and its "did you mean": fireclaw.opts */
	lua_getglobal(L, "require");
	lua_pushliteral(L, "fireclaw.opts");
	lua_call(L, 1, 1);
	lua_getfield(L, -1, "check");
	lua_pushstring(L, where);
	lua_pushvalue(L, t);
	lua_newtable(L);
	for (int i = 0; known[i]; i++) {
		lua_pushstring(L, known[i]);
		lua_rawseti(L, -2, i + 1);
	}
	lua_call(L, 3, 0);
	lua_pop(L, 1);
}

/* Registry key of a weak-keyed table: {owner table = {string = true, …}} (fc_keep_string). */
#define ANCHORS_KEY "fireclaw.anchors"

const char *fc_keep_string(lua_State *L, int owner, size_t *len)
{
	int t = lua_type(L, -1);
	if (t != LUA_TSTRING && t != LUA_TNUMBER)
		return NULL;
	if (owner < 0 && owner > LUA_REGISTRYINDEX)
		owner = lua_gettop(L) + owner + 1;
	/* a copy, so that a number is converted in a slot of our own (lua_next callers) */
	lua_pushvalue(L, -1);
	const char *s = lua_tolstring(L, -1, len);
	lua_getfield(L, LUA_REGISTRYINDEX, ANCHORS_KEY);
	if (lua_isnil(L, -1)) {
		lua_pop(L, 1);
		lua_newtable(L);
		lua_createtable(L, 0, 1);
		lua_pushliteral(L, "k");
		lua_setfield(L, -2, "__mode");
		lua_setmetatable(L, -2);
		lua_pushvalue(L, -1);
		lua_setfield(L, LUA_REGISTRYINDEX, ANCHORS_KEY);
	}
	lua_pushvalue(L, owner);
	lua_rawget(L, -2);
	if (lua_isnil(L, -1)) {
		lua_pop(L, 1);
		lua_newtable(L);
		lua_pushvalue(L, owner);
		lua_pushvalue(L, -2);
		lua_rawset(L, -4);
	}
	lua_pushvalue(L, -3);
	lua_pushboolean(L, 1);
	lua_rawset(L, -3);
	lua_pop(L, 4); /* set, anchors, copy, the value */
	return s;
}

const char *fc_opt_lstring(lua_State *L, int t, const char *key, const char *def, size_t *len)
{
	if (len)
		*len = def ? strlen(def) : 0;
	if (lua_isnoneornil(L, t))
		return def;
	if (t < 0 && t > LUA_REGISTRYINDEX)
		t = lua_gettop(L) + t + 1;
	lua_getfield(L, t, key);
	if (lua_isnil(L, -1)) {
		lua_pop(L, 1);
		return def;
	}
	/* strings only: a number would be converted in our stack slot and freed with it */
	if (lua_type(L, -1) != LUA_TSTRING)
		fc_error(L, "option '%s': string expected, got %s", key, luaL_typename(L, -1));
	/* kept alive with the table even if __index made it up */
	return fc_keep_string(L, t, len);
}

const char *fc_opt_string(lua_State *L, int t, const char *key, const char *def)
{
	return fc_opt_lstring(L, t, key, def, NULL);
}

double fc_opt_number(lua_State *L, int t, const char *key, double def)
{
	if (lua_isnoneornil(L, t))
		return def;
	lua_getfield(L, t, key);
	double v = def;
	if (!lua_isnil(L, -1)) {
		if (!lua_isnumber(L, -1))
			fc_error(L, "option '%s': number expected, got %s", key,
				 luaL_typename(L, -1));
		v = lua_tonumber(L, -1);
	}
	lua_pop(L, 1);
	return v;
}

int fc_opt_bool(lua_State *L, int t, const char *key, int def)
{
	if (lua_isnoneornil(L, t))
		return def;
	lua_getfield(L, t, key);
	int v = lua_isnil(L, -1) ? def : lua_toboolean(L, -1);
	lua_pop(L, 1);
	return v;
}

/* ---- growable byte buffer ---- */

int fc_buf_reserve(struct fc_buf *b, size_t n)
{
	if (n >= SIZE_MAX / 2 - b->len || (b->max && b->len + n > b->max))
		return -1;
	if (b->len + n + 1 <= b->cap)
		return 0;
	size_t cap = b->cap ? b->cap * 2 : 4096;
	while (cap < b->len + n + 1)
		cap *= 2;
	if (b->max && cap > b->max + 1)
		cap = b->max + 1;
	char *d = realloc(b->data, cap);
	if (!d)
		return -1;
	b->data = d;
	b->cap = cap;
	return 0;
}

int fc_buf_append(struct fc_buf *b, const char *s, size_t n)
{
	if (fc_buf_reserve(b, n) < 0)
		return -1;
	memcpy(b->data + b->len, s, n);
	b->len += n;
	b->data[b->len] = '\0';
	return 0;
}

void fc_buf_free(struct fc_buf *b)
{
	free(b->data);
	b->data = NULL;
	b->len = b->cap = 0;
}

/* ---- strings ---- */

static int cmp_strings(const void *a, const void *b)
{
	return strcmp(*(const char *const *)a, *(const char *const *)b);
}

void fc_sort_strings(const char **v, size_t n)
{
	qsort(v, n, sizeof *v, cmp_strings);
}

/* ---- time ---- */

double fc_now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

int fc_ms_left(double deadline)
{
	if (deadline < 0)
		return -1;
	double left = deadline - fc_now_ms();
	if (left <= 0)
		return 0;
	if (left > INT_MAX)
		return INT_MAX;
	return (int)(left + 0.999);
}

/* ---- interrupts ----
 *
 * A signal handler has no context argument, so this is the one piece of process-wide
 * mutable state outside the Lua state: the state the handler may touch. The handler
 * records the signal, writes a byte to a self-pipe (so fc_poll wakes up) and sets a Lua
 * hook (so pure Lua code is interrupted at the next instruction), as luajit.c does.
 * A second signal while the first is being handled restores the default action and
 * re-raises it: a second Ctrl-C always gets out. Before that it says, with write(2) (all a
 * handler may use), what is left behind: the note Lua keeps current (fc_signals_note) is
 * in one of two buffers; the setter fills the other one and then switches `note`, so the
 * handler never reads a half-written note.
 */
#define NOTE_MAX 1024
static struct {
	lua_State *L;
	int pipe[2];
	volatile sig_atomic_t signo;
	volatile sig_atomic_t pending;
	volatile sig_atomic_t note; /* index of the current note in notes, -1 for none */
	char notes[2][NOTE_MAX];
} sig = {NULL, {-1, -1}, 0, 0, -1, {{0}, {0}}};

/* A terminal in raw mode (an interactive exec), restored by a second signal's exit too:
 * tcsetattr is async-signal-safe. */
static struct {
	volatile sig_atomic_t fd; /* -1: none */
	struct termios saved;
} tty_guard = {-1, {0}};

static void tty_guard_set(int fd, const struct termios *saved)
{
	tty_guard.fd = -1;
	tty_guard.saved = *saved;
	tty_guard.fd = fd;
}

/* ---- the local terminal of an interactive exec (see fc.h) ---- */

static int winch_pipe[2] = {-1, -1};

static void on_winch(int signo)
{
	(void)signo;
	int saved = errno;
	if (write(winch_pipe[1], "w", 1) < 0) {
		/* non-blocking, one byte is enough: a full pipe is fine */
	}
	errno = saved;
}

int fc_rawtty_winch_fd(void)
{
	return winch_pipe[0];
}

void fc_rawtty_winch_drain(void)
{
	char buf[64];
	while (winch_pipe[0] >= 0 && read(winch_pipe[0], buf, sizeof buf) > 0)
		;
}

void fc_rawtty_start(lua_State *L, struct fc_rawtty *t, int fd, const char *who)
{
	t->fd = fd;
	if (tcgetattr(fd, &t->saved) < 0)
		fc_errno_error(L, errno, "%s: tty %d is not a terminal", who, fd);
	struct termios raw = t->saved;
	cfmakeraw(&raw);
	if (tcsetattr(fd, TCSANOW, &raw) < 0)
		fc_errno_error(L, errno, "%s: cannot make tty %d raw", who, fd);
	t->raw = 1;
	tty_guard_set(fd, &t->saved);
	if (winch_pipe[0] < 0 && pipe2(winch_pipe, O_CLOEXEC | O_NONBLOCK) < 0)
		fc_errno_error(L, errno, "%s: pipe", who);
	fc_rawtty_winch_drain();
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_winch;
	sa.sa_flags = SA_RESTART;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGWINCH, &sa, &t->old_winch) == 0)
		t->winch = 1;
}

void fc_rawtty_end(struct fc_rawtty *t)
{
	if (t->winch)
		sigaction(SIGWINCH, &t->old_winch, NULL);
	t->winch = 0;
	if (t->raw) {
		tty_guard.fd = -1;
		tcsetattr(t->fd, TCSAFLUSH, &t->saved);
	}
	t->raw = 0;
}

void fc_signals_note(const char *text)
{
	if (!text || !*text) {
		sig.note = -1;
		return;
	}
	int next = sig.note == 0 ? 1 : 0;
	snprintf(sig.notes[next], NOTE_MAX, "%s", text);
	sig.note = next;
}

static void say(const char *s)
{
	if (write(STDERR_FILENO, s, strlen(s)) < 0) {
		/* nothing to do: we are about to die anyway */
	}
}

/* The last words on a second signal (async-signal-safe). */
static void say_leaving(void)
{
	int n = sig.note;
	say("\nfireclaw: interrupted again: exiting at once");
	if (n >= 0) {
		say(", leaving ");
		say(sig.notes[n]);
		say(" behind (its VMM dies with fireclaw); 'fireclaw cleanup' removes it");
	}
	say("\n");
}

static void drain_pipe(void)
{
	char buf[64];
	while (read(sig.pipe[0], buf, sizeof buf) > 0)
		;
}

static void interrupt_error(lua_State *L)
{
	lua_sethook(L, NULL, 0, 0);
	drain_pipe();
	sig.pending = 0;
	fc_error(L, "interrupted by %s", sig.signo == SIGTERM ? "SIGTERM" : "SIGINT");
}

static void interrupt_hook(lua_State *L, lua_Debug *ar)
{
	(void)ar;
	if (sig.pending)
		interrupt_error(L);
	lua_sethook(L, NULL, 0, 0);
}

static void on_signal(int signo)
{
	if (sig.signo != 0) {
		if (tty_guard.fd >= 0)
			tcsetattr(tty_guard.fd, TCSANOW, &tty_guard.saved);
		say_leaving();
		signal(signo, SIG_DFL);
		raise(signo);
		return;
	}
	int saved = errno;
	sig.signo = signo;
	sig.pending = 1;
	if (write(sig.pipe[1], "!", 1) < 0) {
		/* the pipe is non-blocking and only needs one byte: a full pipe is fine */
	}
	lua_sethook(sig.L, interrupt_hook, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
	errno = saved;
}

void fc_signals_init(lua_State *L)
{
	sig.L = L;
	if (pipe2(sig.pipe, O_CLOEXEC | O_NONBLOCK) < 0)
		return;
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_signal;
	sa.sa_flags = SA_RESTART;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	/* a closed pipe or socket is an error to report, not a reason to die */
	signal(SIGPIPE, SIG_IGN);
}

int fc_signal_received(void)
{
	return sig.signo;
}

void fc_signals_reset(void)
{
	if (sig.pipe[0] >= 0)
		drain_pipe();
	sig.pending = 0;
	sig.signo = 0;
}

void fc_check_interrupt(lua_State *L)
{
	if (sig.pending)
		interrupt_error(L);
}

/* A pending SIGINT taken instead of raised (fc_poll_sigint); 1 if there was one. */
static int take_sigint(int take)
{
	if (!take || !sig.pending || sig.signo != SIGINT)
		return 0;
	lua_sethook(sig.L, NULL, 0, 0);
	drain_pipe();
	sig.pending = 0;
	return 1;
}

int fc_poll(lua_State *L, struct pollfd *fds, nfds_t n, int timeout_ms)
{
	return fc_poll_sigint(L, fds, n, timeout_ms, 0);
}

int fc_poll_sigint(lua_State *L, struct pollfd *fds, nfds_t n, int timeout_ms, int take)
{
	struct pollfd all[n + 1];
	for (nfds_t i = 0; i < n; i++)
		all[i] = fds[i];
	all[n] = (struct pollfd){.fd = sig.pipe[0], .events = POLLIN};
	double deadline = timeout_ms < 0 ? -1 : fc_now_ms() + timeout_ms;
	for (;;) {
		if (take_sigint(take))
			return -2;
		fc_check_interrupt(L);
		int r = poll(all, n + 1, fc_ms_left(deadline));
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			fc_errno_error(L, errno, "poll");
		if (all[n].revents && take_sigint(take))
			return -2;
		if (all[n].revents)
			fc_check_interrupt(L);
		for (nfds_t i = 0; i < n; i++)
			fds[i].revents = all[i].revents;
		return all[n].revents ? r - 1 : r;
	}
}

/* ---- namespaces ---- */

int fc_netns_open(const char *name)
{
	char path[256];
	if (strchr(name, '/') || snprintf(path, sizeof path, "/run/netns/%s", name) >=
					 (int)sizeof path) {
		errno = EINVAL;
		return -1;
	}
	return open(path, O_RDONLY | O_CLOEXEC);
}

int fc_netns_run(int nsfd, int (*fn)(void *), void *arg)
{
	int self = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
	if (self < 0)
		return -errno;
	int r = nsfd == FC_NETNS_NEW ? unshare(CLONE_NEWNET) : setns(nsfd, CLONE_NEWNET);
	if (r < 0) {
		r = -errno;
		close(self);
		return r;
	}
	r = fn(arg);
	int e = errno; /* fn's errno, for callers that report it */
	if (setns(self, CLONE_NEWNET) < 0) {
		char msg[160];
		snprintf(
		    msg, sizeof msg,
		    "fireclaw: cannot return to the original network namespace (%s); stopping\n",
		    strerror(errno));
		say(msg);
		abort();
	}
	close(self);
	errno = e;
	return r;
}

struct socket_req {
	int domain, type, protocol;
};

static int socket_here(void *arg)
{
	const struct socket_req *q = arg;
	int fd = socket(q->domain, q->type | SOCK_CLOEXEC, q->protocol);
	return fd < 0 ? -errno : fd;
}

int fc_socket_in_netns(const char *netns, int domain, int type, int protocol)
{
	struct socket_req q = {domain, type, protocol};
	if (!netns || !*netns)
		return socket(domain, type | SOCK_CLOEXEC, protocol);
	int target = fc_netns_open(netns);
	if (target < 0)
		return -1;
	int fd = fc_netns_run(target, socket_here, &q);
	close(target);
	if (fd < 0) {
		errno = -fd;
		return -1;
	}
	return fd;
}

int fc_tcp_connect(lua_State *L, const char *netns, const char *host, int port, int timeout_ms,
		   char *err, size_t errlen)
{
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
		snprintf(err, errlen, "bad IPv4 address '%s'", host);
		return -1;
	}
	int fd = fc_socket_in_netns(netns, AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
	if (fd < 0) {
		snprintf(err, errlen, "socket in namespace %s: %s", netns && *netns ? netns : "(host)",
			 strerror(errno));
		return -1;
	}
	int one = 1;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	int rc = connect(fd, (struct sockaddr *)&sa, sizeof sa);
	if (rc < 0 && errno == EINPROGRESS) {
		struct pollfd p = {.fd = fd, .events = POLLOUT};
		/* the guard closes the socket if the wait is interrupted */
		int *guard = fc_fd_guard(L, fd);
		int n = fc_poll(L, &p, 1, timeout_ms);
		fc_fd_release(guard);
		lua_pop(L, 1);
		if (n == 0) {
			close(fd);
			snprintf(err, errlen, "timed out");
			errno = ETIMEDOUT;
			return -1;
		}
		socklen_t len = sizeof rc;
		getsockopt(fd, SOL_SOCKET, SO_ERROR, &rc, &len);
		if (rc != 0) {
			errno = rc;
			rc = -1;
		}
	}
	if (rc < 0) {
		int e = errno;
		close(fd);
		snprintf(err, errlen, "%s", e == ECONNREFUSED ? "connection refused" : strerror(e));
		errno = e;
		return -1;
	}
	int flags = fcntl(fd, F_GETFL);
	fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
	return fd;
}

const char *fc_dl_load(void **handle, const char *soname, const char *pkg,
		       const struct fc_dlsym *syms)
{
	static char err[300];
	if (*handle)
		return NULL;
	void *h = dlopen(soname, RTLD_NOW | RTLD_LOCAL);
	if (!h) {
		snprintf(err, sizeof err, "cannot load %s (%s): install %s", soname, dlerror(), pkg);
		return err;
	}
	for (const struct fc_dlsym *s = syms; s->name; s++) {
		*s->slot = dlsym(h, s->name);
		if (!*s->slot) {
			snprintf(err, sizeof err, "%s has no %s", soname, s->name);
			dlclose(h);
			return err;
		}
	}
	*handle = h;
	return NULL;
}
