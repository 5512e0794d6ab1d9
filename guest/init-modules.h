/*
 * Which kernel modules fireclaw-init loads: the part of guest/fireclaw-init.c that a host
 * test drives with a made-up sysfs tree (tests/unit/test_init_modules.c), since the
 * Firecracker guests it matters for cannot boot on every host.
 *
 * The initramfs's lib/modules/order lists every module the image's kernel may need, in
 * dependency order: the virtio core and transport, and the drivers of every device type
 * either VMM gives (QEMU: virtio-serial for the agent; Firecracker: vsock). Loading a
 * driver whose device is absent costs boot time for nothing under TCG (the vsock trio under
 * QEMU: ~55 ms of QEMU CPU; docs/guest-notes.md, "What a cold boot spends its time on
 * (TCG)"). So the modules are loaded in two passes of that order:
 *
 *   1. every module that is no device's driver (virtio_ring, virtio, virtio_mmio, and
 *      whatever else the kernel needs: ext4 and its helpers in the generic kernel); the
 *      transport finds its devices while it loads (virtio_mmio's probe registers each
 *      device on the virtio bus before finit_module returns)
 *   2. each device driver (and the modules only it uses) whose device type is listed in
 *      SYS/bus/virtio/devices/<dev>/device
 *
 * When no virtio device is visible after pass 1 (a transport that probes later, a kernel
 * with the transport built in and no such sysfs directory), pass 2 loads every driver, as
 * before this selection existed: a guest never loses a driver to it.
 */
#ifndef FIRECLAW_INIT_MODULES_H
#define FIRECLAW_INIT_MODULES_H

#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* virtio device type ids (the virtio spec's "Device Types") and their drivers, with the
 * modules only that driver needs */
static const struct {
	const char *module;
	unsigned device;
} fi_device_modules[] = {
    {"failover", 1},
    {"net_failover", 1},
    {"virtio_net", 1},
    {"virtio_blk", 2},
    {"virtio_console", 3},
    {"virtio_rng", 4},
    {"vsock", 0x13},
    {"vmw_vsock_virtio_transport_common", 0x13},
    {"vmw_vsock_virtio_transport", 0x13},
};

#define FI_MAX_DEVICES 64

struct fi_devices {
	unsigned type[FI_MAX_DEVICES];
	int n;
};

/* The device type of a module that drives one, or 0 (not a device driver). */
static unsigned fi_module_device(const char *module)
{
	for (size_t i = 0; i < sizeof fi_device_modules / sizeof fi_device_modules[0]; i++)
		if (!strcmp(module, fi_device_modules[i].module))
			return fi_device_modules[i].device;
	return 0;
}

/* The virtio devices under SYS/bus/virtio/devices: each one's `device` file holds its type
 * as "0x%04x\n". Unreadable or malformed entries are skipped; at most FI_MAX_DEVICES. */
static void fi_scan_devices(const char *sys, struct fi_devices *d)
{
	char path[512];
	d->n = 0;
	snprintf(path, sizeof path, "%s/bus/virtio/devices", sys);
	DIR *dir = opendir(path);
	if (!dir)
		return;
	struct dirent *e;
	while ((e = readdir(dir)) && d->n < FI_MAX_DEVICES) {
		if (e->d_name[0] == '.')
			continue;
		char file[800], text[32];
		snprintf(file, sizeof file, "%s/%s/device", path, e->d_name);
		int fd = open(file, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			continue;
		ssize_t r = read(fd, text, sizeof text - 1);
		close(fd);
		if (r <= 0)
			continue;
		text[r] = 0;
		char *end;
		unsigned long type = strtoul(text, &end, 16);
		if (end != text && (*end == '\n' || *end == 0) && type > 0 && type < 0x10000)
			d->type[d->n++] = (unsigned)type;
	}
	closedir(dir);
}

static int fi_has_device(const struct fi_devices *d, unsigned type)
{
	for (int i = 0; i < d->n; i++)
		if (d->type[i] == type)
			return 1;
	return 0;
}

/* Load the modules of `order` (names separated by blanks or newlines; modified) in the two
 * passes above, calling load(name, ctx) for each module to load; sys is the sysfs mount
 * ("/sys" in the guest). */
static void fi_load_modules(char *order, const char *sys, void (*load)(const char *, void *),
			    void *ctx)
{
	char *names[256];
	int n = 0;
	char *save = NULL;
	for (char *m = strtok_r(order, " \t\n", &save); m && n < 256;
	     m = strtok_r(NULL, " \t\n", &save))
		names[n++] = m;
	for (int i = 0; i < n; i++)
		if (!fi_module_device(names[i]))
			load(names[i], ctx);
	struct fi_devices devs;
	fi_scan_devices(sys, &devs);
	for (int i = 0; i < n; i++) {
		unsigned type = fi_module_device(names[i]);
		if (type && (devs.n == 0 || fi_has_device(&devs, type)))
			load(names[i], ctx);
	}
}

#endif
