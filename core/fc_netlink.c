/* fc_netlink.c - fireclaw.net's rtnetlink layer (libmnl): links, addresses, neighbours,
 * and reading them back. Returns 0 or -errno and never raises (see core/fc_net.h). */
#include "fc_net.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <linux/neighbour.h>
#include <linux/rtnetlink.h>

void nl_close(struct nl *nl)
{
	if (!nl)
		return;
	if (nl->sock)
		mnl_socket_close(nl->sock);
	free(nl);
}

/* A NETLINK_ROUTE socket created inside netns: it stays bound to that namespace, so
 * everything sent on it configures that namespace without the thread moving. */
int nl_open(const char *netns, struct nl **out)
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
struct nlmsghdr *nl_request(struct nl *nl, int type, int flags, void **extra, size_t extra_len)
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
int nl_run(struct nl *nl, struct nlmsghdr *h, mnl_cb_t cb, void *data)
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
int nl_link_get(struct nl *nl, const char *ifname, struct link_attrs *la)
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
int nl_link_set(struct nl *nl, int index, const unsigned char *mac, unsigned mtu, int up)
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

int nl_link_del(struct nl *nl, const char *ifname)
{
	struct ifinfomsg *ifi;
	struct nlmsghdr *h = nl_request(nl, RTM_DELLINK, 0, (void **)&ifi, sizeof *ifi);
	ifi->ifi_family = AF_UNSPEC;
	mnl_attr_put_strz(h, IFLA_IFNAME, ifname);
	return nl_run(nl, h, NULL, NULL);
}

/* Add (or replace, so a retry is harmless) an address with its prefix route. */
int nl_addr_add(struct nl *nl, int index, const struct ip_addr *ip)
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
int nl_neigh_add(struct nl *nl, int index, const struct ip_addr *ip, const unsigned char mac[6])
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
			net_format_mac(mnl_attr_get_payload(a), n->mac);
	}
	if (n->ip[0])
		r->nneigh++;
	return MNL_CB_OK;
}

static int nl_dump(struct nl *nl, int type, size_t extra_len, mnl_cb_t cb, void *data)
{
	void *extra;
	struct nlmsghdr *h = nl_request(nl, type, NLM_F_DUMP, &extra, extra_len);
	memset(extra, 0, extra_len); /* family AF_UNSPEC: every family */
	return nl_run(nl, h, cb, data);
}

int nl_link_report(struct nl *nl, const char *ifname, struct link_report *r)
{
	memset(r, 0, sizeof *r);
	int err = nl_link_get(nl, ifname, &r->link);
	if (!err)
		err = nl_dump(nl, RTM_GETADDR, sizeof(struct ifaddrmsg), addr_cb, r);
	if (!err)
		err = nl_dump(nl, RTM_GETNEIGH, sizeof(struct ndmsg), neigh_cb, r);
	return err;
}
