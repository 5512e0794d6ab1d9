/*
 * fireclaw-init: the /init of the initramfs of every image fireclaw builds. It brings the
 * guest to the point where fireclaw can run commands in it, with no process forked until
 * the agent, then hands PID 1 to the image's own init:
 *
 *   1. mount devtmpfs, proc and sysfs; the console on stdin/stdout/stderr
 *   2. load the kernel modules listed in /lib/modules/order (finit_module, in order), the
 *      device drivers only for the virtio devices present (guest/init-modules.h)
 *   3. wait for the root disk (root=, fireclaw.rootwait= s), mount it on /newroot
 *   4. the network of ip= (addresses, netmask, gateway with a permanent neighbour entry
 *      for fireclaw.gw_mac=, the resolvers), the hostname
 *   5. /dev/pts, /dev/shm, /dev/fd and /dev/std*, /run, and the tmpfs mounts listed in the
 *      root's /etc/fstab; /dev, /proc and /sys moved into the new root
 *   6. switch root (the initramfs's files deleted, its memory freed), start the guest agent
 *      (/usr/sbin/fireclaw-agent --daemon) and exec the image's init (init=, /sbin/init)
 *
 * Why C and not a busybox script: under TCG every exec costs tens of milliseconds of
 * translation, and the script ran one busybox per module and per network command before
 * the agent could start (docs/DECISIONS.md). Why the network here: the agent must not
 * take commands before the guest is configured (a command that runs at once after boot
 * sees its address, route, resolver and hostname), and starting it here, before the
 * image's init, is what makes it answer first.
 *
 * Errors that make booting impossible print one "fireclaw-initrd: …" line on the console
 * (the host quotes it) and reboot, which ends the VM (QEMU runs with -no-reboot). Lesser
 * failures (a module, the network) print a line and go on, as the script did.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <net/route.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/vfs.h>
#include <time.h>
#include <unistd.h>

#include "init-modules.h"

#define AGENT "/usr/sbin/fireclaw-agent"
#define NEWROOT "/newroot"
#define MAX_LINE 4096

static struct {
	char root[256], fstype[64], flags[512], init[256];
	char ip[512], hostname[65], gw_mac[32];
	int ro, wait, debug;
} cfg = {"/dev/vda", "ext4", "", "/sbin/init", "", "", "", 0, 10, 0};

static char modules[MAX_LINE]; /* the load order, for messages */

static void say(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("fireclaw-initrd: ", stdout);
	vprintf(fmt, ap);
	putchar('\n');
	fflush(stdout);
	va_end(ap);
}

/* fireclaw.debug: progress lines with the uptime */
static void trace(const char *fmt, ...)
{
	if (!cfg.debug)
		return;
	struct timespec ts;
	clock_gettime(CLOCK_BOOTTIME, &ts);
	va_list ap;
	va_start(ap, fmt);
	printf("[%ld.%02ld] fireclaw-initrd: ", (long)ts.tv_sec, ts.tv_nsec / 10000000);
	vprintf(fmt, ap);
	putchar('\n');
	fflush(stdout);
	va_end(ap);
}

static _Noreturn void fail(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("fireclaw-initrd: ", stdout);
	vprintf(fmt, ap);
	putchar('\n');
	va_end(ap);
	say("cannot boot: rebooting (the VMM exits; QEMU needs -no-reboot)");
	/* give the serial line a moment to drain before the reset */
	sleep(1);
	sync();
	reboot(RB_AUTOBOOT);
	for (;;)
		pause();
}

static void copy(char *dst, size_t n, const char *src)
{
	snprintf(dst, n, "%s", src);
}

static size_t read_file(const char *path, char *buf, size_t n)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	ssize_t r = read(fd, buf, n - 1);
	close(fd);
	buf[r > 0 ? r : 0] = 0;
	return r > 0 ? (size_t)r : 0;
}

