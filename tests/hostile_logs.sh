# A guest flooding its console (real QEMU guests): no file in the VM's run directory grows
# past the log cap (FIRECLAW_LOG_CAP, 1 MiB), the console keeps its start and its last
# lines, the run completes, and the log sink goes with the VMM — after a normal end, after
# SIGKILL of fireclaw, and for a kept VM at `fireclaw rm` — each followed by a leak check.
set -u
source "$FIRECLAW_TESTS/lib/tap.sh"
source "$FIRECLAW_TESTS/lib/leaks.sh"
tmp=$(mktemp -d)
# a copy of the binary under test: a concurrent build cannot swap it mid-run
cp "$FIRECLAW" "$tmp/fireclaw"
fc=$tmp/fireclaw
bg=()
cleanup() {
	local p
	exec 3>&- 2>/dev/null
	for p in "${bg[@]}"; do kill -KILL "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
	"$fc" cleanup --all -q >/dev/null 2>&1
	rm -rf "$tmp"
}
trap cleanup EXIT
cd "$tmp" # the built-in recipes, not a ./recipes of the working directory
export FIRECLAW_VMM=qemu
export FIRECLAW_RUN=$tmp/run FIRECLAW_NETNS_PREFIX=fc-${FIRECLAW_TEST_TAG:-}hl
unset FIRECLAW_LOG_CAP
cap=1048576
flood=$((6 * cap))

# wait (bounded) until a file matches, while process PID lives
wait_for() { # FILE REGEX PID
	local i
	for i in $(seq 30000); do
		grep -qE -- "$2" "$1" 2>/dev/null && return 0
		kill -0 "$3" 2>/dev/null || return 1
		sleep 0.01
	done
	return 1
}
# wait (bounded) until a command succeeds
wait_until() { # SECONDS CMD…
	local i n=$(($1 * 20))
	shift
	for ((i = 0; i < n; i++)); do "$@" && return 0; sleep 0.05; done
	return 1
}
vm_dir() { ls -d "$FIRECLAW_RUN"/vms/[0-9a-f]* 2>/dev/null | head -1; }
size() { stat -c %s "$1" 2>/dev/null || echo 0; }
# every file in the VM directories but the disk (a copy, of its own size, or an overlay of
# at most that size: the guest's writes)
sizes() { find "$FIRECLAW_RUN/vms" -type f ! -name disk.ext4 ! -name disk.qcow2 -printf '%s %p\n' 2>/dev/null; }
# sample sizes into FILE while PID lives
sample() { # PID FILE
	while kill -0 "$1" 2>/dev/null; do sizes >>"$2"; sleep 0.1; done
}
# the largest size any file reached in a samples file, with its name
largest() { sort -n "$1" 2>/dev/null | tail -1; }
sinks() { grep -lsa -- "--log-sink" /proc/[0-9]*/cmdline 2>/dev/null | xargs -r grep -lsa -- "$FIRECLAW_RUN/vms/" ; }
no_procs() { [ -z "$(grep -lsa -- "$FIRECLAW_RUN/vms/" /proc/[0-9]*/cmdline 2>/dev/null)" ]; }

"$fc" cleanup -q >/dev/null 2>&1
no_leaks "before the tests"
"$fc" -q image build >/dev/null
ok $? "default image present"

# ---- 1. a run whose command floods the console, then waits for a line on stdin ----
mkfifo "$tmp/in"
"$fc" run --no-snapshot -- sh -c "echo FLOOD-START > /dev/console
	yes 'a line of console flood, again and again' | head -c $flood > /dev/ttyS0
	printf '\\nFLOOD-END\\n' > /dev/ttyS0; echo flooded; read x; echo bye" \
	<"$tmp/in" >"$tmp/out1" 2>"$tmp/err1" &
