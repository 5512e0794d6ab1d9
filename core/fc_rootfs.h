/* fc_rootfs.h - what the files of fireclaw.rootfs share: core/rootfs.c (the module: image
 * handles, paths, the Lua methods), core/fc_ext4.c (the ext2/3/4 editor: inodes and file
 * operations on a libext2fs filesystem), core/fc_ext2io.c (libext2fs's I/O on an fd we
 * own) and core/fc_rootfs_copy.c (rootfs.copy, rootfs.qcow2_overlay, rootfs.space). Private to
 * them; the Lua interface is in core/rootfs.c's opening comment. */
#ifndef FC_ROOTFS_H
#define FC_ROOTFS_H

#include "fc.h"

#include <ext2fs/ext2fs.h>
#include <limits.h>

/* A path inside the image: absolute, split into its components in place. */
struct ipath {
	char buf[PATH_MAX];
	const char *comp[PATH_MAX / 2];
	int n;
};

struct attrs {
	unsigned mode, dir_mode, uid, gid;
};

/* ---- core/fc_ext4.c: returns errcode_t, never raises ---- */

/* Create or replace the file at p; a failure leaves the old file as it was. */
errcode_t ext4_put_file(ext2_filsys fs, const struct ipath *p, const char *data, size_t len,
			const struct attrs *a);
/* mkdir -p, then the mode and owner of the last directory, which may exist already. */
errcode_t ext4_put_dir(ext2_filsys fs, const struct ipath *p, const struct attrs *a);
/* Remove a file, symlink or empty directory. *removed = 0 when there was nothing. */
errcode_t ext4_remove_path(ext2_filsys fs, const struct ipath *p, int *removed);
/* The inode a whole path names; follow: resolve a final symlink too. */
errcode_t ext4_resolve(ext2_filsys fs, const struct ipath *p, int follow, ext2_ino_t *ino);

/* ---- core/fc_ext2io.c ---- */

/* libext2fs's I/O manager on a dup of our fd (the "name" is the fd number): plain
 * pread/pwrite, no fsync. */
extern struct struct_io_manager rootfs_fdio_manager;

/* ---- core/fc_rootfs_copy.c ---- */

int rootfs_l_copy(lua_State *L);	  /* rootfs.copy */
int rootfs_l_copy_rest(lua_State *L);	  /* rootfs.copy_rest */
int rootfs_l_space(lua_State *L);	  /* rootfs.space */
int rootfs_l_qcow2_overlay(lua_State *L); /* rootfs.qcow2_overlay */

#endif
