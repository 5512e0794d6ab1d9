/* proc.c - fireclaw.proc: processes. Spawn a VMM (in a network namespace, optionally a
 * private mount namespace with bind mounts), run a helper command and capture its output,
 * and find/kill processes by pid *and* start time (records outlive processes; pids are
 * reused).
 *
 *   p = proc.spawn{argv = {...}, env = {K = V}, stdin = path, stdout = path, stderr = path,
 *                  cwd = dir, netns = "fc-1a2b", mounts = {{type = "tmpfs", target = dir},
 *                  {type = "bind", source = s, target = t}}, uid = n, gid = n,
 *                  groups = {gid...}, fds = {fd...}, setsid = true, pdeathsig = true,
 *                  cgroup = {procs_path...}, log_cap = bytes, wait_exec = true, vfork = false}
 *       fds: the child gets these (integer) fds as 3, 4, … in this order; the caller keeps
 *       and closes its own. uid/gid: the child drops to them before exec (supplementary
 *       groups: `groups`, else none); pdeathsig survives the drop. cgroup: the child
 *       writes itself into each of these cgroup.procs files first thing after fork, so it
 *       runs no code of the program outside its cgroups (writing the pid from the parent
 *       after spawn would let it run unlimited for a moment). One cgroup on cgroup v2: the
 *       child is created in it instead (clone3 CLONE_INTO_CGROUP: no write, so no wait for
 *       the RCU grace period a cgroup.procs write takes); where clone3 cannot, as above.
 *       Capped logs: stdout, stderr or an entry of fds may be {log = path}: the child then
 *       writes into a pipe, and a log sink (`fireclaw --log-sink`, a process of its own)
 *       copies the pipe into path, keeping the first half of log_cap bytes (default
 *       1 MiB) and the most recent rest, with a line saying how much was dropped between.
 *       The same path twice is one pipe. The sink ends at EOF, when the child and
 *       whatever it passed the pipe to are gone; it belongs to p (wait, close, detach).
 *       vfork = true: the child shares fireclaw's memory until its exec and fireclaw waits
 *       for that (its cgroup join included): no page tables copied, no copy-on-write faults
 *       afterwards; for a caller with nothing to do meanwhile. Not where clone3 makes the
 *       child in its cgroup (v2): a fork there, which waits for nothing.
 *       wait_exec = false: spawn returns at the fork, not at the exec; p:wait_exec() then
 *       waits for the exec and raises as spawn would have (the child reaped). A caller does
 *       work while the child joins its cgroups and execs (a restore's memory copy).
 *   p:wait_exec() -> true
 *   p:pid()  p:pidfd()  p:alive()  p:kill([sig])  p:wait([timeout_s]) -> {status=|signal=} or nil
 *       (once the process is gone, wait also lets its log sink finish, up to 2 s)
 *   p:sink_pid() -> the log sink's pid, or nil
 *   p:close()   -- kills (SIGKILL) and reaps if still running; never leaves a zombie
 *   p:detach()  -- let it run on after fireclaw (spawn it with pdeathsig = false)
 *   r = proc.run(argv, {stdin = s, cwd =, env =, timeout =, netns =}) -> {status, signal, stdout,
 * stderr, timed_out} proc.starttime(pid) -> clock ticks since boot, or nil if no such process
 *   proc.alive(pid [, starttime]) -> bool
 *   proc.kill(pid, starttime, [sig], [wait_s]) -> true if it was running (and is now gone);
 *       a start time that is not > 0 raises: a pid alone may name any process by now
 *   proc.getpid() -> pid of fireclaw
 *
 * The module is four files sharing core/fc_proc.h: this one (spawn, the process object,
 * proc.run), fc_proc_child.c, fc_logsink.c and fc_proc_pids.c.
 */
#include "fc_proc.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/close_range.h>
#include <linux/magic.h>
#include <linux/sched.h> /* struct clone_args, CLONE_INTO_CGROUP */
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/single_threaded.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

/* ---- parent side ---- */

