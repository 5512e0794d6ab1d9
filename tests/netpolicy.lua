-- fireclaw.netpolicy without root or VMs: parsing --allow and -p, the policy check, the
-- nftables filter and dnsmasq's command line a policy becomes, the per-VM uplink
-- addresses, and the guest resolver in the boot arguments and the reseed exec. The real
-- traffic (a guest behind these rules) is tests/netpol.sh.
local t = require "tap"
local guest = require "fireclaw.guest"
local image = require "fireclaw.image"
local netpolicy = require "fireclaw.netpolicy"

-- ---- --allow entries ----
local e = netpolicy.parse_allow("good.test")
t.same({ e.kind, e.host, e.wild, e.port }, { "name", "good.test", false, nil }, "a name")
e = netpolicy.parse_allow("*.PyPI.org:443")
t.same({ e.kind, e.host, e.wild, e.port }, { "name", "pypi.org", true, 443 }, "a wildcard with a port, lowercased")
e = netpolicy.parse_allow("10.1.0.0/16:80")
t.same({ e.kind, e.host, e.port }, { "cidr", "10.1.0.0/16", 80 }, "a CIDR with a port")
t.is(netpolicy.parse_allow("198.18.1.20").host, "198.18.1.20/32", "an address is a /32")
for _, bad in ipairs { "a..b", "localhost", "-x.com", "x-.com", "a b.com", "*.", "*.*.x.com", "x.com:0",
	"x.com:65536", "10.0.0.0/33", "300.1.1.1", "010.1.1.1", "x.com;rm", "é.com", "" } do
	t.raises(function() netpolicy.parse_allow(bad) end, "network: ", "refused: " .. string.format("%q", bad))
end
t.raises(function() netpolicy.parse_allow(("a"):rep(64) .. ".com") end, "want a DNS name", "a 64-byte label")

-- ---- -p entries ----
local p = netpolicy.parse_publish("8080:80")
t.same({ p.host_ip, p.host_port, p.guest_port }, { "127.0.0.1", 8080, 80 }, "HOSTPORT:GUESTPORT: loopback")
p = netpolicy.parse_publish("0.0.0.0:18080:8080")
t.same({ p.host_ip, p.host_port, p.guest_port, p.text }, { "0.0.0.0", 18080, 8080, "0.0.0.0:18080:8080" },
	"HOSTIP:HOSTPORT:GUESTPORT")
for _, bad in ipairs { "8080", "a:1:2", "1.2.3:1:2", "1:0", "70000:1", "1.2.3.4:5:6:7", "::1:80:80" } do
	t.raises(function() netpolicy.parse_publish(bad) end, "network: ", "refused: " .. bad)
end

-- ---- the policy ----
t.is(netpolicy.check(nil).mode, "none", "no policy: none")
t.is(netpolicy.check({ allow = { "x.com" } }).mode, "nat", "an allow list means egress")
t.is(netpolicy.check(nil, "nat").mode, "nat", "no mode: the image's default (manifest net_mode)")
t.is(netpolicy.check({ mode = "none" }, "nat").mode, "none", "a mode given beats the image's")
t.is(netpolicy.check({ allow = { "x.com" } }, "none").mode, "nat", "an image default of none does not stop --allow")
t.raises(function() netpolicy.check { mode = "none", allow = { "x.com" } } end, "needs egress",
	"allow with mode none: refused")
t.raises(function() netpolicy.check { mode = "wifi" } end, "mode must be none or nat", "unknown mode")
t.raises(function() netpolicy.check { mode = "nat", alow = {} } end, "did you mean 'allow'", "unknown key")
t.raises(function() netpolicy.check { publish = { "1:2", "127.0.0.1:1:3" } } end, "published twice",
	"one host port twice")
local many = {}
for i = 1, netpolicy.MAX_ALLOW + 1 do many[i] = "h" .. i .. ".com" end
t.raises(function() netpolicy.check { allow = many } end, "more than", "too many allow entries")
t.is(netpolicy.describe(netpolicy.check { allow = { "a.com", "1.2.3.4" } }), "nat+allow(2)", "describe")

