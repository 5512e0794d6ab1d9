/*
 * fireclaw-agent: the guest side of fireclaw's private channel (docs/agent-protocol.md).
 * A static binary in every image fireclaw builds (/usr/sbin/fireclaw-agent), started by
 * the image's init before sshd, so it is running in every snapshot.
 *
 *   fireclaw-agent [--daemon]     serve every virtio-serial port named
 *                                 org.fireclaw.agent.N, and AF_VSOCK port 1024 when the
 *                                 guest has vsock (Firecracker)
 *   fireclaw-agent --serve-fd N   serve one connection on fd N (the tests, on the host)
 *   as PID 1 (init=/.fireclaw/bin/fireclaw-agent: an image imported with the agent)
 *                                 the init shim: mount proc, sysfs, devtmpfs if missing,
 *                                 fork the agent, exec the image's own init (its
 *                                 fireclaw.init=, else /sbin/init, /etc/init, /bin/init,
 *                                 /bin/sh) with the same arguments
 *
 * It needs nothing from the image's userland (no shell, no libc, no udev): ports are found
 * through /sys/class/virtio-ports/<dev>/name and opened as /dev/<dev>.
 *
 * Processes: a supervisor forks one server per port (restarted if it dies) and one per
 * vsock connection. A server handles one connection at a time, with up to
 * AGP_MAX_STREAMS streams on it (execs, file transfers), in one poll loop. An exec runs
 * in a session of its own (its process group: signals and the timeout's kill reach
 * everything it started). When the host goes away (fireclaw exited, the VM was
 * snapshotted), the connection's processes are killed and the server waits for the next
 * host: a virtio port reads EOF while no host is connected, and the kernel signals SIGIO
 * when one connects.
 *
 * The host is trusted (it is fireclaw); still, every frame is checked against the caps of
 * agent-proto.h, and anything malformed ends the connection with an ERROR frame.
 */
#define _GNU_SOURCE
#include "agent-proto.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/random.h>
#include <linux/vm_sockets.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <linux/magic.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <stddef.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define MAX_PORTS 16
#define OUTQ_HIGH (1u << 20) /* stop reading command output while this much is queued */
#define EXIT_GRACE_MS 100    /* output still arriving after the command exited */
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

enum kind { K_FREE, K_EXEC, K_PUT, K_GET };

struct stream {
	uint32_t id;
	enum kind kind;
	/* exec */
	pid_t pid;
	int in_fd, out_fd, err_fd; /* -1 when closed; a PTY has out_fd = in_fd = the master */
	int pty, in_eof, exited, status;
	double exit_ms;
	unsigned char *inbuf; /* stdin received, not yet written (at most AGP_WINDOW) */
	size_t inlen;
	/* put / get */
	int file_fd;
	uint64_t size, done;
	unsigned mode;
	char tmp[4200], path[4096];
};

struct conn {
	int fd;
	int is_port; /* a virtio port: EOF means "no host", wait for one */
	int live;    /* a host is connected */
	unsigned char *in;
	size_t inlen;
	unsigned char *out;
	size_t outlen, outcap;
	struct stream s[AGP_MAX_STREAMS];
	int sigfd;
};

static double now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static void logmsg(const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	dprintf(2, "fireclaw-agent: %s\n", buf);
}

