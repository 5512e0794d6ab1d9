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
#include <signal.h>
#include <sys/wait.h>

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
	static const luaL_Reg child_methods[] = {{"close", child_close}, {NULL, NULL}};
	static const luaL_Reg fns[] = {
	    {"egress_enable", l_egress_enable},
	    {"egress_disable", l_egress_disable},
	    {NULL, NULL},
	};
	fc_class(L, CHILD_MT, child_methods);
	luaL_register(L, NULL, fns);
}
