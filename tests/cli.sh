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

# a pure-Lua busy loop: the interpreter stops it at the first Ctrl-C (hook). fireclaw runs
# with the JIT off (core/main.c); a loop the JIT compiled would never check hooks (a LuaJIT
# limitation) and only the second Ctrl-C would get out
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
is "$rc:$(tr '\n' ' ' < busy.out)" "0:ready caught: interrupted by SIGINT " "a busy Lua loop is interrupted at the first Ctrl-C"

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

# ---- options that were silently ignored ----
# (a state and run dir of our own: nothing here may touch the suite's)
export FIRECLAW_STATE=$tmp/state FIRECLAW_RUN=$tmp/run
err=$($fc snapshot list --bogus 2>&1); rc=$?
is "$rc:$err" "2:fireclaw: unknown option '--bogus' (see 'fireclaw snapshot list --help')" \
	"snapshot list rejects an unknown option"
out=$($fc snapshot list --json); rc=$?
is "$rc:$out" "0:[]" "snapshot list --json prints a JSON array"
err=$($fc ps extra 2>&1); rc=$?
is "$rc:$err" "2:fireclaw: unexpected argument 'extra' (usage: fireclaw ps [--json])" "ps rejects an extra argument"
err=$($fc cleanup now 2>&1); rc=$?
is "$rc" 2 "cleanup rejects an extra argument"
err=$($fc run --image -- true 2>&1); rc=$?
is "$rc:$err" "2:fireclaw: option --image needs a value (NAME)" "run --image -- true: the value is missing"
err=$($fc run --image --vcpu 2 -- true 2>&1); rc=$?
is "$rc:$err" "2:fireclaw: option --image needs a value (NAME)" "an option is not taken as another's value"
like "$($fc run --help)" "--json .*stages" "run --help names every --json field (stages)"

# unknown keys in the options tables of the Lua API raise, with a suggestion
api_err() { $fc -e "$1" 2>&1; }
is "$(api_err 'require("fireclaw.sandbox").new{vcpus = 2}')" \
	"fireclaw: sandbox.new: unknown option 'vcpus' (did you mean 'vcpu'?)" "sandbox.new{vcpus=}"
is "$(api_err 'require("fireclaw.cli").use("coldboot").boot{mem = 512}')" \
	"fireclaw: coldboot.boot: unknown option 'mem' (did you mean 'mem_mib'?)" "coldboot.boot{mem=}"
is "$(api_err 'require("fireclaw.cli").use("restore").find{snap = "x"}')" \
	"fireclaw: restore.find: unknown option 'snap' (did you mean 'snapshot'?)" "restore.find{snap=}"
is "$(api_err 'require("fireclaw.cli").use("restore").restore({imag = "x"}, {})')" \
	"fireclaw: restore.restore: unknown option 'imag' (did you mean 'image'?)" "restore.restore{imag=}"
is "$(api_err 'require("fireclaw.cli").use("snapshot").create{vcpus = 1}')" \
	"fireclaw: snapshot.create: unknown option 'vcpus' (did you mean 'vcpu'?)" "snapshot.create{vcpus=}"
is "$(api_err 'require("fireclaw.image").build{nmae = "x"}')" \
	"fireclaw: image.build: unknown option 'nmae' (did you mean 'name'?)" "image.build{nmae=}"
is "$(api_err 'require("fireclaw.image").import{name = "x", kernal = "k"}')" \
	"fireclaw: image.import: unknown option 'kernal' (did you mean 'kernel'?)" "image.import{kernal=}"
is "$(api_err 'require("fireclaw.vm").new{id = "x", dir = "/nonexistent", vmm = "qemu", cpus = 1}')" \
	"fireclaw: vm.new: unknown option 'cpus' (known: id, dir, vmm, accel, netns, tap, mac, firecracker, qemu, env, socket_timeout, on_spawn, user, keep, detected, cmdline_devices, cgroup, unsafe_no_jailer)" \
	"vm.new lists the known options when nothing is close"
is "$(api_err 'require("fireclaw.sandbox").new("default")')" \
	"fireclaw: sandbox.new: options must be a table, got string" "an options table that is not a table"
# the C primitives share the check
is "$(api_err 'require("fireclaw.proc").run({"true"}, {timout = 1})')" \
	"fireclaw: proc.run: unknown option 'timout' (did you mean 'timeout'?)" "proc.run (C)"
