/* fc_logsink.c - capped logs: the pipes proc.spawn makes for {log = path} outputs, and the
 * log sink itself (`fireclaw --log-sink`), which copies them into capped files.
 * See core/proc.c. */
#include "fc_proc.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/close_range.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

/* ---- capped logs: pipes into a log sink ---- */

/* The pipe into capped log `path`, made on first use (the same path twice is one pipe).
 * Returns its index. */
static int log_pipe(lua_State *L, struct logs *g, const char *path)
{
	for (int i = 0; i < g->n; i++)
		if (strcmp(g->p[i].path, path) == 0)
			return i;
	if (g->n == MAX_LOGS)
		fc_error(L, "proc: at most %d capped logs", MAX_LOGS);
	luaL_checkstack(L, 4, "proc: capped logs");
	struct log_pipe *lp = &g->p[g->n];
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0)
		fc_errno_error(L, errno, "proc: log %s", path);
	lp->file = fc_fd_guard(L, fd);
	int *ends[2];
	proc_guarded_pipe(L, ends);
	lp->rd = ends[0];
	lp->wr = ends[1];
	lp->path = path;
	return g->n++;
}

/* The path of a {log = path} table at idx (misuse raises). */
static const char *log_path_of(lua_State *L, int idx, const char *what)
{
	lua_getfield(L, idx, "log");
	if (!lua_isstring(L, -1))
		fc_error(L, "proc: %s: {log = path} expected", what);
	const char *path = lua_tostring(L, -1); /* anchored by the options table */
	lua_pop(L, 1);
	return path;
}

/* opts[key]: a path (returned), or a capped log {log = path} (its pipe's index in *log). */
const char *proc_read_output(lua_State *L, int t, const char *key, struct logs *g, int *log)
{
	*log = -1;
	lua_getfield(L, t, key);
	if (!lua_istable(L, -1)) {
		lua_pop(L, 1);
		return fc_opt_string(L, t, key, NULL);
	}
	const char *path = log_path_of(L, lua_gettop(L), key);
	lua_pop(L, 1);
	*log = log_pipe(L, g, path);
	return NULL;
}

/* opts.fds: integers (passed as they are) or {log = path} (the write end of that log's
 * pipe, index in log_of[i]; -1 for an integer). */
void proc_read_fds(lua_State *L, int t, struct spawn_req *r, struct logs *g, int *log_of)
{
	lua_getfield(L, t, "fds");
	if (lua_isnil(L, -1)) {
		lua_pop(L, 1);
		return;
	}
	luaL_checktype(L, -1, LUA_TTABLE);
	int tbl = lua_gettop(L), n = (int)lua_objlen(L, tbl);
	if (n > MAX_FDS)
		fc_error(L, "proc: at most %d fds", MAX_FDS);
	for (int i = 1; i <= n; i++) {
		lua_rawgeti(L, tbl, i);
		log_of[i - 1] = -1;
		if (lua_istable(L, -1)) {
			const char *path = log_path_of(L, lua_gettop(L), "fds");
			lua_pop(L, 1);
			log_of[i - 1] = log_pipe(L, g, path);
			continue;
		}
		if (!lua_isnumber(L, -1) || lua_tonumber(L, -1) < 0)
			fc_error(L, "proc: fds[%d] is not a number >= 0 or {log = path}", i);
		r->fds[i - 1] = (int)lua_tointeger(L, -1);
		lua_pop(L, 1);
	}
	r->nfds = n;
	lua_remove(L, tbl); /* the guards log_pipe pushed stay on the stack */
}

/* Start `fireclaw --log-sink CAP PATH…` with the read ends (3, 4, …) and the files after
 * them; ours close. p owns the sink from here on. */
