/* fc_sftp.c - fireclaw.ssh: session:put, session:get and ssh.check_source over SFTP, with
 * their caps (size, stall, mode, owner). See core/ssh.c. */
#include "fc_ssh.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <libssh2.h>
#include <libssh2_sftp.h>

/* ---- SFTP ----
 *
 * What a guest sends is data: a get never lets it choose where a file lands, what
 * privileges it carries, how big it gets or how long it takes.
 * - The local target is resolved like cp's: an existing directory (or a name ending in /)
 *   means "into it, under the remote's basename"; a symlink there is not a directory. The
 *   target's directory is opened once; the data goes to a new name in it (O_CREAT|O_EXCL|
 *   O_NOFOLLOW) that is renamed over the target at the end, so a symlink at the target is
 *   replaced, never followed, and a failed get leaves the old target (or nothing).
 * - Its mode is the remote's permission bits & 0777 & ~umask, as cp without -p: never
 *   setuid, setgid or sticky. Run through sudo (euid 0, SUDO_UID and SUDO_GID set), the
 *   file belongs to the sudo user, not root.
 * - max_bytes (default 1 GiB) caps what a get accepts and what a put sends; a file said to
 *   be larger is refused before a byte moves, one that turns out larger is cut off there.
 * - stall (seconds; default FIRECLAW_TRANSFER_STALL_S, else 30): no progress for that long
 *   ends the transfer (sftp-server opening a FIFO nobody writes waits forever).
 * - put sends regular files only (a FIFO's or device's end is not ours to wait for) and
 *   resolves a remote directory target the same way.
 */

#define CAP_HINT "--max-transfer / max_bytes raises it"
/* libssh2 1.10 pipelines the write requests of one libssh2_sftp_write call (30000 bytes
 * each) and, when one fails, drops the others — one of them possibly half sent, which
 * leaves the SFTP stream out of step: no later request, not even the close, is ever
 * answered. One request per call (at most 30000 bytes) cannot be half sent when its
 * answer comes; under TCG it is no slower. */
#define PUT_CHUNK 30000
#define DISK_HINT                                                                                  \
	"; put a smaller file or make room in the guest (a bigger image: fireclaw image build "    \
	"--size)"

static void human_size(char *out, size_t n, unsigned long long b)
{
	static const char *const units[] = {"bytes", "KiB", "MiB", "GiB", "TiB"};
	double v = (double)b;
	int u = 0;
	while (v >= 1024 && u < 4) {
		v /= 1024;
		u++;
	}
	if (u == 0)
		snprintf(out, n, "%llu bytes", b);
	else if (v == (double)(unsigned long long)v)
		snprintf(out, n, "%.0f %s", v, units[u]);
	else
		snprintf(out, n, "%.1f %s", v, units[u]);
}

static void __attribute__((noreturn, format(printf, 3, 4)))
xfer_fail(lua_State *L, struct xfer *t, const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	fc_error(L, "ssh: %s %s → %s: %s", t->op, t->from, t->to, msg);
}

static void __attribute__((noreturn))
xfer_fail_local(lua_State *L, struct xfer *t, int err, const char *path)
{
	xfer_fail(L, t, "local %s: %s", path, strerror(err));
}

static const char *sftp_status_text(unsigned long code)
{
	switch (code) {
	case LIBSSH2_FX_NO_SUCH_FILE:
	case LIBSSH2_FX_NO_SUCH_PATH:
		return "no such file";
	case LIBSSH2_FX_PERMISSION_DENIED:
		return "permission denied";
	case LIBSSH2_FX_FILE_ALREADY_EXISTS:
		return "file exists";
	case LIBSSH2_FX_WRITE_PROTECT:
		return "read-only file system";
	case LIBSSH2_FX_NO_SPACE_ON_FILESYSTEM:
		return "no space left on device";
	case LIBSSH2_FX_QUOTA_EXCEEDED:
		return "quota exceeded";
	case LIBSSH2_FX_NOT_A_DIRECTORY:
		return "not a directory";
	case LIBSSH2_FX_INVALID_FILENAME:
		return "invalid file name";
	case LIBSSH2_FX_EOF:
		return "unexpected end of file";
	default:
		/* OpenSSH's sftp-server says FAILURE for every errno it has no code for */
		return "the guest's SFTP server reported a failure";
	}
}