static void parse_cmdline(void)
{
	char line[MAX_LINE], *save = NULL;
	read_file("/proc/cmdline", line, sizeof line);
	for (char *a = strtok_r(line, " \t\n", &save); a; a = strtok_r(NULL, " \t\n", &save)) {
		if (!strncmp(a, "root=", 5))
			copy(cfg.root, sizeof cfg.root, a + 5);
		else if (!strncmp(a, "rootfstype=", 11))
			copy(cfg.fstype, sizeof cfg.fstype, a + 11);
		else if (!strncmp(a, "rootflags=", 10))
			copy(cfg.flags, sizeof cfg.flags, a + 10);
		else if (!strcmp(a, "ro") || !strcmp(a, "rw"))
			cfg.ro = a[1] == 'o';
		else if (!strncmp(a, "init=", 5))
			copy(cfg.init, sizeof cfg.init, a + 5);
		else if (!strncmp(a, "fireclaw.rootwait=", 18))
			cfg.wait = atoi(a + 18);
		else if (!strcmp(a, "fireclaw.debug"))
			cfg.debug = 1;
		else if (!strncmp(a, "ip=", 3))
			copy(cfg.ip, sizeof cfg.ip, a + 3);
		else if (!strncmp(a, "fireclaw.hostname=", 18))
			copy(cfg.hostname, sizeof cfg.hostname, a + 18);
		else if (!strncmp(a, "fireclaw.gw_mac=", 16))
			copy(cfg.gw_mac, sizeof cfg.gw_mac, a + 16);
	}
}

static void mount_or_say(const char *src, const char *dst, const char *type, unsigned long fl,
			 const char *data)
{
	if (mount(src, dst, type, fl, data) < 0 && errno != EBUSY)
		say("mount %s on %s: %s", type, dst, strerror(errno));
}

static void early_mounts(void)
{
	mount_or_say("devtmpfs", "/dev", "devtmpfs", 0, NULL);
	int fd = open("/dev/console", O_RDWR | O_NOCTTY);
	if (fd >= 0) {
		for (int i = 0; i < 3; i++)
			dup2(fd, i);
		if (fd > 2)
			close(fd);
	}
	mount_or_say("proc", "/proc", "proc", 0, NULL);
	mount_or_say("sysfs", "/sys", "sysfs", 0, NULL);
}

static void load_one(const char *m, void *ctx)
{
	(void)ctx;
	char path[320];
	snprintf(path, sizeof path, "/lib/modules/%s.ko", m);
	trace("insmod %s", m);
	size_t used = strlen(modules);
	snprintf(modules + used, sizeof modules - used, "%s%s", used ? " " : "", m);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0 || (syscall(SYS_finit_module, fd, "", 0) < 0 && errno != EEXIST))
		say("insmod %s failed: %s", m, strerror(errno));
	if (fd >= 0)
		close(fd);
}

/* the drivers of the devices present only (guest/init-modules.h) */
static void load_modules(void)
{
	char list[MAX_LINE];
	read_file("/lib/modules/order", list, sizeof list);
	fi_load_modules(list, "/sys", load_one, NULL);
}

/* Mount options: the VFS flags by name, the rest passed to the filesystem. */
static unsigned long mount_flags(const char *opts, char *data, size_t n)
{
	static const struct {
		const char *name;
		unsigned long set, clear;
	} known[] = {
	    {"ro", MS_RDONLY, 0},
	    {"rw", 0, MS_RDONLY},
	    {"nosuid", MS_NOSUID, 0},
	    {"nodev", MS_NODEV, 0},
	    {"noexec", MS_NOEXEC, 0},
	    {"sync", MS_SYNCHRONOUS, 0},
	    {"dirsync", MS_DIRSYNC, 0},
	    {"noatime", MS_NOATIME, 0},
	    {"nodiratime", MS_NODIRATIME, 0},
	    {"relatime", MS_RELATIME, 0},
	    {"strictatime", MS_STRICTATIME, 0},
	    {"lazytime", MS_LAZYTIME, 0},
	    {"defaults", 0, 0},
	};
	char buf[512], *save = NULL;
	unsigned long fl = 0;
	copy(buf, sizeof buf, opts);
	data[0] = 0;
	for (char *o = strtok_r(buf, ",", &save); o; o = strtok_r(NULL, ",", &save)) {
		size_t i = 0;
		while (i < sizeof known / sizeof known[0] && strcmp(o, known[i].name))
			i++;
		if (i < sizeof known / sizeof known[0]) {
			fl = (fl | known[i].set) & ~known[i].clear;
			continue;
		}
		size_t used = strlen(data);
		snprintf(data + used, n - used, "%s%s", used ? "," : "", o);
	}
	return fl;
}

