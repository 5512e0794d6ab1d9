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
 *
 * exec results: `signal` (e.g. "KILL") and no `status` when the server reports the command
 * died of a signal; on timeout `timed_out=true` and no status. A shell may also report a
 * killed child as status 128+N: what the server says is what is returned. Every command
 * runs with FIRECLAW_EXEC_TAG=<random> in its environment; that is how a timed-out or
 * interrupted command is killed (see kill_tagged).
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
 * An exec, put or get runs its body under lua_pcall: whatever raises inside (an interrupt,
 * a callback's error, a protocol error), the channel / SFTP handles are released afterwards
 * by a cleanup that neither raises nor waits longer than CLEANUP_MS, then the error goes on.
 */
#include "fc.h"

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
#include <openssl/evp.h>

#define SESSION_MT "fireclaw.ssh.session"

#define DEFAULT_TIMEOUT_S 10.0
#define DEFAULT_MAX_CAPTURE (16u << 20)
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
/* After an exec timeout, how long the remote command gets to die from the KILL signal. */
#define KILL_GRACE_MS 2000
/* After an error in exec: how long a command that is ending anyway gets before it is killed. */
#define ABORT_SETTLE_MS 100
/* Upper bound for cleanup while an error propagates (channel close, SFTP shutdown, bye). */
#define CLEANUP_MS 1000
#define IO_CHUNK 32768
#define MAX_HOSTKEY 4096

struct session {
	LIBSSH2_SESSION *s;
	int fd;
	int busy;     /* an exec/put/get is driving the session (its callbacks may run Lua) */
	int broken;   /* the transport was cut because a cleanup could not finish */
	int watch_fd; /* readable once the peer is gone (see watch_fd above), or -1 */
	char watch_msg[160];
	char user[64];
	char where[192]; /* "172.16.0.2:22 in fc-1a2b", the object every message names */
};

/* ---- small helpers ---- */

static const char *session_errmsg(struct session *S)
{
	char *msg = NULL;
	int len = 0;
	libssh2_session_last_error(S->s, &msg, &len, 0);
	return msg && *msg ? msg : "unknown error";
}

static int is_eagain_ptr(struct session *S, const void *p)
{
	return p == NULL && libssh2_session_last_errno(S->s) == LIBSSH2_ERROR_EAGAIN;
}

/* poll() events for the session socket: the directions libssh2 is blocked on. */
static short socket_events(struct session *S)
{
	int dir = libssh2_session_block_directions(S->s);
	short ev = 0;
	if (dir & LIBSSH2_SESSION_BLOCK_INBOUND)
		ev |= POLLIN;
	if (dir & LIBSSH2_SESSION_BLOCK_OUTBOUND)
		ev |= POLLOUT;
	return ev ? ev : POLLIN;
}

static void break_transport(struct session *S);

/* Add the watched fd to a poll set of n entries (room for one more); returns the new n. */
static nfds_t add_watch(struct session *S, struct pollfd *p, nfds_t n)
{
	if (S->watch_fd >= 0)
		p[n++] = (struct pollfd){.fd = S->watch_fd, .events = POLLIN};
	return n;
}

/* After a poll over p[0..n): raise if the watched fd fired and the socket has nothing
 * left to read (what the peer sent before it went still counts). */
static void check_watch(lua_State *L, struct session *S, const struct pollfd *p, nfds_t n)
{
	if (S->watch_fd < 0 || n == 0 || p[n - 1].fd != S->watch_fd || !p[n - 1].revents)
		return;
	if (p[0].fd == S->fd && (p[0].revents & POLLIN))
		return;
	break_transport(S);
	fc_error(L, "ssh: %s: %s", S->where, S->watch_msg);
}

/* Wait (interruptibly) until libssh2 can make progress or the deadline (monotonic ms, <0:
 * none) passes. Returns 0 on deadline. */
static int wait_socket(lua_State *L, struct session *S, double deadline)
{
	struct pollfd p[2] = {{.fd = S->fd, .events = socket_events(S)}};
	nfds_t n = add_watch(S, p, 1);
	int left = fc_ms_left(deadline);
	if (left == 0)
		return 0;
	int r = fc_poll(L, p, n, left);
	check_watch(L, S, p, n);
	return r > 0 || fc_ms_left(deadline) != 0;
}

/* The same for cleanup paths: plain poll(), never raises (an error is already on its way;
 * a second Ctrl-C still kills the process, see fc.c). Returns 0 on deadline. */
static int wait_socket_quietly(struct session *S, double deadline)
{
	struct pollfd p = {.fd = S->fd, .events = socket_events(S)};
	int left = fc_ms_left(deadline);
	if (left == 0)
		return 0;
	int r = poll(&p, 1, left);
	return r > 0 || (r < 0 && errno == EINTR);
}

/* Call expr until it stops saying EAGAIN, waiting for the socket in between; rc is its
 * last value, or LIBSSH2_ERROR_TIMEOUT when the deadline passed first. */
#define NB_CALL(L, S, deadline, rc, expr)                                                          \
	while (((rc) = (expr)) == LIBSSH2_ERROR_EAGAIN) {                                          \
		if (!wait_socket((L), (S), (deadline))) {                                          \
			(rc) = LIBSSH2_ERROR_TIMEOUT;                                              \
			break;                                                                     \
		}                                                                                  \
	}

/* The same for cleanup: quiet waits bounded by CLEANUP_MS. */
#define NB_SETTLE(S, rc, expr)                                                                     \
	do {                                                                                       \
		double settle_deadline_ = fc_now_ms() + CLEANUP_MS;                                \
		while (((rc) = (expr)) == LIBSSH2_ERROR_EAGAIN) {                                  \
			if (!wait_socket_quietly((S), settle_deadline_)) {                         \
				(rc) = LIBSSH2_ERROR_TIMEOUT;                                      \
				break;                                                             \
			}                                                                          \
		}                                                                                  \
	} while (0)

static double deadline_in(double seconds)
{
	return seconds < 0 ? -1 : fc_now_ms() + seconds * 1e3;
}

/* ---- quoting ---- */

static int is_plain_word(const char *s, size_t n)
{
	if (n == 0)
		return 0;
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		if (!(c >= 'a' && c <= 'z') && !(c >= 'A' && c <= 'Z') && !(c >= '0' && c <= '9') &&
		    !strchr("_-./=:,+@%", c))
			return 0;
	}
	return 1;
}

/* Append s quoted for a POSIX shell: plain words as they are, anything else inside single
 * quotes, where nothing is special but the quote itself, written as '\''. */
static void add_quoted(luaL_Buffer *b, const char *s, size_t n)
{
	if (is_plain_word(s, n)) {
		luaL_addlstring(b, s, n);
		return;
	}
	luaL_addchar(b, '\'');
	for (size_t i = 0; i < n; i++) {
		if (s[i] == '\'')
			luaL_addlstring(b, "'\\''", 4);
		else
			luaL_addchar(b, s[i]);
	}
	luaL_addchar(b, '\'');
}

/* Push the argv table at idx as one shell command line. A NUL cannot travel through a
 * command line (the remote shell would cut the argument there), so it is refused. */
static void push_quoted_argv(lua_State *L, int idx)
{
	int n = (int)lua_objlen(L, idx);
	if (n == 0)
		fc_error(L, "ssh: empty argv");
	luaL_Buffer b;
	luaL_buffinit(L, &b);
	for (int i = 1; i <= n; i++) {
		lua_rawgeti(L, idx, i);
		size_t len;
		/* popped; a number becomes a string kept alive with the argv table */
		const char *s = fc_keep_string(L, idx, &len);
		if (!s)
			fc_error(L, "ssh: argv[%d]: string expected, got %s", i,
				 luaL_typename(L, -1));
		if (memchr(s, '\0', len))
			fc_error(
			    L, "ssh: argv[%d] contains a NUL byte, which no command line can carry",
			    i);
		if (i > 1)
			luaL_addchar(&b, ' ');
		add_quoted(&b, s, len);
	}
	luaL_pushresult(&b);
}

/* ssh.quote(argv) -> string */
static int l_quote(lua_State *L)
{
	luaL_checktype(L, 1, LUA_TTABLE);
	push_quoted_argv(L, 1);
	return 1;
}

