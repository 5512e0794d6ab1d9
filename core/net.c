/* net.c - fireclaw.net: network namespaces, taps, addresses and neighbours, and TCP
 * sockets opened inside a namespace. Links are configured in-process over rtnetlink
 * (libmnl); nothing here spawns `ip`.
 *
 *   net.netns_create(name)                 new namespace bound at /run/netns/NAME, the way
 *                                          `ip netns add` does it; error if NAME exists
 *   net.netns_delete(name) -> existed      unmount + unlink; a missing one is not an error
 *   net.netns_list([prefix]) -> {names}    sorted
 *   net.netns_exists(name) -> bool
 *   net.tap_create(netns, opts)            a configured persistent tap, see l_tap_create
 *                                          (fc_net_sock.c)
 *   net.link_up(netns, ifname)
 *   net.addr_add(netns, ifname, cidr)      "172.16.0.1/30" (or IPv6); replaces a same one
 *   net.neigh_add(netns, ifname, ip, mac)  permanent neighbour entry (no ARP needed)
 *   net.link_exists(netns, ifname) -> bool
 *   net.link_info(netns, ifname) -> {index=, mac=, mtu=, up=, carrier=, addrs={cidr...},
 *                                    neighbours={{ip=, mac=, state=}...}}
 *   net.connect(netns, host, port [, timeout_s=10]) -> socket
 *   net.tap_open(netns, ifname) -> socket  an fd on an existing tap, to hand to a VMM
 *   net.unix_listen(path) -> socket        a listening unix socket, mode 0600, for a VMM
 *   net.tcp_listen(host, port) -> socket   a listening TCP socket here, for a port forwarder
 *   net.unix_connect(path) -> socket       connected to a VMM's unix socket (Firecracker's
 *                                          vsock); raises when nobody listens there
 *   net.probe(netns, host, port [, timeout_ms=50]) -> bool
 *   net.egress_enable(netns, opts), net.egress_disable(netns, opts)   see fc_egress.c
 *   net.nft(netns, script)                 nftables through libnftables (fc_egress.c)
 *
 *   socket (fireclaw.net.socket): s:fd(), s:send(data [, timeout_s]) -> bytes sent,
 *   s:recv([max=65536] [, timeout_s]) -> data, or nil at end of stream; s:close()
 *
 * Link functions take a namespace name (never the caller's own namespace: fireclaw does
 * not configure the host). connect/probe accept nil for the caller's namespace.
 *
 * The module is four files sharing core/fc_net.h: this one (namespaces, argument checks,
 * link functions), fc_netlink.c (the rtnetlink layer), fc_net_sock.c (taps and sockets
 * inside a namespace, fds for a VMM) and fc_egress.c (NAT egress).
 *
 * Style of these files: the netlink layer below returns 0 or -errno and never raises, so a
 * Lua function parses its arguments first (those may raise), then opens its socket, does
 * its work, closes, and raises only after everything it opened is released.
 */
#include "fc_net.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/neighbour.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#define DIRGUARD_MT "fireclaw.net.dirguard"

/* ---- errors ---- */

int net_fail(lua_State *L, int err, const char *what, const char *step)
{
	const char *sep = step && *step ? ": " : "";
	if (!step)
		step = "";
	if (err == E_NO_NETNS)
		fc_error(L, "net: %s: %s%sno such network namespace (see net.netns_list)", what,
			 step, sep);
	if (err == EPERM || err == EACCES)
		fc_error(L, "net: %s: %s%s%s (needs CAP_NET_ADMIN)", what, step, sep,
			 strerror(err));
	fc_error(L, "net: %s: %s%s%s", what, step, sep, strerror(err));
}

/* ---- argument parsing (may raise) ---- */

/* A namespace name usable as a file name under /run/netns. */
const char *net_check_netns_name(lua_State *L, int idx)
{
	size_t len;
	const char *name = luaL_checklstring(L, idx, &len);
	if (len == 0 || len > 200 || strchr(name, '/') || strcmp(name, ".") == 0 ||
	    strcmp(name, "..") == 0)
		fc_error(L, "net: bad namespace name '%s' (1-200 characters, no '/')", name);
	return name;
}

