/* fc_net_sock.c - fireclaw.net: taps (net.tap_create, net.tap_open), TCP sockets opened
 * inside a namespace (net.connect, net.probe), listening unix sockets for a VMM
 * (net.unix_listen) and connections to a VMM's unix socket (net.unix_connect). See
 * core/net.c for the module's interface. */
#include "fc_net.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <linux/if_tun.h>
#include <linux/rtnetlink.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

/* ---- tap ---- */

struct tap_opts {
	const char *name, *addr, *guest_ip, *guest_mac;
	int has_mac, has_addr, has_guest;
	unsigned char mac[6], guest_hw[6];
	struct ip_addr ip, gip;
	unsigned mtu;
	long uid;
};

static void read_tap_opts(lua_State *L, int t, struct tap_opts *o)
{
	static const char *const known[] = {"name",	"mac",	     "mtu", "addr",
					    "guest_ip", "guest_mac", "uid", NULL};
	memset(o, 0, sizeof *o);
	if (!lua_isnoneornil(L, t))
		luaL_checktype(L, t, LUA_TTABLE);
	fc_opt_check(L, t, "net.tap_create", known);
	o->name = net_valid_ifname(L, fc_opt_string(L, t, "name", "tap0"));
	const char *mac = fc_opt_string(L, t, "mac", NULL);
	if (mac) {
		net_check_mac(L, mac, o->mac);
		o->has_mac = 1;
	}
	double mtu = fc_opt_number(L, t, "mtu", 0);
	if (mtu < 0 || mtu > 65535 || mtu != (unsigned)mtu)
		fc_error(L, "net: bad MTU %g", mtu);
	o->mtu = (unsigned)mtu;
	o->addr = fc_opt_string(L, t, "addr", NULL);
	if (o->addr) {
		net_check_cidr(L, o->addr, &o->ip);
		o->has_addr = 1;
	}
	o->guest_ip = fc_opt_string(L, t, "guest_ip", NULL);
	o->guest_mac = fc_opt_string(L, t, "guest_mac", NULL);
	if (!o->guest_ip != !o->guest_mac)
		fc_error(L, "net: create tap %s: guest_ip and guest_mac go together", o->name);
	if (o->guest_ip) {
		net_check_ip(L, o->guest_ip, &o->gip);
		net_check_mac(L, o->guest_mac, o->guest_hw);
		o->has_guest = 1;
	}
	o->uid = (long)fc_opt_number(L, t, "uid", -1);
}

struct tun_req {
	const char *name;
	long uid;
	int fd;
};

/* Runs inside the target namespace: the tun device is created in the namespace of the
 * process that opened /dev/net/tun. IFF_TUN_EXCL refuses to attach to an existing one. */
/* An fd on tap `name` (TUNSETIFF with IFF_TAP | IFF_NO_PI | extra), or -errno. */
static int tun_open(const char *name, short extra)
{
	int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	ifr.ifr_flags = IFF_TAP | IFF_NO_PI | extra;
	snprintf(ifr.ifr_name, IFNAMSIZ, "%s", name);
	if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
		int e = errno;
		close(fd);
		return -e;
	}
	return fd;
}

static int tun_create(void *arg)
{
	struct tun_req *t = arg;
	int fd = tun_open(t->name, IFF_TUN_EXCL);
	if (fd < 0)
		return fd == -EBUSY ? -EEXIST : fd;
	if ((t->uid >= 0 && ioctl(fd, TUNSETOWNER, (unsigned long)t->uid) < 0) ||
	    ioctl(fd, TUNSETPERSIST, 1L) < 0) {
		int e = errno;
		close(fd); /* not persistent yet: closing removes the device */
		return e == EBUSY ? -EEXIST : -e;
	}
	t->fd = fd;
	return 0;
}

/* Undo tun_create: no longer persistent, so the last close removes the device. */
static void tun_discard(int fd)
{
	ioctl(fd, TUNSETPERSIST, 0L);
	close(fd);
}

/* Configure the new tap and lo over one netlink socket. On failure *step names what
 * failed. */
