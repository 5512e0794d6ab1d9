# The fireclaw command line: scripts, -e, recipes, exit statuses, errors, overrides, signals.
set -u
source "$FIRECLAW_TESTS/lib/tap.sh"
fc=$FIRECLAW
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"

out=$($fc -e 'print(require"fireclaw.json".encode{a={1,2,3}})')
is "$out" '{"a":[1,2,3]}' "-e runs code with the embedded modules"

out=$($fc -e 'io.write("a")' -e 'io.write("b")')
is "$out" "ab" "several -e run in order"

cat > s.lua <<'LUA'
print(arg[0], arg[1], arg[2], select("#", ...), ...)
return tonumber(arg[1])
LUA
out=$($fc s.lua 7 "x y"); rc=$?
is "$out" "$(printf 's.lua\t7\tx y\t2\t7\tx y')" "script gets arg and ... like lua(1)"
is "$rc" 7 "a script's numeric return value is the exit status"

echo 'return false' > f.lua; $fc ./f.lua; is $? 1 "false means exit status 1"
echo 'return true' > t.lua; $fc ./t.lua; is $? 0 "true means exit status 0"

echo 'error("boom", 0)' > e.lua
err=$($fc ./e.lua 2>&1); rc=$?
is "$rc" 1 "an error exits 1"
is "$err" "fireclaw: boom" "the error is one line"
err=$($fc -v ./e.lua 2>&1)
like "$err" "stack traceback" "-v adds a traceback"

printf 'local x = \n  = 2\n' > syn.lua
err=$($fc ./syn.lua 2>&1); rc=$?
is "$rc" 1 "a syntax error exits 1"
like "$err" "^fireclaw: \./syn\.lua:2:" "a syntax error names file:line"

err=$($fc nosuchrecipe 2>&1); rc=$?
is "$rc" 2 "unknown recipe is a usage error"
like "$err" "no recipe named 'nosuchrecipe'" "unknown recipe says so"

err=$($fc --frobnicate 2>&1); rc=$?
is "$rc" 2 "unknown option is a usage error"
like "$err" "unknown option '--frobnicate'" "unknown option says so"

err=$($fc ./missing.lua 2>&1); rc=$?
is "$rc" 1 "missing script fails"
like "$err" "cannot open \./missing\.lua" "missing script says so"

$fc -e 'error(setmetatable({message="bad usage", exit=2}, {__tostring=function(e) return e.message end}))' 2>/dev/null
is $? 2 "an error table carries its exit status"

like "$($fc --version)" "^fireclaw [0-9]+\.[0-9]+" "--version"

# recipes on the search path, their descriptions, and override precedence
mkdir -p recipes p1 p2 home/.config/fireclaw/recipes
printf -- '-- Say hello from ./recipes\nprint("cwd") return 0\n' > recipes/hello.lua
printf -- '-- Say hello from FIRECLAW_PATH\nprint("path") return 3\n' > p1/hello.lua
printf -- '-- Say hello from home\nprint("home") return 4\n' > home/.config/fireclaw/recipes/hello.lua
printf -- '-- Only at home\nprint("home only")\n' > home/.config/fireclaw/recipes/homeonly.lua
out=$(HOME=$tmp/home FIRECLAW_PATH=$tmp/p2:$tmp/p1 $fc hello); rc=$?
is "$out:$rc" "path:3" "FIRECLAW_PATH comes first"
out=$(HOME=$tmp/home $fc --recipes recipes hello); rc=$?
is "$out:$rc" "cwd:0" "--recipes DIR comes first"
out=$(HOME=$tmp/home $fc hello)
is "$out" "home" "then ~/.config/fireclaw/recipes (./recipes is never searched)"
help=$(HOME=$tmp/home $fc --recipes recipes --help)
like "$help" "hello +Say hello from \./recipes \[recipes\]" "--help lists a recipe with its description"
like "$help" "homeonly +Only at home" "--help lists recipes from every search dir"

