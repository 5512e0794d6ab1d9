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
 *   net.link_up(netns, ifname)
 *   net.addr_add(netns, ifname, cidr)      "172.16.0.1/30" (or IPv6); replaces a same one
 *   net.neigh_add(netns, ifname, ip, mac)  permanent neighbour entry (no ARP needed)
 *   net.link_exists(netns, ifname) -> bool
 *   net.link_info(netns, ifname) -> {index=, mac=, mtu=, up=, carrier=, addrs={cidr...},
 *                                    neighbours={{ip=, mac=, state=}...}}
 *   net.connect(netns, host, port [, timeout_s=10]) -> socket
 *   net.tap_open(netns, ifname) -> socket  an fd on an existing tap, to hand to a VMM
 *   net.unix_listen(path) -> socket        a listening unix socket, mode 0600, for a VMM
 *   net.probe(netns, host, port [, timeout_ms=50]) -> bool
 *   net.egress_enable(netns, opts), net.egress_disable(netns, opts)   see "egress" below
 *
 *   socket (fireclaw.net.socket): s:fd(), s:send(data [, timeout_s]) -> bytes sent,
 *   s:recv([max=65536] [, timeout_s]) -> data, or nil at end of stream; s:close()
 *
 * Link functions take a namespace name (never the caller's own namespace: fireclaw does
 * not configure the host). connect/probe accept nil for the caller's namespace.
 *
 * Style of this file: the netlink layer below returns 0 or -errno and never raises, so a
 * Lua function parses its arguments first (those may raise), then opens its socket, does
 * its work, closes, and raises only after everything it opened is released.
 */
#include "fc.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libmnl/libmnl.h>
#include <linux/if_tun.h>
#include <linux/neighbour.h>
#include <linux/rtnetlink.h>
#include <linux/veth.h>
#include <net/if.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef IFF_LOWER_UP
#define IFF_LOWER_UP 0x10000
#endif

#define NETNS_DIR "/run/netns"
#define SOCK_MT "fireclaw.net.socket"
#define DIRGUARD_MT "fireclaw.net.dirguard"
/* The kernel sizes dump messages by the reader's buffer, up to 32 KiB. */
#define NL_BUFSIZE 32768
#define MAX_ITEMS 32
/* A private code next to errno values: the named namespace does not exist. */
#define E_NO_NETNS 4096

/* ---- errors ---- */

/* Raise "net: WHAT: [STEP: ]REASON". err is a positive errno or E_NO_NETNS. */
static int net_fail(lua_State *L, int err, const char *what, const char *step)
    __attribute__((noreturn));
static int net_fail(lua_State *L, int err, const char *what, const char *step)
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
static const char *check_netns_name(lua_State *L, int idx)
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
static const char *valid_ifname(lua_State *L, const char *name)
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

static const char *check_ifname(lua_State *L, int idx)
{
	return valid_ifname(L, luaL_checkstring(L, idx));
}

struct ip_addr {
	int family;
	int bytes; /* 4 or 16 */
	int prefix;
	unsigned char a[16];
};

static int parse_ip(const char *s, struct ip_addr *ip)
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

static void check_ip(lua_State *L, const char *s, struct ip_addr *ip)
{
	if (parse_ip(s, ip) < 0)
		fc_error(L, "net: bad IP address '%s'", s);
}

/* "addr/len"; a missing /len means a host address. */
static void check_cidr(lua_State *L, const char *s, struct ip_addr *ip)
{
	char buf[64];
	const char *slash = strchr(s, '/');
	size_t n = slash ? (size_t)(slash - s) : strlen(s);
	if (n >= sizeof buf)
		fc_error(L, "net: bad address '%s' (want a.b.c.d/len)", s);
	memcpy(buf, s, n);
	buf[n] = 0;
	if (parse_ip(buf, ip) < 0)
		fc_error(L, "net: bad address '%s' (want a.b.c.d/len)", s);
	if (slash) {
		char *end;
		long len = strtol(slash + 1, &end, 10);
		if (!slash[1] || *end || len < 0 || len > ip->bytes * 8)
			fc_error(L, "net: bad prefix length in '%s'", s);
		ip->prefix = (int)len;
	}
}

static void check_mac(lua_State *L, const char *s, unsigned char mac[6])
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

static void format_mac(const unsigned char *mac, char out[18])
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
	const char *name = check_netns_name(L, 1);
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
	const char *name = check_netns_name(L, 1);
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
	const char *name = check_netns_name(L, 1);
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
static int in_netns(const char *netns, int (*fn)(void *), void *arg)
{
	int target = fc_netns_open(netns);
	if (target < 0)
		return errno == ENOENT ? -E_NO_NETNS : -errno;
	int r = fc_netns_run(target, fn, arg);
	close(target);
	return r;
}

/* ---- rtnetlink ---- */

struct nl {
	struct mnl_socket *sock;
	unsigned seq, portid;
	char buf[NL_BUFSIZE];
};

static void nl_close(struct nl *nl)
{
	if (!nl)
		return;
	if (nl->sock)
		mnl_socket_close(nl->sock);
	free(nl);
}

