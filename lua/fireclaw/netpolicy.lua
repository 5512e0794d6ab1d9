-- fireclaw.netpolicy: what a VM's network may do beyond its namespace (docs/security.md,
-- "Network policy"): nothing (mode "none", the default), the world through NAT ("nat"), or
-- only the hosts a list allows; and guest TCP ports published on the host.
--
--   local p = netpolicy.check{mode = "nat", allow = {"pypi.org", "*.pythonhosted.org:443",
--                             "10.1.0.0/16"}, publish = {"127.0.0.1:18080:8080", "8443:443"}}
--   netpolicy.apply(sb, p)   -- in sb:network(), after the namespace and its tap exist
--   netpolicy.reap(rec)      -- fireclaw.state.reap: what the record's `net` lists
--
-- nat/allow: a veth to the uplink (config.net.uplink_netns: the host's namespace unless
-- FIRECLAW_UPLINK_NETNS names another, as the tests do) with NAT (net.egress_enable, whose
-- table in the uplink also drops what the VM sends to the uplink's own addresses, to
-- link-local addresses and to other VMs' veths); a filter table in the VM's namespace;
-- dnsmasq in the VM's namespace on the tap's address as the guest's resolver. With an
-- allow list, the VM namespace's filter drops everything the guest sends out but to
-- the addresses and CIDRs listed and to the addresses dnsmasq learned answering for the
-- listed names (nftables sets it fills, --nftset); other names do not resolve (NXDOMAIN).
-- 169.254.0.0/16 stays blocked unless listed as an address. A name allows its subdomains
-- too (dnsmasq matches whole labels); "*.example.com" allows only the subdomains.
-- publish: a listening socket on the host's address (net.tcp_listen) handed to a
-- forwarder (`fireclaw --port-forward`) inside the VM's namespace.
-- Everything is in the VM's record before it exists: `rec.net` = {mode, allow, publish,
-- uplink, uplink_ifname, cidr, procs = {{role, pid, start}…}}.
local config = require "fireclaw.config"
local fault = require "fireclaw.fault"
local fs = require "fireclaw.fs"
local net = require "fireclaw.net"
local opts_check = require "fireclaw.opts"
local proc = require "fireclaw.proc"
local runtime = require "fireclaw.runtime"
local state = require "fireclaw.state"
local sys = require "fireclaw.sys"

local M = {}

M.OPTIONS = { "mode", "allow", "publish" }
M.MODES = { none = true, nat = true }
M.MAX_ALLOW = 256
M.MAX_PUBLISH = 32
M.TABLE = "fireclaw_policy" -- the filter table in the VM's namespace
M.VETH = "veth0"
local NOBODY = 65534 -- the forwarders' uid and gid (dnsmasq drops to nobody by itself)

-- ---- parsing (misuse and bad input raise one line) ----

local function octets(s)
	local a, b, c, d = s:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
	if not a then return nil end
	local o = { tonumber(a), tonumber(b), tonumber(c), tonumber(d) }
	for _, v in ipairs(o) do
		if v > 255 then return nil end
	end
	for _, part in ipairs { a, b, c, d } do
		if #part > 1 and part:sub(1, 1) == "0" then return nil end -- no octal lookalikes
	end
	return o
end

local function port(s, what)
	local n = s and s:match("^%d+$") and tonumber(s)
	if not n or n < 1 or n > 65535 then error(string.format("network: bad port '%s' in %s", tostring(s), what), 0) end
	return n
end

-- "HOST[:PORT]" -> {kind = "cidr"|"name", host =, port = n or nil, text =}
function M.parse_allow(s)
	if type(s) ~= "string" then error("network: allow entries are strings", 0) end
	local host, p = s:match("^(.-):(%d+)$")
	if not host then host = s end
	local e = { text = s, port = p and port(p, "allow '" .. s .. "'") or nil }
	local ip, bits = host:match("^([%d.]+)/(%d+)$")
	if octets(ip or host) then
		bits = bits and tonumber(bits) or 32
		if bits > 32 then error(string.format("network: bad prefix in allow '%s'", s), 0) end
		e.kind, e.host = "cidr", (ip or host) .. "/" .. bits
		return e
	end
	-- a DNS name: letters, digits, hyphens; labels of 1-63; "*." only in front
	local name = host:lower()
	local wild = name:match("^%*%.(.+)$")
	local bare = wild or name
	-- (a last label of digits only is a mistyped address, not a name: no TLD is numeric)
	local ok = #bare <= 253 and bare:find("%.") ~= nil and bare:match("^[a-z0-9.-]+$") ~= nil
		and bare:match("[a-z][a-z0-9-]*$") ~= nil
	for label in (bare .. "."):gmatch("([^.]*)%.") do
		if #label == 0 or #label > 63 or label:sub(1, 1) == "-" or label:sub(-1) == "-" then ok = false end
	end
	if not ok then
		error(string.format("network: cannot allow '%s': want a DNS name (example.com, *.example.com), an IPv4 "
			.. "address or CIDR, with an optional :PORT", s), 0)
	end
	e.kind, e.host, e.wild = "name", bare, wild ~= nil
	return e