static void set_nonblock(int fd)
{
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

/* ---- the output queue (frames to the host) ---- */

static int reserve(struct conn *c, size_t n)
{
	if (c->outlen + n <= c->outcap)
		return 0;
	size_t cap = c->outcap ? c->outcap : 65536;
	while (cap < c->outlen + n)
		cap *= 2;
	unsigned char *p = realloc(c->out, cap);
	if (!p)
		return -1;
	c->out = p;
	c->outcap = cap;
	return 0;
}

static void send_frame(struct conn *c, uint32_t stream, uint8_t type, const void *a, size_t alen,
		       const void *b, size_t blen)
{
	if (!c->live || reserve(c, AGP_HDR + alen + blen) != 0)
		return;
	agp_hdr_encode(c->out + c->outlen, (uint32_t)(alen + blen), stream, type);
	if (alen)
		memcpy(c->out + c->outlen + AGP_HDR, a, alen);
	if (blen)
		memcpy(c->out + c->outlen + AGP_HDR + alen, b, blen);
	c->outlen += AGP_HDR + alen + blen;
}

static void send_result(struct conn *c, uint32_t stream, int err, const char *fmt, ...)
{
	unsigned char buf[4 + AGP_MAX_MSG];
	agp_put32(buf, (uint32_t)err);
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf((char *)buf + 4, AGP_MAX_MSG, fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if (n >= AGP_MAX_MSG)
		n = AGP_MAX_MSG - 1;
	send_frame(c, stream, AGP_T_RESULT, buf, 4 + (size_t)n, NULL, 0);
}

static void send_u32(struct conn *c, uint32_t stream, uint8_t type, uint32_t v)
{
	unsigned char b[4];
	agp_put32(b, v);
	send_frame(c, stream, type, b, 4, NULL, 0);
}

/* Write what is queued; -1 when the host is gone. */
static int flush_out(struct conn *c)
{
	while (c->outlen > 0) {
		ssize_t w = write(c->fd, c->out, c->outlen);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0 && errno == EAGAIN)
			return 0;
		if (w <= 0)
			return -1;
		memmove(c->out, c->out + w, c->outlen - (size_t)w);
		c->outlen -= (size_t)w;
	}
	return 0;
}

/* ---- streams ---- */

static struct stream *find(struct conn *c, uint32_t id)
{
	for (int i = 0; i < AGP_MAX_STREAMS; i++)
		if (c->s[i].kind != K_FREE && c->s[i].id == id)
			return &c->s[i];
	return NULL;
}

static struct stream *new_stream(struct conn *c, uint32_t id, enum kind kind)
{
	if (id == 0 || find(c, id))
		return NULL;
	for (int i = 0; i < AGP_MAX_STREAMS; i++) {
		struct stream *s = &c->s[i];
		if (s->kind == K_FREE) {
			memset(s, 0, sizeof *s);
			s->id = id;
			s->kind = kind;
			s->in_fd = s->out_fd = s->err_fd = s->file_fd = -1;
			return s;
		}
	}
	return NULL;
}

static void close_fd(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

static void free_stream(struct stream *s)
{
	if (s->pty && s->in_fd == s->out_fd)
		s->in_fd = -1;
	close_fd(&s->in_fd);
	close_fd(&s->out_fd);
	close_fd(&s->err_fd);
	close_fd(&s->file_fd);
	if (s->tmp[0])
		unlink(s->tmp);
	free(s->inbuf);
	memset(s, 0, sizeof *s);
	s->kind = K_FREE;
}

/* Drop every stream: the host is gone, or said hello anew. Commands are killed (their
 * whole process group): nobody could read their output or stop them any more. */
static void reset(struct conn *c)
{
	for (int i = 0; i < AGP_MAX_STREAMS; i++) {
		struct stream *s = &c->s[i];
		if (s->kind == K_EXEC && !s->exited && s->pid > 0)
			kill(-s->pid, SIGKILL);
		if (s->kind != K_FREE)
			free_stream(s);
	}
}

/* ---- exec ---- */

struct exec_req {
	uint32_t flags, uid, gid;
	uint16_t rows, cols;
	char *argv[AGP_MAX_ARGS + 1];
	char *envp[AGP_MAX_ARGS + 8];
	const char *cwd;
};

/* Split the payload's strings; -1 when they do not add up exactly. */
static int parse_exec(unsigned char *p, size_t n, struct exec_req *r)
{
	if (n < AGP_EXEC_FIXED || p[n - 1] != 0)
		return -1;
	r->flags = agp_u32(p);
	r->uid = agp_u32(p + 4);
	r->gid = agp_u32(p + 8);
	r->rows = agp_u16(p + 12);
	r->cols = agp_u16(p + 14);
	uint32_t argc = agp_u32(p + 16), envc = agp_u32(p + 20);
	if (argc < 1 || argc > AGP_MAX_ARGS || envc > AGP_MAX_ARGS)
		return -1;
	char *q = (char *)p + AGP_EXEC_FIXED, *end = (char *)p + n;
	for (uint32_t i = 0; i < argc + envc + 1; i++) {
		if (q >= end)
			return -1;
		if (i < argc)
			r->argv[i] = q;
		else if (i < argc + envc)
			r->envp[i - argc] = q;
		else
			r->cwd = q;
		q += strlen(q) + 1;
	}
	if (q != end)
		return -1;
	r->argv[argc] = NULL;
	/* defaults first, so that the host's K=V replace them (getenv takes the first) */
	size_t e = envc;
	int has_path = 0, has_home = 0;
	for (size_t i = 0; i < envc; i++) {
		if (!strncmp(r->envp[i], "PATH=", 5))
			has_path = 1;
		if (!strncmp(r->envp[i], "HOME=", 5))
			has_home = 1;
	}
	if (!has_path)
		r->envp[e++] = "PATH=" DEFAULT_PATH;
	if (!has_home)
		r->envp[e++] =
		    (r->flags & AGP_EXEC_SETUID) && r->uid != 0 ? "HOME=/" : "HOME=/root";
	r->envp[e] = NULL;
	return 0;
}

/* execvpe searches the PATH of the agent's own environment (glibc reads getenv), which in
 * an imported image's init is /.fireclaw/bin only; the command's PATH is the request's.
 * Search it here, with no allocation (this runs in a vfork child). Returns with errno set:
 * ENOENT when nothing was found, EACCES when something was but could not be run. */
static void exec_in_path(struct exec_req *r)
{
	const char *file = r->argv[0];
	if (strchr(file, '/')) {
		execve(file, r->argv, r->envp);
		return;
	}
	const char *path = DEFAULT_PATH;
	for (char **e = r->envp; *e; e++)
		if (!strncmp(*e, "PATH=", 5)) {
			path = *e + 5;
			break;
		}
	char buf[4096];
	size_t flen = strlen(file);
	int denied = 0;
	for (const char *p = path;;) {
		const char *c = strchr(p, ':');
		size_t dlen = c ? (size_t)(c - p) : strlen(p);
		if (dlen + flen + 2 <= sizeof buf) {
			size_t n = 0;
			if (dlen) { /* an empty entry is the current directory */
				memcpy(buf, p, dlen);
				buf[dlen] = '/';
				n = dlen + 1;
			}
			memcpy(buf + n, file, flen + 1);
			execve(buf, r->argv, r->envp);
			if (errno == EACCES)
				denied = 1;
			else if (errno != ENOENT && errno != ENOTDIR)
				return; /* found but not runnable (ENOEXEC, E2BIG…): say so */
		}
		if (!c)
			break;
		p = c + 1;
	}
	errno = denied ? EACCES : ENOENT;
}

/* In the child: become the command. Never returns. */
static void __attribute__((noreturn)) child(struct exec_req *r, int in, int out, int err, int pty)
{
	sigset_t none;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	signal(SIGPIPE, SIG_DFL);
	setsid();
	if (pty) {
		int slave = open(ptsname(in), O_RDWR);
		if (slave < 0)
			_exit(126);
		ioctl(slave, TIOCSCTTY, 0);
		in = out = err = slave;
	}
	dup2(in, 0);
	dup2(out, 1);
	dup2(err, 2);
	for (int fd = 3; fd < 1024; fd++)
		close(fd);
	if (r->flags & AGP_EXEC_SETUID) {
		gid_t g = (gid_t)r->gid;
		if (setgroups(1, &g) != 0 || setgid(g) != 0 || setuid((uid_t)r->uid) != 0) {
			dprintf(2, "fireclaw-agent: cannot become uid %u gid %u: %s\n", r->uid,
				r->gid, strerror(errno));
			_exit(126);
		}
	}
	const char *cwd = r->cwd && *r->cwd ? r->cwd : NULL;
	if (!cwd) {
		for (char **e = r->envp; *e; e++)
			if (!strncmp(*e, "HOME=", 5)) {
				cwd = *e + 5;
				break;
			}
	}
	if (cwd && chdir(cwd) != 0) {
		if (r->cwd && *r->cwd) {
			dprintf(2, "fireclaw-agent: cd %s: %s\n", cwd, strerror(errno));
			_exit(1);
		}
		if (chdir("/") != 0)
			_exit(1);
	}
	exec_in_path(r);
	int e = errno;
	/* as a shell says it (scripts and tests look for "not found") */
	dprintf(2, "fireclaw-agent: %s: %s\n", r->argv[0], e == ENOENT ? "not found" : strerror(e));
	_exit(e == ENOENT ? 127 : 126);
}

static int open_pty(struct exec_req *r)
{
	int m = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (m < 0)
		return -1;
	if (grantpt(m) != 0 || unlockpt(m) != 0) {
		close(m);
		return -1;
	}
	struct winsize ws = {.ws_row = r->rows ? r->rows : 24, .ws_col = r->cols ? r->cols : 80};
	ioctl(m, TIOCSWINSZ, &ws);
	return m;
}

static void start_exec(struct conn *c, uint32_t id, unsigned char *p, size_t n)
{
	static struct exec_req r;
	memset(&r, 0, sizeof r);
	if (parse_exec(p, n, &r) != 0) {
		send_result(c, id, EINVAL, "malformed exec request");
		return;
	}
	struct stream *s = new_stream(c, id, K_EXEC);
	if (!s) {
		send_result(c, id, EBUSY, "stream %u in use, or too many streams", id);
		return;
	}
	int pin[2] = {-1, -1}, pout[2] = {-1, -1}, perr[2] = {-1, -1}, m = -1;
	int fail = 0;
	if (r.flags & AGP_EXEC_PTY) {
		m = open_pty(&r);
		fail = m < 0;
	} else {
		fail = pipe2(pin, O_CLOEXEC) || pipe2(pout, O_CLOEXEC) || pipe2(perr, O_CLOEXEC);
	}
	/* vfork: no copy of the agent's page tables, which a restored TCG guest pays for
	 * dearly; the child only sets up its descriptors and session, then execs */
	pid_t pid = fail ? -1 : vfork();
	if (pid == 0) {
		if (m >= 0)
			child(&r, m, m, m, 1);
		child(&r, pin[0], pout[1], perr[1], 0);
	}
	int e = errno;
	close_fd(&pin[0]);
	close_fd(&pout[1]);
	close_fd(&perr[1]);
	if (pid < 0) {
		close_fd(&pin[1]), close_fd(&pout[0]), close_fd(&perr[0]), close_fd(&m);
		free_stream(s);
		send_result(c, id, e, "cannot start the command: %s", strerror(e));
		return;
	}
	s->pid = pid;
	s->pty = m >= 0;
	s->in_fd = m >= 0 ? m : pin[1];
	s->out_fd = m >= 0 ? m : pout[0];
	s->err_fd = perr[0];
	set_nonblock(s->out_fd);
	if (s->err_fd >= 0)
		set_nonblock(s->err_fd);
	if (!s->pty)
		set_nonblock(s->in_fd);
	s->inbuf = malloc(AGP_WINDOW);
	if (!s->inbuf)
		kill(-pid, SIGKILL);
	send_u32(c, id, AGP_T_WINDOW, AGP_WINDOW);
}

/* stdin bytes: queued (the host sends no more than the window it was given). */
static int take_stdin(struct conn *c, struct stream *s, unsigned char *p, size_t n)
{
	if (n == 0) {
		s->in_eof = 1;
		return 0;
	}
	if (s->in_eof || !s->inbuf || n > AGP_WINDOW - s->inlen)
		return -1;
	if (s->in_fd < 0) /* the command closed its stdin: the bytes go nowhere */
		return send_u32(c, s->id, AGP_T_WINDOW, (uint32_t)n), 0;
	memcpy(s->inbuf + s->inlen, p, n);
	s->inlen += n;
	return 0;
}

static void pump_stdin(struct conn *c, struct stream *s)
{
	while (s->inlen > 0 && s->in_fd >= 0) {
		ssize_t w = write(s->in_fd, s->inbuf, s->inlen);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0 && errno == EAGAIN)
			break;
		if (w <= 0) { /* EPIPE: the command does not read any more */
			send_u32(c, s->id, AGP_T_WINDOW, (uint32_t)s->inlen);
			s->inlen = 0;
			if (!s->pty)
				close_fd(&s->in_fd);
			break;
		}
		memmove(s->inbuf, s->inbuf + w, s->inlen - (size_t)w);
		s->inlen -= (size_t)w;
		send_u32(c, s->id, AGP_T_WINDOW, (uint32_t)w);
	}
	if (s->in_eof && s->inlen == 0 && !s->pty)
		close_fd(&s->in_fd);
}

/* Output of fd into frames of type; EOF (or a PTY's EIO) sends an empty frame. */
static void pump_out(struct conn *c, struct stream *s, int *fd, uint8_t type)
{
	unsigned char buf[AGP_CHUNK];
	while (*fd >= 0 && c->outlen < OUTQ_HIGH) {
		ssize_t r = read(*fd, buf, sizeof buf);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0 && errno == EAGAIN)
			return;
		if (r <= 0) {
			if (s->pty && fd == &s->out_fd) {
				s->in_fd = -1; /* the same descriptor */
			}
			close_fd(fd);
			send_frame(c, s->id, type, NULL, 0, NULL, 0);
			return;
		}
		send_frame(c, s->id, type, buf, (size_t)r, NULL, 0);
	}
}

