# Clones must differ: every VM restored from a snapshot gets fresh host entropy, a
# reseeded CRNG and the host's clock (sub-second) before any user code runs, and a
# virtio-rng device. Real VMs (QEMU microvm; TCG here): three fresh snapshots, 20 restores
# spread over them (8 one after the other, 12 four at a time), then the clock, a --put
# file's mtime, the entropy device, and restore.restore() through the Lua API alone.
source "$FIRECLAW_TESTS/lib/vmsuite.sh" ent
snaps=(ent1 ent2 ent3)
cleanup() {
	for s in "${snaps[@]}"; do "$fc" -q snapshot rm "$s" >/dev/null 2>&1; done
	rm -rf "$tmp"
}
trap cleanup EXIT

"$fc" cleanup -q >/dev/null 2>&1
no_leaks "before the tests"
"$fc" -q image build >/dev/null
ok $? "default image present (with /usr/sbin/fireclaw-guest)"

# several fresh snapshots: whether clones repeat depends on the CRNG state at snapshot time
made=0
for s in "${snaps[@]}"; do
	"$fc" -q snapshot create --name "$s" 2>"$tmp/err" && made=$((made + 1)) || sed 's/^/#   /' "$tmp/err"
done
is "$made" 3 "three fresh snapshots"

# what a clone prints first: 16 bytes of /dev/urandom (hex) and a kernel UUID
probe='head -c 16 /dev/urandom | od -An -tx1 | tr -d " \n"; echo; cat /proc/sys/kernel/random/uuid'
clone() { # clone N SNAPSHOT
	"$fc" run --snapshot "$2" -- sh -c "$probe" >"$tmp/out.$1" 2>"$tmp/err.$1"
	echo $? >"$tmp/rc.$1"
}
n=0
for i in 1 2 3 4 5 6 7 8; do # one after the other, round robin over the snapshots
	n=$((n + 1))
	clone "$n" "${snaps[$((n % 3))]}"
done
for batch in 1 2 3; do # four at a time
	for i in 1 2 3 4; do
		n=$((n + 1))
		clone "$n" "${snaps[$((n % 3))]}" &
	done
	wait
done
good=0
for i in $(seq 1 20); do
	[ "$(cat "$tmp/rc.$i")" = 0 ] && [ "$(wc -l <"$tmp/out.$i")" = 2 ] && good=$((good + 1))
done
is "$good" 20 "20 restored runs (8 sequential, 12 four at a time) each printed bytes and a UUID" \
	"$(cat "$tmp"/err.* | sort | uniq -c | head -5)"
rand=$(for i in $(seq 1 20); do sed -n 1p "$tmp/out.$i"; done)
uuid=$(for i in $(seq 1 20); do sed -n 2p "$tmp/out.$i"; done)
# the samples, for the record (snapshot, /dev/urandom, UUID)
for i in $(seq 1 20); do
	echo "#   restore $i from ${snaps[$((i % 3))]}: $(sed -n 1p "$tmp/out.$i") $(sed -n 2p "$tmp/out.$i")"
done
is "$(echo "$rand" | grep -cE '^[0-9a-f]{32}$')" 20 "every sample is 16 bytes of hex"
n=$(echo "$rand" | sort -u | wc -l)
[ "$n" = 20 ]
ok $? "20 distinct /dev/urandom samples (got $n)" "repeated: $(echo "$rand" | sort | uniq -d | tr '\n' ' ')"
n=$(echo "$uuid" | sort -u | grep -cE '^[0-9a-f-]{36}$')
[ "$n" = 20 ]
ok $? "20 distinct kernel UUIDs (got $n)" "repeated: $(echo "$uuid" | sort | uniq -d | tr '\n' ' ')"
no_leaks "20 restores"

