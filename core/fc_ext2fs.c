/* fc_ext2fs.c - libext2fs (and libcom_err), loaded when the first image is opened.
 *
 * libext2fs and libcom_err cost ~0.4 ms of dynamic loading and relocation at every start
 * of fireclaw, yet only the ext2/3/4 editor of fireclaw.rootfs (rootfs.open and the
 * one-call functions: image builds, imports, injecting files) uses them; a run only copies
 * disks (rootfs.copy). So fireclaw is not linked against them: these definitions of the
 * functions core/rootfs.c, fc_ext4.c and fc_ext2io.c call dlopen("libext2fs.so.2") when
 * the first image is opened (fc_ext2fs_load) and forward to it, as core/fc_curl.c does for
 * libcurl. API and ABI are libext2fs's own (same header, same soname Debian ships).
 * libcom_err's error_message comes through the same handle (libext2fs depends on it).
 */
#include "fc.h"

#include <et/com_err.h>
#include <ext2fs/ext2fs.h>

#define LIBEXT2FS "libext2fs.so.2"

/* ext2fs.h's inline functions that a build without inlining (-O0) calls out of line: an
 * extern declaration makes this file emit the header's own definitions (C11 6.7.4), which
 * call nothing in the library. */
extern errcode_t ext2fs_free_mem(void *ptr);
extern int ext2fs_dirent_name_len(const struct ext2_dir_entry *entry);

/* Every forwarded function: X(return type, name, parameters, arguments) or, returning
 * nothing, V(name, parameters, arguments). Each definition below is compiled against the
 * header's prototype of the same name, so a mismatch is a build error. */
#define EXT2FS_FUNCS(X, V)                                                                         \
	X(errcode_t, ext2fs_adjust_ea_refcount3,                                                   \
	  (ext2_filsys fs, blk64_t blk, char *buf, int adjust, __u32 *count, ext2_ino_t ino),      \
	  (fs, blk, buf, adjust, count, ino))                                                      \
	V(ext2fs_block_alloc_stats2, (ext2_filsys fs, blk64_t blk, int inuse), (fs, blk, inuse))   \
	X(errcode_t, ext2fs_block_iterate3,                                                        \
	  (ext2_filsys fs, ext2_ino_t ino, int flags, char *buf,                                   \
	   int (*fn)(ext2_filsys, blk64_t *, e2_blkcnt_t, blk64_t, int, void *), void *priv),      \
	  (fs, ino, flags, buf, fn, priv))                                                         \
	X(errcode_t, ext2fs_bmap2,                                                                 \
	  (ext2_filsys fs, ext2_ino_t ino, struct ext2_inode * inode, char *buf, int bflags,       \
	   blk64_t block, int *ret_flags, blk64_t *phys),                                          \
	  (fs, ino, inode, buf, bflags, block, ret_flags, phys))                                   \
	X(errcode_t, ext2fs_check_directory, (ext2_filsys fs, ext2_ino_t ino), (fs, ino))          \
	X(errcode_t, ext2fs_close2, (ext2_filsys fs, int flags), (fs, flags))                      \
	X(errcode_t, ext2fs_dir_iterate,                                                           \
	  (ext2_filsys fs, ext2_ino_t dir, int flags, char *buf,                                   \
	   int (*fn)(struct ext2_dir_entry *, int, int, char *, void *), void *priv),              \
	  (fs, dir, flags, buf, fn, priv))                                                         \
	X(errcode_t, ext2fs_expand_dir, (ext2_filsys fs, ext2_ino_t dir), (fs, dir))               \
	V(ext2fs_extent_free, (ext2_extent_handle_t h), (h))                                       \
	X(errcode_t, ext2fs_extent_open2,                                                          \
	  (ext2_filsys fs, ext2_ino_t ino, struct ext2_inode * inode, ext2_extent_handle_t * h),   \
	  (fs, ino, inode, h))                                                                     \
	X(blk64_t, ext2fs_file_acl_block, (ext2_filsys fs, const struct ext2_inode *inode),        \
	  (fs, inode))                                                                             \
	X(errcode_t, ext2fs_file_close, (ext2_file_t f), (f))                                      \
	X(errcode_t, ext2fs_file_open,                                                             \
	  (ext2_filsys fs, ext2_ino_t ino, int flags, ext2_file_t *ret), (fs, ino, flags, ret))    \
	X(errcode_t, ext2fs_file_open2,                                                            \
	  (ext2_filsys fs, ext2_ino_t ino, struct ext2_inode * inode, int flags,                   \
	   ext2_file_t *ret),                                                                      \
	  (fs, ino, inode, flags, ret))                                                            \
	X(errcode_t, ext2fs_file_read,                                                             \
	  (ext2_file_t f, void *buf, unsigned int wanted, unsigned int *got),                      \
	  (f, buf, wanted, got))                                                                   \
	X(errcode_t, ext2fs_file_set_size2, (ext2_file_t f, ext2_off64_t size), (f, size))         \
	X(errcode_t, ext2fs_file_write,                                                            \
	  (ext2_file_t f, const void *buf, unsigned int n, unsigned int *written),                 \
	  (f, buf, n, written))                                                                    \
	X(errcode_t, ext2fs_follow_link,                                                           \
	  (ext2_filsys fs, ext2_ino_t root, ext2_ino_t cwd, ext2_ino_t ino, ext2_ino_t * res),     \
	  (fs, root, cwd, ino, res))                                                               \
	V(ext2fs_free, (ext2_filsys fs), (fs))                                                     \
	X(errcode_t, ext2fs_iblk_add_blocks,                                                       \
	  (ext2_filsys fs, struct ext2_inode * inode, blk64_t n), (fs, inode, n))                  \
	V(ext2fs_inode_alloc_stats2, (ext2_filsys fs, ext2_ino_t ino, int inuse, int isdir),       \
	  (fs, ino, inuse, isdir))                                                                 \
	X(int, ext2fs_inode_has_valid_blocks2, (ext2_filsys fs, struct ext2_inode * inode),        \
	  (fs, inode))                                                                             \
	X(errcode_t, ext2fs_link,                                                                  \
	  (ext2_filsys fs, ext2_ino_t dir, const char *name, ext2_ino_t ino, int flags),           \
	  (fs, dir, name, ino, flags))                                                             \
	X(errcode_t, ext2fs_lookup,                                                                \
	  (ext2_filsys fs, ext2_ino_t dir, const char *name, int len, char *buf, ext2_ino_t *ino), \
	  (fs, dir, name, len, buf, ino))                                                          \
	X(errcode_t, ext2fs_new_block2,                                                            \
	  (ext2_filsys fs, blk64_t goal, ext2fs_block_bitmap map, blk64_t * ret),                  \
	  (fs, goal, map, ret))                                                                    \
	X(errcode_t, ext2fs_new_dir_block,                                                         \
	  (ext2_filsys fs, ext2_ino_t dir, ext2_ino_t parent, char **block),                       \
	  (fs, dir, parent, block))                                                                \
	X(errcode_t, ext2fs_new_inode,                                                             \
	  (ext2_filsys fs, ext2_ino_t dir, int mode, ext2fs_inode_bitmap map, ext2_ino_t *ret),    \
	  (fs, dir, mode, map, ret))                                                               \
	X(errcode_t, ext2fs_open2,                                                                 \
	  (const char *name, const char *io_opts, int flags, int super, unsigned int bsize,        \
	   io_manager io, ext2_filsys *ret),                                                       \
	  (name, io_opts, flags, super, bsize, io, ret))                                           \
	X(errcode_t, ext2fs_read_bitmaps, (ext2_filsys fs), (fs))                                  \
	X(errcode_t, ext2fs_read_inode,                                                            \
	  (ext2_filsys fs, ext2_ino_t ino, struct ext2_inode * inode), (fs, ino, inode))           \
	X(errcode_t, ext2fs_unlink,                                                                \
	  (ext2_filsys fs, ext2_ino_t dir, const char *name, ext2_ino_t ino, int flags),           \
	  (fs, dir, name, ino, flags))                                                             \
	X(errcode_t, ext2fs_write_dir_block4,                                                      \
	  (ext2_filsys fs, blk64_t block, void *buf, int flags, ext2_ino_t ino),                   \
	  (fs, block, buf, flags, ino))                                                            \
	X(errcode_t, ext2fs_write_inode,                                                           \
	  (ext2_filsys fs, ext2_ino_t ino, struct ext2_inode * inode), (fs, ino, inode))           \
	X(errcode_t, ext2fs_write_new_inode,                                                       \
	  (ext2_filsys fs, ext2_ino_t ino, struct ext2_inode * inode), (fs, ino, inode))

