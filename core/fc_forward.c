/* fc_forward.c - the port forwarder behind `-p HOSTIP:HOSTPORT:GUESTPORT` (fireclaw.netpolicy):
 *
 *   fireclaw --port-forward GUESTIP GUESTPORT [VMDIR]   (internal; fd 3: a listening socket)
 *
 * (VMDIR only labels the process: ps and the tests' leak checks see whose it is.)
 *
 * fireclaw binds the host's address itself (net.tcp_listen, in its own namespace, so a
 * port that is taken is an error before anything runs) and spawns this process inside the
 * VM's network namespace with that socket as fd 3: every connection accepted on the host's
 * address is relayed to GUESTIP:GUESTPORT, which only this namespace can reach (every VM's
 * guest has the same address). One child process per connection (at most MAX_CONNS at a
 * time; more wait in the listen queue), each dying with the forwarder (PR_SET_PDEATHSIG);
 * the forwarder dies with fireclaw unless the VM is kept. Nothing from the guest is
 * interpreted: bytes are copied both ways, half-closes passed on.
 */
#include "fc.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_CONNS 64
#define CONNECT_TIMEOUT_MS 5000
#define RELAY_BUF 65536

/* Connect to the guest, waiting at most CONNECT_TIMEOUT_MS; -1 on failure. */
static int connect_guest(const struct sockaddr_in *sa)
{
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return -1;
	/* closed with a RST (also when this process is killed with its VM): an orphaned FIN
	 * to a guest that is gone would keep the VM's namespace alive for minutes */
	struct linger lg = {.l_onoff = 1, .l_linger = 0};
	setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
	if (connect(fd, (const struct sockaddr *)sa, sizeof *sa) == 0)
		return fd;
	if (errno != EINPROGRESS) {
		close(fd);
		return -1;
	}
	struct pollfd p = {.fd = fd, .events = POLLOUT};
	int err = 0;
	socklen_t len = sizeof err;
	if (poll(&p, 1, CONNECT_TIMEOUT_MS) != 1 ||
	    getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err) {
		close(fd);
		return -1;
	}
	return fd;
}

/* Copy what is readable on from to to; 0 at end of stream (the other side gets a
 * half-close), -1 on error. */
static int pump(int from, int to, char *buf)
{
	ssize_t n = read(from, buf, RELAY_BUF);
	if (n < 0)
		return errno == EINTR || errno == EAGAIN ? 1 : -1;
	if (n == 0) {
		shutdown(to, SHUT_WR);
		return 0;
	}
	for (ssize_t off = 0; off < n;) {
		ssize_t w = write(to, buf + off, (size_t)(n - off));
		if (w < 0 && (errno == EINTR || errno == EAGAIN)) {
			struct pollfd p = {.fd = to, .events = POLLOUT};
			poll(&p, 1, -1);
			continue;
		}
		if (w <= 0)
			return -1;
		off += w;
	}
	return 1;
}

/* One connection, in a child of its own: relay until both directions are closed. */
static void relay(int client, const struct sockaddr_in *guest)
{
	int up = connect_guest(guest);
	if (up < 0)
		_exit(1);
	static char buf[RELAY_BUF];
	int fds[2] = {client, up};
	struct pollfd p[2] = {{.fd = client, .events = POLLIN}, {.fd = up, .events = POLLIN}};
	int open_dirs = 2;
	while (open_dirs > 0) {
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		for (int i = 0; i < 2; i++) {
			if (p[i].fd < 0 || !(p[i].revents & (POLLIN | POLLHUP | POLLERR)))
				continue;
			int r = pump(fds[i], fds[1 - i], buf);
			if (r < 0)
				_exit(1);
			if (r == 0) {
				p[i].fd = -1; /* this direction is done */
				open_dirs--;
			}
		}
	}
	_exit(0);
}

static int parse_guest(int argc, char **argv, struct sockaddr_in *sa)
{
	memset(sa, 0, sizeof *sa);
	sa->sin_family = AF_INET;
	char *end;
	long port = argc == 4 || argc == 5 ? strtol(argv[3], &end, 10) : 0;
	if ((argc != 4 && argc != 5) || inet_pton(AF_INET, argv[2], &sa->sin_addr) != 1 || *end ||
	    port < 1 || port > 65535) {
		fprintf(stderr,
			"usage: fireclaw --port-forward GUESTIP GUESTPORT (fd 3 listening)\n");
		return -1;
	}
	sa->sin_port = htons((uint16_t)port);
	return 0;
}

int fc_port_forward_main(int argc, char **argv)
{
	struct sockaddr_in guest;
	if (parse_guest(argc, argv, &guest) < 0)
		return 2;
	signal(SIGPIPE, SIG_IGN);
	const int lfd = 3;
	int live = 0;
	for (;;) {
		while (live > 0 && waitpid(-1, NULL, live >= MAX_CONNS ? 0 : WNOHANG) > 0)
			live--;
		struct pollfd p = {.fd = lfd, .events = POLLIN};
		if (poll(&p, 1, live > 0 ? 1000 : -1) < 0 && errno != EINTR)
			return 1;
		if (!(p.revents & POLLIN))
			continue;
		int c = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
		if (c < 0) {
			if (errno == EINTR || errno == EAGAIN || errno == ECONNABORTED ||
			    errno == EMFILE || errno == ENFILE)
				continue;
			return 1;
		}
		pid_t pid = fork();
		if (pid == 0) {
			prctl(PR_SET_PDEATHSIG, SIGKILL);
			close(lfd);
			relay(c, &guest);
		}
		if (pid > 0)
			live++;
		close(c);
	}
}
