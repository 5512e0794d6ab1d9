/* fc_egress.c - fireclaw.net's NAT egress: net.egress_enable, net.egress_disable (a veth
 * pair, forwarding, nftables run through `nft`). See the comment below and core/net.c. */
#include "fc_net.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <linux/rtnetlink.h>
#include <linux/veth.h>
#include <sched.h>
#include <nftables/libnftables.h>

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
 * The rules are applied in-process with libnftables (Debian libnftables1), inside each
 * namespace through fc_netns_run: no `nft` process, one atomic transaction per table.
 * The uplink table also isolates the VM. Dropped: whatever arrives from its veth for the
 * uplink itself (the host's own addresses), except replies to what the uplink started and
 * the matches in opts.host_accept (such as "ip daddr 10.0.0.1 tcp dport 80": addresses a
 * user named); and whatever would be forwarded to link-local addresses (169.254.0.0/16:
 * cloud metadata) or to another VM's veth (fcv*).
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
	static const char *const known[] = {"uplink_netns", "ifname",	   "uplink_ifname",
					    "cidr",	    "host_accept", NULL};
	memset(o, 0, sizeof *o);
	if (!lua_isnoneornil(L, t))
		luaL_checktype(L, t, LUA_TTABLE);
	fc_opt_check(L, t, "net.egress", known);
	o->uplink = fc_opt_string(L, t, "uplink_netns", NULL);
	if (o->uplink && (!*o->uplink || strchr(o->uplink, '/')))
		fc_error(L, "net: egress for %s: bad uplink_netns '%s'", netns, o->uplink);
	if (o->uplink && strcmp(o->uplink, netns) == 0)
		fc_error(L, "net: egress for %s: the uplink must be another namespace", netns);
	o->ifname = net_valid_ifname(L, fc_opt_string(L, t, "ifname", "veth0"));
	char def[IFNAMSIZ];
	snprintf(def, sizeof def, "fcv%08x", fnv1a(netns));
	snprintf(o->uplink_ifname, sizeof o->uplink_ifname, "%s",
		 net_valid_ifname(L, fc_opt_string(L, t, "uplink_ifname", def)));
	o->cidr = fc_opt_string(L, t, "cidr", "100.64.0.0/30");
	net_check_cidr(L, o->cidr, &o->net);
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
	return netns ? net_in_netns(netns, enable_forwarding, NULL) : enable_forwarding(NULL);
}

/* ---- running nftables (libnftables, in-process) ---- */

struct nft_job {
	const char *script;
	char *msg;
	size_t len;
};

/* Keep the first line of nftables' complaint, which names the problem. */
static void first_line(char *s)
{
	char *nl = strchr(s, '\n');
	if (nl)
		*nl = 0;
}

/* Runs inside the target namespace (fc_netns_run): the context, its netlink socket and the
 * commands all belong to that namespace. Never raises. */
static int nft_apply(void *arg)
{
	struct nft_job *j = arg;
	const char *why = fc_nft_load();
	if (why) {
		snprintf(j->msg, j->len, "%s", why);
		return -1;
	}
	struct nft_ctx *ctx = nft_ctx_new(NFT_CTX_DEFAULT);
	if (!ctx) {
		snprintf(j->msg, j->len, "libnftables: cannot make a context");
		return -1;
	}
	nft_ctx_buffer_output(ctx);
	nft_ctx_buffer_error(ctx);
	int rc = nft_run_cmd_from_buffer(ctx, j->script);
	if (rc) {
		const char *e = nft_ctx_get_error_buffer(ctx);
		snprintf(j->msg, j->len, "%s", e && *e ? e : "nftables refused the rules");
		first_line(j->msg);
	}
	nft_ctx_free(ctx);
	return rc ? -1 : 0;
}

/* Apply an nftables script inside netns (NULL = ours) through libnftables. Returns 0, or -1
 * with the reason in msg. Never raises. */
static int run_nft(lua_State *L, const char *netns, const char *script, char *msg, size_t len)
{
	(void)L;
	struct nft_job j = {.script = script, .msg = msg, .len = len};
	msg[0] = 0;
	if (!netns)
		return nft_apply(&j);
	int nsfd = fc_netns_open(netns);
	if (nsfd < 0) {
		snprintf(msg, len, "open namespace %s: %s", netns, strerror(errno));
		return -1;
	}
	int rc = fc_netns_run(nsfd, nft_apply, &j);
	close(nsfd);
	if (rc < -1 || (rc < 0 && !msg[0]))
		snprintf(msg, len, "enter namespace %s: %s", netns, strerror(-rc));
	return rc ? -1 : 0;
}

/* net.nft(netns, script): apply an nftables script (nft -f syntax) atomically inside netns
 * (nil: fireclaw's own namespace). Raises with nftables' first line of complaint. */