/* Interface names go into nft scripts and netlink messages: only [A-Za-z0-9_.-], 1-15
 * characters, never "." or ".." (which the kernel refuses), so that no quote, brace or
 * newline can ever reach a script. */
const char *net_valid_ifname(lua_State *L, const char *name)
{
	size_t len = strlen(name);
	int ok = len > 0 && len < IFNAMSIZ && strcmp(name, ".") != 0 && strcmp(name, "..") != 0;
	for (size_t i = 0; ok && i < len; i++)
		ok = isalnum((unsigned char)name[i]) || strchr("_.-", name[i]) != NULL;
	if (!ok)
		fc_error(L, "net: bad interface name '%s': 1-%d characters of A-Z a-z 0-9 _ . -",
			 name, IFNAMSIZ - 1);
	return name;
}

const char *net_check_ifname(lua_State *L, int idx)
{
	return net_valid_ifname(L, luaL_checkstring(L, idx));
}

int net_parse_ip(const char *s, struct ip_addr *ip)
{
	if (inet_pton(AF_INET, s, ip->a) == 1) {
		ip->family = AF_INET, ip->bytes = 4, ip->prefix = 32;
		return 0;
	}
	if (inet_pton(AF_INET6, s, ip->a) == 1) {
		ip->family = AF_INET6, ip->bytes = 16, ip->prefix = 128;
		return 0;
	}
	return -1;
}

void net_check_ip(lua_State *L, const char *s, struct ip_addr *ip)
{
	if (net_parse_ip(s, ip) < 0)
		fc_error(L, "net: bad IP address '%s'", s);
}

/* "addr/len"; a missing /len means a host address. */
void net_check_cidr(lua_State *L, const char *s, struct ip_addr *ip)
{
	char buf[64];
	const char *slash = strchr(s, '/');
	size_t n = slash ? (size_t)(slash - s) : strlen(s);
	if (n >= sizeof buf)
		fc_error(L, "net: bad address '%s' (want a.b.c.d/len)", s);
	memcpy(buf, s, n);
	buf[n] = 0;
	if (net_parse_ip(buf, ip) < 0)
		fc_error(L, "net: bad address '%s' (want a.b.c.d/len)", s);
	if (slash) {
		char *end;
		long len = strtol(slash + 1, &end, 10);
		if (!slash[1] || *end || len < 0 || len > ip->bytes * 8)
			fc_error(L, "net: bad prefix length in '%s'", s);
		ip->prefix = (int)len;
	}
}

void net_check_mac(lua_State *L, const char *s, unsigned char mac[6])
{
	unsigned v[6];
	char tail;
	if (sscanf(s, "%2x:%2x:%2x:%2x:%2x:%2x%c", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5],
		   &tail) != 6 ||
	    strlen(s) != 17)
		fc_error(L, "net: bad MAC address '%s' (want xx:xx:xx:xx:xx:xx)", s);
	for (int i = 0; i < 6; i++)
		mac[i] = (unsigned char)v[i];
}

void net_format_mac(const unsigned char *mac, char out[18])
{
	snprintf(out, 18, "%02x:%02x:%02x:%02x:%02x:%02x", mac[0], mac[1], mac[2], mac[3], mac[4],
		 mac[5]);
}

/* ---- namespaces ---- */

/* Like iproute2: /run/netns is a shared mount point, so a namespace bound below it shows
 * (and is unmounted) in every mount namespace holding a copy of it. */
static int prepare_netns_dir(void)
{
	if (mkdir(NETNS_DIR, 0755) < 0 && errno != EEXIST)
		return -errno;
	if (mount("", NETNS_DIR, "none", MS_SHARED | MS_REC, NULL) == 0)
		return 0;
	if (errno != EINVAL) /* EINVAL: not a mount point yet */
		return -errno;
	if (mount(NETNS_DIR, NETNS_DIR, "none", MS_BIND | MS_REC, NULL) < 0)
		return -errno;
	if (mount("", NETNS_DIR, "none", MS_SHARED | MS_REC, NULL) < 0)
		return -errno;
	return 0;
}

