/* C unit test for fireclaw-init's module selection (guest/init-modules.h): made-up sysfs
 * trees with the virtio devices QEMU and Firecracker give, and broken ones; the modules
 * selected must be the drivers of the devices present, in the order file's order, after
 * the modules that drive no device. Prints TAP. */
#include "../../guest/init-modules.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int n, failed;
static char root[64];

/* the order file of fireclaw's default image (Debian's cloud kernel) */
static const char *ORDER = "virtio_ring\nvirtio\nvirtio_mmio\nvirtio_rng\nvirtio_blk\nfailover\n"
			   "net_failover\nvirtio_net\nvsock\nvmw_vsock_virtio_transport_common\n"
			   "vmw_vsock_virtio_transport\nvirtio_console\n";

static void is(const char *got, const char *want, const char *name)
{
	n++;
	int ok = !strcmp(got, want);
	if (!ok)
		failed++;
	printf("%s %d - %s\n", ok ? "ok" : "not ok", n, name);
	if (!ok)
		printf("#   got:  %s\n#   want: %s\n", got, want);
}

static void add(const char *m, void *ctx)
{
	char *out = ctx;
	size_t used = strlen(out);
	snprintf(out + used, 1024 - used, "%s%s", used ? " " : "", m);
}

static void run(const char *sys, const char *order, char *out)
{
	char text[1024];
	snprintf(text, sizeof text, "%s", order);
	out[0] = 0;
	fi_load_modules(text, sys, add, out);
}

static void must(int r, const char *what)
{
	if (r < 0 && errno != EEXIST) {
		printf("Bail out! %s: %s\n", what, strerror(errno));
		exit(1);
	}
}

/* a fresh SYS/bus/virtio/devices with one virtioN/device file per text in devs */
static void tree(const char *name, const char **devs, int ndev)
{
	char p[512];
	snprintf(p, sizeof p, "%s/%s", root, name);
	must(mkdir(p, 0755), p);
	snprintf(p, sizeof p, "%s/%s/bus", root, name);
	must(mkdir(p, 0755), p);
	snprintf(p, sizeof p, "%s/%s/bus/virtio", root, name);
	must(mkdir(p, 0755), p);
	snprintf(p, sizeof p, "%s/%s/bus/virtio/devices", root, name);
	must(mkdir(p, 0755), p);
	for (int i = 0; i < ndev; i++) {
		snprintf(p, sizeof p, "%s/%s/bus/virtio/devices/virtio%d", root, name, i);
		must(mkdir(p, 0755), p);
		if (!devs[i])
			continue; /* a device without its file */
		snprintf(p, sizeof p, "%s/%s/bus/virtio/devices/virtio%d/device", root, name, i);
		FILE *f = fopen(p, "w");
		if (!f || fputs(devs[i], f) < 0 || fclose(f) != 0)
			must(-1, p);
	}
}

static const char *ALL = "virtio_ring virtio virtio_mmio virtio_rng virtio_blk failover "
			 "net_failover virtio_net vsock vmw_vsock_virtio_transport_common "
			 "vmw_vsock_virtio_transport virtio_console";

int main(void)
{
	snprintf(root, sizeof root, "/tmp/fc-init-modules-XXXXXX");
	if (!mkdtemp(root)) {
		printf("Bail out! mkdtemp: %s\n", strerror(errno));
		return 1;
	}
	char out[1024], sys[256];

	/* QEMU: block, rng, virtio-serial, net (sysfs lists them in probe order) */
	const char *qemu[] = {"0x0002\n", "0x0004\n", "0x0003\n", "0x0001\n"};
	tree("qemu", qemu, 4);
	snprintf(sys, sizeof sys, "%s/qemu", root);
	run(sys, ORDER, out);
	is(out,
	   "virtio_ring virtio virtio_mmio virtio_rng virtio_blk failover net_failover "
	   "virtio_net virtio_console",
	   "QEMU's devices: no vsock modules, the rest in order");

	/* Firecracker: block, net, vsock (no rng before v1.4, no virtio-serial) */
	const char *fc[] = {"0x0002\n", "0x0001\n", "0x0013\n"};
	tree("fc", fc, 3);
	snprintf(sys, sizeof sys, "%s/fc", root);
	run(sys, ORDER, out);
	is(out,
	   "virtio_ring virtio virtio_mmio virtio_blk failover net_failover virtio_net vsock "
	   "vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport",
	   "Firecracker's devices: the vsock trio, no console, no rng");

	/* no virtio device visible: every driver, as before the selection */
	tree("none", NULL, 0);
	snprintf(sys, sizeof sys, "%s/none", root);
	run(sys, ORDER, out);
	is(out, ALL, "no device visible: every module");
	snprintf(sys, sizeof sys, "%s/missing", root);
	run(sys, ORDER, out);
	is(out, ALL, "no sysfs directory: every module");

	/* files that do not parse count as no device; a disk alone selects virtio_blk */
	const char *odd[] = {"garbage\n", NULL, "0x0002\n", "0x\n", "0x10000\n", ""};
	tree("odd", odd, 6);
	snprintf(sys, sizeof sys, "%s/odd", root);
	run(sys, ORDER, out);
	is(out, "virtio_ring virtio virtio_mmio virtio_blk", "malformed device files are skipped");

	/* the generic kernel's extra modules drive no device: always loaded, in order; a
	 * driver listed before the transport still waits for pass 2 */
	run(sys, "virtio_ring virtio virtio_blk crc16 mbcache jbd2 virtio_mmio ext4 virtio_console",
	    out);
	is(out, "virtio_ring virtio crc16 mbcache jbd2 virtio_mmio ext4 virtio_blk",
	   "modules of no device first, in order, then the drivers");

	char cmd[128];
	snprintf(cmd, sizeof cmd, "rm -rf %s", root);
	if (system(cmd) != 0)
		printf("# could not remove %s\n", root);
	printf("1..%d\n", n);
	return failed != 0;
}
