-- fireclaw.cli: the command line for recipes — option parsing, usage errors, --help.
--
--   local opts, rest = cli.parse(arg, {
--     usage = "fireclaw run [options] -- CMD [ARGS…]",
--     about = "Run a command in a throw-away microVM.",
--     { "--vcpu N", "number of vCPUs", type = "number", default = 1 },
--     { "-v, --verbose", "progress lines on stderr" },
--     { "--put LOCAL:REMOTE", "copy a file in (repeatable)", multi = true },
--   })
--
-- Options stop at "--" or at the first argument that is not an option; the rest is
-- returned as a list. `--name=value` and `--name value` both work. An unknown option or
-- a bad value raises a usage error (exit status 2); --help prints the usage (exit 0).
-- spec.args = N: at most N arguments may follow the options (0: none), more is a usage
-- error; without it the rest is the recipe's to check.
local runtime = require "fireclaw.runtime"

local M = {}

-- An error the CLI reports as one line with exit status 2.
function M.usage_error(msg, ...)
	error(setmetatable({ message = string.format(msg, ...), exit = 2 },
		{ __tostring = function(e) return e.message end }), 0)
end

-- A clean exit with a status and nothing more to say (used by --help).
function M.exit(status)
	error(setmetatable({ exit = status }, { __tostring = function() return "exit" end }), 0)
end