# a module on the search path overrides the embedded one
mkdir -p recipes/fireclaw
printf 'return { encode = function() return "overridden" end }\n' > recipes/fireclaw/json.lua
out=$(FIRECLAW_PATH=$tmp/recipes $fc -e 'print(require("fireclaw.json").encode{})')
is "$out" "overridden" "a module file on the search path overrides the embedded module"
out=$($fc -e 'print(require("fireclaw.json").encode{})')
is "$out" "{}" "... but not from ./recipes"
rm -r recipes/fireclaw

# recipe arguments and usage errors through fireclaw.cli
export FIRECLAW_PATH=$tmp/recipes
cat > recipes/opts.lua <<'LUA'
-- Parse options
local cli = require "fireclaw.cli"
local o, rest = cli.parse(arg, { usage = "fireclaw opts [options] -- CMD", { "--n N", "a number", type = "number", default = 1 }, { "--flag", "a flag" } })
print(o.n, o.flag, table.concat(rest, ","))
LUA
out=$($fc opts --n 5 --flag -- a b)
is "$out" "$(printf '5\ttrue\ta,b')" "recipe options and the rest after --"
err=$($fc opts --n x 2>&1); rc=$?
is "$rc:$err" "2:fireclaw: option --n wants a number, got 'x'" "bad option value is a usage error"
err=$($fc opts --nope 2>&1); rc=$?
is "$rc" 2 "unknown recipe option exits 2"
out=$($fc opts --help); rc=$?
like "$rc:$out" "^0:usage: fireclaw opts" "recipe --help prints usage and exits 0"

unset FIRECLAW_PATH

# stdin as a script when not a terminal
out=$(echo 'print("from stdin") return 5' | $fc); rc=$?
is "$out:$rc" "from stdin:5" "a script on stdin runs"

# SIGINT/SIGTERM become a Lua error at a safe point; cleanup code runs
cat > sig.lua <<'LUA'
local runtime = require "fireclaw.runtime"
local ok, err = pcall(function()
	io.stdout:write("ready\n"); io.stdout:flush()
	runtime.sleep(30)
end)
io.stdout:write("cleanup ran: ", tostring(err), "\n"); io.stdout:flush()
error(err, 0)
LUA
# wait_for FILE REGEX: poll (bounded) until the file has a matching line
wait_for() {
	for _ in $(seq 1000); do grep -qE "$2" "$1" 2>/dev/null && return 0; sleep 0.01; done
	return 1
}
for sig in INT TERM; do
	"$fc" ./sig.lua > sig.out 2>&1 &
	pid=$!
	wait_for sig.out ready
	kill -$sig "$pid"
	wait "$pid"; rc=$?
	like "$(cat sig.out)" "cleanup ran: interrupted by SIG$sig" "SIG$sig interrupts a wait and recipes unwind"
	is "$rc" "$([ $sig = INT ] && echo 130 || echo 143)" "SIG$sig exits 128+N"
done

# a pure-Lua busy loop: the interpreter stops it at the first Ctrl-C (hook); a loop the JIT
# compiled never checks hooks (a LuaJIT limitation), so there the second Ctrl-C gets out
cat > busy.lua <<'LUA'
local ok, err = pcall(function()
	io.stdout:write("ready\n"); io.stdout:flush()
	local i = 0 while true do i = i + 1 end
end)
print("caught: " .. tostring(err))
LUA
"$fc" ./busy.lua > busy.out 2>&1 &
pid=$!
wait_for busy.out ready
kill -INT "$pid"
wait_for busy.out caught || kill -INT "$pid"
wait "$pid"; rc=$?
like "$rc:$(cat busy.out)" "^(0:.*caught: interrupted by SIGINT|130:)" "a busy Lua loop is interrupted"

# a second signal gets out even if the first one is being handled slowly
cat > slow.lua <<'LUA'
local runtime = require "fireclaw.runtime"
pcall(function()
	io.stdout:write("ready\n"); io.stdout:flush()
	runtime.sleep(30)
end)
io.stdout:write("unwinding\n"); io.stdout:flush()
local i = 0 while true do i = i + 1 end -- a cleanup that never ends
LUA
"$fc" ./slow.lua > slow.out 2>&1 &
pid=$!
wait_for slow.out ready
kill -INT "$pid"
wait_for slow.out unwinding
kill -INT "$pid"
wait "$pid"; rc=$?
is "$rc" 130 "a second Ctrl-C gets out"

done_testing