/* Reap exited commands; their EXIT goes once their output has ended (or soon after). */
static void reap(struct conn *c)
{
	int st;
	pid_t pid;
	while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
		for (int i = 0; i < AGP_MAX_STREAMS; i++) {
			struct stream *s = &c->s[i];
			if (s->kind == K_EXEC && s->pid == pid && !s->exited) {
				s->exited = 1;
				s->status = st;
				s->exit_ms = now_ms();
			}
		}
	}
}

static void finish_exec(struct conn *c, struct stream *s)
{
	/* what is still in the pipes now is sent; a background child holding them open
	 * does not hold the command's end */
	pump_out(c, s, &s->out_fd, AGP_T_STDOUT);
	pump_out(c, s, &s->err_fd, AGP_T_STDERR);
	unsigned char b[8];
	int st = s->status;
	agp_put32(b, WIFEXITED(st) ? (uint32_t)WEXITSTATUS(st) : (uint32_t)-1);
	agp_put32(b + 4, WIFSIGNALED(st) ? (uint32_t)WTERMSIG(st) : 0);
	send_frame(c, s->id, AGP_T_EXIT, b, 8, NULL, 0);
	free_stream(s);
}

/* ---- files ---- */

static void start_put(struct conn *c, uint32_t id, unsigned char *p, size_t n)
{
	if (n < 14 || p[n - 1] != 0) {
		send_result(c, id, EINVAL, "malformed put request");
		return;
	}
	unsigned mode = agp_u32(p) & 07777;
	uint64_t size = agp_u64(p + 4);
	const char *path = (const char *)p + 12;
	size_t pl = strlen(path);
	if (12 + pl + 1 >= n) {
		send_result(c, id, EINVAL, "malformed put request");
		return;
	}
	const char *name = path + pl + 1;
	if (12 + pl + 1 + strlen(name) + 1 != n) {
		send_result(c, id, EINVAL, "malformed put request");
		return;
	}
	struct stream *s = new_stream(c, id, K_PUT);
	if (!s) {
		send_result(c, id, EBUSY, "stream %u in use, or too many streams", id);
		return;
	}
	s->mode = mode;
	s->size = size;
	struct stat st;
	int into = pl > 0 && (path[pl - 1] == '/' || (stat(path, &st) == 0 && S_ISDIR(st.st_mode)));
	int w = into ? snprintf(s->path, sizeof s->path, "%s%s%s", path,
				path[pl - 1] == '/' ? "" : "/", name)
		     : snprintf(s->path, sizeof s->path, "%s", path);
	if (pl == 0 || (into && (!*name || strchr(name, '/'))) || w < 0 ||
	    (size_t)w >= sizeof s->path) {
		free_stream(s);
		send_result(c, id, EINVAL, "bad remote path '%s'", path);
		return;
	}
	char dir[4096];
	snprintf(dir, sizeof dir, "%s", s->path);
	char *slash = strrchr(dir, '/');
	if (slash == dir)
		dir[1] = 0;
	else if (slash)
		*slash = 0;
	else
		snprintf(dir, sizeof dir, ".");
	for (int i = 0; i < 16 && s->file_fd < 0; i++) {
		unsigned r = (unsigned)random();
		snprintf(s->tmp, sizeof s->tmp, "%s/.fireclaw-put-%08x", dir, r);
		s->file_fd =
		    open(s->tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
		if (s->file_fd < 0 && errno != EEXIST)
			break;
	}
	if (s->file_fd < 0) {
		int e = errno;
		char target[4096];
		snprintf(target, sizeof target, "%s", s->path);
		s->tmp[0] = 0;
		free_stream(s);
		send_result(c, id, e, "%s: %s", target, strerror(e));
		return;
	}
	send_u32(c, id, AGP_T_WINDOW, AGP_WINDOW);
}

static void put_data(struct conn *c, struct stream *s, unsigned char *p, size_t n)
{
	if (n == 0) {
		int e = 0;
		if (s->done != s->size)
			e = EIO;
		else if (fchmod(s->file_fd, s->mode) != 0 || close(s->file_fd) != 0)
			e = errno;
		s->file_fd = -1;
		if (!e && rename(s->tmp, s->path) != 0)
			e = errno;
		if (!e)
			s->tmp[0] = 0;
		if (e)
			send_result(c, s->id, e, "%s: %s", s->path,
				    s->done != s->size ? "short transfer" : strerror(e));
		else
			send_result(c, s->id, 0, "%s", s->path);
		free_stream(s);
		return;
	}
	if (n > s->size - s->done) {
		send_result(c, s->id, EFBIG, "%s: more bytes than announced", s->path);
		free_stream(s);
		return;
	}
	for (size_t off = 0; off < n;) {
		ssize_t w = write(s->file_fd, p + off, n - off);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0) {
			int e = w < 0 ? errno : EIO;
			send_result(c, s->id, e, "%s: %s", s->path, strerror(e));
			free_stream(s);
			return;
		}
		off += (size_t)w;
	}
	s->done += n;
	send_u32(c, s->id, AGP_T_WINDOW, (uint32_t)n);
}

