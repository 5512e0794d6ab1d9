/* proc.c - fireclaw.proc: processes. Spawn a VMM (in a network namespace, optionally a
 * private mount namespace with bind mounts), run a helper command and capture its output,
 * and find/kill processes by pid *and* start time (records outlive processes; pids are
 * reused).
 *
 *   p = proc.spawn{argv = {...}, env = {K = V}, stdin = path, stdout = path, stderr = path,
 *                  cwd = dir, netns = "fc-1a2b", mounts = {{type = "tmpfs", target = dir},
 *                  {type = "bind", source = s, target = t}}, uid = n, gid = n,
 *                  groups = {gid...}, fds = {fd...}, setsid = true, pdeathsig = true,
 *                  cgroup = {procs_path...}, log_cap = bytes}
 *       fds: the child gets these (integer) fds as 3, 4, … in this order; the caller keeps
 *       and closes its own. uid/gid: the child drops to them before exec (supplementary
 *       groups: `groups`, else none); pdeathsig survives the drop. cgroup: the child
 *       writes itself into each of these cgroup.procs files first thing after fork, so it
 *       runs no code of the program outside its cgroups (writing the pid from the parent
 *       after spawn would let it run unlimited for a moment).
 *       Capped logs: stdout, stderr or an entry of fds may be {log = path}: the child then
 *       writes into a pipe, and a log sink (`fireclaw --log-sink`, a process of its own)
 *       copies the pipe into path, keeping the first half of log_cap bytes (default
 *       1 MiB) and the most recent rest, with a line saying how much was dropped between.
 *       The same path twice is one pipe. The sink ends at EOF, when the child and
 *       whatever it passed the pipe to are gone; it belongs to p (wait, close, detach).
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
 */
#include "fc.h"

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

#define PROC_MT "fireclaw.proc"
#define MAX_MOUNTS 16
#define MAX_FDS 16
#define MAX_GROUPS 8
#define MAX_CGROUPS 8
#define MAX_LOGS 4
#define LOG_CAP_DEFAULT (1u << 20)
#define LOG_CAP_MIN 4096
/* how long a log sink may take to finish after its writer is gone (wait, close) */
#define SINK_GRACE_MS 2000

extern char **environ;

struct mount_op {
	int bind; /* 1 bind, 0 tmpfs */
	const char *source, *target;
};

/* Everything the child needs, prepared before fork: after fork the child may only make
 * async-signal-safe calls. Strings point into the Lua options table (kept on the stack). */
struct spawn_req {
	const char *exe; /* the program to run (no PATH search), else argv[0] on PATH */
	const char **argv;
	char **envp;
	const char *stdin_path, *stdout_path, *stderr_path, *cwd;
	int netns_fd;
	struct mount_op mounts[MAX_MOUNTS];
	int nmounts;
	int uid, gid;
	gid_t groups[MAX_GROUPS];
	int ngroups;
	int fds[MAX_FDS]; /* become 3, 4, … in the child */
	int nfds;
	int setsid, pdeathsig;
	const char *cgroups[MAX_CGROUPS]; /* cgroup.procs files to join */
	int ncgroups;
	int nowait; /* do not wait for the exec (a failure then only ends the child) */
	pid_t parent;
	/* pipes for proc.run: child side fds, or -1 */
	int in_fd, out_fd, err_fd;
};

struct proc {
	pid_t pid;
	int pidfd;
	int reaped;
	int status; /* waitpid status once reaped */
	pid_t sink; /* the log sink copying the process's capped logs, 0 if none (or reaped) */
	int sink_pidfd;
	int sink_waited; /* wait gave it its grace period once: later waits do not block on it */
};

static int pidfd_open(pid_t pid)
{
	return (int)syscall(SYS_pidfd_open, pid, 0);
}

static int pidfd_send_signal(int pidfd, int sig)
{
	return (int)syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0);
}

/* ---- child side (async-signal-safe only) ---- */

/* Report the failing step and errno to the parent through the CLOEXEC pipe, then die. */
static void child_fail(int errpipe, const char *step)
{
	int e = errno;
	char buf[160];
	size_t n = strlen(step);
	if (n > sizeof buf - sizeof e)
		n = sizeof buf - sizeof e;
	memcpy(buf, &e, sizeof e);
	memcpy(buf + sizeof e, step, n);
	if (write(errpipe, buf, sizeof e + n) < 0) {
		/* nothing left to tell anyone */
	}
	_exit(127);
}

