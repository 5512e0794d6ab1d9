/* fc_agent_ops.c - fireclaw.core.agent: exec over the agent's channel, and the loop that
 * drives any number of operations at once on one connection (conn:batch); put, get, mkdir
 * and list are built and finished in core/fc_agent_files.c. See
 * core/agent.c for the interface and guest/agent-proto.h for the frames.
 *
 * A call builds its operations in a userdata (so that whatever raises, its files, temp
 * files and Lua references are released by its cleanup), runs the loop under lua_pcall,
 * and on an error tells the agent to abort what is unfinished (CLOSE: the command's process
 * group is killed, a half-written file removed) before the error goes on.
 *
 * Files from the guest are data: a got file is written to a new temporary file
 * (O_EXCL|O_NOFOLLOW) in the target's directory and renamed over the target at the end,
 * its mode the guest's permission bits & 0777 & ~umask (or opts.mode), its size capped by
 * max_bytes (announced and actual), a transfer making no progress for `stall` s fails, and
 * nothing partial is left behind. These are the SFTP path's rules (core/fc_sftp.c).
 */
#include "fc_agent.h"
#include "fc_ssh.h" /* struct xfer + sftp_read_xfer_opts: the same put/get options */

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <termios.h>
#include <unistd.h>

#define PING_MS 1000
#define DEAD_MS 10000
#define BATCH_MT "fireclaw.agent.batch"

/* ---- failures ---- */

void __attribute__((noreturn, format(printf, 4, 5)))
agent_op_fail(lua_State *L, struct batch *b, struct op *o, const char *fmt, ...)
{
	char msg[400];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	if (o->kind == OP_EXEC)
		agent_fail(L, b->c, 0, "%s", msg);
	static const char *const names[] = {"exec", "put", "get", "mkdir", "list"};
	agent_fail(L, b->c, 0, "%s %.200s: %s", names[o->kind], o->src, msg);
}

/* The guest's text, printable and short, for a message. */
static void guest_text(char *out, size_t n, const unsigned char *p, size_t len)
{
	if (len > 200)
		len = 200;
	snprintf(out, n, "%.*s", (int)len, (const char *)p);
	for (char *q = out; *q; q++)
		if ((unsigned char)*q < 32 || (unsigned char)*q > 126)
			*q = '?';
}

/* ---- cleanup (never raises) ---- */

static void op_release(lua_State *L, struct op *o)
{
	if (o->tmp_live && o->dirfd >= 0)
		unlinkat(o->dirfd, o->tmp, 0);
	o->tmp_live = 0;
	if (o->fd >= 0)
		close(o->fd);
	if (o->dirfd >= 0)
		close(o->dirfd);
	o->fd = o->dirfd = -1;
	if (o->cb_out != LUA_NOREF)
		luaL_unref(L, LUA_REGISTRYINDEX, o->cb_out);
	if (o->cb_err != LUA_NOREF)
		luaL_unref(L, LUA_REGISTRYINDEX, o->cb_err);
	o->cb_out = o->cb_err = LUA_NOREF;
	if (o->entries_ref != LUA_NOREF)
		luaL_unref(L, LUA_REGISTRYINDEX, o->entries_ref);
	o->entries_ref = LUA_NOREF;
	fc_buf_free(&o->out);
	fc_buf_free(&o->err);
	free(o->req);
	o->req = NULL;
}

void agent_release_ops(lua_State *L, struct batch *b)
{
	for (int i = 0; i < b->n; i++)
		op_release(L, &b->ops[i]);
	b->n = 0;
}

static int batch_gc(lua_State *L)
{
	struct batch *b = lua_touserdata(L, 1);
	fc_rawtty_end(&b->rawtty);
	agent_release_ops(L, b);
	if (b->conn_ref != LUA_NOREF)
		luaL_unref(L, LUA_REGISTRYINDEX, b->conn_ref);
	b->conn_ref = LUA_NOREF;
	return 0;
}

/* After an error: abort what is unfinished in the guest, flushing for at most
 * AGENT_CLEANUP_MS; a channel that cannot take it is broken. */