is "$(api_err 'require("fireclaw.ssh").connect{hots = "x", key = "k"}')" \
	"fireclaw: ssh.connect: unknown option 'hots' (did you mean 'host'?)" "ssh.connect (C)"
is "$(api_err 'print(require("fireclaw.json").encode({1}, {prety = true}))')" \
	"fireclaw: json.encode: unknown option 'prety' (did you mean 'pretty'?)" "json.encode (C)"
is "$(api_err 'require("fireclaw.net").tap_create("fct-none", {nmae = "tap0"})')" \
	"fireclaw: net.tap_create: unknown option 'nmae' (did you mean 'name'?)" "net.tap_create (C)"
is "$(api_err 'print(require("fireclaw.json").encode({1}, {pretty = true}))' | tr -d ' \n')" "[1]" \
	"known options still work"

# `fireclaw RECIPE --help` never runs a recipe that does not parse its options
mkdir -p own
printf -- '-- Write a file, at once\nio.open("sidefx.out", "w"):write("ran") return 0\n' > own/sidefx.lua
export FIRECLAW_PATH=$tmp/own
out=$($fc sidefx --help); rc=$?
is "$rc" 0 "--help of a recipe without cli.parse exits 0"
like "$out" "^usage: fireclaw sidefx " "and prints a usage line"
like "$out" "Write a file, at once" "and the recipe's description"
[ ! -e sidefx.out ]; ok $? "and does not run the recipe"
$fc ./own/sidefx.lua -h >/dev/null
[ ! -e sidefx.out ]; ok $? "nor a script given by path with -h"
$fc sidefx && [ -e sidefx.out ]; ok $? "without --help the recipe runs"
rm -f sidefx.out
printf -- '-- One VM\nlocal cli = require "fireclaw.cli"\n%s\n' \
	'local _, ref = cli.parse_vm(arg, { usage = "fireclaw onevm ID|NAME" }) print("vm " .. ref) return 0' > own/onevm.lua
out=$($fc onevm --help); rc=$?
is "$rc:$(printf '%s' "$out" | head -n 1)" "0:usage: fireclaw onevm ID|NAME" "a recipe with cli.parse_vm answers --help itself"
is "$($fc onevm x1)" "vm x1" "cli.parse_vm returns the VM's id or name"
is "$($fc onevm 2>&1; echo "rc=$?")" "$(printf 'fireclaw: onevm needs a VM id or name (see fireclaw ps)\nrc=2')" \
	"cli.parse_vm: no id is a usage error naming the recipe"
out=$($fc "$FIRECLAW_TESTS/../docs/example.lua" --help); rc=$?
like "$rc:$(printf '%s' "$out" | tr '\n' ' ')" "^0:usage: .*Boot once, run three commands" \
	"README's example answers --help without booting or snapshotting"
rm -f sidefx.out
unset FIRECLAW_PATH
# every built-in recipe answers --help with its usage, touching no state
for r in $($fc --help | sed -n '/^recipes:/,/^$/p' | awk '/^  [a-z]/ && !/\[/ {print $1}'); do
	out=$(FIRECLAW_STATE=$tmp/help-state FIRECLAW_RUN=$tmp/help-run $fc "$r" --help 2>&1); rc=$?
	like "$rc:$out" "^0:usage: fireclaw $r" "built-in '$r --help' prints its usage"
done
[ ! -e "$tmp/help-state" ] && [ ! -e "$tmp/help-run" ]
ok $? "no built-in recipe's --help created a state or run directory"
# the recipes on VMs by id say which one is missing or unknown (cli.parse_vm, cli.each_vm)
for r in pause resume shell logs; do
	is "$($fc $r 2>&1; echo "rc=$?")" "$(printf 'fireclaw: %s needs a VM id or name (see fireclaw ps)\nrc=2' $r)" \
		"'$r' without a VM is a usage error"
done
is "$($fc rm fct-no1 fct-no2 2>&1; echo "rc=$?")" \
	"$(printf "fireclaw: no VM with id 'fct-no1' (see fireclaw ps)\nfireclaw: no VM with id 'fct-no2' (see fireclaw ps)\nrc=1")" \
	"rm of unknown ids names each and exits 1"
is "$($fc stop fct-no1 2>&1; echo "rc=$?")" \
	"$(printf "fireclaw: no VM 'fct-no1' (see fireclaw ps; an expired one was removed)\nrc=1")" "stop of an unknown VM exits 1"

