-- Benchmark helper: `fireclaw run` with fireclaw's own CPU time taken at every stage
--
--   FCB_STAGECPU_OUT=FILE fireclaw bench/stagecpu.lua [run options] -- CMD [ARGS…]
-- runs the built-in `run` recipe unchanged, but wraps fireclaw.log's stage timer so that each
-- stage also records its CPU time (CLOCK_PROCESS_CPUTIME_ID: this process only: the VMM and helpers are
-- children, not counted). Appends one JSON line to FILE:
--   {"start": cpu_ms at script start (process start-up), "stages": [{name, cpu_ms, ms}…],
--    "before": cpu_ms from script start to the first stage's start (before_ms: wall),
--    "after": cpu_ms from the last stage to the end of the recipe (after_ms: wall)}
local json = require "fireclaw.json"
local log = require "fireclaw.log"
local runtime = require "fireclaw.runtime"
local sys = require "fireclaw.sys"

local function cpu_ms()
	local sec, nsec = sys.clock_gettime(sys.CLOCK.PROCESS_CPUTIME_ID)
	return sec * 1e3 + nsec / 1e6
end

local t_start, w_start = cpu_ms(), runtime.now()
local first, last, w_first, w_last
local stages = {}
local orig = log.timer
log.timer = function(...)
	local t = orig(...)
	if not first then first, w_first = cpu_ms(), runtime.now() end
	last, w_last = first, w_first
	local stage = t.stage
	function t:stage(name, ...)
		local ms = stage(self, name, ...)
		local now = cpu_ms()
		stages[#stages + 1] = { name = name, cpu_ms = now - last, ms = ms }
		last, w_last = now, runtime.now()
		return ms
	end
	return t
end

local chunk = runtime.load_recipe("run")
local status = chunk(...)
local t_end, w_end = cpu_ms(), runtime.now()
local out = os.getenv("FCB_STAGECPU_OUT")
if out then
	local f = assert(io.open(out, "a"))
	f:write(json.encode { start = t_start, before = (first or t_end) - t_start, stages = stages,
		after = t_end - (last or t_end), before_ms = ((w_first or w_end) - w_start) * 1e3,
		after_ms = (w_end - (w_last or w_end)) * 1e3 }, "\n")
	f:close()
end
return status
