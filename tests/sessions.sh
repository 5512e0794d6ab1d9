# Sessions on real VMs: kept, named VMs (start, exec, cp, logs, ssh, ps, stop), their
# failure cases (unknown id, expired TTL, stopped VM, paused VM), several processes
# exec'ing at once, cp of a 1,000-file tree both ways (bytes and modes), hostile trees
# from the guest refused, pause/resume twice with state kept, fork of a live VM into 3
# clones at once — each followed by a leak check. (-it: tests/sessions_tty.py.)
source "$FIRECLAW_TESTS/lib/vmsuite.sh" ses
fork=se-fork-${FIRECLAW_TEST_TAG:-}$$
trap '"$fc" cleanup --all -q >/dev/null 2>&1; "$fc" snapshot rm "$fork" >/dev/null 2>&1; rm -rf "$tmp"' EXIT
jget() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {"d": d}))' "$1"; }

"$fc" cleanup -q >/dev/null 2>&1
no_leaks "before the tests"

# ---- start, ps, exec ----
out=$("$fc" start --name box --ttl 10m --json 2>"$tmp/err"); rc=$?
is "$rc" 0 "start --name --ttl --json"
[ $rc = 0 ] || sed 's/^/#   /' "$tmp/err"
id=$(printf '%s' "$out" | jget 'd["id"]')
like "$id" '^[0-9a-f]{6}$' "start prints the VM's id"
like "$out" '"name":"box"' "start --json has the name"
ps=$("$fc" ps)
like "$ps" "^$id +box +running +[0-9]+s +(9|10)m " "ps: id, name, state running, age, TTL"
state=$("$fc" ps --json | jget '[(v["name"], v["state"], v["ttl_left_s"] > 500) for v in d if v["id"] == "'"$id"'"]')
is "$state" "[('box', 'running', True)]" "ps --json: name, state, ttl_left_s"

# the exec checks over each channel: the agent (the default: the image has it) and SSH
for mode in auto ssh; do
	export FIRECLAW_EXEC=$mode
	want=agent; [ $mode = ssh ] && want=ssh
	is "$("$fc" exec box -- sh -c '[ -n "$SSH_CONNECTION" ] && echo ssh || echo agent')" "$want" "exec goes over the $want ($mode)"
	out=$("$fc" exec box -- sh -c 'echo out; echo err >&2; exit 3' 2>"$tmp/err"); rc=$?
	is "$rc" 3 "exec by name: the exit status comes back ($mode)"
	is "$out|$(cat "$tmp/err")" "out|err" "exec: stdout and stderr ($mode)"
	is "$("$fc" exec "$id" -- printf '%s|' 'a b' '$x' "'q'")" "a b|\$x|'q'|" "exec by id: argv verbatim ($mode)"
	is "$("$fc" exec --env FOO='x y' box -- sh -c 'echo "$FOO"')" "x y" "exec --env ($mode)"
	is "$(echo piped | "$fc" exec box -- cat)" "piped" "exec: a piped stdin is forwarded ($mode)"
	out=$("$fc" exec --json box -- sh -c 'echo j; exit 4'); rc=$?
	is "$rc" 4 "exec --json: exit status ($mode)"
	like "$out" '"exit_code":4' "exec --json: exit_code ($mode)"
	like "$out" '"stdout":"j\\n"' "exec --json: stdout ($mode)"
	"$fc" exec --timeout 1 box -- sleep 30 2>/dev/null; is $? 124 "exec --timeout: 124 ($mode)"
	err=$("$fc" exec nosuchvm -- true 2>&1); rc=$?
	is "$rc" 1 "exec into an unknown VM fails ($mode)"
	like "$err" "no VM 'nosuchvm'" "... saying there is no such VM ($mode)"
	err=$("$fc" exec box 2>&1); is $? 2 "exec without a command is a usage error ($mode)"
done
unset FIRECLAW_EXEC
is "$("$fc" exec --exec ssh box -- sh -c '[ -n "$SSH_CONNECTION" ] && echo ssh')" "ssh" "exec --exec ssh forces SSH"

