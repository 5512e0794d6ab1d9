/* fc_ext2io.c - fireclaw.rootfs: libext2fs's I/O on a file descriptor we own. */
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
struct struct_io_manager rootfs_fdio_manager = {
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
	ch->manager = &rootfs_fdio_manager;
	ch->name = copy;
	ch->block_size = 1024;
	ch->refcount = 1;
	ch->private_data = d;
	*out = ch;
	return 0;
}
