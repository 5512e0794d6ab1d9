/* fc_rootfs_copy.c - fireclaw.rootfs: rootfs.copy (reflink, else a sparse copy),
 * rootfs.copy_rest (the rest of a copy begun with a head only) and rootfs.space. See
 * core/rootfs.c. */
#include "fc_rootfs.h"

#include <errno.h>
#include <et/com_err.h>
#include <ext2fs/ext2fs.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/fs.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#define COPY_CHUNK (64 << 20)

/* One copy in progress. It runs under lua_cpcall so that a Ctrl-C between two chunks
 * (fc_check_interrupt) unwinds to rootfs_l_copy, which closes and removes the half-made
 * copy. */
struct copy_job {
	lua_State *L;
	int in, out;
	off_t size;
	off_t from, upto; /* the part of the source whose data is copied: [from, upto) */
	int result;	  /* 1 reflink, 0 sparse copy, -errno */
};

/* Copy [off, end) with copy_file_range; *fallback is set (and 0 returned with nothing
 * lost) when the kernel refuses it for this pair of files. */
static int copy_range_kernel(struct copy_job *j, off_t off, off_t end, int *fallback)
{
	while (off < end) {
		fc_check_interrupt(j->L);
		loff_t a = off, b = off;
		size_t n = (size_t)(end - off < COPY_CHUNK ? end - off : COPY_CHUNK);
		ssize_t r = copy_file_range(j->in, &a, j->out, &b, n, 0);
		if (r < 0 &&
		    (errno == EXDEV || errno == ENOSYS || errno == EINVAL || errno == EOPNOTSUPP)) {
			*fallback = 1;
			return 0;
		}
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return -errno;
		if (r == 0)
			return -EIO; /* the source shrank under us */
		off += r;
	}
	return 0;
}

/* The same with pread/pwrite, for files copy_file_range refuses. */
static int copy_range_rw(struct copy_job *j, char *buf, size_t bufsize, off_t off, off_t end)
{
	while (off < end) {
		fc_check_interrupt(j->L);
		size_t n = (size_t)(end - off) < bufsize ? (size_t)(end - off) : bufsize;
		ssize_t r = pread(j->in, buf, n, off);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return r < 0 ? -errno : -EIO;
		for (ssize_t done = 0; done < r;) {
			ssize_t w = pwrite(j->out, buf + done, (size_t)(r - done), off + done);
			if (w < 0 && errno != EINTR)
				return -errno;
			if (w > 0)
				done += w;
		}
		off += r;
	}
	return 0;
}

/* Copy only the data ranges of the source's [from, upto) into the destination, which
 * already has the full size (holes where nothing was copied). Returns 0 or -errno. */
static int copy_sparse(struct copy_job *j)
{
	int fallback = 0;
	char *buf = NULL;
	off_t off = j->from;
	while (off < j->upto) {
		off_t data = lseek(j->in, off, SEEK_DATA);
		if ((data < 0 && errno == ENXIO) || data >= j->upto)
			return 0; /* only a hole is left */
		if (data < 0)
			return -errno;
		off_t hole = lseek(j->in, data, SEEK_HOLE);
		if (hole < 0)
			return -errno;
		hole = hole < j->upto ? hole : j->upto;
		int err = fallback ? 0 : copy_range_kernel(j, data, hole, &fallback);
		if (!err && fallback) {
			/* Lua-owned, so an interrupt cannot leak it */
			if (!buf)
				buf = lua_newuserdata(j->L, 1 << 20);
			err = copy_range_rw(j, buf, 1 << 20, data, hole);
		}
		if (err)
			return err;
		off = hole;
	}
	return 0;
}

static int copy_protected(lua_State *L)
{
	struct copy_job *j = lua_touserdata(L, 1);
	j->L = L;
	if (j->from > 0) { /* copy_rest: the file has its size already */
		j->result = copy_sparse(j);
		return 0;
	}
	if (ioctl(j->out, FICLONE, j->in) == 0) {
		j->result = 1;
		return 0;
	}
	/* any FICLONE refusal (EOPNOTSUPP, EXDEV, EINVAL on ext4 ...) means: copy instead;
	 * a real I/O problem shows up again in the copy */
	j->result = ftruncate(j->out, j->size) < 0 ? -errno : copy_sparse(j);
	return 0;
}