/* A NETLINK_ROUTE socket created inside netns: it stays bound to that namespace, so
 * everything sent on it configures that namespace without the thread moving. */
static int nl_open(const char *netns, struct nl **out)
{
	*out = NULL;
	int fd = fc_socket_in_netns(netns, AF_NETLINK, SOCK_RAW, NETLINK_ROUTE);
	if (fd < 0)
		return errno == ENOENT ? -E_NO_NETNS : -errno;
	struct nl *nl = calloc(1, sizeof *nl);
	if (!nl) {
		close(fd);
		return -ENOMEM;
	}
	nl->sock = mnl_socket_fdopen(fd);
	if (!nl->sock) {
		int e = errno;
		close(fd);
		free(nl);
		return -e;
	}
	if (mnl_socket_bind(nl->sock, 0, MNL_SOCKET_AUTOPID) < 0) {
		int e = errno;
		nl_close(nl);
		return -e;
	}
	nl->portid = mnl_socket_get_portid(nl->sock);
	*out = nl;
	return 0;
}

/* Start a request in nl->buf. Every request but a dump asks for an acknowledgement, which
 * is how nl_run knows it is done. (Test for a dump by equality: NLM_F_DUMP's bits mean
 * NLM_F_REPLACE/NLM_F_EXCL on NEW requests.) */
static struct nlmsghdr *nl_request(struct nl *nl, int type, int flags, void **extra,
				   size_t extra_len)
{
	struct nlmsghdr *h = mnl_nlmsg_put_header(nl->buf);
	if (flags != NLM_F_DUMP)
		flags |= NLM_F_ACK;
	h->nlmsg_type = (uint16_t)type;
	h->nlmsg_flags = (uint16_t)(NLM_F_REQUEST | flags);
	h->nlmsg_seq = ++nl->seq;
	*extra = mnl_nlmsg_put_extra_header(h, extra_len);
	return h;
}

/* Send the request in nl->buf and feed the replies to cb until the kernel acknowledges it
 * (or ends the dump). The kernel handles rtnetlink requests synchronously, so the answer
 * is queued before sendto returns and the blocking receive does not wait on anything.
 * Returns 0 or -errno (the kernel's verdict on the request). */
static int nl_run(struct nl *nl, struct nlmsghdr *h, mnl_cb_t cb, void *data)
{
	unsigned seq = h->nlmsg_seq;
	if (mnl_socket_sendto(nl->sock, h, h->nlmsg_len) < 0)
		return -errno;
	for (;;) {
		ssize_t n = mnl_socket_recvfrom(nl->sock, nl->buf, sizeof nl->buf);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		int r = mnl_cb_run(nl->buf, (size_t)n, seq, nl->portid, cb, data);
		if (r < 0)
			return -errno;
		if (r == MNL_CB_STOP)
			return 0;
	}
}

struct link_attrs {
	int index;
	unsigned flags, mtu;
	int has_mac;
	unsigned char mac[6];
};

static int link_cb(const struct nlmsghdr *h, void *data)
{
	struct link_attrs *la = data;
	if (h->nlmsg_type != RTM_NEWLINK)
		return MNL_CB_OK;
	const struct ifinfomsg *ifi = mnl_nlmsg_get_payload(h);
	la->index = ifi->ifi_index;
	la->flags = ifi->ifi_flags;
	const struct nlattr *a;
	mnl_attr_for_each(a, h, sizeof *ifi)
	{
		int type = mnl_attr_get_type(a);
		if (type == IFLA_MTU && mnl_attr_validate(a, MNL_TYPE_U32) == 0)
			la->mtu = mnl_attr_get_u32(a);
		if (type == IFLA_ADDRESS && mnl_attr_get_payload_len(a) == 6) {
			memcpy(la->mac, mnl_attr_get_payload(a), 6);
			la->has_mac = 1;
		}
	}
	return MNL_CB_OK;
}

/* Look a link up by name: -ENODEV if there is none. */
static int link_get(struct nl *nl, const char *ifname, struct link_attrs *la)
{
	struct ifinfomsg *ifi;
	struct nlmsghdr *h = nl_request(nl, RTM_GETLINK, 0, (void **)&ifi, sizeof *ifi);
	ifi->ifi_family = AF_UNSPEC;
	mnl_attr_put_strz(h, IFLA_IFNAME, ifname);
	mnl_attr_put_u32(h, IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS);
	memset(la, 0, sizeof *la);
	int r = nl_run(nl, h, link_cb, la);
	if (r == 0 && la->index == 0)
		r = -ENODEV;
	return r;
}

/* Change an existing link: MAC and MTU when given, and bring it up when up is set. */
static int link_set(struct nl *nl, int index, const unsigned char *mac, unsigned mtu, int up)
{
	struct ifinfomsg *ifi;
	struct nlmsghdr *h = nl_request(nl, RTM_SETLINK, 0, (void **)&ifi, sizeof *ifi);
	ifi->ifi_family = AF_UNSPEC;
	ifi->ifi_index = index;
	if (up) {
		ifi->ifi_flags = IFF_UP;
		ifi->ifi_change = IFF_UP;
	}
	if (mac)
		mnl_attr_put(h, IFLA_ADDRESS, 6, mac);
	if (mtu)
		mnl_attr_put_u32(h, IFLA_MTU, mtu);
	return nl_run(nl, h, NULL, NULL);
}

