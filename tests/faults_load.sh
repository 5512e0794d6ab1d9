# Load (issue 9): 100 VMs restored one after the other and 20 four at a time from one
# snapshot inside ONE fireclaw process (tests/lib/restore_loop.lua) — no failure, and its
# open fds and RSS do not grow with the number of VMs; then 20 `fireclaw run` processes four
# at a time. Nothing is left behind.
set -u
source "$FIRECLAW_TESTS/lib/tap.sh"
source "$FIRECLAW_TESTS/lib/leaks.sh"
fc=$FIRECLAW
tmp=$(mktemp -d)
FAULTS_PREFIX=fc-${FIRECLAW_TEST_TAG:-}fll
source "$FIRECLAW_TESTS/lib/faults.sh"
trap '"$fc" cleanup --all -q >/dev/null 2>&1; rm -rf "$tmp"' EXIT

faults_begin

# loop N WIDTH NAME: restore_loop.lua in one process; its numbers checked
loop() {
	local n=$1 width=$2 name=$3
	"$fc" "$FIRECLAW_TESTS/lib/restore_loop.lua" "$n" "$width" >"$tmp/loop.out" 2>"$tmp/loop.err"
	is "$?" 0 "$name: the loop ends well" "$(tail -5 "$tmp/loop.err")"
	is "$(sed -n 's/^failures //p' "$tmp/loop.out")" 0 "$name: 0 failures" "$(tail -5 "$tmp/loop.err")"
	read -r _ f0 f1 < <(grep '^fds ' "$tmp/loop.out")
	is "${f1:-?}" "${f0:-!}" "$name: open fds after the first round and at the end"
	read -r _ r0 r1 < <(grep '^rss ' "$tmp/loop.out")
	# a leak of one small allocation per VM would show; allocator noise stays far below
	[ -n "${r0:-}" ] && [ "$r1" -le $((r0 + 4096)) ]
	ok $? "$name: RSS does not grow (+4 MiB at most)" "VmRSS ${r0:-?} -> ${r1:-?} kB"
	echo "# $name: fds ${f0:-?} -> ${f1:-?}, VmRSS ${r0:-?} -> ${r1:-?} kB"
	no_leaks "$name"
}

loop 100 1 "100 sequential restores in one process"
loop 20 4 "20 restores four at a time in one process"

# 20 fireclaw processes, four at a time, from the same snapshot
fails=0
for round in 1 2 3 4 5; do
	pids=()
	for i in 1 2 3 4; do
		"$fc" run -- echo "run $round.$i" >"$tmp/par.$round.$i" 2>"$tmp/par.$round.$i.err" &
		pids+=($!)
	done
	for i in 1 2 3 4; do
		wait "${pids[$((i - 1))]}" && [ "$(cat "$tmp/par.$round.$i")" = "run $round.$i" ] || {
			fails=$((fails + 1))
			sed 's/^/# /' "$tmp/par.$round.$i.err"
		}
	done
done
is "$fails" 0 "20 runs, four processes at a time: 0 failures"
no_leaks "20 runs four at a time"

done_testing