/* Open src for a copy: a regular file; its size in *size. Raises. */
static int open_source(lua_State *L, const char *src, const char *dst, off_t *size)
{
	int in = open(src, O_RDONLY | O_CLOEXEC);
	if (in < 0)
		fc_errno_error(L, errno, "rootfs: copy %s to %s: open %s", src, dst, src);
	struct stat st;
	if (fstat(in, &st) < 0) {
		int e = errno;
		close(in);
		fc_errno_error(L, e, "rootfs: copy %s to %s: stat %s", src, dst, src);
	}
	if (!S_ISREG(st.st_mode)) {
		close(in);
		fc_error(L, "rootfs: copy %s to %s: %s is not a regular file", src, dst, src);
	}
	*size = st.st_size;
	return in;
}

int rootfs_l_copy(lua_State *L)
{
	const char *src = luaL_checkstring(L, 1), *dst = luaL_checkstring(L, 2);
	static const char *const known[] = {"head", NULL};
	lua_settop(L, 3);
	if (!lua_isnil(L, 3)) {
		luaL_checktype(L, 3, LUA_TTABLE);
		fc_opt_check(L, 3, "rootfs.copy", known);
	}
	double head = lua_isnil(L, 3) ? -1 : fc_opt_number(L, 3, "head", -1);
	if (!lua_isnil(L, 3) && !(head == -1 || (head >= 0 && head <= 1e15)))
		fc_error(L, "rootfs: copy: head must be a byte count, not %.0f", head);
	off_t size;
	int in = open_source(L, src, dst, &size);
	int out = open(dst, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (out < 0) {
		int e = errno;
		close(in);
		fc_errno_error(L, e, "rootfs: copy %s to %s: create %s", src, dst, dst);
	}
	struct copy_job job = {.in = in, .out = out, .size = size, .upto = size};
	if (head >= 0 && (off_t)head < size)
		job.upto = (off_t)head;
	int raised = lua_cpcall(L, copy_protected, &job);
	if (!raised && job.result >= 0 && close(out) < 0)
		job.result = -errno;
	else if (raised || job.result < 0)
		close(out);
	close(in);
	if (raised || job.result < 0)
		unlink(dst);
	if (raised)
		lua_error(L); /* the interrupt, passed on */
	if (job.result < 0)
		fc_errno_error(L, -job.result, "rootfs: copy %s to %s", src, dst);
	lua_pushstring(L, job.result == 1 ? "reflink" : "sparse");
	return 1;
}

/* The rest of a sparse copy that rootfs.copy made with a head only: the data of src from
 * byte `from` on, into the existing dst (of src's size). On a failure dst stays (its owner
 * removes it). */
int rootfs_l_copy_rest(lua_State *L)
{
	const char *src = luaL_checkstring(L, 1), *dst = luaL_checkstring(L, 2);
	lua_Number from = luaL_checknumber(L, 3);
	if (!(from > 0 && from <= 1e15))
		fc_error(L, "rootfs: copy_rest: from must be a positive byte count, not %.0f",
			 from);
	off_t size;
	int in = open_source(L, src, dst, &size);
	int out = open(dst, O_WRONLY | O_NOFOLLOW | O_CLOEXEC);
	struct stat st;
	int e = out < 0 ? errno : fstat(out, &st) < 0 ? errno : 0;
	if (!e && (!S_ISREG(st.st_mode) || st.st_size != size))
		e = EINVAL; /* not the copy rootfs.copy began */
	if (e) {
		if (out >= 0)
			close(out);
		close(in);
		fc_errno_error(L, e, "rootfs: copy the rest of %s to %s", src, dst);
	}
	struct copy_job job = {
	    .in = in, .out = out, .size = size, .from = (off_t)from, .upto = size};
	int raised = lua_cpcall(L, copy_protected, &job);
	if (close(out) < 0 && !raised && job.result >= 0)
		job.result = -errno;
	close(in);
	if (raised)
		lua_error(L);
	if (job.result < 0)
		fc_errno_error(L, -job.result, "rootfs: copy the rest of %s to %s", src, dst);
	return 0;
}

int rootfs_l_space(lua_State *L)
{
	const char *path = luaL_checkstring(L, 1);
	struct statvfs sv;
	if (statvfs(path, &sv) < 0)
		fc_errno_error(L, errno, "rootfs: free space on %s", path);
	lua_pushnumber(L, (lua_Number)sv.f_bavail * (lua_Number)sv.f_frsize);
	return 1;
}
