/* ssh.c - fireclaw.ssh on libssh2: reach a guest's sshd, run commands, copy files.
 *
 *   ssh.connect{host=, port=22, netns=, user="root", key=PATH, host_key=LINE | host_key_file=PATH,
 *               insecure_ignore_host_key=false, timeout=10, watch_fd=, watch_msg=} -> session
 *   session:exec(argv | cmdline [, opts]) -> {status=, signal=, stdout=, stderr=, timed_out=,
 *                                            duration_ms=, stdout_truncated=, stderr_truncated=}
 *       opts: stdin (string or fd), on_stdout/on_stderr (fn(data)), capture, max_capture,
 *             env ({K = v}), timeout (s), pty
 *   session:put(local, remote [, mode]), session:get(remote, local)     (SFTP)
 *   session:close()                                                      (idempotent, __gc)
 *   ssh.quote(argv) -> string    (the POSIX shell quoting exec uses for an argv)
 *   ssh.check_source(path [, max_bytes]) -> size | nil, why   (could put send this file?)
 *
 * exec results: `signal` (e.g. "KILL") and no `status` when the server reports the command
 * died of a signal; on timeout `timed_out=true` and no status. A shell may also report a
 * killed child as status 128+N: what the server says is what is returned. Every command
 * runs with FIRECLAW_EXEC_TAG=<random> in its environment; that is how a timed-out or
 * interrupted command is killed (see kill_tagged in fc_ssh_exec.c).
 *
 * libssh2 runs in non-blocking mode and every wait is a poll() on the session's socket
 * through fc_poll, so Ctrl-C interrupts any operation and a deadline bounds it. A
 * libssh2 call that would block returns LIBSSH2_ERROR_EAGAIN and must be called again with
 * the same arguments once the socket is ready; the loops below do exactly that.
 *
 * watch_fd (e.g. the VMM's pidfd; the session keeps a duplicate) becoming readable means the
 * peer is gone for good: a VM whose VMM exited never closes its TCP connections, so without
 * it an exec would wait forever. Every wait of the session then fails at once with
 * watch_msg ("the VM is gone"), and the transport is cut so cleanup does not wait either.
 *
 * The module is three files sharing core/fc_ssh.h: this one (session, connect, host keys),
 * fc_ssh_exec.c (quoting and exec) and fc_sftp.c (put and get). libssh2 itself is loaded
 * by the first connect (core/fc_ssh2.c), so a process that only requires the module (every
 * run does, for ssh.quote) pays neither its loading nor OpenSSL's initialisation.
 *
 * An exec, put or get runs its body under lua_pcall: whatever raises inside (an interrupt,
 * a callback's error, a protocol error), the channel / SFTP handles are released afterwards
 * by a cleanup that neither raises nor waits longer than CLEANUP_MS, then the error goes on.
 */
#include "fc_ssh.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <libssh2.h>
#include <libssh2_sftp.h>

/* Connect: pause between probes grows from BACKOFF_MIN_MS to BACKOFF_MAX_MS, so a guest
 * that comes up is noticed within ~50 ms without hammering one that does not. A single TCP
 * attempt is abandoned after ATTEMPT_MIN_MS (doubling up to ATTEMPT_MAX_MS) because a SYN
 * sent before the guest's stack was up is only retransmitted after 1 s, then 3 s. The cap
 * stays well under that 1 s (a cold boot noticed its guest up to ~0.8 s late with 2 s),
 * and above what a loaded host's guest takes to answer a SYN. */
#define BACKOFF_MIN_MS 4
#define BACKOFF_MAX_MS 50
#define ATTEMPT_MIN_MS 100
#define ATTEMPT_MAX_MS 600
#define MAX_HOSTKEY 4096

/* ---- small helpers ---- */

const char *ssh_session_errmsg(struct session *S)
{
	char *msg = NULL;
	int len = 0;
	libssh2_session_last_error(S->s, &msg, &len, 0);
	return msg && *msg ? msg : "unknown error";
}

int ssh_is_eagain_ptr(struct session *S, const void *p)
{
	return p == NULL && libssh2_session_last_errno(S->s) == LIBSSH2_ERROR_EAGAIN;
}