static int link_del(struct nl *nl, const char *ifname)
{
	struct ifinfomsg *ifi;
	struct nlmsghdr *h = nl_request(nl, RTM_DELLINK, 0, (void **)&ifi, sizeof *ifi);
	ifi->ifi_family = AF_UNSPEC;
	mnl_attr_put_strz(h, IFLA_IFNAME, ifname);
	return nl_run(nl, h, NULL, NULL);
}

/* Add (or replace, so a retry is harmless) an address with its prefix route. */
static int addr_add(struct nl *nl, int index, const struct ip_addr *ip)
{
	struct ifaddrmsg *ifa;
	struct nlmsghdr *h =
	    nl_request(nl, RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, (void **)&ifa, sizeof *ifa);
	ifa->ifa_family = (uint8_t)ip->family;
	ifa->ifa_prefixlen = (uint8_t)ip->prefix;
	ifa->ifa_index = (uint32_t)index;
	ifa->ifa_scope = RT_SCOPE_UNIVERSE;
	mnl_attr_put(h, IFA_LOCAL, ip->bytes, ip->a);
	mnl_attr_put(h, IFA_ADDRESS, ip->bytes, ip->a);
	return nl_run(nl, h, NULL, NULL);
}

/* A permanent neighbour entry: the kernel never ARPs for it (nor forgets it). */
static int neigh_add(struct nl *nl, int index, const struct ip_addr *ip, const unsigned char mac[6])
{
	struct ndmsg *nd;
	struct nlmsghdr *h =
	    nl_request(nl, RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, (void **)&nd, sizeof *nd);
	nd->ndm_family = (uint8_t)ip->family;
	nd->ndm_ifindex = index;
	nd->ndm_state = NUD_PERMANENT;
	mnl_attr_put(h, NDA_DST, ip->bytes, ip->a);
	mnl_attr_put(h, NDA_LLADDR, 6, mac);
	return nl_run(nl, h, NULL, NULL);
}

/* ---- reading a link's addresses and neighbours ---- */

struct neighbour {
	char ip[INET6_ADDRSTRLEN];
	char mac[18];
	unsigned state;
};

struct link_report {
	struct link_attrs link;
	int naddrs, nneigh;
	char addrs[MAX_ITEMS][INET6_ADDRSTRLEN + 4];
	struct neighbour neigh[MAX_ITEMS];
};

static int addr_cb(const struct nlmsghdr *h, void *data)
{
	struct link_report *r = data;
	const struct ifaddrmsg *ifa = mnl_nlmsg_get_payload(h);
	if (h->nlmsg_type != RTM_NEWADDR || (int)ifa->ifa_index != r->link.index ||
	    r->naddrs >= MAX_ITEMS)
		return MNL_CB_OK;
	const void *addr = NULL;
	const struct nlattr *a;
	mnl_attr_for_each(a, h, sizeof *ifa)
	{
		int type = mnl_attr_get_type(a);
		/* IPv4 has IFA_LOCAL (IFA_ADDRESS is the peer on point-to-point links) */
		if (type == IFA_LOCAL || (type == IFA_ADDRESS && !addr))
			addr = mnl_attr_get_payload(a);
	}
	if (!addr)
		return MNL_CB_OK;
	char ip[INET6_ADDRSTRLEN];
	inet_ntop(ifa->ifa_family, addr, ip, sizeof ip);
	snprintf(r->addrs[r->naddrs++], sizeof r->addrs[0], "%s/%u", ip, ifa->ifa_prefixlen);
	return MNL_CB_OK;
}

static int neigh_cb(const struct nlmsghdr *h, void *data)
{
	struct link_report *r = data;
	const struct ndmsg *nd = mnl_nlmsg_get_payload(h);
	if (h->nlmsg_type != RTM_NEWNEIGH || nd->ndm_ifindex != r->link.index ||
	    r->nneigh >= MAX_ITEMS)
		return MNL_CB_OK;
	struct neighbour *n = &r->neigh[r->nneigh];
	memset(n, 0, sizeof *n);
	n->state = nd->ndm_state;
	const struct nlattr *a;
	mnl_attr_for_each(a, h, sizeof *nd)
	{
		int type = mnl_attr_get_type(a);
		if (type == NDA_DST)
			inet_ntop(nd->ndm_family, mnl_attr_get_payload(a), n->ip, sizeof n->ip);
		if (type == NDA_LLADDR && mnl_attr_get_payload_len(a) == 6)
			format_mac(mnl_attr_get_payload(a), n->mac);
	}
	if (n->ip[0])
		r->nneigh++;
	return MNL_CB_OK;
}