void proc_start_sink(lua_State *L, struct proc *p, struct logs *g, double cap)
{
	struct spawn_req s;
	memset(&s, 0, sizeof s);
	/* every descriptor field "none": a cgroup_fd of 0 would have clone3 create the sink in
	 * whatever cgroup directory descriptor 0 is (a v2 directory as stdin: that one) */
	s.netns_fd = s.in_fd = s.out_fd = s.err_fd = s.cgroup_fd = -1;
	s.uid = s.gid = -1;
	char capstr[32];
	snprintf(capstr, sizeof capstr, "%.0f", cap);
	const char *argv[3 + MAX_LOGS + 1] = {"fireclaw", "--log-sink", capstr};
	for (int i = 0; i < g->n; i++) {
		argv[3 + i] = g->p[i].path; /* names the files in ps (and for leak checks) */
		s.fds[i] = *g->p[i].rd;
		s.fds[g->n + i] = *g->p[i].file;
	}
	argv[3 + g->n] = NULL;
	s.exe = "/proc/self/exe";
	s.argv = argv;
	s.envp = environ;
	s.nfds = 2 * g->n;
	/* not in the child's session, no parent-death signal: it ends at EOF, which comes
	 * when the child dies, so a kept VMM keeps its log */
	s.setsid = 1;
	/* its exec (the dynamic linking of fireclaw, a few ms) overlaps the VMM's start; if it
	 * failed, the VMM's writes to the pipes would fail and only the logs would be lost */
	s.nowait = 1;
	s.vfork = 1; /* (it joins no cgroup: its setsid, descriptors and exec are quick) */
	p->sink = proc_do_spawn(L, &s);
	p->sink_pidfd = pidfd_open(p->sink);
	for (int i = 0; i < g->n; i++) {
		close(fc_fd_release(g->p[i].rd));
		close(fc_fd_release(g->p[i].file));
	}
}

/* Wait up to ms for the sink to finish, then reap it (SIGKILLed first if kill_late).
 * Returns 1 once it is reaped. interruptible: a wait through fc_poll (not from close). */
int proc_sink_reap(lua_State *L, struct proc *p, int ms, int kill_late, int interruptible)
{
	if (p->sink <= 0)
		return 1;
	if (p->sink_pidfd >= 0 && ms > 0) {
		struct pollfd pf = {.fd = p->sink_pidfd, .events = POLLIN};
		if (interruptible) {
			fc_poll(L, &pf, 1, ms);
		} else {
			double deadline = fc_now_ms() + ms;
			while (poll(&pf, 1, fc_ms_left(deadline)) < 0 && errno == EINTR)
				;
		}
	}
	if (waitpid(p->sink, NULL, WNOHANG) == 0) {
		if (!kill_late)
			return 0;
		if (p->sink_pidfd >= 0)
			pidfd_send_signal(p->sink_pidfd, SIGKILL);
		else
			kill(p->sink, SIGKILL);
		while (waitpid(p->sink, NULL, 0) < 0 && errno == EINTR)
			;
	}
	if (p->sink_pidfd >= 0)
		close(p->sink_pidfd);
	p->sink_pidfd = -1;
	p->sink = 0;
	return 1;
}

/* ---- the log sink: `fireclaw --log-sink CAP PATH…` (main.c) ----
 *
 * Copies pipe i (fd 3 + i) into file i (fd 3 + n + i) for n logs, until every pipe is at
 * EOF. A file never grows past CAP bytes: the first half of it is the first bytes of the
 * log, as they came; once the log is longer than CAP, a fixed-size line saying how many
 * bytes were dropped follows, and the rest is the most recent bytes, rewritten from a ring
 * in memory at most every SINK_FLUSH_MS (and at EOF). A reader therefore always sees the
 * start of a boot and the last lines before a failure. The VMM never waits for the disk:
 * the pipe is its only file, and a guest flooding its console only costs this process
 * some copying. Nothing here touches Lua: main.c calls it before any state exists. */

#define SINK_MARK 96
#define SINK_FLUSH_MS 200
#define SINK_CHUNK 65536

struct sink_log {
	int in, out;
	unsigned long long total; /* bytes read so far */
	char *ring;		  /* the last `tail` bytes read */
	size_t ring_len, ring_pos;
	int dirty; /* the file's tail is behind the ring */
};

struct sink {
	size_t cap, head, tail;
	struct sink_log log[MAX_LOGS];
	int n;
};

static void pwrite_all(int fd, const char *d, size_t n, off_t at)
{
	while (n > 0) {
		ssize_t w = pwrite(fd, d, n, at);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return; /* a full disk drops log bytes, never blocks the VMM */
		d += w;
		n -= (size_t)w;
		at += w;
	}
}

static void ring_add(const struct sink *s, struct sink_log *l, const char *d, size_t n)
{
	if (n >= s->tail) {
		memcpy(l->ring, d + n - s->tail, s->tail);
		l->ring_pos = 0;
		l->ring_len = s->tail;
		return;
	}
	size_t first = s->tail - l->ring_pos < n ? s->tail - l->ring_pos : n;
	memcpy(l->ring + l->ring_pos, d, first);
	memcpy(l->ring, d + first, n - first);
	l->ring_pos = (l->ring_pos + n) % s->tail;
	l->ring_len = l->ring_len + n < s->tail ? l->ring_len + n : s->tail;
}

