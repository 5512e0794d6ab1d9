/*
 * fireclaw-guest: the small static program fireclaw installs in every image it builds
 * (/usr/sbin/fireclaw-guest). The host runs it over SSH; it does what busybox cannot.
 *
 *   fireclaw-guest reseed [NS]   with NS, set the clock to NS nanoseconds since 1970
 *                                (CLOCK_REALTIME); then read 32..4096 bytes of host
 *                                entropy from stdin, credit them to the kernel
 *                                (RNDADDENTROPY) and reseed the CRNG at once (RNDRESEEDCRNG)
 *   fireclaw-guest clock NS      set the clock only
 *   fireclaw-guest version       print the protocol version
 *
 * Why: every VM restored from one snapshot wakes up with the same CRNG state and the
 * snapshot's clock. Writing to /dev/urandom mixes bytes in but does not reseed until the
 * next reseed interval (up to a minute), so clones would hand out the same "random"
 * bytes; the two ioctls (root only) make the next read depend on the host's bytes.
 * Exit status: 0 done, 1 a system call failed, 2 bad usage or input (one line on stderr).
 * It is meant to grow into the guest agent; each command is one function below.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define VERSION 1
#define MIN_ENTROPY 32
#define MAX_ENTROPY 4096

static int fail(int status, const char *what)
{
	fprintf(stderr, "fireclaw-guest: %s: %s\n", what, strerror(errno));
	return status;
}

static int usage(const char *msg)
{
	fprintf(stderr,
		"fireclaw-guest: %s (usage: fireclaw-guest reseed [NS] | clock NS | version)\n",
		msg);
	return 2;
}

/* NS as decimal nanoseconds since 1970: digits only, no sign, no overflow. */
static int parse_ns(const char *s, struct timespec *ts)
{
	uint64_t ns = 0;
	if (!*s || strlen(s) > 19)
		return -1;
	for (const char *p = s; *p; p++) {
		if (*p < '0' || *p > '9')
			return -1;
		ns = ns * 10 + (uint64_t)(*p - '0');
	}
	ts->tv_sec = (time_t)(ns / 1000000000u);
	ts->tv_nsec = (long)(ns % 1000000000u);
	return 0;
}

static int set_clock(const char *arg)
{
	struct timespec ts;
	if (parse_ns(arg, &ts) != 0)
		return usage("the time must be nanoseconds since 1970, digits only");
	if (clock_settime(CLOCK_REALTIME, &ts) != 0)
		return fail(1, "clock_settime");
	return 0;
}

/* All of stdin, up to MAX_ENTROPY + 1 bytes (one more says "too much"). */
static ssize_t read_all(int fd, unsigned char *buf, size_t cap)
{
	size_t n = 0;
	while (n < cap) {
		ssize_t r = read(fd, buf + n, cap - n);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return -1;
		if (r == 0)
			break;
		n += (size_t)r;
	}
	return (ssize_t)n;
}

static int reseed(int argc, char **argv)
{
	struct {
		struct rand_pool_info info;
		unsigned char buf[MAX_ENTROPY + 1];
	} req;
	if (argc > 3)
		return usage("reseed takes at most one argument");
	/* the clock first: the host's time is already as old as this exec, and reading
	 * stdin to its end waits for the host's EOF */
	int rc = argc == 3 ? set_clock(argv[2]) : 0;
	if (rc != 0)
		return rc;
	ssize_t n = read_all(0, req.buf, sizeof req.buf);
	if (n < 0)
		return fail(1, "reading the entropy from stdin");
	if (n < MIN_ENTROPY || n > MAX_ENTROPY)
		return usage("reseed wants 32 to 4096 bytes of entropy on stdin");
	int fd = open("/dev/urandom", O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return fail(1, "open /dev/urandom");
	req.info.entropy_count = (int)n * 8; /* bits: the host's getrandom output is full entropy */
	req.info.buf_size = (int)n;
	if (ioctl(fd, RNDADDENTROPY, &req.info) != 0)
		rc = fail(1, "ioctl RNDADDENTROPY");
	else if (ioctl(fd, RNDRESEEDCRNG) != 0)
		rc = fail(1, "ioctl RNDRESEEDCRNG");
	close(fd);
	explicit_bzero(req.buf, sizeof req.buf);
	return rc;
}

int main(int argc, char **argv)
{
	const char *cmd = argc > 1 ? argv[1] : "";
	if (strcmp(cmd, "reseed") == 0)
		return reseed(argc, argv);
	if (strcmp(cmd, "clock") == 0)
		return argc == 3 ? set_clock(argv[2]) : usage("clock takes one argument");
	if (strcmp(cmd, "version") == 0) {
		printf("fireclaw-guest %d\n", VERSION);
		return 0;
	}
	return usage(argc > 1 ? "unknown command" : "no command");
}