end

-- "[HOSTIP:]HOSTPORT:GUESTPORT" -> {host_ip =, host_port =, guest_port =, text =}
function M.parse_publish(s)
	if type(s) ~= "string" then error("network: publish entries are strings", 0) end
	local ip, hp, gp = s:match("^([%d.]+):(%d+):(%d+)$")
	if not ip then
		hp, gp = s:match("^(%d+):(%d+)$")
		ip = "127.0.0.1"
	end
	if not hp then error(string.format("network: publish wants [HOSTIP:]HOSTPORT:GUESTPORT, got '%s'", s), 0) end
	if not octets(ip) then error(string.format("network: bad host address '%s' in publish '%s'", ip, s), 0) end
	local what = "publish '" .. s .. "'"
	return { host_ip = ip, host_port = port(hp, what), guest_port = port(gp, what),
		text = string.format("%s:%d:%d", ip, tonumber(hp), tonumber(gp)) }
end

-- A policy table ({mode =, allow =, publish =}, or nil for "none") checked and normalized:
-- {mode = "none"|"nat", allow = {entry…} or nil, publish = {entry…}}. An allow list
-- needs egress: it makes the mode "nat" unless "none" was asked for, which is an error.
-- default_mode: the mode when p has none (and no allow list): sandbox.new passes the
-- image's (manifest `net_mode`); config.net.mode (FIRECLAW_NET, a script) comes first.
function M.check(p, default_mode)
	if p == nil then p = {} end
	if type(p) ~= "table" then error("network: the policy is a table {mode =, allow =, publish =}", 0) end
	opts_check.check("sb:network", p, M.OPTIONS)
	local out = { mode = p.mode or config.net.mode or default_mode or "none", publish = {} }
	if not M.MODES[out.mode] then
		error(string.format("network: mode must be none or nat, got '%s'", tostring(out.mode)), 0)
	end
	if p.allow ~= nil then
		if type(p.allow) ~= "table" then error("network: allow is a list of HOST[:PORT]", 0) end
		if #p.allow > M.MAX_ALLOW then error("network: more than " .. M.MAX_ALLOW .. " allow entries", 0) end
		if #p.allow > 0 then
			if p.mode == "none" then error("network: an allow list needs egress: mode 'nat' (or no mode)", 0) end
			-- (a default of "none" from the config or the image does not stop an allow list)
			out.mode, out.allow = "nat", {}
			for i, s in ipairs(p.allow) do out.allow[i] = M.parse_allow(s) end
		end
	end
	if p.publish ~= nil then
		if type(p.publish) ~= "table" then error("network: publish is a list of [HOSTIP:]HOSTPORT:GUESTPORT", 0) end
		if #p.publish > M.MAX_PUBLISH then error("network: more than " .. M.MAX_PUBLISH .. " published ports", 0) end
		local seen = {}
		for i, s in ipairs(p.publish) do
			local e = M.parse_publish(s)
			local key = e.host_ip .. ":" .. e.host_port
			if seen[key] then error("network: host port " .. key .. " is published twice", 0) end
			seen[key] = true
			out.publish[i] = e
		end
	end
	return out
end

-- "nat", "nat+allow(3)", "none"; with ports: "… 127.0.0.1:18080->8080"
function M.describe(p)
	local s = p.mode or "none"
	if p.allow and #p.allow > 0 then s = s .. "+allow(" .. #p.allow .. ")" end
	return s
end

-- ---- the command line (run; any verb that makes a VM: append M.CLI to its cli.parse spec) ----

