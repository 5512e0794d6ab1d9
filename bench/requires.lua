-- Benchmark helper: which Lua modules `fireclaw run` loads, and the CPU each costs
--
--   fireclaw bench/requires.lua [run options] -- CMD [ARGS…]
-- runs the built-in `run` recipe unchanged, with `require` wrapped so that every module
-- loaded for the first time is timed (CLOCK_PROCESS_CPUTIME_ID), then prints to stderr one
-- line per module in load order, indented by nesting: its own CPU (without the modules it
-- required) and its inclusive CPU in ms; and the totals. A module a run loads but never
-- uses is a candidate for loading on first use (docs/DECISIONS.md: fireclaw.image's build).
-- The modules main.c loads before the script (fireclaw.runtime, fireclaw.sys …) are not seen.
local runtime = require "fireclaw.runtime"
local sys = require "fireclaw.sys"

local function cpu_ms()
	local sec, nsec = sys.clock_gettime(sys.CLOCK.PROCESS_CPUTIME_ID)
	return sec * 1e3 + nsec / 1e6
end

local orig, loaded = require, package.loaded
local rows, depth, inner = {}, 0, { 0 }
local function timed_require(name)
	if loaded[name] ~= nil then return loaded[name] end
	depth = depth + 1
	inner[depth + 1] = 0
	local row = { name = name, depth = depth }
	rows[#rows + 1] = row
	local t0 = cpu_ms()
	local m = orig(name)
	row.incl = cpu_ms() - t0
	row.self = row.incl - inner[depth + 1]
	depth = depth - 1
	inner[depth + 1] = inner[depth + 1] + row.incl
	return m
end
rawset(_G, "require", timed_require)

local t0 = cpu_ms()
local ok, status = pcall(runtime.load_recipe("run"), ...)
local total = cpu_ms() - t0
rawset(_G, "require", orig)

local sum = 0
for _, r in ipairs(rows) do
	sum = sum + r.self
	io.stderr:write(string.format("%-44s self %6.3f  incl %6.3f\n", string.rep("  ", r.depth - 1) .. r.name,
		r.self, r.incl))
end
io.stderr:write(string.format("%d modules, %.3f ms of CPU loading them; the recipe %.3f ms; start-up before the script %.3f ms\n",
	#rows, sum, total, t0))
if not ok then error(status, 0) end
return status
