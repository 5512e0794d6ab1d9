-- List live VMs: id, VMM pid, age, image, whether their fireclaw is alive, network mode and ports
local cli = require "fireclaw.cli"
local json = require "fireclaw.json"
local netpolicy = require "fireclaw.netpolicy"
local state = require "fireclaw.state"

-- "none", "nat", "nat+allow(2)" (fireclaw.netpolicy.describe)
local function net_mode(rec)
	local n = type(rec.net) == "table" and rec.net or {}
	return netpolicy.describe { mode = n.mode, allow = n.allow }
end

local function main(args)
	local o = cli.parse(args, { usage = "fireclaw ps [--json]", args = 0, { "--json", "print JSON" } })
	local rows = json.array()
	for _, rec in ipairs(state.list()) do
		local owner = rec.broken and "broken" or rec.keep and "kept" or state.owner_alive(rec) and "alive" or "gone (stale)"
		rows[#rows + 1] = {
			id = rec.id, netns = rec.netns, image = rec.image or "?", owner = owner,
			vmm = rec.vmm and rec.vmm.name or "-", vmm_pid = rec.vmm and rec.vmm.pid or json.null,
			vmm_alive = state.vmm_alive(rec), age_s = rec.created and os.time() - rec.created or json.null,
			net = net_mode(rec), ports = json.array(type(rec.net) == "table" and rec.net.publish or {}),
		}
	end
	if o.json then
		io.stdout:write(json.encode(rows), "\n")
		return 0
	end
	print(string.format("%-8s %-12s %-8s %-8s %-10s %-14s %-14s %s", "ID", "VMM", "PID", "AGE", "IMAGE", "OWNER",
		"NET", "PORTS"))
	for _, r in ipairs(rows) do
		local ports = {}
		for i, p in ipairs(r.ports) do
			local ip, hp, gp = p:match("^(.*):(%d+):(%d+)$")
			ports[i] = ip and (ip .. ":" .. hp .. "->" .. gp) or p
		end
		print(string.format("%-8s %-12s %-8s %-8s %-10s %-14s %-14s %s", r.id, r.vmm .. (r.vmm_alive and "" or " (dead)"),
			tostring(r.vmm_pid ~= json.null and r.vmm_pid or "-"),
			r.age_s ~= json.null and (r.age_s .. "s") or "-", r.image, r.owner, r.net,
			#ports > 0 and table.concat(ports, ",") or "-"))
	end
	return 0
end

return cli.recipe({}, main, ...)