static int tap_configure(struct nl *nl, const struct tap_opts *o, char *step, size_t len)
{
	struct link_attrs tap, lo;
	int err = nl_link_get(nl, o->name, &tap);
	if (err)
		return snprintf(step, len, "look up the new tap"), err;
	err = nl_link_set(nl, tap.index, o->has_mac ? o->mac : NULL, o->mtu, 1);
	if (err)
		return snprintf(step, len, "set MAC/MTU and up"), err;
	if (o->has_addr && (err = nl_addr_add(nl, tap.index, &o->ip)))
		return snprintf(step, len, "add address %s", o->addr), err;
	err = nl_link_get(nl, "lo", &lo);
	if (!err)
		err = nl_link_set(nl, lo.index, NULL, 0, 1);
	if (err)
		return snprintf(step, len, "set lo up"), err;
	if (o->has_guest && (err = nl_neigh_add(nl, tap.index, &o->gip, o->guest_hw)))
		return snprintf(step, len, "add neighbour %s", o->guest_ip), err;
	return 0;
}

static int tap_setup(const char *netns, const struct tap_opts *o, char *step, size_t len)
{
	struct nl *nl;
	struct link_attrs la;
	int err = nl_open(netns, &nl);
	if (err)
		return err;
	if (nl_link_get(nl, o->name, &la) == 0) {
		nl_close(nl);
		return -EEXIST;
	}
	struct tun_req t = {.name = o->name, .uid = o->uid, .fd = -1};
	err = net_in_netns(netns, tun_create, &t);
	if (err) {
		snprintf(step, len, "open /dev/net/tun");
		nl_close(nl);
		return err;
	}
	err = tap_configure(nl, o, step, len);
	nl_close(nl);
	if (err)
		tun_discard(t.fd);
	else
		close(t.fd); /* persistent: the tap stays, waiting for the VMM */
	return err;
}

/* net.tap_create(netns, opts): inside namespace netns, a persistent tap
 * (IFF_TAP|IFF_NO_PI, owned by opts.uid if given) named opts.name (default "tap0") with
 * MAC opts.mac (set it: a restored guest remembers the gateway's MAC), MTU opts.mtu,
 * address opts.addr ("172.16.0.1/30"), up; lo up; and a permanent neighbour entry
 * opts.guest_ip -> opts.guest_mac on the tap, so the host never waits on ARP. All of it or
 * nothing: on failure the tap is removed. */
static int l_tap_create(lua_State *L)
{
	const char *netns = net_check_netns_name(L, 1);
	struct tap_opts o;
	read_tap_opts(L, 2, &o);
	char what[256], step[128] = "";
	snprintf(what, sizeof what, "create tap %s in %s", o.name, netns);
	int err = tap_setup(netns, &o, step, sizeof step);
	if (err == -EEXIST && !*step)
		fc_error(L, "net: %s: a link with that name already exists", what);
	if (err)
		net_fail(L, -err, what, step);
	return 0;
}

/* ---- TCP sockets inside a namespace ---- */

struct sock {
	int fd;
	char label[300]; /* "172.16.0.2:22 in fc-1a2b" */
};

static struct sock *check_open_sock(lua_State *L)
{
	struct sock *s = fc_check(L, 1, SOCK_MT);
	if (s->fd < 0)
		fc_error(L, "net: socket %s is closed", s->label);
	return s;
}

/* Deadline (monotonic ms) from an optional timeout in seconds at idx; -1 = none. */
static double opt_deadline(lua_State *L, int idx)
{
	if (lua_isnoneornil(L, idx))
		return -1;
	double s = luaL_checknumber(L, idx);
	return fc_now_ms() + (s > 0 ? s * 1000 : 0);
}

/* Wait until the socket is ready for events; raise on timeout. */
static void sock_wait(lua_State *L, struct sock *s, short events, double deadline, const char *op)
{
	struct pollfd p = {.fd = s->fd, .events = events};
	if (fc_poll(L, &p, 1, fc_ms_left(deadline)) == 0)
		fc_error(L, "net: %s %s: timed out", op, s->label);
}