static void start_get(struct conn *c, uint32_t id, unsigned char *p, size_t n)
{
	if (n < 10 || p[n - 1] != 0 || strlen((char *)p + 8) != n - 9) {
		send_result(c, id, EINVAL, "malformed get request");
		return;
	}
	uint64_t max = agp_u64(p);
	const char *path = (const char *)p + 8;
	struct stream *s = new_stream(c, id, K_GET);
	if (!s) {
		send_result(c, id, EBUSY, "stream %u in use, or too many streams", id);
		return;
	}
	snprintf(s->path, sizeof s->path, "%s", path);
	struct stat st;
	s->file_fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
	int e = s->file_fd < 0 ? errno : fstat(s->file_fd, &st) != 0 ? errno : 0;
	if (!e && S_ISDIR(st.st_mode))
		e = EISDIR;
	else if (!e && !S_ISREG(st.st_mode))
		e = EINVAL;
	if (!e && (uint64_t)st.st_size > max)
		e = EFBIG;
	if (e) {
		free_stream(s);
		send_result(c, id, e, "%s: %s", path,
			    e == EISDIR	  ? "is a directory"
			    : e == EINVAL ? "not a regular file"
			    : e == EFBIG  ? "bigger than the host's cap"
					  : strerror(e));
		return;
	}
	unsigned char b[12];
	agp_put32(b, (uint32_t)st.st_mode & 07777);
	agp_put64(b + 4, (uint64_t)st.st_size);
	s->size = (uint64_t)st.st_size;
	send_frame(c, id, AGP_T_FILE, b, 12, NULL, 0);
}

static void pump_get(struct conn *c, struct stream *s)
{
	unsigned char buf[AGP_CHUNK];
	while (c->outlen < OUTQ_HIGH) {
		ssize_t r = read(s->file_fd, buf, sizeof buf);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			int e = errno;
			send_result(c, s->id, e, "%s: %s", s->path, strerror(e));
			free_stream(s);
			return;
		}
		if (r == 0) {
			send_frame(c, s->id, AGP_T_DATA, NULL, 0, NULL, 0);
			send_result(c, s->id, 0, "%s", s->path);
			free_stream(s);
			return;
		}
		send_frame(c, s->id, AGP_T_DATA, buf, (size_t)r, NULL, 0);
	}
}

/* ---- directories (trees are walked by the host: one LIST or MKDIR at a time) ---- */

static void do_mkdir(struct conn *c, uint32_t id, unsigned char *p, size_t n)
{
	if (n < 6 || p[n - 1] != 0 || strlen((char *)p + 4) != n - 5) {
		send_result(c, id, EINVAL, "malformed mkdir request");
		return;
	}
	const char *path = (const char *)p + 4;
	struct stat st;
	if (mkdir(path, agp_u32(p) & 07777) != 0 &&
	    !(errno == EEXIST && stat(path, &st) == 0 && S_ISDIR(st.st_mode))) {
		int e = errno;
		send_result(c, id, e, "%s: %s", path, strerror(e));
		return;
	}
	send_result(c, id, 0, "%s", path);
}

