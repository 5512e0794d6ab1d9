-- List live VMs: id, VMM pid, age, image, whether their fireclaw is alive
local cli = require "fireclaw.cli"
local json = require "fireclaw.json"
local state = require "fireclaw.state"

local function main(args)
	local o = cli.parse(args, { usage = "fireclaw ps [--json]", args = 0, { "--json", "print JSON" } })
	local rows = json.array()
	for _, rec in ipairs(state.list()) do
		local owner = rec.broken and "broken" or rec.keep and "kept" or state.owner_alive(rec) and "alive" or "gone (stale)"
		rows[#rows + 1] = {
			id = rec.id, netns = rec.netns, image = rec.image or "?", owner = owner,
			vmm = rec.vmm and rec.vmm.name or "-", vmm_pid = rec.vmm and rec.vmm.pid or json.null,
			vmm_alive = state.vmm_alive(rec), age_s = rec.created and os.time() - rec.created or json.null,
		}
	end
	if o.json then
		io.stdout:write(json.encode(rows), "\n")
		return 0
	end
	print(string.format("%-8s %-12s %-8s %-8s %-10s %s", "ID", "VMM", "PID", "AGE", "IMAGE", "OWNER"))
	for _, r in ipairs(rows) do
		print(string.format("%-8s %-12s %-8s %-8s %-10s %s", r.id, r.vmm .. (r.vmm_alive and "" or " (dead)"),
			tostring(r.vmm_pid ~= json.null and r.vmm_pid or "-"),
			r.age_s ~= json.null and (r.age_s .. "s") or "-", r.image, r.owner))
	end
	return 0
end

return cli.recipe({}, main, ...)