static void abort_unfinished(struct batch *b)
{
	struct agent_conn *c = b->c;
	for (int i = 0; i < b->n; i++) {
		struct op *o = &b->ops[i];
		if (o->done || !o->id)
			continue;
		unsigned char h[AGP_HDR];
		agp_hdr_encode(h, 0, o->id, AGP_T_CLOSE);
		if (fc_buf_append(&c->out, (const char *)h, AGP_HDR) != 0)
			c->broken = 1;
	}
	double deadline = fc_now_ms() + AGENT_CLEANUP_MS;
	while (c->out.len && !c->broken) {
		if (agent_flush(c) < 0)
			break;
		if (!c->out.len)
			break;
		struct pollfd p = {.fd = c->fd, .events = POLLOUT};
		if (poll(&p, 1, fc_ms_left(deadline)) <= 0)
			break;
	}
	if (c->out.len && !c->broken) {
		c->broken = 1;
		snprintf(c->broken_msg, sizeof c->broken_msg,
			 "the channel did not take the abort of an operation");
	}
}

/* ---- building the operations ---- */

static void op_init(struct op *o, enum op_kind kind)
{
	memset(o, 0, sizeof *o);
	o->kind = kind;
	o->in_fd = o->fd = o->dirfd = -1;
	o->cb_out = o->cb_err = o->entries_ref = LUA_NOREF;
	o->deadline = o->kill_deadline = o->int_deadline = -1;
	o->t0 = fc_now_ms();
}

/* Append s (n bytes) and, with `nul`, a NUL to the request being built in r. The op owns
 * the buffer from its first byte on (o->req follows r's data), so a raise anywhere while
 * building leaks nothing: the batch's __gc frees it. */
static void req_append(lua_State *L, struct op *o, struct fc_buf *r, const char *s, size_t n,
		       int nul)
{
	int bad = fc_buf_append(r, s, n) != 0 || (nul && fc_buf_append(r, "", 1) != 0);
	o->req = (unsigned char *)r->data;
	o->reqlen = r->len;
	if (bad)
		fc_error(L, "agent: exec: the request is too big (over %u bytes)", AGP_MAX_PAYLOAD);
}

/* An argument, variable or directory: a NUL byte in it is refused. */
static void req_add(lua_State *L, struct op *o, struct fc_buf *r, const char *s, size_t n)
{
	if (memchr(s, 0, n))
		fc_error(L, "agent: exec: an argument or variable contains a NUL byte");
	req_append(L, o, r, s, n, 1);
}

static const char *const EXEC_KNOWN[] = {
    "stdin", "on_stdout", "on_stderr", "capture",	 "max_capture", "env", "cwd", "uid",
    "gid",   "timeout",	  "pty",       "forward_sigint", "exec",	"tty", NULL};

/* argv (table at a) then env (the table at t's "env"): NAME=value strings. Returns envc. */
static uint32_t exec_argv_env(lua_State *L, struct op *o, struct fc_buf *r, int a, int argc, int t)
{
	for (int i = 1; i <= argc; i++) {
		lua_rawgeti(L, a, i);
		size_t n;
		const char *s = lua_tolstring(L, -1, &n);
		if (!s || lua_type(L, -1) != LUA_TSTRING)
			fc_error(L, "agent: exec: argv[%d] is not a string", i);
		req_add(L, o, r, s, n);
		lua_pop(L, 1);
	}
	uint32_t envc = 0;
	lua_getfield(L, t, "env");
	if (lua_istable(L, -1)) {
		lua_pushnil(L);
		while (lua_next(L, -2)) {
			if (lua_type(L, -2) != LUA_TSTRING || !lua_tostring(L, -1))
				fc_error(L, "agent: exec: env wants {NAME = value}");
			size_t kn, vn;
			const char *k = lua_tolstring(L, -2, &kn);
			lua_pushvalue(L, -1);
			const char *v = lua_tolstring(L, -1, &vn);
			if (kn == 0 || memchr(k, '=', kn) || memchr(k, 0, kn))
				fc_error(L, "agent: exec: bad environment name '%s'", k);
			if (memchr(v, 0, vn))
				fc_error(L, "agent: exec: bad or too big environment");
			req_append(L, o, r, k, kn, 0);
			req_append(L, o, r, "=", 1, 0);
			req_add(L, o, r, v, vn);
			envc++;
			lua_pop(L, 2);
		}
	}
	lua_pop(L, 1);
	return envc;
}