static int l_sock_send(lua_State *L)
{
	struct sock *s = check_open_sock(L);
	size_t len, done = 0;
	const char *data = luaL_checklstring(L, 2, &len);
	double deadline = opt_deadline(L, 3);
	while (done < len) {
		ssize_t n = send(s->fd, data + done, len - done, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n >= 0) {
			done += (size_t)n;
		} else if (errno == EAGAIN || errno == EWOULDBLOCK) {
			sock_wait(L, s, POLLOUT, deadline, "send to");
		} else if (errno != EINTR) {
			fc_errno_error(L, errno, "net: send to %s", s->label);
		}
	}
	lua_pushinteger(L, (lua_Integer)done);
	return 1;
}

static int l_sock_recv(lua_State *L)
{
	struct sock *s = check_open_sock(L);
	lua_Integer max = luaL_optinteger(L, 2, 65536);
	if (max <= 0 || max > (1 << 30))
		fc_error(L, "net: recv: bad size %d", (int)max);
	double deadline = opt_deadline(L, 3);
	char *buf = lua_newuserdata(L, (size_t)max); /* scratch, collected */
	for (;;) {
		ssize_t n = recv(s->fd, buf, (size_t)max, MSG_DONTWAIT);
		if (n > 0) {
			lua_pushlstring(L, buf, (size_t)n);
			return 1;
		}
		if (n == 0) {
			lua_pushnil(L);
			return 1;
		}
		if (errno == EAGAIN || errno == EWOULDBLOCK)
			sock_wait(L, s, POLLIN, deadline, "recv from");
		else if (errno != EINTR)
			fc_errno_error(L, errno, "net: recv from %s", s->label);
	}
}

static int l_sock_fd(lua_State *L)
{
	struct sock *s = check_open_sock(L);
	lua_pushinteger(L, s->fd);
	return 1;
}

static int l_sock_close(lua_State *L)
{
	struct sock *s = fc_check(L, 1, SOCK_MT);
	if (s->fd >= 0)
		close(s->fd);
	s->fd = -1;
	return 0;
}

static int l_sock_tostring(lua_State *L)
{
	struct sock *s = fc_check(L, 1, SOCK_MT);
	lua_pushfstring(L, SOCK_MT ": %s%s", s->label, s->fd < 0 ? " (closed)" : "");
	return 1;
}

struct endpoint {
	const char *netns, *host;
	int port;
	char label[300];
};

/* Arguments netns (nil = ours), host (IPv4), port; raises when the namespace is missing
 * so that probe's false only ever means "nothing answers". */
static void check_endpoint(lua_State *L, const char *op, struct endpoint *ep)
{
	ep->netns = luaL_optstring(L, 1, NULL);
	if (ep->netns && !*ep->netns)
		ep->netns = NULL;
	ep->host = luaL_checkstring(L, 2);
	ep->port = luaL_checkint(L, 3);
	snprintf(ep->label, sizeof ep->label, "%s:%d in %s", ep->host, ep->port,
		 ep->netns ? ep->netns : "the host namespace");
	struct in_addr a;
	if (inet_pton(AF_INET, ep->host, &a) != 1)
		fc_error(L, "net: %s %s: bad IPv4 address '%s'", op, ep->label, ep->host);
	if (ep->port < 1 || ep->port > 65535)
		fc_error(L, "net: %s %s: bad port", op, ep->label);
	if (ep->netns) {
		int fd = fc_netns_open(ep->netns);
		if (fd < 0) {
			char what[400];
			snprintf(what, sizeof what, "%s %s", op, ep->label);
			net_fail(L, errno == ENOENT ? E_NO_NETNS : errno, what, NULL);
		}
		close(fd);
	}
}

static int l_connect(lua_State *L)
{
	struct endpoint ep;
	check_endpoint(L, "connect", &ep);
	double timeout_s = luaL_optnumber(L, 4, 10);
	int timeout_ms = timeout_s <= 0	      ? 0
			 : timeout_s >= 86400 ? 86400000
					      : (int)(timeout_s * 1000);
	struct sock *s = fc_new(L, sizeof *s, SOCK_MT);
	s->fd = -1;
	snprintf(s->label, sizeof s->label, "%s", ep.label);
	char err[256];
	int fd = fc_tcp_connect(L, ep.netns, ep.host, ep.port, timeout_ms, err, sizeof err);
	if (fd < 0)
		fc_error(L, "net: connect %s: %s", ep.label, err);
	s->fd = fd;
	return 1;
}