# several processes exec'ing into one VM at once
pids=()
for i in 1 2 3 4; do "$fc" exec box -- sh -c "sleep 1; echo done-$i" >"$tmp/c$i" 2>&1 & pids+=($!); done
wait "${pids[@]}"
all=$(cat "$tmp"/c1 "$tmp"/c2 "$tmp"/c3 "$tmp"/c4 | sort | tr '\n' ' ')
is "$all" "done-1 done-2 done-3 done-4 " "4 processes exec into one VM at once"
# a 5th process while the agent's 4 ports are held: it waits a moment (AGENT_PORT_WAIT),
# then takes SSH; the 4 holders are on the agent
pids=()
for i in 1 2 3 4; do
	# (each holds its port until /tmp/release exists in the guest, at most 60 s)
	"$fc" exec box -- sh -c '[ -n "$SSH_CONNECTION" ] && echo ssh || echo agent; i=0
		while [ ! -e /tmp/release ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done' >"$tmp/h$i" 2>&1 &
	pids+=($!)
done
for _ in $(seq 300); do [ "$(cat "$tmp"/h[1-4] | wc -l)" -ge 4 ] && break; sleep 0.1; done
t0=$(date +%s%N)
out=$("$fc" exec box -- sh -c '[ -n "$SSH_CONNECTION" ] && echo ssh || echo agent' 2>"$tmp/err"); rc=$?
t1=$(date +%s%N)
is "$rc|$out" "0|ssh" "a 5th process while the 4 agent ports are held: over SSH, no error"
ok $(( (t1 - t0) / 1000000 < 2000 )) "... after waiting about 2 s for a port" "$(( (t1 - t0) / 1000000 )) ms"
"$fc" exec --exec ssh box -- touch /tmp/release
wait "${pids[@]}"
"$fc" exec box -- rm /tmp/release
is "$(cat "$tmp"/h[1-4] | tr '\n' ' ')" "agent agent agent agent " "... the 4 holders ran over the agent"

# ---- cp ----
mkdir -p "$tmp/src/sub/deeper" "$tmp/src/empty"
for i in $(seq 1 1000); do head -c $((i * 13 % 9000)) /dev/urandom >"$tmp/src/sub/f$i"; done
chmod 751 "$tmp/src/sub/f1"; chmod 600 "$tmp/src/sub/f2"; chmod 444 "$tmp/src/sub/f3"; chmod 700 "$tmp/src/sub/deeper"
printf 'x' >"$tmp/src/sub/deeper/leaf"; ln -s sub/f5 "$tmp/src/link"
long=$(printf 'n%.0s' $(seq 1 150)) # names past tar's 100 bytes (GNU long name, long link)
mkdir "$tmp/src/$long"; echo long >"$tmp/src/$long/$long"; ln -s "$long/$long" "$tmp/src/longlink"
modes() { (cd "$1" && find . -printf '%p %y %m %s %l\n' | sort); }
"$fc" cp "$tmp/src" box:/root/ 2>"$tmp/err"; rc=$?
is "$rc" 0 "cp DIR ID:/root/ (a 1,000-file tree in)"
[ $rc = 0 ] || sed 's/^/#   /' "$tmp/err"
g=$("$fc" exec box -- sh -c 'cd /root/src && find . | wc -l; stat -c %a sub/f1 sub/f2 sub/deeper; readlink link; md5sum sub/f999')
want="$(find "$tmp/src" | wc -l) 751 600 700 sub/f5 $(cd "$tmp/src" && md5sum sub/f999)"
is "$(echo $g)" "$(echo $want)" "the tree arrives: entry count, modes, symlink, bytes"
"$fc" cp box:/root/src "$tmp/back" 2>"$tmp/err"; rc=$?
is "$rc" 0 "cp ID:/root/src DIR (the tree out)"
[ $rc = 0 ] || sed 's/^/#   /' "$tmp/err"
diff -r "$tmp/src" "$tmp/back" >/dev/null; ok $? "the tree comes back byte for byte"
umask_modes() { modes "$1" | awk '{print $1, $2, $4, $5}'; }
is "$(modes "$tmp/back")" "$(modes "$tmp/src")" "... with the same types, modes, sizes and symlinks"
head -c 5000 /dev/urandom >"$tmp/one"
"$fc" cp "$tmp/one" box:/root/one && "$fc" cp box:/root/one "$tmp/one.back"
cmp -s "$tmp/one" "$tmp/one.back"; ok $? "cp of a single file both ways"
err=$("$fc" cp box:/root/src/sub "$tmp/back/sub/f1" 2>&1); rc=$?
is "$rc" 1 "cp refuses to copy a tree over an existing file"
like "$err" "exists already" "... saying so"
err=$("$fc" cp "$tmp/one" "$tmp/two" 2>&1); is $? 2 "cp with no VM side is a usage error"
err=$("$fc" cp --max-transfer 4K "$tmp/src" box:/root/big 2>&1); rc=$?
is "$rc" 1 "cp --max-transfer caps each file of a tree"
like "$err" "bigger than 4096 bytes" "... and says so"

# hostile trees from the guest: refused whole, nothing left
"$fc" exec box -- sh -c 'mkdir -p /root/h1 /root/h2 /root/h3 /root/h4 && echo x >/root/h1/ok &&
	ln -s /etc/passwd /root/h1/esc && ln -s ../../../etc /root/h4/up && touch "/root/h2/a$(printf "\001")b" &&
	for i in $(seq 1 60); do : >/root/h3/f$i; done'
check_refused() { # NAME REMOTE PATTERN [OPTS]
	local err rc
	err=$("$fc" cp ${4:-} "box:$2" "$tmp/hostile" 2>&1); rc=$?
	ok $((rc != 1)) "hostile tree refused: $1" "$err"
	like "$err" "$3" "... saying why ($1)"
	[ ! -e "$tmp/hostile" ] && ! ls -a "$tmp" | grep -q fireclaw-cp
	ok $? "... leaving nothing ($1)"
}
check_refused "absolute symlink" /root/h1 "points outside the tree"
check_refused "symlink up and out" /root/h4 "points outside the tree"
check_refused "control character in a name" /root/h2 "control character"
check_refused "too many entries" /root/h3 "more than 50 entries" "--max-entries 50"
# a guest whose tar lies: an archive with ../ names, absolute names and a device
python3 - "$tmp/evil.tar" <<'PY'
import io, sys, tarfile
with tarfile.open(sys.argv[1], "w", format=tarfile.GNU_FORMAT) as t:
    for name in ["./ok", "./../escaped", "/abs"]:
        i = tarfile.TarInfo(name); data = b"evil"; i.size = len(data); t.addfile(i, io.BytesIO(data))
PY
"$fc" cp "$tmp/evil.tar" box:/root/evil.tar
# (busybox sh runs its own tar whatever PATH says: the guest lies through root's login
# shell, which the SSH server runs every command with)
"$fc" exec box -- sh -c 'mkdir -p /root/h5 && cp /etc/passwd /root/passwd.orig &&
	printf "#!/bin/sh\ncase \"\$2\" in *\"tar -cf\"*) exec cat /root/evil.tar;; esac\nexec /bin/sh \"\$@\"\n" >/root/evilsh &&
	chmod 755 /root/evilsh && echo /root/evilsh >>/etc/shells &&
	sed -i "s|^root:\(.*\):[^:]*\$|root:\1:/root/evilsh|" /etc/passwd'
# (the lie is in root's login shell, which only the SSH path runs; the agent's tree, a tar
# stream of an exec too, goes through the same unpacker, fireclaw.tree: checked below)
FIRECLAW_EXEC=ssh check_refused "a lying tar with ../ names" /root/h5 "'\.\.' component"
[ ! -e "$tmp/escaped" ]; ok $? "... and nothing was written outside the target"
# over the agent the command runs as /bin/sh -c …: a /bin/sh that lies
"$fc" exec box -- sh -c 'printf "#!/bin/busybox sh\ncase \"\$2\" in *\"tar -cf\"*) exec cat /root/evil.tar;; esac\nexec /bin/busybox sh \"\$@\"\n" >/root/evilsh2 &&
	chmod 755 /root/evilsh2 && ln -sf /root/evilsh2 /bin/sh'
check_refused "a lying tar with ../ names, over the agent" /root/h5 "'\.\.' component"
[ ! -e "$tmp/escaped" ]; ok $? "... and nothing was written outside the target (agent)"
"$fc" exec box -- ln -sf /dev/zero /root/evil.tar
FIRECLAW_EXEC=ssh check_refused "an endless stream of zeros" /root/h5 "stream longer than its entries need"
check_refused "an endless stream of zeros, over the agent" /root/h5 "stream longer than its entries need"
"$fc" exec box -- /bin/busybox ln -sf /bin/busybox /bin/sh
"$fc" exec box -- cp /root/passwd.orig /etc/passwd

# ---- logs, ssh ----
# (the console log is written by a log sink process: wait, bounded, for the line)
"$fc" exec box -- sh -c 'echo console-marker-$((40+2)) >/dev/console'
for _ in $(seq 100); do out=$("$fc" logs box); rc=$?; case $out in *console-marker-42*) break ;; esac; sleep 0.1; done
is "$rc" 0 "logs"
like "$out" "console-marker-42" "logs prints the console"
"$fc" logs -f box >"$tmp/follow" 2>&1 &
follower=$!
"$fc" logs nosuchvm 2>/dev/null; is $? 1 "logs of an unknown VM fails"
if command -v ssh >/dev/null; then
	is "$("$fc" ssh box -- echo via-openssh 2>"$tmp/err")" "via-openssh" "ssh ID runs OpenSSH with the host key pinned"
