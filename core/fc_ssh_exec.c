/* fc_ssh_exec.c - fireclaw.ssh: ssh.quote and session:exec (channels, streaming output to
 * callbacks and captures, stdin, timeouts and the kill tag). See core/ssh.c. */
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
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <termios.h>
#include <unistd.h>

#include <libssh2.h>
#include <libssh2_sftp.h>

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
int ssh_l_quote(lua_State *L)
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
	char term[32];
	unsigned cols, rows;
	/* tty: the local terminal (opts.tty) raw for the exec, its size followed (SIGWINCH) */
	int tty, resize_pending;
	struct fc_rawtty rawtty;
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

/* ---- the local terminal (opts.tty) ----
 *
 * An interactive exec (fireclaw run -it, shell, exec -it) puts the local terminal in raw
 * mode (fc_rawtty: every key goes to the guest's PTY). It is restored by exec_cleanup,
 * which runs on every way out of exec (errors, interrupts). While it is raw, a SIGWINCH
 * makes the pipe the exec polls readable, and the new size goes to the guest as a
 * window-change request. */
static void tty_size(int fd, unsigned *cols, unsigned *rows)
{
	struct winsize ws;
	if (ioctl(fd, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0 && ws.ws_row > 0) {
		*cols = ws.ws_col;
		*rows = ws.ws_row;
	}
}

/* Send the terminal's new size once SIGWINCH said it changed. Returns 1 on progress. */
static int pump_resize(lua_State *L, struct exec *x)
{
	if (!x->resize_pending)
		return 0;
	int rc = libssh2_channel_request_pty_size_ex(x->ch, (int)x->cols, (int)x->rows, 0, 0);
	if (rc == LIBSSH2_ERROR_EAGAIN)
		return 0;
	(void)L; /* a refused resize is not worth ending the command for */
	x->resize_pending = 0;
	return 1;
}

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
			 x->S->where, what, ssh_session_errmsg(x->S));
	fc_error(L, "ssh: %s: exec: %s: %s", x->S->where, what, ssh_session_errmsg(x->S));
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
		progress = pump_resize(L, x);
		progress |= pump_stdin(L, x);
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

/* Whether libssh2 already holds what the next pump needs, so that the socket may never
 * wake us for it: every libssh2 read or write first processes the packets that have
 * arrived, so a drain may take in the window adjust a blocked stdin write waits for, and a
 * write may queue stdout data, after the call that would have used it said EAGAIN. */
static int ready_in_libssh2(struct exec *x)
{
	if (libssh2_poll_channel_read(x->ch, 0) || libssh2_poll_channel_read(x->ch, 1))
		return 1;
	int outbound = libssh2_session_block_directions(x->S->s) & LIBSSH2_SESSION_BLOCK_OUTBOUND;
	return !x->eof_sent && x->inoff < x->inlen && !outbound &&
	       libssh2_channel_window_write(x->ch) > 0;
}

/* Wait for the socket (and the stdin fd when its buffer is empty). 0 on deadline. */
static int wait_exec(lua_State *L, struct exec *x)
{
	if (ready_in_libssh2(x))
		return fc_ms_left(x->deadline) != 0;
	struct pollfd p[4] = {{.fd = x->S->fd, .events = POLLIN | ssh_socket_events(x->S)}};
	nfds_t n = 1, in_at = 0, winch_at = 0;
	int in = x->infd >= 0 && !x->in_eof && !x->eof_sent && x->inoff >= x->inlen;
	if (in) {
		in_at = n;
		p[n++] = (struct pollfd){.fd = x->infd, .events = POLLIN};
	}
	if (x->rawtty.winch) {
		winch_at = n;
		p[n++] = (struct pollfd){.fd = fc_rawtty_winch_fd(), .events = POLLIN};
	}
	n = ssh_add_watch(x->S, p, n);
	int left = fc_ms_left(x->deadline);
	if (left == 0)
		return 0;
	int r = fc_poll(L, p, n, left);
	if (in && p[in_at].revents)
		x->in_ready = 1;
	if (winch_at && p[winch_at].revents) {
		fc_rawtty_winch_drain();
		tty_size(x->tty, &x->cols, &x->rows);
		x->resize_pending = 1;
	}
	ssh_check_watch(L, x->S, p, n);
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
		if (!ssh_is_eagain_ptr(S, x->side) || !ssh_wait_socket(L, S, x->deadline))
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
		if (!ssh_is_eagain_ptr(S, x->ch))
			exec_fail(L, x, "open channel");
		if (!ssh_wait_socket(L, S, x->deadline)) {
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
			libssh2_channel_request_pty_ex(x->ch, x->term, (unsigned)strlen(x->term),
						       NULL, 0, (int)x->cols, (int)x->rows, 0, 0));
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
	if (x->tty >= 0)
		fc_rawtty_start(L, &x->rawtty, x->tty, "ssh: exec");
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
		ssh_break_transport(S);
	*ch = NULL;
}

