-- List VMs: id, name, state, age, time to live, image, VMM, network mode and ports (--json: all of it)
local cli = require "fireclaw.cli"
local json = require "fireclaw.json"
local netpolicy = require "fireclaw.netpolicy"
local state = require "fireclaw.state"

-- "none", "nat", "nat+allow(2)" (fireclaw.netpolicy.describe)
local function net_mode(rec)
	local n = type(rec.net) == "table" and rec.net or {}
	return netpolicy.describe { mode = n.mode, allow = n.allow }
end

local function age(s)
	if s == json.null or s == nil then return "-" end
	if s < 120 then return s .. "s" end
	if s < 7200 then return math.floor(s / 60) .. "m" end
	return math.floor(s / 3600) .. "h"
end

local function main(args)
	local o = cli.parse(args, { usage = "fireclaw ps [--json]", args = 0, { "--json", "print JSON" } })
	state.reap_expired() -- expired VMs go first
	local rows = json.array()
	local now = os.time()
	for _, rec in ipairs(state.list()) do
		local owner = rec.broken and "broken" or rec.keep and "kept" or state.owner_alive(rec) and "alive" or "gone (stale)"
		rows[#rows + 1] = {
			id = rec.id, name = rec.name or json.null, state = state.status(rec), netns = rec.netns,
			image = rec.image or "?", owner = owner,
			vmm = rec.vmm and rec.vmm.name or (rec.vmspec and rec.vmspec.vmm) or "-",
			vmm_pid = rec.vmm and rec.vmm.pid or json.null,
			vmm_alive = state.vmm_alive(rec), age_s = rec.created and now - rec.created or json.null,
			expires = rec.expires or json.null, ttl_left_s = rec.expires and math.max(0, rec.expires - now) or json.null,
			net = net_mode(rec), ports = json.array(type(rec.net) == "table" and rec.net.publish or {}),
		}
	end
	if o.json then
		io.stdout:write(json.encode(rows), "\n")
		return 0
	end
	print(string.format("%-8s %-16s %-9s %-6s %-6s %-10s %-8s %-12s %-14s %s", "ID", "NAME", "STATE", "AGE", "TTL",
		"IMAGE", "PID", "OWNER", "NET", "PORTS"))
	for _, r in ipairs(rows) do
		local ports = {}
		for i, p in ipairs(r.ports) do
			local ip, hp, gp = p:match("^(.*):(%d+):(%d+)$")
			ports[i] = ip and (ip .. ":" .. hp .. "->" .. gp) or p
		end
		print(string.format("%-8s %-16s %-9s %-6s %-6s %-10s %-8s %-12s %-14s %s", r.id,
			r.name ~= json.null and r.name or "-", r.state, age(r.age_s), age(r.ttl_left_s), r.image,
			tostring(r.vmm_pid ~= json.null and r.vmm_pid or "-"), r.owner, r.net,
			#ports > 0 and table.concat(ports, ",") or "-"))
	end
	return 0
end

return cli.recipe({}, main, ...)