else
	skip "no ssh client"
fi

# ---- pause / resume, twice ----
"$fc" exec box -- sh -c 'echo kept-data >/root/state; (i=0; while :; do i=$((i+1)); echo $i >/tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.1; done) >/dev/null 2>&1 & echo $! >/tmp/bg'
for round in 1 2; do
	vmm=$("$fc" ps --json | jget '[v["vmm_pid"] for v in d if v["name"] == "box"][0]')
	"$fc" pause box 2>"$tmp/err"; rc=$?
	is "$rc" 0 "pause ($round)"
	[ $rc = 0 ] || sed 's/^/#   /' "$tmp/err"
	st=$(awk '/^State:/ {print $2}' "/proc/$vmm/status" 2>/dev/null)
	[ -z "$st" ] || [ "$st" = Z ]; ok $? "pause ends the VMM ($round)" "state $st"
	like "$("$fc" ps)" "box +paused" "ps says paused ($round)"
	err=$("$fc" exec box -- true 2>&1); rc=$?
	is "$rc" 1 "exec into a paused VM fails ($round)"
	like "$err" "paused \(fireclaw resume box\)" "... saying how to resume it"
	[ -s "$FIRECLAW_STATE/paused/$id/vmstate" ]; ok $? "the device state is saved under the state dir ($round)"
	# the restore hand-off (clock + entropy): through the agent, or (round 2) over SSH
	how="hand-off \(clock \+ entropy\)"; [ $round = 2 ] && how="reseed \+ clock"
	FIRECLAW_EXEC=$([ $round = 2 ] && echo ssh || echo auto) "$fc" resume -v box 2>"$tmp/err"; rc=$?
	is "$rc" 0 "resume ($round)"
	like "$(cat "$tmp/err")" "$how" "resume ($round): the guest is reseeded and its clock set ($how)"
	[ $rc = 0 ] || sed 's/^/#   /' "$tmp/err"
	out=$("$fc" exec box -- sh -c 'cat /root/state; kill -0 $(cat /tmp/bg) && echo bg-alive; a=$(cat /tmp/count); sleep 0.5; b=$(cat /tmp/count); [ $b -gt $a ] && echo counting')
	is "$(echo $out)" "kept-data bg-alive counting" "after resume ($round): the file, the background process still running"
	[ ! -e "$FIRECLAW_STATE/paused/$id" ]; ok $? "the saved state goes once resumed ($round)"