static int bind_here(void *path)
{
	return mount("/proc/thread-self/ns/net", path, "none", MS_BIND, NULL) < 0 ? -errno : 0;
}

/* Create a namespace and bind it at path (which must not exist). Only the calling thread
 * moves into the new namespace, and only for the bind mount: it always comes back. */
static int bind_new_netns(const char *path)
{
	int fd = open(path, O_RDONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	close(fd);
	int err = fc_netns_run(FC_NETNS_NEW, bind_here, (void *)path);
	if (err)
		unlink(path);
	return err;
}

static int l_netns_create(lua_State *L)
{
	const char *name = net_check_netns_name(L, 1);
	char what[256], path[256];
	snprintf(what, sizeof what, "create namespace %s", name);
	snprintf(path, sizeof path, NETNS_DIR "/%s", name);
	int err = prepare_netns_dir();
	if (err)
		net_fail(L, -err, what, "prepare " NETNS_DIR);
	err = bind_new_netns(path);
	if (err == -EEXIST)
		fc_error(L, "net: %s: already exists (delete it with net.netns_delete)", what);
	if (err)
		net_fail(L, -err, what, NULL);
	return 0;
}

static int l_netns_delete(lua_State *L)
{
	const char *name = net_check_netns_name(L, 1);
	char path[256];
	snprintf(path, sizeof path, NETNS_DIR "/%s", name);
	/* EINVAL: a file that is not (or no longer) a mount point, left by a crash */
	if (umount2(path, MNT_DETACH) < 0 && errno != EINVAL && errno != ENOENT)
		fc_errno_error(L, errno, "net: delete namespace %s: unmount %s", name, path);
	if (unlink(path) < 0) {
		if (errno != ENOENT)
			fc_errno_error(L, errno, "net: delete namespace %s: remove %s", name, path);
		lua_pushboolean(L, 0);
		return 1;
	}
	lua_pushboolean(L, 1);
	return 1;
}

/* A stale file left by a crash counts as existing: it blocks netns_create until
 * netns_delete removes it. */
static int l_netns_exists(lua_State *L)
{
	const char *name = net_check_netns_name(L, 1);
	char path[256];
	struct stat st;
	snprintf(path, sizeof path, NETNS_DIR "/%s", name);
	lua_pushboolean(L, lstat(path, &st) == 0);
	return 1;
}

static int dirguard_close(lua_State *L)
{
	DIR **d = luaL_checkudata(L, 1, DIRGUARD_MT);
	if (*d)
		closedir(*d);
	*d = NULL;
	return 0;
}

/* Replace the array of strings on top of the stack by a sorted copy. */
static void sort_string_array(lua_State *L)
{
	int n = (int)lua_objlen(L, -1);
	const char **v = lua_newuserdata(L, (n ? n : 1) * sizeof *v);
	for (int i = 0; i < n; i++) {
		lua_rawgeti(L, -2, i + 1);
		v[i] = lua_tostring(L, -1); /* anchored by the table below */
		lua_pop(L, 1);
	}
	fc_sort_strings(v, (size_t)n);
	lua_createtable(L, n, 0);
	for (int i = 0; i < n; i++) {
		lua_pushstring(L, v[i]);
		lua_rawseti(L, -2, i + 1);
	}
	lua_replace(L, -3);
	lua_pop(L, 1);
}

static int l_netns_list(lua_State *L)
{
	size_t plen = 0;
	const char *prefix = luaL_optlstring(L, 1, "", &plen);
	DIR **d = fc_new(L, sizeof(DIR *), DIRGUARD_MT);
	lua_newtable(L);
	*d = opendir(NETNS_DIR);
	if (!*d) {
		if (errno != ENOENT)
			fc_errno_error(L, errno, "net: list namespaces in " NETNS_DIR);
		return 1;
	}
	int n = 0;
	struct dirent *e;
	while ((e = readdir(*d))) {
		if (e->d_name[0] == '.' || strncmp(e->d_name, prefix, plen) != 0)
			continue;
		lua_pushstring(L, e->d_name);
		lua_rawseti(L, -2, ++n);
	}
	closedir(*d);
	*d = NULL;
	sort_string_array(L);
	return 1;
}

/* Run fn(arg) with the calling thread inside namespace netns, then come back
 * (fc_netns_run). Returns fn's result, or -E_NO_NETNS / -errno if the namespace cannot be
 * entered. fn must not raise. */
int net_in_netns(const char *netns, int (*fn)(void *), void *arg)
{
	int target = fc_netns_open(netns);
	if (target < 0)
		return errno == ENOENT ? -E_NO_NETNS : -errno;
	int r = fc_netns_run(target, fn, arg);
	close(target);
	return r;
}

static const char *neigh_state_name(unsigned state)
{
	static const struct {
		unsigned bit;
		const char *name;
	} names[] = {
	    {NUD_PERMANENT, "permanent"}, {NUD_NOARP, "noarp"},
	    {NUD_REACHABLE, "reachable"}, {NUD_STALE, "stale"},
	    {NUD_DELAY, "delay"},	  {NUD_PROBE, "probe"},
	    {NUD_FAILED, "failed"},	  {NUD_INCOMPLETE, "incomplete"},
	};
	for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
		if (state & names[i].bit)
			return names[i].name;
	return "none";
}

static void push_link_report(lua_State *L, const struct link_report *r)
{
	lua_createtable(L, 0, 7);
	lua_pushinteger(L, r->link.index);
	lua_setfield(L, -2, "index");
	if (r->link.has_mac) {
		char mac[18];
		net_format_mac(r->link.mac, mac);
		lua_pushstring(L, mac);
		lua_setfield(L, -2, "mac");
	}
	lua_pushinteger(L, r->link.mtu);
	lua_setfield(L, -2, "mtu");
	lua_pushboolean(L, (r->link.flags & IFF_UP) != 0);
	lua_setfield(L, -2, "up");
	lua_pushboolean(L, (r->link.flags & IFF_LOWER_UP) != 0);
	lua_setfield(L, -2, "carrier");
	lua_createtable(L, r->naddrs, 0);
	for (int i = 0; i < r->naddrs; i++) {
		lua_pushstring(L, r->addrs[i]);
		lua_rawseti(L, -2, i + 1);
	}
	lua_setfield(L, -2, "addrs");
	lua_createtable(L, r->nneigh, 0);
	for (int i = 0; i < r->nneigh; i++) {
		lua_createtable(L, 0, 3);
		lua_pushstring(L, r->neigh[i].ip);
		lua_setfield(L, -2, "ip");
		lua_pushstring(L, r->neigh[i].mac);
		lua_setfield(L, -2, "mac");
		lua_pushstring(L, neigh_state_name(r->neigh[i].state));
		lua_setfield(L, -2, "state");
		lua_rawseti(L, -2, i + 1);
	}
	lua_setfield(L, -2, "neighbours");
}

/* ---- link functions ---- */

/* One change to one link, applied by a with_link() callback. */
struct link_change {
	struct ip_addr ip;
	unsigned char mac[6];
};

typedef int (*link_fn)(struct nl *nl, int index, const struct link_change *c);

/* Open a netlink socket in netns, find ifname, apply fn, close; raise "net: WHAT: …" on
 * failure, after everything is released. */
static void with_link(lua_State *L, const char *netns, const char *ifname, const char *what,
		      link_fn fn, const struct link_change *c)
{
	struct nl *nl;
	struct link_attrs la;
	const char *step = "";
	int err = nl_open(netns, &nl);
	if (!err) {
		err = nl_link_get(nl, ifname, &la);
		step = ifname;
	}
	if (!err) {
		err = fn(nl, la.index, c);
		step = "";
	}
	nl_close(nl);
	if (err)
		net_fail(L, -err, what, step);
}

static int change_up(struct nl *nl, int index, const struct link_change *c)
{
	(void)c;
	return nl_link_set(nl, index, NULL, 0, 1);
}

static int change_addr(struct nl *nl, int index, const struct link_change *c)
{
	return nl_addr_add(nl, index, &c->ip);
}

static int change_neigh(struct nl *nl, int index, const struct link_change *c)
{
	return nl_neigh_add(nl, index, &c->ip, c->mac);
}

static int l_link_up(lua_State *L)
{
	const char *netns = net_check_netns_name(L, 1), *ifname = net_check_ifname(L, 2);
	char what[256];
	snprintf(what, sizeof what, "set %s up in %s", ifname, netns);
	with_link(L, netns, ifname, what, change_up, NULL);
	return 0;
}

static int l_addr_add(lua_State *L)
{
	const char *netns = net_check_netns_name(L, 1), *ifname = net_check_ifname(L, 2);
	const char *cidr = luaL_checkstring(L, 3);
	struct link_change c;
	net_check_cidr(L, cidr, &c.ip);
	char what[256];
	snprintf(what, sizeof what, "add address %s to %s in %s", cidr, ifname, netns);
	with_link(L, netns, ifname, what, change_addr, &c);
	return 0;
}

static int l_neigh_add(lua_State *L)
{
	const char *netns = net_check_netns_name(L, 1), *ifname = net_check_ifname(L, 2);
	const char *ip = luaL_checkstring(L, 3), *mac = luaL_checkstring(L, 4);
	struct link_change c;
	net_check_ip(L, ip, &c.ip);
	net_check_mac(L, mac, c.mac);
	char what[256];
	snprintf(what, sizeof what, "add neighbour %s -> %s on %s in %s", ip, mac, ifname, netns);
	with_link(L, netns, ifname, what, change_neigh, &c);
	return 0;
}

static int l_link_exists(lua_State *L)
{
	const char *netns = net_check_netns_name(L, 1), *ifname = net_check_ifname(L, 2);
	struct nl *nl;
	struct link_attrs la;
	int err = nl_open(netns, &nl);
	if (!err)
		err = nl_link_get(nl, ifname, &la);
	nl_close(nl);
	if (err && err != -ENODEV) {
		char what[256];
		snprintf(what, sizeof what, "look up %s in %s", ifname, netns);
		net_fail(L, -err, what, NULL);
	}
	lua_pushboolean(L, err == 0);
	return 1;
}

static int l_link_info(lua_State *L)
{
	const char *netns = net_check_netns_name(L, 1), *ifname = net_check_ifname(L, 2);
	struct link_report *r = lua_newuserdata(L, sizeof *r); /* ~4 KiB, collected */
	struct nl *nl;
	int err = nl_open(netns, &nl);
	if (!err)
		err = nl_link_report(nl, ifname, r);
	nl_close(nl);
	if (err) {
		char what[256];
		snprintf(what, sizeof what, "link info %s in %s", ifname, netns);
		net_fail(L, -err, what, NULL);
	}
	push_link_report(L, r);
	return 1;
}

int luaopen_fireclaw_net(lua_State *L)
{
	static const luaL_Reg dirguard_methods[] = {{"close", dirguard_close}, {NULL, NULL}};
	static const luaL_Reg fns[] = {
	    {"netns_create", l_netns_create}, {"netns_delete", l_netns_delete},
	    {"netns_list", l_netns_list},     {"netns_exists", l_netns_exists},
	    {"link_up", l_link_up},	      {"addr_add", l_addr_add},
	    {"neigh_add", l_neigh_add},	      {"link_exists", l_link_exists},
	    {"link_info", l_link_info},	      {NULL, NULL},
	};
	fc_class(L, DIRGUARD_MT, dirguard_methods);
	lua_newtable(L);
	luaL_register(L, NULL, fns);
	fc_net_sock_register(L);
	fc_net_egress_register(L);
	return 1;
}
