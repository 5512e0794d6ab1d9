/* fc_rootfs_copy.c - fireclaw.rootfs: rootfs.copy (reflink, else a sparse copy),
 * rootfs.copy_rest (the rest of a copy begun with a head only), rootfs.qcow2_overlay (a
 * throw-away disk that copies nothing) and rootfs.space. See core/rootfs.c. */
#include "fc_rootfs.h"

#include <errno.h>
#include <et/com_err.h>
#include <ext2fs/ext2fs.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/fs.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
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

/* ---- rootfs.qcow2_overlay: an empty qcow2 v3 file on a raw backing file ----
 *
 * A throw-away VM's disk: QEMU writes the guest's changes into this file and reads the
 * rest from the backing file (a descriptor it is given read-only), so nothing is copied.
 * Layout (what qemu-img create makes): cluster 0 the header, its extensions and the
 * backing file's name; cluster 1 the refcount table (one entry); cluster 2 its refcount
 * block (16-bit counts: 1 for each of these clusters); then the L1 table, all zeros (no
 * L2 table yet: every cluster reads from the backing file). Only the first bytes of the
 * first three clusters are written; the rest of the file is a hole. */

#define QCOW2_MAGIC 0x514649fbu /* "QFI\xfb" */
#define QCOW2_EXT_BACKING_FMT 0xe2792acau
#define QCOW2_HEADER_LEN 112 /* v3 with the compression type byte (zlib: 0) */
#define QCOW2_INCOMPAT_EXTL2 (1u << 4)
#define QCOW2_MAX_L1_BYTES (32u << 20) /* QEMU refuses bigger L1 tables */
#define QCOW2_MAX_BACKING 1023	       /* QEMU's limit on the backing file's name */
#define QCOW2_MAX_SIZE (1ull << 50)    /* 1 PiB: more is a mistake, not a disk */

struct qcow2_geom {
	unsigned cluster_bits;
	int extended_l2;
	uint64_t size, l1_size, meta_clusters; /* header + refcount table + block + L1 */
};

static void put_be32(unsigned char *p, uint32_t v)
{
	for (int i = 3; i >= 0; i--, v >>= 8)
		p[i] = (unsigned char)v;
}

static void put_be64(unsigned char *p, uint64_t v)
{
	put_be32(p, (uint32_t)(v >> 32));
	put_be32(p + 4, (uint32_t)v);
}

/* The L1 size and the number of metadata clusters for this size; a line saying why not in
 * why (and -1) when the format cannot hold it with this cluster size. */
static int qcow2_plan(struct qcow2_geom *g, char *why, size_t len)
{
	uint64_t cs = 1ull << g->cluster_bits;
	uint64_t per_l2 = cs / (g->extended_l2 ? 16 : 8); /* extended L2 entries are 128-bit */
	uint64_t per_l1 = per_l2 * cs;			  /* bytes one L1 entry maps */
	g->l1_size = (g->size + per_l1 - 1) / per_l1;
	uint64_t l1_bytes = g->l1_size * 8;
	g->meta_clusters = 3 + (l1_bytes + cs - 1) / cs;
	if (l1_bytes > QCOW2_MAX_L1_BYTES || g->meta_clusters > cs / 2) {
		snprintf(why, len, "a %llu-byte disk needs a bigger cluster size than %llu",
			 (unsigned long long)g->size, (unsigned long long)cs);
		return -1;
	}
	return 0;
}

/* Cluster 0: the header, the backing format extension ("raw"), the end of the extensions,
 * then the backing file's name. buf holds QCOW2_HEADER_LEN + 24 + name_len bytes. */
static size_t qcow2_header(unsigned char *buf, const struct qcow2_geom *g, const char *name,
			   size_t name_len)
{
	uint64_t cs = 1ull << g->cluster_bits;
	size_t name_at = QCOW2_HEADER_LEN + 16 + 8;
	put_be32(buf, QCOW2_MAGIC);
	put_be32(buf + 4, 3);
	put_be64(buf + 8, name_at);
	put_be32(buf + 16, (uint32_t)name_len);
	put_be32(buf + 20, g->cluster_bits);
	put_be64(buf + 24, g->size);
	put_be32(buf + 36, (uint32_t)g->l1_size);
	put_be64(buf + 40, 3 * cs); /* L1 table */
	put_be64(buf + 48, cs);	    /* refcount table, one cluster */
	put_be32(buf + 56, 1);
	put_be64(buf + 72, g->extended_l2 ? QCOW2_INCOMPAT_EXTL2 : 0);
	put_be32(buf + 96, 4); /* refcount_order: 16-bit refcounts */
	put_be32(buf + 100, QCOW2_HEADER_LEN);
	put_be32(buf + QCOW2_HEADER_LEN, QCOW2_EXT_BACKING_FMT);
	put_be32(buf + QCOW2_HEADER_LEN + 4, 3);
	memcpy(buf + QCOW2_HEADER_LEN + 8, "raw", 3); /* padded to 8 with zeros */
	memcpy(buf + name_at, name, name_len);	      /* (the end extension: 8 zeros before) */
	return name_at + name_len;
}