/* poll() events for the session socket: the directions libssh2 is blocked on. */
short ssh_socket_events(struct session *S)
{
	int dir = libssh2_session_block_directions(S->s);
	short ev = 0;
	if (dir & LIBSSH2_SESSION_BLOCK_INBOUND)
		ev |= POLLIN;
	if (dir & LIBSSH2_SESSION_BLOCK_OUTBOUND)
		ev |= POLLOUT;
	return ev ? ev : POLLIN;
}

/* Add the watched fd to a poll set of n entries (room for one more); returns the new n. */
nfds_t ssh_add_watch(struct session *S, struct pollfd *p, nfds_t n)
{
	if (S->watch_fd >= 0)
		p[n++] = (struct pollfd){.fd = S->watch_fd, .events = POLLIN};
	return n;
}

/* After a poll over p[0..n): raise if the watched fd fired and the socket has nothing
 * left to read (what the peer sent before it went still counts). */
void ssh_check_watch(lua_State *L, struct session *S, const struct pollfd *p, nfds_t n)
{
	if (S->watch_fd < 0 || n == 0 || p[n - 1].fd != S->watch_fd || !p[n - 1].revents)
		return;
	if (p[0].fd == S->fd && (p[0].revents & POLLIN))
		return;
	ssh_break_transport(S);
	fc_error(L, "ssh: %s: %s", S->where, S->watch_msg);
}

/* Wait (interruptibly) until libssh2 can make progress or the deadline (monotonic ms, <0:
 * none) passes. Returns 0 on deadline. */
int ssh_wait_socket(lua_State *L, struct session *S, double deadline)
{
	struct pollfd p[2] = {{.fd = S->fd, .events = ssh_socket_events(S)}};
	nfds_t n = ssh_add_watch(S, p, 1);
	int left = fc_ms_left(deadline);
	if (left == 0)
		return 0;
	int r = fc_poll(L, p, n, left);
	ssh_check_watch(L, S, p, n);
	return r > 0 || fc_ms_left(deadline) != 0;
}

/* The same for cleanup paths: plain poll(), never raises (an error is already on its way;
 * a second Ctrl-C still kills the process, see fc.c). Returns 0 on deadline. */
int ssh_wait_socket_quietly(struct session *S, double deadline)
{
	struct pollfd p = {.fd = S->fd, .events = ssh_socket_events(S)};
	int left = fc_ms_left(deadline);
	if (left == 0)
		return 0;
	int r = poll(&p, 1, left);
	return r > 0 || (r < 0 && errno == EINTR);
}

double ssh_deadline_in(double seconds)
{
	return seconds < 0 ? -1 : fc_now_ms() + seconds * 1e3;
}

/* ---- host keys ---- */

struct hostkey {
	char type[64];
	unsigned char blob[MAX_HOSTKEY];
	size_t len;
};

/* "SHA256:<base64 without padding>", as OpenSSH prints fingerprints. */
static void fingerprint(const unsigned char *blob, size_t len, char *out, size_t outlen)
{
	unsigned char md[32];
	char b64[4 * ((sizeof md + 2) / 3) + 1];
	if (fc_ssh2_sha256(blob, len, md) != 0) {
		snprintf(out, outlen, "(a %zu-byte key)", len);
		return;
	}
	size_t n = fc_base64_encode(b64, md, sizeof md);
	while (n > 0 && b64[n - 1] == '=')
		n--;
	snprintf(out, outlen, "SHA256:%.*s", (int)n, b64);
}

/* Parse "TYPE BASE64 [comment]" at the start of s. 0 on success. The blob must name the
 * same type in its first field, as every SSH public key blob does. */
