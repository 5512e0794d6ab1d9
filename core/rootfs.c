/* rootfs.c - fireclaw.rootfs: per-run copies of disk images, and files read and written
 * inside an ext2/3/4 image with libext2fs, without mounting it.
 *
 *   rootfs.copy(src, dst) -> "reflink" | "sparse"
 *       dst is created 0600, exclusively (an existing dst is an error), and removed again
 *       if the copy fails. "reflink" shares the blocks (FICLONE: btrfs, xfs, ...); else
 *       only the data ranges are copied (SEEK_DATA/SEEK_HOLE + copy_file_range, or
 *       read/write where that is refused), so holes stay holes.
 *   local fs = rootfs.open(image [, "r" | "rw"])        default "r"
 *       fs:write(path, data [, opts])  create or replace a file; missing parent
 *                                      directories are made (mode opts.dir_mode or 0755,
 *                                      owner opts.uid/gid)
 *       fs:read(path) -> data          follows symlinks, inside the image
 *       fs:exists(path) -> bool        the name itself (a dangling symlink exists)
 *       fs:mkdir(path [, opts])        like mkdir -p; sets mode/owner of the last one
 *       fs:remove(path) -> removed     a file, symlink or empty directory; false if absent
 *       fs:list(path) -> {names}       sorted, without . and ..
 *       fs:stat(path) -> {type=, mode=, uid=, gid=, size=, mtime=, nlink=}   (no follow)
 *       fs:close()                     writes bitmaps and superblock (no fsync); safe
 *                                      twice; also __gc
 *   rootfs.write/read/exists/mkdir/remove/list/stat(image, path, ...)   one call each:
 *       open, do it, close.
 *   rootfs.space(path) -> bytes        free to an unprivileged writer on path's
 *       filesystem (statvfs f_bavail): what a disk copy there can still grow into.
 *
 *   opts: mode (a number such as tonumber("600", 8), or an octal string "0600"; default
 *   0644 for files, 0755 for directories), uid, gid (default 0).
 *
 * Paths are absolute inside the image; symlinks on the way resolve inside the image too.
 *
 * Consistency: every change accounts its inodes and blocks before anything points at them
 * and gives them back if a later step fails, so a failed call (no space, say) leaves the
 * image as e2fsck wants it once the handle is closed. An image whose journal needs
 * recovery (a disk taken from a running VM) is refused for writing: the kernel would
 * replay the journal over our changes.
 *
 * Style: the ext2 layer below returns errcode_t and never raises; Lua functions parse
 * their arguments first and raise only once nothing is left half-done.
 */
#include "fc.h"

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

#define IMAGE_MT "fireclaw.rootfs.image"
#define COPY_CHUNK (64 << 20)

/* ---- errors ---- */

static const char *basename_of(const char *path)
{
	const char *slash = strrchr(path, '/');
	return slash && slash[1] ? slash + 1 : path;
}

/* Text for a libext2fs error code or an errno value (both fit in errcode_t). */
static const char *reason(errcode_t e, char *buf, size_t len)
{
	switch (e) {
	case ENOSPC:
	case EXT2_ET_BLOCK_ALLOC_FAIL:
	case EXT2_ET_INODE_ALLOC_FAIL:
	case EXT2_ET_DIR_NO_SPACE:
	case EXT2_ET_DIR_NO_SPACE_FOR_CSUM:
		return "no space left on device";
	case ENOENT:
	case EXT2_ET_FILE_NOT_FOUND:
		return "no such file or directory";
	case ENOTDIR:
	case EXT2_ET_NO_DIRECTORY:
		return "not a directory";
	case EISDIR:
		return "is a directory";
	case ENOTEMPTY:
		return "directory not empty";
	case EXT2_ET_RO_FILSYS:
		return "image opened read-only (open it with \"rw\")";
	case ELOOP:
	case EXT2_ET_SYMLINK_LOOP:
		return "too many levels of symbolic links";
	}
	if (e > 0 && e < 4096) { /* errno: strerror, starting lower-case like the rest */
		snprintf(buf, len, "%s", strerror((int)e));
		if (buf[0] >= 'A' && buf[0] <= 'Z' && buf[1] >= 'a' && buf[1] <= 'z')
			buf[0] = (char)(buf[0] - 'A' + 'a');
		return buf;
	}
	return error_message(e);
}

/* Raise "rootfs: OP PATH in IMAGE: reason". */
static int fs_fail(lua_State *L, const char *op, const char *path, const char *image, errcode_t e)
    __attribute__((noreturn));
static int fs_fail(lua_State *L, const char *op, const char *path, const char *image, errcode_t e)
{
	char buf[128];
	fc_error(L, "rootfs: %s %s in %s: %s", op, path, basename_of(image),
		 reason(e, buf, sizeof buf));
}

/* ---- copy ---- */

/* One copy in progress. It runs under lua_cpcall so that a Ctrl-C between two chunks
 * (fc_check_interrupt) unwinds to l_copy, which closes and removes the half-made copy. */