/* Collect argv from the array at index idx into a NULL-terminated userdata array. */
static const char **check_argv(lua_State *L, int idx)
{
	luaL_checktype(L, idx, LUA_TTABLE);
	int n = (int)lua_objlen(L, idx);
	if (n < 1)
		fc_error(L, "proc: argv is empty");
	const char **argv = lua_newuserdata(L, (size_t)(n + 1) * sizeof *argv);
	for (int i = 1; i <= n; i++) {
		lua_rawgeti(L, idx, i);
		/* a number becomes a string anchored with the argv table (popped here) */
		argv[i - 1] = fc_keep_string(L, idx, NULL);
		if (!argv[i - 1])
			fc_error(L, "proc: argv[%d] is a %s, not a string", i, luaL_typename(L, -1));
	}
	argv[n] = NULL;
	return argv;
}

/* environ plus the K=V pairs of the table at idx (overriding), as a userdata array. */
static char **build_env(lua_State *L, int idx)
{
	if (lua_isnoneornil(L, idx))
		return environ;
	luaL_checktype(L, idx, LUA_TTABLE);
	int n = 0, extra = 0;
	while (environ[n])
		n++;
	lua_pushnil(L);
	while (lua_next(L, idx)) {
		extra++;
		lua_pop(L, 1);
	}
	char **envp = lua_newuserdata(L, (size_t)(n + extra + 1) * sizeof *envp);
	int k = 0;
	lua_newtable(L); /* anchors the K=V strings */
	int anchor = lua_gettop(L);
	lua_pushnil(L);
	while (lua_next(L, idx)) {
		/* converting a number key in place would derail lua_next */
		if (lua_type(L, -2) != LUA_TSTRING)
			fc_error(L, "proc: env: variable names must be strings, got %s",
				 luaL_typename(L, -2));
		if (!lua_isstring(L, -1))
			fc_error(L, "proc: env %s: string expected, got %s", lua_tostring(L, -2),
				 luaL_typename(L, -1));
		lua_pushfstring(L, "%s=%s", lua_tostring(L, -2), lua_tostring(L, -1));
		envp[k++] = (char *)lua_tostring(L, -1);
		lua_rawseti(L, anchor, k);
		lua_pop(L, 1);
	}
	for (int i = 0; i < n; i++) {
		const char *eq = strchr(environ[i], '=');
		size_t klen = eq ? (size_t)(eq - environ[i]) : strlen(environ[i]);
		int overridden = 0;
		for (int j = 0; j < k && !overridden; j++)
			overridden = strncmp(envp[j], environ[i], klen) == 0 && envp[j][klen] == '=';
		if (!overridden)
			envp[k++] = environ[i];
	}
	envp[k] = NULL;
	/* keep the anchor table alive as long as envp: store it in envp's uservalue slot */
	lua_setfenv(L, -2);
	return envp;
}

static void read_mounts(lua_State *L, int t, struct spawn_req *r)
{
	lua_getfield(L, t, "mounts");
	if (lua_isnil(L, -1)) {
		lua_pop(L, 1);
		return;
	}
	luaL_checktype(L, -1, LUA_TTABLE);
	int n = (int)lua_objlen(L, -1);
	if (n > MAX_MOUNTS)
		fc_error(L, "proc: at most %d mounts", MAX_MOUNTS);
	for (int i = 1; i <= n; i++) {
		lua_rawgeti(L, -1, i);
		int m = lua_gettop(L);
		static const char *const known[] = {"type", "source", "target", NULL};
		luaL_checktype(L, m, LUA_TTABLE);
		fc_opt_check(L, m, "proc.spawn: mounts", known);
		const char *type = fc_opt_string(L, m, "type", "bind");
		r->mounts[i - 1].bind = strcmp(type, "bind") == 0;
		r->mounts[i - 1].source = fc_opt_string(L, m, "source", NULL);
		r->mounts[i - 1].target = fc_opt_string(L, m, "target", NULL);
		if (!r->mounts[i - 1].target || (r->mounts[i - 1].bind && !r->mounts[i - 1].source))
			fc_error(L, "proc: mount %d needs source and target", i);
		lua_pop(L, 1);
	}
	r->nmounts = n;
	/* the strings are kept alive with the mount tables (fc_opt_string) */
	lua_pop(L, 1);
}

