/* fc_proc_pids.c - fireclaw.proc: processes named by pid and start time (records outlive
 * processes; pids are reused): proc.starttime, proc.alive, proc.kill. See core/proc.c. */
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

int proc_l_starttime(lua_State *L)
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

int proc_l_alive(lua_State *L)
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
int proc_l_kill(lua_State *L)
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
