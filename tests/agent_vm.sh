# The guest agent on real guests (QEMU microvm): a snapshot records the agent's channel,
# restores go through it (agent + hand-off steps, no SSH), exit statuses and signals,
# stdin (20 MB, closed early), byte-exact output, env, timeout, Ctrl-C forwarding, a PTY,
# two execs and a file copy at once plus a second process on the same VM, the agent
# killed in the guest and garbage on its port (one line, no hang), SSH beside it.
source "$FIRECLAW_TESTS/lib/vmsuite.sh" agv
cleanup() {
	"$fc" -q snapshot rm agvm >/dev/null 2>&1
	"$fc" -q snapshot rm agssh >/dev/null 2>&1
	rm -rf "$tmp"
}
trap cleanup EXIT
unset FIRECLAW_EXEC
run() { "$fc" run --snapshot agvm "$@"; }

"$fc" cleanup -q >/dev/null 2>&1
"$fc" -q image build >/dev/null
ok $? "default image present"
"$fc" -q image info | grep -q '"agent": "/usr/sbin/fireclaw-agent"'
ok $? "the image has the agent"
"$fc" -q snapshot create --name agvm 2>"$tmp/err"
ok $? "snapshot create (waits for the agent and SSH)" "$(cat "$tmp/err")"
"$fc" -q snapshot info agvm >"$tmp/info"
grep -A3 '"exec_channels"' "$tmp/info" | grep -q '"agent"'
ok $? "the snapshot records its exec channels: agent" "$(grep -A3 exec_channels "$tmp/info")"

run -v -- true 2>"$tmp/err"
ok $? "a restored run -- true"
grep -q "agent ready" "$tmp/err" && grep -q "hand-off" "$tmp/err" && ! grep -q "SSH ready" "$tmp/err"
ok $? "… through the agent (agent + hand-off stages, no SSH)" "$(grep -E 'ready|hand' "$tmp/err")"
# its port connected before `cont` (a connection made after it may go unread: guest-notes)
grep -q "agent port connected before the VM runs" "$tmp/err" && ! grep -q "answered on connection" "$tmp/err"
ok $? "… its agent port connected before the VM ran, and answered on it" "$(grep -E 'agent port|connection' "$tmp/err")"

for want in 1 3 127; do
	run -- sh -c "exit $want" 2>/dev/null
	is "$?" "$want" "exit status $want"
done
run -- no-such-command 2>"$tmp/err"
is "$?" 127 "a missing command: 127"
run -- sh -c 'kill -TERM $$'
is "$?" 143 "killed by SIGTERM: 143"

head -c 20000000 /dev/urandom >"$tmp/big"
out=$(run -- sha256sum <"$tmp/big" | cut -d' ' -f1)
is "$out" "$(sha256sum <"$tmp/big" | cut -d' ' -f1)" "stdin: 20 MB byte for byte"
out=$(timeout 60 "$fc" run --snapshot agvm -- head -c 5 <"$tmp/big" | wc -c)
is "$out" 5 "stdin closed early by the command: no hang"