/* Push the optional list at opts[key] (nil if absent: length 0) and return its length,
 * at most max. */
static int push_list(lua_State *L, int t, const char *key, int max)
{
	lua_getfield(L, t, key);
	if (lua_isnil(L, -1))
		return 0;
	luaL_checktype(L, -1, LUA_TTABLE);
	int n = (int)lua_objlen(L, -1);
	if (n > max)
		fc_error(L, "proc: at most %d %s", max, key);
	return n;
}

/* An optional list of integers at opts[key] into out (at most max); returns the count. */
static int read_ints(lua_State *L, int t, const char *key, int *out, int max)
{
	int n = push_list(L, t, key, max);
	for (int i = 1; i <= n; i++) {
		lua_rawgeti(L, -1, i);
		if (!lua_isnumber(L, -1) || lua_tonumber(L, -1) < 0)
			fc_error(L, "proc: %s[%d] is not a number >= 0", key, i);
		out[i - 1] = (int)lua_tointeger(L, -1);
		lua_pop(L, 1);
	}
	lua_pop(L, 1);
	return n;
}

/* An optional list of strings at opts[key] into out (at most max); returns the count.
 * The strings stay referenced by the list inside the options table. */
static int read_strings(lua_State *L, int t, const char *key, const char **out, int max)
{
	int n = push_list(L, t, key, max);
	for (int i = 1; i <= n; i++) {
		lua_rawgeti(L, -1, i);
		if (lua_type(L, -1) != LUA_TSTRING)
			fc_error(L, "proc: %s[%d] is not a string", key, i);
		/* kept alive with the options table; pops the value */
		out[i - 1] = fc_keep_string(L, t, NULL);
	}
	lua_pop(L, 1);
	return n;
}

/* Wait for the child's exec: the error pipe closes at exec (O_CLOEXEC), or carries the
 * errno and the step that failed. Closes errfd; raises (the child reaped) on a failure. */
void proc_exec_result(lua_State *L, pid_t pid, int errfd, const char *argv0)
{
	char buf[160];
	ssize_t n;
	do
		n = read(errfd, buf, sizeof buf);
	while (n < 0 && errno == EINTR);
	close(errfd);
	if (n > (ssize_t)sizeof(int)) {
		int e;
		char step[sizeof buf];
		memcpy(&e, buf, sizeof e);
		snprintf(step, sizeof step, "%.*s", (int)(n - (ssize_t)sizeof e), buf + sizeof e);
		waitpid(pid, NULL, 0);
		if (strcmp(step, argv0) == 0)
			fc_errno_error(L, e, "proc: cannot run %s", argv0);
		fc_errno_error(L, e, "proc: cannot start %s: %s", argv0, step);
	}
}

/* fork(), or with r->cgroup_fd a clone3 that creates the child in that cgroup (the child
 * then has no cgroup.procs to write). Only while fireclaw is single-threaded: a raw clone
 * skips glibc's fork bookkeeping (its thread list, which the child's setuid would use).
 * Where clone3 fails (a kernel before 5.7, a seccomp filter, a cgroup that refuses), fork:
 * the child's write then joins, or says why not, as it always did. */
static pid_t fork_child(struct spawn_req *r)
{
	if (r->cgroup_fd >= 0 && __libc_single_threaded) {
		struct clone_args a;
		memset(&a, 0, sizeof a);
		a.flags = CLONE_INTO_CGROUP;
		a.exit_signal = SIGCHLD;
		a.cgroup = (__u64)r->cgroup_fd;
		pid_t pid = (pid_t)syscall(SYS_clone3, &a, sizeof a);
		if (pid == 0)
			r->ncgroups = 0; /* (the child's copy) in its cgroup from the start */
		if (pid >= 0)
			return pid;
	}
	return fork();
}

/* Fork and exec; returns the pid, or raises with the child's failing step and errno.
 * nowait: returns at once (errfd: with the error pipe's read end for proc_exec_result). */
