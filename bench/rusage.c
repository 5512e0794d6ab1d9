/* LD_PRELOAD helper for the benchmark: when the process it is loaded into exits, append
 * that process's *own* CPU time and peak RSS to the file named by $FCB_RUSAGE_OUT:
 *
 *     utime_us stime_us maxrss_kib vmhwm_kib
 *
 * getrusage(RUSAGE_SELF) counts every thread of the process and none of its children, so
 * the VMM fireclaw spawns (and reaps) is left out; RUSAGE_CHILDREN and wait4() would
 * include it. The variables are removed from the environment at load time, so no child
 * (the VMM, helpers) inherits the library, and a forked child that calls exit() writes
 * nothing (pid check).
 *
 *     cc -shared -fPIC -O2 -o rusage.so bench/rusage.c
 *     FCB_RUSAGE_OUT=/tmp/x LD_PRELOAD=./rusage.so ./fireclaw run -- true
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

static char out[4096];
static pid_t self;

__attribute__((constructor)) static void rusage_init(void)
{
	const char *o = getenv("FCB_RUSAGE_OUT");
	if (o && strlen(o) < sizeof out)
		strcpy(out, o);
	self = getpid();
	unsetenv("FCB_RUSAGE_OUT");
	unsetenv("LD_PRELOAD");
}

static long vmhwm_kib(void)
{
	FILE *f = fopen("/proc/self/status", "re");
	char line[256];
	long kib = -1;
	if (!f)
		return -1;
	while (fgets(line, sizeof line, f))
		if (sscanf(line, "VmHWM: %ld kB", &kib) == 1)
			break;
	fclose(f);
	return kib;
}

__attribute__((destructor)) static void rusage_fini(void)
{
	struct rusage ru;
	char line[128];
	int fd, n;
	if (!out[0] || getpid() != self || getrusage(RUSAGE_SELF, &ru) != 0)
		return;
	n = snprintf(line, sizeof line, "%ld %ld %ld %ld\n",
		     (long)ru.ru_utime.tv_sec * 1000000L + (long)ru.ru_utime.tv_usec,
		     (long)ru.ru_stime.tv_sec * 1000000L + (long)ru.ru_stime.tv_usec,
		     (long)ru.ru_maxrss, vmhwm_kib());
	fd = open(out, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
	if (fd < 0)
		return;
	if (write(fd, line, (size_t)n) != n) {
		/* nothing to do: the benchmark counts the run as unmeasured */
	}
	close(fd);
}