static int dump(struct nl *nl, int type, size_t extra_len, mnl_cb_t cb, void *data)
{
	void *extra;
	struct nlmsghdr *h = nl_request(nl, type, NLM_F_DUMP, &extra, extra_len);
	memset(extra, 0, extra_len); /* family AF_UNSPEC: every family */
	return nl_run(nl, h, cb, data);
}

static int link_report(struct nl *nl, const char *ifname, struct link_report *r)
{
	memset(r, 0, sizeof *r);
	int err = link_get(nl, ifname, &r->link);
	if (!err)
		err = dump(nl, RTM_GETADDR, sizeof(struct ifaddrmsg), addr_cb, r);
	if (!err)
		err = dump(nl, RTM_GETNEIGH, sizeof(struct ndmsg), neigh_cb, r);
	return err;
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
		format_mac(r->link.mac, mac);
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
		err = link_get(nl, ifname, &la);
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
	return link_set(nl, index, NULL, 0, 1);
}

static int change_addr(struct nl *nl, int index, const struct link_change *c)
{
	return addr_add(nl, index, &c->ip);
}

static int change_neigh(struct nl *nl, int index, const struct link_change *c)
{
	return neigh_add(nl, index, &c->ip, c->mac);
}

static int l_link_up(lua_State *L)
{
	const char *netns = check_netns_name(L, 1), *ifname = check_ifname(L, 2);
	char what[256];
	snprintf(what, sizeof what, "set %s up in %s", ifname, netns);
	with_link(L, netns, ifname, what, change_up, NULL);
	return 0;
}

static int l_addr_add(lua_State *L)
{
	const char *netns = check_netns_name(L, 1), *ifname = check_ifname(L, 2);
	const char *cidr = luaL_checkstring(L, 3);
	struct link_change c;
	check_cidr(L, cidr, &c.ip);
	char what[256];
	snprintf(what, sizeof what, "add address %s to %s in %s", cidr, ifname, netns);
	with_link(L, netns, ifname, what, change_addr, &c);
	return 0;
}

static int l_neigh_add(lua_State *L)
{
	const char *netns = check_netns_name(L, 1), *ifname = check_ifname(L, 2);
	const char *ip = luaL_checkstring(L, 3), *mac = luaL_checkstring(L, 4);
	struct link_change c;
	check_ip(L, ip, &c.ip);
	check_mac(L, mac, c.mac);
	char what[256];
	snprintf(what, sizeof what, "add neighbour %s -> %s on %s in %s", ip, mac, ifname, netns);
	with_link(L, netns, ifname, what, change_neigh, &c);
	return 0;
}

static int l_link_exists(lua_State *L)
{
	const char *netns = check_netns_name(L, 1), *ifname = check_ifname(L, 2);
	struct nl *nl;
	struct link_attrs la;
	int err = nl_open(netns, &nl);
	if (!err)
		err = link_get(nl, ifname, &la);
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
	const char *netns = check_netns_name(L, 1), *ifname = check_ifname(L, 2);
	struct link_report *r = lua_newuserdata(L, sizeof *r); /* ~4 KiB, collected */
	struct nl *nl;
	int err = nl_open(netns, &nl);
	if (!err)
		err = link_report(nl, ifname, r);
	nl_close(nl);
	if (err) {
		char what[256];
		snprintf(what, sizeof what, "link info %s in %s", ifname, netns);
		net_fail(L, -err, what, NULL);
	}
	push_link_report(L, r);
	return 1;
}

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
	o->name = valid_ifname(L, fc_opt_string(L, t, "name", "tap0"));
	const char *mac = fc_opt_string(L, t, "mac", NULL);
	if (mac) {
		check_mac(L, mac, o->mac);
		o->has_mac = 1;
	}
	double mtu = fc_opt_number(L, t, "mtu", 0);
	if (mtu < 0 || mtu > 65535 || mtu != (unsigned)mtu)
		fc_error(L, "net: bad MTU %g", mtu);
	o->mtu = (unsigned)mtu;
	o->addr = fc_opt_string(L, t, "addr", NULL);
	if (o->addr) {
		check_cidr(L, o->addr, &o->ip);
		o->has_addr = 1;
	}
	o->guest_ip = fc_opt_string(L, t, "guest_ip", NULL);
	o->guest_mac = fc_opt_string(L, t, "guest_mac", NULL);
	if (!o->guest_ip != !o->guest_mac)
		fc_error(L, "net: create tap %s: guest_ip and guest_mac go together", o->name);
	if (o->guest_ip) {
		check_ip(L, o->guest_ip, &o->gip);
		check_mac(L, o->guest_mac, o->guest_hw);
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
	int err = link_get(nl, o->name, &tap);
	if (err)
		return snprintf(step, len, "look up the new tap"), err;
	err = link_set(nl, tap.index, o->has_mac ? o->mac : NULL, o->mtu, 1);
	if (err)
		return snprintf(step, len, "set MAC/MTU and up"), err;
	if (o->has_addr && (err = addr_add(nl, tap.index, &o->ip)))
		return snprintf(step, len, "add address %s", o->addr), err;
	err = link_get(nl, "lo", &lo);
	if (!err)
		err = link_set(nl, lo.index, NULL, 0, 1);
	if (err)
		return snprintf(step, len, "set lo up"), err;
	if (o->has_guest && (err = neigh_add(nl, tap.index, &o->gip, o->guest_hw)))
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
	if (link_get(nl, o->name, &la) == 0) {
		nl_close(nl);
		return -EEXIST;
	}
	struct tun_req t = {.name = o->name, .uid = o->uid, .fd = -1};
	err = in_netns(netns, tun_create, &t);
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
	const char *netns = check_netns_name(L, 1);
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
	const char *netns = check_netns_name(L, 1);
	const char *name = valid_ifname(L, luaL_checkstring(L, 2));
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
		err = link_get(nl, name, &la);
		nl_close(nl);
	}
	if (err == -ENODEV)
		fc_error(L, "net: %s: no such tap (net.tap_create makes one)", what);
	if (err)
		net_fail(L, -err, what, NULL);
	struct tun_req t = {.name = name, .uid = -1, .fd = -1};
	err = in_netns(netns, tun_attach, &t);
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