pid_t proc_do_spawn(lua_State *L, struct spawn_req *r)
{
	int errpipe[2];
	if (pipe2(errpipe, O_CLOEXEC) < 0)
		fc_errno_error(L, errno, "proc: pipe");
	r->parent = getpid();
	/* every signal blocked across the fork: the child resets the dispositions before it
	 * unblocks them, so no handler of ours runs in it */
	sigset_t all, old;
	sigfillset(&all);
	sigprocmask(SIG_SETMASK, &all, &old);
	/* vfork: no page tables copied, and no copy-on-write faults in this process afterwards;
	 * the child runs in our memory, on our stack below this frame, until its exec (it must
	 * not return from here: proc_child_main execs or _exits, and writes only its stack) */
	pid_t pid = r->vfork ? vfork() : fork_child(r);
	if (pid != 0)
		sigprocmask(SIG_SETMASK, &old, NULL);
	if (pid < 0) {
		int e = errno;
		close(errpipe[0]);
		close(errpipe[1]);
		fc_errno_error(L, e, "proc: fork %s", r->argv[0]);
	}
	if (pid == 0) {
		close(errpipe[0]);
		proc_child_main(errpipe[1], r);
	}
	close(errpipe[1]);
	if (r->nowait && r->errfd) {
		*r->errfd = errpipe[0];
		return pid;
	}
	if (r->nowait) {
		close(errpipe[0]);
		return pid;
	}
	proc_exec_result(L, pid, errpipe[0], r->argv[0]);
	return pid;
}

static void proc_list(struct proc *p);

static void init_req(struct spawn_req *r)
{
	memset(r, 0, sizeof *r);
	r->netns_fd = r->in_fd = r->out_fd = r->err_fd = r->cgroup_fd = -1;
	r->uid = r->gid = -1;
}

/* A single cgroup on cgroup v2: its directory for clone3 (guarded: closed when the call
 * ends). Anything else (v1, several hierarchies, a path that is not DIR/cgroup.procs):
 * none, and the child writes itself into the files. */
static void open_v2_cgroup(lua_State *L, struct spawn_req *r)
{
	char dir[4096];
	const char *slash = r->ncgroups == 1 ? strrchr(r->cgroups[0], '/') : NULL;
	size_t n = slash ? (size_t)(slash - r->cgroups[0]) : 0;
	if (!slash || n == 0 || n >= sizeof dir || strcmp(slash, "/cgroup.procs") != 0)
		return;
	memcpy(dir, r->cgroups[0], n);
	dir[n] = '\0';
	int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	struct statfs sf;
	if (fd < 0)
		return; /* the child's write says why */
	if (fstatfs(fd, &sf) < 0 || sf.f_type != CGROUP2_SUPER_MAGIC) {
		close(fd);
		return;
	}
	r->cgroup_fd = fd;
	fc_fd_guard(L, fd);
}

/* Open the namespace named in opts.netns (guarded: closed when the call ends). */
static void open_netns(lua_State *L, int t, struct spawn_req *r)
{
	const char *netns = fc_opt_string(L, t, "netns", NULL);
	if (!netns || !*netns)
		return;
	r->netns_fd = fc_netns_open(netns);
	if (r->netns_fd < 0)
		fc_errno_error(L, errno, "proc: network namespace %s", netns);
	fc_fd_guard(L, r->netns_fd);
}

