/* rootfs.c - fireclaw.rootfs: per-run copies of disk images, and files read and written
 * inside an ext2/3/4 image with libext2fs, without mounting it.
 *
 *   rootfs.copy(src, dst [, {head = bytes}]) -> "reflink" | "sparse"
 *       dst is created 0600, exclusively (an existing dst is an error), and removed again
 *       if the copy fails. "reflink" shares the blocks (FICLONE: btrfs, xfs, ...); else
 *       only the data ranges are copied (SEEK_DATA/SEEK_HOLE + copy_file_range, or
 *       read/write where that is refused), so holes stay holes. head: a sparse copy
 *       stops there (dst has src's size, holes after head) ...
 *   rootfs.copy_rest(src, dst, head)
 *       ... and this copies the data from head on into that dst (a restore copies a
 *       disk's head before QEMU starts and the rest while it does). A dst of another
 *       size is an error; a failure leaves dst to its owner.
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
 *   rootfs.qcow2_overlay(path, virtual_size, backing_name [, {cluster_size =, extended_l2 =}])
 *       instead of a copy, for a disk nobody reads after its VM: an empty qcow2 v3 file
 *       (created 0600, exclusively, not through a symlink; sparse: a few hundred bytes of
 *       metadata) whose clusters all read from a raw backing file, named backing_name in
 *       its header (QEMU is given the backing file itself as a read-only node). A size
 *       that is not a multiple of 512, a bad cluster size: raises. Defaults: 64 KiB
 *       clusters, extended_l2 = false (2 KiB subclusters with 64 KiB: a guest's 4 KiB
 *       write then copies nothing from the backing file).
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
 * The module is four files sharing core/fc_rootfs.h: this one (handles, paths, methods),
 * fc_ext4.c (the editor), fc_ext2io.c (libext2fs's I/O) and fc_rootfs_copy.c (copy,
 * qcow2_overlay, space). libext2fs is loaded when the first image is opened
 * (core/fc_ext2fs.c): copies and overlays need none.
 *
 * Style: the ext2 layer below returns errcode_t and never raises; Lua functions parse
 * their arguments first and raise only once nothing is left half-done.
 */
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

#define IMAGE_MT "fireclaw.rootfs.image"

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

/* ---- image handle ---- */

struct image {
	ext2_filsys fs;
	int rw;
	char path[PATH_MAX];
};

/* Write back bitmaps, superblock and group descriptors, and free the handle (also when
 * writing fails). No fsync: the image is a per-run copy that the VMM reads through the
 * same page cache, and an fsync costs more than everything else here (~10 ms on ext4). */
static int images_open; /* handles with an ext2 filesystem open (fc_rootfs_open_images) */

int fc_rootfs_open_images(void)
{
	return images_open;
}

static errcode_t image_close(struct image *img)
{
	errcode_t e = 0;
	if (img->fs) {
		images_open--;
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
		e = ext2fs_open2(name, NULL, flags, 0, 0, &rootfs_fdio_manager, fs);
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
	const char *err = fc_ext2fs_load(); /* on first use: a disk copy never needs it */
	if (err)
		fc_error(L, "rootfs: open %s: %s", path, err);
	struct image *img = fc_new(L, sizeof *img, IMAGE_MT);
	snprintf(img->path, sizeof img->path, "%s", path);
	img->rw = rw;
	errcode_t e = image_open_fs(path, rw, &img->fs);
	if (img->fs)
		images_open++;
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
	errcode_t e = ext4_put_file(img->fs, p, data, len, &a);
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
	errcode_t e = ext4_put_dir(img->fs, p, &a);
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
	errcode_t e = ext4_remove_path(img->fs, p, &removed);
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
	*err = ext4_resolve(img->fs, p, follow, &ino);
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
	    {"copy", rootfs_l_copy},
	    {"copy_rest", rootfs_l_copy_rest},
	    {"open", l_open},
	    {"write", l_m_write},
	    {"read", l_m_read},
	    {"exists", l_m_exists},
	    {"mkdir", l_m_mkdir},
	    {"remove", l_m_remove},
	    {"list", l_m_list},
	    {"stat", l_m_stat},
	    {"space", rootfs_l_space},
	    {"qcow2_overlay", rootfs_l_qcow2_overlay},
	    {NULL, NULL},
	};
	fc_class(L, IMAGE_MT, methods);
	lua_newtable(L);
	luaL_register(L, NULL, fns);
	return 1;
}