static void mount_root(void)
{
	if (strncmp(cfg.root, "/dev/", 5))
		fail("root=%s is not supported (use a device path such as root=/dev/vda)",
		     cfg.root);
	/* devtmpfs creates the node when virtio_blk finds the disk */
	struct stat st;
	const struct timespec tick = {0, 10 * 1000 * 1000};
	for (int n = cfg.wait * 100; stat(cfg.root, &st) < 0 || !S_ISBLK(st.st_mode); n--) {
		if (n <= 0)
			fail("root device %s did not appear within %d s (is a virtio-blk disk "
			     "attached? "
			     "modules: %s)",
			     cfg.root, cfg.wait, modules);
		nanosleep(&tick, NULL);
	}
	char opts[600], data[512];
	snprintf(opts, sizeof opts, "%s%s%s", cfg.ro ? "ro" : "rw", cfg.flags[0] ? "," : "",
		 cfg.flags);
	trace("mounting %s (%s, %s)", cfg.root, cfg.fstype, opts);
	unsigned long fl = mount_flags(opts, data, sizeof data);
	if (mount(cfg.root, NEWROOT, cfg.fstype, fl, data[0] ? data : NULL) < 0)
		fail("cannot mount %s (%s, %s) on " NEWROOT ": %s", cfg.root, cfg.fstype, opts,
		     strerror(errno));
	trace("mounted");
	char init[300];
	snprintf(init, sizeof init, NEWROOT "%s", cfg.init);
	if (lstat(init, &st) < 0)
		fail("no %s on %s", cfg.init, cfg.root);
}

/* ---- network (ip=GUEST:SERVER:GATEWAY:NETMASK:HOSTNAME:DEVICE:AUTO:DNS0:DNS1) ---- */

static int ifreq_ioctl(int s, unsigned long req, const char *dev, const char *addr)
{
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	copy(ifr.ifr_name, sizeof ifr.ifr_name, dev);
	if (addr) {
		struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
		sin->sin_family = AF_INET;
		if (inet_pton(AF_INET, addr, &sin->sin_addr) != 1) {
			errno = EINVAL;
			return -1;
		}
		return ioctl(s, req, &ifr);
	}
	if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0)
		return -1;
	ifr.ifr_flags |= IFF_UP;
	return ioctl(s, SIOCSIFFLAGS, &ifr);
}

static void set_addr(int s, const char *dev, const char *addr, const char *mask)
{
	if (ifreq_ioctl(s, SIOCSIFFLAGS, dev, NULL) < 0) {
		say("no network device %s", dev);
		return;
	}
	if (ifreq_ioctl(s, SIOCSIFADDR, dev, addr) < 0 ||
	    ifreq_ioctl(s, SIOCSIFNETMASK, dev, mask[0] ? mask : "255.255.255.255") < 0)
		say("address %s/%s on %s: %s", addr, mask, dev, strerror(errno));
}

/* a permanent neighbour entry: the gateway's MAC is known, no ARP */
static void set_neigh(int s, const char *dev, const char *gw, const char *mac)
{
	struct arpreq ar;
	memset(&ar, 0, sizeof ar);
	struct sockaddr_in *sin = (struct sockaddr_in *)&ar.arp_pa;
	sin->sin_family = AF_INET;
	unsigned int b[6];
	if (inet_pton(AF_INET, gw, &sin->sin_addr) != 1 ||
	    sscanf(mac, "%2x:%2x:%2x:%2x:%2x:%2x", &b[0], &b[1], &b[2], &b[3], &b[4], &b[5]) != 6) {
		say("fireclaw.gw_mac=%s: not a MAC address", mac);
		return;
	}
	ar.arp_ha.sa_family = ARPHRD_ETHER;
	for (int i = 0; i < 6; i++)
		ar.arp_ha.sa_data[i] = (char)b[i];
	ar.arp_flags = ATF_PERM | ATF_COM;
	copy(ar.arp_dev, sizeof ar.arp_dev, dev);
	if (ioctl(s, SIOCSARP, &ar) < 0)
		say("neighbour %s on %s: %s", gw, dev, strerror(errno));
}