struct copy_job {
	lua_State *L;
	int in, out;
	off_t size;
	int result; /* 1 reflink, 0 sparse copy, -errno */
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

/* Copy only the data ranges of the source into the destination, which already has the
 * full size as one hole. Returns 0 or -errno. */
static int copy_sparse(struct copy_job *j)
{
	int fallback = 0;
	char *buf = NULL;
	off_t off = 0;
	while (off < j->size) {
		off_t data = lseek(j->in, off, SEEK_DATA);
		if (data < 0 && errno == ENXIO)
			return 0; /* only a hole is left */
		if (data < 0)
			return -errno;
		off_t hole = lseek(j->in, data, SEEK_HOLE);
		if (hole < 0)
			return -errno;
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
	if (ioctl(j->out, FICLONE, j->in) == 0) {
		j->result = 1;
		return 0;
	}
	/* any FICLONE refusal (EOPNOTSUPP, EXDEV, EINVAL on ext4 ...) means: copy instead;
	 * a real I/O problem shows up again in the copy */
	j->result = ftruncate(j->out, j->size) < 0 ? -errno : copy_sparse(j);
	return 0;
}

static int l_copy(lua_State *L)
{
	const char *src = luaL_checkstring(L, 1), *dst = luaL_checkstring(L, 2);
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
	int out = open(dst, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (out < 0) {
		int e = errno;
		close(in);
		fc_errno_error(L, e, "rootfs: copy %s to %s: create %s", src, dst, dst);
	}
	struct copy_job job = {.in = in, .out = out, .size = st.st_size};
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

static int l_space(lua_State *L)
{
	const char *path = luaL_checkstring(L, 1);
	struct statvfs sv;
	if (statvfs(path, &sv) < 0)
		fc_errno_error(L, errno, "rootfs: free space on %s", path);
	lua_pushnumber(L, (lua_Number)sv.f_bavail * (lua_Number)sv.f_frsize);
	return 1;
}

/* ---- I/O: libext2fs on a file descriptor we own ----
 *
 * libext2fs reaches the image through an "I/O manager". The stock unix one fsyncs the
 * file when it opens it (to clear old block-device errors): on a freshly copied image
 * that flushes the whole copy to disk, ~10 ms here, for nothing, since the VMM reads the
 * copy through the same page cache. This one is plain pread/pwrite on a dup of our fd
 * (O_CLOEXEC, owned by the channel), and flush does not fsync either. The "name" given
 * to ext2fs_open2 is the fd number.
 */

struct fdio {
	int fd;
};

static errcode_t fdio_close(io_channel ch)
{
	if (--ch->refcount > 0)
		return 0;
	struct fdio *d = ch->private_data;
	errcode_t e = close(d->fd) < 0 ? errno : 0;
	free(d);
	free(ch->name);
	free(ch);
	return e;
}

static errcode_t fdio_set_blksize(io_channel ch, int blksize)
{
	ch->block_size = blksize;
	return 0;
}

/* count > 0: blocks; count < 0: -count bytes (how libext2fs asks for the superblock). */
static size_t fdio_bytes(io_channel ch, int count)
{
	return count < 0 ? (size_t)-count : (size_t)count * (size_t)ch->block_size;
}

static errcode_t fdio_read64(io_channel ch, unsigned long long block, int count, void *buf)
{
	struct fdio *d = ch->private_data;
	size_t len = fdio_bytes(ch, count), done = 0;
	off_t off = (off_t)(block * (unsigned long long)ch->block_size);
	while (done < len) {
		ssize_t r = pread(d->fd, (char *)buf + done, len - done, off + (off_t)done);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return errno;
		if (r == 0) { /* past the end: what there is, then zeros */
			memset((char *)buf + done, 0, len - done);
			return EXT2_ET_SHORT_READ;
		}
		done += (size_t)r;
	}
	return 0;
}

static errcode_t fdio_write_at(io_channel ch, off_t off, size_t len, const void *buf)
{
	struct fdio *d = ch->private_data;
	size_t done = 0;
	while (done < len) {
		ssize_t w = pwrite(d->fd, (const char *)buf + done, len - done, off + (off_t)done);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0)
			return errno;
		if (w == 0)
			return EXT2_ET_SHORT_WRITE;
		done += (size_t)w;
	}
	return 0;
}

static errcode_t fdio_write64(io_channel ch, unsigned long long block, int count, const void *buf)
{
	off_t off = (off_t)(block * (unsigned long long)ch->block_size);
	return fdio_write_at(ch, off, fdio_bytes(ch, count), buf);
}

static errcode_t fdio_read(io_channel ch, unsigned long block, int count, void *buf)
{
	return fdio_read64(ch, block, count, buf);
}

static errcode_t fdio_write(io_channel ch, unsigned long block, int count, const void *buf)
{
	return fdio_write64(ch, block, count, buf);
}

static errcode_t fdio_write_byte(io_channel ch, unsigned long offset, int count, const void *buf)
{
	return count < 0 ? EXT2_ET_INVALID_ARGUMENT
			 : fdio_write_at(ch, (off_t)offset, (size_t)count, buf);
}

static errcode_t fdio_flush(io_channel ch)
{
	(void)ch;
	return 0; /* every write went straight to the file; see above for the fsync */
}

static errcode_t fdio_set_option(io_channel ch, const char *option, const char *arg)
{
	(void)ch, (void)option, (void)arg;
	return EXT2_ET_INVALID_ARGUMENT;
}

static errcode_t fdio_open(const char *name, int flags, io_channel *out);

/* Never written: not const only because libext2fs takes a non-const io_manager. */
static struct struct_io_manager fdio_manager = {
    .magic = EXT2_ET_MAGIC_IO_MANAGER,
    .name = "fireclaw fd I/O",
    .open = fdio_open,
    .close = fdio_close,
    .set_blksize = fdio_set_blksize,
    .read_blk = fdio_read,
    .write_blk = fdio_write,
    .flush = fdio_flush,
    .write_byte = fdio_write_byte,
    .set_option = fdio_set_option,
    .read_blk64 = fdio_read64,
    .write_blk64 = fdio_write64,
};

static errcode_t fdio_open(const char *name, int flags, io_channel *out)
{
	(void)flags; /* the fd was opened read-only or read-write already */
	char *end;
	long fd = strtol(name, &end, 10);
	if (!*name || *end || fd < 0)
		return EXT2_ET_BAD_DEVICE_NAME;
	io_channel ch = calloc(1, sizeof *ch);
	struct fdio *d = calloc(1, sizeof *d);
	char *copy = strdup(name);
	int dup = fcntl((int)fd, F_DUPFD_CLOEXEC, 3);
	if (!ch || !d || !copy || dup < 0) {
		errcode_t e = dup < 0 ? errno : ENOMEM;
		if (dup >= 0)
			close(dup);
		free(ch), free(d), free(copy);
		return e;
	}
	d->fd = dup;
	ch->magic = EXT2_ET_MAGIC_IO_CHANNEL;
	ch->manager = &fdio_manager;
	ch->name = copy;
	ch->block_size = 1024;
	ch->refcount = 1;
	ch->private_data = d;
	*out = ch;
	return 0;
}

/* ---- image handle ---- */

struct image {
	ext2_filsys fs;
	int rw;
	char path[PATH_MAX];
};

/* Write back bitmaps, superblock and group descriptors, and free the handle (also when
 * writing fails). No fsync: the image is a per-run copy that the VMM reads through the
 * same page cache, and an fsync costs more than everything else here (~10 ms on ext4). */
static errcode_t image_close(struct image *img)
{
	errcode_t e = 0;
	if (img->fs) {
		e = ext2fs_close2(img->fs, EXT2_FLAG_FLUSH_NO_SYNC); /* frees on success */
		if (e)
			ext2fs_free(img->fs);
	}
	img->fs = NULL;
	return e;
}

static int l_image_gc(lua_State *L)
{
	image_close(luaL_checkudata(L, 1, IMAGE_MT));
	return 0;
}

static int l_image_close(lua_State *L)
{
	struct image *img = luaL_checkudata(L, 1, IMAGE_MT);
	errcode_t e = image_close(img);
	if (e) {
		char buf[128];
		fc_error(L, "rootfs: close %s: %s", img->path, reason(e, buf, sizeof buf));
	}
	return 0;
}

static struct image *check_image(lua_State *L)
{
	struct image *img = luaL_checkudata(L, 1, IMAGE_MT);
	if (!img->fs)
		fc_error(L, "rootfs: image %s is closed", img->path);
	return img;
}

/* Open the image and libext2fs on it (through fdio, which keeps its own dup of fd). */
static errcode_t image_open_fs(const char *path, int rw, ext2_filsys *fs)
{
	int fd = open(path, (rw ? O_RDWR : O_RDONLY) | O_CLOEXEC);
	if (fd < 0)
		return errno;
	struct stat st;
	errcode_t e = fstat(fd, &st) < 0 ? errno : S_ISDIR(st.st_mode) ? EISDIR : 0;
	char name[16];
	snprintf(name, sizeof name, "%d", fd);
	int flags = EXT2_FLAG_64BITS | (rw ? EXT2_FLAG_RW : 0);
	if (!e)
		e = ext2fs_open2(name, NULL, flags, 0, 0, &fdio_manager, fs);
	close(fd);
	if (!e && rw && (e = ext2fs_read_bitmaps(*fs))) {
		ext2fs_free(*fs);
		*fs = NULL;
	}
	return e;
}

/* Push an open image handle, or raise with a message that says what to do. */
static struct image *push_image(lua_State *L, const char *path, int rw)
{
	if (strlen(path) >= PATH_MAX)
		fc_error(L, "rootfs: open %s: path too long", path);
	struct image *img = fc_new(L, sizeof *img, IMAGE_MT);
	snprintf(img->path, sizeof img->path, "%s", path);
	img->rw = rw;
	errcode_t e = image_open_fs(path, rw, &img->fs);
	char buf[128];
	if (!e && rw && ext2fs_has_feature_journal_needs_recovery(img->fs->super)) {
		image_close(img);
		fc_error(L,
			 "rootfs: open %s: the journal needs recovery (the image was not "
			 "cleanly unmounted); run e2fsck -fy %s first",
			 path, path);
	}
	switch (e) {
	case 0:
		return img;
	case EXT2_ET_BAD_MAGIC:
	case EXT2_ET_SHORT_READ:
	case EXT2_ET_CORRUPT_SUPERBLOCK:
		fc_error(L, "rootfs: open %s: not an ext2/3/4 filesystem", path);
	default:
		fc_error(L, "rootfs: open %s: %s", path, reason(e, buf, sizeof buf));
	}
}

static int l_open(lua_State *L)
{
	const char *path = luaL_checkstring(L, 1);
	const char *mode = luaL_optstring(L, 2, "r");
	if (strcmp(mode, "r") != 0 && strcmp(mode, "rw") != 0)
		fc_error(L, "rootfs: open %s: mode must be \"r\" or \"rw\", not \"%s\"", path,
			 mode);
	push_image(L, path, mode[1] == 'w');
	return 1;
}

/* ---- paths ---- */

/* A path inside the image: absolute, split into its components in place. */
struct ipath {
	char buf[PATH_MAX];
	const char *comp[PATH_MAX / 2];
	int n;
};

static void check_path(lua_State *L, int idx, struct ipath *p)
{
	size_t len;
	const char *s = luaL_checklstring(L, idx, &len);
	if (s[0] != '/' || len >= sizeof p->buf || memchr(s, 0, len))
		fc_error(L, "rootfs: bad path '%s' (absolute paths inside the image only)", s);
	memcpy(p->buf, s, len + 1);
	p->n = 0;
	char *save = NULL;
	for (char *c = strtok_r(p->buf, "/", &save); c; c = strtok_r(NULL, "/", &save)) {
		if (strcmp(c, ".") == 0)
			continue;
		if (strlen(c) > EXT2_NAME_LEN)
			fc_error(L, "rootfs: bad path '%s': name too long", s);
		p->comp[p->n++] = c;
	}
}

struct attrs {
	unsigned mode, dir_mode, uid, gid;
};

static unsigned opt_mode(lua_State *L, int t, const char *key, unsigned def)
{
	if (lua_isnoneornil(L, t))
		return def;
	lua_getfield(L, t, key);
	unsigned mode = def;
	if (lua_type(L, -1) == LUA_TSTRING) {
		char *end;
		const char *s = lua_tostring(L, -1);
		mode = (unsigned)strtoul(s, &end, 8);
		if (!*s || *end)
			fc_error(L, "rootfs: option '%s': bad octal mode '%s'", key, s);
	} else if (!lua_isnil(L, -1)) {
		mode = (unsigned)luaL_checknumber(L, -1);
	}
	lua_pop(L, 1);
	if (mode > 07777)
		fc_error(L, "rootfs: option '%s': mode %o out of range (at most 07777)", key, mode);
	return mode;
}

static void read_attrs(lua_State *L, int t, unsigned def_mode, struct attrs *a)
{
	static const char *const known[] = {"mode", "dir_mode", "uid", "gid", NULL};
	if (!lua_isnoneornil(L, t))
		luaL_checktype(L, t, LUA_TTABLE);
	fc_opt_check(L, t, "rootfs", known);
	a->mode = opt_mode(L, t, "mode", def_mode);
	a->dir_mode = opt_mode(L, t, "dir_mode", 0755);
	double uid = fc_opt_number(L, t, "uid", 0), gid = fc_opt_number(L, t, "gid", 0);
	if (uid < 0 || gid < 0 || uid > 4294967294.0 || gid > 4294967294.0)
		fc_error(L, "rootfs: bad uid/gid %g/%g", uid, gid);
	a->uid = (unsigned)uid;
	a->gid = (unsigned)gid;
}

/* ---- inodes ---- */

static void set_owner(struct ext2_inode *inode, unsigned mode, const struct attrs *a)
{
	inode->i_mode = (uint16_t)mode;
	inode->i_uid = (uint16_t)(a->uid & 0xffff);
	ext2fs_set_i_uid_high(*inode, a->uid >> 16);
	inode->i_gid = (uint16_t)(a->gid & 0xffff);
	ext2fs_set_i_gid_high(*inode, a->gid >> 16);
}

static void set_times(struct ext2_inode *inode)
{
	uint32_t now = (uint32_t)time(NULL);
	inode->i_atime = inode->i_ctime = inode->i_mtime = now;
}

static int release_block(ext2_filsys fs, blk64_t *blocknr, e2_blkcnt_t blockcnt, blk64_t ref_blk,
			 int ref_offset, void *priv)
{
	(void)blockcnt, (void)ref_blk, (void)ref_offset, (void)priv;
	ext2fs_block_alloc_stats2(fs, *blocknr, -1);
	return 0;
}

/* Give back an inode's blocks (data, extent tree or indirect blocks, xattr block) and the
 * inode itself. The blocks are only released in the bitmaps, the mapping is left as it
 * is: a deleted inode's mapping means nothing, and rewriting it (ext2fs_punch) fails on
 * a full image, which is exactly when a failed write needs this. */
static void free_inode(ext2_filsys fs, ext2_ino_t ino, int is_dir)
{
	struct ext2_inode inode;
	if (ext2fs_read_inode(fs, ino, &inode) == 0) {
		if (ext2fs_inode_has_valid_blocks2(fs, &inode))
			ext2fs_block_iterate3(fs, ino, BLOCK_FLAG_READ_ONLY, NULL, release_block,
					      NULL);
		blk64_t ea = ext2fs_file_acl_block(fs, &inode);
		__u32 refs = 1;
		if (ea && ext2fs_adjust_ea_refcount3(fs, ea, NULL, -1, &refs, ino) == 0 &&
		    refs == 0)
			ext2fs_block_alloc_stats2(fs, ea, -1);
		inode.i_links_count = 0;
		inode.i_dtime = (uint32_t)time(NULL);
		ext2fs_write_inode(fs, ino, &inode);
	}
	ext2fs_inode_alloc_stats2(fs, ino, -1, is_dir);
}

/* Drop one name of a file; the file goes when it was the last one. */
static void drop_link(ext2_filsys fs, ext2_ino_t ino)
{
	struct ext2_inode inode;
	if (ext2fs_read_inode(fs, ino, &inode) != 0)
		return;
	if (inode.i_links_count > 1) {
		inode.i_links_count--;
		inode.i_ctime = (uint32_t)time(NULL);
		ext2fs_write_inode(fs, ino, &inode);
		return;
	}
	free_inode(fs, ino, 0);
}

/* Add a directory entry, growing the directory by a block when it is full. */
static errcode_t add_entry(ext2_filsys fs, ext2_ino_t dir, const char *name, ext2_ino_t ino,
			   int type)
{
	errcode_t e = ext2fs_link(fs, dir, name, ino, type);
	for (int tries = 0; e == EXT2_ET_DIR_NO_SPACE && tries < 2; tries++) {
		e = ext2fs_expand_dir(fs, dir);
		if (!e)
			e = ext2fs_link(fs, dir, name, ino, type);
	}
	return e;
}

static errcode_t adjust_links(ext2_filsys fs, ext2_ino_t ino, int delta)
{
	struct ext2_inode inode;
	errcode_t e = ext2fs_read_inode(fs, ino, &inode);
	if (e)
		return e;
	inode.i_links_count = (uint16_t)(inode.i_links_count + delta);
	return ext2fs_write_inode(fs, ino, &inode);
}

/* An allocated, accounted inode of the given mode, written out, not linked anywhere. */
static errcode_t new_inode(ext2_filsys fs, ext2_ino_t dir, unsigned mode, const struct attrs *a,
			   ext2_ino_t *out)
{
	ext2_ino_t ino;
	errcode_t e = ext2fs_new_inode(fs, dir, (int)mode, NULL, &ino);
	if (e)
		return e;
	ext2fs_inode_alloc_stats2(fs, ino, +1, LINUX_S_ISDIR(mode));
	struct ext2_inode inode;
	memset(&inode, 0, sizeof inode);
	set_owner(&inode, mode, a);
	set_times(&inode);
	inode.i_links_count = LINUX_S_ISDIR(mode) ? 2 : 1;
	if (ext2fs_has_feature_extents(fs->super)) {
		/* on an empty inode this writes an empty extent tree header into it */
		ext2_extent_handle_t h;
		e = ext2fs_extent_open2(fs, ino, &inode, &h);
		if (!e)
			ext2fs_extent_free(h);
	}
	if (!e)
		e = ext2fs_write_new_inode(fs, ino, &inode);
	if (e) {
		ext2fs_inode_alloc_stats2(fs, ino, -1, LINUX_S_ISDIR(mode));
		return e;
	}
	*out = ino;
	return 0;
}

/* Write the contents of a new, empty file. */
static errcode_t fill_file(ext2_filsys fs, ext2_ino_t ino, const char *data, size_t len)
{
	ext2_file_t f;
	errcode_t e = ext2fs_file_open(fs, ino, EXT2_FILE_WRITE, &f);
	if (e)
		return e;
	size_t done = 0;
	while (done < len && !e) {
		unsigned int n, chunk = len - done > (1u << 30) ? 1u << 30 : (unsigned)(len - done);
		e = ext2fs_file_write(f, data + done, chunk, &n);
		if (!e && n == 0)
			e = EXT2_ET_SHORT_WRITE;
		done += n;
	}
	if (!e)
		e = ext2fs_file_set_size2(f, len);
	errcode_t ce = ext2fs_file_close(f); /* flushes the last block: may allocate */
	return e ? e : ce;
}

/* The empty block of a new directory (entries . and ..), accounted, mapped into ino. */
static errcode_t new_dir_block(ext2_filsys fs, ext2_ino_t ino, ext2_ino_t parent)
{
	blk64_t blk;
	char *block = NULL;
	errcode_t e = ext2fs_new_block2(fs, 0, NULL, &blk);
	if (e)
		return e;
	ext2fs_block_alloc_stats2(fs, blk, +1);
	e = ext2fs_new_dir_block(fs, ino, parent, &block);
	if (!e)
		e = ext2fs_write_dir_block4(fs, blk, block, 0, ino);
	if (block)
		ext2fs_free_mem(&block);
	struct ext2_inode inode;
	if (!e)
		e = ext2fs_read_inode(fs, ino, &inode);
	if (!e) {
		inode.i_size = fs->blocksize;
		e = ext2fs_bmap2(fs, ino, &inode, NULL, BMAP_SET, 0, NULL, &blk);
	}
	if (!e) {
		ext2fs_iblk_add_blocks(fs, &inode, 1);
		e = ext2fs_write_inode(fs, ino, &inode);
	}
	if (e)
		ext2fs_block_alloc_stats2(fs, blk, -1);
	return e;
}

/* mkdir NAME in PARENT with the given mode/owner. */
static errcode_t make_dir(ext2_filsys fs, ext2_ino_t parent, const char *name, unsigned mode,
			  const struct attrs *a, ext2_ino_t *out)
{
	ext2_ino_t ino;
	errcode_t e = new_inode(fs, parent, LINUX_S_IFDIR | mode, a, &ino);
	if (e)
		return e;
	e = new_dir_block(fs, ino, parent);
	if (!e)
		e = add_entry(fs, parent, name, ino, EXT2_FT_DIR);
	if (!e)
		e = adjust_links(fs, parent, +1); /* the new ".." */
	if (e) {
		ext2fs_unlink(fs, parent, name, ino, 0); /* in case the entry made it */
		free_inode(fs, ino, 1);
		return e;
	}
	*out = ino;
	return 0;
}

/* Resolve the directory made of the first n components, following symlinks inside the
 * image; with create, missing directories are made (dir_mode, owner from a). */
static errcode_t walk_dirs(ext2_filsys fs, const struct ipath *p, int n, const struct attrs *a,
			   ext2_ino_t *dir)
{
	ext2_ino_t cur = EXT2_ROOT_INO, ino;
	for (int i = 0; i < n; i++) {
		const char *c = p->comp[i];
		errcode_t e = ext2fs_lookup(fs, cur, c, (int)strlen(c), NULL, &ino);
		if (e == EXT2_ET_FILE_NOT_FOUND && a)
			e = make_dir(fs, cur, c, a->dir_mode, a, &ino);
		if (!e)
			e = ext2fs_follow_link(fs, EXT2_ROOT_INO, cur, ino, &ino);
		if (!e)
			e = ext2fs_check_directory(fs, ino);
		if (e)
			return e;
		cur = ino;
	}
	*dir = cur;
	return 0;
}

/* The inode a whole path names; follow: resolve a final symlink too. */
static errcode_t resolve(ext2_filsys fs, const struct ipath *p, int follow, ext2_ino_t *ino)
{
	if (p->n == 0) {
		*ino = EXT2_ROOT_INO;
		return 0;
	}
	ext2_ino_t dir;
	const char *leaf = p->comp[p->n - 1];
	errcode_t e = walk_dirs(fs, p, p->n - 1, NULL, &dir);
	if (!e)
		e = ext2fs_lookup(fs, dir, leaf, (int)strlen(leaf), NULL, ino);
	if (!e && follow)
		e = ext2fs_follow_link(fs, EXT2_ROOT_INO, dir, *ino, ino);
	return e;
}

/* ---- file operations (no Lua errors inside) ---- */

/* Create or replace the file at p. The new contents go into a new inode that replaces the
 * old name only once complete: a failure leaves the old file as it was. */
static errcode_t put_file(ext2_filsys fs, const struct ipath *p, const char *data, size_t len,
			  const struct attrs *a)
{
	ext2_ino_t dir, old = 0, ino;
	if (p->n == 0)
		return EISDIR;
	const char *leaf = p->comp[p->n - 1];
	errcode_t e = walk_dirs(fs, p, p->n - 1, a, &dir);
	if (e)
		return e;
	e = ext2fs_lookup(fs, dir, leaf, (int)strlen(leaf), NULL, &old);
	if (e && e != EXT2_ET_FILE_NOT_FOUND)
		return e;
	if (!e && ext2fs_check_directory(fs, old) == 0)
		return EISDIR;
	if (e)
		old = 0;
	e = new_inode(fs, dir, LINUX_S_IFREG | a->mode, a, &ino);
	if (e)
		return e;
	e = fill_file(fs, ino, data, len);
	if (!e && old)
		e = ext2fs_unlink(fs, dir, leaf, old, 0);
	if (!e && (e = add_entry(fs, dir, leaf, ino, EXT2_FT_REG_FILE)) && old)
		add_entry(fs, dir, leaf, old, EXT2_FT_REG_FILE); /* put the old one back */
	if (e) {
		free_inode(fs, ino, 0);
		return e;
	}
	if (old)
		drop_link(fs, old);
	return 0;
}

/* Set mode and owner of an existing directory. */
static errcode_t set_dir_attrs(ext2_filsys fs, ext2_ino_t ino, const struct attrs *a)
{
	struct ext2_inode inode;
	errcode_t e = ext2fs_read_inode(fs, ino, &inode);
	if (e)
		return e;
	set_owner(&inode, LINUX_S_IFDIR | a->mode, a);
	inode.i_ctime = (uint32_t)time(NULL);
	return ext2fs_write_inode(fs, ino, &inode);
}

/* mkdir -p (missing parents get 0755 and a's owner), then the mode and owner of the last
 * directory, which may exist already. */
static errcode_t put_dir(ext2_filsys fs, const struct ipath *p, const struct attrs *a)
{
	ext2_ino_t dir, ino = EXT2_ROOT_INO;
	struct attrs parents = *a;
	parents.dir_mode = 0755;
	if (p->n == 0)
		return set_dir_attrs(fs, ino, a);
	const char *leaf = p->comp[p->n - 1];
	errcode_t e = walk_dirs(fs, p, p->n - 1, &parents, &dir);
	if (!e)
		e = ext2fs_lookup(fs, dir, leaf, (int)strlen(leaf), NULL, &ino);
	if (e == EXT2_ET_FILE_NOT_FOUND)
		return make_dir(fs, dir, leaf, a->mode, a, &ino);
	if (!e)
		e = ext2fs_follow_link(fs, EXT2_ROOT_INO, dir, ino, &ino);
	if (!e && ext2fs_check_directory(fs, ino) != 0)
		return ENOTDIR; /* a file (or a link to one) has the name */
	return e ? e : set_dir_attrs(fs, ino, a);
}

static int count_entry(struct ext2_dir_entry *d, int offset, int blocksize, char *buf, void *priv)
{
	(void)offset, (void)blocksize, (void)buf;
	int len = ext2fs_dirent_name_len(d);
	if (!(len == 1 && d->name[0] == '.') &&
	    !(len == 2 && d->name[0] == '.' && d->name[1] == '.'))
		++*(int *)priv;
	return 0;
}

/* Remove a file, symlink or empty directory. *removed = 0 when there was nothing. */
static errcode_t remove_path(ext2_filsys fs, const struct ipath *p, int *removed)
{
	ext2_ino_t dir, ino;
	*removed = 0;
	if (p->n == 0)
		return EBUSY;
	const char *leaf = p->comp[p->n - 1];
	errcode_t e = walk_dirs(fs, p, p->n - 1, NULL, &dir);
	if (!e)
		e = ext2fs_lookup(fs, dir, leaf, (int)strlen(leaf), NULL, &ino);
	if (e == EXT2_ET_FILE_NOT_FOUND)
		return 0;
	if (e)
		return e;
	int is_dir = ext2fs_check_directory(fs, ino) == 0, entries = 0;
	if (is_dir && (e = ext2fs_dir_iterate(fs, ino, 0, NULL, count_entry, &entries)))
		return e;
	if (entries)
		return ENOTEMPTY;
	if ((e = ext2fs_unlink(fs, dir, leaf, ino, 0)))
		return e;
	if (is_dir) {
		adjust_links(fs, dir, -1); /* its ".." */
		free_inode(fs, ino, 1);
	} else {
		drop_link(fs, ino);
	}
	*removed = 1;
	return 0;
}

/* ---- Lua methods ---- */

static struct image *check_writable(lua_State *L, const char *op, const char *path)
{
	struct image *img = check_image(L);
	if (!img->rw)
		fs_fail(L, op, path, img->path, EXT2_ET_RO_FILSYS);
	return img;
}

/* Parse the path argument (2) into a scratch userdata (large: not on the C stack) that
 * goes in at index 2, so the path string is then at 3 and later arguments shift by one. */
static struct ipath *path_arg(lua_State *L)
{
	struct ipath *p = lua_newuserdata(L, sizeof *p);
	lua_insert(L, 2);
	check_path(L, 3, p);
	return p;
}

static int l_write(lua_State *L)
{
	struct ipath *p = path_arg(L);
	size_t len;
	const char *data = luaL_checklstring(L, 4, &len);
	struct attrs a;
	read_attrs(L, 5, 0644, &a);
	const char *path = lua_tostring(L, 3);
	struct image *img = check_writable(L, "write", path);
	errcode_t e = put_file(img->fs, p, data, len, &a);
	if (e)
		fs_fail(L, "write", path, img->path, e);
	return 0;
}

static int l_mkdir(lua_State *L)
{
	struct ipath *p = path_arg(L);
	struct attrs a;
	read_attrs(L, 4, 0755, &a);
	const char *path = lua_tostring(L, 3);
	struct image *img = check_writable(L, "mkdir", path);
	errcode_t e = put_dir(img->fs, p, &a);
	if (e)
		fs_fail(L, "mkdir", path, img->path, e);
	return 0;
}

static int l_remove(lua_State *L)
{
	struct ipath *p = path_arg(L);
	const char *path = lua_tostring(L, 3);
	struct image *img = check_writable(L, "remove", path);
	int removed;
	errcode_t e = remove_path(img->fs, p, &removed);
	if (e)
		fs_fail(L, "remove", path, img->path, e);
	lua_pushboolean(L, removed);
	return 1;
}

/* Look up the path argument for a read-only method: leaves the stack as it was (path at
 * 2), returns the inode, and the lookup's error in *err. */
static ext2_ino_t lookup_arg(lua_State *L, int follow, struct image **imgp, errcode_t *err)
{
	struct ipath *p = path_arg(L);
	struct image *img = check_image(L);
	ext2_ino_t ino = 0;
	*err = resolve(img->fs, p, follow, &ino);
	lua_remove(L, 2);
	*imgp = img;
	return ino;
}

static int l_exists(lua_State *L)
{
	struct image *img;
	errcode_t e;
	lookup_arg(L, 0, &img, &e);
	if (e && e != EXT2_ET_FILE_NOT_FOUND && e != EXT2_ET_NO_DIRECTORY)
		fs_fail(L, "look up", lua_tostring(L, 2), img->path, e);
	lua_pushboolean(L, e == 0);
	return 1;
}

static int l_read(lua_State *L)
{
	struct image *img;
	errcode_t e;
	ext2_ino_t ino = lookup_arg(L, 1, &img, &e);
	const char *path = lua_tostring(L, 2);
	struct ext2_inode inode;
	if (!e)
		e = ext2fs_read_inode(img->fs, ino, &inode);
	if (!e && LINUX_S_ISDIR(inode.i_mode))
		e = EISDIR;
	if (!e && !LINUX_S_ISREG(inode.i_mode))
		fc_error(L, "rootfs: read %s in %s: not a regular file", path,
			 basename_of(img->path));
	if (e)
		fs_fail(L, "read", path, img->path, e);
	uint64_t size = EXT2_I_SIZE(&inode);
	if (size > (1u << 30))
		fc_error(L, "rootfs: read %s in %s: file too large (%llu bytes)", path,
			 basename_of(img->path), (unsigned long long)size);
	char *buf = lua_newuserdata(L, size ? size : 1); /* scratch, collected */
	ext2_file_t f;
	unsigned got = 0;
	e = ext2fs_file_open2(img->fs, ino, &inode, 0, &f);
	if (!e) {
		e = ext2fs_file_read(f, buf, (unsigned)size, &got);
		errcode_t ce = ext2fs_file_close(f);
		e = e ? e : ce;
	}
	if (!e && got != size)
		e = EXT2_ET_SHORT_READ;
	if (e)
		fs_fail(L, "read", path, img->path, e);
	lua_pushlstring(L, buf, size);
	return 1;
}

static const char *type_name(unsigned mode)
{
	if (LINUX_S_ISREG(mode))
		return "file";
	if (LINUX_S_ISDIR(mode))
		return "dir";
	if (LINUX_S_ISLNK(mode))
		return "symlink";
	if (LINUX_S_ISCHR(mode))
		return "char";
	if (LINUX_S_ISBLK(mode))
		return "block";
	if (LINUX_S_ISFIFO(mode))
		return "fifo";
	if (LINUX_S_ISSOCK(mode))
		return "socket";
	return "unknown";
}

static int l_stat(lua_State *L)
{
	struct image *img;
	errcode_t e;
	ext2_ino_t ino = lookup_arg(L, 0, &img, &e);
	struct ext2_inode inode;
	if (!e)
		e = ext2fs_read_inode(img->fs, ino, &inode);
	if (e)
		fs_fail(L, "stat", lua_tostring(L, 2), img->path, e);
	lua_createtable(L, 0, 7);
	lua_pushstring(L, type_name(inode.i_mode));
	lua_setfield(L, -2, "type");
	lua_pushinteger(L, inode.i_mode & 07777);
	lua_setfield(L, -2, "mode");
	lua_pushnumber(L, inode_uid(inode));
	lua_setfield(L, -2, "uid");
	lua_pushnumber(L, inode_gid(inode));
	lua_setfield(L, -2, "gid");
	lua_pushnumber(L, (lua_Number)EXT2_I_SIZE(&inode));
	lua_setfield(L, -2, "size");
	lua_pushnumber(L, inode.i_mtime);
	lua_setfield(L, -2, "mtime");
	lua_pushinteger(L, inode.i_links_count);
	lua_setfield(L, -2, "nlink");
	return 1;
}

/* Directory listing in two passes (size, then names) into Lua-owned memory, so nothing
 * leaks if pushing the names raises. */
struct names {
	char *buf;
	size_t used, size;
	int n;
};

static int collect_name(struct ext2_dir_entry *d, int offset, int blocksize, char *b, void *priv)
{
	(void)offset, (void)blocksize, (void)b;
	struct names *nm = priv;
	int len = ext2fs_dirent_name_len(d);
	if ((len == 1 && d->name[0] == '.') || (len == 2 && d->name[0] == '.' && d->name[1] == '.'))
		return 0;
	if (nm->buf && nm->used + (size_t)len + 1 <= nm->size) {
		memcpy(nm->buf + nm->used, d->name, (size_t)len);
		nm->buf[nm->used + (size_t)len] = 0;
	}
	nm->used += (size_t)len + 1;
	nm->n++;
	return 0;
}

static int l_list(lua_State *L)
{
	struct image *img;
	errcode_t e;
	ext2_ino_t ino = lookup_arg(L, 1, &img, &e);
	const char *path = lua_tostring(L, 2);
	struct names nm = {0};
	if (!e)
		e = ext2fs_check_directory(img->fs, ino);
	if (!e)
		e = ext2fs_dir_iterate(img->fs, ino, 0, NULL, collect_name, &nm);
	if (e)
		fs_fail(L, "list", path, img->path, e);
	nm.size = nm.used ? nm.used : 1;
	nm.buf = lua_newuserdata(L, nm.size);
	const char **v = lua_newuserdata(L, (nm.n ? nm.n : 1) * sizeof *v);
	nm.used = 0, nm.n = 0;
	e = ext2fs_dir_iterate(img->fs, ino, 0, NULL, collect_name, &nm);
	if (e)
		fs_fail(L, "list", path, img->path, e);
	size_t off = 0;
	for (int i = 0; i < nm.n && off < nm.size; i++) {
		v[i] = nm.buf + off;
		off += strlen(v[i]) + 1;
	}
	fc_sort_strings(v, (size_t)nm.n);
	lua_createtable(L, nm.n, 0);
	for (int i = 0; i < nm.n; i++) {
		lua_pushstring(L, v[i]);
		lua_rawseti(L, -2, i + 1);
	}
	return 1;
}

/* ---- module-level conveniences: open, call the method, close ---- */

static int with_image(lua_State *L, int rw, lua_CFunction method)
{
	const char *path = luaL_checkstring(L, 1);
	int nargs = lua_gettop(L);
	struct image *img = push_image(L, path, rw);
	lua_pushcfunction(L, method);
	lua_pushvalue(L, nargs + 1);
	for (int i = 2; i <= nargs; i++)
		lua_pushvalue(L, i);
	int failed = lua_pcall(L, nargs, 1, 0);
	errcode_t e = image_close(img);
	if (failed)
		lua_error(L);
	if (e) {
		char buf[128];
		fc_error(L, "rootfs: close %s: %s", path, reason(e, buf, sizeof buf));
	}
	return 1;
}

static int l_m_write(lua_State *L)
{
	return with_image(L, 1, l_write);
}
static int l_m_mkdir(lua_State *L)
{
	return with_image(L, 1, l_mkdir);
}
static int l_m_remove(lua_State *L)
{
	return with_image(L, 1, l_remove);
}
static int l_m_read(lua_State *L)
{
	return with_image(L, 0, l_read);
}
static int l_m_exists(lua_State *L)
{
	return with_image(L, 0, l_exists);
}
static int l_m_list(lua_State *L)
{
	return with_image(L, 0, l_list);
}
static int l_m_stat(lua_State *L)
{
	return with_image(L, 0, l_stat);
}

static int l_image_tostring(lua_State *L)
{
	struct image *img = luaL_checkudata(L, 1, IMAGE_MT);
	lua_pushfstring(L, IMAGE_MT ": %s (%s)", img->path,
			!img->fs  ? "closed"
			: img->rw ? "rw"
				  : "r");
	return 1;
}

int luaopen_fireclaw_rootfs(lua_State *L)
{
	static const luaL_Reg methods[] = {
	    {"write", l_write},
	    {"read", l_read},
	    {"exists", l_exists},
	    {"mkdir", l_mkdir},
	    {"remove", l_remove},
	    {"list", l_list},
	    {"stat", l_stat},
	    {"close", l_image_close},
	    /* after "close": a collected handle is closed without raising */
	    {"__gc", l_image_gc},
	    {"__tostring", l_image_tostring},
	    {NULL, NULL},
	};
	static const luaL_Reg fns[] = {
	    {"copy", l_copy},	    {"open", l_open},	    {"write", l_m_write},
	    {"read", l_m_read},	    {"exists", l_m_exists}, {"mkdir", l_m_mkdir},
	    {"remove", l_m_remove}, {"list", l_m_list},	    {"stat", l_m_stat},
	    {"space", l_space},	    {NULL, NULL},
	};
	/* libext2fs reports com_err codes; register their texts once */
	initialize_ext2_error_table();
	fc_class(L, IMAGE_MT, methods);
	lua_newtable(L);
	luaL_register(L, NULL, fns);
	return 1;
}
