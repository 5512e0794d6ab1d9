-- fireclaw.log: progress lines on stderr ("[fireclaw] VM 1a2b3c: restoring… 41 ms").
-- Shown with -v (runtime.verbose); notes are shown unless -q; errors always go through
-- the CLI. Every line carries the time since the previous step of the same timer.
local runtime = require "fireclaw.runtime"

local M = {}

local function emit(prefix, fmt, ...)
	io.stdout:flush() -- what was printed before comes before, also when both go to one file
	io.stderr:write("[fireclaw] ", prefix, string.format(fmt, ...), "\n")
	io.stderr:flush()
end

-- A one-line note the user should see (e.g. "snapshot is stale, cold booting").
function M.note(fmt, ...)
	if not runtime.quiet then emit("", fmt, ...) end
end

-- A progress line, only with -v.
function M.info(fmt, ...)
	if runtime.verbose then emit("", fmt, ...) end
end

-- A stage timer: t:stage("network") records the time since the previous stage; the list
-- of {name, ms} is kept for --json and the benchmark; with -v each stage is printed.
function M.timer(label)
	local t = { label = label, start = runtime.now(), stages = {} }
	t.last = t.start
	function t:stage(name)
		local now = runtime.now()
		local ms = (now - self.last) * 1000
		self.stages[#self.stages + 1] = { name = name, ms = ms }
		self.last = now
		if runtime.verbose then emit(self.label and (self.label .. ": ") or "", "%s %.1f ms", name, ms) end
		return ms
	end
	function t:total_ms() return (runtime.now() - self.start) * 1000 end
	return t
end

return M