-- ---- what it becomes ----
local pol = netpolicy.check { allow = { "good.test", "*.x.org:443", "10.0.0.0/8:22", "169.254.169.254" } }
local nft = netpolicy.filter_script(pol)
t.like(nft, "policy drop;", "allow list: the forward chain drops by default")
t.like(nft, "set dns_any { type ipv4_addr; }", "a set for names on any port")
t.like(nft, "set dns_p443 { type ipv4_addr; }", "a set for names on port 443")
local meta = nft:find("ip daddr 169.254.169.254/32 accept", 1, true)
local ll = nft:find("ip daddr 169.254.0.0/16 drop", 1, true)
local learned = nft:find("ip daddr @dns_any accept", 1, true)
t.ok(meta and ll and learned and meta < ll and ll < learned,
	"order: addresses named explicitly, then link-local dropped, then the learned addresses")
t.like(nft, "ip daddr 10%.0%.0%.0/8 meta l4proto { tcp, udp } th dport 22 accept", "a CIDR with its port")
local nat = netpolicy.filter_script(netpolicy.check { mode = "nat" })
t.like(nat, '169%.254%.0%.0/16 drop\n%s+iifname "tap0" oifname "veth0" accept', "nat: all but link-local")
t.ok(not nat:find("set ", 1, true), "nat: no sets")
local argv = table.concat(netpolicy.dnsmasq_argv(pol, { "198.18.0.1" }, "/run/x"), " ")
t.like(argv, "%-%-address=/#/ ", "every other name: NXDOMAIN")
t.like(argv, "%-%-server=/good%.test/198%.18%.0%.1 ", "an allowed name goes upstream")
t.like(argv, "%-%-server=/%*%.x%.org/198%.18%.0%.1 ", "a wildcard: its subdomains only")
t.like(argv, "%-%-nftset=/%*%.x%.org/4#ip#fireclaw_policy#dns_p443", "its answers fill the port's set")
t.like(argv, "%-%-cache%-size=0", "no cache: every answer fills the sets")
local natargv = table.concat(netpolicy.dnsmasq_argv(netpolicy.check { mode = "nat" }, { "1.1.1.1" }, "/d"), " ")
t.like(natargv, "%-%-server=1%.1%.1%.1", "nat: every name upstream")
t.ok(not natargv:find("--address=/", 1, true), "nat: nothing refused")
t.is(netpolicy.cidr("000000"), "100.64.0.0/30", "cidr: id 0")
t.is(netpolicy.cidr("0fffff"), "100.127.255.252/30", "cidr: the last /30 of 100.64.0.0/10")
t.is(netpolicy.cidr("100001"), "100.64.0.4/30", "cidr: ids wrap modulo 2^20")

-- ---- upstream resolvers ----
local config = require "fireclaw.config"
config.net.dns = "198.18.0.1, 10.0.0.53"
t.same(netpolicy.upstreams(), { "198.18.0.1", "10.0.0.53" }, "FIRECLAW_DNS: a list")
config.net.dns = "127.0.0.53"
t.raises(netpolicy.upstreams, "is loopback", "FIRECLAW_DNS: loopback refused")
config.net.dns = "dns.example"
t.raises(netpolicy.upstreams, "bad IPv4 address", "FIRECLAW_DNS: a name refused")
config.net.dns = nil

-- ---- the guest's resolver ----
local img = { boot_args = { "console=ttyS0", "ip=172.16.0.2::172.16.0.1:255.255.255.252::eth0:off", "rw" } }
t.is(image.boot_args(img, { dns = "172.16.0.1" }),
	"console=ttyS0 ip=172.16.0.2::172.16.0.1:255.255.255.252::eth0:off:172.16.0.1 rw", "boot args: ip=…:DNS0")
t.is(image.boot_args(img), "console=ttyS0 ip=172.16.0.2::172.16.0.1:255.255.255.252::eth0:off rw",
	"boot args: no resolver without egress")
t.like(guest.reseed_command(5, "172.16.0.1"), " && echo 'nameserver 172%.16%.0%.1' >/etc/resolv%.conf$",
	"a restore writes resolv.conf in the reseed exec")
t.raises(function() guest.reseed_command(5, "1.2.3.4; reboot") end, "bad dns", "reseed: the resolver is an address")

return t.done()
