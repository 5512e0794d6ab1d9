-- fireclaw.opts: the check every public function taking an options table makes, so that a
-- misspelt key fails loudly instead of being ignored:
--
--   local opts = require "fireclaw.opts"
--   function M.new(o)
--     o = opts.check("sandbox.new", o, M.OPTIONS)  -- M.OPTIONS = {"image", "vcpu", …}
--
-- raises "sandbox.new: unknown option 'vcpus' (did you mean 'vcpu'?)". Several lists may
-- be given (opts.check(where, o, A, B)): a key in any of them is known.
local M = {}

-- Edit distance between two short strings, a swap of neighbours counting as one edit
-- ("nmae" is one typo away from "name").
local function distance(a, b)
	local d = {}
	for i = 0, #a do d[i] = { [0] = i } end
	for j = 0, #b do d[0][j] = j end
	for i = 1, #a do
		for j = 1, #b do
			local cost = a:byte(i) == b:byte(j) and 0 or 1
			d[i][j] = math.min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost)
			if i > 1 and j > 1 and a:byte(i) == b:byte(j - 1) and a:byte(i - 1) == b:byte(j) then
				d[i][j] = math.min(d[i][j], d[i - 2][j - 2] + 1)
			end
		end
	end
	return d[#a][#b]
end

-- The known key closest to `key`, if it is close enough to be a typo.
function M.suggest(key, known)
	local lkey = key:lower()
	-- ties go to the longer common prefix ("vcpus": "vcpu", not "cpus"), then the alphabet
	local function prefix(k)
		local n = 0
		while n < #k and n < #lkey and k:byte(n + 1) == lkey:byte(n + 1) do n = n + 1 end
		return n
	end
	local best, bestd, bestp
	for _, k in ipairs(known) do
		local d, p = distance(lkey, k:lower()), prefix(k:lower())
		if not bestd or d < bestd or (d == bestd and (p > bestp or (p == bestp and k < best))) then
			best, bestd, bestp = k, d, p
		end
	end
	if best and bestd <= math.max(1, math.floor(#key / 3)) then return best end
	-- "mem" for "mem_mib", "timeout" for "boot_timeout": a word of the key
	for _, k in ipairs(known) do
		local lk = k:lower()
		if #lkey >= 3 and (lk:find(lkey, 1, true) == 1 or lk:sub(-#lkey - 1) == "_" .. lkey) then return k end
	end
	return nil
end

-- Check that every key of options table `t` (nil means {}) is one of the known names;
-- returns the table (a new empty one for nil).
function M.check(where, t, ...)
	if t == nil then return {} end
	if type(t) ~= "table" then
		error(string.format("%s: options must be a table, got %s", where, type(t)), 0)
	end
	local known, set = {}, {}
	for i = 1, select("#", ...) do
		for _, k in ipairs((select(i, ...))) do
			if not set[k] then
				set[k] = true
				known[#known + 1] = k
			end
		end
	end
	for k in pairs(t) do
		if not set[k] then
			local name = type(k) == "string" and k or tostring(k)
			local hint = type(k) == "string" and M.suggest(k, known)
			error(string.format("%s: unknown option '%s' (%s)", where, name,
				hint and string.format("did you mean '%s'?", hint) or "known: " .. table.concat(known, ", ")), 0)
		end
	end
	return t
end

return M