static void do_list(struct conn *c, uint32_t id, unsigned char *p, size_t n)
{
	if (n < 2 || p[n - 1] != 0 || strlen((char *)p) != n - 1) {
		send_result(c, id, EINVAL, "malformed list request");
		return;
	}
	const char *path = (const char *)p;
	DIR *d = opendir(path);
	if (!d) {
		int e = errno;
		send_result(c, id, e, "%s: %s", path, strerror(e));
		return;
	}
	struct dirent *e;
	unsigned long count = 0;
	while ((e = readdir(d))) {
		if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
			continue;
		if (++count > AGP_MAX_ENTRIES) {
			closedir(d);
			send_result(c, id, E2BIG, "%s: more than %d entries", path,
				    AGP_MAX_ENTRIES);
			return;
		}
		struct stat st;
		if (fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0)
			continue; /* gone meanwhile */
		unsigned char b[AGP_ENTRY_FIXED];
		b[0] = S_ISREG(st.st_mode)   ? AGP_KIND_FILE
		       : S_ISDIR(st.st_mode) ? AGP_KIND_DIR
		       : S_ISLNK(st.st_mode) ? AGP_KIND_LINK
					     : AGP_KIND_OTHER;
		agp_put32(b + 1, (uint32_t)st.st_mode & 07777);
		agp_put64(b + 5, (uint64_t)st.st_size);
		send_frame(c, id, AGP_T_ENTRY, b, sizeof b, e->d_name, strlen(e->d_name));
	}
	closedir(d);
	send_result(c, id, 0, "%s", path);
}

/* ---- the restore hand-off: the host's clock and entropy, before any command ---- */

static void handoff(struct conn *c, unsigned char *p, size_t n)
{
	struct {
		struct rand_pool_info info;
		unsigned char buf[AGP_MAX_ENTROPY];
	} req;
	size_t ent = n >= 8 ? n - 8 : 0;
	if (ent < AGP_MIN_ENTROPY || ent > AGP_MAX_ENTROPY) {
		send_result(c, 0, EINVAL, "hand-off wants 8 + 32..4096 bytes");
		return;
	}
	uint64_t ns = agp_u64(p);
	struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000u),
			      .tv_nsec = (long)(ns % 1000000000u)};
	int e = 0;
	const char *what = "";
	if (ns && clock_settime(CLOCK_REALTIME, &ts) != 0)
		e = errno, what = "clock_settime";
	memcpy(req.buf, p + 8, ent);
	req.info.entropy_count = (int)ent * 8;
	req.info.buf_size = (int)ent;
	int fd = open("/dev/urandom", O_RDWR | O_CLOEXEC);
	if (!e && fd < 0)
		e = errno, what = "open /dev/urandom";
	if (!e && ioctl(fd, RNDADDENTROPY, &req.info) != 0)
		e = errno, what = "RNDADDENTROPY";
	if (!e && ioctl(fd, RNDRESEEDCRNG) != 0)
		e = errno, what = "RNDRESEEDCRNG";
	if (fd >= 0)
		close(fd);
	explicit_bzero(&req, sizeof req);
	explicit_bzero(p + 8, ent);
	if (e)
		send_result(c, 0, e, "%s: %s", what, strerror(e));
	else
		send_result(c, 0, 0, "clock set, entropy credited, CRNG reseeded");
}

/* The resolver of a restored guest with egress: the snapshot's /etc/resolv.conf is the
 * snapshot's, the host's resolver for this VM is given after the hand-off (no exec). */