/* stdin, output callbacks and capture, timeout, Ctrl-C forwarding (the options at t). */
static void exec_io(lua_State *L, struct op *o, int t)
{
	lua_getfield(L, t, "stdin");
	if (lua_type(L, -1) == LUA_TSTRING) {
		o->in_data = fc_keep_string(L, t, &o->in_len);
	} else {
		if (lua_type(L, -1) == LUA_TNUMBER)
			o->in_fd = (int)lua_tointeger(L, -1);
		else if (!lua_isnil(L, -1))
			fc_error(L, "agent: exec: stdin must be a string or an fd");
		lua_pop(L, 1);
	}
	lua_getfield(L, t, "on_stdout");
	o->cb_out =
	    lua_isfunction(L, -1) ? luaL_ref(L, LUA_REGISTRYINDEX) : (lua_pop(L, 1), LUA_NOREF);
	lua_getfield(L, t, "on_stderr");
	o->cb_err =
	    lua_isfunction(L, -1) ? luaL_ref(L, LUA_REGISTRYINDEX) : (lua_pop(L, 1), LUA_NOREF);
	o->capture = fc_opt_bool(L, t, "capture", o->cb_out == LUA_NOREF && o->cb_err == LUA_NOREF);
	o->max_capture = (size_t)fc_opt_number(L, t, "max_capture", AGENT_DEFAULT_MAX_CAPTURE);
	double timeout = fc_opt_number(L, t, "timeout", -1);
	if (timeout > 0)
		o->deadline = o->t0 + timeout * 1e3;
	o->forward_int = fc_opt_bool(L, t, "forward_sigint", 0);
}

/* The exec request for argv (table at a) with the options at t: the fixed part (flags,
 * uid, gid, window, counts), then argv, env and cwd as NUL-terminated strings. */
static void build_exec(lua_State *L, struct op *o, int a, int t)
{
	fc_opt_check(L, t, "agent exec", EXEC_KNOWN);
	int argc = (int)lua_objlen(L, a);
	if (argc < 1 || argc > AGP_MAX_ARGS)
		fc_error(L, "agent: exec wants an argv of 1 to %d strings", AGP_MAX_ARGS);
	struct fc_buf r = {.max = AGP_MAX_PAYLOAD};
	unsigned char fixed[AGP_EXEC_FIXED] = {0};
	req_append(L, o, &r, (const char *)fixed, sizeof fixed, 0);
	uint32_t envc = exec_argv_env(L, o, &r, a, argc, t);
	size_t cn = 0;
	const char *cwd = fc_opt_lstring(L, t, "cwd", "", &cn);
	req_add(L, o, &r, cwd, cn);
	uint32_t flags = 0;
	uint16_t rows = 0, cols = 0;
	lua_getfield(L, t, "pty");
	if (lua_toboolean(L, -1)) {
		flags |= AGP_EXEC_PTY;
		if (lua_istable(L, -1)) {
			rows = (uint16_t)fc_opt_number(L, lua_gettop(L), "rows", 24);
			cols = (uint16_t)fc_opt_number(L, lua_gettop(L), "cols", 80);
		}
	}
	lua_pop(L, 1);
	double uid = fc_opt_number(L, t, "uid", -1), gid = fc_opt_number(L, t, "gid", -1);
	if (uid >= 0) {
		flags |= AGP_EXEC_SETUID;
		if (gid < 0)
			gid = uid;
	}
	unsigned char *p = o->req;
	agp_put32(p, flags);
	agp_put32(p + 4, uid >= 0 ? (uint32_t)uid : 0);
	agp_put32(p + 8, gid >= 0 ? (uint32_t)gid : 0);
	agp_put16(p + 12, rows);
	agp_put16(p + 14, cols);
	agp_put32(p + 16, (uint32_t)argc);
	agp_put32(p + 20, envc);
	exec_io(L, o, t);
}

/* ---- the local terminal (opts.tty) ----
 *
 * An interactive exec (shell, exec -it, run -it) puts the local terminal in raw mode
 * (fc_rawtty: every key goes to the guest's PTY) for the batch's run. agent_run restores
 * it on every way out (the batch's __gc too); a SIGWINCH makes the pipe the loop polls
 * readable, and the new size goes as a RESIZE frame. */

/* The terminal's size changed: tell the guest's PTY (RESIZE: u16 rows, u16 cols). */
static void send_resize(lua_State *L, struct batch *b)
{
	fc_rawtty_winch_drain();
	struct winsize ws;
	struct op *o = &b->ops[b->tty_op];
	if (o->done || ioctl(b->tty, TIOCGWINSZ, &ws) != 0 || !ws.ws_row || !ws.ws_col)
		return;
	unsigned char p[4];
	agp_put16(p, ws.ws_row);
	agp_put16(p + 2, ws.ws_col);
	agent_queue(L, b->c, o->id, AGP_T_RESIZE, p, sizeof p, NULL, 0);
}

/* ---- the loop ---- */