static int parse_key_line(const char *s, struct hostkey *k)
{
	while (*s == ' ' || *s == '\t')
		s++;
	size_t tl = strcspn(s, " \t\r\n");
	if (tl == 0 || tl >= sizeof k->type)
		return -1;
	memcpy(k->type, s, tl);
	k->type[tl] = 0;
	s += tl;
	while (*s == ' ' || *s == '\t')
		s++;
	size_t bl = strcspn(s, " \t\r\n");
	if (bl == 0 || bl % 4 != 0 || bl / 4 * 3 > sizeof k->blob)
		return -1;
	long n = fc_base64_decode(k->blob, sizeof k->blob, s, bl);
	if (n < 0)
		return -1;
	k->len = (size_t)n;
	if (k->len < 4)
		return -1;
	uint32_t inner =
	    (uint32_t)k->blob[0] << 24 | k->blob[1] << 16 | k->blob[2] << 8 | k->blob[3];
	if (inner != tl || k->len < 4 + tl || memcmp(k->blob + 4, k->type, tl) != 0)
		return -1;
	return 0;
}

/* The first key line in a file (a host_key.pub, or the output of `dropbearkey -y`). */
static int read_key_file(lua_State *L, const char *path, struct hostkey *k)
{
	FILE *f = fopen(path, "re");
	if (!f)
		fc_errno_error(L, errno, "ssh: host key file %s", path);
	char line[MAX_HOSTKEY * 2];
	int found = -1;
	while (found != 0 && fgets(line, sizeof line, f))
		if (strncmp(line, "ssh-", 4) == 0 || strncmp(line, "ecdsa-", 6) == 0)
			found = parse_key_line(line, k);
	fclose(f);
	return found;
}

/* Fill k from the connect options; 0 if no host key was given. */
static int expected_host_key(lua_State *L, const char *line, const char *file, struct hostkey *k)
{
	if (line && file)
		fc_error(L, "ssh: give host_key or host_key_file, not both");
	if (line && parse_key_line(line, k) != 0)
		fc_error(
		    L, "ssh: host_key: expected a public key line \"ssh-ed25519 AAAA… [comment]\"");
	if (file && read_key_file(L, file, k) != 0)
		fc_error(L,
			 "ssh: host key file %s: no public key line (\"ssh-ed25519 AAAA…\") in it",
			 file);
	return line || file;
}

/* Raise a connect error after freeing socket and session at once (not at the next GC:
 * a recipe retrying connect in a loop must not pile up sockets). */
void ssh_fail_connected(lua_State *L, struct session *S, const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	ssh_drop_transport(S);
	fc_error(L, "ssh: %s: %s", S->where, msg);
}

static void verify_host_key(lua_State *L, struct session *S, const struct hostkey *want)
{
	size_t len = 0;
	int type = 0;
	const char *got = libssh2_session_hostkey(S->s, &len, &type);
	if (!got)
		ssh_fail_connected(L, S, "server sent no host key");
	if (len == want->len && memcmp(got, want->blob, len) == 0)
		return;
	char fw[64], fg[64];
	fingerprint(want->blob, want->len, fw, sizeof fw);
	fingerprint((const unsigned char *)got, len, fg, sizeof fg);
	ssh_fail_connected(L, S, "host key mismatch: expected %s got %s (refusing to connect)", fw,
			   fg);
}

/* ---- session lifetime ---- */

/* Free the libssh2 session and the socket without waiting on the peer any more. The
 * socket is shut down first so that whatever libssh2 still tries while freeing (closing
 * channels) fails at once instead of waiting for an answer. */
void ssh_drop_transport(struct session *S)
{
	if (S->fd >= 0)
		shutdown(S->fd, SHUT_RDWR);
	if (S->s) {
		libssh2_session_set_blocking(S->s, 1);
		libssh2_session_free(S->s);
	}
	S->s = NULL;
	if (S->fd >= 0)
		close(S->fd);
	S->fd = -1;
}

/* Cut the connection but keep the session object: used when a cleanup could not finish
 * in time, so the next libssh2 call fails fast instead of waiting on a stuck peer. */
void ssh_break_transport(struct session *S)
{
	if (S->fd >= 0)
		shutdown(S->fd, SHUT_RDWR);
	S->broken = 1;
}

static int l_close(lua_State *L)
{
	struct session *S = fc_check(L, 1, SESSION_MT);
	if (S->busy)
		fc_error(L, "ssh: %s: cannot close a session from inside its own exec/put/get",
			 S->where);
	if (S->s && !S->broken) {
		int rc;
		NB_SETTLE(S, rc, libssh2_session_disconnect(S->s, "bye"));
		(void)rc; /* a peer that is gone already is fine */
	}
	ssh_drop_transport(S);
	if (S->watch_fd >= 0)
		close(S->watch_fd);
	S->watch_fd = -1;
	return 0;
}

