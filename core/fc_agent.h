/* fc_agent.h - what the files of fireclaw.core.agent share: core/agent.c (the module:
 * connections, the frame reader, hello and hand-off) and core/fc_agent_ops.c (exec, put,
 * get and the loop that drives several of them at once on one connection). The wire
 * format is guest/agent-proto.h; the Lua interface is in core/agent.c's opening comment. */
#ifndef FC_AGENT_H
#define FC_AGENT_H
#include "fc.h"

#include "../guest/agent-proto.h"

#include <limits.h>
#include <signal.h>
#include <termios.h>

#define AGENT_MT "fireclaw.agent.conn"
/* frames the host ignores (for streams it has finished) before it calls the agent broken */
#define AGENT_MAX_STRAY 100000
/* bytes of stale frames skipped while waiting for the hello answer */
#define AGENT_MAX_SKIP (16u << 20)
#define AGENT_DEFAULT_MAX_CAPTURE (16u << 20)
/* after a timeout's KILL, how long the agent gets to report the end */
#define AGENT_KILL_GRACE_MS 2000
/* after a forwarded Ctrl-C, how long the command gets before fireclaw stops it */
#define AGENT_INT_GRACE_MS 2000
/* cleanup after an error: flushing the CLOSE frames */
#define AGENT_CLEANUP_MS 1000

struct agent_conn {
	int fd;
	int lock_fd;  /* the port's lock (agent.attach), or -1 */
	int watch_fd; /* readable once the VMM is gone, or -1 */
	int broken;   /* a protocol error or a lost channel: every call fails */
	int busy;
	uint32_t next_id;
	unsigned long stray;
	int version, agent_pid;
	int reconnects; /* agent.attach's new connections (a hello not answered) */
	unsigned char *in; /* AGP_HDR + AGP_MAX_PAYLOAD */
	size_t inlen;
	struct fc_buf out;
	char watch_msg[160];
	char where[200]; /* "VM 1a2b (port 0)": what every message names */
	char path[108];	 /* agent.attach's socket, for a new connection ("": none) */
	char broken_msg[256];
};

/* One frame as read: header, then payload (pointer into conn->in, valid until the next
 * read). */
struct agent_frame {
	struct agp_hdr h;
	unsigned char *p;
};

/* ---- core/agent.c ---- */

/* Raise "agent: WHERE: MESSAGE" (and mark the connection broken when `broken`). */
void agent_fail(lua_State *L, struct agent_conn *c, int broken, const char *fmt, ...)
    __attribute__((noreturn, format(printf, 4, 5)));
/* Queue a frame (payload a then b). Raises only on out of memory. */
void agent_queue(lua_State *L, struct agent_conn *c, uint32_t stream, uint8_t type, const void *a,
		 size_t alen, const void *b, size_t blen);
/* Write what is queued without waiting: 0, or -1 (errno) when the channel is gone. */
int agent_flush(struct agent_conn *c);
/* Take the next whole frame out of the input buffer: 1 (f filled), 0 (need more bytes);
 * a frame that breaks the protocol raises. */
int agent_next_frame(lua_State *L, struct agent_conn *c, struct agent_frame *f, size_t *consumed);
/* Read what the channel has (non-blocking): 0, or raises when it closed. */
void agent_read(lua_State *L, struct agent_conn *c);
/* The open connection at idx (raises if closed, broken or busy). */
struct agent_conn *agent_check(lua_State *L, int idx);

/* ---- core/fc_agent_ops.c ---- */

int agent_l_exec(lua_State *L);	 /* conn:exec(argv, opts) */
int agent_l_put(lua_State *L);	 /* conn:put(local, remote, opts) */
int agent_l_get(lua_State *L);	 /* conn:get(remote, local, opts) */
int agent_l_batch(lua_State *L); /* conn:batch{ {exec = argv, ...}, {get = …}, … } */
int agent_l_mkdir(lua_State *L); /* conn:mkdir(path [, mode]) */
int agent_l_list(lua_State *L);	 /* conn:list(path) -> entries */

/* ---- operations (core/fc_agent_ops.c: the loop and exec; core/fc_agent_files.c: put, get,
 * mkdir, list) ---- */

#define MAX_OPS 32

enum op_kind { OP_EXEC, OP_PUT, OP_GET, OP_MKDIR, OP_LIST };

struct op {
	enum op_kind kind;
	uint32_t id;
	int done;
	double t0;
	unsigned char *req; /* the request frame's payload */
	size_t reqlen;
	uint64_t window; /* bytes we may still send */
	/* exec */
	const char *in_data;
	size_t in_len, in_off;
	int in_fd, in_eof_sent;
	int cb_out, cb_err, capture;
	size_t max_capture;
	struct fc_buf out, err;
	int out_trunc, err_trunc, out_eof, err_eof, exited, status, signo;
	double deadline, kill_deadline, int_deadline;
	int timed_out, interrupted, forward_int;
	/* put / get */
	int fd, dirfd, tmp_live, got_file, data_end;
	long mode;
	unsigned long long max_bytes, size, moved;
	double stall_ms, last_ms;
	long long uid, gid;
	unsigned remote_mode;
	char tmp[32], base[NAME_MAX + 1];
	char src[PATH_MAX], dst[PATH_MAX], result[PATH_MAX];
	/* list: the entries so far, a Lua table (registry reference) */
	int entries_ref;
	unsigned long nentries;
};

struct batch {
	struct agent_conn *c;
	int n;
	int conn_ref;
	/* an exec's local terminal (opts.tty): raw while the batch runs, its size followed */
	int tty, tty_op;
	struct fc_rawtty rawtty;
	struct op ops[MAX_OPS];
};

/* Raise "agent: WHERE: <op> PATH: MESSAGE" for a failed put/get/mkdir/list. */
void agent_op_fail(lua_State *L, struct batch *b, struct op *o, const char *fmt, ...)
    __attribute__((noreturn, format(printf, 4, 5)));
/* A new batch on the connection at conn_idx, pushed (its __gc releases the operations). */
struct batch *agent_new_batch(lua_State *L, int conn_idx);
struct op *agent_add_op(lua_State *L, struct batch *b, enum op_kind kind);
/* o->src, o->dst from the strings at a and bidx. */
void agent_set_paths(lua_State *L, struct op *o, int a, int bidx);
/* Drive the batch at idx to its end under pcall; on an error, abort what is unfinished. */
void agent_run(lua_State *L, int idx);
void agent_push_result(lua_State *L, struct op *o);
void agent_release_ops(lua_State *L, struct batch *b);
/* core/fc_agent_files.c */
void agent_build_put(lua_State *L, struct op *o, int t);
void agent_build_get(lua_State *L, struct op *o, int t);
void agent_get_finish(lua_State *L, struct batch *b, struct op *o);
void agent_on_get_frame(lua_State *L, struct batch *b, struct op *o, struct agent_frame *f);
void agent_on_entry(lua_State *L, struct batch *b, struct op *o, struct agent_frame *f);

#endif