M.CLI = {
	{ "--net MODE", "network: none (no way out, the default) or nat (the outside world through the host's NAT)" },
	{ "--allow HOST[:PORT]", "egress only to this name (and its subdomains; *.NAME: only those), IPv4 address "
		.. "or CIDR; implies --net nat, everything else is dropped (repeatable)", multi = true },
	{ "-p, --publish [HOSTIP:]HOSTPORT:GUESTPORT", "publish a guest TCP port on the host (HOSTIP default "
		.. "127.0.0.1; repeatable)", multi = true },
}

-- The policy table (sandbox.new's `net`) from parsed M.CLI options, checked: nil and the
-- reason (for cli.usage_error) when it is bad.
function M.from_cli(o)
	if o.net and not M.MODES[o.net] then return nil, string.format("--net must be none or nat, got '%s'", o.net) end
	local p = { mode = o.net, allow = o.allow and #o.allow > 0 and o.allow or nil, publish = o.publish }
	local ok, err = pcall(M.check, p)
	if not ok then return nil, (tostring(err):gsub("^network: ", "")) end
	return p
end

-- ---- the pieces ----

-- The upstream resolvers dnsmasq forwards to: config.net.dns (FIRECLAW_DNS, comma
-- separated), else the nameservers of the host's /etc/resolv.conf that a namespace can
-- reach (not loopback: a resolver on 127.0.0.53 answers only inside the host's namespace).
function M.upstreams()
	local list = {}
	local want = config.net.dns
	if want and want ~= "" then
		for ip in want:gmatch("[^,%s]+") do
			if not octets(ip) then error("network: FIRECLAW_DNS: bad IPv4 address '" .. ip .. "'", 0) end
			if ip:match("^127%.") then
				error("network: FIRECLAW_DNS: " .. ip .. " is loopback, which inside a VM's namespace is the "
					.. "namespace's own; give a resolver's network address", 0)
			end
			list[#list + 1] = ip
		end
		return list
	end
	for line in (fs.read("/etc/resolv.conf") or ""):gmatch("[^\n]+") do
		local ip = line:match("^%s*nameserver%s+([%d.]+)%s*$")
		if ip and octets(ip) and not ip:match("^127%.") then list[#list + 1] = ip end
	end
	if #list == 0 then
		error("network: no upstream DNS server: /etc/resolv.conf names none a VM can reach (loopback resolvers "
			.. "are the host's own); set FIRECLAW_DNS=IP", 0)
	end
	return list
end

-- The VM's /30 between its veth and the uplink: one of 2^20 in 100.64.0.0/10 (shared
-- address space), from its id, so that VMs sharing an uplink do not share addresses.
function M.cidr(id)
	local n = (tonumber(id, 16) or 0) % 2 ^ 20
	local v = 100 * 2 ^ 24 + 64 * 2 ^ 16 + n * 4
	return string.format("%d.%d.%d.%d/30", math.floor(v / 2 ^ 24) % 256, math.floor(v / 2 ^ 16) % 256,
		math.floor(v / 2 ^ 8) % 256, v % 256)
end

function M.uplink_ifname(id) return "fcv" .. id end

local function l4(p) return p and string.format("meta l4proto { tcp, udp } th dport %d ", p) or "" end

-- The dnsmasq set an entry's answers go to: one set per port (or none).
local function set_name(p) return p and "dns_p" .. p or "dns_any" end

-- The VM namespace's filter: established traffic back, the listed addresses, then
-- link-local dropped, then (allow list) the learned addresses, else everything.
function M.filter_script(p)
	local tap, out = config.net.tap, M.VETH
	local sets, rules = {}, {}
	local from = string.format('iifname "%s" oifname "%s" ', tap, out)
	if p.allow then
		for _, e in ipairs(p.allow) do
			if e.kind == "cidr" then
				rules[#rules + 1] = from .. "ip daddr " .. e.host .. " " .. l4(e.port) .. "accept"
			end
		end
	end
	rules[#rules + 1] = string.format('iifname "%s" ip daddr 169.254.0.0/16 drop', tap)
	if p.allow then
		for _, e in ipairs(p.allow) do
			if e.kind == "name" and not sets[set_name(e.port)] then
				sets[set_name(e.port)] = true
				sets[#sets + 1] = set_name(e.port)
				rules[#rules + 1] = from .. "ip daddr @" .. set_name(e.port) .. " " .. l4(e.port) .. "accept"
			end
		end
	else
		rules[#rules + 1] = from .. "accept"
	end
	local lines = { "add table ip " .. M.TABLE, "delete table ip " .. M.TABLE, "table ip " .. M.TABLE .. " {" }
	for _, s in ipairs(sets) do lines[#lines + 1] = "  set " .. s .. " { type ipv4_addr; }" end
	lines[#lines + 1] = "  chain forward {"
	lines[#lines + 1] = "    type filter hook forward priority 0; policy drop;"
	lines[#lines + 1] = "    ct state established,related accept"
	for _, r in ipairs(rules) do lines[#lines + 1] = "    " .. r end
	lines[#lines + 1] = "  }"
	lines[#lines + 1] = "}"
	return table.concat(lines, "\n") .. "\n"
end

-- What the uplink accepts from this VM for itself: the addresses the user listed (named
-- explicitly, they are reachable even when they are the host's own) and the resolvers.
local function host_accept(p, ups)
	local list = {}
	for _, ip in ipairs(ups) do list[#list + 1] = "ip daddr " .. ip .. " meta l4proto { tcp, udp } th dport 53" end
	for _, e in ipairs(p.allow or {}) do
		if e.kind == "cidr" then list[#list + 1] = ("ip daddr " .. e.host .. " " .. l4(e.port)):gsub("%s+$", "") end
	end
	return list
end

-- dnsmasq's command line: on the tap's address, no cache (every answer is fresh and
-- fills the sets again), nothing read from the host's files.
function M.dnsmasq_argv(p, ups, dir)
	local argv = { "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
		"--no-poll", "--cache-size=0", "--bind-interfaces", "--listen-address=" .. config.net.host_ip,
		"--log-facility=-", "--pid-file=" .. dir .. "/dnsmasq.pid" }
	if not p.allow then
		for _, ip in ipairs(ups) do argv[#argv + 1] = "--server=" .. ip end
		return argv
	end
	argv[#argv + 1] = "--address=/#/" -- every name not listed: NXDOMAIN
	for _, e in ipairs(p.allow) do
		if e.kind == "name" then
			local pat = (e.wild and "*." or "") .. e.host
			for _, ip in ipairs(ups) do argv[#argv + 1] = "--server=/" .. pat .. "/" .. ip end
			argv[#argv + 1] = "--nftset=/" .. pat .. "/4#ip#" .. M.TABLE .. "#" .. set_name(e.port)
		end
	end
	return argv
end

local function dnsmasq_path()
	for _, p in ipairs { "/usr/sbin/dnsmasq", "/sbin/dnsmasq" } do
		if fs.exists(p) then return p end
	end
	error("network: dnsmasq not found (install the Debian package dnsmasq-base)", 0)
end

-- A helper process in the VM's namespace, in the record the moment it exists.
local function spawn(sb, role, spec)
	spec.netns, spec.pdeathsig, spec.setsid = sb.netns, not sb.keep, sb.keep or nil
	spec.stdin = "/dev/null"
	-- what it says (dnsmasq's warnings a guest may provoke) is capped like a console
	spec.stdout, spec.stderr = { log = sb.dir .. "/net.log" }, { log = sb.dir .. "/net.log" }
	spec.log_cap = config.log_cap
	local p = proc.spawn(spec)
	sb.net_procs[#sb.net_procs + 1] = p
	local n = sb.rec.net
	n.procs[#n.procs + 1] = { role = role, pid = p:pid(), start = proc.starttime(p:pid()) }
	local sink = p:sink_pid()
	if sink then n.procs[#n.procs + 1] = { role = role .. " log sink", pid = sink, start = proc.starttime(sink) } end
	state.update(sb.rec, { net = n })
	return p
end

-- Wait (bounded) until dnsmasq answers on the tap's address: a guest that asks before it
-- binds would get "connection refused" from its resolver.
local function wait_resolver(sb, p)
	local deadline = runtime.now() + 5
	while not net.probe(sb.netns, config.net.host_ip, 53, 20) do
		if not p:alive() then
			local log = (fs.read(sb.dir .. "/net.log") or ""):match("([^\n]*)\n*$") or ""
			error(string.format("network: VM %s: dnsmasq exited at once: %s", sb.id, log:sub(1, 200)), 0)
		end
		if runtime.now() > deadline then error("network: VM " .. sb.id .. ": dnsmasq does not answer", 0) end
		runtime.sleep(0.005)
	end
end

local function egress(sb, p)
	local ups = M.upstreams()
	local n = sb.rec.net
	net.egress_enable(sb.netns, { uplink_netns = n.uplink ~= "" and n.uplink or nil, ifname = M.VETH,
		uplink_ifname = n.uplink_ifname, cidr = n.cidr, host_accept = host_accept(p, ups) })
	fault.point("egress")
	net.nft(sb.netns, M.filter_script(p))
	local argv = M.dnsmasq_argv(p, ups, sb.dir)
	argv[1] = dnsmasq_path()
	local d = spawn(sb, "dns", { argv = argv })
	fault.point("resolver")
	wait_resolver(sb, d)
end

local function publish(sb, p)
	for _, e in ipairs(p.publish) do
		local sock = net.tcp_listen(e.host_ip, e.host_port)
		local ok, err = pcall(spawn, sb, "publish " .. e.text, {
			argv = { "/proc/self/exe", "--port-forward", config.net.guest_ip, tostring(e.guest_port), sb.dir },
			fds = { sock:fd() }, uid = NOBODY, gid = NOBODY, groups = {} }) -- it needs no privilege
		sock:close() -- the forwarder has its copy
		if not ok then error(err, 0) end
	end
	if #p.publish > 0 then fault.point("publish") end
end

-- The entries as the user wrote them (normalized), for the record and `fireclaw ps`.
local function texts(list)
	local out = {}
	for i, e in ipairs(list or {}) do out[i] = e.text end
	return out
end

-- Make the policy real for sandbox sb (its namespace and tap exist). The record lists
-- everything first; sb's cleanup stack gets the undo (the namespace's own undo takes the
-- veth and the VM-side tables with it).
function M.apply(sb, p)
	sb.net_procs = sb.net_procs or {}
	local uplink = config.net.uplink_netns or ""
	state.update(sb.rec, { net = {
		mode = p.mode, uplink = uplink, uplink_ifname = M.uplink_ifname(sb.id), cidr = M.cidr(sb.id),
		allow = texts(p.allow), publish = texts(p.publish), procs = {},
	} })
	sb:on_destroy("network policy", function() M.reap(sb.rec) end)
	if p.mode == "nat" then egress(sb, p) end
	publish(sb, p)
end

-- The processes inside network namespace `netns` (its nsfs inode, compared with each
-- /proc/PID/ns/net): {{pid =, start =}…}, none when the namespace is gone.
function M.netns_pids(netns)
	local ns = netns and sys.stat("/run/netns/" .. netns)
	if not ns then return {} end
	local out = {}
	for _, e in ipairs(runtime.listdir("/proc") or {}) do
		local pid = tonumber(e:match("^%d+$"))
		local st = pid and pid ~= proc.getpid() and sys.stat("/proc/" .. e .. "/ns/net")
		if st and st.ino == ns.ino and st.dev == ns.dev then
			local start = proc.starttime(pid)
			if start then out[#out + 1] = { pid = pid, start = start } end
		end
	end
	return out
end

-- Undo what rec.net lists: its processes (pid + start time) and the uplink's table; the
-- caller then deletes the VM's namespace, which takes the veth. Safe twice, and on a record
-- whose VM never got that far. Returns what was done.
function M.reap(rec)
	local done = {}
	local n = rec.net
	if type(n) ~= "table" then return done end
	for _, pr in ipairs(n.procs or {}) do
		if pr.pid and pr.start and proc.kill(pr.pid, pr.start, 9, 2) then
			done[#done + 1] = "killed " .. tostring(pr.role) .. " " .. pr.pid
		end
	end
	-- a helper spawned but not yet in the record (fireclaw killed in between; a kept VM's
	-- has no parent-death signal): whatever still runs inside this VM's own namespace
	for _, pr in ipairs(M.netns_pids(rec.netns)) do
		if proc.kill(pr.pid, pr.start, 9, 2) then done[#done + 1] = "killed " .. pr.pid .. " (in " .. rec.netns .. ")" end
	end
	if n.mode == "nat" and n.uplink_ifname then
		local up = n.uplink ~= "" and n.uplink or nil
		if up == nil or net.netns_exists(up) then
			-- the uplink's table only: the veth (both ends) and the VM's own tables go with
			-- the VM's namespace, which the caller deletes next (each table removed by hand
			-- costs the kernel a hook unregistration, ~10 ms)
			if not tostring(n.uplink_ifname):match("^fcv%x+$") then
				error("network: record of VM " .. tostring(rec.id) .. ": bad uplink_ifname", 0)
			end
			local t = "fireclaw_" .. n.uplink_ifname
			net.nft(up, "add table ip " .. t .. "\ndelete table ip " .. t .. "\n")
			done[#done + 1] = "removed the uplink's table " .. t
		end
	end
	return done
end

return M