struct session *ssh_check_open(lua_State *L, int idx)
{
	struct session *S = fc_check(L, idx, SESSION_MT);
	if (!S->s)
		fc_error(L, "ssh: session %s@%s is closed", S->user, S->where);
	if (S->broken)
		fc_error(L,
			 "ssh: %s: connection was cut after an operation could not be cleaned up; "
			 "connect again",
			 S->where);
	if (S->busy)
		fc_error(L, "ssh: %s: session busy (exec/put/get called from one of its callbacks)",
			 S->where);
	return S;
}

static int l_tostring(lua_State *L)
{
	struct session *S = fc_check(L, 1, SESSION_MT);
	lua_pushfstring(L, "ssh session %s@%s%s", S->user, S->where, S->s ? "" : " (closed)");
	return 1;
}

/* ---- connect ---- */

struct connect_opts {
	const char *netns, *host, *user, *key;
	int port, insecure;
	int watch_fd;
	const char *watch_msg;
	double timeout_s;
	struct hostkey want;
	int have_want;
};

/* The private key must be readable by us only: a key others can read is not a secret
 * any more, and OpenSSH refuses such keys too. */
static void check_key_file(lua_State *L, const char *path)
{
	struct stat st;
	if (stat(path, &st) != 0)
		fc_errno_error(L, errno, "ssh: key %s", path);
	if (!S_ISREG(st.st_mode))
		fc_error(L, "ssh: key %s is not a regular file", path);
	if (st.st_mode & 077)
		fc_error(L, "ssh: key %s has mode %04o: it must be private (chmod 600 %s)", path,
			 (unsigned)(st.st_mode & 07777), path);
}

static void read_connect_opts(lua_State *L, struct connect_opts *o)
{
	static const char *const known[] = {"host",
					    "netns",
					    "user",
					    "key",
					    "port",
					    "timeout",
					    "watch_fd",
					    "watch_msg",
					    "host_key",
					    "host_key_file",
					    "insecure_ignore_host_key",
					    NULL};
	luaL_checktype(L, 1, LUA_TTABLE);
	fc_opt_check(L, 1, "ssh.connect", known);
	o->host = fc_opt_string(L, 1, "host", NULL);
	o->netns = fc_opt_string(L, 1, "netns", NULL);
	o->user = fc_opt_string(L, 1, "user", "root");
	o->key = fc_opt_string(L, 1, "key", NULL);
	o->port = (int)fc_opt_number(L, 1, "port", 22);
	o->timeout_s = fc_opt_number(L, 1, "timeout", DEFAULT_TIMEOUT_S);
	o->insecure = fc_opt_bool(L, 1, "insecure_ignore_host_key", 0);
	o->watch_fd = (int)fc_opt_number(L, 1, "watch_fd", -1);
	o->watch_msg = fc_opt_string(L, 1, "watch_msg", "the peer is gone (watch_fd fired)");
	if (!o->host)
		fc_error(L, "ssh.connect: option 'host' is required");
	if (!o->key)
		fc_error(L, "ssh.connect: option 'key' (private key file) is required");
	if (o->port <= 0 || o->port > 65535)
		fc_error(L, "ssh.connect: bad port %d", o->port);
	if (strlen(o->user) >= 64)
		fc_error(L, "ssh.connect: user name too long");
	o->have_want = expected_host_key(L, fc_opt_string(L, 1, "host_key", NULL),
					 fc_opt_string(L, 1, "host_key_file", NULL), &o->want);
	if (!o->have_want && !o->insecure)
		fc_error(L,
			 "ssh.connect: no host key given for %s (pass host_key= or host_key_file=, "
			 "or insecure_ignore_host_key=true to accept any)",
			 o->host);
	check_key_file(L, o->key);
}

/* Errors worth another TCP attempt: the guest is not up yet, or its network is still
 * being plumbed. Anything else (no such namespace, bad address) will not fix itself. */