/* ---- egress (optional, off by default) ----
 *
 * net.egress_enable(netns, opts) gives the guests of namespace netns a way out:
 *   - a veth pair: opts.ifname (default "veth0") in netns, opts.uplink_ifname (default
 *     "fcv" + 8 hex digits of a hash of netns) in opts.uplink_netns;
 *   - addresses from opts.cidr (default "100.64.0.0/30", shared address space, so it
 *     cannot clash with private networks): the first host address on the uplink side,
 *     the second in netns, and a default route in netns through the uplink side;
 *   - IPv4 forwarding on in both namespaces (left on by egress_disable: other namespaces
 *     may rely on it);
 *   - NAT with nftables: in netns, traffic leaving through the veth is masqueraded to the
 *     veth address (every VM namespace uses the same guest subnet); in the uplink, traffic
 *     from opts.cidr leaving through any other interface is masqueraded again.
 * NAT runs the `nft` program (Debian package nftables) inside each namespace: nftables has
 * no stable library interface worth binding for two rules.
 * opts.uplink_netns = nil means the namespace fireclaw itself runs in (normally the host's
 * root namespace): that changes the host (a veth, an address, forwarding, an nftables
 * table) and must only be done when a user asks for it. Give each VM namespace its own
 * opts.cidr when several share an uplink. net.egress_disable(netns, opts) removes the veth
 * and both tables; it is idempotent and works when netns is already gone.
 */

#define EGRESS_TABLE "fireclaw_egress"

struct egress_opts {
	const char *uplink, *ifname, *cidr;
	char uplink_ifname[IFNAMSIZ];
	struct ip_addr net, up_ip, vm_ip;
};

static uint32_t fnv1a(const char *s)
{
	uint32_t h = 2166136261u;
	for (; *s; s++)
		h = (h ^ (unsigned char)*s) * 16777619u;
	return h;
}

static void read_egress_opts(lua_State *L, const char *netns, int t, struct egress_opts *o)
{
	static const char *const known[] = {"uplink_netns", "ifname", "uplink_ifname", "cidr",
					    NULL};
	memset(o, 0, sizeof *o);
	if (!lua_isnoneornil(L, t))
		luaL_checktype(L, t, LUA_TTABLE);
	fc_opt_check(L, t, "net.egress", known);
	o->uplink = fc_opt_string(L, t, "uplink_netns", NULL);
	if (o->uplink && (!*o->uplink || strchr(o->uplink, '/')))
		fc_error(L, "net: egress for %s: bad uplink_netns '%s'", netns, o->uplink);
	if (o->uplink && strcmp(o->uplink, netns) == 0)
		fc_error(L, "net: egress for %s: the uplink must be another namespace", netns);
	o->ifname = valid_ifname(L, fc_opt_string(L, t, "ifname", "veth0"));
	char def[IFNAMSIZ];
	snprintf(def, sizeof def, "fcv%08x", fnv1a(netns));
	snprintf(o->uplink_ifname, sizeof o->uplink_ifname, "%s",
		 valid_ifname(L, fc_opt_string(L, t, "uplink_ifname", def)));
	o->cidr = fc_opt_string(L, t, "cidr", "100.64.0.0/30");
	check_cidr(L, o->cidr, &o->net);
	if (o->net.family != AF_INET || o->net.prefix > 30)
		fc_error(L,
			 "net: egress for %s: cidr '%s' must be IPv4 with room for two hosts "
			 "(/30 or larger)",
			 netns, o->cidr);
	/* first and second host address of the network */
	uint32_t mask = htonl(o->net.prefix ? ~0u << (32 - o->net.prefix) : 0), base;
	memcpy(&base, o->net.a, 4);
	base &= mask;
	o->up_ip = o->vm_ip = o->net;
	uint32_t up = htonl(ntohl(base) + 1), vm = htonl(ntohl(base) + 2);
	memcpy(o->up_ip.a, &up, 4);
	memcpy(o->vm_ip.a, &vm, 4);
}

