-- docs/lua-api.md against the code: every function a C module exports (enumerated at run
-- time from package.preload's fireclaw.core.* loaders, so a new module or a new function
-- is covered without editing this file), every function of a public Lua module (every
-- embedded top-level fireclaw.<name> module but the internal ones below), the sandbox's
-- methods and the steps list's must be named in docs/lua-api.md as `short.name` (`sb:name`,
-- `steps:name` for methods). Submodules (fireclaw.vmm.*, fireclaw.image.*) are the
-- implementation of their parent and are not checked. FIRECLAW_APIDOC names another file
-- to check (how the test itself is tested: a copy with a line removed must fail).
local t = require "tap"
local fs = require "fireclaw.fs"
local runtime = require "fireclaw.runtime"

-- Lua modules that are not an API for recipes, and why.
local INTERNAL = {
	["fireclaw.guest"] = "the guest side of image builds and of reseeding (fireclaw.image and sandbox use it)",
	["fireclaw.repl"] = "the REPL itself",
}

local path = os.getenv("FIRECLAW_APIDOC") or ((os.getenv("FIRECLAW_TESTS") or "tests") .. "/../docs/lua-api.md")
local doc = fs.read(path)
t.ok(doc, "read " .. path)
doc = doc or ""

local function quote(s) return (s:gsub("%p", "%%%0")) end

-- Is `short<sep>name` in the doc as a whole word (`net.link_up`, not `net.link_upper`)?
local function mentioned(short, sep, name)
	return doc:find("%f[%w_]" .. quote(short .. sep .. name) .. "%f[^%w_]") ~= nil
end

-- The names of t's functions that the doc does not mention, sorted.
local function missing(tbl, short, sep)
	local out = {}
	for k, v in pairs(tbl) do
		if type(k) == "string" and type(v) == "function" and not k:match("^_") and not mentioned(short, sep, k) then
			out[#out + 1] = short .. sep .. k
		end
	end
	table.sort(out)
	return out
end

local function check(name, tbl, short, sep)
	local m = missing(tbl, short, sep or ".")
	t.is(table.concat(m, " "), "", name .. ": every function is in docs/lua-api.md")
end

-- C modules
local cmods = {}
for name in pairs(package.preload) do
	local short = name:match("^fireclaw%.core%.([%w_]+)$")
	if short then cmods[#cmods + 1] = short end
end
table.sort(cmods)
t.ok(#cmods >= 9, "the C modules are found (" .. table.concat(cmods, " ") .. ")")
for _, short in ipairs(cmods) do
	check("fireclaw.core." .. short, require("fireclaw.core." .. short), short)
end

-- public Lua modules
local lmods = {}
for name in pairs(runtime.embedded("module")) do
	if name:match("^fireclaw%.[%w_]+$") and not INTERNAL[name] then lmods[#lmods + 1] = name end
end
table.sort(lmods)
t.ok(#lmods >= 10, "the Lua modules are found (" .. table.concat(lmods, " ") .. ")")
for _, name in ipairs(lmods) do
	local mod = require(name)
	if type(mod) == "table" then check(name, mod, name:match("([%w_]+)$")) end
end

-- methods of the objects recipes hold
local sandbox = require "fireclaw.sandbox"
check("sandbox methods", sandbox.Sandbox, "sb", ":")
check("steps list methods", getmetatable(sandbox.steps.list {}), "steps", ":")

-- the check itself: a name that is not there is reported
t.same(missing({ no_such_function_xyz = print }, "net", "."), { "net.no_such_function_xyz" },
	"a function the doc does not name is reported")
return t.done()