static void deliver(lua_State *L, struct batch *b, struct op *o, int err, const unsigned char *p,
		    size_t n)
{
	struct fc_buf *cap = err ? &o->err : &o->out;
	int *trunc = err ? &o->err_trunc : &o->out_trunc;
	if (o->capture) {
		size_t room = o->max_capture > cap->len ? o->max_capture - cap->len : 0;
		size_t take = n < room ? n : room;
		if (take < n)
			*trunc = 1;
		if (take && fc_buf_append(cap, (const char *)p, take) != 0)
			fc_error(L, "agent: out of memory");
	}
	int ref = err ? o->cb_err : o->cb_out;
	if (ref != LUA_NOREF) {
		lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
		lua_pushlstring(L, (const char *)p, n);
		b->c->busy = 1;
		lua_call(L, 1, 0); /* an error goes on to run()'s cleanup (busy reset there) */
		b->c->busy = 0;
	}
}

static void on_result(lua_State *L, struct batch *b, struct op *o, struct agent_frame *f)
{
	if (f->h.len < 4)
		agent_fail(L, b->c, 1, "the guest sent a short result");
	int err = (int)agp_u32(f->p);
	char msg[256];
	guest_text(msg, sizeof msg, f->p + 4, f->h.len - 4);
	if (err && (o->kind == OP_PUT || o->kind == OP_GET)) {
		/* "PATH: Reason" from the agent -> "remote PATH: reason", as the SFTP path says it
		 */
		char *sep = strrchr(msg, ':');
		if (sep && sep[1] == ' ' && sep[2] >= 'A' && sep[2] <= 'Z')
			sep[2] = (char)(sep[2] - 'A' + 'a');
		agent_op_fail(L, b, o, "remote %s", msg);
	}
	if (err)
		agent_op_fail(L, b, o, "in the guest: %s", msg);
	if (o->kind == OP_EXEC)
		agent_fail(L, b->c, 1, "the guest sent a result for a running command");
	if (o->kind == OP_PUT || o->kind == OP_MKDIR || o->kind == OP_LIST) {
		snprintf(o->result, sizeof o->result, "%s", msg);
		o->done = 1;
		return;
	}
	if (!o->got_file || !o->data_end)
		agent_fail(L, b->c, 1, "the guest ended a get before its data");
	agent_get_finish(L, b, o);
}

static void on_window(lua_State *L, struct batch *b, struct op *o, struct agent_frame *f)
{
	if (f->h.len != 4 || o->kind == OP_GET)
		agent_fail(L, b->c, 1, "the guest sent a bad window frame");
	o->window += agp_u32(f->p);
	if (o->window > 4ull * AGP_WINDOW)
		agent_fail(L, b->c, 1, "the guest opened a window of %llu bytes",
			   (unsigned long long)o->window);
	o->last_ms = fc_now_ms();
}

static void on_exec_frame(lua_State *L, struct batch *b, struct op *o, struct agent_frame *f)
{
	switch (f->h.type) {
	case AGP_T_STDOUT:
	case AGP_T_STDERR: {
		int err = f->h.type == AGP_T_STDERR;
		int *eof = err ? &o->err_eof : &o->out_eof;
		if (*eof)
			agent_fail(L, b->c, 1, "the guest sent output after its end");
		if (f->h.len == 0)
			*eof = 1;
		else
			deliver(L, b, o, err, f->p, f->h.len);
		return;
	}
	case AGP_T_EXIT:
		if (f->h.len != 8)
			agent_fail(L, b->c, 1, "the guest sent a bad exit frame");
		o->status = (int)agp_u32(f->p);
		o->signo = (int)agp_u32(f->p + 4);
		o->exited = o->done = 1;
		return;
	default:
		agent_fail(L, b->c, 1, "the guest sent an unexpected frame (type %u) for a command",
			   f->h.type);
	}
}

static struct op *find_op(struct batch *b, uint32_t id)
{
	for (int i = 0; i < b->n; i++)
		if (b->ops[i].id == id && !b->ops[i].done)
			return &b->ops[i];
	return NULL;
}