static int l_spawn(lua_State *L)
{
	static const char *const known[] = {"argv",    "env",	    "stdin",  "stdout", "stderr",
					    "cwd",     "uid",	    "gid",    "setsid", "pdeathsig",
					    "fds",     "groups",    "mounts", "netns",	"cgroup",
					    "log_cap", "wait_exec", "vfork",  NULL};
	luaL_checktype(L, 1, LUA_TTABLE);
	fc_opt_check(L, 1, "proc.spawn", known);
	struct spawn_req r;
	init_req(&r);
	lua_getfield(L, 1, "argv");
	r.argv = check_argv(L, lua_gettop(L));
	lua_getfield(L, 1, "env");
	r.envp = build_env(L, lua_gettop(L));
	struct logs g = {.n = 0};
	int out_log, err_log, fd_log[MAX_FDS];
	r.stdin_path = fc_opt_string(L, 1, "stdin", NULL);
	r.stdout_path = proc_read_output(L, 1, "stdout", &g, &out_log);
	r.stderr_path = proc_read_output(L, 1, "stderr", &g, &err_log);
	r.cwd = fc_opt_string(L, 1, "cwd", NULL);
	r.uid = (int)fc_opt_number(L, 1, "uid", -1);
	r.gid = (int)fc_opt_number(L, 1, "gid", -1);
	r.setsid = fc_opt_bool(L, 1, "setsid", 1);
	r.pdeathsig = fc_opt_bool(L, 1, "pdeathsig", 1);
	r.nowait = !fc_opt_bool(L, 1, "wait_exec", 1);
	r.vfork = fc_opt_bool(L, 1, "vfork", 0);
	double cap = fc_opt_number(L, 1, "log_cap", LOG_CAP_DEFAULT);
	if (cap < LOG_CAP_MIN || cap > 1e12)
		fc_error(
		    L, "proc: log_cap %.0f: between %d and 10^12 bytes (FIRECLAW_LOG_CAP for VMs)",
		    cap, LOG_CAP_MIN);
	proc_read_fds(L, 1, &r, &g, fd_log);
	int groups[MAX_GROUPS];
	r.ngroups = read_ints(L, 1, "groups", groups, MAX_GROUPS);
	for (int i = 0; i < r.ngroups; i++)
		r.groups[i] = (gid_t)groups[i];
	r.ncgroups = read_strings(L, 1, "cgroup", r.cgroups, MAX_CGROUPS);
	open_v2_cgroup(L, &r);
	if (r.cgroup_fd >= 0)
		r.vfork = 0; /* clone3 makes it in its cgroup: a fork, with nothing to wait for */
	read_mounts(L, 1, &r);
	open_netns(L, 1, &r);
	struct proc *p = fc_new(L, sizeof *p, PROC_MT);
	p->pidfd = p->sink_pidfd = p->execpipe = -1;
	if (r.nowait) {
		r.errfd = &p->execpipe; /* owned by p from here: close and __gc close it */
		snprintf(p->exec_name, sizeof p->exec_name, "%s", r.argv[0]);
	}
	if (g.n > 0) {
		proc_start_sink(L, p, &g, cap);
		if (out_log >= 0)
			r.out_fd = *g.p[out_log].wr;
		if (err_log >= 0)
			r.err_fd = *g.p[err_log].wr;
		for (int i = 0; i < r.nfds; i++)
			if (fd_log[i] >= 0)
				r.fds[i] = *g.p[fd_log[i]].wr;
	}
	p->pid = proc_do_spawn(L, &r);
	proc_list(p);
	/* the child has the write ends now: the sink sees EOF when it (and what it passed
	 * them to) is gone */
	for (int i = 0; i < g.n; i++)
		close(fc_fd_release(g.p[i].wr));
	p->pidfd = pidfd_open(p->pid);
	if (p->pidfd < 0)
		fc_errno_error(L, errno, "proc: pidfd_open %d", (int)p->pid);
	return 1;
}

/* ---- process object ---- */

static struct proc *check_proc(lua_State *L)
{
	return fc_check(L, 1, PROC_MT);
}

/* Reap without blocking; true once the process is gone. */
static int try_reap(struct proc *p)
{
	if (p->reaped)
		return 1;
	int st;
	pid_t r = waitpid(p->pid, &st, WNOHANG);
	if (r == p->pid || (r < 0 && errno == ECHILD)) {
		p->reaped = 1;
		p->status = r == p->pid ? st : 0;
	}
	return p->reaped;
}

static void push_status(lua_State *L, int st)
{
	lua_createtable(L, 0, 2);
	if (WIFSIGNALED(st)) {
		lua_pushinteger(L, WTERMSIG(st));
		lua_setfield(L, -2, "signal");
	} else {
		lua_pushinteger(L, WEXITSTATUS(st));
		lua_setfield(L, -2, "status");
	}
}

