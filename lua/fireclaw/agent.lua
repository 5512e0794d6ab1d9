-- fireclaw.agent: the guest agent's channel from Lua (the C side: fireclaw.core.agent,
-- whose functions this module also has: attach, connect, wrap).
--
--   agent.attach_vm(id [, opts]) -> conn   a live VM, by id or record: from any process
--                                          (a kept VM's, another fireclaw's), through
--                                          the record: its run directory and ports
--   conn:exec(argv, opts), conn:put(l, r, opts), conn:get(r, l, opts), conn:batch{…},
--   conn:handoff(ns, entropy), conn:info(), conn:close()   (core/agent.c)
--
-- A QEMU VM has several ports (guest.AGENT_PORTS), one host socket each; a process takes
-- a free one with flock(2) on dir/agent-K.lock for as long as its connection lives, so up
-- to that many processes exec in one VM at once and the next one waits for a port.
local core = require "fireclaw.core.agent"
local opts_check = require "fireclaw.opts"
local state = require "fireclaw.state"

local M = setmetatable({}, { __index = core })

M.ATTACH_OPTIONS = { "timeout", "where" }

function M.attach_vm(id, opts)
	opts = opts_check.check("agent.attach_vm", opts, M.ATTACH_OPTIONS)
	local rec = type(id) == "table" and id or state.find(tostring(id))
	if not rec then error(string.format("agent: no live VM with id '%s' (see fireclaw ps)", tostring(id)), 0) end
	local ports = type(rec.agent) == "table" and tonumber(rec.agent.ports)
	if not ports then
		error(string.format("agent: VM %s has no agent channel (an image or snapshot without the agent: "
			.. "use SSH)", tostring(rec.id)), 0)
	end
	return core.attach { dir = rec.dir, ports = ports, timeout = opts.timeout or 10,
		where = opts.where or ("VM " .. tostring(rec.id)) }
end

return M