static int is_env_name(const char *k)
{
	if (!*k || (*k >= '0' && *k <= '9'))
		return 0;
	for (const char *p = k; *p; p++)
		if (!(*p == '_' || (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
		      (*p >= '0' && *p <= '9')))
			return 0;
	return 1;
}

/* Push "export K='v'; …" for the env table at idx (sorted, so command lines are stable).
 * Environment travels inside the command line because servers drop "env" requests they
 * were not configured to accept: dropbear takes none but LANG/LC_*, OpenSSH only what
 * AcceptEnv lists. */
static void push_env_prefix(lua_State *L, int idx)
{
	lua_newtable(L);
	int keys = lua_gettop(L), n = 0;
	lua_pushnil(L);
	while (lua_next(L, idx)) {
		lua_pop(L, 1);
		if (lua_type(L, -1) != LUA_TSTRING || !is_env_name(lua_tostring(L, -1)))
			fc_error(L, "ssh: env: bad variable name %s",
				 lua_tostring(L, -1) ? lua_tostring(L, -1) : luaL_typename(L, -1));
		lua_pushvalue(L, -1);
		lua_rawseti(L, keys, ++n);
	}
	lua_getglobal(L, "table");
	lua_getfield(L, -1, "sort");
	lua_pushvalue(L, keys);
	lua_call(L, 1, 0);
	lua_pop(L, 1);
	luaL_Buffer b;
	luaL_buffinit(L, &b);
	for (int i = 1; i <= n; i++) {
		lua_rawgeti(L, keys, i);
		const char *k = lua_tostring(L, -1);
		lua_gettable(L, idx);
		size_t len;
		/* popped; a number becomes a string kept alive with the env table */
		const char *v = fc_keep_string(L, idx, &len);
		if (!v || memchr(v, '\0', len))
			fc_error(L, "ssh: env %s: a string without NUL bytes expected", k);
		luaL_addstring(&b, "export ");
		luaL_addstring(&b, k);
		luaL_addchar(&b, '=');
		luaL_addchar(&b, '\'');
		for (size_t j = 0; j < len; j++) {
			if (v[j] == '\'')
				luaL_addlstring(&b, "'\\''", 4);
			else
				luaL_addchar(&b, v[j]);
		}
		luaL_addstring(&b, "'; ");
	}
	luaL_pushresult(&b);
	lua_remove(L, keys);
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
	unsigned char md[EVP_MAX_MD_SIZE];
	unsigned int mdlen = 0;
	EVP_Digest(blob, len, md, &mdlen, EVP_sha256(), NULL);
	unsigned char b64[4 * ((EVP_MAX_MD_SIZE + 2) / 3) + 1];
	int n = EVP_EncodeBlock(b64, md, (int)mdlen);
	while (n > 0 && b64[n - 1] == '=')
		n--;
	snprintf(out, outlen, "SHA256:%.*s", n, (char *)b64);
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
	int n = EVP_DecodeBlock(k->blob, (const unsigned char *)s, (int)bl);
	if (n < 0)
		return -1;
	for (size_t i = bl; i > 0 && s[i - 1] == '='; i--)
		n--; /* EVP_DecodeBlock counts padding as zero bytes */
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

static void drop_transport(struct session *S);

/* Raise a connect error after freeing socket and session at once (not at the next GC:
 * a recipe retrying connect in a loop must not pile up sockets). */
static void __attribute__((noreturn, format(printf, 3, 4)))
fail_connected(lua_State *L, struct session *S, const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	drop_transport(S);
	fc_error(L, "ssh: %s: %s", S->where, msg);
}

static void verify_host_key(lua_State *L, struct session *S, const struct hostkey *want)
{
	size_t len = 0;
	int type = 0;
	const char *got = libssh2_session_hostkey(S->s, &len, &type);
	if (!got)
		fail_connected(L, S, "server sent no host key");
	if (len == want->len && memcmp(got, want->blob, len) == 0)
		return;
	char fw[64], fg[64];
	fingerprint(want->blob, want->len, fw, sizeof fw);
	fingerprint((const unsigned char *)got, len, fg, sizeof fg);
	fail_connected(L, S, "host key mismatch: expected %s got %s (refusing to connect)", fw, fg);
}

/* ---- session lifetime ---- */

/* Free the libssh2 session and the socket without waiting on the peer any more. The
 * socket is shut down first so that whatever libssh2 still tries while freeing (closing
 * channels) fails at once instead of waiting for an answer. */
static void drop_transport(struct session *S)
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
static void break_transport(struct session *S)
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
	drop_transport(S);
	if (S->watch_fd >= 0)
		close(S->watch_fd);
	S->watch_fd = -1;
	return 0;
}

static struct session *check_open(lua_State *L, int idx)
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
	nfds_t n = add_watch(S, p, 0);
	int left = fc_ms_left(deadline);
	fc_poll(L, p, n, left >= 0 && left < *ms ? left : *ms);
	check_watch(L, S, p, n);
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
	S->fd = fd;
	S->s = libssh2_session_init();
	if (!S->s) {
		snprintf(a->last, sizeof a->last, "out of memory");
		drop_transport(S);
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
		snprintf(a->last, sizeof a->last, "handshake failed: %s", session_errmsg(S));
	drop_transport(S);
	a->ssh_rc = rc;
	return -1;
}

/* Connect and handshake within the deadline, retrying while the server is not up yet. */
static void open_transport(lua_State *L, struct session *S, const struct connect_opts *o)
{
	double deadline = deadline_in(o->timeout_s);
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
		fail_connected(L, S, "timed out after %g s (last: authentication as %s pending)",
			       o->timeout_s, o->user);
	if (rc == LIBSSH2_ERROR_AUTHENTICATION_FAILED || rc == LIBSSH2_ERROR_PUBLICKEY_UNVERIFIED)
		fail_connected(L, S, "authentication refused for %s with key %s", o->user, o->key);
	if (rc == LIBSSH2_ERROR_FILE)
		fail_connected(L, S, "cannot use key %s: %s", o->key, session_errmsg(S));
	fail_connected(L, S, "authentication as %s failed: %s", o->user, session_errmsg(S));
}

static int l_connect(lua_State *L)
{
	struct connect_opts o;
	memset(&o, 0, sizeof o);
	read_connect_opts(L, &o);
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
	double deadline = deadline_in(o.timeout_s);
	open_transport(L, S, &o);
	if (o.have_want)
		verify_host_key(L, S, &o.want);
	authenticate(L, S, &o, deadline);
	return 1;
}

/* ---- exec ---- */

struct stream {
	int id;	      /* 0 = stdout, SSH_EXTENDED_DATA_STDERR = stderr */
	int callback; /* stack index (in the body's frame) of the callback, 0 if none */
	int capture;
	int eof, truncated;
	struct fc_buf buf;
	size_t max;
};

struct exec {
	struct session *S;
	LIBSSH2_CHANNEL *ch;
	LIBSSH2_CHANNEL *side; /* the channel killing the command (timeout, abort) */
	char tag[33];	       /* hex, marks the command's processes (see kill_tagged) */
	const char *cmd;
	size_t cmdlen;
	int pty;
	/* stdin: a string (in, inlen), or an fd read into inbuf; pending bytes are
	 * [inoff, inlen) of whichever is active */
	const char *in;
	size_t inlen, inoff;
	int infd, in_ready, in_eof, eof_sent;
	char inbuf[IO_CHUNK];
	struct stream out, err;
	double start, deadline;
	int timed_out;
	int closed; /* the server closed the channel: safe to close ours */
	int status;
	char *signal; /* allocated by libssh2 */
};

static void stream_append(lua_State *L, struct stream *st, const char *data, size_t n)
{
	if (st->buf.len + n > st->max) {
		st->truncated = 1;
		n = st->max - st->buf.len;
	}
	if (n > 0 && fc_buf_append(&st->buf, data, n) < 0)
		fc_error(L, "ssh: out of memory capturing output");
}

static void deliver(lua_State *L, struct stream *st, const char *data, size_t n)
{
	if (st->callback) {
		lua_pushvalue(L, st->callback);
		lua_pushlstring(L, data, n);
		lua_call(L, 1, 0);
	}
	if (st->capture)
		stream_append(L, st, data, n);
}

static void exec_fail(lua_State *L, struct exec *x, const char *what)
{
	int rc = libssh2_session_last_errno(x->S->s);
	if (rc == LIBSSH2_ERROR_SOCKET_RECV || rc == LIBSSH2_ERROR_SOCKET_SEND ||
	    rc == LIBSSH2_ERROR_SOCKET_DISCONNECT)
		fc_error(L, "ssh: %s: exec: the connection to the SSH server was lost (%s: %s)",
			 x->S->where, what, session_errmsg(x->S));
	fc_error(L, "ssh: %s: exec: %s: %s", x->S->where, what, session_errmsg(x->S));
}

/* Read what has arrived on one stream. Returns 1 if anything happened (data or EOF). */
static int drain_stream(lua_State *L, struct exec *x, struct stream *st)
{
	char buf[IO_CHUNK];
	int progress = 0;
	while (!st->eof) {
		ssize_t n = libssh2_channel_read_ex(x->ch, st->id, buf, sizeof buf);
		if (n == LIBSSH2_ERROR_EAGAIN)
			break;
		if (n < 0)
			exec_fail(L, x, "read");
		if (n == 0) {
			/* 0 is EOF only once the channel says so: data for the other stream may
			 * still be queued */
			if (libssh2_channel_eof(x->ch) == 1)
				st->eof = progress = 1;
			break;
		}
		deliver(L, st, buf, (size_t)n);
		progress = 1;
	}
	return progress;
}

/* Refill the stdin buffer from the fd once poll said it is readable. */
static int refill_stdin(lua_State *L, struct exec *x)
{
	if (x->infd < 0 || x->in_eof || x->inoff < x->inlen || !x->in_ready)
		return 0;
	x->in_ready = 0;
	ssize_t n = read(x->infd, x->inbuf, sizeof x->inbuf);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return 0;
	if (n < 0)
		fc_errno_error(L, errno, "ssh: %s: exec: reading stdin fd %d", x->S->where,
			       x->infd);
	if (n == 0)
		x->in_eof = 1;
	x->in = x->inbuf;
	x->inoff = 0;
	x->inlen = (size_t)n;
	return 1;
}

/* Send pending stdin, then EOF once the source is exhausted. Returns 1 on progress. */
static int pump_stdin(lua_State *L, struct exec *x)
{
	if (x->eof_sent)
		return 0;
	int progress = refill_stdin(L, x);
	if (x->inoff < x->inlen) {
		ssize_t n =
		    libssh2_channel_write_ex(x->ch, 0, x->in + x->inoff, x->inlen - x->inoff);
		if (n == LIBSSH2_ERROR_EAGAIN)
			return progress;
		if (n == LIBSSH2_ERROR_CHANNEL_CLOSED || n == LIBSSH2_ERROR_CHANNEL_EOF_SENT) {
			/* the command ended without reading all of its input: drop the rest */
			x->eof_sent = 1;
			return 1;
		}
		if (n < 0)
			exec_fail(L, x, "write stdin");
		x->inoff += (size_t)n;
		return 1;
	}
	if (x->infd >= 0 && !x->in_eof)
		return progress;
	int rc = libssh2_channel_send_eof(x->ch);
	if (rc == LIBSSH2_ERROR_EAGAIN)
		return progress;
	if (rc < 0 && rc != LIBSSH2_ERROR_CHANNEL_CLOSED && rc != LIBSSH2_ERROR_CHANNEL_EOF_SENT)
		exec_fail(L, x, "send EOF");
	x->eof_sent = 1;
	return 1;
}

/* Move data in every direction until nothing moves. Returns 1 once the remote side has
 * closed the channel (both streams ended and the close arrived), 0 to wait. */
static int pump(lua_State *L, struct exec *x)
{
	int progress;
	do {
		progress = pump_stdin(L, x);
		progress |= drain_stream(L, x, &x->out);
		progress |= drain_stream(L, x, &x->err);
	} while (progress);
	if (!x->out.eof || !x->err.eof)
		return 0;
	/* exit-status/exit-signal come before the server's close: wait for it */
	int rc = libssh2_channel_wait_closed(x->ch);
	if (rc == LIBSSH2_ERROR_EAGAIN)
		return 0;
	if (rc < 0)
		exec_fail(L, x, "waiting for the command to end");
	x->closed = 1;
	return 1;
}

/* Wait for the socket (and the stdin fd when its buffer is empty). 0 on deadline. */
static int wait_exec(lua_State *L, struct exec *x)
{
	struct pollfd p[3] = {{.fd = x->S->fd, .events = POLLIN | socket_events(x->S)}};
	nfds_t n = 1;
	int in = x->infd >= 0 && !x->in_eof && !x->eof_sent && x->inoff >= x->inlen;
	if (in)
		p[n++] = (struct pollfd){.fd = x->infd, .events = POLLIN};
	n = add_watch(x->S, p, n);
	int left = fc_ms_left(x->deadline);
	if (left == 0)
		return 0;
	int r = fc_poll(L, p, n, left);
	if (in && p[1].revents)
		x->in_ready = 1;
	check_watch(L, x->S, p, n);
	return r > 0 || fc_ms_left(x->deadline) != 0;
}

/* Kill the command's processes. A "signal" channel request would be the way, but
 * libssh2 1.10 has no libssh2_channel_signal and refuses a second request on a started
 * channel ("Channel can not be reused"). So every command carries a random tag in its
 * environment (FIRECLAW_EXEC_TAG, see push_command), which its children inherit, and a
 * second channel kills every process whose environment holds the tag: the command's
 * whole tree, nothing else. Needs /proc, sh, grep and kill on the remote side.
 * Returns 1 if the kill command ran (within x->deadline). */
static int kill_tagged(lua_State *L, struct exec *x)
{
	char cmd[256];
	snprintf(cmd, sizeof cmd,
		 "for f in $(grep -l FIRECLAW_EXEC_TAG=%s /proc/[0-9]*/environ 2>/dev/null); do "
		 "p=${f#/proc/}; kill -KILL ${p%%/environ}; done >/dev/null 2>&1; true",
		 x->tag);
	struct session *S = x->S;
	while (!(x->side = libssh2_channel_open_session(S->s)))
		if (!is_eagain_ptr(S, x->side) || !wait_socket(L, S, x->deadline))
			return 0;
	int rc;
	NB_CALL(L, S, x->deadline, rc,
		libssh2_channel_process_startup(x->side, "exec", 4, cmd, (unsigned)strlen(cmd)));
	if (rc == 0)
		NB_CALL(L, S, x->deadline, rc, libssh2_channel_send_eof(x->side));
	if (rc == 0)
		NB_CALL(L, S, x->deadline, rc, libssh2_channel_wait_eof(x->side));
	/* wait for the server's close before sending ours (see abort_body) */
	if (rc == 0)
		NB_CALL(L, S, x->deadline, rc, libssh2_channel_wait_closed(x->side));
	if (rc == 0)
		NB_CALL(L, S, x->deadline, rc, libssh2_channel_close(x->side));
	if (rc == 0)
		NB_CALL(L, S, x->deadline, rc, libssh2_channel_free(x->side));
	if (rc == 0)
		x->side = NULL;
	return rc == 0;
}

/* The deadline passed. First time: the command timed out; kill it and give it
 * KILL_GRACE_MS to go. Second time (or when the kill could not run): stop waiting; the
 * channel is then closed by exec_cleanup, which cuts the transport if even that fails.
 * Returns 1 to keep waiting. */
static int on_deadline(lua_State *L, struct exec *x)
{
	if (x->timed_out)
		return 0;
	x->timed_out = 1;
	x->deadline = fc_now_ms() + KILL_GRACE_MS;
	return kill_tagged(L, x);
}

static void open_channel(lua_State *L, struct exec *x)
{
	struct session *S = x->S;
	while (!(x->ch = libssh2_channel_open_session(S->s))) {
		if (!is_eagain_ptr(S, x->ch))
			exec_fail(L, x, "open channel");
		if (!wait_socket(L, S, x->deadline)) {
			x->timed_out = 1;
			return;
		}
	}
}

static void start_command(lua_State *L, struct exec *x)
{
	int rc;
	if (x->pty) {
		NB_CALL(L, x->S, x->deadline, rc,
			libssh2_channel_request_pty_ex(x->ch, "xterm", 5, NULL, 0, 80, 24, 0, 0));
		if (rc == LIBSSH2_ERROR_TIMEOUT) {
			x->timed_out = 1;
			return;
		}
		if (rc < 0)
			exec_fail(L, x, "request pty");
	}
	NB_CALL(L, x->S, x->deadline, rc,
		libssh2_channel_process_startup(x->ch, "exec", 4, x->cmd, (unsigned)x->cmdlen));
	if (rc == LIBSSH2_ERROR_TIMEOUT)
		x->timed_out = 1;
	else if (rc < 0)
		exec_fail(L, x, "start command");
}

static void run_io(lua_State *L, struct exec *x)
{
	while (!pump(L, x)) {
		if (!wait_exec(L, x) && !on_deadline(L, x))
			return;
	}
}

/* After the remote close: send ours, read the exit status or signal, free the channel. */
static void finish_channel(lua_State *L, struct exec *x)
{
	int rc;
	double deadline = fc_now_ms() + CLEANUP_MS;
	NB_CALL(L, x->S, deadline, rc, libssh2_channel_close(x->ch));
	x->status = libssh2_channel_get_exit_status(x->ch);
	size_t len = 0;
	libssh2_channel_get_exit_signal(x->ch, &x->signal, &len, NULL, NULL, NULL, NULL);
	NB_CALL(L, x->S, deadline, rc, libssh2_channel_free(x->ch));
	if (rc == 0)
		x->ch = NULL; /* else exec_cleanup retries, then cuts the transport */
}

static void push_stream(lua_State *L, struct stream *st, const char *name, const char *flag)
{
	lua_pushlstring(L, st->buf.data ? st->buf.data : "", st->buf.len);
	lua_setfield(L, -2, name);
	lua_pushboolean(L, st->truncated);
	lua_setfield(L, -2, flag);
}

static void push_result(lua_State *L, struct exec *x)
{
	lua_createtable(L, 0, 8);
	if (x->signal && *x->signal) {
		lua_pushstring(L, x->signal);
		lua_setfield(L, -2, "signal");
	} else if (!x->timed_out) {
		lua_pushinteger(L, x->status);
		lua_setfield(L, -2, "status");
	}
	lua_pushboolean(L, x->timed_out);
	lua_setfield(L, -2, "timed_out");
	lua_pushnumber(L, fc_now_ms() - x->start);
	lua_setfield(L, -2, "duration_ms");
	push_stream(L, &x->out, "stdout", "stdout_truncated");
	push_stream(L, &x->err, "stderr", "stderr_truncated");
}

/* Runs under lua_pcall: arg 1 the exec state, args 2/3 the stdout/stderr callbacks. */
static int exec_body(lua_State *L)
{
	struct exec *x = lua_touserdata(L, 1);
	x->out.callback = lua_isfunction(L, 2) ? 2 : 0;
	x->err.callback = lua_isfunction(L, 3) ? 3 : 0;
	open_channel(L, x);
	if (!x->timed_out)
		start_command(L, x);
	if (!x->timed_out)
		run_io(L, x);
	if (x->closed)
		finish_channel(L, x);
	push_result(L, x);
	return 1;
}

/* Runs under lua_pcall after exec_body raised (a callback's error, Ctrl-C) with the
 * command possibly still running; output from now on is discarded. The channel may only
 * be closed after the server closed it: dropbear 2022.83 drops the whole connection when
 * a client closes a channel while it still has output or an exit status to send ("Failed
 * assertion … !channel->sent_close"), and it does the same when a second channel is opened
 * while the first one's last packets are in flight. So: give a command that is ending
 * anyway ABORT_SETTLE_MS to close, and only then kill it (kill_tagged) and wait again. */
static int abort_body(lua_State *L)
{
	struct exec *x = lua_touserdata(L, 1);
	x->out.callback = x->err.callback = 0;
	x->out.capture = x->err.capture = 0;
	x->inoff = x->inlen; /* no more stdin: EOF goes out next */
	x->infd = -1;
	x->timed_out = 1; /* each deadline below ends its wait (see on_deadline) */
	x->deadline = fc_now_ms() + ABORT_SETTLE_MS;
	run_io(L, x);
	if (!x->closed && !x->side) {
		x->deadline = fc_now_ms() + KILL_GRACE_MS;
		if (kill_tagged(L, x))
			run_io(L, x);
	}
	if (x->closed)
		finish_channel(L, x);
	return 0;
}

/* Close and free a channel within CLEANUP_MS, without raising. If the peer does not
 * answer in time the transport is cut, and the channel goes with the session (libssh2
 * frees its channels in session_free). */
static void settle_channel(struct session *S, LIBSSH2_CHANNEL **ch)
{
	if (!*ch)
		return;
	int rc;
	NB_SETTLE(S, rc, libssh2_channel_close(*ch));
	NB_SETTLE(S, rc, libssh2_channel_free(*ch));
	if (rc != 0)
		break_transport(S);
	*ch = NULL;
}

/* Release what the body left behind, without raising and within CLEANUP_MS per step. */
static void exec_cleanup(struct exec *x)
{
	settle_channel(x->S, &x->side);
	settle_channel(x->S, &x->ch);
	if (x->signal)
		libssh2_free(x->S->s, x->signal);
	x->signal = NULL;
	fc_buf_free(&x->out.buf);
	fc_buf_free(&x->err.buf);
}

static void read_stdin_opt(lua_State *L, int opts, struct exec *x)
{
	x->infd = -1;
	lua_getfield(L, opts, "stdin");
	if (lua_type(L, -1) == LUA_TSTRING) {
		lua_pushvalue(L, -1); /* fc_keep_string pops it; the pop below takes the other */
		x->in = fc_keep_string(L, opts, &x->inlen); /* alive as long as the options */
	} else if (lua_type(L, -1) == LUA_TNUMBER) {
		x->infd = (int)lua_tointeger(L, -1);
		if (x->infd < 0 || fcntl(x->infd, F_GETFD) < 0)
			fc_error(L, "ssh: exec: stdin: %d is not an open file descriptor", x->infd);
	} else if (!lua_isnil(L, -1)) {
		fc_error(L, "ssh: exec: stdin: string or fd number expected, got %s",
			 luaL_typename(L, -1));
	}
	lua_pop(L, 1);
}

static void read_stream_opts(lua_State *L, int opts, struct stream *st, const char *cb, int capture,
			     size_t max)
{
	lua_getfield(L, opts, cb);
	int has_cb = !lua_isnil(L, -1);
	if (has_cb && !lua_isfunction(L, -1))
		fc_error(L, "ssh: exec: %s: function expected, got %s", cb, luaL_typename(L, -1));
	lua_pop(L, 1);
	st->capture = !has_cb || capture;
	st->max = max;
}

/* Push the command line for arg 2 (argv table or string) after the env prefix and the
 * kill tag (see kill_tagged). The tag comes after the caller's env, so an env entry named
 * FIRECLAW_EXEC_TAG cannot replace it and keep a timed-out command from being killed. */
static void push_command(lua_State *L, int opts, const char *tag)
{
	int base = lua_gettop(L);
	if (!lua_isnoneornil(L, opts)) {
		lua_getfield(L, opts, "env");
		if (lua_istable(L, -1))
			push_env_prefix(L, lua_gettop(L));
		else if (!lua_isnil(L, -1))
			fc_error(L, "ssh: exec: env: table expected, got %s", luaL_typename(L, -1));
		else
			lua_pushliteral(L, "");
		lua_remove(L, -2);
	}
	lua_pushfstring(L, "export FIRECLAW_EXEC_TAG=%s; ", tag);
	if (lua_istable(L, 2))
		push_quoted_argv(L, 2);
	else if (lua_type(L, 2) == LUA_TSTRING)
		lua_pushvalue(L, 2);
	else
		fc_error(L, "ssh: exec: argv table or command string expected, got %s",
			 luaL_typename(L, 2));
	lua_concat(L, lua_gettop(L) - base);
}

static void make_tag(lua_State *L, char *tag, size_t size)
{
	unsigned char r[16];
	if (getrandom(r, sizeof r, 0) != (ssize_t)sizeof r)
		fc_errno_error(L, errno, "ssh: exec: getrandom");
	for (size_t i = 0; i < sizeof r && 2 * i + 2 < size; i++)
		snprintf(tag + 2 * i, 3, "%02x", r[i]);
}

static void read_exec_opts(lua_State *L, int opts, struct exec *x)
{
	x->deadline = -1;
	size_t max = DEFAULT_MAX_CAPTURE;
	int capture = 0;
	if (!lua_isnil(L, opts)) {
		double t = fc_opt_number(L, opts, "timeout", -1);
		if (t >= 0)
			x->deadline = deadline_in(t);
		double m = fc_opt_number(L, opts, "max_capture", DEFAULT_MAX_CAPTURE);
		if (m < 0)
			fc_error(L, "ssh: exec: max_capture must be >= 0");
		max = m > (double)SIZE_MAX / 2 ? SIZE_MAX / 2 : (size_t)m;
		capture = fc_opt_bool(L, opts, "capture", 0);
		x->pty = fc_opt_bool(L, opts, "pty", 0);
		read_stdin_opt(L, opts, x);
		read_stream_opts(L, opts, &x->out, "on_stdout", capture, max);
		read_stream_opts(L, opts, &x->err, "on_stderr", capture, max);
	} else {
		x->out.capture = x->err.capture = 1;
		x->out.max = x->err.max = max;
	}
}

static void push_callback(lua_State *L, int opts, const char *name)
{
	if (lua_isnil(L, opts))
		lua_pushnil(L);
	else
		lua_getfield(L, opts, name);
}

static int l_exec(lua_State *L)
{
	struct session *S = check_open(L, 1);
	const int opts = 3;
	static const char *const known[] = {"stdin",	   "env",	"timeout",
					    "max_capture", "capture",	"pty",
					    "on_stdout",   "on_stderr", NULL};
	lua_settop(L, opts);
	if (!lua_isnil(L, opts))
		luaL_checktype(L, opts, LUA_TTABLE);
	fc_opt_check(L, opts, "ssh: exec", known);
	/* a userdata, so an error while reading options leaks nothing; it owns no resource
	 * until the body runs, and exec_cleanup always runs after the body */
	struct exec *x = lua_newuserdata(L, sizeof *x);
	memset(x, 0, sizeof *x);
	x->S = S;
	x->infd = -1;
	x->err.id = SSH_EXTENDED_DATA_STDERR;
	read_exec_opts(L, opts, x);
	make_tag(L, x->tag, sizeof x->tag);
	push_command(L, opts, x->tag);
	x->cmd = lua_tolstring(L, -1, &x->cmdlen);
	lua_pushcfunction(L, exec_body);
	lua_pushvalue(L, opts + 1);
	push_callback(L, opts, "on_stdout");
	push_callback(L, opts, "on_stderr");
	S->busy = 1;
	x->start = fc_now_ms();
	int rc = lua_pcall(L, 3, 1, 0);
	if (rc != 0 && x->ch && !x->closed) {
		lua_pushcfunction(L, abort_body);
		lua_pushlightuserdata(L, x);
		if (lua_pcall(L, 1, 0, 0) != 0)
			lua_pop(L, 1); /* moot: exec_cleanup copes with what is left */
	}
	S->busy = 0;
	exec_cleanup(x);
	if (rc != 0)
		lua_error(L);
	return 1;
}

/* ---- SFTP ----
 *
 * What a guest sends is data: a get never lets it choose where a file lands, what
 * privileges it carries, how big it gets or how long it takes.
 * - The local target is resolved like cp's: an existing directory (or a name ending in /)
 *   means "into it, under the remote's basename"; a symlink there is not a directory. The
 *   target's directory is opened once; the data goes to a new name in it (O_CREAT|O_EXCL|
 *   O_NOFOLLOW) that is renamed over the target at the end, so a symlink at the target is
 *   replaced, never followed, and a failed get leaves the old target (or nothing).
 * - Its mode is the remote's permission bits & 0777 & ~umask, as cp without -p: never
 *   setuid, setgid or sticky. Run through sudo (euid 0, SUDO_UID and SUDO_GID set), the
 *   file belongs to the sudo user, not root.
 * - max_bytes (default 1 GiB) caps what a get accepts and what a put sends; a file said to
 *   be larger is refused before a byte moves, one that turns out larger is cut off there.
 * - stall (seconds; default FIRECLAW_TRANSFER_STALL_S, else 30): no progress for that long
 *   ends the transfer (sftp-server opening a FIFO nobody writes waits forever).
 * - put sends regular files only (a FIFO's or device's end is not ours to wait for) and
 *   resolves a remote directory target the same way.
 */

#define DEFAULT_MAX_BYTES (1ull << 30)
#define DEFAULT_STALL_S 30.0
#define MAX_BYTES_LIMIT 9007199254740992.0 /* 2^53: exact in a Lua number */
#define CAP_HINT "--max-transfer / max_bytes raises it"
/* libssh2 1.10 pipelines the write requests of one libssh2_sftp_write call (30000 bytes
 * each) and, when one fails, drops the others — one of them possibly half sent, which
 * leaves the SFTP stream out of step: no later request, not even the close, is ever
 * answered. One request per call (at most 30000 bytes) cannot be half sent when its
 * answer comes; under TCG it is no slower. */
#define PUT_CHUNK 30000
#define DISK_HINT                                                                                  \
	"; put a smaller file or make room in the guest (a bigger image: fireclaw image build "    \
	"--size)"

struct xfer {
	struct session *S;
	const char *op;
	const char *from, *to; /* for messages: the source, the (resolved) target */
	const char *src;       /* the source path as given */
	long mode;	       /* -1: from the source */
	unsigned long long max_bytes, done, size;
	unsigned long long room;  /* the guest's free bytes where a put goes */
	char room_text[128];	  /* "2 MiB free of 58 MiB; the file is 3 MiB", or "" */
	double stall_ms, last_ms; /* stall limit, last progress (monotonic ms) */
	long long uid, gid;	  /* owner of a got file; -1: ours */
	LIBSSH2_SFTP *sftp;
	LIBSSH2_SFTP_HANDLE *h;
	int fd, dirfd;
	int tmp_live;
	char tmp[32];
	char base[NAME_MAX + 1];
	char resolved[PATH_MAX];
	char buf[65536];
};

static void human_size(char *out, size_t n, unsigned long long b)
{
	static const char *const units[] = {"bytes", "KiB", "MiB", "GiB", "TiB"};
	double v = (double)b;
	int u = 0;
	while (v >= 1024 && u < 4) {
		v /= 1024;
		u++;
	}
	if (u == 0)
		snprintf(out, n, "%llu bytes", b);
	else if (v == (double)(unsigned long long)v)
		snprintf(out, n, "%.0f %s", v, units[u]);
	else
		snprintf(out, n, "%.1f %s", v, units[u]);
}

static void __attribute__((noreturn, format(printf, 3, 4)))
xfer_fail(lua_State *L, struct xfer *t, const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	fc_error(L, "ssh: %s %s → %s: %s", t->op, t->from, t->to, msg);
}

static void __attribute__((noreturn))
xfer_fail_local(lua_State *L, struct xfer *t, int err, const char *path)
{
	xfer_fail(L, t, "local %s: %s", path, strerror(err));
}

static const char *sftp_status_text(unsigned long code)
{
	switch (code) {
	case LIBSSH2_FX_NO_SUCH_FILE:
	case LIBSSH2_FX_NO_SUCH_PATH:
		return "no such file";
	case LIBSSH2_FX_PERMISSION_DENIED:
		return "permission denied";
	case LIBSSH2_FX_FILE_ALREADY_EXISTS:
		return "file exists";
	case LIBSSH2_FX_WRITE_PROTECT:
		return "read-only file system";
	case LIBSSH2_FX_NO_SPACE_ON_FILESYSTEM:
		return "no space left on device";
	case LIBSSH2_FX_QUOTA_EXCEEDED:
		return "quota exceeded";
	case LIBSSH2_FX_NOT_A_DIRECTORY:
		return "not a directory";
	case LIBSSH2_FX_INVALID_FILENAME:
		return "invalid file name";
	case LIBSSH2_FX_EOF:
		return "unexpected end of file";
	default:
		/* OpenSSH's sftp-server says FAILURE for every errno it has no code for */
		return "the guest's SFTP server reported a failure";
	}
}

/* The SFTP status of the last failed request, 0 when the failure was not one. */
static unsigned long sftp_status(struct xfer *t)
{
	if (t->sftp && libssh2_session_last_errno(t->S->s) == LIBSSH2_ERROR_SFTP_PROTOCOL)
		return libssh2_sftp_last_error(t->sftp);
	return 0;
}

static void __attribute__((noreturn))
xfer_fail_remote(lua_State *L, struct xfer *t, const char *what)
{
	unsigned long code = sftp_status(t);
	const char *remote = t->op[0] == 'g' ? t->from : t->to;
	if (code)
		xfer_fail(L, t, "remote %s: %s", remote, sftp_status_text(code));
	xfer_fail(L, t, "%s: %s (%s)", what, session_errmsg(t->S), t->S->where);
}

static void progress(struct xfer *t)
{
	t->last_ms = fc_now_ms();
}

/* Wait until the socket is ready; raise once nothing moved for the stall limit. */
static void xfer_wait(lua_State *L, struct xfer *t)
{
	if (!wait_socket(L, t->S, t->last_ms + t->stall_ms))
		xfer_fail(
		    L, t,
		    "no progress for %g s: the guest stalled (FIRECLAW_TRANSFER_STALL_S or the "
		    "stall option changes the limit)",
		    t->stall_ms / 1e3);
}

/* A libssh2 SFTP call retried until it stops saying EAGAIN; an answer is progress. */
#define XFER_CALL(L, t, rc, expr)                                                                  \
	do {                                                                                       \
		while (((rc) = (expr)) == LIBSSH2_ERROR_EAGAIN)                                    \
			xfer_wait((L), (t));                                                       \
		progress(t);                                                                       \
	} while (0)

static void __attribute__((noreturn)) too_big(lua_State *L, struct xfer *t, const char *who)
{
	char cap[32];
	human_size(cap, sizeof cap, t->max_bytes);
	xfer_fail(L, t, "%s more than %s (" CAP_HINT ")", who, cap);
}

static void sftp_start(lua_State *L, struct xfer *t)
{
	while (!(t->sftp = libssh2_sftp_init(t->S->s))) {
		if (!is_eagain_ptr(t->S, t->sftp)) {
			int e = libssh2_session_last_errno(t->S->s);
			if (e == LIBSSH2_ERROR_CHANNEL_FAILURE ||
			    e == LIBSSH2_ERROR_CHANNEL_REQUEST_DENIED)
				xfer_fail(L, t,
					  "the server offers no SFTP subsystem (a dropbear guest "
					  "needs /usr/lib/sftp-server)");
			xfer_fail_remote(L, t, "start SFTP");
		}
		xfer_wait(L, t);
	}
	progress(t);
}

static void sftp_open_remote(lua_State *L, struct xfer *t, const char *path, unsigned long flags,
			     long mode)
{
	while (!(t->h = libssh2_sftp_open_ex(t->sftp, path, (unsigned)strlen(path), flags, mode,
					     LIBSSH2_SFTP_OPENFILE))) {
		if (!is_eagain_ptr(t->S, t->h))
			xfer_fail_remote(L, t, "open");
		xfer_wait(L, t);
	}
	progress(t);
}

/* The last component of path (trailing slashes ignored) into out; 0 if it has none that
 * can name a file ("", ".", ".."). */
static int base_name(const char *path, char *out, size_t n)
{
	size_t end = strlen(path);
	while (end > 0 && path[end - 1] == '/')
		end--;
	size_t start = end;
	while (start > 0 && path[start - 1] != '/')
		start--;
	size_t len = end - start;
	if (len == 0 || len >= n || (len == 1 && path[start] == '.') ||
	    (len == 2 && path[start] == '.' && path[start + 1] == '.'))
		return 0;
	memcpy(out, path + start, len);
	out[len] = '\0';
	return 1;
}

/* t->resolved = dir/base (one slash between) and it becomes the target in messages. */
static void set_target(lua_State *L, struct xfer *t, const char *dir, const char *base)
{
	size_t n = strlen(dir);
	const char *sep = n > 0 && dir[n - 1] == '/' ? "" : "/";
	if (snprintf(t->resolved, sizeof t->resolved, "%s%s%s", dir, sep, base) >=
	    (int)sizeof t->resolved)
		xfer_fail(L, t, "target path too long");
	t->to = t->resolved;
}

static void sftp_close_remote(lua_State *L, struct xfer *t)
{
	int rc;
	XFER_CALL(L, t, rc, libssh2_sftp_close_handle(t->h));
	t->h = NULL; /* freed by libssh2 whatever the outcome */
	if (rc < 0)
		xfer_fail_remote(L, t, "close");
}

/* ---- put ---- */

/* Why local file `path` cannot be sent, or NULL (then *fd is open on it, non-blocking
 * for nothing: regular files ignore O_NONBLOCK). stat first: opening a device may act. */
static const char *source_problem(const char *path, unsigned long long max, int *fd,
				  struct stat *st, char *why, size_t n)
{
	char a[32], b[32];
	*fd = -1;
	if (stat(path, st) != 0 && errno == ENOENT)
		return "does not exist";
	if (stat(path, st) != 0) {
		snprintf(why, n, "cannot be read: %s", strerror(errno));
		return why;
	}
	if (S_ISDIR(st->st_mode))
		return "is a directory; directory trees are not supported yet (put a tar archive "
		       "and unpack it in the guest)";
	if (!S_ISREG(st->st_mode))
		return "is not a regular file (a FIFO, device or socket has no end to wait for; "
		       "copy what you need into a file first)";
	if ((unsigned long long)st->st_size > max) {
		human_size(a, sizeof a, (unsigned long long)st->st_size);
		human_size(b, sizeof b, max);
		snprintf(why, n, "is %s, more than %s (" CAP_HINT ")", a, b);
		return why;
	}
	*fd = open(path, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
	if (*fd < 0) {
		snprintf(why, n, "cannot be read: %s", strerror(errno));
		return why;
	}
	if (fstat(*fd, st) != 0 || !S_ISREG(st->st_mode)) {
		close(*fd);
		*fd = -1;
		return "changed while it was opened";
	}
	return NULL;
}

/* The guest's free space where the file goes, asked right after the open (statvfs@openssh.com;
 * skipped when the server lacks it): a file that cannot fit fails before a byte is sent,
 * and a write that fails later is told with these numbers. */
static void check_room(lua_State *L, struct xfer *t)
{
	LIBSSH2_SFTP_STATVFS v;
	memset(&v, 0, sizeof v);
	int rc;
	XFER_CALL(L, t, rc, libssh2_sftp_fstatvfs(t->h, &v));
	if (rc != 0 || v.f_blocks == 0)
		return;
	unsigned long long bs = v.f_frsize ? v.f_frsize : v.f_bsize;
	t->room = (unsigned long long)v.f_bfree * bs; /* sftp-server runs as root: f_bfree */
	human_size(t->room_text, sizeof t->room_text, t->room);
	char total[32], size[32];
	human_size(total, sizeof total, (unsigned long long)v.f_blocks * bs);
	human_size(size, sizeof size, t->size);
	size_t n = strlen(t->room_text);
	snprintf(t->room_text + n, sizeof t->room_text - n, " free of %s; the file is %s", total,
		 size);
	if (t->size > t->room)
		xfer_fail(L, t, "the guest's disk is full (%s)" DISK_HINT, t->room_text);
}

/* After a put's write or close failed. sftp-server has no status code for ENOSPC (it says
 * FAILURE), so a generic failure is told with the room check_room saw. */
static void __attribute__((noreturn)) put_fail(lua_State *L, struct xfer *t, const char *what)
{
	unsigned long code = sftp_status(t);
	char done[32];
	human_size(done, sizeof done, t->done);
	if (t->room_text[0] &&
	    (code == LIBSSH2_FX_FAILURE || code == LIBSSH2_FX_NO_SPACE_ON_FILESYSTEM ||
	     code == LIBSSH2_FX_QUOTA_EXCEEDED))
		xfer_fail(
		    L, t,
		    "the guest stopped writing after %s: its disk is most likely full (before "
		    "the put: %s)" DISK_HINT,
		    done, t->room_text);
	xfer_fail_remote(L, t, what);
}

/* cp's rule for the remote target: an existing directory (or a name ending in /) means
 * "into it, under the local basename". */
static void put_resolve_remote(lua_State *L, struct xfer *t, const char *dest)
{
	size_t n = strlen(dest);
	int into = n > 0 && dest[n - 1] == '/';
	if (!into) {
		LIBSSH2_SFTP_ATTRIBUTES a;
		memset(&a, 0, sizeof a);
		int rc;
		XFER_CALL(L, t, rc,
			  libssh2_sftp_stat_ex(t->sftp, dest, (unsigned)n, LIBSSH2_SFTP_STAT, &a));
		into =
		    rc == 0 && (a.flags & LIBSSH2_SFTP_ATTR_PERMISSIONS) && S_ISDIR(a.permissions);
	}
	if (!into)
		return;
	if (!base_name(t->src, t->base, sizeof t->base))
		xfer_fail(L, t, "local %s has no file name to put into remote directory %s", t->src,
			  dest);
	set_target(L, t, dest, t->base);
}

static void send_all(lua_State *L, struct xfer *t, const char *p, size_t n)
{
	while (n > 0) {
		ssize_t w = libssh2_sftp_write(t->h, p, n);
		if (w == LIBSSH2_ERROR_EAGAIN) {
			xfer_wait(L, t);
			continue;
		}
		if (w < 0)
			put_fail(L, t, "write");
		progress(t);
		t->done += (unsigned long long)w;
		p += w;
		n -= (size_t)w;
	}
}

static int put_body(lua_State *L)
{
	struct xfer *t = lua_touserdata(L, 1);
	const char *dest = lua_tostring(L, 2);
	struct stat st;
	char why[160];
	const char *problem = source_problem(t->src, t->max_bytes, &t->fd, &st, why, sizeof why);
	if (problem)
		xfer_fail(L, t, "local %s %s", t->src, problem);
	t->size = (unsigned long long)st.st_size;
	long mode = t->mode >= 0 ? t->mode : (long)(st.st_mode & 07777);
	sftp_start(L, t);
	put_resolve_remote(L, t, dest);
	sftp_open_remote(L, t, t->to, LIBSSH2_FXF_WRITE | LIBSSH2_FXF_CREAT | LIBSSH2_FXF_TRUNC,
			 mode);
	check_room(L, t);
	for (;;) {
		ssize_t n = read(t->fd, t->buf, PUT_CHUNK);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			xfer_fail_local(L, t, errno, t->src);
		if (n == 0)
			break;
		if ((unsigned long long)n > t->max_bytes - t->done)
			too_big(L, t, "the local file grew to");
		send_all(L, t, t->buf, (size_t)n);
	}
	/* the server's umask applied to the mode given at open: set it exactly */
	LIBSSH2_SFTP_ATTRIBUTES a = {.flags = LIBSSH2_SFTP_ATTR_PERMISSIONS,
				     .permissions = (unsigned long)mode};
	int rc;
	XFER_CALL(L, t, rc, libssh2_sftp_fsetstat(t->h, &a));
	if (rc < 0)
		put_fail(L, t, "chmod");
	XFER_CALL(L, t, rc, libssh2_sftp_close_handle(t->h));
	t->h = NULL; /* freed by libssh2 whatever the outcome */
	if (rc < 0)
		put_fail(L, t, "close");
	return 0;
}

/* ---- get ---- */

/* Open the directory the file will land in (t->dirfd) and the name in it (t->base). */
static void get_resolve_local(lua_State *L, struct xfer *t, const char *dest)
{
	size_t n = strlen(dest);
	if (n == 0 || n >= PATH_MAX)
		xfer_fail(L, t, "local path empty or too long");
	struct stat st;
	int into = dest[n - 1] == '/' || (lstat(dest, &st) == 0 && S_ISDIR(st.st_mode));
	char dir[PATH_MAX];
	if (into) {
		if (!base_name(t->src, t->base, sizeof t->base))
			xfer_fail(L, t,
				  "remote %s has no file name to copy into local directory %s",
				  t->src, dest);
		snprintf(dir, sizeof dir, "%s", dest);
		set_target(L, t, dest, t->base);
	} else {
		if (!base_name(dest, t->base, sizeof t->base))
			xfer_fail(L, t, "local %s names no file", dest);
		const char *slash = strrchr(dest, '/');
		if (!slash)
			snprintf(dir, sizeof dir, ".");
		else if (slash == dest)
			snprintf(dir, sizeof dir, "/");
		else
			snprintf(dir, sizeof dir, "%.*s", (int)(slash - dest), dest);
	}
	t->dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (t->dirfd < 0 && errno == ENOENT)
		xfer_fail(L, t, "local directory %s does not exist (create it first)", dir);
	if (t->dirfd < 0)
		xfer_fail_local(L, t, errno, dir);
}

/* A new file in the target's directory under a random name; never an existing one. */
static void open_local_temp(lua_State *L, struct xfer *t)
{
	for (int i = 0; i < 16; i++) {
		unsigned char r[6];
		if (getrandom(r, sizeof r, 0) != (ssize_t)sizeof r)
			xfer_fail_local(L, t, errno, "temporary name");
		snprintf(t->tmp, sizeof t->tmp, ".fctmp-%02x%02x%02x%02x%02x%02x", r[0], r[1], r[2],
			 r[3], r[4], r[5]);
		t->fd = openat(t->dirfd, t->tmp,
			       O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
		if (t->fd >= 0) {
			t->tmp_live = 1;
			return;
		}
		if (errno != EEXIST)
			xfer_fail_local(L, t, errno, t->to);
	}
	xfer_fail_local(L, t, EEXIST, t->to);
}

/* The remote file's permission bits; refuses anything but a regular file, and one that
 * says it is bigger than the cap (a sparse 100 GiB file costs the guest nothing). */
static long remote_mode(lua_State *L, struct xfer *t)
{
	LIBSSH2_SFTP_ATTRIBUTES a;
	memset(&a, 0, sizeof a);
	int rc;
	XFER_CALL(L, t, rc, libssh2_sftp_fstat(t->h, &a));
	if (rc < 0)
		xfer_fail_remote(L, t, "stat");
	if ((a.flags & LIBSSH2_SFTP_ATTR_PERMISSIONS) && (a.permissions & S_IFMT) &&
	    !S_ISREG(a.permissions))
		xfer_fail(L, t, "remote %s is not a regular file", t->src);
	if ((a.flags & LIBSSH2_SFTP_ATTR_SIZE) && a.filesize > t->max_bytes) {
		char sz[32];
		human_size(sz, sizeof sz, a.filesize);
		char who[64];
		snprintf(who, sizeof who, "the guest's file is %s,", sz);
		too_big(L, t, who);
	}
	return a.flags & LIBSSH2_SFTP_ATTR_PERMISSIONS ? (long)(a.permissions & 0777) : 0644;
}

static void write_all(lua_State *L, struct xfer *t, const char *p, size_t n)
{
	while (n > 0) {
		ssize_t w = write(t->fd, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0)
			xfer_fail_local(L, t, errno, t->to);
		p += w;
		n -= (size_t)w;
	}
}

/* Owner and mode on the descriptor, then the rename that makes it the target. */
static void finish_local(lua_State *L, struct xfer *t, long remote)
{
	mode_t mask = umask(0);
	umask(mask);
	mode_t mode = t->mode >= 0 ? (mode_t)t->mode : (mode_t)remote & 0777 & ~mask;
	if (t->uid >= 0 && fchown(t->fd, (uid_t)t->uid, (gid_t)t->gid) != 0)
		xfer_fail_local(L, t, errno, t->to);
	if (fchmod(t->fd, mode) != 0)
		xfer_fail_local(L, t, errno, t->to);
	int rc = close(t->fd);
	t->fd = -1;
	if (rc != 0)
		xfer_fail_local(L, t, errno, t->to);
	if (renameat(t->dirfd, t->tmp, t->dirfd, t->base) != 0)
		xfer_fail_local(L, t, errno, t->to);
	t->tmp_live = 0;
}

static int get_body(lua_State *L)
{
	struct xfer *t = lua_touserdata(L, 1);
	get_resolve_local(L, t, lua_tostring(L, 2));
	sftp_start(L, t);
	sftp_open_remote(L, t, t->src, LIBSSH2_FXF_READ, 0);
	long mode = remote_mode(L, t);
	open_local_temp(L, t);
	for (;;) {
		ssize_t n = libssh2_sftp_read(t->h, t->buf, sizeof t->buf);
		if (n == LIBSSH2_ERROR_EAGAIN) {
			xfer_wait(L, t);
			continue;
		}
		if (n < 0)
			xfer_fail_remote(L, t, "read");
		if (n == 0)
			break;
		progress(t);
		if ((unsigned long long)n > t->max_bytes - t->done)
			too_big(L, t, "the guest sent");
		t->done += (unsigned long long)n;
		write_all(L, t, t->buf, (size_t)n);
	}
	sftp_close_remote(L, t);
	finish_local(L, t, mode);
	return 0;
}

/* Let the server end the SFTP channel before we free it: send EOF, then drain until the
 * server's EOF arrives (sftp-server has exited). Dropbear 2022.83 drops the whole
 * connection when the client closes a channel whose last packets are still in flight,
 * which showed as the next exec failing with "Failed waiting for channel success". */
static void sftp_drain_channel(struct session *S, LIBSSH2_SFTP *sftp)
{
	LIBSSH2_CHANNEL *ch = libssh2_sftp_get_channel(sftp);
	if (!ch)
		return;
	int rc;
	NB_SETTLE(S, rc, libssh2_channel_send_eof(ch));
	if (rc != 0)
		return;
	double deadline = fc_now_ms() + CLEANUP_MS;
	char buf[512];
	while (!libssh2_channel_eof(ch)) {
		ssize_t n = libssh2_channel_read(ch, buf, sizeof buf);
		if (n == LIBSSH2_ERROR_EAGAIN) {
			if (!wait_socket_quietly(S, deadline))
				return;
		} else if (n < 0) {
			return;
		}
	}
}

/* Release handles, fds and temp file, without raising and within CLEANUP_MS each. */
static void xfer_cleanup(struct xfer *t)
{
	int rc;
	if (t->h) {
		NB_SETTLE(t->S, rc, libssh2_sftp_close_handle(t->h));
		if (rc == LIBSSH2_ERROR_TIMEOUT)
			break_transport(t->S); /* the retry below then fails fast and frees */
		if (rc == LIBSSH2_ERROR_TIMEOUT)
			NB_SETTLE(t->S, rc, libssh2_sftp_close_handle(t->h));
	}
	if (t->sftp) {
		sftp_drain_channel(t->S, t->sftp);
		NB_SETTLE(t->S, rc, libssh2_sftp_shutdown(t->sftp));
		if (rc == LIBSSH2_ERROR_TIMEOUT) {
			break_transport(t->S);
			NB_SETTLE(t->S, rc, libssh2_sftp_shutdown(t->sftp));
		}
	}
	t->h = NULL;
	t->sftp = NULL;
	if (t->fd >= 0)
		close(t->fd);
	t->fd = -1;
	if (t->tmp_live)
		unlinkat(t->dirfd, t->tmp, 0);
	t->tmp_live = 0;
	if (t->dirfd >= 0)
		close(t->dirfd);
	t->dirfd = -1;
}

/* ---- options ---- */

/* fc_error formats like lua_pushfstring (no %g, %lo): these messages need printf's. */
static void __attribute__((noreturn, format(printf, 2, 3)))
opt_fail(lua_State *L, const char *fmt, ...)
{
	char msg[256];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	fc_error(L, "%s", msg);
}

static int parse_id(const char *s, long long *out)
{
	char *end;
	if (!s || *s < '0' || *s > '9')
		return 0;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno || *end || v >= 4294967295ull)
		return 0;
	*out = (long long)v;
	return 1;
}

/* Run through sudo, a got file belongs to the user who ran sudo, not to root. */
static void sudo_owner(lua_State *L, struct xfer *t)
{
	const char *u = getenv("SUDO_UID"), *g = getenv("SUDO_GID");
	if (geteuid() != 0 || (!u && !g))
		return;
	if (!parse_id(u, &t->uid) || !parse_id(g, &t->gid))
		fc_error(L,
			 "ssh: get %s: SUDO_UID/SUDO_GID ('%s', '%s') are not user and group ids; "
			 "unset both to keep the file root's",
			 t->src, u ? u : "", g ? g : "");
}

static double default_stall_s(lua_State *L)
{
	const char *s = getenv("FIRECLAW_TRANSFER_STALL_S");
	if (!s || !*s)
		return DEFAULT_STALL_S;
	char *end;
	double v = strtod(s, &end);
	if (*end || !(v > 0) || v > 1e6)
		opt_fail(L, "FIRECLAW_TRANSFER_STALL_S must be a number of seconds > 0, got '%s'",
			 s);
	return v;
}

/* The 4th argument: a mode (number) or {mode =, max_bytes =, stall =, uid =, gid =}. */
static void read_xfer_opts(lua_State *L, struct xfer *t, int idx)
{
	double mode = -1, max = (double)DEFAULT_MAX_BYTES, stall = -1, uid = -2, gid = -2;
	if (lua_type(L, idx) == LUA_TNUMBER) {
		mode = lua_tonumber(L, idx);
	} else if (lua_istable(L, idx)) {
		mode = fc_opt_number(L, idx, "mode", -1);
		max = fc_opt_number(L, idx, "max_bytes", max);
		stall = fc_opt_number(L, idx, "stall", -1);
		uid = fc_opt_number(L, idx, "uid", -2);
		gid = fc_opt_number(L, idx, "gid", -2);
	} else if (!lua_isnoneornil(L, idx)) {
		luaL_argerror(L, idx, "mode or options table expected");
	}
	long maxmode = t->op[0] == 'g' ? 0777 : 07777;
	if (mode != -1 && (mode < 0 || mode > maxmode || mode != (long)mode))
		opt_fail(L, "ssh: %s: bad mode %g (0 to 0%lo%s)", t->op, mode, maxmode,
			 maxmode == 0777 ? ": a got file is never setuid, setgid or sticky" : "");
	if (!(max >= 0 && max <= MAX_BYTES_LIMIT) || max != (double)(unsigned long long)max)
		opt_fail(L, "ssh: %s: max_bytes must be a byte count, got %g", t->op, max);
	if (stall != -1 && !(stall > 0 && stall <= 1e6))
		opt_fail(L, "ssh: %s: stall must be seconds > 0, got %g", t->op, stall);
	if ((uid == -2) != (gid == -2) ||
	    (uid != -2 && (uid < -1 || uid >= 4294967295.0 || gid < -1 || gid >= 4294967295.0 ||
			   uid != (long long)uid || gid != (long long)gid)))
		fc_error(L, "ssh: %s: uid and gid go together, as ids (or -1: ours)", t->op);
	t->mode = (long)mode;
	t->max_bytes = (unsigned long long)max;
	t->stall_ms = (stall == -1 ? default_stall_s(L) : stall) * 1e3;
	t->uid = t->gid = -1;
	if (uid != -2) {
		t->uid = (long long)uid;
		t->gid = (long long)gid;
	} else if (t->op[0] == 'g') {
		sudo_owner(L, t);
	}
}

static int run_xfer(lua_State *L, lua_CFunction body, const char *op)
{
	struct session *S = check_open(L, 1);
	const char *a = luaL_checkstring(L, 2), *b = luaL_checkstring(L, 3);
	lua_settop(L, 4);
	struct xfer *t = lua_newuserdata(L, sizeof *t);
	int ud = lua_gettop(L);
	memset(t, 0, sizeof *t);
	t->S = S;
	t->op = op;
	t->from = t->src = a;
	t->to = b;
	t->fd = t->dirfd = -1;
	read_xfer_opts(L, t, 4);
	progress(t);
	lua_pushcfunction(L, body);
	lua_pushvalue(L, ud);
	lua_pushvalue(L, 3);
	S->busy = 1;
	int rc = lua_pcall(L, 2, 0, 0);
	S->busy = 0;
	xfer_cleanup(t);
	if (rc != 0)
		lua_error(L);
	lua_pushstring(L, t->to);
	return 1;
}

/* session:put(local, remote [, mode | opts]) -> the remote path written; mode defaults to
 * the local file's */
static int l_put(lua_State *L)
{
	return run_xfer(L, put_body, "put");
}

/* session:get(remote, local [, mode | opts]) -> the local path written; mode defaults to
 * the remote file's & 0777 & ~umask */
static int l_get(lua_State *L)
{
	return run_xfer(L, get_body, "get");
}

/* ssh.check_source(path [, max_bytes]) -> size | nil, why: can put send this file? */
static int l_check_source(lua_State *L)
{
	const char *path = luaL_checkstring(L, 1);
	double max = luaL_optnumber(L, 2, (double)DEFAULT_MAX_BYTES);
	if (!(max >= 0 && max <= MAX_BYTES_LIMIT))
		luaL_argerror(L, 2, "a byte count expected");
	int fd;
	struct stat st;
	char why[160];
	const char *problem =
	    source_problem(path, (unsigned long long)max, &fd, &st, why, sizeof why);
	if (fd >= 0)
		close(fd);
	if (problem) {
		lua_pushnil(L);
		lua_pushstring(L, problem);
		return 2;
	}
	lua_pushnumber(L, (double)st.st_size);
	return 1;
}

/* ---- module ---- */

int luaopen_fireclaw_ssh(lua_State *L)
{
	static const luaL_Reg methods[] = {
	    {"exec", l_exec},		{"put", l_put}, {"get", l_get}, {"close", l_close},
	    {"__tostring", l_tostring}, {NULL, NULL},
	};
	static const luaL_Reg fns[] = {
	    {"connect", l_connect},
	    {"quote", l_quote},
	    {"check_source", l_check_source},
	    {NULL, NULL},
	};
	/* once per process; libssh2 counts calls, and never freeing it is harmless */
	libssh2_init(0);
	fc_class(L, SESSION_MT, methods);
	lua_newtable(L);
	luaL_register(L, NULL, fns);
	return 1;
}