head -c 1000000 /dev/urandom >"$tmp/bin"
run --put "$tmp/bin:/root/bin" -- sh -c 'cat /root/bin; cat /root/bin >&2' >"$tmp/o" 2>"$tmp/e"
cmp -s "$tmp/bin" "$tmp/o" && cmp -s "$tmp/bin" "$tmp/e"
ok $? "stdout and stderr: 1 MB of random bytes each, exact (put through the agent too)"
run --get /etc/hostname:"$tmp/h" -- true && [ -s "$tmp/h" ]
ok $? "get through the agent"
mkdir -p "$tmp/tree/sub" && echo one >"$tmp/tree/sub/f" && echo two >"$tmp/tree/g"
run --put "$tmp/tree:/root/t" --get /root/t:"$tmp/back" -- sh -c 'echo three >/root/t/sub/h' &&
	[ "$(cat "$tmp/back/sub/f" "$tmp/back/g" "$tmp/back/sub/h")" = "one
two
three" ]
ok $? "--put and --get of a directory tree through the agent"
"$fc" run --snapshot agvm --exec ssh --put "$tmp/tree:/root/t" -- true 2>"$tmp/err"
is "$?" 2 "--put of a directory with --exec ssh: a usage error"
grep -q "directory trees go through the guest agent, not SSH" "$tmp/err"
ok $? "… saying so" "$(cat "$tmp/err")"
out=$(run --env 'A=b c' -- sh -c 'echo "$A"; pwd')
is "$out" "b c
/root" "env and cwd"
start=$SECONDS
run --timeout 1 -- sleep 30 2>/dev/null
is "$?" 124 "--timeout: 124"
[ $((SECONDS - start)) -lt 20 ]
ok $? "… at once"
no_leaks "the runs"

# Ctrl-C: the command gets SIGINT first (its trap runs, its status is run's)
"$fc" run --snapshot agvm -- sh -c 'trap "echo got INT; exit 7" INT; echo ready; while :; do sleep 0.1; done' \
	>"$tmp/int" 2>&1 &
pid=$!
for _ in $(seq 1 300); do grep -q ready "$tmp/int" && break; sleep 0.1; done
kill -INT "$pid"
wait "$pid"
is "$?" 7 "SIGINT: forwarded to the command, whose trap decides the status"
grep -q "got INT" "$tmp/int"
ok $? "… and its trap ran in the guest" "$(cat "$tmp/int")"
no_leaks "after SIGINT"

# the Lua side: one restored VM, PTY, the process group, a batch, a second process
cat >"$tmp/vm.lua" <<'EOF'
local t = require "tap"
local cli = require "fireclaw.cli"
local fs = require "fireclaw.fs"
local proc = require "fireclaw.proc"
local restore = cli.use "restore"
local tmp = arg[1]
local sb = restore.restore({ image = "default" }, restore.find { image = "default", snapshot = "agvm" })
local ok, err = pcall(function()
	t.ok(sb.agent and not sb.session, "restored with the agent, no SSH session")
	local r = sb:exec({ "sh", "-c", 'stty size; read -r k; echo "key=$k"' }, { pty = { rows = 33, cols = 101 }, stdin = "q\n" })
	t.ok(r.stdout:match("33 101") and r.stdout:match("key=q"), "PTY: window size and a key", r.stdout)
	r = sb:exec({ "sh", "-c", "sleep 100 & echo $! > /tmp/bg; sleep 100" }, { timeout = 1 })
	t.ok(r.timed_out, "timeout")
	r = sb:exec({ "sh", "-c", 'kill -0 "$(cat /tmp/bg)" 2>/dev/null && echo alive || echo gone' })
	t.is(r.stdout, "gone\n", "the timeout killed the whole process group")
	local res = sb.agent:batch {
		{ exec = { "sh", "-c", "sleep 1; echo A" } },
		{ exec = { "sh", "-c", "sleep 1; echo B" } },
		{ get = { "/etc/passwd", tmp .. "/passwd" } },
	}
	t.ok(res[1].stdout == "A\n" and res[2].stdout == "B\n" and fs.read(tmp .. "/passwd"):match("^root:"),
		"two execs and a file copy at once on one VM")
	-- another fireclaw process attaches to this VM through its record (a port of its own)
	local other = proc.run({ os.getenv("FIRECLAW"), "-e", string.format(
		"local c = require('fireclaw.agent').attach_vm('%s') print(c:exec({'echo', 'other'}).stdout) c:close()", sb.id) },
		{ timeout = 60 })
	t.ok(other.stdout == "other\n\n", "a second process execs in the same VM at once", other.stdout .. other.stderr)
end)
t.ok(ok, "no unexpected error", tostring(err))
sb:destroy()
return t.done()
EOF
LUA_PATH="$FIRECLAW_TESTS/lib/?.lua;;" "$fc" "$tmp/vm.lua" "$tmp" | sed 's/^\(not \)\{0,1\}ok [0-9]* - /&vm.lua: /' >"$tmp/vm.tap"
while read -r line; do
	case "$line" in
	"ok "*) ok 0 "${line#ok * - }" ;;
	"not ok "*) ok 1 "${line#not ok * - }" ;;
	"#"*) echo "$line" ;;
	esac