/* Write the metadata into the new, empty file fd. Returns 0 or -errno. */
static int qcow2_write(int fd, const struct qcow2_geom *g, const char *name, size_t name_len)
{
	uint64_t cs = 1ull << g->cluster_bits;
	unsigned char head[QCOW2_HEADER_LEN + 24 + QCOW2_MAX_BACKING] = {0};
	size_t n = qcow2_header(head, g, name, name_len);
	unsigned char reftable[8];
	put_be64(reftable, 2 * cs);
	size_t refs_len = (size_t)g->meta_clusters * 2;
	unsigned char *refs = calloc(1, refs_len);
	if (!refs)
		return -ENOMEM;
	for (uint64_t i = 0; i < g->meta_clusters; i++)
		refs[2 * i + 1] = 1;
	int err = 0;
	errno = 0;
	if (ftruncate(fd, (off_t)(g->meta_clusters * cs)) < 0 ||
	    pwrite(fd, head, n, 0) != (ssize_t)n || pwrite(fd, reftable, 8, (off_t)cs) != 8 ||
	    pwrite(fd, refs, refs_len, (off_t)(2 * cs)) != (ssize_t)refs_len)
		err = errno ? -errno : -EIO;
	free(refs);
	return err;
}

/* Raise "rootfs: qcow2_overlay PATH: ..." (printf's formats: lua_pushfstring has no %zu
 * and prints big numbers in %g). */
static void __attribute__((format(printf, 3, 4), noreturn))
qcow2_fail(lua_State *L, const char *path, const char *fmt, ...)
{
	char msg[256];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	fc_error(L, "rootfs: qcow2_overlay %s: %s", path, msg);
}

/* Check the arguments of rootfs.qcow2_overlay into g; raises (misuse) on a bad one. */
static void qcow2_args(lua_State *L, const char *path, struct qcow2_geom *g)
{
	static const char *const known[] = {"cluster_size", "extended_l2", NULL};
	lua_Number size = luaL_checknumber(L, 2);
	if (!(size >= 512 && size <= (lua_Number)QCOW2_MAX_SIZE && fmod(size, 512) == 0))
		qcow2_fail(L, path,
			   "the virtual size must be a multiple of 512 bytes, from 512 to 1 PiB, "
			   "not %.0f",
			   (double)size);
	g->size = (uint64_t)size;
	double cs = 65536;
	if (!lua_isnoneornil(L, 4)) {
		luaL_checktype(L, 4, LUA_TTABLE);
		fc_opt_check(L, 4, "rootfs.qcow2_overlay", known);
		cs = fc_opt_number(L, 4, "cluster_size", cs);
		g->extended_l2 = fc_opt_bool(L, 4, "extended_l2", 0);
	}
	int bits = 0;
	while (bits < 22 && (double)(1u << bits) < cs)
		bits++;
	if (bits < 9 || bits > 21 || (double)(1u << bits) != cs)
		qcow2_fail(L, path,
			   "cluster_size must be a power of two from 512 to 2 MiB, not %.0f", cs);
	if (g->extended_l2 && bits < 14)
		qcow2_fail(L, path, "extended_l2 needs a cluster size of 16 KiB or more");
	g->cluster_bits = (unsigned)bits;
	char why[128];
	if (qcow2_plan(g, why, sizeof why) < 0)
		qcow2_fail(L, path, "%s", why);
}

int rootfs_l_qcow2_overlay(lua_State *L)
{
	const char *path = luaL_checkstring(L, 1);
	size_t name_len;
	const char *name = luaL_checklstring(L, 3, &name_len);
	struct qcow2_geom g = {0};
	qcow2_args(L, path, &g);
	if (name_len == 0 || name_len > QCOW2_MAX_BACKING || memchr(name, 0, name_len) ||
	    QCOW2_HEADER_LEN + 24 + name_len > (1u << g.cluster_bits))
		qcow2_fail(L, path,
			   "the backing file's name must be 1 to %d bytes without NUL (and fit in "
			   "the first cluster), not %zu bytes",
			   QCOW2_MAX_BACKING, name_len);
	int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (fd < 0)
		fc_errno_error(L, errno, "rootfs: qcow2_overlay: create %s", path);
	int err = qcow2_write(fd, &g, name, name_len);
	if (close(fd) < 0 && !err)
		err = -errno;
	if (err) {
		unlink(path);
		fc_errno_error(L, -err, "rootfs: qcow2_overlay: write %s", path);
	}
	return 0;
}