static void child_redirect(int errpipe, const char *path, int pipe_fd, int target, int flags)
{
	int fd = pipe_fd;
	if (fd < 0) {
		fd = open(path ? path : "/dev/null", flags | O_CLOEXEC, 0600);
		if (fd < 0)
			child_fail(errpipe, path ? path : "/dev/null");
	}
	if (dup2(fd, target) < 0)
		child_fail(errpipe, "dup2");
}

static void child_mounts(int errpipe, const struct spawn_req *r)
{
	if (unshare(CLONE_NEWNS) < 0)
		child_fail(errpipe, "unshare(CLONE_NEWNS)");
	/* keep our mounts out of the host's mount table */
	if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
		child_fail(errpipe, "make / private");
	for (int i = 0; i < r->nmounts; i++) {
		const struct mount_op *m = &r->mounts[i];
		if (!m->bind) {
			mkdir(m->target, 0700);
			if (mount("tmpfs", m->target, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0700") < 0)
				child_fail(errpipe, m->target);
			continue;
		}
		struct stat st;
		if (stat(m->source, &st) < 0)
			child_fail(errpipe, m->source);
		if (S_ISDIR(st.st_mode)) {
			mkdir(m->target, 0700);
		} else {
			int fd = open(m->target, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
			if (fd >= 0)
				close(fd);
		}
		if (mount(m->source, m->target, NULL, MS_BIND, NULL) < 0)
			child_fail(errpipe, m->target);
	}
}

/* Give the child r->fds[i] as fd 3 + i, inherited across exec. Everything is first moved
 * above the targets, so a source (or the error pipe) sitting on a target is not lost.
 * Returns the error pipe's new number. */
static int child_fds(int errpipe, const struct spawn_req *r)
{
	int top = 3 + r->nfds, high[MAX_FDS];
	if (errpipe < top && (errpipe = fcntl(errpipe, F_DUPFD_CLOEXEC, top)) < 0)
		_exit(127); /* no pipe left to report on */
	for (int i = 0; i < r->nfds; i++)
		if ((high[i] = fcntl(r->fds[i], F_DUPFD_CLOEXEC, top)) < 0)
			child_fail(errpipe, "pass an fd");
	for (int i = 0; i < r->nfds; i++)
		if (dup2(high[i], 3 + i) < 0) /* the copy on 3 + i is not close-on-exec */
			child_fail(errpipe, "pass an fd");
	return errpipe;
}

/* Move ourselves into each cgroup ("0" is the writing process); before anything else, so
 * even the exec runs under the limits. As root: a later uid drop would forbid it. */
static void child_cgroups(int errpipe, const struct spawn_req *r)
{
	for (int i = 0; i < r->ncgroups; i++) {
		int fd = open(r->cgroups[i], O_WRONLY | O_CLOEXEC);
		if (fd < 0 || write(fd, "0", 1) != 1)
			child_fail(errpipe, r->cgroups[i]);
		close(fd);
	}
}

static void child_main(int errpipe, const struct spawn_req *r)
{
	sigset_t none;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	/* dispositions set to SIG_IGN survive exec: give the VMM the defaults back */
	signal(SIGPIPE, SIG_DFL);
	signal(SIGINT, SIG_DFL);
	signal(SIGTERM, SIG_DFL);
	child_cgroups(errpipe, r);
	if (r->setsid && setsid() < 0)
		child_fail(errpipe, "setsid");
	if (r->netns_fd >= 0 && setns(r->netns_fd, CLONE_NEWNET) < 0)
		child_fail(errpipe, "setns(network namespace)");
	if (r->nmounts > 0)
		child_mounts(errpipe, r);
	child_redirect(errpipe, r->stdin_path, r->in_fd, 0, O_RDONLY);
	child_redirect(errpipe, r->stdout_path, r->out_fd, 1, O_WRONLY | O_CREAT | O_TRUNC);
	child_redirect(errpipe, r->stderr_path, r->err_fd, 2, O_WRONLY | O_CREAT | O_TRUNC);
	if (r->nfds > 0)
		errpipe = child_fds(errpipe, r);
	/* the child gets 0-2 and its fds, nothing fireclaw itself inherited by accident */
	if (syscall(SYS_close_range, 3 + r->nfds, ~0U, CLOSE_RANGE_CLOEXEC) < 0)
		for (int fd = 3 + r->nfds; fd < 4096; fd++)
			fcntl(fd, F_SETFD, FD_CLOEXEC);
	if (r->cwd && chdir(r->cwd) < 0)
		child_fail(errpipe, r->cwd);
	if (r->gid >= 0 &&
	    (setgroups((size_t)r->ngroups, r->groups) < 0 || setgid((gid_t)r->gid) < 0))
		child_fail(errpipe, "setgid");
	if (r->uid >= 0 && setuid((uid_t)r->uid) < 0)
		child_fail(errpipe, "setuid");
	/* after the uid/gid change, which clears the parent-death signal */
	if (r->pdeathsig) {
		if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0)
			child_fail(errpipe, "prctl(PR_SET_PDEATHSIG)");
		if (getppid() != r->parent) /* the parent died before prctl */
			_exit(127);
	}
	if (r->exe)
		execve(r->exe, (char *const *)r->argv, r->envp);
	else
		execvpe(r->argv[0], (char *const *)r->argv, r->envp);
	child_fail(errpipe, r->argv[0]);
}

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

/* An optional list of integers at opts[key] into out (at most max); returns the count. */
static int read_ints(lua_State *L, int t, const char *key, int *out, int max)
{
	lua_getfield(L, t, key);
	if (lua_isnil(L, -1)) {
		lua_pop(L, 1);
		return 0;
	}
	luaL_checktype(L, -1, LUA_TTABLE);
	int n = (int)lua_objlen(L, -1);
	if (n > max)
		fc_error(L, "proc: at most %d %s", max, key);
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
	lua_getfield(L, t, key);
	if (lua_isnil(L, -1)) {
		lua_pop(L, 1);
		return 0;
	}
	luaL_checktype(L, -1, LUA_TTABLE);
	int n = (int)lua_objlen(L, -1);
	if (n > max)
		fc_error(L, "proc: at most %d %s", max, key);
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

/* Fork and exec; returns the pid, or raises with the child's failing step and errno. */
static pid_t do_spawn(lua_State *L, struct spawn_req *r)
{
	int errpipe[2];
	if (pipe2(errpipe, O_CLOEXEC) < 0)
		fc_errno_error(L, errno, "proc: pipe");
	r->parent = getpid();
	pid_t pid = fork();
	if (pid < 0) {
		int e = errno;
		close(errpipe[0]);
		close(errpipe[1]);
		fc_errno_error(L, e, "proc: fork %s", r->argv[0]);
	}
	if (pid == 0) {
		close(errpipe[0]);
		child_main(errpipe[1], r);
	}
	close(errpipe[1]);
	if (r->nowait) {
		close(errpipe[0]);
		return pid;
	}
	char buf[160];
	ssize_t n;
	do
		n = read(errpipe[0], buf, sizeof buf);
	while (n < 0 && errno == EINTR);
	close(errpipe[0]);
	if (n > (ssize_t)sizeof(int)) {
		int e;
		char step[sizeof buf];
		memcpy(&e, buf, sizeof e);
		snprintf(step, sizeof step, "%.*s", (int)(n - (ssize_t)sizeof e), buf + sizeof e);
		waitpid(pid, NULL, 0);
		if (strcmp(step, r->argv[0]) == 0)
			fc_errno_error(L, e, "proc: cannot run %s", r->argv[0]);
		fc_errno_error(L, e, "proc: cannot start %s: %s", r->argv[0], step);
	}
	return pid;
}

static void init_req(struct spawn_req *r)
{
	memset(r, 0, sizeof *r);
	r->netns_fd = r->in_fd = r->out_fd = r->err_fd = -1;
	r->uid = r->gid = -1;
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

/* ---- capped logs: pipes into a log sink ---- */

/* One capped log: the file, and the pipe into it. Every fd is owned by a guard on the Lua
 * stack until it is handed on. */
struct log_pipe {
	const char *path;
	int *file, *rd, *wr;
};

struct logs {
	struct log_pipe p[MAX_LOGS];
	int n;
};

static void guarded_pipe(lua_State *L, int *ends[2]);

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
	guarded_pipe(L, ends);
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
static const char *read_output(lua_State *L, int t, const char *key, struct logs *g, int *log)
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
static void read_fds(lua_State *L, int t, struct spawn_req *r, struct logs *g, int *log_of)
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
static void start_sink(lua_State *L, struct proc *p, struct logs *g, double cap)
{
	struct spawn_req s;
	memset(&s, 0, sizeof s);
	s.netns_fd = s.in_fd = s.out_fd = s.err_fd = -1;
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
	p->sink = do_spawn(L, &s);
	p->sink_pidfd = pidfd_open(p->sink);
	for (int i = 0; i < g->n; i++) {
		close(fc_fd_release(g->p[i].rd));
		close(fc_fd_release(g->p[i].file));
	}
}

/* Wait up to ms for the sink to finish, then reap it (SIGKILLed first if kill_late).
 * Returns 1 once it is reaped. interruptible: a wait through fc_poll (not from close). */
static int sink_reap(lua_State *L, struct proc *p, int ms, int kill_late, int interruptible)
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

static int l_spawn(lua_State *L)
{
	static const char *const known[] = {"argv", "env",    "stdin",	"stdout", "stderr",
					    "cwd",  "uid",    "gid",	"setsid", "pdeathsig",
					    "fds",  "groups", "mounts", "netns",  "cgroup",
					    "log_cap", NULL};
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
	r.stdout_path = read_output(L, 1, "stdout", &g, &out_log);
	r.stderr_path = read_output(L, 1, "stderr", &g, &err_log);
	r.cwd = fc_opt_string(L, 1, "cwd", NULL);
	r.uid = (int)fc_opt_number(L, 1, "uid", -1);
	r.gid = (int)fc_opt_number(L, 1, "gid", -1);
	r.setsid = fc_opt_bool(L, 1, "setsid", 1);
	r.pdeathsig = fc_opt_bool(L, 1, "pdeathsig", 1);
	double cap = fc_opt_number(L, 1, "log_cap", LOG_CAP_DEFAULT);
	if (cap < LOG_CAP_MIN || cap > 1e12)
		fc_error(L, "proc: log_cap %.0f: between %d and 10^12 bytes (FIRECLAW_LOG_CAP for VMs)",
			 cap, LOG_CAP_MIN);
	read_fds(L, 1, &r, &g, fd_log);
	int groups[MAX_GROUPS];
	r.ngroups = read_ints(L, 1, "groups", groups, MAX_GROUPS);
	for (int i = 0; i < r.ngroups; i++)
		r.groups[i] = (gid_t)groups[i];
	r.ncgroups = read_strings(L, 1, "cgroup", r.cgroups, MAX_CGROUPS);
	read_mounts(L, 1, &r);
	open_netns(L, 1, &r);
	struct proc *p = fc_new(L, sizeof *p, PROC_MT);
	p->pidfd = p->sink_pidfd = -1;
	if (g.n > 0) {
		start_sink(L, p, &g, cap);
		if (out_log >= 0)
			r.out_fd = *g.p[out_log].wr;
		if (err_log >= 0)
			r.err_fd = *g.p[err_log].wr;
		for (int i = 0; i < r.nfds; i++)
			if (fd_log[i] >= 0)
				r.fds[i] = *g.p[fd_log[i]].wr;
	}
	p->pid = do_spawn(L, &r);
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
	sink_reap(L, p, p->sink_waited ? 0 : SINK_GRACE_MS, 0, 1);
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
}

/* Kill (if needed) and reap, then close the pidfd. Never raises: it runs from __gc too. */
static int p_close(lua_State *L)
{
	struct proc *p = check_proc(L);
	if (p->pid > 0 && !try_reap(p))
		reap_now(p, 1);
	close_pidfd(p);
	sink_reap(L, p, SINK_GRACE_MS, 1, 0);
	return 0;
}

/* Let the process go on without us (a VM kept with --keep): close the pidfd and forget
 * the pid, so close/__gc no longer kill it. */
static int p_detach(lua_State *L)
{
	struct proc *p = check_proc(L);
	if (p->pidfd >= 0)
		close(p->pidfd);
	p->pidfd = -1;
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
static void guarded_pipe(lua_State *L, int *ends[2])
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
		guarded_pipe(L, pin);
	guarded_pipe(L, pout);
	guarded_pipe(L, perr);
	r.in_fd = in ? *pin[0] : -1;
	r.out_fd = *pout[1];
	r.err_fd = *perr[1];
	if (in) /* a command that does not read its stdin must not block us */
		fcntl(*pin[1], F_SETFL, O_NONBLOCK);
	struct proc *p = fc_new(L, sizeof *p, PROC_MT);
	p->pidfd = p->sink_pidfd = -1;
	p->pid = do_spawn(L, &r);
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

/* ---- pids from records ---- */

/* Start time (field 22 of /proc/PID/stat, clock ticks since boot), or 0 if no process. */
static unsigned long long read_starttime(pid_t pid)
{
	char path[64], buf[1024];
	snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	ssize_t n = read(fd, buf, sizeof buf - 1);
	close(fd);
	if (n <= 0)
		return 0;
	buf[n] = '\0';
	/* the command name may contain spaces and ')': fields start after the last ')' */
	char *p = strrchr(buf, ')');
	if (!p)
		return 0;
	unsigned long long start = 0;
	/* after ") " come fields 3.. : skip 19 of them to reach field 22 */
	p += 2;
	for (int field = 3; field < 22 && p; field++) {
		p = strchr(p, ' ');
		if (p)
			p++;
	}
	if (p)
		start = strtoull(p, NULL, 10);
	return start;
}

static int l_starttime(lua_State *L)
{
	unsigned long long st = read_starttime((pid_t)luaL_checkinteger(L, 1));
	if (st == 0)
		return 0;
	lua_pushnumber(L, (lua_Number)st);
	return 1;
}

/* Is pid running, and (if given) the same process that started at `starttime`? */
static int pid_matches(pid_t pid, double starttime)
{
	unsigned long long st = read_starttime(pid);
	return st != 0 && (starttime <= 0 || (double)st == starttime);
}

static int l_alive(lua_State *L)
{
	pid_t pid = (pid_t)luaL_checkinteger(L, 1);
	lua_pushboolean(L, pid > 0 && pid_matches(pid, luaL_optnumber(L, 2, 0)));
	return 1;
}

/* proc.kill(pid, starttime, [sig=KILL], [wait_s=2]): signal a process we may not have
 * started (a record from a dead fireclaw), only if its start time matches, then wait for
 * it to be gone. The pidfd pins the process, so the check and the kill refer to the same
 * one. Returns true if it was running. Without a start time there is nothing to check the
 * pid against (pids are reused): refused, never "whatever has that pid now". */
static int l_kill(lua_State *L)
{
	pid_t pid = (pid_t)luaL_checkinteger(L, 1);
	double starttime = luaL_checknumber(L, 2);
	int sig = (int)luaL_optinteger(L, 3, SIGKILL);
	double wait_s = luaL_optnumber(L, 4, 2);
	if (pid <= 0)
		fc_error(L, "proc: kill: bad pid %d", (int)pid);
	if (!(starttime > 0))
		fc_error(L,
			 "proc: kill %d: no start time (%g): refusing to signal whatever process "
			 "has that pid now (proc.starttime gives it)",
			 (int)pid, starttime);
	int pidfd = pidfd_open(pid);
	if (pidfd < 0) {
		lua_pushboolean(L, 0);
		return 1;
	}
	int *guard = fc_fd_guard(L, pidfd);
	if (!pid_matches(pid, starttime)) {
		lua_pushboolean(L, 0);
		return 1;
	}
	if (pidfd_send_signal(pidfd, sig) < 0 && errno != ESRCH)
		fc_errno_error(L, errno, "proc: kill %d", (int)pid);
	struct pollfd p = {.fd = pidfd, .events = POLLIN};
	if (sig == SIGKILL || wait_s > 0)
		fc_poll(L, &p, 1, (int)(wait_s * 1000));
	/* reap it if it happens to be our child */
	waitpid(pid, NULL, WNOHANG);
	close(fc_fd_release(guard));
	lua_pushboolean(L, 1);
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

static int l_getpid(lua_State *L)
{
	lua_pushinteger(L, getpid());
	return 1;
}

int luaopen_fireclaw_proc(lua_State *L)
{
	static const luaL_Reg methods[] = {
		{"pid", p_pid},	    {"pidfd", p_pidfd}, {"alive", p_alive},
		{"kill", p_kill},   {"wait", p_wait},	{"close", p_close}, {"detach", p_detach},
		{"sink_pid", p_sink_pid}, {"__tostring", p_tostring}, {NULL, NULL},
	};
	static const luaL_Reg buffer_methods[] = {{"close", buffer_close}, {NULL, NULL}};
	static const luaL_Reg fns[] = {
		{"spawn", l_spawn},	    {"run", l_run},	{"starttime", l_starttime},
		{"alive", l_alive},	    {"kill", l_kill},	{"getpid", l_getpid},
		{NULL, NULL},
	};
	fc_class(L, PROC_MT, methods);
	fc_class(L, BUF_MT, buffer_methods);
	lua_newtable(L);
	luaL_register(L, NULL, fns);
	return 1;
}