static void on_frame(lua_State *L, struct batch *b, struct agent_frame *f)
{
	struct agent_conn *c = b->c;
	struct op *o = f->h.stream ? find_op(b, f->h.stream) : NULL;
	if (f->h.stream == 0) {
		if (f->h.type == AGP_T_RESTART)
			agent_fail(L, c, 1,
				   "the guest agent restarted (was it killed in the guest?): "
				   "what ran on this channel is gone");
		if (f->h.type == AGP_T_ERROR) {
			char msg[256];
			guest_text(msg, sizeof msg, f->p, f->h.len);
			agent_fail(L, c, 1, "the guest agent refused our input: %s", msg);
		}
	}
	if (!o) { /* a PONG, or a frame for something finished: counted */
		if (++c->stray > AGENT_MAX_STRAY)
			agent_fail(L, c, 1, "the guest sent too many stray frames");
		return;
	}
	if (f->h.type == AGP_T_RESULT)
		on_result(L, b, o, f);
	else if (f->h.type == AGP_T_WINDOW)
		on_window(L, b, o, f);
	else if (o->kind == OP_EXEC)
		on_exec_frame(L, b, o, f);
	else if (o->kind == OP_GET)
		agent_on_get_frame(L, b, o, f);
	else if (o->kind == OP_LIST)
		agent_on_entry(L, b, o, f);
	else
		agent_fail(L, c, 1, "the guest sent an unexpected frame (type %u) in a put",
			   f->h.type);
}

/* Queue what the windows allow: stdin given as a string, a put's file. */
static void feed(lua_State *L, struct batch *b, struct op *o)
{
	struct agent_conn *c = b->c;
	if (o->done || c->out.len > 4 * AGP_CHUNK)
		return;
	if (o->kind == OP_EXEC && o->in_fd < 0 && !o->in_eof_sent) {
		while (o->in_off < o->in_len && o->window > 0 && c->out.len <= 4 * AGP_CHUNK) {
			size_t n = o->in_len - o->in_off;
			if (n > AGP_CHUNK)
				n = AGP_CHUNK;
			if (n > o->window)
				n = (size_t)o->window;
			agent_queue(L, c, o->id, AGP_T_STDIN, o->in_data + o->in_off, n, NULL, 0);
			o->in_off += n;
			o->window -= n;
		}
		if (o->in_off == o->in_len) {
			agent_queue(L, c, o->id, AGP_T_STDIN, NULL, 0, NULL, 0);
			o->in_eof_sent = 1;
		}
	} else if (o->kind == OP_PUT && !o->in_eof_sent) {
		char buf[AGP_CHUNK];
		while (o->window > 0 && c->out.len <= 4 * AGP_CHUNK) {
			size_t want = o->window < sizeof buf ? (size_t)o->window : sizeof buf;
			ssize_t r = read(o->fd, buf, want);
			if (r < 0 && errno == EINTR)
				continue;
			if (r < 0)
				agent_op_fail(L, b, o, "%s", strerror(errno));
			if ((unsigned long long)r > o->size - o->moved)
				agent_op_fail(L, b, o, "the file grew while it was sent");
			if (r == 0) {
				if (o->moved != o->size)
					agent_op_fail(L, b, o, "the file shrank while it was sent");
				agent_queue(L, c, o->id, AGP_T_DATA, NULL, 0, NULL, 0);
				o->in_eof_sent = 1;
				return;
			}
			agent_queue(L, c, o->id, AGP_T_DATA, buf, (size_t)r, NULL, 0);
			o->moved += (unsigned long long)r;
			o->window -= (uint64_t)r;
		}
	}
}

/* stdin from an fd: read what the window allows. */
static void feed_fd(lua_State *L, struct batch *b, struct op *o)
{
	char buf[AGP_CHUNK];
	size_t want = o->window < sizeof buf ? (size_t)o->window : sizeof buf;
	ssize_t r = read(o->in_fd, buf, want);
	if (r < 0 && (errno == EINTR || errno == EAGAIN))
		return;
	if (r <= 0) {
		agent_queue(L, b->c, o->id, AGP_T_STDIN, NULL, 0, NULL, 0);
		o->in_eof_sent = 1;
		return;
	}
	agent_queue(L, b->c, o->id, AGP_T_STDIN, buf, (size_t)r, NULL, 0);
	o->window -= (uint64_t)r;
}

static void send_signal(lua_State *L, struct agent_conn *c, struct op *o, int sig)
{
	unsigned char s[4];
	agp_put32(s, (uint32_t)sig);
	agent_queue(L, c, o->id, AGP_T_SIGNAL, s, 4, NULL, 0);
}

/* Deadlines: a timeout's KILL and its grace, a forwarded Ctrl-C's grace, a stalled
 * transfer. Returns the ms until the next one (-1: none). */