static void set_gateway(int s, const char *dev, const char *gw)
{
	struct rtentry rt;
	memset(&rt, 0, sizeof rt);
	((struct sockaddr_in *)&rt.rt_dst)->sin_family = AF_INET;
	((struct sockaddr_in *)&rt.rt_genmask)->sin_family = AF_INET;
	struct sockaddr_in *g = (struct sockaddr_in *)&rt.rt_gateway;
	g->sin_family = AF_INET;
	rt.rt_flags = RTF_UP | RTF_GATEWAY;
	rt.rt_dev = (char *)dev;
	if (inet_pton(AF_INET, gw, &g->sin_addr) != 1 || ioctl(s, SIOCADDRT, &rt) < 0)
		say("default route via %s: %s", gw, strerror(errno));
}

static void write_resolvers(const char *dns0, const char *dns1)
{
	char text[128];
	int n = snprintf(text, sizeof text, "nameserver %s\n", dns0);
	if (dns1[0])
		n += snprintf(text + n, sizeof text - (size_t)n, "nameserver %s\n", dns1);
	int fd = open(NEWROOT "/etc/resolv.conf", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0 || write(fd, text, (size_t)n) != n)
		say("/etc/resolv.conf: %s", strerror(errno));
	if (fd >= 0)
		close(fd);
}

/* split s on ':' into at most n fields (empty fields kept) */
static void fields(char *s, char **f, int n)
{
	for (int i = 0; i < n; i++) {
		f[i] = s ? s : "";
		char *c = s ? strchr(s, ':') : NULL;
		if (c)
			*c = 0;
		s = c ? c + 1 : NULL;
	}
}

static void network(void)
{
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s < 0) {
		say("network: %s", strerror(errno));
		return;
	}
	ifreq_ioctl(s, SIOCSIFFLAGS, "lo", NULL);
	char ip[sizeof cfg.ip], *f[9];
	copy(ip, sizeof ip, cfg.ip);
	fields(ip, f, 9);
	const char *addr = f[0], *gw = f[2], *mask = f[3], *dev = f[5][0] ? f[5] : "eth0";
	if (!cfg.hostname[0])
		copy(cfg.hostname, sizeof cfg.hostname, f[4]);
	if (!strcmp(ip, "dhcp") || !strcmp(ip, "on") || !strcmp(ip, "any") || !strcmp(ip, "both") ||
	    !strcmp(ip, "bootp") || !strcmp(ip, "rarp")) {
		say("ip=%s: no DHCP in this guest, give a static "
		    "ip=GUEST::GATEWAY:NETMASK::eth0:off",
		    ip);
	} else if (addr[0] && strcmp(addr, "off") && strcmp(addr, "none")) {
		set_addr(s, dev, addr, mask);
		if (gw[0] && cfg.gw_mac[0])
			set_neigh(s, dev, gw, cfg.gw_mac);
		if (gw[0])
			set_gateway(s, dev, gw);
	}
	if (f[7][0])
		write_resolvers(f[7], f[8]);
	close(s);
	char name[65] = "";
	if (cfg.hostname[0])
		copy(name, sizeof name, cfg.hostname);
	else if (read_file(NEWROOT "/etc/hostname", name, sizeof name))
		name[strcspn(name, " \t\n")] = 0;
	if (!name[0])
		copy(name, sizeof name, "fireclaw");
	if (sethostname(name, strlen(name)) < 0)
		say("hostname %s: %s", name, strerror(errno));
	trace("network and hostname set");
}

/* ---- the new root's mounts ---- */

static void dev_links(void)
{
	static const char *links[][2] = {{"/proc/self/fd", "/dev/fd"},
					 {"/proc/self/fd/0", "/dev/stdin"},
					 {"/proc/self/fd/1", "/dev/stdout"},
					 {"/proc/self/fd/2", "/dev/stderr"}};
	for (size_t i = 0; i < sizeof links / sizeof links[0]; i++)
		if (symlink(links[i][0], links[i][1]) < 0 && errno != EEXIST)
			say("%s: %s", links[i][1], strerror(errno));
}

static void mount_at(const char *type, const char *path, const char *opts)
{
	char data[512];
	mkdir(path, 0755);
	unsigned long fl = mount_flags(opts, data, sizeof data);
	mount_or_say(type, path, type, fl, data[0] ? data : NULL);
}

/* The tmpfs mounts of the root's /etc/fstab other than the ones made for every image: the
 * image's init may expect them (fireclaw's own images list /tmp there). */
