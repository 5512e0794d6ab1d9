/* fc_net.h - what the files of fireclaw.net share: core/net.c (the module: namespaces,
 * argument checks, link functions), core/fc_netlink.c (rtnetlink), core/fc_net_sock.c (taps
 * and sockets inside a namespace) and core/fc_egress.c (NAT egress). Not a Lua interface:
 * every function below lives on in fireclaw.net under the name it always had.
 *
 * The netlink layer returns 0 or -errno and never raises; argument checks raise. */
#ifndef FC_NET_H
#define FC_NET_H

#include "fc.h"

#include <arpa/inet.h>
#include <libmnl/libmnl.h>
#include <net/if.h>

#ifndef IFF_LOWER_UP
#define IFF_LOWER_UP 0x10000
#endif

#define NETNS_DIR "/run/netns"
#define SOCK_MT "fireclaw.net.socket"
/* The kernel sizes dump messages by the reader's buffer, up to 32 KiB. */
#define NL_BUFSIZE 32768
#define MAX_ITEMS 32
/* A private code next to errno values: the named namespace does not exist. */
#define E_NO_NETNS 4096

/* ---- errors and arguments (core/net.c) ---- */

/* Raise "net: WHAT: [STEP: ]REASON". err is a positive errno or E_NO_NETNS. */
int net_fail(lua_State *L, int err, const char *what, const char *step) __attribute__((noreturn));

struct ip_addr {
	int family;
	int bytes; /* 4 or 16 */
	int prefix;
	unsigned char a[16];
};

/* A namespace name usable as a file name under /run/netns (argument idx). */
const char *net_check_netns_name(lua_State *L, int idx);
/* Interface names go into nft scripts and netlink messages: only [A-Za-z0-9_.-], 1-15
 * characters, never "." or ".."; raises otherwise. */
const char *net_valid_ifname(lua_State *L, const char *name);
const char *net_check_ifname(lua_State *L, int idx);
/* 0, or -1 if s is no IPv4/IPv6 address; a host prefix. */
int net_parse_ip(const char *s, struct ip_addr *ip);
void net_check_ip(lua_State *L, const char *s, struct ip_addr *ip);
/* "addr/len"; a missing /len means a host address. */
void net_check_cidr(lua_State *L, const char *s, struct ip_addr *ip);
void net_check_mac(lua_State *L, const char *s, unsigned char mac[6]);
void net_format_mac(const unsigned char *mac, char out[18]);

/* Run fn(arg) with the calling thread inside namespace netns, then come back
 * (fc_netns_run). Returns fn's result, or -E_NO_NETNS / -errno if the namespace cannot be
 * entered. fn must not raise. */
int net_in_netns(const char *netns, int (*fn)(void *), void *arg);

/* ---- rtnetlink (core/fc_netlink.c): 0 or -errno, never raises ---- */

struct nl {
	struct mnl_socket *sock;
	unsigned seq, portid;
	char buf[NL_BUFSIZE];
};

struct link_attrs {
	int index;
	unsigned flags, mtu;
	int has_mac;
	unsigned char mac[6];
};

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

/* A NETLINK_ROUTE socket created inside netns (NULL = ours): it stays bound to that
 * namespace, so everything sent on it configures that namespace without the thread moving.
 * -E_NO_NETNS if there is no such namespace. */
int nl_open(const char *netns, struct nl **out);
void nl_close(struct nl *nl);
/* Start a request in nl->buf (acknowledged unless flags == NLM_F_DUMP). */
struct nlmsghdr *nl_request(struct nl *nl, int type, int flags, void **extra, size_t extra_len);
/* Send the request in nl->buf, feed the replies to cb until acknowledged: 0 or -errno. */
int nl_run(struct nl *nl, struct nlmsghdr *h, mnl_cb_t cb, void *data);
/* Look a link up by name: -ENODEV if there is none. */
int nl_link_get(struct nl *nl, const char *ifname, struct link_attrs *la);
/* Change an existing link: MAC and MTU when given, and bring it up when up is set. */
int nl_link_set(struct nl *nl, int index, const unsigned char *mac, unsigned mtu, int up);
int nl_link_del(struct nl *nl, const char *ifname);
/* Add (or replace, so a retry is harmless) an address with its prefix route. */
int nl_addr_add(struct nl *nl, int index, const struct ip_addr *ip);
/* A permanent neighbour entry: the kernel never ARPs for it (nor forgets it). */
int nl_neigh_add(struct nl *nl, int index, const struct ip_addr *ip, const unsigned char mac[6]);
/* A link with its addresses and neighbours. */
int nl_link_report(struct nl *nl, const char *ifname, struct link_report *r);

/* ---- the rest of the module's functions, added to the table on top of the stack ---- */

/* net.tap_create, net.connect, net.probe, net.tap_open, net.unix_listen, net.unix_connect
 * and the socket class (core/fc_net_sock.c) */
void fc_net_sock_register(lua_State *L);
/* net.egress_enable, net.egress_disable (core/fc_egress.c) */
void fc_net_egress_register(lua_State *L);

#endif