/* The SFTP status of the last failed request, 0 when the failure was not one. */
static unsigned long sftp_status(struct xfer *t)
{
	if (t->sftp && libssh2_session_last_errno(t->S->s) == LIBSSH2_ERROR_SFTP_PROTOCOL)
		return libssh2_sftp_last_error(t->sftp);
	return 0;
}

static void __attribute__((noreturn))
xfer_fail_remote(lua_State *L, struct xfer *t, const char *what)
{
	unsigned long code = sftp_status(t);
	const char *remote = t->op[0] == 'g' ? t->from : t->to;
	if (code)
		xfer_fail(L, t, "remote %s: %s", remote, sftp_status_text(code));
	xfer_fail(L, t, "%s: %s (%s)", what, ssh_session_errmsg(t->S), t->S->where);
}

static void progress(struct xfer *t)
{
	t->last_ms = fc_now_ms();
}

/* Wait until the socket is ready; raise once nothing moved for the stall limit. */
static void xfer_wait(lua_State *L, struct xfer *t)
{
	if (!ssh_wait_socket(L, t->S, t->last_ms + t->stall_ms))
		xfer_fail(
		    L, t,
		    "no progress for %g s: the guest stalled (FIRECLAW_TRANSFER_STALL_S or the "
		    "stall option changes the limit)",
		    t->stall_ms / 1e3);
}

/* A libssh2 SFTP call retried until it stops saying EAGAIN; an answer is progress. */
#define XFER_CALL(L, t, rc, expr)                                                                  \
	do {                                                                                       \
		while (((rc) = (expr)) == LIBSSH2_ERROR_EAGAIN)                                    \
			xfer_wait((L), (t));                                                       \
		progress(t);                                                                       \
	} while (0)

static void __attribute__((noreturn)) too_big(lua_State *L, struct xfer *t, const char *who)
{
	char cap[32];
	human_size(cap, sizeof cap, t->max_bytes);
	xfer_fail(L, t, "%s more than %s (" CAP_HINT ")", who, cap);
}

static void sftp_start(lua_State *L, struct xfer *t)
{
	while (!(t->sftp = libssh2_sftp_init(t->S->s))) {
		if (!ssh_is_eagain_ptr(t->S, t->sftp)) {
			int e = libssh2_session_last_errno(t->S->s);
			if (e == LIBSSH2_ERROR_CHANNEL_FAILURE ||
			    e == LIBSSH2_ERROR_CHANNEL_REQUEST_DENIED)
				xfer_fail(L, t,
					  "the server offers no SFTP subsystem (a dropbear guest "
					  "needs /usr/lib/sftp-server)");
			xfer_fail_remote(L, t, "start SFTP");
		}
		xfer_wait(L, t);
	}
	progress(t);
}

static void sftp_open_remote(lua_State *L, struct xfer *t, const char *path, unsigned long flags,
			     long mode)
{
	while (!(t->h = libssh2_sftp_open_ex(t->sftp, path, (unsigned)strlen(path), flags, mode,
					     LIBSSH2_SFTP_OPENFILE))) {
		if (!ssh_is_eagain_ptr(t->S, t->h))
			xfer_fail_remote(L, t, "open");
		xfer_wait(L, t);
	}
	progress(t);
}

/* The last component of path (trailing slashes ignored) into out; 0 if it has none that
 * can name a file ("", ".", ".."). */
static int base_name(const char *path, char *out, size_t n)
{
	size_t end = strlen(path);
	while (end > 0 && path[end - 1] == '/')
		end--;
	size_t start = end;
	while (start > 0 && path[start - 1] != '/')
		start--;
	size_t len = end - start;
	if (len == 0 || len >= n || (len == 1 && path[start] == '.') ||
	    (len == 2 && path[start] == '.' && path[start + 1] == '.'))
		return 0;
	memcpy(out, path + start, len);
	out[len] = '\0';
	return 1;
}

/* t->resolved = dir/base (one slash between) and it becomes the target in messages. */
static void set_target(lua_State *L, struct xfer *t, const char *dir, const char *base)
{
	size_t n = strlen(dir);
	const char *sep = n > 0 && dir[n - 1] == '/' ? "" : "/";
	if (snprintf(t->resolved, sizeof t->resolved, "%s%s%s", dir, sep, base) >=
	    (int)sizeof t->resolved)
		xfer_fail(L, t, "target path too long");
	t->to = t->resolved;
}

