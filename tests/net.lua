-- tests/net.lua: fireclaw.net against real network namespaces, a real tap, a real TCP
-- server inside a namespace, and egress between two test namespaces. Everything it makes
-- is named fct-net<pid>-… and removed at the end, also when a test fails halfway.
local t = require "tap"
local net = require "fireclaw.net"

local function read_file(path)
	local f = io.open(path)
	if not f then return nil end
	local s = f:read("*a")
	f:close()
	return s
end

local PID = read_file("/proc/self/stat"):match("^(%d+)")
local NS = "fct-net" .. PID .. "-a"
local UP = "fct-net" .. PID .. "-up"
local PREFIX = "fct-net" .. PID .. "-"
local PORT = 7000 + tonumber(PID) % 2000

local function sh(cmd)
	local p = io.popen(cmd .. " 2>&1")
	local out = p:read("*a")
	local ok = p:close()
	return out, ok
end

-- a literal string inside a Lua pattern (namespace names contain '-')
local function esc(s) return (s:gsub("%p", "%%%0")) end

local function exists(path)
	local f = io.open(path)
	if f then f:close() end
	return f ~= nil
end

local function own_netns() return sh("readlink /proc/" .. PID .. "/ns/net") end

-- ---- cleanup: whatever the tests leave, by name and by tracked pid ----

local servers = {} -- {pid=, pipe=}

local function stop_server(s)
	if s.pid then os.execute("kill " .. s.pid .. " 2>/dev/null") end
	if s.pipe then s.pipe:close() end
	s.pid, s.pipe = nil, nil
end

local function cleanup()
	for _, s in ipairs(servers) do stop_server(s) end
	for _, name in ipairs(net.netns_list(PREFIX)) do pcall(net.netns_delete, name) end
end