static int l_probe(lua_State *L)
{
	struct endpoint ep;
	check_endpoint(L, "probe", &ep);
	int timeout_ms = luaL_optint(L, 4, 50);
	if (timeout_ms < 0)
		timeout_ms = 0;
	char err[256];
	int fd = fc_tcp_connect(L, ep.netns, ep.host, ep.port, timeout_ms, err, sizeof err);
	if (fd >= 0)
		close(fd);
	lua_pushboolean(L, fd >= 0);
	return 1;
}

/* ---- fds for a VMM that may not open them itself ---- */

/* Runs inside the target namespace: a new fd on the existing tap t->name, with the flags
 * QEMU uses when it opens ifname= itself (IFF_VNET_HDR), so the guest sees the same device
 * either way (a snapshot taken with one restores with the other). */
static int tun_attach(void *arg)
{
	struct tun_req *t = arg;
	int fd = tun_open(t->name, IFF_VNET_HDR);
	if (fd < 0)
		return fd;
	t->fd = fd;
	return 0;
}

/* net.tap_open(netns, ifname) -> socket (s:fd(), s:close()): an fd on the persistent tap
 * ifname in netns, for a VMM that runs unprivileged (it cannot open /dev/net/tun): pass
 * s:fd() with proc.spawn{fds = …} (QEMU: -netdev tap,fd=N), then close s. */
static int l_tap_open(lua_State *L)
{
	const char *netns = net_check_netns_name(L, 1);
	const char *name = net_valid_ifname(L, luaL_checkstring(L, 2));
	char what[256];
	snprintf(what, sizeof what, "open tap %s in %s", name, netns);
	struct sock *s = fc_new(L, sizeof *s, SOCK_MT);
	s->fd = -1;
	snprintf(s->label, sizeof s->label, "tap %s in %s", name, netns);
	/* TUNSETIFF on a name that does not exist would create a new, non-persistent tap */
	struct nl *nl;
	struct link_attrs la;
	int err = nl_open(netns, &nl);
	if (!err) {
		err = nl_link_get(nl, name, &la);
		nl_close(nl);
	}
	if (err == -ENODEV)
		fc_error(L, "net: %s: no such tap (net.tap_create makes one)", what);
	if (err)
		net_fail(L, -err, what, NULL);
	struct tun_req t = {.name = name, .uid = -1, .fd = -1};
	err = net_in_netns(netns, tun_attach, &t);
	if (err)
		net_fail(L, -err, what, "attach through /dev/net/tun");
	s->fd = t.fd;
	return 1;
}

/* net.unix_listen(path) -> socket: a unix socket listening at path, created 0600 (a stale
 * socket file there is replaced), for a VMM to accept on (QEMU: -chardev socket,fd=N):
 * the socket has fireclaw's modes from the start and the VMM needs no access to its
 * directory. */
static int l_unix_listen(lua_State *L)
{
	const char *path = luaL_checkstring(L, 1);
	struct sockaddr_un sa;
	memset(&sa, 0, sizeof sa);
	sa.sun_family = AF_UNIX;
	if (strlen(path) >= sizeof sa.sun_path)
		fc_error(L, "net: listen on %s: path too long for a unix socket", path);
	strcpy(sa.sun_path, path);
	struct sock *s = fc_new(L, sizeof *s, SOCK_MT);
	snprintf(s->label, sizeof s->label, "unix socket %s", path);
	s->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s->fd < 0)
		fc_errno_error(L, errno, "net: listen on %s: socket", path);
	struct stat st;
	if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode))
		unlink(path);
	mode_t old = umask(0177); /* the socket file is made 0600, never anything wider */
	int rc = bind(s->fd, (struct sockaddr *)&sa, sizeof sa);
	int e = errno;
	umask(old);
	if (rc < 0)
		fc_errno_error(L, e, "net: listen on %s: bind", path);
	if (listen(s->fd, 4) < 0)
		fc_errno_error(L, errno, "net: listen on %s", path);
	return 1;
}