static int tcp_retryable(int err)
{
	return err == ECONNREFUSED || err == ETIMEDOUT || err == EHOSTUNREACH ||
	       err == ENETUNREACH || err == ECONNRESET || err == ECONNABORTED || err == EHOSTDOWN ||
	       err == ENETDOWN;
}

/* Handshake failures that mean "sshd was still starting": the connection was accepted
 * and then closed or reset before or during the banner/key exchange. */
static int handshake_retryable(int rc)
{
	return rc == LIBSSH2_ERROR_BANNER_RECV || rc == LIBSSH2_ERROR_BANNER_SEND ||
	       rc == LIBSSH2_ERROR_SOCKET_DISCONNECT || rc == LIBSSH2_ERROR_SOCKET_RECV ||
	       rc == LIBSSH2_ERROR_SOCKET_SEND || rc == LIBSSH2_ERROR_SOCKET_NONE;
}

/* Sleep between attempts (interruptible, never past the deadline, ended by the watch). */
static void backoff(lua_State *L, struct session *S, int *ms, double deadline)
{
	struct pollfd p[1];
	nfds_t n = ssh_add_watch(S, p, 0);
	int left = fc_ms_left(deadline);
	fc_poll(L, p, n, left >= 0 && left < *ms ? left : *ms);
	ssh_check_watch(L, S, p, n);
	*ms = *ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : *ms * 2;
}

/* How one connection attempt ended. */
struct attempt {
	int tcp_err; /* errno of a failed TCP connect, else 0 */
	int ssh_rc;  /* libssh2 code of a failed handshake (LIBSSH2_ERROR_TIMEOUT: deadline) */
	char last[256];
};

/* One TCP connection + SSH handshake. Returns 0, or -1 with a->* saying what happened (the
 * transport is then dropped). */
static int try_handshake(lua_State *L, struct session *S, const struct connect_opts *o,
			 double deadline, int attempt_ms, struct attempt *a)
{
	int left = fc_ms_left(deadline);
	int fd = fc_tcp_connect(L, o->netns, o->host, o->port,
				left < attempt_ms ? left : attempt_ms, a->last, sizeof a->last);
	if (fd < 0) {
		a->tcp_err = errno ? errno : EIO;
		return -1;
	}
	/* closed with a RST (also when fireclaw dies): the VM is usually destroyed right after
	 * its session, and a FIN nobody acknowledges keeps an orphaned socket retransmitting
	 * for minutes, holding the VM's network namespace (and its egress veth) alive after
	 * its name is gone */
	struct linger lg = {.l_onoff = 1, .l_linger = 0};
	setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
	S->fd = fd;
	S->s = libssh2_session_init();
	if (!S->s) {
		snprintf(a->last, sizeof a->last, "out of memory");
		ssh_drop_transport(S);
		a->ssh_rc = LIBSSH2_ERROR_ALLOC;
		return -1;
	}
	libssh2_session_set_blocking(S->s, 0);
	/* negotiate the type of the pinned key, so a server with several keys shows that one */
	if (o->have_want)
		libssh2_session_method_pref(S->s, LIBSSH2_METHOD_HOSTKEY, o->want.type);
	int rc;
	NB_CALL(L, S, deadline, rc, libssh2_session_handshake(S->s, S->fd));
	if (rc == 0)
		return 0;
	if (rc == LIBSSH2_ERROR_TIMEOUT) {
		/* cut by the deadline: an earlier failed handshake says more */
		if (strncmp(a->last, "handshake failed", 16) != 0)
			snprintf(a->last, sizeof a->last, "connected, but no SSH handshake yet");
	} else
		snprintf(a->last, sizeof a->last, "handshake failed: %s", ssh_session_errmsg(S));
	ssh_drop_transport(S);
	a->ssh_rc = rc;
	return -1;
}