-- A TCP server in namespace ns: socat on 0.0.0.0:port running `cmd` per connection.
-- Returns once socat says it is listening (its -d -d log line), not after a delay.
local function start_server(ns, port, cmd)
	local pipe = io.popen(string.format(
		"ip netns exec %s socat -d -d TCP-LISTEN:%d,reuseaddr,fork EXEC:'%s' 2>&1 >/dev/null & echo pid $!",
		ns, port, cmd))
	local s = { pipe = pipe }
	servers[#servers + 1] = s
	local listening = false
	while not (s.pid and listening) do
		local line = pipe:read("*l")
		if not line then error("socat exited before listening") end
		s.pid = s.pid or line:match("^pid (%d+)$")
		listening = listening or line:find("listening on") ~= nil
	end
	return s
end

-- IPv4 entries only: the kernel adds IPv6 multicast ones (ff02::…, "noarp") on its own,
-- sooner or later
local function ipv4_neighbours(info)
	local v4 = {}
	for _, n in ipairs(info.neighbours) do
		if n.ip:find("^%d+%.%d+%.%d+%.%d+$") then v4[#v4 + 1] = n end
	end
	return v4
end

local original_ns = own_netns()
-- counted from inside (a spawned ls would race with popen's own pipe ends)
local function open_fds() return #require("fireclaw.runtime").listdir("/proc/self/fd") end
local fds_before = open_fds()

local function body()
	-- ---- namespaces ----
	t.ok(not net.netns_exists(NS), "namespace absent before")
	net.netns_create(NS)
	t.ok(net.netns_exists(NS), "netns_create: exists")
	t.ok(exists("/run/netns/" .. NS), "netns_create: file under /run/netns")
	t.like(sh("ip netns list"), esc(NS), "netns_create: ip netns list shows it")
	t.is(own_netns(), original_ns, "netns_create: the process is back in its own namespace")
	t.raises(function() net.netns_create(NS) end, esc("net: create namespace " .. NS .. ": already exists"),
		"netns_create: an existing name is an error")
	t.raises(function() net.netns_create("a/b") end, "bad namespace name", "netns_create: '/' refused")
	t.raises(function() net.netns_create("") end, "bad namespace name", "netns_create: empty name refused")
	net.netns_create(NS .. "2")
	t.same(net.netns_list(PREFIX), { NS, NS .. "2" }, "netns_list: sorted, filtered by prefix")
	t.ok(#net.netns_list("fct-no-such-prefix-" .. PID) == 0, "netns_list: empty for an unused prefix")
	t.is(net.netns_delete(NS .. "2"), true, "netns_delete: true when it existed")
	t.is(net.netns_delete(NS .. "2"), false, "netns_delete: false (no error) when already gone")

	-- ---- tap in one go ----
	net.tap_create(NS, { mac = "02:fc:7e:57:00:01", mtu = 1400, addr = "172.16.0.1/30",
		guest_ip = "172.16.0.2", guest_mac = "06:00:ac:10:00:02" })
	local info = net.link_info(NS, "tap0")
	t.is(info.mac, "02:fc:7e:57:00:01", "tap_create: MAC as asked")
	t.is(info.mtu, 1400, "tap_create: MTU as asked")
	t.is(info.up, true, "tap_create: up")
	t.is(info.carrier, false, "tap_create: no carrier until a VMM attaches")
	t.is(info.addrs[1], "172.16.0.1/30", "tap_create: host address")
	t.same(ipv4_neighbours(info), { { ip = "172.16.0.2", mac = "06:00:ac:10:00:02", state = "permanent" } },
		"tap_create: permanent neighbour entry for the guest")
	local link = sh("ip -n " .. NS .. " -d link show tap0")
	t.like(link, "tun type tap pi off .*persist on", "ip -d link: a persistent tap without PI")
	t.like(link, "link/ether 02:fc:7e:57:00:01", "ip -d link: same MAC")
	t.like(sh("ip -n " .. NS .. " neigh show dev tap0"), "172%.16%.0%.2 lladdr 06:00:ac:10:00:02 PERMANENT",
		"ip neigh: PERMANENT entry")
	t.like(sh("ip -n " .. NS .. " link show lo"), "<LOOPBACK,UP", "tap_create: lo up")
	t.ok(not sh("ip link show"):find("02:fc:7e:57:00:01", 1, true), "nothing of it in the host namespace")
	t.is(own_netns(), original_ns, "tap_create: the process is back in its own namespace")
	t.raises(function() net.tap_create(NS, {}) end, esc("create tap tap0 in " .. NS .. ": a link with that name already exists"),
		"tap_create: an existing name is an error")
	t.raises(function() net.tap_create(NS, { name = "tap9", mtu = 10 }) end,
		esc("create tap tap9 in " .. NS .. ": set MAC/MTU and up: Invalid argument"),
		"tap_create: a step the kernel refuses names the step")
	t.is(net.link_exists(NS, "tap9"), false, "tap_create: a failed tap is removed again")
	t.raises(function() net.tap_create(NS, { mac = "02:fc:00:00:01" }) end, "bad MAC address", "tap_create: bad MAC")
	t.raises(function() net.tap_create(NS, { addr = "172.16.0.1/33" }) end, "bad prefix length", "tap_create: bad prefix")
	t.raises(function() net.tap_create(NS, { name = "tap1", guest_ip = "172.16.0.2" }) end,
		"guest_ip and guest_mac go together", "tap_create: guest_ip without guest_mac")
	t.raises(function() net.tap_create(NS, { name = "a-name-far-too-long" }) end, "bad interface name",
		"tap_create: name longer than IFNAMSIZ")

	-- ---- separate link functions ----
	net.tap_create(NS, { name = "tap1" })
	t.is(net.link_info(NS, "tap1").up, true, "tap_create with defaults: up")
	t.is(#ipv4_neighbours(net.link_info(NS, "tap1")), 0, "tap_create with defaults: no neighbour")
	net.addr_add(NS, "tap1", "192.0.2.1/24")
	net.addr_add(NS, "tap1", "192.0.2.1/24")
	net.neigh_add(NS, "tap1", "192.0.2.7", "02:00:00:00:00:07")
	info = net.link_info(NS, "tap1")
	local has_addr = false
	for _, a in ipairs(info.addrs) do has_addr = has_addr or a == "192.0.2.1/24" end
	t.ok(has_addr, "addr_add: address present (adding it twice is fine)")
	t.same(ipv4_neighbours(info), { { ip = "192.0.2.7", mac = "02:00:00:00:00:07", state = "permanent" } }, "neigh_add")
	net.link_up(NS, "lo")
	t.is(net.link_exists(NS, "tap1"), true, "link_exists: true")
	t.is(net.link_exists(NS, "eth9"), false, "link_exists: false")
	t.raises(function() net.link_info(NS, "eth9") end, esc("link info eth9 in " .. NS .. ": No such device"), "link_info: missing link")
	t.raises(function() net.link_up(NS, "eth9") end, esc("set eth9 up in " .. NS .. ": eth9: No such device"), "link_up: missing link")
	t.raises(function() net.neigh_add(NS, "tap1", "192.0.2.300", "02:00:00:00:00:07") end, "bad IP address",
		"neigh_add: bad IP")

	-- ---- a missing namespace ----
	local gone = PREFIX .. "missing"
	local function missing(what, fn)
		t.raises(fn, esc(gone .. ": no such network namespace"), what .. ": missing namespace is a clear error")
	end
	missing("tap_create", function() net.tap_create(gone, {}) end)
	missing("link_up", function() net.link_up(gone, "lo") end)
	missing("addr_add", function() net.addr_add(gone, "lo", "192.0.2.1/24") end)
	missing("link_info", function() net.link_info(gone, "lo") end)
	missing("link_exists", function() net.link_exists(gone, "lo") end)
	missing("connect", function() net.connect(gone, "127.0.0.1", PORT) end)
	missing("probe", function() net.probe(gone, "127.0.0.1", PORT) end)
	t.is(net.netns_exists(gone), false, "netns_exists: false for a missing one")

	-- ---- TCP into the namespace ----
	t.is(net.probe(NS, "172.16.0.1", PORT), false, "probe: false while nothing listens")
	local echo = start_server(NS, PORT, "head -c 5")
	t.is(net.probe(NS, "172.16.0.1", PORT), true, "probe: true once the server listens")
	t.is(net.probe(nil, "127.0.0.1", PORT), false, "probe: the server is not in the host namespace")
	local s = net.connect(NS, "172.16.0.1", PORT, 5)
	t.like(tostring(s), esc("fireclaw.net.socket: 172.16.0.1:" .. PORT .. " in " .. NS), "socket tostring")
	t.ok(type(s:fd()) == "number" and s:fd() > 2, "socket:fd()")
	t.is(s:send("hello"), 5, "send: all bytes")
	local got = ""
	while #got < 5 do
		local d = s:recv(100, 5)
		if not d then break end
		got = got .. d
	end
	t.is(got, "hello", "recv: the server echoed the data")
	t.is(s:recv(100, 5), nil, "recv: nil at end of stream")
	s:close()
	s:close()
	t.raises(function() s:send("x") end, "is closed", "send on a closed socket is an error")
	t.like(tostring(s), "%(closed%)", "closed socket tostring")

	local idle = start_server(NS, PORT + 1, "cat")
	s = net.connect(NS, "127.0.0.1", PORT + 1)
	t.raises(function() s:recv(100, 0.05) end, esc("recv from 127.0.0.1:" .. (PORT + 1) .. " in " .. NS .. ": timed out"),
		"recv: timeout is an error naming the peer")
	s:close()
	stop_server(idle)
	stop_server(echo)
	t.raises(function() net.connect(NS, "127.0.0.1", PORT + 2) end,
		"^" .. esc("net: connect 127.0.0.1:" .. (PORT + 2) .. " in " .. NS .. ": connection refused") .. "$", "connect: refused")
	t.raises(function() net.connect(NS, "not-an-ip", 22) end, "bad IPv4 address", "connect: bad address")
	t.is(own_netns(), original_ns, "sockets: the process is back in its own namespace")

	-- ---- egress between two test namespaces (no traffic) ----
	net.netns_create(UP)
	net.egress_enable(NS, { uplink_netns = UP })
	local up_if = nil
	for name in sh("ip -n " .. UP .. " -br link"):gmatch("(fcv%x+)@") do up_if = name end
	t.ok(up_if ~= nil, "egress_enable: veth end in the uplink namespace")
	t.like(sh("ip -n " .. NS .. " -br addr show veth0"), "UP%s+100%.64%.0%.2/30", "egress_enable: VM side 100.64.0.2/30, up")
	t.like(sh("ip -n " .. UP .. " -br addr"), "UP%s+100%.64%.0%.1/30", "egress_enable: uplink side 100.64.0.1/30, up")
	t.like(sh("ip -n " .. NS .. " route show default"), "default via 100%.64%.0%.1 dev veth0",
		"egress_enable: default route via the uplink")
	t.like(sh("ip netns exec " .. NS .. " nft list ruleset"), 'oifname "veth0" masquerade',
		"egress_enable: masquerade in the VM namespace")
	t.like(sh("ip netns exec " .. UP .. " nft list ruleset"), "ip saddr 100%.64%.0%.0/30 oifname != \"" .. (up_if or "?") .. "\" masquerade",
		"egress_enable: masquerade in the uplink")
	t.like(sh("ip netns exec " .. UP .. " sysctl -n net.ipv4.ip_forward"), "^1", "egress_enable: forwarding in the uplink")
	t.raises(function() net.egress_enable(NS, { uplink_netns = UP }) end, "create veth veth0/fcv%x+: File exists",
		"egress_enable twice: an error ...")
	t.like(sh("ip -n " .. NS .. " -br link show veth0"), "veth0", "... that leaves the first one working")
	t.raises(function() net.egress_enable(NS, { uplink_netns = PREFIX .. "nope" }) end, "no such network namespace",
		"egress_enable: missing uplink")
	t.raises(function() net.egress_enable(NS, { uplink_netns = UP, cidr = "100.64.0.0/31" }) end, "room for two hosts",
		"egress_enable: a /31 is too small")
	net.egress_disable(NS, { uplink_netns = UP })
	net.egress_disable(NS, { uplink_netns = UP })
	t.ok(not sh("ip -n " .. NS .. " -br link"):find("veth0"), "egress_disable: veth gone (twice is fine)")
	t.ok(not sh("ip -n " .. UP .. " -br link"):find("fcv"), "egress_disable: uplink end gone")
	t.is(sh("ip netns exec " .. NS .. " nft list ruleset"), "", "egress_disable: no table left in the VM namespace")
	t.is(sh("ip netns exec " .. UP .. " nft list ruleset"), "", "egress_disable: no table left in the uplink")
	net.egress_enable(NS, { uplink_netns = UP, cidr = "100.64.7.8/29", ifname = "up0" })
	t.like(sh("ip -n " .. NS .. " -br addr show up0"), "100%.64%.7%.10/29", "egress_enable: addresses from opts.cidr")

	-- ---- deleting the namespace takes the tap along ----
	t.is(net.netns_delete(NS), true, "netns_delete with a tap and a veth in it")
	net.egress_disable(NS, { uplink_netns = UP, ifname = "up0" })
	t.is(sh("ip netns exec " .. UP .. " nft list ruleset"), "", "egress_disable after the VM namespace is gone")
	-- the kernel tears a deleted namespace's devices down in a work queue, after
	-- netns_delete returns: the veth's other end goes a moment later (bounded wait)
	local runtime = require "fireclaw.runtime"
	local deadline = runtime.now() + 5
	while sh("ip -n " .. UP .. " -br link"):find("fcv") and runtime.now() < deadline do runtime.sleep(0.02) end
	t.ok(not sh("ip -n " .. UP .. " -br link"):find("fcv"), "the veth went with the VM namespace")
	net.netns_delete(UP)
	t.ok(not exists("/run/netns/" .. NS), "netns_delete: file gone")
	t.ok(not sh("ip netns list"):find(PREFIX, 1, true), "netns_delete: ip netns list no longer shows them")
	t.is(own_netns(), original_ns, "the process ends in its own namespace")
end

local ok, err = pcall(body)
t.ok(ok, "tests ran to the end", err)
cleanup()
t.same(net.netns_list(PREFIX), {}, "cleanup: no test namespace left")
collectgarbage()
t.is(open_fds(), fds_before, "no file descriptor leaked")
return t.done()