# clock: the guest's time when it starts the command against the host's when that line
# arrives (streamed); a --put file written after the restore carries the current time;
# the entropy device is bound. ent1 is the oldest snapshot: its clock is tens of seconds old.
echo put >"$tmp/put.txt"
"$fc" run --snapshot ent1 --put "$tmp/put.txt:/root/put.txt" -- sh -c \
	'adjtimex | awk "/tv_sec/ { s = \$2 } /tv_usec/ { u = \$2 } END { printf \"clock %d.%06d\\n\", s, u }";
	 echo "mtime $(stat -c %Y /root/put.txt)"; echo "rng $(cat /sys/class/misc/hw_random/rng_current)"' \
	2>"$tmp/err" | while read -r line; do echo "$line $EPOCHREALTIME"; done >"$tmp/clock"
read -r _ guest host < <(grep '^clock ' "$tmp/clock")
d=$(awk -v g="${guest:-0}" -v h="${host:-0}" 'BEGIN { printf "%.3f", h - g }')
[ -n "${guest:-}" ] && awk -v d="$d" 'BEGIN { exit !(d >= -0.2 && d <= 1.0) }'
ok $? "the restored guest's clock is the host's to a fraction of a second (host - guest = $d s)" "$(cat "$tmp/clock" "$tmp/err")"
read -r _ mtime host < <(grep '^mtime ' "$tmp/clock")
d=$(awk -v m="${mtime:-0}" -v h="${host:-0}" 'BEGIN { printf "%d", h - m }')
[ "${mtime:-0}" -gt 0 ] && [ "$d" -ge -1 ] && [ "$d" -le 2 ]
ok $? "a --put file carries the current time (host - mtime = $d s)" "$(cat "$tmp/clock")"
like "$(grep '^rng ' "$tmp/clock")" '^rng virtio_rng' "the guest's hw_random is the virtio-rng device"
no_leaks "clock and --put"

# the Lua API: restore.restore() alone gives a reseeded VM with the host's clock
"$fc" "$FIRECLAW_TESTS/lib/entropy_api.lua" ent2 >"$tmp/api" 2>"$tmp/err"
is "$?" 0 "two VMs restored through restore.restore()" "$(cat "$tmp/err")"
is "$(grep -cE '^vm [12] [0-9a-f]{32} [0-9a-f-]{36} [0-9]+\.[0-9]+ ' "$tmp/api")" 2 "each answered" "$(cat "$tmp/api")"
grep '^vm ' "$tmp/api" >"$tmp/vms"
[ "$(awk '{ print $3 }' "$tmp/vms" | sort -u | wc -l)" = 2 ]
ok $? "their random bytes differ" "$(cat "$tmp/vms")"
[ "$(awk '{ print $4 }' "$tmp/vms" | sort -u | wc -l)" = 2 ]
ok $? "their UUIDs differ" "$(cat "$tmp/vms")"
# (the guest's clock lags the host's by the reseed exec's latency: ms with KVM, up to a
# good part of a second under TCG on a busy host)
[ "$(awk '$5 >= $6 - 1.0 && $5 <= $7 + 0.05' "$tmp/vms" | wc -l)" = 2 ]
ok $? "their clocks are the host's (within ~1 s), not the snapshot's" \
	"$(awk '{ printf "guest - host before the exec: %.3f s, exec took %.3f s\n", $5 - $6, $7 - $6 }' "$tmp/vms")"
like "$(grep '^failing helper: ' "$tmp/api")" "reseeding the guest failed \(/usr/sbin/fireclaw-guest exited 1\): broken$" \
	"a failing helper fails the reseed, saying so"
read -r _ _ res gsec hsec < <(grep '^no helper: ' "$tmp/api")
[ "${res:-}" = ok ] && [ $(( ${hsec:-0} - ${gsec:-0} )) -ge -1 ] && [ $(( ${hsec:-0} - ${gsec:-0} )) -le 2 ]
ok $? "an image without the helper still gets its clock set" "$(cat "$tmp/api")"
like "$(cat "$tmp/err")" "image 'default' has no /usr/sbin/fireclaw-guest: .*fireclaw image build --force" \
	"... and a note saying to rebuild it"
no_leaks "Lua API restores"

done_testing