static void fstab_tmpfs(void)
{
	static char text[16384];
	read_file(NEWROOT "/etc/fstab", text, sizeof text);
	char *save = NULL;
	for (char *l = strtok_r(text, "\n", &save); l; l = strtok_r(NULL, "\n", &save)) {
		char src[64], dir[256], type[32], opts[256];
		if (l[0] == '#' || sscanf(l, "%63s %255s %31s %255s", src, dir, type, opts) != 4)
			continue;
		if (strcmp(type, "tmpfs") || strstr(opts, "noauto") || dir[0] != '/' ||
		    strstr(dir, "..") || !strcmp(dir, "/dev/shm") || !strcmp(dir, "/run"))
			continue;
		char path[300];
		snprintf(path, sizeof path, NEWROOT "%s", dir);
		mount_at("tmpfs", path, opts);
	}
}

static void new_root_mounts(void)
{
	mount_at("devpts", "/dev/pts", "gid=5,mode=0620,ptmxmode=0666");
	mount_at("tmpfs", "/dev/shm", "mode=1777,nosuid,nodev");
	dev_links();
	mount_at("tmpfs", NEWROOT "/run", "mode=0755,nosuid,nodev");
	/* an imported image may have no /tmp */
	if (mkdir(NEWROOT "/tmp", 01777) == 0)
		chmod(NEWROOT "/tmp", 01777);
	fstab_tmpfs();
	static const char *moved[] = {"/dev", "/proc", "/sys"};
	for (size_t i = 0; i < sizeof moved / sizeof moved[0]; i++) {
		char to[64];
		snprintf(to, sizeof to, NEWROOT "%s", moved[i]);
		mkdir(to, i ? 0555 : 0755);
		if (mount(moved[i], to, NULL, MS_MOVE, NULL) < 0)
			say("moving %s: %s", moved[i], strerror(errno));
	}
}

/* ---- switch root ---- */

/* Delete the initramfs's files (they are in RAM until deleted), staying on its device. */
static void delete_tree(int dirfd, dev_t dev)
{
	DIR *d = fdopendir(dirfd);
	if (!d) {
		close(dirfd);
		return;
	}
	struct dirent *e;
	while ((e = readdir(d))) {
		if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
			continue;
		struct stat st;
		if (fstatat(dirfd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0 || st.st_dev != dev)
			continue;
		if (S_ISDIR(st.st_mode)) {
			int sub = openat(dirfd, e->d_name,
					 O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
			if (sub >= 0)
				delete_tree(sub, dev);
		}
		unlinkat(dirfd, e->d_name, S_ISDIR(st.st_mode) ? AT_REMOVEDIR : 0);
	}
	closedir(d);
}

static void switch_root(void)
{
	struct stat st;
	if (stat("/", &st) == 0)
		delete_tree(open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC), st.st_dev);
	if (chdir(NEWROOT) < 0 || mount(".", "/", NULL, MS_MOVE, NULL) < 0 || chroot(".") < 0 ||
	    chdir("/") < 0)
		fail("cannot switch to the root on %s: %s", cfg.root, strerror(errno));
}

/* The agent before the image's init: the network and mounts are ready already. */
static void start_agent(void)
{
	if (access(AGENT, X_OK) < 0)
		return;
	pid_t pid = fork();
	if (pid == 0) {
		char *argv[] = {AGENT, "--daemon", NULL};
		char *envp[] = {"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
				"HOME=/", "TERM=linux", NULL};
		execve(AGENT, argv, envp);
		say(AGENT ": %s", strerror(errno));
		_exit(127);
	}
	if (pid < 0)
		say("cannot start " AGENT ": %s", strerror(errno));
	/* the image's init (PID 1 after the exec below) reaps it */
}

int main(int argc, char **argv)
{
	(void)argc;
	struct timespec t0;
	clock_gettime(CLOCK_BOOTTIME, &t0);
	early_mounts();
	parse_cmdline();
	trace("started (main at %ld.%03ld)", (long)t0.tv_sec, t0.tv_nsec / 1000000);
	load_modules();
	mount_root();
	network();
	new_root_mounts();
	switch_root();
	start_agent();
	trace("starting %s", cfg.init);
	argv[0] = cfg.init;
	execv(cfg.init, argv);
	fail("cannot run %s: %s", cfg.init, strerror(errno));
}