static void set_resolver(struct conn *c, const unsigned char *p, size_t n)
{
	char addr[INET_ADDRSTRLEN], text[64];
	struct in_addr a;
	if (n == 0 || n >= sizeof addr) {
		send_result(c, 0, EINVAL, "a resolver is an IPv4 address");
		return;
	}
	memcpy(addr, p, n);
	addr[n] = 0;
	if (inet_pton(AF_INET, addr, &a) != 1) {
		send_result(c, 0, EINVAL, "a resolver is an IPv4 address");
		return;
	}
	int len = snprintf(text, sizeof text, "nameserver %s\n", addr);
	int fd = open("/etc/resolv.conf", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	int e = 0;
	if (fd < 0)
		e = errno;
	else {
		ssize_t w = write(fd, text, (size_t)len);
		e = w < 0 ? errno : w != len ? EIO : 0;
	}
	if (fd >= 0)
		close(fd);
	if (e)
		send_result(c, 0, e, "/etc/resolv.conf: %s", strerror(e));
	else
		send_result(c, 0, 0, "resolver %s", addr);
}

/* ---- frames from the host ---- */

static int protocol_error(struct conn *c, const char *msg)
{
	logmsg("protocol error: %s", msg);
	send_frame(c, 0, AGP_T_ERROR, msg, strlen(msg), NULL, 0);
	return -1;
}

static int on_frame(struct conn *c, struct agp_hdr *h, unsigned char *p)
{
	struct stream *s = h->stream ? find(c, h->stream) : NULL;
	switch (h->type) {
	case AGP_T_HELLO: {
		if (h->len != 4 || h->stream != 0)
			return protocol_error(c, "bad hello");
		reset(c);
		unsigned char b[8];
		agp_put32(b, AGP_VERSION);
		agp_put32(b + 4, (uint32_t)getpid());
		send_frame(c, 0, AGP_T_HELLO, b, 8, "fireclaw-agent", 14);
		return 1; /* the input buffer was reset */
	}
	case AGP_T_HANDOFF:
		if (h->stream != 0)
			return protocol_error(c, "hand-off on a stream");
		handoff(c, p, h->len);
		return 0;
	case AGP_T_RESOLVER:
		if (h->stream != 0)
			return protocol_error(c, "resolver on a stream");
		set_resolver(c, p, h->len);
		return 0;
	case AGP_T_EXEC:
		start_exec(c, h->stream, p, h->len);
		return 0;
	case AGP_T_PUT:
		start_put(c, h->stream, p, h->len);
		return 0;
	case AGP_T_GET:
		start_get(c, h->stream, p, h->len);
		return 0;
	case AGP_T_STDIN:
		if (!s)
			return 0; /* the stream ended meanwhile */
		if (s->kind != K_EXEC || take_stdin(c, s, p, h->len) != 0)
			return protocol_error(c, "stdin beyond the window, or after its end");
		return 0;
	case AGP_T_DATA:
		if (!s)
			return 0;
		if (s->kind != K_PUT)
			return protocol_error(c, "data on a stream that is not a put");
		put_data(c, s, p, h->len);
		return 0;
	case AGP_T_SIGNAL:
		if (h->len != 4)
			return protocol_error(c, "bad signal frame");
		if (s && s->kind == K_EXEC && !s->exited && agp_u32(p) > 0 && agp_u32(p) < 65)
			kill(-s->pid, (int)agp_u32(p));
		return 0;
	case AGP_T_RESIZE:
		if (h->len != 4)
			return protocol_error(c, "bad resize frame");
		if (s && s->pty && s->out_fd >= 0) {
			struct winsize ws = {.ws_row = agp_u16(p), .ws_col = agp_u16(p + 2)};
			ioctl(s->out_fd, TIOCSWINSZ, &ws);
		}
		return 0;
	case AGP_T_MKDIR:
		do_mkdir(c, h->stream, p, h->len);
		return 0;
	case AGP_T_LIST:
		do_list(c, h->stream, p, h->len);
		return 0;
	case AGP_T_PING:
		if (h->len > 8 || h->stream != 0)
			return protocol_error(c, "bad ping");
		send_frame(c, 0, AGP_T_PONG, p, h->len, NULL, 0);
		return 0;
	case AGP_T_CLOSE:
		if (s) {
			if (s->kind == K_EXEC && !s->exited)
				kill(-s->pid, SIGKILL);
			free_stream(s);
		}
		return 0;
	default:
		return protocol_error(c, "unknown frame type");
	}
}

/* Parse whole frames from the input buffer; -1 ends the connection. */
static int parse_input(struct conn *c)
{
	size_t off = 0;
	while (c->inlen - off >= AGP_HDR) {
		struct agp_hdr h;
		if (agp_hdr_decode(c->in + off, &h) != 0)
			return protocol_error(c, "bad frame header");
		if (c->inlen - off < AGP_HDR + h.len)
			break;
		int r = on_frame(c, &h, c->in + off + AGP_HDR);
		if (r < 0)
			return -1;
		off += AGP_HDR + h.len;
		if (r == 1) { /* hello: what follows it is the new connection's */
			memmove(c->in, c->in + off, c->inlen - off);
			c->inlen -= off;
			off = 0;
		}
	}
	memmove(c->in, c->in + off, c->inlen - off);
	c->inlen -= off;
	return 0;
}

/* ---- the loop ---- */

static void hang_up(struct conn *c)
{
	reset(c);
	c->inlen = c->outlen = 0;
	c->live = 0;
}

/* Read from the host; -1 when it is gone (or broke the protocol). */
static int read_host(struct conn *c)
{
	size_t room = AGP_HDR + AGP_MAX_PAYLOAD - c->inlen;
	ssize_t r = read(c->fd, c->in + c->inlen, room);
	if (r < 0 && (errno == EINTR || errno == EAGAIN))
		return 0;
	if (r <= 0)
		return -1;
	c->live = 1;
	c->inlen += (size_t)r;
	return parse_input(c);
}

static void on_signals(struct conn *c)
{
	struct signalfd_siginfo si;
	while (read(c->sigfd, &si, sizeof si) == (ssize_t)sizeof si)
		;
	reap(c);
}

/* One connection's life (a vsock connection), or a port's forever. */
static void serve(struct conn *c)
{
	c->in = malloc(AGP_HDR + AGP_MAX_PAYLOAD);
	if (!c->in)
		return;
	set_nonblock(c->fd);
	int waiting = 0; /* a port with no host: wait for SIGIO */
	for (;;) {
		struct pollfd p[2 + 3 * AGP_MAX_STREAMS];
		struct stream *who[2 + 3 * AGP_MAX_STREAMS];
		int which[2 + 3 * AGP_MAX_STREAMS];
		nfds_t n = 0;
		p[n++] = (struct pollfd){.fd = c->sigfd, .events = POLLIN};
		if (!waiting)
			p[n++] = (struct pollfd){
			    .fd = c->fd, .events = (short)(POLLIN | (c->outlen ? POLLOUT : 0))};
		int timeout = waiting ? 1000 : -1;
		double now = now_ms();
		for (int i = 0; i < AGP_MAX_STREAMS; i++) {
			struct stream *s = &c->s[i];
			if (s->kind == K_EXEC) {
				if (s->exited) {
					int left = (int)(s->exit_ms + EXIT_GRACE_MS - now) + 1;
					if (left < 1)
						left = 0;
					if (timeout < 0 || left < timeout)
						timeout = left;
				}
				if (c->outlen < OUTQ_HIGH && s->out_fd >= 0)
					who[n] = s, which[n] = 1,
					p[n++] = (struct pollfd){.fd = s->out_fd, .events = POLLIN};
				if (c->outlen < OUTQ_HIGH && s->err_fd >= 0)
					who[n] = s, which[n] = 2,
					p[n++] = (struct pollfd){.fd = s->err_fd, .events = POLLIN};
				if (s->inlen > 0 && s->in_fd >= 0)
					who[n] = s, which[n] = 3,
					p[n++] = (struct pollfd){.fd = s->in_fd, .events = POLLOUT};
			} else if (s->kind == K_GET && c->outlen < OUTQ_HIGH) {
				timeout = 0; /* a regular file is always readable */
			}
		}
		if (poll(p, n, timeout) < 0 && errno != EINTR)
			return;
		if (p[0].revents)
			on_signals(c);
		if (waiting) {
			waiting = 0; /* SIGIO (a host connected), or the fallback timeout */
			continue;
		}
		if (p[1].revents & (POLLIN | POLLHUP | POLLERR)) {
			if (read_host(c) < 0) {
				hang_up(c);
				if (!c->is_port)
					return;
				waiting = 1;
				continue;
			}
		}
		for (nfds_t i = 2; i < n; i++) {
			struct stream *s = who[i];
			if (!p[i].revents || s->kind != K_EXEC)
				continue;
			if (which[i] == 1)
				pump_out(c, s, &s->out_fd, AGP_T_STDOUT);
			else if (which[i] == 2)
				pump_out(c, s, &s->err_fd, AGP_T_STDERR);
			else
				pump_stdin(c, s);
		}
		now = now_ms();
		for (int i = 0; i < AGP_MAX_STREAMS; i++) {
			struct stream *s = &c->s[i];
			if (s->kind == K_EXEC && s->exited &&
			    ((s->out_fd < 0 && s->err_fd < 0) || now >= s->exit_ms + EXIT_GRACE_MS))
				finish_exec(c, s);
			else if (s->kind == K_EXEC && s->in_eof && s->inlen == 0 && !s->pty)
				close_fd(&s->in_fd);
			else if (s->kind == K_GET)
				pump_get(c, s);
		}
		if (c->outlen && flush_out(c) < 0) {
			hang_up(c);
			if (!c->is_port)
				return;
			waiting = 1;
		}
	}
}

/* ---- ports and the supervisor ---- */

static int signal_fd(void)
{
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGCHLD);
	sigaddset(&set, SIGIO);
	sigprocmask(SIG_BLOCK, &set, NULL);
	return signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
}