done <"$tmp/vm.tap"
no_leaks "the Lua session"

# the agent killed in the guest: the port server (restarted: the host hears it), then all
timeout 60 "$fc" run --snapshot agvm -- sh -c 'kill -9 $PPID; sleep 5' 2>"$tmp/err"
is "$?" 1 "the agent's port server killed in the guest: fireclaw fails"
[ "$(wc -l <"$tmp/err")" = 1 ] && grep -q "agent restarted" "$tmp/err"
ok $? "… with one line" "$(cat "$tmp/err")"
timeout 60 "$fc" run --snapshot agvm -- sh -c 'p=$(ls -l /proc/$PPID/fd | grep -o "/dev/vport[0-9p]*" | head -1)
	kill -9 $(pidof fireclaw-agent); printf "GARBAGE!GARBAGE!GARBAGE!" >"$p"; sleep 5' 2>"$tmp/err"
is "$?" 1 "garbage on the agent's port from the guest: fireclaw fails"
[ "$(wc -l <"$tmp/err")" = 1 ] && grep -q "malformed frame" "$tmp/err"
ok $? "… with one line" "$(cat "$tmp/err")"
no_leaks "the agent killed"

# SSH stays: --exec ssh on the same snapshot; a snapshot made with exec = ssh restores over SSH
run -v --exec ssh -- sh -c 'echo via ssh' >"$tmp/o" 2>"$tmp/err"
ok $? "--exec ssh on an agent snapshot"
grep -q "SSH ready" "$tmp/err" && grep -q "via ssh" "$tmp/o"
ok $? "… goes through SSH" "$(grep ready "$tmp/err")"
! grep -q "agent port connected" "$tmp/err"
ok $? "… and holds no agent port" "$(grep 'agent port' "$tmp/err")"
FIRECLAW_EXEC=ssh "$fc" -q snapshot create --name agssh 2>"$tmp/err"
ok $? "snapshot create with FIRECLAW_EXEC=ssh" "$(cat "$tmp/err")"
"$fc" run -v --snapshot agssh -- true 2>"$tmp/err"
ok $? "its restore runs"
grep -q "SSH ready" "$tmp/err" && ! grep -q "agent ready" "$tmp/err"
ok $? "… over SSH (its snapshot has no agent channel recorded)" "$(grep ready "$tmp/err")"
"$fc" run --snapshot agssh --exec agent -- true 2>"$tmp/err"
is "$?" 1 "--exec agent on it: fails"
grep -q "has no agent channel" "$tmp/err"
ok $? "… saying why" "$(cat "$tmp/err")"
# a snapshot of an older agent protocol (its meta.json names none, as before protocol 2):
# restored over SSH, not refused by the agent's version check
meta="$FIRECLAW_STATE/snapshots/agvm/meta.json"
grep -q '"agent_protocol": 2' "$meta"
ok $? "the snapshot records its agent protocol" "$(grep agent_protocol "$meta")"
python3 -c 'import json,sys; p=sys.argv[1]; m=json.load(open(p)); m.pop("agent_protocol", None); json.dump(m, open(p, "w"))' "$meta"
run -v -- sh -c 'echo older' >"$tmp/o" 2>"$tmp/err"
ok $? "a snapshot without the agent protocol still runs"
grep -q "SSH ready" "$tmp/err" && ! grep -q "agent ready" "$tmp/err" && grep -q older "$tmp/o"
ok $? "… over SSH" "$(grep -E 'ready|error' "$tmp/err")"
no_leaks "the end"
done_testing