#define SLOT(ret, name, params, args) ret(*name) params;
#define VSLOT(name, params, args) void(*name) params;
#define SYM(ret, name, params, args) {#name, (void **)&lib.name},
#define VSYM(name, params, args) {#name, (void **)&lib.name},
#define FORWARD(ret, name, params, args)                                                           \
	ret name params                                                                            \
	{                                                                                          \
		return lib.name args;                                                              \
	}
#define VFORWARD(name, params, args)                                                               \
	void name params                                                                           \
	{                                                                                          \
		lib.name args;                                                                     \
	}

/* The resolved entry points. Set once, by fc_ext2fs_load (fireclaw is single-threaded). */
static struct {
	void *handle;
	EXT2FS_FUNCS(SLOT, VSLOT)
	void (*initialize_ext2_error_table)(void);
	const char *(*error_message)(long code);
} lib;

/* clang-format off */
static const struct fc_dlsym SYMS[] = {
    EXT2FS_FUNCS(SYM, VSYM)
    {"initialize_ext2_error_table", (void **)&lib.initialize_ext2_error_table},
    {"error_message", (void **)&lib.error_message},
    {NULL, NULL},
};
/* clang-format on */

EXT2FS_FUNCS(FORWARD, VFORWARD)

const char *fc_ext2fs_load(void)
{
	if (lib.handle)
		return NULL;
	const char *err = fc_dl_load(&lib.handle, LIBEXT2FS, "libext2fs2", SYMS);
	if (err)
		return err;
	/* libext2fs reports com_err codes; register their texts once */
	lib.initialize_ext2_error_table();
	return NULL;
}

/* libcom_err's: the text of an error code (only ever asked after the library loaded). */
const char *error_message(long code)
{
	return lib.handle ? lib.error_message(code) : "unknown error";
}
