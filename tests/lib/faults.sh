# faults.sh: what tests/faults*.sh share. source "$FIRECLAW_TESTS/lib/faults.sh" after
# tap.sh and leaks.sh, with $tmp set (removed by the caller's EXIT trap).
#
# A private world, so that other people's runs, benchmarks and image rebuilds on the same
# machine neither disturb these tests nor count as their leftovers:
#   FIRECLAW_STATE=$tmp/state   the current default image and its snapshot as hard links (or
#                               copies) of the suite's state (tests/run's FIRECLAW_STATE,
#                               never the user's), else a snapshot made here
#   FIRECLAW_RUN=$tmp/run, FIRECLAW_NETNS_PREFIX=$FAULTS_PREFIX (fc-<something>)
# Helpers: faults_begin, vmm_pid, wait_for, wait_gone, status_of, one_line, finish (cleanup + leak check).
export FIRECLAW_VMM=qemu
shared=${FIRECLAW_STATE:?tests/run sets FIRECLAW_STATE}
export FIRECLAW_STATE=$tmp/state FIRECLAW_RUN=$tmp/run FIRECLAW_NETNS_PREFIX=$FAULTS_PREFIX
source "$FIRECLAW_TESTS/lib/seed.sh" # link_dir, private_state

snapshot_usable() {
	"$fc" -e 'local s, why = require("fireclaw.cli").use("restore").find {}
		if not s then io.stderr:write(why, "\n") os.exit(1) end' 2>/dev/null
}

# The private state: image + keys + snapshot. Returns non-zero if there is no way to get one.
setup_state() {
	local try
	for try in 1 2 3; do # someone may be rebuilding the shared image right now
		rm -rf "$FIRECLAW_STATE"
		private_state "$shared" "$FIRECLAW_STATE" 2>/dev/null && break
	done
	[ -f "$FIRECLAW_STATE/images/default/manifest.json" ] || return 1
	mkdir -p "$FIRECLAW_STATE/snapshots"
	link_dir "$shared/snapshots/default" "$FIRECLAW_STATE/snapshots/default" 2>/dev/null
	snapshot_usable && return 0
	rm -rf "$FIRECLAW_STATE/snapshots/default"
	"$fc" -q snapshot create >/dev/null 2>&1
	snapshot_usable
}

# faults_begin: a suite's start: a cleanup, the leak check, the private state (without
# one the suite fails at once: one "not ok" and exit 1)
faults_begin() {
	"$fc" cleanup -q >/dev/null 2>&1
	no_leaks "before the tests"
	if ! setup_state; then
		ok 1 "a private state with the default image and its snapshot"
		done_testing
		exit 1
	fi
}

# pid of the VMM of the (only) VM in $FIRECLAW_RUN, from its record, once it is there
vmm_pid() {
	sed -n '/"vmm"/,/}/s/.*"pid": *\([0-9][0-9]*\).*/\1/p' "$FIRECLAW_RUN"/vms/*/record.json 2>/dev/null | head -1
}

# wait_for TRIES CMD…: poll CMD every 10 ms, at most TRIES times; status of the last try
wait_for() {
	local n=$1
	shift
	while [ "$n" -gt 0 ]; do
		"$@" && return 0
		n=$((n - 1))
		sleep 0.01
	done
	return 1
}

# wait_gone PID: a process of ours ends (bounded: ~30 s)
wait_gone() { wait_for 3000 eval "! kill -0 $1 2>/dev/null"; }

# status_of CMD…: CMD's exit status (its output in $tmp/out and $tmp/err), without bash's
# "Killed" notice when it dies of a signal
status_of() { { "$@" >"$tmp/out" 2>"$tmp/err"; echo $?; } 2>/dev/null; }

# one_line FILE: the file has exactly one line and it starts "fireclaw: "
one_line() { [ "$(wc -l <"$1")" = 1 ] && grep -q '^fireclaw: ' "$1"; }

# finish NAME: cleanup, then the leak check (and the cleanup's own status)
finish() {
	"$fc" cleanup -q >/dev/null 2>&1
	ok $? "cleanup runs: $1"
	no_leaks "$1"
}