# what was printed comes before the error line, also in one file
$fc -e 'io.write("printed first\n") error("then the error", 0)' > both.out 2>&1
is "$(cat both.out)" "$(printf 'printed first\nfireclaw: then the error')" "stdout is flushed before the error line"

# a script piped to fireclaw gets the REPL's globals
out=$(echo 'print(type(sandbox), type(cli), type(snapshot), type(json))' | $fc)
is "$out" "$(printf 'table\ttable\ttable\ttable')" "a piped script has the REPL's globals"

# one time format in image list and snapshot list; image rm takes the image's snapshots along
mkdir -p "$FIRECLAW_STATE/images/fct-t"
echo '{"name": "fct-t", "source": "import", "created": "2026-01-02T03:04:05Z", "files": {}}' \
	> "$FIRECLAW_STATE/images/fct-t/manifest.json"
$fc -e '
local snapshot = require "fireclaw.snapshot"
local tmp = snapshot.begin("fct-snap")
for _, f in ipairs({ "vmstate", "memory", "disk.ext4" }) do io.open(tmp .. "/" .. f, "w"):close() end
snapshot.commit(tmp, "fct-snap", { image = "fct-t", vmm = "qemu", vmm_version = "1", vcpu = 1, mem_mib = 64,
	created = os.time({ year = 2026, month = 1, day = 2, hour = 3, min = 4, isdst = false }) })'
ilist=$($fc image list | grep '^fct-t ')
slist=$($fc snapshot list | grep '^fct-snap ')
itime=$(printf '%s' "$ilist" | grep -oE '[0-9]{4}-[0-9]{2}-[0-9]{2}[ T][0-9:]+Z?$')
stime=$(printf '%s' "$slist" | grep -oE '[0-9]{4}-[0-9]{2}-[0-9]{2}[ T][0-9:]+Z?$')
like "$itime" '^[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}$' "image list: time as YYYY-MM-DD HH:MM" 
is "$(printf '%s' "$stime" | sed 's/[0-9]/9/g')" "$(printf '%s' "$itime" | sed 's/[0-9]/9/g')" \
	"snapshot list prints times in the same format"
like "$($fc image list | head -1)$($fc snapshot list | head -1)" "CREATED \(UTC\).*CREATED \(UTC\)" \
	"both say the times are UTC"
err=$($fc image rm fct-t 2>&1); rc=$?
is "$rc:$err" "0:image: removed 'fct-t' and its snapshot 'fct-snap'" "image rm says it removed the image's snapshots"
[ ! -e "$FIRECLAW_STATE/snapshots/fct-snap" ]; ok $? "and they are gone"

err=$($fc snapshot info nosuch 2>&1); rc=$?
like "$rc:$err" "^1:fireclaw: snapshot: no snapshot named 'nosuch' \(see: fireclaw snapshot list; make it with: fireclaw snapshot create --name nosuch\)" \
	"snapshot info of a missing snapshot says how to list and create one"
err=$($fc snapshot rm nosuch 2>&1)
like "$err" "no snapshot named 'nosuch' \(see: fireclaw snapshot list\)" "snapshot rm too"

# a second Ctrl-C exits at once and says what it leaves behind and how to remove it
cat > dbl.lua <<'LUA'
local runtime = require "fireclaw.runtime"
local rec = require("fireclaw.state").create { image = "x" }
pcall(function()
	io.stdout:write("ready ", rec.id, "\n"); io.stdout:flush()
	runtime.sleep(30)
end)
io.stdout:write("unwinding\n"); io.stdout:flush()
local i = 0 while true do i = i + 1 end -- a teardown that never ends
LUA
"$fc" ./dbl.lua > dbl.out 2>&1 &
pid=$!
wait_for dbl.out ready
kill -INT "$pid"
wait_for dbl.out unwinding
kill -INT "$pid"
wait "$pid"; rc=$?
id=$(sed -n 's/^ready //p' dbl.out)
is "$rc" 130 "a second Ctrl-C exits 130"
like "$(cat dbl.out)" "interrupted again: exiting at once, leaving VM $id \(namespace [a-z-]*$id, $FIRECLAW_RUN/vms/$id\) .*'fireclaw cleanup' removes it" \
	"and says which VM it leaves behind and that fireclaw cleanup removes it"
$fc cleanup -q
[ ! -e "$FIRECLAW_RUN/vms/$id" ]; ok $? "fireclaw cleanup removes it"

done_testing
