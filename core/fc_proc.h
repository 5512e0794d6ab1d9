/* fc_proc.h - what the files of fireclaw.proc share: core/proc.c (the module: spawn, the
 * process object, proc.run), core/fc_proc_child.c (the child between fork and exec),
 * core/fc_logsink.c (capped logs: the pipes spawn makes and the sink process that copies
 * them) and core/fc_proc_pids.c (processes named by pid and start time). Private to them;
 * the Lua interface is in core/proc.c's opening comment. */
#ifndef FC_PROC_H
#define FC_PROC_H

#include "fc.h"

#include <sys/syscall.h>
#include <sys/types.h>
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
	int cgroup_fd; /* the one cgroup's v2 directory (clone3 CLONE_INTO_CGROUP), or -1 */
	int nowait; /* do not wait for the exec (a failure then only ends the child) */
	int vfork;  /* share our memory until the exec (vfork): for a child that joins no
		       cgroup and does nothing that waits, so that we are suspended only briefly */
	int *errfd; /* with nowait: keep the error pipe's read end here (proc_exec_result) */
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
	int execpipe;	 /* spawn{wait_exec = false}: the error pipe until p:wait_exec(), else -1 */
	char exec_name[96]; /* argv[0], for wait_exec's message */
	struct proc *prev, *next; /* the live list (fc_proc_pending): from spawn to close/detach */
	int listed;
};

static inline int pidfd_open(pid_t pid)
{
	return (int)syscall(SYS_pidfd_open, pid, 0);
}

static inline int pidfd_send_signal(int pidfd, int sig)
{
	return (int)syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0);
}

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

/* ---- core/proc.c ---- */

/* Create a pipe whose two ends are owned by guards pushed on the stack. */
void proc_guarded_pipe(lua_State *L, int *ends[2]);
/* Fork and exec r; raises with the child's reason if it fails before the exec. */
pid_t proc_do_spawn(lua_State *L, struct spawn_req *r);

/* ---- core/fc_proc_child.c ---- */

/* In the child after fork: set up what r asks for and exec; a failure is written to
 * errpipe (async-signal-safe calls only). */
void proc_child_main(int errpipe, const struct spawn_req *r);

/* ---- core/fc_logsink.c: capped logs ---- */

/* stdout/stderr option `key` of the table at t: a path, or NULL with *log set to the
 * index of the capped log pipe it names ({log = path}), else -1. */
const char *proc_read_output(lua_State *L, int t, const char *key, struct logs *g, int *log);
/* The `fds` option: plain fds, or capped logs (log_of[i] >= 0 names the pipe). */
void proc_read_fds(lua_State *L, int t, struct spawn_req *r, struct logs *g, int *log_of);
/* Start the log sink for g's pipes (the child has its ends), recorded in p. */
void proc_start_sink(lua_State *L, struct proc *p, struct logs *g, double cap);
/* Reap p's log sink, waiting up to ms (killing it after when kill_late). */
int proc_sink_reap(lua_State *L, struct proc *p, int ms, int kill_late, int interruptible);

/* Wait for the exec of a child forked by proc_do_spawn with nowait and errfd: reads and
 * closes errfd; on a failure before exec, reaps the child and raises. */
void proc_exec_result(lua_State *L, pid_t pid, int errfd, const char *argv0);

/* ---- core/fc_proc_pids.c ---- */

int proc_l_starttime(lua_State *L); /* proc.starttime */
int proc_l_alive(lua_State *L);	    /* proc.alive */
int proc_l_kill(lua_State *L);	    /* proc.kill */

#endif