/* net.unix_connect(path) -> socket: a stream socket connected to the unix socket at path
 * (a VMM's, e.g. Firecracker's vsock socket, which speaks a line protocol first). The
 * connect never waits: a unix connect completes at once or fails (ECONNREFUSED: nobody
 * listens; EAGAIN: the listener's queue is full), so there is no timeout to give. The
 * socket is left blocking; s:send and s:recv wait with their own deadlines. */
static int l_unix_connect(lua_State *L)
{
	const char *path = luaL_checkstring(L, 1);
	struct sockaddr_un sa;
	memset(&sa, 0, sizeof sa);
	sa.sun_family = AF_UNIX;
	if (strlen(path) >= sizeof sa.sun_path)
		fc_error(L,
			 "net: connect to %s: path too long for a unix socket (reach it through "
			 "/proc/self/fd/N of an open directory)",
			 path);
	strcpy(sa.sun_path, path);
	struct sock *s = fc_new(L, sizeof *s, SOCK_MT);
	snprintf(s->label, sizeof s->label, "unix socket %s", path);
	s->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (s->fd < 0)
		fc_errno_error(L, errno, "net: connect to %s: socket", path);
	if (connect(s->fd, (struct sockaddr *)&sa, sizeof sa) < 0)
		fc_errno_error(L, errno, "net: connect to %s", path); /* __gc closes s->fd */
	int fl = fcntl(s->fd, F_GETFL);
	if (fl < 0 || fcntl(s->fd, F_SETFL, fl & ~O_NONBLOCK) < 0)
		fc_errno_error(L, errno, "net: connect to %s: fcntl", path);
	return 1;
}

/* net.tcp_listen(host, port) -> socket: a TCP socket listening on host:port (IPv4) in
 * fireclaw's own namespace, for a port forwarder to accept on (proc.spawn{fds = …}): a
 * port that is taken is an error here, before any forwarder exists. */
static int l_tcp_listen(lua_State *L)
{
	const char *host = luaL_checkstring(L, 1);
	int port = luaL_checkint(L, 2);
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	if (inet_pton(AF_INET, host, &sa.sin_addr) != 1)
		fc_error(L, "net: listen on %s:%d: bad IPv4 address '%s'", host, port, host);
	if (port < 1 || port > 65535)
		fc_error(L, "net: listen on %s:%d: bad port", host, port);
	struct sock *s = fc_new(L, sizeof *s, SOCK_MT);
	snprintf(s->label, sizeof s->label, "tcp %s:%d", host, port);
	s->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s->fd < 0)
		fc_errno_error(L, errno, "net: listen on %s:%d: socket", host, port);
	int one = 1;
	setsockopt(s->fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	if (bind(s->fd, (struct sockaddr *)&sa, sizeof sa) < 0)
		fc_errno_error(L, errno, "net: listen on %s:%d", host, port);
	if (listen(s->fd, 64) < 0)
		fc_errno_error(L, errno, "net: listen on %s:%d", host, port);
	return 1;
}

void fc_net_sock_register(lua_State *L)
{
	static const luaL_Reg sock_methods[] = {
	    {"send", l_sock_send},   {"recv", l_sock_recv},	      {"fd", l_sock_fd},
	    {"close", l_sock_close}, {"__tostring", l_sock_tostring}, {NULL, NULL},
	};
	static const luaL_Reg fns[] = {
	    {"tap_create", l_tap_create},
	    {"connect", l_connect},
	    {"probe", l_probe},
	    {"tap_open", l_tap_open},
	    {"unix_listen", l_unix_listen},
	    {"tcp_listen", l_tcp_listen},
	    {"unix_connect", l_unix_connect},
	    {NULL, NULL},
	};
	fc_class(L, SOCK_MT, sock_methods);
	luaL_register(L, NULL, fns);
}