/* The file up to CAP is the log as it came; beyond, only the ring changes. */
static void sink_add(const struct sink *s, struct sink_log *l, const char *d, size_t n)
{
	ring_add(s, l, d, n);
	if (l->total < s->cap) {
		size_t room = s->cap - l->total;
		pwrite_all(l->out, d, n < room ? n : room, (off_t)l->total);
	}
	l->total += n;
	if (l->total > s->cap)
		l->dirty = 1;
}

/* Rewrite the file after its head: the "dropped" line, then the ring, oldest byte first
 * (the ring is full: more than CAP bytes came). The file stays exactly CAP bytes. */
static void sink_flush(const struct sink *s, struct sink_log *l)
{
	if (!l->dirty)
		return;
	char mark[SINK_MARK + 1];
	int k = snprintf(mark, sizeof mark,
			 "\n[fireclaw: %llu bytes dropped here: this log keeps its first %zu and "
			 "last %zu bytes]",
			 l->total - s->head - s->tail, s->head, s->tail);
	if (k < 0 || k > SINK_MARK - 1)
		k = SINK_MARK - 1;
	memset(mark + k, ' ', (size_t)(SINK_MARK - 1 - k));
	mark[SINK_MARK - 1] = '\n';
	off_t at = (off_t)s->head;
	pwrite_all(l->out, mark, SINK_MARK, at);
	at += SINK_MARK;
	pwrite_all(l->out, l->ring + l->ring_pos, s->tail - l->ring_pos, at);
	pwrite_all(l->out, l->ring, l->ring_pos, at + (off_t)(s->tail - l->ring_pos));
	l->dirty = 0;
}

/* Read what pipe i has; at EOF flush and stop reading it. Returns 0 once it is closed. */
static int sink_read(struct sink *s, struct sink_log *l, char *buf)
{
	ssize_t r = read(l->in, buf, SINK_CHUNK);
	if (r > 0) {
		sink_add(s, l, buf, (size_t)r);
		return 1;
	}
	if (r < 0 && (errno == EINTR || errno == EAGAIN))
		return 1;
	sink_flush(s, l);
	close(l->in);
	l->in = -1;
	return 0;
}

static int sink_run(struct sink *s)
{
	static char buf[SINK_CHUNK];
	int open = s->n;
	double flushed = fc_now_ms();
	while (open > 0) {
		struct pollfd p[MAX_LOGS];
		int which[MAX_LOGS], k = 0, dirty = 0;
		for (int i = 0; i < s->n; i++) {
			dirty |= s->log[i].dirty;
			if (s->log[i].in >= 0) {
				p[k] = (struct pollfd){.fd = s->log[i].in, .events = POLLIN};
				which[k++] = i;
			}
		}
		int r = poll(p, (nfds_t)k, dirty ? SINK_FLUSH_MS : -1);
		if (r < 0 && errno != EINTR)
			return 1;
		for (int j = 0; r > 0 && j < k; j++)
			if (p[j].revents && !sink_read(s, &s->log[which[j]], buf))
				open--;
		if (r == 0 || fc_now_ms() - flushed >= SINK_FLUSH_MS) {
			for (int i = 0; i < s->n; i++)
				sink_flush(s, &s->log[i]);
			flushed = fc_now_ms();
		}
	}
	return 0;
}

int fc_log_sink_main(int argc, char **argv)
{
	struct sink s = {.n = argc - 3};
	char *end = NULL;
	unsigned long long cap = argc > 2 ? strtoull(argv[2], &end, 10) : 0;
	if (s.n < 1 || s.n > MAX_LOGS || !end || *end || cap < LOG_CAP_MIN) {
		fprintf(stderr, "fireclaw --log-sink CAP PATH…: fireclaw starts this itself\n");
		return 2;
	}
	s.cap = (size_t)cap;
	s.head = s.cap / 2;
	s.tail = s.cap - s.head - SINK_MARK;
	for (int i = 0; i < s.n; i++) {
		s.log[i].in = 3 + i;
		s.log[i].out = 3 + s.n + i;
		s.log[i].ring = malloc(s.tail);
		if (!s.log[i].ring)
			return 1;
	}
	signal(SIGPIPE, SIG_IGN);
	return sink_run(&s);
}