/* Release what the body left behind, without raising and within CLEANUP_MS per step. */
static void exec_cleanup(struct exec *x)
{
	fc_rawtty_end(&x->rawtty);
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
	st->max = st->buf.max = max; /* never more memory than the cap */
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

/* pty = true | {term = "xterm", cols = 80, rows = 24}; tty = fd of the local terminal:
 * raw for the exec, its size is the PTY's and follows it (implies a PTY). */
static void read_pty_opts(lua_State *L, int opts, struct exec *x)
{
	snprintf(x->term, sizeof x->term, "xterm");
	x->cols = 80;
	x->rows = 24;
	x->tty = -1;
	lua_getfield(L, opts, "pty");
	if (lua_istable(L, -1)) {
		int t = lua_gettop(L);
		static const char *const known[] = {"term", "cols", "rows", NULL};
		fc_opt_check(L, t, "ssh: exec: pty", known);
		const char *term = fc_opt_string(L, t, "term", "xterm");
		if (!*term || strlen(term) >= sizeof x->term || strpbrk(term, " \t\n"))
			fc_error(L, "ssh: exec: pty.term: a short terminal name expected");
		snprintf(x->term, sizeof x->term, "%s", term);
		double c = fc_opt_number(L, t, "cols", 80), r = fc_opt_number(L, t, "rows", 24);
		if (c < 1 || c > 10000 || r < 1 || r > 10000)
			fc_error(L, "ssh: exec: pty.cols/rows must be 1 to 10000");
		x->cols = (unsigned)c;
		x->rows = (unsigned)r;
		x->pty = 1;
	} else {
		x->pty = lua_toboolean(L, -1);
	}
	lua_pop(L, 1);
	lua_getfield(L, opts, "tty");
	if (!lua_isnil(L, -1)) {
		if (lua_type(L, -1) != LUA_TNUMBER)
			fc_error(L, "ssh: exec: tty: fd number expected, got %s",
				 luaL_typename(L, -1));
		x->tty = (int)lua_tointeger(L, -1);
		if (!isatty(x->tty))
			fc_error(L, "ssh: exec: tty: %d is not a terminal", x->tty);
		x->pty = 1;
		tty_size(x->tty, &x->cols, &x->rows);
	}
	lua_pop(L, 1);
}

static void read_exec_opts(lua_State *L, int opts, struct exec *x)
{
	x->deadline = -1;
	size_t max = DEFAULT_MAX_CAPTURE;
	int capture = 0;
	if (!lua_isnil(L, opts)) {
		double t = fc_opt_number(L, opts, "timeout", -1);
		if (t >= 0)
			x->deadline = ssh_deadline_in(t);
		double m = fc_opt_number(L, opts, "max_capture", DEFAULT_MAX_CAPTURE);
		if (m < 0)
			fc_error(L, "ssh: exec: max_capture must be >= 0");
		max = m > (double)SIZE_MAX / 2 ? SIZE_MAX / 2 : (size_t)m;
		capture = fc_opt_bool(L, opts, "capture", 0);
		read_pty_opts(L, opts, x);
		read_stdin_opt(L, opts, x);
		read_stream_opts(L, opts, &x->out, "on_stdout", capture, max);
		read_stream_opts(L, opts, &x->err, "on_stderr", capture, max);
	} else {
		x->out.capture = x->err.capture = 1;
		x->out.max = x->err.max = x->out.buf.max = x->err.buf.max = max;
	}
}

static void push_callback(lua_State *L, int opts, const char *name)
{
	if (lua_isnil(L, opts))
		lua_pushnil(L);
	else
		lua_getfield(L, opts, name);
}

int ssh_l_exec(lua_State *L)
{
	struct session *S = ssh_check_open(L, 1);
	const int opts = 3;
	static const char *const known[] = {"stdin", "env", "timeout",	 "max_capture", "capture",
					    "pty",   "tty", "on_stdout", "on_stderr",	NULL};
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
	x->tty = -1;
	snprintf(x->term, sizeof x->term, "xterm");
	x->cols = 80;
	x->rows = 24;
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