local function parse_spec(spec)
	local byname, list = {}, {}
	for _, o in ipairs(spec) do
		local names, metavar = o[1]:match("^([^ ]+, [^ ]+)%s*(.*)$")
		if not names then names, metavar = o[1]:match("^([^ ]+)%s*(.*)$") end
		local opt = { help = o[2], metavar = metavar ~= "" and metavar or nil, type = o.type,
			default = o.default, multi = o.multi, flags = o[1] }
		for name in names:gmatch("[^, ]+") do
			byname[name] = opt
			if name:sub(1, 2) == "--" then opt.key = name:sub(3):gsub("-", "_") end
		end
		opt.key = opt.key or names:match("^%-(%w)")
		list[#list + 1] = opt
	end
	return byname, list
end

function M.usage(spec)
	local _, list = parse_spec(spec)
	local out = { "usage: " .. spec.usage }
	if spec.about then out[#out + 1] = "\n" .. spec.about end
	if #list > 0 then out[#out + 1] = "\noptions:" end
	for _, o in ipairs(list) do
		local def = o.default ~= nil and string.format(" (default %s)", tostring(o.default)) or ""
		out[#out + 1] = string.format("  %-26s %s%s", o.flags, o.help, def)
	end
	out[#out + 1] = string.format("  %-26s %s", "-h, --help", "show this help")
	return table.concat(out, "\n") .. "\n"
end

local function convert(opt, name, value)
	if opt.type == "number" then
		local n = tonumber(value)
		if not n or n ~= n then M.usage_error("option %s wants a number, got '%s'", name, value) end
		return n
	end
	return value
end

-- The command a usage line is about: its leading lowercase words ("fireclaw snapshot list").
local function command_of(usage)
	local words = {}
	for w in usage:gmatch("%S+") do
		if not w:match("^%l[%l%d_-]*$") then break end
		words[#words + 1] = w
	end
	return #words > 0 and table.concat(words, " ") or "fireclaw"
end

function M.parse(args, spec)
	local byname = parse_spec(spec)
	local opts, rest = {}, {}
	for _, o in pairs(byname) do
		if opts[o.key] == nil then
			if o.multi then opts[o.key] = {} else opts[o.key] = o.default end
		end
	end
	local i, n = 1, #args
	while i <= n do
		local a = args[i]
		if a == "--" then
			i = i + 1
			break
		elseif (a == "-q" or a == "--quiet") and not byname[a] then
			runtime.quiet = true -- global options work after the recipe name too
		elseif (a == "-v" or a == "--verbose") and not byname[a] then
			runtime.verbose = true
		elseif a == "-h" or a == "--help" then
			io.stdout:write(M.usage(spec))
			M.exit(0)
		elseif a:sub(1, 1) == "-" and a ~= "-" then
			local name, value = a:match("^(%-%-[^=]+)=(.*)$")
			name = name or a
			local o = byname[name]
			if not o then M.usage_error("unknown option '%s' (see '%s --help')", name, command_of(spec.usage)) end
			if o.metavar then
				if not value then
					i = i + 1
					value = args[i]
					-- "--image -- true" or "--image --vcpu 2": the value was forgotten
					if value == nil or value == "--" or byname[value] then
						M.usage_error("option %s needs a value (%s)", name, o.metavar)
					end
				end
				value = convert(o, name, value)
			else
				if value then M.usage_error("option %s takes no value", name) end
				value = true
			end
			if o.multi then table.insert(opts[o.key], value) else opts[o.key] = value end
		else
			break
		end
		i = i + 1
	end
	for j = i, n do rest[#rest + 1] = args[j] end
	if spec.args and #rest > spec.args then
		M.usage_error("unexpected argument '%s' (usage: %s)", rest[spec.args + 1], spec.usage)
	end
	if opts.verbose then runtime.verbose = true end
	return opts, rest
end

-- For a recipe on one VM ("fireclaw pause ID|NAME"): cli.parse with spec (at most one
-- argument), and a usage error if the VM is missing. Returns opts and the id or name.
function M.parse_vm(args, spec)
	spec.args = 1
	local opts, rest = M.parse(args, spec)
	if not rest[1] then
		M.usage_error("%s needs a VM id or name (see fireclaw ps)", (command_of(spec.usage):gsub("^fireclaw ", "")))
	end
	return opts, rest[1]
end

-- For a recipe on a list of VMs (rm, stop): fn(rec) for each id or name state.find
-- knows; an unknown one is said on stderr (missing: the line, %s the id). Returns the exit
-- status: 1 if one was unknown or fn returned false (having said why), else 0.
function M.each_vm(ids, missing, fn)
	local state = require "fireclaw.state"
	local status = 0
	for _, id in ipairs(ids) do
		local rec = state.find(id)
		if not rec then
			io.stderr:write("fireclaw: " .. string.format(missing, id) .. "\n")
			status = 1
		elseif fn(rec) == false then
			status = 1
		end
	end
	return status
end

-- Recipes double as libraries: another recipe loads one with cli.use("coldboot") and gets
-- its table of functions; run from the command line, the same file runs its main. A
-- recipe ends with:   return cli.recipe(M, main, ...)
local LIBRARY = setmetatable({}, { __tostring = function() return "fireclaw.cli.LIBRARY" end })

function M.recipe(lib, main, ...)
	if select("#", ...) > 0 and (...) == LIBRARY then return lib end
	return main({ ... })
end

function M.use(name)
	local chunk = runtime.load_recipe(name)
	if not chunk then error("no recipe named '" .. name .. "'", 0) end
	return chunk(LIBRARY)
end

-- The one-line description of a recipe: the first comment line of its source.
local function describe(src)
	return src and src:match("^%-%-+%s*([^\n]*)") or ""
end

local function recipe_list()
	local found, from_disk = {}, {}
	for name in pairs(runtime.embedded("recipe")) do
		found[name] = runtime.description(name)
	end
	-- the first directory that has a recipe wins, as when running it
	for _, dir in ipairs(runtime.search_dirs()) do
		for _, file in ipairs(runtime.listdir(dir) or {}) do
			local name = file:match("^(.+)%.lua$")
			if name and not from_disk[name] then
				from_disk[name] = true
				local f = io.open(dir .. "/" .. file)
				if f then
					found[name] = describe(f:read("*l") or "") .. " [" .. dir .. "]"
					f:close()
				end
			end
		end
	end
	local names = {}
	for name in pairs(found) do names[#names + 1] = name end
	table.sort(names)
	return names, found
end

-- `fireclaw NAME --help` must never run a recipe that does not expect it (a recipe that
-- does its work at once would do it). main.c asks here first: a recipe whose source
-- parses its options (cli.parse, cli.parse_vm) or looks for --help itself runs and
-- answers; for any other, its description and a usage line are printed instead and true
-- is returned.
-- Built-in recipes all answer --help themselves. `target` is a recipe name or a path.
function M.recipe_help(target, is_path)
	local path = is_path and target or nil
	if not path then
		for _, dir in ipairs(runtime.search_dirs()) do
			local p = dir .. "/" .. target .. ".lua"
			local f = io.open(p)
			if f then
				f:close()
				path = p
				break
			end
		end
		if not path then return false end -- built in
	end
	local f = io.open(path)
	if not f then return false end -- the runner says it cannot open it
	local src = f:read("*a") or ""
	f:close()
	if src:find("[%.:]parse%s*[%(%{]") or src:find("[%.:]parse_vm%s*[%(%{]") then return false end
	if src:find("%-%-help[\"']") then return false end
	local about = describe(src)
	io.stdout:write(string.format("usage: fireclaw %s [ARGS…]\n\n%s%s(%s does not parse options with "
		.. "fireclaw.cli, so --help shows this instead of running it)\n", target,
		about ~= "" and about or "", about ~= "" and "\n" or "", path))
	return true
end

function M.help()
	local names, found = recipe_list()
	local out = {
		"usage: fireclaw [-v|-q] RECIPE [ARGS…]     run a recipe (fireclaw RECIPE --help for its options)",
		"       fireclaw [-v|-q] SCRIPT.lua [ARGS…] run a Lua script with the fireclaw modules",
		"       fireclaw -e CODE                    run Lua code",
		"       fireclaw                            the REPL (on a terminal)",
		"",
		"Runs commands in throw-away microVMs (Firecracker, or QEMU microvm).",
		"",
		"recipes:",
	}
	for _, name in ipairs(names) do
		out[#out + 1] = string.format("  %-12s %s", name, found[name])
	end
	if #names == 0 then out[#out + 1] = "  (none found)" end
	out[#out + 1] = ""
	out[#out + 1] = "options:"
	out[#out + 1] = "  -v, --verbose   progress lines on stderr, tracebacks on error"
	out[#out + 1] = "  -q, --quiet     only errors on stderr"
	out[#out + 1] = "  -e CODE         run CODE (repeatable) before the script"
	out[#out + 1] = "  --recipes DIR   look for recipes and modules in DIR first (repeatable)"
	out[#out + 1] = "  --version       print the version"
	out[#out + 1] = "  -h, --help      this help"
	out[#out + 1] = ""
	out[#out + 1] = "Recipes and modules on disk override the built-in ones; search path:"
	out[#out + 1] = "  --recipes DIR, $FIRECLAW_PATH (DIR:DIR…), ~/.config/fireclaw/recipes"
	out[#out + 1] = "  (never the working directory; a file or directory there that is not owned by root"
	out[#out + 1] = "  or you, or is writable by group/other, is refused)"
	out[#out + 1] = "Exit status: the recipe's (run: the command's), 1 on error, 2 on usage errors."
	io.stdout:write(table.concat(out, "\n"), "\n")
end

return M
