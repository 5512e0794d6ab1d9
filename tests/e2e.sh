# End to end on real VMs (QEMU microvm; TCG on hosts without hardware virtualization):
# cold run, snapshot create, restored runs, statuses, stdin, files, JSON, timeout,
# concurrency, Ctrl-C and SIGKILL + cleanup — each followed by a leak check.
source "$FIRECLAW_TESTS/lib/vmsuite.sh" e2e

"$fc" cleanup -q >/dev/null 2>&1
no_leaks "before the tests"

# image (built once, cached) and a cold run
"$fc" -q image build >/dev/null
ok $? "default image present"
out=$("$fc" run --no-snapshot -- uname -r 2>"$tmp/err"); rc=$?
is "$rc" 0 "cold run exits 0"
like "$out" "^[0-9]+\.[0-9]+" "cold run prints the guest kernel release"
no_leaks "cold run"
# the first command of a cold boot runs in a configured guest: the initramfs's /init sets the
# network, hostname and mounts before it starts the agent (no race with the image's init)
out=$("$fc" run --no-snapshot -v -- sh -c 'ip -4 -o addr show dev eth0; ip route show default; hostname
	stat -f -c %T /tmp /run /dev/shm /dev/pts; readlink /dev/fd; echo "uptime $(cut -d" " -f1 /proc/uptime)"
	echo "string-op flags: $(grep -c -w -E "erms|fsrm" /proc/cpuinfo)"
	echo "modules: $(cut -d" " -f1 /proc/modules | sort | tr "\n" " ")"' 2>&1)
like "$out" "inet 172\.16\.0\.2/30 " "cold: the first command sees eth0's address" "$out"
like "$out" "default via 172\.16\.0\.1 dev eth0" "… the default route"
[[ "$out" == *$'\nfireclaw\ntmpfs\ntmpfs\ntmpfs\ndevpts\n/proc/self/fd\n'* ]]
ok $? "… the hostname, /tmp, /run, /dev/shm (tmpfs), /dev/pts and /dev/fd" "$out"
# the initramfs loads the drivers of the devices the VM has (guest/init-modules.h): disk,
# NIC, entropy and the agent's virtio-serial under QEMU; no vsock (Firecracker's)
like "$out" "modules: failover net_failover virtio virtio_blk virtio_console virtio_mmio virtio_net virtio_ring virtio_rng \$" \
	"cold: the drivers of QEMU's devices are loaded, the vsock modules are not"
echo "# cold: the first command ran at guest $(echo "$out" | grep -o 'uptime .*')"
# under TCG the guest sees no ERMS/FSRM, so its kernel avoids byte-wise rep movs/stos,
# which TCG runs one byte per loop (docs/guest-notes.md, "Booting under TCG")
if grep -q "qemu with tcg chosen" <<<"$out"; then
	like "$out" "string-op flags: 0" "TCG: the guest CPU has no ERMS/FSRM"
else
	skip "not TCG: the guest CPU is the host's"
fi

# snapshot, then restored runs
"$fc" snapshot create 2>"$tmp/err"; rc=$?
is "$rc" 0 "snapshot create"
[ $rc = 0 ] || sed 's/^/#   /' "$tmp/err"
like "$("$fc" snapshot list)" "^default +default +qemu" "snapshot list shows it"
no_leaks "snapshot create"

out=$("$fc" run --json -- sh -c 'echo out; echo err >&2; exit 3'); rc=$?
is "$rc" 3 "restored run: exit status 3 propagates"
like "$out" '"boot":"snapshot"' "--json says it was restored from the snapshot"
like "$out" '"stdout":"out\\n"' "--json carries stdout"
like "$out" '"stderr":"err\\n"' "--json carries stderr"
like "$out" '"exit_code":3' "--json carries the exit code"

"$fc" run -- true; is $? 0 "status 0"
"$fc" run -- sh -c 'exit 1'; is $? 1 "status 1"
"$fc" run -- no-such-command-xyz 2>/dev/null; is $? 127 "command not found is 127"
"$fc" run -- sh -c 'kill -KILL $$'; is $? 137 "killed by SIGKILL is 128+9"

out=$(printf 'line one\nline two\n' | "$fc" run -- wc -l)
is "$(echo $out)" "2" "stdin is forwarded when it is not a terminal"

out=$("$fc" run -- sh -c 'date +%s')
now=$(date +%s)
diff=$(( now - out )); diff=${diff#-}
[ "$diff" -le 5 ]; ok $? "a restored guest's clock is set to the host's" "guest $out host $now"

# argv arrives verbatim
weird=$'a b\t"c" \'d\' $HOME `id` ; | & \\ *\nnewline'
out=$("$fc" run -- printf '%s|' "$weird" "" "x")
is "$out" "$weird||x|" "argv with hostile characters arrives verbatim"

# files in and out
head -c 100000 /dev/urandom > "$tmp/in.bin"
"$fc" run --put "$tmp/in.bin:/root/in.bin" --get "/root/in.bin:$tmp/out.bin" -- sh -c 'test -s /root/in.bin'
is $? 0 "--put then --get"
cmp -s "$tmp/in.bin" "$tmp/out.bin"; ok $? "the file comes back identical"
err=$("$fc" run --put /nonexistent:/x -- true 2>&1); rc=$?
is "$rc:$err" "2:fireclaw: --put: no such file '/nonexistent'" "bad --put path: usage error before any VM"

out=$("$fc" run --env FOO='bar baz' -- sh -c 'echo "$FOO"')
is "$out" "bar baz" "--env"

# timeout
"$fc" -q run --timeout 1 -- sleep 30; is $? 124 "--timeout gives 124"
no_leaks "after the timeout"

# three restored runs at once
for i in 1 2 3; do "$fc" run -- sh -c "echo run$i; hostname" > "$tmp/c$i" 2>&1 & done
wait
all=$(cat "$tmp/c1" "$tmp/c2" "$tmp/c3" | grep -c '^run')
is "$all" 3 "three concurrent restored runs all succeed"
no_leaks "concurrent runs"

# Ctrl-C in the middle of a command
"$fc" run -- sh -c 'echo started; sleep 60' > "$tmp/int.out" 2>&1 &
pid=$!
for _ in $(seq 2000); do grep -q started "$tmp/int.out" && break; sleep 0.01; done
kill -INT $pid; wait $pid; rc=$?
is "$rc" 130 "SIGINT during a command exits 130"
no_leaks "SIGINT"

# SIGKILL of fireclaw, then cleanup
"$fc" run -- sh -c 'echo started; sleep 60' > "$tmp/kill.out" 2>&1 &
pid=$!
for _ in $(seq 2000); do grep -q started "$tmp/kill.out" && break; sleep 0.01; done
kill -KILL $pid; wait $pid 2>/dev/null
"$fc" cleanup -q; is $? 0 "cleanup after SIGKILL"
no_leaks "SIGKILL + cleanup"

# --keep: the VM outlives fireclaw, is reachable with the printed (pinned) ssh line,
# survives cleanup, and goes with fireclaw rm
err=$("$fc" run --keep -- true 2>&1); rc=$?
is "$rc" 0 "--keep run"
id=$(printf '%s' "$err" | sed -n 's/^VM \([0-9a-f]*\) is still running.*/\1/p')
reach=$(printf '%s' "$err" | sed -n 's/^  reach it: //p')
out=$($reach -o BatchMode=yes -o LogLevel=ERROR cat /etc/hostname 2>&1)
is "$out" "fireclaw" "the kept VM answers the printed ssh line (host key pinned)"
"$fc" cleanup -q
like "$("$fc" ps)" "$id .*kept" "cleanup leaves a kept VM alone"
"$fc" rm "$id" 2>/dev/null; is $? 0 "fireclaw rm ID"
no_leaks "--keep then rm"

# a stale snapshot is refused and run falls back to a cold boot
meta=$FIRECLAW_STATE/snapshots/default/meta.json
cp "$meta" "$tmp/meta.json"
sed -i 's/"vmm_version": "[^"]*"/"vmm_version": "0.0.0"/' "$meta"
err=$("$fc" run -- true 2>&1); rc=$?
is "$rc" 0 "a stale snapshot still runs (cold)"
like "$err" "cannot be used: .*taken with qemu 0\.0\.0.*cold booting" "with a one-line note"
cp "$tmp/meta.json" "$meta"

# the worked example from README
(cd "$tmp" && "$fc" "$OLDPWD/docs/example.lua" > example.out 2>&1); rc=$?
is "$rc" 0 "README's example recipe runs"
like "$(cat "$tmp/example.out")" "snapshot in .*/snapshots/example" "and snapshots its VM"
like "$(cat "$tmp/out.txt" 2>/dev/null)" "hello" "and copies a file out"
"$fc" snapshot rm example >/dev/null 2>&1
no_leaks "example"

done_testing