done
"$fc" resume box 2>/dev/null; is $? 1 "resume of a running VM fails"

# ---- fork: snapshot a live VM, 3 clones at once ----
"$fc" snapshot create --from box --name "$fork" 2>"$tmp/err"; rc=$?
is "$rc" 0 "snapshot create --from a live VM"
[ $rc = 0 ] || sed 's/^/#   /' "$tmp/err"
is "$("$fc" exec box -- cat /root/state)" "kept-data" "the VM goes on running after the snapshot"
clones=()
for i in 1 2 3; do
	"$fc" run --snapshot "$fork" -- sh -c 'cat /root/state; [ -z "$SSH_CONNECTION" ] && echo via-agent; head -c 16 /dev/urandom | od -An -tx1 | tr -d " \n"; echo' >"$tmp/clone$i" 2>"$tmp/clone$i.err" &
	clones+=($!)
done
wait "${clones[@]}"
is "$(cat "$tmp"/clone1 "$tmp"/clone2 "$tmp"/clone3 | grep -c '^kept-data$')" 3 "3 clones run at once, each with the VM's files"
is "$(cat "$tmp"/clone[123] | grep -v kept-data | grep -E '^[0-9a-f]{32}$' | sort -u | wc -l)" 3 "the 3 clones print distinct random bytes"
is "$(cat "$tmp"/clone[123] | grep -c '^via-agent$')" 3 "... over the agent (the snapshot --from has its channel; its hand-off reseeded them)"
out=$("$fc" run --snapshot "$fork" --vcpu 2 -- true 2>&1)
like "$out" "--vcpu/--mem ignored: snapshot '$fork' fixes 1 vCPU" "run --snapshot --vcpu says the snapshot fixes the size"
cid=$("$fc" start --snapshot "$fork" --name clone 2>/dev/null)
is "$("$fc" exec clone -- cat /root/state)" "kept-data" "start --snapshot: a kept clone"
"$fc" stop clone; is $? 0 "stop the clone"