static int check_times(lua_State *L, struct batch *b, double now)
{
	double next = -1;
#define NEXT(t) (next = (next < 0 || (t) < next) ? (t) : next)
	for (int i = 0; i < b->n; i++) {
		struct op *o = &b->ops[i];
		if (o->done)
			continue;
		if (o->kind == OP_EXEC) {
			if (o->deadline >= 0 && now >= o->deadline && !o->timed_out) {
				send_signal(L, b->c, o, SIGKILL);
				o->timed_out = 1;
				o->kill_deadline = now + AGENT_KILL_GRACE_MS;
			} else if (o->deadline >= 0 && !o->timed_out) {
				NEXT(o->deadline);
			}
			if (o->kill_deadline >= 0 && now >= o->kill_deadline)
				agent_fail(L, b->c, 1,
					   "the command did not end within %d ms of its "
					   "KILL (the guest agent does not answer)",
					   AGENT_KILL_GRACE_MS);
			if (o->kill_deadline >= 0)
				NEXT(o->kill_deadline);
			if (o->int_deadline >= 0 && now >= o->int_deadline)
				fc_error(L, "interrupted by SIGINT");
			if (o->int_deadline >= 0)
				NEXT(o->int_deadline);
		} else if (o->kind == OP_PUT || o->kind == OP_GET) {
			if (now - o->last_ms >= o->stall_ms)
				agent_op_fail(
				    L, b, o,
				    "no progress for %g s (stalled; FIRECLAW_TRANSFER_STALL_S)",
				    o->stall_ms / 1e3);
			NEXT(o->last_ms + o->stall_ms);
		}
	}
#undef NEXT
	return next < 0 ? -1 : (int)(next - now) + 1;
}

static int all_done(struct batch *b)
{
	for (int i = 0; i < b->n; i++)
		if (!b->ops[i].done)
			return 0;
	return 1;
}

/* Handle every whole frame in the input buffer. */
static void take_frames(lua_State *L, struct batch *b)
{
	struct agent_conn *c = b->c;
	size_t used = 0;
	struct agent_frame f;
	while (!all_done(b) && agent_next_frame(L, c, &f, &used))
		on_frame(L, b, &f);
	memmove(c->in, c->in + used, c->inlen - used);
	c->inlen -= used;
}

static int drive(lua_State *L)
{
	struct batch *b = lua_touserdata(L, 1);
	struct agent_conn *c = b->c;
	for (int i = 0; i < b->n; i++) {
		struct op *o = &b->ops[i];
		o->id = c->next_id++;
		if (c->next_id > 0x7fffffff)
			c->next_id = 1;
		static const uint8_t types[] = {AGP_T_EXEC, AGP_T_PUT, AGP_T_GET, AGP_T_MKDIR,
						AGP_T_LIST};
		uint8_t type = types[o->kind];
		agent_queue(L, c, o->id, type, o->req, o->reqlen, NULL, 0);
		o->last_ms = fc_now_ms();
	}
	if (b->rawtty.winch)
		send_resize(L, b); /* the terminal's size now, right behind the EXEC */
	double last_rx = fc_now_ms(), last_ping = last_rx;
	take_frames(L, b); /* what came with an earlier answer */
	while (!all_done(b)) {
		for (int i = 0; i < b->n; i++)
			feed(L, b, &b->ops[i]);
		if (agent_flush(c) < 0)
			agent_fail(L, c, 1, "writing the channel: %s", strerror(errno));
		double now = fc_now_ms();
		int timeout = check_times(L, b, now);
		if (now - last_rx >= DEAD_MS)
			agent_fail(L, c, 1,
				   "the guest agent has not answered for %d s (was it killed "
				   "in the guest, or is the guest hung?)",
				   DEAD_MS / 1000);
		if (now - last_ping >= PING_MS && now - last_rx >= PING_MS) {
			agent_queue(L, c, 0, AGP_T_PING, "fc", 2, NULL, 0);
			last_ping = now;
			continue;
		}
		int to_ping =
		    (int)(PING_MS - (now - (last_rx > last_ping ? last_rx : last_ping))) + 1;
		if (to_ping < 1)
			to_ping = 1;
		if (timeout < 0 || to_ping < timeout)
			timeout = to_ping;
		struct pollfd p[3 + MAX_OPS];
		int who[3 + MAX_OPS];
		nfds_t n = 0;
		p[n++] = (struct pollfd){.fd = c->fd,
					 .events = (short)(POLLIN | (c->out.len ? POLLOUT : 0))};
		if (c->watch_fd >= 0)
			p[n++] = (struct pollfd){.fd = c->watch_fd, .events = POLLIN};
		nfds_t winch_at = n;
		if (b->rawtty.winch)
			p[n++] = (struct pollfd){.fd = fc_rawtty_winch_fd(), .events = POLLIN};
		nfds_t first_in = n;
		int forward = 0;
		for (int i = 0; i < b->n; i++) {
			struct op *o = &b->ops[i];
			if (o->kind == OP_EXEC && !o->done && o->forward_int && !o->interrupted)
				forward = 1;
			if (o->kind == OP_EXEC && !o->done && o->in_fd >= 0 && !o->in_eof_sent &&
			    o->window > 0 && c->out.len <= 4 * AGP_CHUNK) {
				who[n] = i;
				p[n++] = (struct pollfd){.fd = o->in_fd, .events = POLLIN};
			}
		}
		int r = fc_poll_sigint(L, p, n, timeout, forward);
		if (r == -2) { /* the first Ctrl-C: to the commands, as a terminal would */
			for (int i = 0; i < b->n; i++) {
				struct op *o = &b->ops[i];
				if (o->kind == OP_EXEC && !o->done && o->forward_int) {
					send_signal(L, c, o, SIGINT);
					o->interrupted = 1;
					o->int_deadline = fc_now_ms() + AGENT_INT_GRACE_MS;
				}
			}
			continue;
		}
		if (c->watch_fd >= 0 && p[1].revents && !(p[0].revents & POLLIN))
			agent_fail(L, c, 1, "%s", c->watch_msg);
		if (p[0].revents & POLLOUT && agent_flush(c) < 0)
			agent_fail(L, c, 1, "writing the channel: %s", strerror(errno));
		if (p[0].revents & (POLLIN | POLLHUP | POLLERR)) {
			agent_read(L, c);
			last_rx = fc_now_ms();
			take_frames(L, b);
		}
		if (b->rawtty.winch && p[winch_at].revents)
			send_resize(L, b);
		for (nfds_t i = first_in; i < n; i++)
			if (p[i].revents)
				feed_fd(L, b, &b->ops[who[i]]);
	}
	return 0;
}

