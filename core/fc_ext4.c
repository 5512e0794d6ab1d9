/* fc_ext4.c - fireclaw.rootfs's ext2/3/4 editor: inodes, directories and file operations
 * on an open libext2fs filesystem. Returns errcode_t and never raises; every change
 * accounts its inodes and blocks before anything points at them and gives them back if a
 * later step fails (see core/rootfs.c). */
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
errcode_t ext4_resolve(ext2_filsys fs, const struct ipath *p, int follow, ext2_ino_t *ino)
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
errcode_t ext4_put_file(ext2_filsys fs, const struct ipath *p, const char *data, size_t len,
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
errcode_t ext4_put_dir(ext2_filsys fs, const struct ipath *p, const struct attrs *a)
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
errcode_t ext4_remove_path(ext2_filsys fs, const struct ipath *p, int *removed)
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
