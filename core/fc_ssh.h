/* fc_ssh.h - what the files of fireclaw.ssh share: core/ssh.c (the module: session,
 * connect, authentication, host keys), core/fc_ssh_exec.c (quoting, exec: channels,
 * streaming, the kill tag) and core/fc_sftp.c (put/get with their caps). Private to them;
 * the Lua interface is in core/ssh.c's opening comment. */
#ifndef FC_SSH_H
#define FC_SSH_H

#include "fc.h"

#include <libssh2.h>
#include <libssh2_sftp.h>
#include <limits.h>

#define SESSION_MT "fireclaw.ssh.session"

#define DEFAULT_TIMEOUT_S 10.0
#define DEFAULT_MAX_CAPTURE (16u << 20)
/* After an exec timeout, how long the remote command gets to die from the KILL signal. */
#define KILL_GRACE_MS 2000
/* After an error in exec: how long a command that is ending anyway gets before it is killed. */
#define ABORT_SETTLE_MS 100
/* Upper bound for cleanup while an error propagates (channel close, SFTP shutdown, bye). */
#define CLEANUP_MS 1000
#define IO_CHUNK 32768

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

/* ---- session helpers (core/ssh.c) ---- */

/* libssh2's last error text for the session ("unknown error" if none). */
const char *ssh_session_errmsg(struct session *S);
/* A libssh2 call that returns a pointer failed only because it would block. */
int ssh_is_eagain_ptr(struct session *S, const void *p);
/* poll() events for the session socket: the directions libssh2 is blocked on. */
short ssh_socket_events(struct session *S);
/* Add the watched fd to a poll set of n entries (room for one more); returns the new n. */
nfds_t ssh_add_watch(struct session *S, struct pollfd *p, nfds_t n);
/* After a poll over p[0..n): raise if the watched fd fired and the socket is drained. */
void ssh_check_watch(lua_State *L, struct session *S, const struct pollfd *p, nfds_t n);
/* Wait (interruptibly) until libssh2 can make progress or the deadline (monotonic ms, <0:
 * none) passes. Returns 0 on deadline. */
int ssh_wait_socket(lua_State *L, struct session *S, double deadline);
/* The same for cleanup paths: plain poll(), never raises. Returns 0 on deadline. */
int ssh_wait_socket_quietly(struct session *S, double deadline);
/* Deadline (monotonic ms) `seconds` from now; -1 for a negative (no deadline). */
double ssh_deadline_in(double seconds);
/* Raise "ssh: WHERE: MESSAGE[: libssh2's error]" for a connected session. */
void ssh_fail_connected(lua_State *L, struct session *S, const char *fmt, ...)
    __attribute__((noreturn, format(printf, 3, 4)));
/* Free the libssh2 session and close the socket (no goodbye). */
void ssh_drop_transport(struct session *S);
/* Cut the transport when a cleanup could not finish: the session is unusable after. */
void ssh_break_transport(struct session *S);
/* The open session at argument idx (raises if closed or busy). */
struct session *ssh_check_open(lua_State *L, int idx);

/* Call expr until it stops saying EAGAIN, waiting for the socket in between; rc is its
 * last value, or LIBSSH2_ERROR_TIMEOUT when the deadline passed first. */
#define NB_CALL(L, S, deadline, rc, expr)                                                          \
	while (((rc) = (expr)) == LIBSSH2_ERROR_EAGAIN) {                                          \
		if (!ssh_wait_socket((L), (S), (deadline))) {                                      \
			(rc) = LIBSSH2_ERROR_TIMEOUT;                                              \
			break;                                                                     \
		}                                                                                  \
	}

/* The same for cleanup: quiet waits bounded by CLEANUP_MS. */
#define NB_SETTLE(S, rc, expr)                                                                     \
	do {                                                                                       \
		double settle_deadline_ = fc_now_ms() + CLEANUP_MS;                                \
		while (((rc) = (expr)) == LIBSSH2_ERROR_EAGAIN) {                                  \
			if (!ssh_wait_socket_quietly((S), settle_deadline_)) {                     \
				(rc) = LIBSSH2_ERROR_TIMEOUT;                                      \
				break;                                                             \
			}                                                                          \
		}                                                                                  \
	} while (0)

/* ---- SFTP transfers (core/fc_sftp.c, core/fc_sftp_opts.c) ---- */

#define DEFAULT_MAX_BYTES (1ull << 30)
#define DEFAULT_STALL_S 30.0
#define MAX_BYTES_LIMIT 9007199254740992.0 /* 2^53: exact in a Lua number */

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

/* Read put/get's argument idx (a mode, or an options table) into t; raises on bad ones. */
void sftp_read_xfer_opts(lua_State *L, struct xfer *t, int idx);

/* ---- methods and functions of the other files ---- */

int ssh_l_quote(lua_State *L);	      /* ssh.quote (core/fc_ssh_exec.c) */
int ssh_l_exec(lua_State *L);	      /* session:exec (core/fc_ssh_exec.c) */
int ssh_l_put(lua_State *L);	      /* session:put (core/fc_sftp.c) */
int ssh_l_get(lua_State *L);	      /* session:get (core/fc_sftp.c) */
int ssh_l_check_source(lua_State *L); /* ssh.check_source (core/fc_sftp.c) */

#endif