# a `run --keep` VM is a kept VM like start's
kid=$("$fc" run --keep -- true 2>&1 | sed -n 's/^VM \([0-9a-f]*\) is still running.*/\1/p')
is "$("$fc" exec "$kid" -- echo kept-by-run 2>&1)" "kept-by-run" "exec into a run --keep VM"
"$fc" stop "$kid"; is $? 0 "stop a run --keep VM"

# ---- stop, TTL, a stopped VM ----
"$fc" exec box -- sh -c 'echo followed-$((6*7)) >/dev/console'
for _ in $(seq 100); do grep -q followed-42 "$tmp/follow" && break; sleep 0.1; done
grep -q followed-42 "$tmp/follow"; ok $? "logs -f prints what the console adds"
"$fc" stop box; is $? 0 "stop by name"
for _ in $(seq 50); do kill -0 $follower 2>/dev/null || break; sleep 0.1; done
! kill -0 $follower 2>/dev/null; ok $? "logs -f ends once the VM is gone"
err=$("$fc" exec box -- true 2>&1); is $? 1 "exec after stop fails"
"$fc" stop box 2>/dev/null; is $? 1 "stop of an unknown VM fails"
[ ! -e "$FIRECLAW_STATE/paused/$id" ]; ok $? "no saved state left"
no_leaks "sessions: start … stop"

out=$("$fc" start --ttl 1s --json); exp=$(printf '%s' "$out" | jget 'd["expires"]'); tid=$(printf '%s' "$out" | jget 'd["id"]')
while [ "$(date +%s)" -le "$exp" ]; do sleep 0.2; done # until its time to live has passed
err=$("$fc" exec "$tid" -- true 2>&1); rc=$?
is "$rc" 1 "exec into a VM whose TTL has passed fails"
like "$err" "no VM '$tid'" "... it was removed by that command"
no_leaks "expired TTL reaped by the next command"
out=$("$fc" start --ttl 1s --json); exp=$(printf '%s' "$out" | jget 'd["expires"]')
while [ "$(date +%s)" -le "$exp" ]; do sleep 0.2; done
"$fc" cleanup -q; is $? 0 "cleanup"
no_leaks "expired TTL reaped by cleanup"

sid=$("$fc" start --name dying)
vmm=$("$fc" ps --json | jget '[v["vmm_pid"] for v in d if v["name"] == "dying"][0]')
kill -9 "$vmm"; while [ -e "/proc/$vmm" ]; do sleep 0.1; done
like "$("$fc" ps)" "dying +stopped" "ps: a VM whose VMM died is stopped"
err=$("$fc" exec dying -- true 2>&1); rc=$?
is "$rc" 1 "exec into a stopped VM fails"
like "$err" "stopped, its VMM is gone \(fireclaw stop dying removes it\)" "... saying how to remove it"
"$fc" stop dying; is $? 0 "stop removes the stopped VM"
no_leaks "stopped VM"

err=$("$fc" start --ttl soon 2>&1); is $? 2 "start --ttl with junk is a usage error"
err=$("$fc" start --name '../x' 2>&1); is $? 2 "start --name with junk is a usage error"
err=$("$fc" start --name abcdef 2>&1); is $? 2 "start --name that looks like an id is a usage error"
no_leaks "refused starts"
echo "1..$_tap_n"
[ "$_tap_failed" = 0 ]