/* Serve the port /dev/<dev> for good. */
static void __attribute__((noreturn)) serve_port(const char *dev)
{
	char path[300];
	snprintf(path, sizeof path, "/dev/%s", dev);
	struct conn *c = calloc(1, sizeof *c);
	if (!c)
		_exit(1);
	c->sigfd = signal_fd();
	c->is_port = 1;
	c->fd = open(path, O_RDWR | O_CLOEXEC | O_NONBLOCK);
	if (c->fd < 0) {
		logmsg("open %s: %s", path, strerror(errno));
		_exit(1);
	}
	/* SIGIO when a host connects (virtio_console signals the port's owner) */
	fcntl(c->fd, F_SETOWN, getpid());
	fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_ASYNC);
	/* a host already connected learns that this port server is new (the one it talked
	 * to is gone, and so is what it ran); with no host the frame is dropped */
	c->live = 1;
	unsigned char b[8];
	agp_put32(b, AGP_VERSION);
	agp_put32(b + 4, (uint32_t)getpid());
	send_frame(c, 0, AGP_T_RESTART, b, 8, NULL, 0);
	/* now, before reading: what the last server left unread (the middle of a frame) may
	 * break the protocol, and a hang-up would drop the frame */
	if (flush_out(c) < 0 || c->outlen)
		c->outlen = 0;
	serve(c);
	_exit(1);
}

struct port {
	char dev[64];
	pid_t pid;
};

/* The agent's ports: /sys/class/virtio-ports/<dev>/name starting with the prefix. */
static int find_ports(struct port *ports)
{
	int n = 0;
	DIR *d = opendir("/sys/class/virtio-ports");
	if (!d)
		return 0;
	struct dirent *e;
	while ((e = readdir(d)) && n < MAX_PORTS) {
		size_t dl = strlen(e->d_name);
		if (e->d_name[0] == '.' || dl >= sizeof ports[n].dev)
			continue;
		char path[512], name[128] = "";
		snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			continue;
		ssize_t r = read(fd, name, sizeof name - 1);
		close(fd);
		if (r > 0 && !strncmp(name, AGP_PORT_PREFIX, strlen(AGP_PORT_PREFIX))) {
			memcpy(ports[n].dev, e->d_name, dl + 1);
			ports[n++].pid = 0;
		}
	}
	closedir(d);
	return n;
}

static pid_t spawn_port(const char *dev)
{
	pid_t pid = fork();
	if (pid == 0)
		serve_port(dev);
	return pid;
}

static int vsock_listen(void)
{
	int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	struct sockaddr_vm a = {
	    .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = AGP_VSOCK_PORT};
	if (bind(fd, (struct sockaddr *)&a, sizeof a) != 0 || listen(fd, 16) != 0) {
		logmsg("vsock port %d: %s", AGP_VSOCK_PORT, strerror(errno));
		close(fd);
		return -1;
	}
	return fd;
}

static void serve_vsock(int lfd, int sigfd)
{
	int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
	if (fd < 0)
		return;
	pid_t pid = fork();
	if (pid == 0) {
		struct conn *c = calloc(1, sizeof *c);
		if (!c)
			_exit(1);
		close(lfd);
		close(sigfd);
		c->sigfd = signal_fd();
		c->fd = fd;
		c->live = 1;
		serve(c);
		_exit(0);
	}
	close(fd);
}

/* Is a vsock device bound to its virtio driver? (/dev/vsock exists as soon as the module
 * is loaded, device or not: under QEMU there is none) */
static int vsock_device(void)
{
	DIR *d = opendir("/sys/bus/virtio/drivers/vmw_vsock_virtio_transport");
	if (!d)
		return 0;
	struct dirent *e;
	int found = 0;
	while (!found && (e = readdir(d)))
		found = !strncmp(e->d_name, "virtio", 6);
	closedir(d);
	return found;
}

/* Started by the init shim (announce): one console line says which channels the agent
 * serves, which the host reads instead of waiting for an agent that cannot answer; with
 * none it exits (nothing for it to do in a guest whose kernel has neither). */
static void announce_channels(int ports, int vsock)
{
	int fd = open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
	dprintf(fd >= 0 ? fd : 2, AGP_CHANNELS_LINE " ports=%d vsock=%d\n", ports, vsock);
	if (fd >= 0)
		close(fd);
	if (ports == 0 && !vsock)
		_exit(0);
}

/* One agent per guest: an image imported with the agent may be a fireclaw rootfs booted
 * with fireclaw's initramfs, whose /init starts /usr/sbin/fireclaw-agent as well, and two
 * servers on one port would share its bytes. The first one binds an abstract unix socket (gone with
 * it, no file to go stale); a second one finds the name taken and exits. */
static int first_agent(void)
{
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	static const char name[] = "\0fireclaw-agent";
	memcpy(a.sun_path, name, sizeof name - 1);
	if (fd < 0)
		return 1; /* cannot tell: serve */
	if (bind(fd, (struct sockaddr *)&a,
		 offsetof(struct sockaddr_un, sun_path) + sizeof name - 1) == 0)
		return 1; /* fd stays open (and bound) as long as this supervisor lives */
	close(fd);
	return errno != EADDRINUSE;
}