run=$!
bg+=("$run")
exec 3>"$tmp/in"
sample "$run" "$tmp/sizes1" &
bg+=($!)
wait_for "$tmp/out1" '^flooded' "$run"
ok $? "the guest wrote $flood bytes to its console" "$(cat "$tmp/err1")"
dir=$(vm_dir)
console=$dir/console.log
# the sink rewrites the file's tail within a fraction of a second of the last write
wait_until 10 grep -q FLOOD-END "$console"
ok $? "the console's last line arrived"
c=$(size "$console")
[ "$c" -le "$cap" ] && [ "$c" -gt $((cap / 2)) ]
ok $? "console.log holds at most the cap ($c of $cap bytes)"
head -c $((cap / 2)) "$console" | grep -q FLOOD-START
ok $? "its first half is the start of the console (boot, then the flood's first line)"
like "$(grep -a 'fireclaw: [0-9]* bytes dropped here' "$console")" "dropped here" \
	"a line says how much was dropped"
# (the guest's tty writes \r\n)
is "$(tail -n 1 "$console" | tr -d '\r')" "FLOOD-END" "its last line is the guest's last line"
is "$("$fc" -e "io.write(require('fireclaw.vm').log_tail('$console', 1))" | tr -d '\r')" \
	"FLOOD-END" "vm.log_tail returns the last line"
sinks=$(sinks)
[ -n "$sinks" ]
ok $? "a log sink process names the VM's files (leak checks count it)"
echo go >&3
exec 3>&-
wait "$run"
is $? 0 "the run completes with the command's status"
like "$(cat "$tmp/out1")" "bye" "after the flood the command went on"
big=$(largest "$tmp/sizes1")
[ -n "$big" ] && [ "${big%% *}" -le "$cap" ]
ok $? "no file in the VM's directory ever grew past $cap bytes" "largest: $big"
no_leaks "a flooding run"

# ---- 2. SIGKILL of fireclaw while the guest floods: VMM and sink go by themselves ----
"$fc" run --no-snapshot -- sh -c 'echo started; yes endless flood > /dev/ttyS0' \
	>"$tmp/out2" 2>&1 &
run=$!
bg+=("$run")
sample "$run" "$tmp/sizes2" &
bg+=($!)
wait_for "$tmp/out2" '^started' "$run"
ok $? "a guest floods its console without end" "$(cat "$tmp/out2")"
console=$(vm_dir)/console.log
wait_until 120 grep -q "bytes dropped here" "$console"
ok $? "its console reached the cap"
kill -KILL "$run"
wait "$run" 2>/dev/null
wait_until 20 no_procs
ok $? "the VMM (PR_SET_PDEATHSIG) and then its log sink (EOF) ended without fireclaw" \
	"$(ps -o pid,args -p "$(grep -lsa -- "$FIRECLAW_RUN/vms/" /proc/[0-9]*/cmdline | cut -d/ -f3 | tr '\n' ,)0" 2>&1)"
big=$(largest "$tmp/sizes2")
[ -n "$big" ] && [ "${big%% *}" -le "$cap" ]
ok $? "no file grew past the cap" "largest: $big"
"$fc" cleanup -q
no_leaks "SIGKILL + cleanup"

# ---- 3. a kept VM flooding after fireclaw exited: its sink stays, and goes with rm ----
err=$("$fc" run --keep --no-snapshot -- sh -c \
	'yes kept flood > /dev/ttyS0 2>&1 </dev/null & echo flooding' 2>&1)
is $? 0 "--keep run whose guest floods on in the background"
id=$(printf '%s' "$err" | sed -n 's/^VM \([0-9a-f]*\) is still running.*/\1/p')
console=$FIRECLAW_RUN/vms/$id/console.log
wait_until 120 grep -q "bytes dropped here" "$console"
ok $? "the kept VM's console reached the cap after fireclaw exited"
[ -n "$(sinks)" ]
ok $? "its log sink outlives fireclaw"
for i in 1 2 3 4 5; do sizes; sleep 0.2; done >"$tmp/sizes3"
big=$(largest "$tmp/sizes3")
[ -n "$big" ] && [ "${big%% *}" -le "$cap" ]
ok $? "and keeps every file within the cap" "largest: $big"
"$fc" rm "$id" 2>/dev/null
is $? 0 "fireclaw rm ID"
no_leaks "--keep then rm"

done_testing