static int l_nft(lua_State *L)
{
	const char *netns = lua_isnoneornil(L, 1) ? NULL : net_check_netns_name(L, 1);
	size_t n;
	const char *script = luaL_checklstring(L, 2, &n);
	if (strlen(script) != n)
		fc_error(L, "net: nft: the script holds a NUL byte");
	char msg[512];
	if (run_nft(L, netns, script, msg, sizeof msg) < 0)
		fc_error(L, "net: nft in %s: %s", netns ? netns : "the host namespace", msg);
	return 0;
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

#define HOST_ACCEPT_MAX 64
#define HOST_ACCEPT_LEN 160

/* One entry of opts.host_accept: an nft match built by fireclaw.netpolicy from addresses
 * and ports it checked; still only letters, digits and the punctuation of such a match. */
static const char *check_match(lua_State *L, const char *m)
{
	size_t n = strlen(m);
	if (n == 0 || n >= HOST_ACCEPT_LEN ||
	    strspn(m, "abcdefghijklmnopqrstuvwxyz0123456789 ./:{},-") != n)
		fc_error(L, "net: egress: bad host_accept entry '%s'", m);
	return m;
}

/* The uplink's table for this VM: NAT out, and the isolation (see the comment on top).
 * The entries of the host_accept list at index t are accepted before the input drop.
 * Returns the script, kept in a userdata it pushes (raises only on misuse). */
static char *uplink_script(lua_State *L, const struct egress_opts *o, int t)
{
	char table[64];
	uplink_table_name(o, table, sizeof table);
	int count = lua_istable(L, t) ? (int)lua_objlen(L, t) : 0;
	if (count > HOST_ACCEPT_MAX)
		fc_error(L, "net: egress: more than %d host_accept entries", HOST_ACCEPT_MAX);
	for (int i = 1; i <= count; i++) { /* check them all before anything is allocated */
		lua_rawgeti(L, t, i);
		if (lua_type(L, -1) != LUA_TSTRING)
			fc_error(L, "net: egress: host_accept entries are strings");
		check_match(L, lua_tostring(L, -1));
		lua_pop(L, 1);
	}
	size_t len = 2048 + (size_t)HOST_ACCEPT_MAX * (HOST_ACCEPT_LEN + 64);
	char *buf = lua_newuserdata(L, len); /* owned by the Lua stack: nothing to free */
	const char *up = o->uplink_ifname;
	int n = snprintf(
	    buf, len,
	    "add table ip %s\ndelete table ip %s\ntable ip %s {\n"
	    " chain postrouting {\n  type nat hook postrouting priority 100; policy accept;\n"
	    "  ip saddr %s oifname != \"%s\" masquerade\n }\n"
	    " chain forward {\n  type filter hook forward priority -10; policy accept;\n"
	    "  iifname \"%s\" ip daddr 169.254.0.0/16 drop\n"
	    "  iifname \"%s\" oifname \"fcv*\" drop\n }\n"
	    " chain input {\n  type filter hook input priority -10; policy accept;\n"
	    "  iifname \"%s\" ct state established,related accept\n",
	    table, table, table, o->cidr, up, up, up, up);
	for (int i = 1; i <= count; i++) {
		lua_rawgeti(L, t, i);
		n += snprintf(buf + n, len - (size_t)n, "  iifname \"%s\" %s accept\n", up,
			      lua_tostring(L, -1));
		lua_pop(L, 1);
	}
	snprintf(buf + n, len - (size_t)n, "  iifname \"%s\" drop\n }\n}\n", up);
	return buf;
}

static int egress_configure(struct nl *vm, struct nl *up, const struct egress_opts *o)
{
	struct link_attrs vl, ul;
	int err;
	if ((err = nl_link_get(vm, o->ifname, &vl)) ||
	    (err = nl_link_get(up, o->uplink_ifname, &ul)))
		return err;
	if ((err = nl_addr_add(vm, vl.index, &o->vm_ip)) ||
	    (err = nl_addr_add(up, ul.index, &o->up_ip)))
		return err;
	if ((err = nl_link_set(vm, vl.index, NULL, 0, 1)) ||
	    (err = nl_link_set(up, ul.index, NULL, 0, 1)))
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
		nl_link_del(vm, o->ifname); /* takes its peer along */
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
	if (!err && (err = nl_link_get(nl, ifname, &la)) == 0)
		err = nl_link_del(nl, ifname);
	nl_close(nl);
	return err == -ENODEV ? 0 : err;
}

static int l_egress_enable(lua_State *L)
{
	const char *netns = net_check_netns_name(L, 1);
	struct egress_opts o;
	read_egress_opts(L, netns, 2, &o);
	char what[256], step[128] = "", script[1024], msg[512], rule[256];
	/* the uplink's script first: a bad host_accept raises before anything exists */
	if (lua_istable(L, 2))
		lua_getfield(L, 2, "host_accept");
	else
		lua_pushnil(L);
	const char *up = uplink_script(L, &o, lua_gettop(L));
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
	if (!failed)
		failed = run_nft(L, o.uplink, up, msg, sizeof msg);
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
	const char *netns = net_check_netns_name(L, 1);
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

void fc_net_egress_register(lua_State *L)
{
	static const luaL_Reg fns[] = {
	    {"egress_enable", l_egress_enable},
	    {"egress_disable", l_egress_disable},
	    {"nft", l_nft},
	    {NULL, NULL},
	};
	luaL_register(L, NULL, fns);
}