static void sftp_close_remote(lua_State *L, struct xfer *t)
{
	int rc;
	XFER_CALL(L, t, rc, libssh2_sftp_close_handle(t->h));
	t->h = NULL; /* freed by libssh2 whatever the outcome */
	if (rc < 0)
		xfer_fail_remote(L, t, "close");
}

/* ---- put ---- */

/* Why local file `path` cannot be sent, or NULL (then *fd is open on it, non-blocking
 * for nothing: regular files ignore O_NONBLOCK). stat first: opening a device may act. */
static const char *source_problem(const char *path, unsigned long long max, int *fd,
				  struct stat *st, char *why, size_t n)
{
	char a[32], b[32];
	*fd = -1;
	if (stat(path, st) != 0 && errno == ENOENT)
		return "does not exist";
	if (stat(path, st) != 0) {
		snprintf(why, n, "cannot be read: %s", strerror(errno));
		return why;
	}
	if (S_ISDIR(st->st_mode))
		return "is a directory; directory trees are not supported yet (put a tar archive "
		       "and unpack it in the guest)";
	if (!S_ISREG(st->st_mode))
		return "is not a regular file (a FIFO, device or socket has no end to wait for; "
		       "copy what you need into a file first)";
	if ((unsigned long long)st->st_size > max) {
		human_size(a, sizeof a, (unsigned long long)st->st_size);
		human_size(b, sizeof b, max);
		snprintf(why, n, "is %s, more than %s (" CAP_HINT ")", a, b);
		return why;
	}
	*fd = open(path, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
	if (*fd < 0) {
		snprintf(why, n, "cannot be read: %s", strerror(errno));
		return why;
	}
	if (fstat(*fd, st) != 0 || !S_ISREG(st->st_mode)) {
		close(*fd);
		*fd = -1;
		return "changed while it was opened";
	}
	return NULL;
}

/* The guest's free space where the file goes, asked right after the open (statvfs@openssh.com;
 * skipped when the server lacks it): a file that cannot fit fails before a byte is sent,
 * and a write that fails later is told with these numbers. */
static void check_room(lua_State *L, struct xfer *t)
{
	LIBSSH2_SFTP_STATVFS v;
	memset(&v, 0, sizeof v);
	int rc;
	XFER_CALL(L, t, rc, libssh2_sftp_fstatvfs(t->h, &v));
	if (rc != 0 || v.f_blocks == 0)
		return;
	unsigned long long bs = v.f_frsize ? v.f_frsize : v.f_bsize;
	t->room = (unsigned long long)v.f_bfree * bs; /* sftp-server runs as root: f_bfree */
	human_size(t->room_text, sizeof t->room_text, t->room);
	char total[32], size[32];
	human_size(total, sizeof total, (unsigned long long)v.f_blocks * bs);
	human_size(size, sizeof size, t->size);
	size_t n = strlen(t->room_text);
	snprintf(t->room_text + n, sizeof t->room_text - n, " free of %s; the file is %s", total,
		 size);
	if (t->size > t->room)
		xfer_fail(L, t, "the guest's disk is full (%s)" DISK_HINT, t->room_text);
}

/* After a put's write or close failed. sftp-server has no status code for ENOSPC (it says
 * FAILURE), so a generic failure is told with the room check_room saw. */
static void __attribute__((noreturn)) put_fail(lua_State *L, struct xfer *t, const char *what)
{
	unsigned long code = sftp_status(t);
	char done[32];
	human_size(done, sizeof done, t->done);
	if (t->room_text[0] &&
	    (code == LIBSSH2_FX_FAILURE || code == LIBSSH2_FX_NO_SPACE_ON_FILESYSTEM ||
	     code == LIBSSH2_FX_QUOTA_EXCEEDED))
		xfer_fail(
		    L, t,
		    "the guest stopped writing after %s: its disk is most likely full (before "
		    "the put: %s)" DISK_HINT,
		    done, t->room_text);
	xfer_fail_remote(L, t, what);
}

/* cp's rule for the remote target: an existing directory (or a name ending in /) means
 * "into it, under the local basename". */
static void put_resolve_remote(lua_State *L, struct xfer *t, const char *dest)
{
	size_t n = strlen(dest);
	int into = n > 0 && dest[n - 1] == '/';
	if (!into) {
		LIBSSH2_SFTP_ATTRIBUTES a;
		memset(&a, 0, sizeof a);
		int rc;
		XFER_CALL(L, t, rc,
			  libssh2_sftp_stat_ex(t->sftp, dest, (unsigned)n, LIBSSH2_SFTP_STAT, &a));
		into =
		    rc == 0 && (a.flags & LIBSSH2_SFTP_ATTR_PERMISSIONS) && S_ISDIR(a.permissions);
	}
	if (!into)
		return;
	if (!base_name(t->src, t->base, sizeof t->base))
		xfer_fail(L, t, "local %s has no file name to put into remote directory %s", t->src,
			  dest);
	set_target(L, t, dest, t->base);
}

static void send_all(lua_State *L, struct xfer *t, const char *p, size_t n)
{
	while (n > 0) {
		ssize_t w = libssh2_sftp_write(t->h, p, n);
		if (w == LIBSSH2_ERROR_EAGAIN) {
			xfer_wait(L, t);
			continue;
		}
		if (w < 0)
			put_fail(L, t, "write");
		progress(t);
		t->done += (unsigned long long)w;
		p += w;
		n -= (size_t)w;
	}
}

static int put_body(lua_State *L)
{
	struct xfer *t = lua_touserdata(L, 1);
	const char *dest = lua_tostring(L, 2);
	struct stat st;
	char why[160];
	const char *problem = source_problem(t->src, t->max_bytes, &t->fd, &st, why, sizeof why);
	if (problem)
		xfer_fail(L, t, "local %s %s", t->src, problem);
	t->size = (unsigned long long)st.st_size;
	long mode = t->mode >= 0 ? t->mode : (long)(st.st_mode & 07777);
	sftp_start(L, t);
	put_resolve_remote(L, t, dest);
	sftp_open_remote(L, t, t->to, LIBSSH2_FXF_WRITE | LIBSSH2_FXF_CREAT | LIBSSH2_FXF_TRUNC,
			 mode);
	check_room(L, t);
	for (;;) {
		ssize_t n = read(t->fd, t->buf, PUT_CHUNK);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			xfer_fail_local(L, t, errno, t->src);
		if (n == 0)
			break;
		if ((unsigned long long)n > t->max_bytes - t->done)
			too_big(L, t, "the local file grew to");
		send_all(L, t, t->buf, (size_t)n);
	}
	/* the server's umask applied to the mode given at open: set it exactly */
	LIBSSH2_SFTP_ATTRIBUTES a = {.flags = LIBSSH2_SFTP_ATTR_PERMISSIONS,
				     .permissions = (unsigned long)mode};
	int rc;
	XFER_CALL(L, t, rc, libssh2_sftp_fsetstat(t->h, &a));
	if (rc < 0)
		put_fail(L, t, "chmod");
	XFER_CALL(L, t, rc, libssh2_sftp_close_handle(t->h));
	t->h = NULL; /* freed by libssh2 whatever the outcome */
	if (rc < 0)
		put_fail(L, t, "close");
	return 0;
}

/* ---- get ---- */

/* Open the directory the file will land in (t->dirfd) and the name in it (t->base). */
static void get_resolve_local(lua_State *L, struct xfer *t, const char *dest)
{
	size_t n = strlen(dest);
	if (n == 0 || n >= PATH_MAX)
		xfer_fail(L, t, "local path empty or too long");
	struct stat st;
	int into = dest[n - 1] == '/' || (lstat(dest, &st) == 0 && S_ISDIR(st.st_mode));
	char dir[PATH_MAX];
	if (into) {
		if (!base_name(t->src, t->base, sizeof t->base))
			xfer_fail(L, t,
				  "remote %s has no file name to copy into local directory %s",
				  t->src, dest);
		snprintf(dir, sizeof dir, "%s", dest);
		set_target(L, t, dest, t->base);
	} else {
		if (!base_name(dest, t->base, sizeof t->base))
			xfer_fail(L, t, "local %s names no file", dest);
		const char *slash = strrchr(dest, '/');
		if (!slash)
			snprintf(dir, sizeof dir, ".");
		else if (slash == dest)
			snprintf(dir, sizeof dir, "/");
		else
			snprintf(dir, sizeof dir, "%.*s", (int)(slash - dest), dest);
	}
	t->dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (t->dirfd < 0 && errno == ENOENT)
		xfer_fail(L, t, "local directory %s does not exist (create it first)", dir);
	if (t->dirfd < 0)
		xfer_fail_local(L, t, errno, dir);
}

/* A new file in the target's directory under a random name; never an existing one. */
static void open_local_temp(lua_State *L, struct xfer *t)
{
	for (int i = 0; i < 16; i++) {
		unsigned char r[6];
		if (getrandom(r, sizeof r, 0) != (ssize_t)sizeof r)
			xfer_fail_local(L, t, errno, "temporary name");
		snprintf(t->tmp, sizeof t->tmp, ".fctmp-%02x%02x%02x%02x%02x%02x", r[0], r[1], r[2],
			 r[3], r[4], r[5]);
		t->fd = openat(t->dirfd, t->tmp,
			       O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
		if (t->fd >= 0) {
			t->tmp_live = 1;
			return;
		}
		if (errno != EEXIST)
			xfer_fail_local(L, t, errno, t->to);
	}
	xfer_fail_local(L, t, EEXIST, t->to);
}

/* The remote file's permission bits; refuses anything but a regular file, and one that
 * says it is bigger than the cap (a sparse 100 GiB file costs the guest nothing). */
static long remote_mode(lua_State *L, struct xfer *t)
{
	LIBSSH2_SFTP_ATTRIBUTES a;
	memset(&a, 0, sizeof a);
	int rc;
	XFER_CALL(L, t, rc, libssh2_sftp_fstat(t->h, &a));
	if (rc < 0)
		xfer_fail_remote(L, t, "stat");
	if ((a.flags & LIBSSH2_SFTP_ATTR_PERMISSIONS) && (a.permissions & S_IFMT) &&
	    !S_ISREG(a.permissions))
		xfer_fail(L, t, "remote %s is not a regular file", t->src);
	if ((a.flags & LIBSSH2_SFTP_ATTR_SIZE) && a.filesize > t->max_bytes) {
		char sz[32];
		human_size(sz, sizeof sz, a.filesize);
		char who[64];
		snprintf(who, sizeof who, "the guest's file is %s,", sz);
		too_big(L, t, who);
	}
	return a.flags & LIBSSH2_SFTP_ATTR_PERMISSIONS ? (long)(a.permissions & 0777) : 0644;
}

static void write_all(lua_State *L, struct xfer *t, const char *p, size_t n)
{
	while (n > 0) {
		ssize_t w = write(t->fd, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0)
			xfer_fail_local(L, t, errno, t->to);
		p += w;
		n -= (size_t)w;
	}
}

/* Owner and mode on the descriptor, then the rename that makes it the target. */
static void finish_local(lua_State *L, struct xfer *t, long remote)
{
	mode_t mask = umask(0);
	umask(mask);
	mode_t mode = t->mode >= 0 ? (mode_t)t->mode : (mode_t)remote & 0777 & ~mask;
	if (t->uid >= 0 && fchown(t->fd, (uid_t)t->uid, (gid_t)t->gid) != 0)
		xfer_fail_local(L, t, errno, t->to);
	if (fchmod(t->fd, mode) != 0)
		xfer_fail_local(L, t, errno, t->to);
	int rc = close(t->fd);
	t->fd = -1;
	if (rc != 0)
		xfer_fail_local(L, t, errno, t->to);
	if (renameat(t->dirfd, t->tmp, t->dirfd, t->base) != 0)
		xfer_fail_local(L, t, errno, t->to);
	t->tmp_live = 0;
}

static int get_body(lua_State *L)
{
	struct xfer *t = lua_touserdata(L, 1);
	get_resolve_local(L, t, lua_tostring(L, 2));
	sftp_start(L, t);
	sftp_open_remote(L, t, t->src, LIBSSH2_FXF_READ, 0);
	long mode = remote_mode(L, t);
	open_local_temp(L, t);
	for (;;) {
		ssize_t n = libssh2_sftp_read(t->h, t->buf, sizeof t->buf);
		if (n == LIBSSH2_ERROR_EAGAIN) {
			xfer_wait(L, t);
			continue;
		}
		if (n < 0)
			xfer_fail_remote(L, t, "read");
		if (n == 0)
			break;
		progress(t);
		if ((unsigned long long)n > t->max_bytes - t->done)
			too_big(L, t, "the guest sent");
		t->done += (unsigned long long)n;
		write_all(L, t, t->buf, (size_t)n);
	}
	sftp_close_remote(L, t);
	finish_local(L, t, mode);
	return 0;
}

/* Let the server end the SFTP channel before we free it: send EOF, then drain until the
 * server's EOF arrives (sftp-server has exited). Dropbear 2022.83 drops the whole
 * connection when the client closes a channel whose last packets are still in flight,
 * which showed as the next exec failing with "Failed waiting for channel success". */
static void sftp_drain_channel(struct session *S, LIBSSH2_SFTP *sftp)
{
	LIBSSH2_CHANNEL *ch = libssh2_sftp_get_channel(sftp);
	if (!ch)
		return;
	int rc;
	NB_SETTLE(S, rc, libssh2_channel_send_eof(ch));
	if (rc != 0)
		return;
	double deadline = fc_now_ms() + CLEANUP_MS;
	char buf[512];
	while (!libssh2_channel_eof(ch)) {
		ssize_t n = libssh2_channel_read(ch, buf, sizeof buf);
		if (n == LIBSSH2_ERROR_EAGAIN) {
			if (!ssh_wait_socket_quietly(S, deadline))
				return;
		} else if (n < 0) {
			return;
		}
	}
}

/* Release handles, fds and temp file, without raising and within CLEANUP_MS each. */
static void xfer_cleanup(struct xfer *t)
{
	int rc;
	if (t->h) {
		NB_SETTLE(t->S, rc, libssh2_sftp_close_handle(t->h));
		if (rc == LIBSSH2_ERROR_TIMEOUT)
			ssh_break_transport(t->S); /* the retry below then fails fast and frees */
		if (rc == LIBSSH2_ERROR_TIMEOUT)
			NB_SETTLE(t->S, rc, libssh2_sftp_close_handle(t->h));
	}
	if (t->sftp) {
		sftp_drain_channel(t->S, t->sftp);
		NB_SETTLE(t->S, rc, libssh2_sftp_shutdown(t->sftp));
		if (rc == LIBSSH2_ERROR_TIMEOUT) {
			ssh_break_transport(t->S);
			NB_SETTLE(t->S, rc, libssh2_sftp_shutdown(t->sftp));
		}
	}
	t->h = NULL;
	t->sftp = NULL;
	if (t->fd >= 0)
		close(t->fd);
	t->fd = -1;
	if (t->tmp_live)
		unlinkat(t->dirfd, t->tmp, 0);
	t->tmp_live = 0;
	if (t->dirfd >= 0)
		close(t->dirfd);
	t->dirfd = -1;
}

static int run_xfer(lua_State *L, lua_CFunction body, const char *op)
{
	struct session *S = ssh_check_open(L, 1);
	const char *a = luaL_checkstring(L, 2), *b = luaL_checkstring(L, 3);
	lua_settop(L, 4);
	struct xfer *t = lua_newuserdata(L, sizeof *t);
	int ud = lua_gettop(L);
	memset(t, 0, sizeof *t);
	t->S = S;
	t->op = op;
	t->from = t->src = a;
	t->to = b;
	t->fd = t->dirfd = -1;
	sftp_read_xfer_opts(L, t, 4);
	progress(t);
	lua_pushcfunction(L, body);
	lua_pushvalue(L, ud);
	lua_pushvalue(L, 3);
	S->busy = 1;
	int rc = lua_pcall(L, 2, 0, 0);
	S->busy = 0;
	xfer_cleanup(t);
	if (rc != 0)
		lua_error(L);
	lua_pushstring(L, t->to);
	return 1;
}

/* session:put(local, remote [, mode | opts]) -> the remote path written; mode defaults to
 * the local file's */
int ssh_l_put(lua_State *L)
{
	return run_xfer(L, put_body, "put");
}

/* session:get(remote, local [, mode | opts]) -> the local path written; mode defaults to
 * the remote file's & 0777 & ~umask */
int ssh_l_get(lua_State *L)
{
	return run_xfer(L, get_body, "get");
}

/* ssh.check_source(path [, max_bytes]) -> size | nil, why: can put send this file? */
int ssh_l_check_source(lua_State *L)
{
	const char *path = luaL_checkstring(L, 1);
	double max = luaL_optnumber(L, 2, (double)DEFAULT_MAX_BYTES);
	if (!(max >= 0 && max <= MAX_BYTES_LIMIT))
		luaL_argerror(L, 2, "a byte count expected");
	int fd;
	struct stat st;
	char why[160];
	const char *problem =
	    source_problem(path, (unsigned long long)max, &fd, &st, why, sizeof why);
	if (fd >= 0)
		close(fd);
	if (problem) {
		lua_pushnil(L);
		lua_pushstring(L, problem);
		return 2;
	}
	lua_pushnumber(L, (double)st.st_size);
	return 1;
}