/* A veth pair: name here, peer moved at once into the namespace open at peer_nsfd. */
static int veth_create(struct nl *nl, const char *name, const char *peer, int peer_nsfd)
{
	struct ifinfomsg *ifi;
	struct nlmsghdr *h =
	    nl_request(nl, RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, (void **)&ifi, sizeof *ifi);
	ifi->ifi_family = AF_UNSPEC;
	mnl_attr_put_strz(h, IFLA_IFNAME, name);
	struct nlattr *linkinfo = mnl_attr_nest_start(h, IFLA_LINKINFO);
	mnl_attr_put_strz(h, IFLA_INFO_KIND, "veth");
	struct nlattr *data = mnl_attr_nest_start(h, IFLA_INFO_DATA);
	struct nlattr *peer_info = mnl_attr_nest_start(h, VETH_INFO_PEER);
	struct ifinfomsg *pifi = mnl_nlmsg_put_extra_header(h, sizeof *pifi);
	pifi->ifi_family = AF_UNSPEC;
	mnl_attr_put_strz(h, IFLA_IFNAME, peer);
	mnl_attr_put_u32(h, IFLA_NET_NS_FD, (uint32_t)peer_nsfd);
	mnl_attr_nest_end(h, peer_info);
	mnl_attr_nest_end(h, data);
	mnl_attr_nest_end(h, linkinfo);
	return nl_run(nl, h, NULL, NULL);
}

static int route_add_default(struct nl *nl, int index, const struct ip_addr *gw)
{
	struct rtmsg *rt;
	struct nlmsghdr *h =
	    nl_request(nl, RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, (void **)&rt, sizeof *rt);
	rt->rtm_family = AF_INET;
	rt->rtm_table = RT_TABLE_MAIN;
	rt->rtm_protocol = RTPROT_STATIC;
	rt->rtm_scope = RT_SCOPE_UNIVERSE;
	rt->rtm_type = RTN_UNICAST;
	mnl_attr_put(h, RTA_GATEWAY, 4, gw->a);
	mnl_attr_put_u32(h, RTA_OIF, (uint32_t)index);
	return nl_run(nl, h, NULL, NULL);
}

/* Sysctls under /proc/sys/net belong to the namespace of whoever opens them: this runs
 * inside the target namespace (through in_netns) or in our own. */
