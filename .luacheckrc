-- luacheck configuration (make lint, tools/lint.sh): LuaJIT as embedded in fireclaw.
std = "luajit"
codes = true
max_line_length = false -- long lines are a matter of taste here, not a bug
-- `arg`: a recipe's or script's arguments (set by main.c)
read_globals = { "arg" }
files["tests/*.lua"] = {
	-- the REPL's module globals (fireclaw.repl.GLOBALS) that tests exercise
	read_globals = { "arg" },
}
exclude_files = { "build/", "vendor/" }