/* Connect and handshake within the deadline, retrying while the server is not up yet. */
static void open_transport(lua_State *L, struct session *S, const struct connect_opts *o)
{
	double deadline = ssh_deadline_in(o->timeout_s);
	struct attempt a = {.last = "nothing tried yet"};
	int pause_ms = BACKOFF_MIN_MS, attempt_ms = ATTEMPT_MIN_MS;
	for (;;) {
		if (fc_ms_left(deadline) == 0)
			fc_error(L, "ssh: %s: timed out after %g s (last: %s)", S->where,
				 o->timeout_s, a.last);
		a.tcp_err = a.ssh_rc = 0;
		if (try_handshake(L, S, o, deadline, attempt_ms, &a) == 0)
			return;
		if (a.tcp_err && !tcp_retryable(a.tcp_err))
			fc_error(L, "ssh: %s: %s", S->where, a.last);
		if (a.tcp_err == ETIMEDOUT && attempt_ms < ATTEMPT_MAX_MS)
			attempt_ms *= 2;
		if (a.ssh_rc && a.ssh_rc != LIBSSH2_ERROR_TIMEOUT && !handshake_retryable(a.ssh_rc))
			fc_error(L, "ssh: %s: %s", S->where, a.last);
		backoff(L, S, &pause_ms, deadline);
	}
}

static void authenticate(lua_State *L, struct session *S, const struct connect_opts *o,
			 double deadline)
{
	int rc;
	NB_CALL(L, S, deadline, rc,
		libssh2_userauth_publickey_fromfile_ex(S->s, o->user, (unsigned)strlen(o->user),
						       NULL, o->key, NULL));
	if (rc == 0)
		return;
	if (rc == LIBSSH2_ERROR_TIMEOUT)
		ssh_fail_connected(L, S,
				   "timed out after %g s (last: authentication as %s pending)",
				   o->timeout_s, o->user);
	if (rc == LIBSSH2_ERROR_AUTHENTICATION_FAILED || rc == LIBSSH2_ERROR_PUBLICKEY_UNVERIFIED)
		ssh_fail_connected(L, S, "authentication refused for %s with key %s", o->user,
				   o->key);
	if (rc == LIBSSH2_ERROR_FILE)
		ssh_fail_connected(L, S, "cannot use key %s: %s", o->key, ssh_session_errmsg(S));
	ssh_fail_connected(L, S, "authentication as %s failed: %s", o->user, ssh_session_errmsg(S));
}

static int l_connect(lua_State *L)
{
	struct connect_opts o;
	memset(&o, 0, sizeof o);
	read_connect_opts(L, &o);
	/* libssh2 is loaded (and initialised) by the first connect, not by require */
	const char *err = fc_ssh2_load();
	if (err)
		fc_error(L, "ssh.connect: %s", err);
	struct session *S = fc_new(L, sizeof *S, SESSION_MT);
	S->fd = -1;
	S->watch_fd = -1;
	snprintf(S->user, sizeof S->user, "%s", o.user);
	if (o.netns && *o.netns)
		snprintf(S->where, sizeof S->where, "%s:%d in %s", o.host, o.port, o.netns);
	else
		snprintf(S->where, sizeof S->where, "%s:%d", o.host, o.port);
	/* from here on the userdata owns socket and session: an error frees them via __gc */
	if (o.watch_fd >= 0) {
		S->watch_fd = fcntl(o.watch_fd, F_DUPFD_CLOEXEC, 0);
		if (S->watch_fd < 0)
			fc_errno_error(L, errno, "ssh.connect: watch_fd %d", o.watch_fd);
		snprintf(S->watch_msg, sizeof S->watch_msg, "%s", o.watch_msg);
	}
	double deadline = ssh_deadline_in(o.timeout_s);
	open_transport(L, S, &o);
	if (o.have_want)
		verify_host_key(L, S, &o.want);
	authenticate(L, S, &o, deadline);
	return 1;
}

/* ---- module ---- */

int luaopen_fireclaw_ssh(lua_State *L)
{
	static const luaL_Reg methods[] = {
	    {"exec", ssh_l_exec}, {"put", ssh_l_put},	      {"get", ssh_l_get},
	    {"close", l_close},	  {"__tostring", l_tostring}, {NULL, NULL},
	};
	static const luaL_Reg fns[] = {
	    {"connect", l_connect},
	    {"quote", ssh_l_quote},
	    {"check_source", ssh_l_check_source},
	    {NULL, NULL},
	};
	fc_class(L, SESSION_MT, methods);
	lua_newtable(L);
	luaL_register(L, NULL, fns);
	return 1;
}