/* Wait until the process exits or timeout_ms passes (-1: forever). True if reaped. */
static int wait_exit(lua_State *L, struct proc *p, int timeout_ms)
{
	double deadline = timeout_ms < 0 ? -1 : fc_now_ms() + timeout_ms;
	while (!try_reap(p)) {
		struct pollfd pfd = {.fd = p->pidfd, .events = POLLIN};
		if (fc_poll(L, &pfd, 1, fc_ms_left(deadline)) == 0 && !try_reap(p))
			return 0;
	}
	/* what the process wrote last is in its logs before anyone reads them */
	proc_sink_reap(L, p, p->sink_waited ? 0 : SINK_GRACE_MS, 0, 1);
	p->sink_waited = 1;
	return 1;
}

static int p_wait(lua_State *L)
{
	struct proc *p = check_proc(L);
	double t = luaL_optnumber(L, 2, -1);
	if (!wait_exit(L, p, t < 0 ? -1 : (int)(t * 1000)))
		return 0;
	push_status(L, p->status);
	return 1;
}

static int p_alive(lua_State *L)
{
	struct proc *p = check_proc(L);
	lua_pushboolean(L, !try_reap(p));
	return 1;
}

static int p_kill(lua_State *L)
{
	struct proc *p = check_proc(L);
	int sig = (int)luaL_optinteger(L, 2, SIGKILL);
	if (try_reap(p) || p->pidfd < 0) {
		lua_pushboolean(L, 0);
		return 1;
	}
	if (pidfd_send_signal(p->pidfd, sig) < 0 && errno != ESRCH)
		fc_errno_error(L, errno, "proc: kill %d", (int)p->pid);
	lua_pushboolean(L, 1);
	return 1;
}

static int p_pid(lua_State *L)
{
	lua_pushinteger(L, check_proc(L)->pid);
	return 1;
}

static int p_pidfd(lua_State *L)
{
	lua_pushinteger(L, check_proc(L)->pidfd);
	return 1;
}

/* Wait for the process to exit (SIGKILLed first if asked) and reap it. */
static void reap_now(struct proc *p, int kill_first)
{
	if (kill_first) {
		if (p->pidfd >= 0)
			pidfd_send_signal(p->pidfd, SIGKILL);
		else
			kill(p->pid, SIGKILL);
	}
	int st;
	while (waitpid(p->pid, &st, 0) < 0 && errno == EINTR)
		;
	p->reaped = 1;
	p->status = st;
}

static void close_pidfd(struct proc *p)
{
	if (p->pidfd >= 0)
		close(p->pidfd);
	p->pidfd = -1;
	if (p->execpipe >= 0)
		close(p->execpipe);
	p->execpipe = -1;
}

/* spawn{wait_exec = false}: wait until the child has exec'ed its program (true), or raise
 * as spawn would have ("proc: cannot run …"; the child is reaped). At once after the first
 * call. */
static int p_wait_exec(lua_State *L)
{
	struct proc *p = check_proc(L);
	int fd = p->execpipe;
	if (fd >= 0) {
		p->execpipe = -1;
		/* a failure reaps the child and raises: then it is gone for close and wait too */
		p->reaped = 1;
		p->status = 127 << 8;
		proc_exec_result(L, p->pid, fd, p->exec_name); /* closes fd */
		p->reaped = 0;
		p->status = 0;
	}
	lua_pushboolean(L, 1);
	return 1;
}

/* Kill (if needed) and reap, then close the pidfd. Never raises: it runs from __gc too. */
/* Every process object from its spawn until close (its __gc) or detach: what
 * fc_proc_pending looks at. Userdata do not move, and a list is fireclaw's only thread's. */
static struct proc *live;

static void proc_list(struct proc *p)
{
	p->prev = NULL;
	p->next = live;
	if (live)
		live->prev = p;
	live = p;
	p->listed = 1;
}

static void proc_unlist(struct proc *p)
{
	if (!p->listed)
		return;
	if (p->prev)
		p->prev->next = p->next;
	else
		live = p->next;
	if (p->next)
		p->next->prev = p->prev;
	p->prev = p->next = NULL;
	p->listed = 0;
}

int fc_proc_pending(void)
{
	int n = 0;
	for (struct proc *p = live; p; p = p->next)
		if ((p->pid > 0 && !p->reaped) || p->sink > 0)
			n++;
	return n;
}