static int __attribute__((noreturn)) supervise(int announce)
{
	static struct port ports[MAX_PORTS];
	int n = find_ports(ports);
	/* a port's name comes from the host a moment after the device: wait a little */
	for (int i = 0; i < 40 && n == 0 && access("/sys/class/virtio-ports", F_OK) == 0; i++) {
		usleep(50000);
		n = find_ports(ports);
	}
	/* the guest's channels, whichever agent ends up serving them (the host waits for it) */
	if (announce)
		announce_channels(n, access("/dev/vsock", F_OK) == 0 && vsock_device());
	if (!first_agent()) {
		logmsg("another agent serves this guest already: this one exits");
		_exit(0);
	}
	int sigfd = signal_fd();
	for (int i = 0; i < n; i++)
		ports[i].pid = spawn_port(ports[i].dev);
	int lfd = access("/dev/vsock", F_OK) == 0 ? vsock_listen() : -1;
	if (n == 0 && lfd < 0)
		logmsg("no port named " AGP_PORT_PREFIX "N and no vsock: nothing to serve");
	for (;;) {
		struct pollfd p[2] = {{.fd = sigfd, .events = POLLIN},
				      {.fd = lfd, .events = POLLIN}};
		if (poll(p, lfd >= 0 ? 2 : 1, -1) < 0 && errno != EINTR)
			sleep(1);
		if (lfd >= 0 && p[1].revents)
			serve_vsock(lfd, sigfd);
		if (!p[0].revents)
			continue;
		struct signalfd_siginfo si;
		while (read(sigfd, &si, sizeof si) == (ssize_t)sizeof si)
			;
		pid_t pid;
		while ((pid = waitpid(-1, NULL, WNOHANG)) > 0)
			for (int i = 0; i < n; i++)
				if (ports[i].pid == pid) { /* a port server died: a new one */
					usleep(100000);
					ports[i].pid = spawn_port(ports[i].dev);
				}
	}
}

/* ---- the init shim: PID 1 of an imported image (docs/agent-protocol.md, "Imported
 * images") ---- */

/* One line on the console; PID 1 goes on whatever happened. */
static void shim_say(const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	int fd = open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
	dprintf(fd >= 0 ? fd : 2, "fireclaw-agent: init shim: %s\n", buf);
	if (fd >= 0)
		close(fd);
}

static void shim_mount(const char *what, const char *type, const char *dir, const char *present)
{
	if (present && access(present, F_OK) == 0)
		return;
	if (mount(what, dir, type, MS_NOSUID | MS_NOEXEC, NULL) != 0 && errno != EBUSY)
		shim_say("mount %s on %s: %s", type, dir, strerror(errno));
}

/* /dev must be a devtmpfs (the agent opens its ports there): a rootfs's static /dev has no
 * node for them. The kernel (CONFIG_DEVTMPFS_MOUNT) or an initramfs has mounted it mostly. */
static void shim_dev(void)
{
	struct statfs s;
	if (statfs("/dev", &s) == 0 && s.f_type == TMPFS_MAGIC)
		return;
	if (mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, NULL) != 0)
		shim_say("mount devtmpfs on /dev: %s", strerror(errno));
}

/* fireclaw.init=PATH of /proc/cmdline (the image's own init= as given at import), into
 * buf; "" when there is none. */
static void shim_real_init(char *buf, size_t len)
{
	buf[0] = 0;
	char line[4096];
	int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
	ssize_t r = fd >= 0 ? read(fd, line, sizeof line - 1) : -1;
	if (fd >= 0)
		close(fd);
	if (r <= 0)
		return;
	line[r] = 0;
	for (char *tok = strtok(line, " \t\n"); tok; tok = strtok(NULL, " \t\n")) {
		if (!strcmp(tok, "--"))
			break; /* the rest is init's arguments */
		if (!strncmp(tok, "fireclaw.init=", 14) && tok[14] == '/' && strlen(tok + 14) < len)
			snprintf(buf, len, "%s", tok + 14);
	}
}

/* Exec the image's init with our arguments, as the kernel would have: its own init= first,
 * then the kernel's list. Returns only if none could run. */
static void shim_exec_init(int argc, char **argv)
{
	char own[1024];
	shim_real_init(own, sizeof own);
	const char *list[] = {own, "/sbin/init", "/etc/init", "/bin/init", "/bin/sh"};
	char **av = calloc((size_t)argc + 1, sizeof *av);
	if (!av) {
		shim_say("out of memory");
		return;
	}
	for (int i = 1; i < argc; i++)
		av[i] = argv[i];
	for (size_t i = 0; i < sizeof list / sizeof list[0]; i++) {
		if (!list[i][0])
			continue;
		av[0] = (char *)list[i];
		execv(list[i], av);
		shim_say("exec %s: %s", list[i], strerror(errno));
		if (i == 0)
			return; /* the kernel too stops at an init= that cannot run */
	}
}

/* PID 1 of an image imported with the agent (init=/.fireclaw/bin/fireclaw-agent): mount
 * what the agent needs, start it, then become the image's own init. Nothing here may
 * stop the boot: every failure is one console line and the image's init still runs. */
static void __attribute__((noreturn)) init_shim(int argc, char **argv)
{
	shim_mount("proc", "proc", "/proc", "/proc/self");
	shim_mount("sysfs", "sysfs", "/sys", "/sys/class");
	shim_dev();
	pid_t pid = fork();
	if (pid == 0) {
		setsid();
		int fd = open("/dev/null", O_RDWR | O_CLOEXEC);
		if (fd >= 0)
			dup2(fd, 0);
		signal(SIGPIPE, SIG_IGN);
		srandom((unsigned)(getpid() ^ (unsigned)now_ms()));
		supervise(1);
	}
	if (pid < 0)
		shim_say("fork: %s: no agent in this boot", strerror(errno));
	shim_exec_init(argc, argv);
	shim_say("no init could run: the kernel panics");
	_exit(1);
}

int main(int argc, char **argv)
{
	if (getpid() == 1)
		init_shim(argc, argv); /* before anything changes what the image's init inherits */
	signal(SIGPIPE, SIG_IGN);
	srandom((unsigned)(getpid() ^ (unsigned)now_ms()));
	if (argc == 3 && !strcmp(argv[1], "--serve-fd")) {
		struct conn *c = calloc(1, sizeof *c);
		if (!c)
			return 1;
		c->sigfd = signal_fd();
		c->fd = atoi(argv[2]);
		c->live = 1;
		serve(c);
		return 0;
	}
	if (argc == 2 && !strcmp(argv[1], "--version")) {
		printf("fireclaw-agent %d\n", AGP_VERSION);
		return 0;
	}
	if (argc == 2 && !strcmp(argv[1], "--daemon")) {
		pid_t pid = fork();
		if (pid < 0)
			return 1;
		if (pid > 0)
			return 0;
		setsid();
		int fd = open("/dev/null", O_RDWR);
		if (fd >= 0) {
			dup2(fd, 0);
			if (fd > 2)
				close(fd);
		}
	} else if (argc != 1) {
		dprintf(2, "usage: fireclaw-agent [--daemon] | --serve-fd N | --version\n");
		return 2;
	}
	supervise(0);
}
