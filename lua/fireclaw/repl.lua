-- fireclaw.repl: what the REPL (and a script piped to fireclaw) needs from Lua — the
-- module globals and a value printer.
local M = {}

-- The globals: fireclaw.<name> for each, loaded on first use. README and the REPL's
-- banner list them from here.
M.GLOBALS = { "sandbox", "cli", "vm", "net", "rootfs", "snapshot", "image", "ssh", "state", "proc",
	"json", "fs", "config", "runtime" }

local MODULES = {}
for _, name in ipairs(M.GLOBALS) do MODULES[name] = true end

-- Install the globals; returns their names, space-separated (for the banner).
function M.setup()
	setmetatable(_G, {
		__index = function(_, name)
			if MODULES[name] then
				local mod = require("fireclaw." .. name) -- a module that fails to load says why
				rawset(_G, name, mod)
				return mod
			end
			return nil
		end,
	})
	return table.concat(M.GLOBALS, " ")
end

local MAX_ITEMS, MAX_DEPTH = 50, 6

local ESCAPES = { ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t", ['"'] = '\\"', ["\\"] = "\\\\" }

-- A string as a Lua literal on one line: newlines and other control bytes escaped (%q
-- would keep a newline as a backslash and a real line break).
function M.quote(s)
	return '"' .. s:gsub('[%c"\\\127]', function(c) return ESCAPES[c] or string.format("\\%03d", c:byte()) end) .. '"'
end

local function key_repr(k)
	if type(k) == "string" and k:match("^[%a_][%w_]*$") then return k end
	return "[" .. (type(k) == "string" and M.quote(k) or tostring(k)) .. "]"
end

-- Pretty-print a value: nested tables indented, cycles marked, long tables elided.
function M.format(v, indent, seen, depth)
	indent, seen, depth = indent or "", seen or {}, depth or 0
	if type(v) == "string" then return M.quote(v) end
	if type(v) ~= "table" then return tostring(v) end
	if seen[v] then return "<cycle: " .. tostring(v) .. ">" end
	if depth >= MAX_DEPTH then return "{…}" end
	seen[v] = true
	local keys, n = {}, #v
	for k in pairs(v) do
		if not (type(k) == "number" and k >= 1 and k <= n and k % 1 == 0) then keys[#keys + 1] = k end
	end
	table.sort(keys, function(a, b)
		if type(a) == type(b) and (type(a) == "string" or type(a) == "number") then return a < b end
		return type(a) < type(b)
	end)
	local items, inner, count = {}, indent .. "  ", 0
	for i = 1, n do
		count = count + 1
		if count > MAX_ITEMS then break end
		items[#items + 1] = inner .. M.format(v[i], inner, seen, depth + 1)
	end
	for _, k in ipairs(keys) do
		count = count + 1
		if count > MAX_ITEMS then break end
		items[#items + 1] = inner .. key_repr(k) .. " = " .. M.format(v[k], inner, seen, depth + 1)
	end
	local total = n + #keys
	if total > MAX_ITEMS then
		items[#items + 1] = inner .. string.format("… (%d more)", total - MAX_ITEMS)
	end
	seen[v] = nil
	if #items == 0 then return "{}" end
	return "{\n" .. table.concat(items, ",\n") .. "\n" .. indent .. "}"
end

function M.show(...)
	local n = select("#", ...)
	if n == 0 then return end
	local out = {}
	for i = 1, n do out[i] = M.format((select(i, ...))) end
	io.stdout:write(table.concat(out, "\t"), "\n")
	io.stdout:flush()
end

return M