static int p_close(lua_State *L)
{
	struct proc *p = check_proc(L);
	if (p->pid > 0 && !try_reap(p))
		reap_now(p, 1);
	close_pidfd(p);
	proc_sink_reap(L, p, SINK_GRACE_MS, 1, 0);
	proc_unlist(p);
	return 0;
}

/* Let the process go on without us (a VM kept with --keep): close the pidfd and forget
 * the pid, so close/__gc no longer kill it. */
static int p_detach(lua_State *L)
{
	struct proc *p = check_proc(L);
	proc_unlist(p);
	close_pidfd(p);
	p->pid = 0;
	p->reaped = 1;
	if (p->sink_pidfd >= 0)
		close(p->sink_pidfd);
	p->sink_pidfd = -1;
	p->sink = 0;
	return 0;
}

static int p_sink_pid(lua_State *L)
{
	struct proc *p = check_proc(L);
	if (p->sink <= 0)
		return 0;
	lua_pushinteger(L, p->sink);
	return 1;
}

static int p_tostring(lua_State *L)
{
	struct proc *p = check_proc(L);
	lua_pushfstring(L, "proc %d (%s)", (int)p->pid, p->reaped ? "exited" : "running");
	return 1;
}

/* ---- proc.run: capture output ---- */

#define BUF_MT "fireclaw.proc.buffer"

/* The captured output lives in a userdata (a struct fc_buf), so what was captured so far
 * is freed if the run is interrupted. */
static int buffer_close(lua_State *L)
{
	fc_buf_free(luaL_checkudata(L, 1, BUF_MT));
	return 0;
}

/* Feed stdin and drain stdout/stderr until both close or the deadline passes.
 * fds[0] stdin (write end) or -1, fds[1] stdout, fds[2] stderr (read ends). Returns 0, or
 * -1 on timeout. Closes and sets to -1 every fd it finishes with. */
static int pump(lua_State *L, int *fds[3], const char *in, size_t inlen, struct fc_buf *out[2],
		double deadline)
{
	size_t off = 0;
	char chunk[16384];
	while (*fds[1] >= 0 || *fds[2] >= 0) {
		struct pollfd p[3];
		int which[3];
		nfds_t n = 0;
		for (int i = 0; i < 3; i++) {
			if (*fds[i] < 0)
				continue;
			p[n] = (struct pollfd){.fd = *fds[i], .events = i == 0 ? POLLOUT : POLLIN};
			which[n++] = i;
		}
		int left = fc_ms_left(deadline);
		if (left == 0 || fc_poll(L, p, n, left) == 0)
			return -1;
		for (nfds_t k = 0; k < n; k++) {
			int i = which[k];
			if (!p[k].revents)
				continue;
			if (i == 0) {
				ssize_t w = write(*fds[0], in + off, inlen - off);
				if (w > 0)
					off += (size_t)w;
				if ((w < 0 && errno != EINTR && errno != EAGAIN) || off >= inlen) {
					close(*fds[0]);
					*fds[0] = -1;
				}
				continue;
			}
			ssize_t r = read(*fds[i], chunk, sizeof chunk);
			if (r > 0) {
				if (fc_buf_append(out[i - 1], chunk, (size_t)r) < 0)
					fc_error(L, "proc: out of memory capturing output");
			} else if (r == 0 || (errno != EINTR && errno != EAGAIN)) {
				close(*fds[i]);
				*fds[i] = -1;
			}
		}
	}
	return 0;
}

/* Create a pipe whose two ends are owned by guards pushed on the stack. */
void proc_guarded_pipe(lua_State *L, int *ends[2])
{
	int fds[2];
	if (pipe2(fds, O_CLOEXEC) < 0)
		fc_errno_error(L, errno, "proc: pipe");
	ends[0] = fc_fd_guard(L, fds[0]);
	ends[1] = fc_fd_guard(L, fds[1]);
}

