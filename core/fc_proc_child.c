/* fc_proc_child.c - fireclaw.proc: the child between fork and exec (mounts, fds,
 * namespace, cgroups, credentials). Async-signal-safe calls only. See core/proc.c. */
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
			if (mount("tmpfs", m->target, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0700") <
			    0)
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

void proc_child_main(int errpipe, const struct spawn_req *r)
{
	/* dispositions set to SIG_IGN survive exec: give the VMM the defaults back; and no
	 * handler of fireclaw's may run here (a vforked child shares our memory): the signals
	 * are blocked (proc_do_spawn) until these are reset */
	signal(SIGPIPE, SIG_DFL);
	signal(SIGINT, SIG_DFL);
	signal(SIGTERM, SIG_DFL);
	signal(SIGWINCH, SIG_DFL);
	sigset_t none;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
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