/* Run the batch at idx (its operations built) under pcall; on error abort what is left. */
void agent_run(lua_State *L, int idx)
{
	struct batch *b = lua_touserdata(L, idx);
	if (b->tty >= 0)
		fc_rawtty_start(L, &b->rawtty, b->tty, "agent: exec");
	lua_pushcfunction(L, drive);
	lua_pushvalue(L, idx);
	if (lua_pcall(L, 1, 0, 0) != 0) {
		fc_rawtty_end(&b->rawtty);
		b->c->busy = 0;
		abort_unfinished(b);
		lua_error(L);
	}
	fc_rawtty_end(&b->rawtty);
}

struct batch *agent_new_batch(lua_State *L, int conn_idx)
{
	struct agent_conn *c = agent_check(L, conn_idx);
	struct batch *b = lua_newuserdata(L, sizeof *b);
	memset(b, 0, sizeof *b);
	b->c = c;
	b->tty = -1;
	b->conn_ref = LUA_NOREF;
	if (luaL_newmetatable(L, BATCH_MT)) {
		lua_pushcfunction(L, batch_gc);
		lua_setfield(L, -2, "__gc");
	}
	lua_setmetatable(L, -2);
	lua_pushvalue(L, conn_idx);
	b->conn_ref = luaL_ref(L, LUA_REGISTRYINDEX); /* the connection outlives the batch */
	return b;
}

static void push_exec_result(lua_State *L, struct op *o)
{
	lua_createtable(L, 0, 8);
	if (o->exited && !o->signo && !o->timed_out) {
		lua_pushinteger(L, o->status);
		lua_setfield(L, -2, "status");
	}
	if (o->signo) {
		const char *name = sigabbrev_np(o->signo);
		if (name)
			lua_pushstring(L, name);
		else
			lua_pushinteger(L, o->signo);
		lua_setfield(L, -2, "signal");
	}
	if (o->timed_out) {
		lua_pushboolean(L, 1);
		lua_setfield(L, -2, "timed_out");
	}
	if (o->interrupted) {
		lua_pushboolean(L, 1);
		lua_setfield(L, -2, "interrupted");
	}
	if (o->capture) {
		lua_pushlstring(L, o->out.data ? o->out.data : "", o->out.len);
		lua_setfield(L, -2, "stdout");
		lua_pushlstring(L, o->err.data ? o->err.data : "", o->err.len);
		lua_setfield(L, -2, "stderr");
	}
	if (o->out_trunc) {
		lua_pushboolean(L, 1);
		lua_setfield(L, -2, "stdout_truncated");
	}
	if (o->err_trunc) {
		lua_pushboolean(L, 1);
		lua_setfield(L, -2, "stderr_truncated");
	}
	lua_pushnumber(L, fc_now_ms() - o->t0);
	lua_setfield(L, -2, "duration_ms");
}