static int l_run(lua_State *L)
{
	luaL_checktype(L, 1, LUA_TTABLE);
	lua_settop(L, 2);
	if (lua_isnil(L, 2)) {
		lua_newtable(L);
		lua_replace(L, 2);
	}
	static const char *const known[] = {"env", "cwd", "stdin", "timeout", "netns", NULL};
	luaL_checktype(L, 2, LUA_TTABLE);
	fc_opt_check(L, 2, "proc.run", known);
	struct spawn_req r;
	init_req(&r);
	r.argv = check_argv(L, 1);
	lua_getfield(L, 2, "env");
	r.envp = build_env(L, lua_gettop(L));
	r.cwd = fc_opt_string(L, 2, "cwd", NULL);
	r.pdeathsig = 1;
	size_t inlen = 0;
	const char *in = NULL;
	in = fc_opt_lstring(L, 2, "stdin", NULL, &inlen);
	double timeout = fc_opt_number(L, 2, "timeout", -1);
	open_netns(L, 2, &r);

	int *pin[2] = {NULL, NULL}, *pout[2], *perr[2];
	if (in)
		proc_guarded_pipe(L, pin);
	proc_guarded_pipe(L, pout);
	proc_guarded_pipe(L, perr);
	r.in_fd = in ? *pin[0] : -1;
	r.out_fd = *pout[1];
	r.err_fd = *perr[1];
	if (in) /* a command that does not read its stdin must not block us */
		fcntl(*pin[1], F_SETFL, O_NONBLOCK);
	struct proc *p = fc_new(L, sizeof *p, PROC_MT);
	p->pidfd = p->sink_pidfd = p->execpipe = -1;
	p->pid = proc_do_spawn(L, &r);
	proc_list(p);
	p->pidfd = pidfd_open(p->pid);
	/* the child has its ends now */
	close(fc_fd_release(pout[1]));
	close(fc_fd_release(perr[1]));
	if (in)
		close(fc_fd_release(pin[0]));

	struct fc_buf *out[2] = {fc_new(L, sizeof(struct fc_buf), BUF_MT),
				 fc_new(L, sizeof(struct fc_buf), BUF_MT)};
	int none = -1;
	int *fds[3] = {in ? pin[1] : &none, pout[0], perr[0]};
	double deadline = timeout < 0 ? -1 : fc_now_ms() + timeout * 1000;
	int timed_out = pump(L, fds, in ? in : "", inlen, out, deadline) < 0;
	/* a child that closed its stdout and stderr may still run on: its exit is waited for
	 * under the same deadline, and interruptibly */
	if (!timed_out && p->pidfd >= 0 && !wait_exit(L, p, fc_ms_left(deadline)))
		timed_out = 1;
	if (!try_reap(p))
		reap_now(p, timed_out);
	/* done with it: the fd goes now, not at the next garbage collection */
	close_pidfd(p);

	push_status(L, p->status);
	lua_pushlstring(L, out[0]->data ? out[0]->data : "", out[0]->len);
	lua_setfield(L, -2, "stdout");
	lua_pushlstring(L, out[1]->data ? out[1]->data : "", out[1]->len);
	lua_setfield(L, -2, "stderr");
	lua_pushboolean(L, timed_out);
	lua_setfield(L, -2, "timed_out");
	return 1;
}

static int l_getpid(lua_State *L)
{
	lua_pushinteger(L, getpid());
	return 1;
}

int luaopen_fireclaw_proc(lua_State *L)
{
	static const luaL_Reg methods[] = {
	    {"pid", p_pid},
	    {"pidfd", p_pidfd},
	    {"alive", p_alive},
	    {"kill", p_kill},
	    {"wait", p_wait},
	    {"close", p_close},
	    {"detach", p_detach},
	    {"sink_pid", p_sink_pid},
	    {"wait_exec", p_wait_exec},
	    {"__tostring", p_tostring},
	    {NULL, NULL},
	};
	static const luaL_Reg buffer_methods[] = {{"close", buffer_close}, {NULL, NULL}};
	static const luaL_Reg fns[] = {
	    {"spawn", l_spawn},
	    {"run", l_run},
	    {"starttime", proc_l_starttime},
	    {"alive", proc_l_alive},
	    {"kill", proc_l_kill},
	    {"getpid", l_getpid},
	    {NULL, NULL},
	};
	fc_class(L, PROC_MT, methods);
	fc_class(L, BUF_MT, buffer_methods);
	lua_newtable(L);
	luaL_register(L, NULL, fns);
	return 1;
}