static int enable_forwarding(void *unused)
{
	(void)unused;
	int fd = open("/proc/sys/net/ipv4/ip_forward", O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	int r = write(fd, "1\n", 2) == 2 ? 0 : -errno;
	close(fd);
	return r;
}

static int forwarding_on(const char *netns)
{
	return netns ? in_netns(netns, enable_forwarding, NULL) : enable_forwarding(NULL);
}

/* ---- running nft ---- */

#define CHILD_MT "fireclaw.net.child"

/* A child process and our ends of its pipes, owned by the Lua stack: if anything raises
 * (an interrupted wait, say), collecting the guard closes the pipes and kills and reaps
 * the child. */
struct child {
	pid_t pid;
	int in, out; /* our ends: its stdin, its stdout+stderr */
};

static int child_close(lua_State *L)
{
	struct child *c = luaL_checkudata(L, 1, CHILD_MT);
	if (c->in >= 0)
		close(c->in);
	if (c->out >= 0)
		close(c->out);
	c->in = c->out = -1;
	if (c->pid > 0) {
		kill(c->pid, SIGKILL); /* our own child, by its pid */
		waitpid(c->pid, NULL, 0);
	}
	c->pid = 0;
	return 0;
}

/* In the child: enter the namespace, wire the pipes, exec nft. Never returns. */
static void exec_nft(int nsfd, int in, int out)
{
	if (nsfd >= 0 && setns(nsfd, CLONE_NEWNET) < 0)
		_exit(126);
	if (dup2(in, 0) < 0 || dup2(out, 1) < 0 || dup2(out, 2) < 0)
		_exit(126);
	char *argv[] = {"nft", "-f", "-", NULL};
	execv("/usr/sbin/nft", argv);
	execvp("nft", argv);
	_exit(127);
}

/* Read everything the child writes until it closes its end (it exits), through fc_poll so
 * a Ctrl-C gets out. Keeps the first len-1 bytes in msg. */
static void read_child_output(lua_State *L, struct child *c, char *msg, size_t len)
{
	size_t used = 0;
	char buf[512];
	msg[0] = 0;
	for (;;) {
		struct pollfd p = {.fd = c->out, .events = POLLIN};
		fc_poll(L, &p, 1, -1);
		ssize_t n = read(c->out, buf, sizeof buf);
		if (n < 0 && (errno == EINTR || errno == EAGAIN))
			continue;
		if (n <= 0)
			break;
		size_t take = (size_t)n < len - 1 - used ? (size_t)n : len - 1 - used;
		memcpy(msg + used, buf, take);
		used += take;
		msg[used] = 0;
	}
}

/* Keep the first line of nft's complaint, which names the problem. */
static void first_line(char *s)
{
	char *nl = strchr(s, '\n');
	if (nl)
		*nl = 0;
}

/* Start nft -f - inside namespace nsfd (-1 = ours), its pipes recorded in c. Returns 0
 * or an errno value. */
static int spawn_nft(struct child *c, int nsfd)
{
	int in[2], out[2];
	if (pipe2(in, O_CLOEXEC) < 0)
		return errno;
	c->in = in[1];
	if (pipe2(out, O_CLOEXEC) < 0) {
		close(in[0]);
		return errno;
	}
	c->out = out[0];
	c->pid = fork();
	if (c->pid == 0)
		exec_nft(nsfd, in[0], out[1]);
	int err = c->pid < 0 ? errno : 0;
	if (c->pid < 0)
		c->pid = 0;
	close(in[0]);
	close(out[1]);
	return err;
}

/* Run `nft -f -` with script on stdin, inside netns (NULL = ours). Returns 0, or -1 with
 * the reason in msg. Raises only on interrupt, or when no process can be started. */
static int run_nft(lua_State *L, const char *netns, const char *script, char *msg, size_t len)
{
	struct child *c = fc_new(L, sizeof *c, CHILD_MT);
	c->in = c->out = -1;
	int nsfd = netns ? fc_netns_open(netns) : -1;
	if (netns && nsfd < 0) {
		snprintf(msg, len, "open namespace %s: %s", netns, strerror(errno));
		lua_pop(L, 1);
		return -1;
	}
	int err = spawn_nft(c, nsfd);
	if (nsfd >= 0)
		close(nsfd);
	if (err)
		fc_errno_error(L, err, "net: run nft in %s", netns ? netns : "the host namespace");
	/* a few hundred bytes: fits in the pipe, the write cannot block */
	ssize_t w = write(c->in, script, strlen(script));
	(void)w; /* a short write shows up as nft's syntax error */
	close(c->in);
	c->in = -1;
	read_child_output(L, c, msg, len);
	int status;
	waitpid(c->pid, &status, 0);
	c->pid = 0;
	close(c->out);
	c->out = -1;
	lua_pop(L, 1); /* the guard, now empty */
	if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
		return 0;
	if (WIFEXITED(status) && WEXITSTATUS(status) == 127)
		snprintf(msg, len, "nft not found (install the Debian package nftables)");
	else if (!msg[0])
		snprintf(msg, len, "nft failed (status %d)", status);
	first_line(msg);
	return -1;
}

/* ---- egress enable/disable ---- */

/* nftables script: replace table NAME (idempotent: add-then-delete drops an old copy). */
static void nat_script(char *buf, size_t len, const char *table, const char *rule)
{
	snprintf(buf, len,
		 "add table ip %s\ndelete table ip %s\n"
		 "table ip %s {\n chain postrouting {\n"
		 "  type nat hook postrouting priority 100; policy accept;\n  %s\n }\n}\n",
		 table, table, table, rule);
}

static void drop_table_script(char *buf, size_t len, const char *table)
{
	snprintf(buf, len, "add table ip %s\ndelete table ip %s\n", table, table);
}

static void uplink_table_name(const struct egress_opts *o, char *buf, size_t len)
{
	snprintf(buf, len, "fireclaw_%s", o->uplink_ifname);
}

static int egress_configure(struct nl *vm, struct nl *up, const struct egress_opts *o)
{
	struct link_attrs vl, ul;
	int err;
	if ((err = link_get(vm, o->ifname, &vl)) || (err = link_get(up, o->uplink_ifname, &ul)))
		return err;
	if ((err = addr_add(vm, vl.index, &o->vm_ip)) || (err = addr_add(up, ul.index, &o->up_ip)))
		return err;
	if ((err = link_set(vm, vl.index, NULL, 0, 1)) ||
	    (err = link_set(up, ul.index, NULL, 0, 1)))
		return err;
	return route_add_default(vm, vl.index, &o->up_ip);
}

/* The veth pair with its addresses, up, and the default route in netns; all or nothing. */
static int egress_links(const char *netns, const struct egress_opts *o, char *step, size_t len)
{
	const char *uplink = o->uplink ? o->uplink : "(host)";
	int nsfd = o->uplink ? fc_netns_open(o->uplink)
			     : open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
	if (nsfd < 0)
		return snprintf(step, len, "uplink %s", uplink),
		       errno == ENOENT ? -E_NO_NETNS : -errno;
	struct nl *vm = NULL, *up = NULL;
	int err = nl_open(netns, &vm);
	if (err) {
		/* step stays empty: the namespace itself is missing */
	} else if ((err = nl_open(o->uplink, &up))) {
		snprintf(step, len, "uplink %s", uplink);
	} else if ((err = veth_create(vm, o->ifname, o->uplink_ifname, nsfd))) {
		snprintf(step, len, "create veth %s/%s", o->ifname, o->uplink_ifname);
	} else if ((err = egress_configure(vm, up, o))) {
		snprintf(step, len, "configure veth %s/%s", o->ifname, o->uplink_ifname);
		link_del(vm, o->ifname); /* takes its peer along */
	}
	close(nsfd);
	nl_close(vm);
	nl_close(up);
	return err;
}

/* Remove the veth if netns still has it; a missing namespace or link is fine. */
static int egress_unlink(const char *netns, const char *ifname)
{
	struct nl *nl;
	struct link_attrs la;
	int err = nl_open(netns, &nl);
	if (err == -E_NO_NETNS)
		return 0;
	if (!err && (err = link_get(nl, ifname, &la)) == 0)
		err = link_del(nl, ifname);
	nl_close(nl);
	return err == -ENODEV ? 0 : err;
}

static int l_egress_enable(lua_State *L)
{
	const char *netns = check_netns_name(L, 1);
	struct egress_opts o;
	read_egress_opts(L, netns, 2, &o);
	char what[256], step[128] = "", script[1024], msg[512], table[64], rule[256];
	snprintf(what, sizeof what, "enable egress for %s via %s", netns,
		 o.uplink ? o.uplink : "the host namespace");
	int err = egress_links(netns, &o, step, sizeof step); /* undoes itself on failure */
	if (err)
		net_fail(L, -err, what, step);
	if ((err = forwarding_on(netns)))
		snprintf(step, sizeof step, "enable forwarding in %s", netns);
	else if ((err = forwarding_on(o.uplink)))
		snprintf(step, sizeof step, "enable forwarding in %s",
			 o.uplink ? o.uplink : "host");
	if (err) {
		egress_unlink(netns, o.ifname);
		net_fail(L, -err, what, step);
	}
	snprintf(rule, sizeof rule, "oifname \"%s\" masquerade", o.ifname);
	nat_script(script, sizeof script, EGRESS_TABLE, rule);
	int failed = run_nft(L, netns, script, msg, sizeof msg);
	if (!failed) {
		uplink_table_name(&o, table, sizeof table);
		snprintf(rule, sizeof rule, "ip saddr %s oifname != \"%s\" masquerade", o.cidr,
			 o.uplink_ifname);
		nat_script(script, sizeof script, table, rule);
		failed = run_nft(L, o.uplink, script, msg, sizeof msg);
	}
	if (failed) {
		/* undo in reverse; the uplink table was not created (its script failed or
		 * never ran) */
		char ignored[64];
		drop_table_script(script, sizeof script, EGRESS_TABLE);
		run_nft(L, netns, script, ignored, sizeof ignored);
		egress_unlink(netns, o.ifname);
		fc_error(L, "net: %s: NAT: %s", what, msg);
	}
	return 0;
}

static int l_egress_disable(lua_State *L)
{
	const char *netns = check_netns_name(L, 1);
	struct egress_opts o;
	read_egress_opts(L, netns, 2, &o);
	char what[256], script[256], msg[512], table[64];
	snprintf(what, sizeof what, "disable egress for %s via %s", netns,
		 o.uplink ? o.uplink : "the host namespace");
	uplink_table_name(&o, table, sizeof table);
	drop_table_script(script, sizeof script, table);
	if (run_nft(L, o.uplink, script, msg, sizeof msg) < 0)
		fc_error(L, "net: %s: NAT: %s", what, msg);
	int nsfd = fc_netns_open(netns);
	if (nsfd >= 0) {
		close(nsfd);
		drop_table_script(script, sizeof script, EGRESS_TABLE);
		if (run_nft(L, netns, script, msg, sizeof msg) < 0)
			fc_error(L, "net: %s: NAT: %s", what, msg);
	}
	int err = egress_unlink(netns, o.ifname);
	if (err)
		net_fail(L, -err, what, "delete veth");
	return 0;
}

int luaopen_fireclaw_net(lua_State *L)
{
	static const luaL_Reg sock_methods[] = {
	    {"send", l_sock_send},   {"recv", l_sock_recv},	      {"fd", l_sock_fd},
	    {"close", l_sock_close}, {"__tostring", l_sock_tostring}, {NULL, NULL},
	};
	static const luaL_Reg dirguard_methods[] = {{"close", dirguard_close}, {NULL, NULL}};
	static const luaL_Reg child_methods[] = {{"close", child_close}, {NULL, NULL}};
	static const luaL_Reg fns[] = {
	    {"netns_create", l_netns_create},
	    {"netns_delete", l_netns_delete},
	    {"netns_list", l_netns_list},
	    {"netns_exists", l_netns_exists},
	    {"tap_create", l_tap_create},
	    {"link_up", l_link_up},
	    {"addr_add", l_addr_add},
	    {"neigh_add", l_neigh_add},
	    {"link_exists", l_link_exists},
	    {"link_info", l_link_info},
	    {"connect", l_connect},
	    {"probe", l_probe},
	    {"tap_open", l_tap_open},
	    {"unix_listen", l_unix_listen},
	    {"egress_enable", l_egress_enable},
	    {"egress_disable", l_egress_disable},
	    {NULL, NULL},
	};
	fc_class(L, SOCK_MT, sock_methods);
	fc_class(L, DIRGUARD_MT, dirguard_methods);
	fc_class(L, CHILD_MT, child_methods);
	lua_newtable(L);
	luaL_register(L, NULL, fns);
	return 1;
}