void agent_push_result(lua_State *L, struct op *o)
{
	if (o->kind == OP_EXEC)
		push_exec_result(L, o);
	else if (o->kind == OP_LIST)
		lua_rawgeti(L, LUA_REGISTRYINDEX, o->entries_ref);
	else
		lua_pushstring(L, o->result);
}

/* Add the operation described at idx to the batch (entry of conn:batch, or the exec / put /
 * get arguments made into one). */
struct op *agent_add_op(lua_State *L, struct batch *b, enum op_kind kind)
{
	if (b->n >= MAX_OPS)
		fc_error(L, "agent: batch: at most %d operations at once", MAX_OPS);
	struct op *o = &b->ops[b->n++];
	op_init(o, kind);
	return o;
}

void agent_set_paths(lua_State *L, struct op *o, int a, int bidx)
{
	snprintf(o->src, sizeof o->src, "%s", luaL_checkstring(L, a));
	snprintf(o->dst, sizeof o->dst, "%s", luaL_checkstring(L, bidx));
	if (!o->src[0] || !o->dst[0])
		fc_error(L, "agent: put/get: empty path");
}

int agent_l_exec(lua_State *L)
{
	agent_check(L, 1);
	luaL_checktype(L, 2, LUA_TTABLE);
	lua_settop(L, 3);
	if (lua_isnil(L, 3)) {
		lua_settop(L, 2);
		lua_newtable(L);
	}
	luaL_checktype(L, 3, LUA_TTABLE);
	struct batch *b = agent_new_batch(L, 1);
	int bi = lua_gettop(L);
	build_exec(L, agent_add_op(L, b, OP_EXEC), 2, 3);
	lua_getfield(L, 3, "pty");
	int pty = lua_toboolean(L, -1);
	lua_pop(L, 1);
	lua_getfield(L, 3, "tty"); /* conn:exec only: a batch has no one terminal */
	if (!lua_isnil(L, -1)) {
		if (!lua_isnumber(L, -1) || !pty)
			fc_error(L, "agent: exec: tty wants an fd (a terminal), with pty");
		b->tty = (int)lua_tointeger(L, -1);
		b->tty_op = 0;
	}
	lua_pop(L, 1);
	agent_run(L, bi);
	agent_push_result(L, &b->ops[0]);
	agent_release_ops(L, b);
	return 1;
}

int agent_l_batch(lua_State *L)
{
	agent_check(L, 1);
	luaL_checktype(L, 2, LUA_TTABLE);
	lua_settop(L, 2);
	struct batch *b = agent_new_batch(L, 1);
	int bi = lua_gettop(L);
	int n = (int)lua_objlen(L, 2);
	for (int i = 1; i <= n; i++) {
		lua_rawgeti(L, 2, i);
		int e = lua_gettop(L);
		luaL_checktype(L, e, LUA_TTABLE);
		lua_getfield(L, e, "exec");
		if (lua_istable(L, -1)) {
			build_exec(L, agent_add_op(L, b, OP_EXEC), lua_gettop(L), e);
			lua_settop(L, bi);
			continue;
		}
		lua_pop(L, 1);
		int kind = -1;
		lua_getfield(L, e, "put");
		if (lua_istable(L, -1))
			kind = OP_PUT;
		else {
			lua_pop(L, 1);
			lua_getfield(L, e, "get");
			if (lua_istable(L, -1))
				kind = OP_GET;
		}
		if (kind < 0)
			fc_error(L,
				 "agent: batch: entry %d wants exec = argv, put = {local, remote} "
				 "or get = {remote, local}",
				 i);
		int pair = lua_gettop(L);
		lua_rawgeti(L, pair, 1);
		lua_rawgeti(L, pair, 2);
		struct op *o = agent_add_op(L, b, (enum op_kind)kind);
		agent_set_paths(L, o, pair + 1, pair + 2);
		lua_newtable(L); /* the transfer's options: the entry's own mode/max_bytes/stall */
		int t = lua_gettop(L);
		static const char *const keys[] = {"mode", "max_bytes", "stall", NULL};
		for (const char *const *k = keys; *k; k++) {
			lua_getfield(L, e, *k);
			lua_setfield(L, t, *k);
		}
		if (kind == OP_PUT)
			agent_build_put(L, o, t);
		else
			agent_build_get(L, o, t);
		lua_settop(L, bi);
	}
	agent_run(L, bi);
	lua_createtable(L, b->n, 0);
	for (int i = 0; i < b->n; i++) {
		agent_push_result(L, &b->ops[i]);
		lua_rawseti(L, -2, i + 1);
	}
	agent_release_ops(L, b);
	return 1;
}
