# Faults (issue 9): fireclaw SIGKILLed at each stage of a run (FIRECLAW_FAULT, see
# lua/fireclaw/fault.lua) and `fireclaw cleanup` afterwards; an error raised at each stage
# (the run cleans up by itself); cleanup itself killed halfway; a snapshot build killed; a
# kept VM whose fireclaw died while it was being made; the VMM killed during a command; the
# guest's sshd killed; the guest powering off; the run directory full (a tiny tmpfs in a
# private mount namespace); unwritable state and run directories. Every case ends with the
# leak check. Bad input: tests/faults_input.sh; load: tests/faults_load.sh.
set -u
source "$FIRECLAW_TESTS/lib/tap.sh"
source "$FIRECLAW_TESTS/lib/leaks.sh"
fc=$FIRECLAW
tmp=$(mktemp -d)
FAULTS_PREFIX=fc-${FIRECLAW_TEST_TAG:-}flt
source "$FIRECLAW_TESTS/lib/faults.sh"
trap '"$fc" cleanup --all -q >/dev/null 2>&1; rm -rf "$tmp"' EXIT

faults_begin

# ---- SIGKILL at each point of a restored run, then cleanup ----
for p in record netns tap disk cgroup vmm-spawned vmm-recorded ram-filled agent-ready reseeded exec exec-output \
	command-done teardown-agent teardown-vmm reap-vmm reap-netns; do
	is "$(status_of env FIRECLAW_FAULT=$p "$fc" run -- echo hi)" 137 "SIGKILL at $p: fireclaw died there"
	finish "SIGKILL at $p"
done
# ... and at the SSH path's own points (--exec ssh: the same snapshot, over SSH)
for p in ssh-ready reseeded teardown-session; do
	is "$(status_of env FIRECLAW_FAULT=$p "$fc" run --exec ssh -- echo hi)" 137 "SIGKILL at $p (--exec ssh)"
	finish "SIGKILL at $p (--exec ssh)"
done

# ... and at the points a cold boot has of its own
for p in vmm-spawned vmm-recorded; do
	is "$(status_of env FIRECLAW_FAULT=$p "$fc" run --no-snapshot -- echo hi)" 137 "SIGKILL at $p of a cold boot"
	finish "SIGKILL at $p of a cold boot"
done
# ... and where a disk is copied rather than an overlay (coldboot, restore: the rest of the
# copy while QEMU starts; `run` gives QEMU an overlay: tests/overlay.sh)
for r in coldboot restore; do
	is "$(status_of env FIRECLAW_FAULT=disk-rest "$fc" $r -- echo hi)" 137 "SIGKILL at disk-rest ($r: a disk copy)"
	finish "SIGKILL at disk-rest ($r)"
	FIRECLAW_FAULT=disk-rest:error "$fc" $r -- echo hi >/dev/null 2>"$tmp/err"
	is "$?:$(cat "$tmp/err")" "1:fireclaw: fault injected at disk-rest" "error at disk-rest ($r): exit 1, one line"
	no_leaks "error at disk-rest ($r), without cleanup"
done

# SIGKILL while waiting for the agent (cold boot: the VMM is up, the guest still booting)
"$fc" -v run --no-snapshot -- true >/dev/null 2>"$tmp/ssh-wait.err" &
pid=$!
wait_for 3000 grep -q "VMM boot" "$tmp/ssh-wait.err"
ok $? "cold boot reaches the agent wait"
kill -KILL $pid
wait $pid 2>/dev/null
unlike "$(cat "$tmp/ssh-wait.err")" "agent ready" "SIGKILL during the agent wait (not after it)"
finish "SIGKILL during the agent wait"

# ---- an error raised at each point: the run undoes everything itself ----
for p in record netns tap disk cgroup vmm-spawned vmm-recorded ram-filled agent-ready reseeded exec exec-output \
	command-done; do
	FIRECLAW_FAULT=$p:error "$fc" run -- echo hi >/dev/null 2>"$tmp/err"
	rc=$?
	is "$rc:$(cat "$tmp/err")" "1:fireclaw: fault injected at $p" "error at $p: exit 1, one line"
	no_leaks "error at $p, without cleanup"
done

# ---- cleanup killed halfway, twice, then run again ----
is "$(status_of env FIRECLAW_FAULT=agent-ready "$fc" run -- true)" 137 "a run killed with its VM up"
is "$(status_of env FIRECLAW_FAULT=reap-vmm "$fc" cleanup -q)" 137 "cleanup killed after killing the VMM"
is "$(status_of env FIRECLAW_FAULT=reap-netns "$fc" cleanup -q)" 137 "cleanup killed after deleting the namespace"
finish "cleanup killed halfway, then run again"

# ---- snapshot create killed after the VM state was saved ----
is "$(status_of env FIRECLAW_FAULT=snapshot-saved "$fc" snapshot create --name fltsnap)" 137 \
	"snapshot create killed after saving the VM state"
ls -A "$FIRECLAW_STATE/snapshots" | grep -q '^\.tmp-'
ok $? "it left a half-made snapshot directory"
finish "snapshot create killed"
is "$(ls -A "$FIRECLAW_STATE/snapshots" | tr '\n' ' ')" "default " "cleanup removed the half-made snapshot"

# ---- a --keep VM whose fireclaw died while it was made: its VMM is recorded ----
is "$(status_of env FIRECLAW_FAULT=vmm-spawned "$fc" run --keep -- true)" 137 \
	"run --keep killed right after spawning the VMM"
vp=$(vmm_pid)
[ -n "$vp" ] && kill -0 "$vp" 2>/dev/null
ok $? "the kept VMM lives on and is in the record" "vmm pid: '$vp'"
"$fc" cleanup -q >/dev/null 2>&1
[ -n "$vp" ] && kill -0 "$vp" 2>/dev/null
ok $? "cleanup leaves a kept VM alone"
"$fc" cleanup --all -q >/dev/null 2>&1
ok $? "cleanup --all"
no_leaks "kept VM killed while made, cleanup --all"

# ---- the VMM killed during a command: the run ends, says so, cleans up ----
"$fc" run -- sh -c 'echo started; sleep 600' >"$tmp/vmm.out" 2>"$tmp/vmm.err" &
pid=$!
wait_for 3000 grep -q started "$tmp/vmm.out"
vp=$(vmm_pid)
[ -n "$vp" ] && kill -KILL "$vp"
wait_gone $pid
ok $? "the run ends after its VMM is killed"
kill -KILL $pid 2>/dev/null
wait $pid
rc=$?
is "$rc" 1 "exit status 1"
one_line "$tmp/vmm.err"
ok $? "one line on stderr" "$(cat "$tmp/vmm.err")"
like "$(cat "$tmp/vmm.err")" "qemu was killed \(signal 9\) during the command" "which says the VMM was killed"
no_leaks "VMM killed during a command, without cleanup"

# ---- the guest's SSH server killed during the command (over SSH: --exec ssh) ----
"$fc" run --exec ssh -- sh -c 'kill -KILL $(pidof dropbear); sleep 600' >/dev/null 2>"$tmp/sshd.err" &
pid=$!
wait_gone $pid
ok $? "the run ends after the guest's sshd is killed"
kill -KILL $pid 2>/dev/null
wait $pid
is "$?" 1 "exit status 1"
one_line "$tmp/sshd.err"
ok $? "one line on stderr" "$(cat "$tmp/sshd.err")"
like "$(cat "$tmp/sshd.err")" "connection to the SSH server was lost" "which says the connection was lost"
no_leaks "guest sshd killed, without cleanup"

# ---- the guest powers off during the command ----
"$fc" run -- poweroff -f >/dev/null 2>"$tmp/off.err" &
pid=$!
wait_gone $pid
ok $? "the run ends when the guest powers off"
kill -KILL $pid 2>/dev/null
wait $pid
is "$?" 1 "exit status 1"
like "$(cat "$tmp/off.err")" "^fireclaw: VM [0-9a-f]+: qemu exited \(status 0\) during the command$" "one line: the VM stopped"
no_leaks "guest powered off, without cleanup"

# ---- the run directory's filesystem full (a tmpfs in a private mount namespace) ----
small=$tmp/small
mkdir -p "$small"
disk_kb=$(du -k "$FIRECLAW_STATE/snapshots/default/disk.ext4" | cut -f1)
full_run() { # full_run MOUNT_OPTIONS CMD…: run CMD with FIRECLAW_RUN on a fresh tmpfs
	local opts=$1
	shift
	unshare -m sh -c 'mount -t tmpfs -o "$0" tmpfs "$1" || exit 99
		dir=$1; shift
		FIRECLAW_RUN=$dir "$@"; rc=$?
		find "$dir" -mindepth 2 >"$dir.left"
		exit $rc' "$opts" "$small" "$@"
}
full_run size=200k "$fc" restore -- true 2>"$tmp/full.err"
rc=$?
is "$rc" 1 "run dir too small for the disk copy (restore): exit 1"
one_line "$tmp/full.err" && grep -q "No space left on device" "$tmp/full.err"
ok $? "one line: no space left" "$(cat "$tmp/full.err")"
is "$(cat "$small.left")" "" "nothing half-written in the run dir"
FIRECLAW_RUN=$small no_leaks "run dir full (disk copy)"

full_run size=8k,nr_inodes=3 "$fc" run -- true 2>"$tmp/full.err"
rc=$?
is "$rc" 1 "run dir without room for the record: exit 1"
one_line "$tmp/full.err" && grep -q "cannot write the VM record" "$tmp/full.err"
ok $? "one line: cannot write the record" "$(cat "$tmp/full.err")"
is "$(cat "$small.left")" "" "no VM directory without its record"
FIRECLAW_RUN=$small no_leaks "run dir full (record)"

# room for the disk copy, not for what the guest writes: an I/O error in the guest, not a
# VM paused forever (QEMU's default werror=enospc); a copy (restore), and an overlay (run:
# room for its metadata, the logs and the record only)
for r in "restore $((disk_kb + 1024))k" "run 2048k"; do
	read -r how room <<<"$r"
	full_run size=$room "$fc" $how -- dd if=/dev/zero of=/root/big bs=1M count=32 conv=fsync \
		>/dev/null 2>"$tmp/full.err"
	rc=$?
	is "$rc" 1 "guest filling the run dir ($how): the command fails (dd's status)"
	like "$(cat "$tmp/full.err")" "Input/output error" "with an I/O error in the guest"
	is "$(cat "$small.left")" "" "and the run dir is empty afterwards"
	FIRECLAW_RUN=$small no_leaks "run dir filled by the guest ($how)"
done

# ---- unwritable state and run directories ----
ro=$tmp/ro
mkdir -p "$ro"
ro_run() { # ro_run CMD…: run CMD with $ro a read-only view of the private state
	unshare -m sh -c 'mount --bind "$0" "$1" && mount -o remount,bind,ro "$1" || exit 99
		shift; "$@"' "$FIRECLAW_STATE" "$ro" "$@"
}
ro_run env FIRECLAW_STATE="$ro/nothing" "$fc" -q run -- true 2>"$tmp/ro.err"
rc=$?
is "$rc" 1 "read-only state without an image: exit 1"
one_line "$tmp/ro.err" && grep -q "Read-only file system" "$tmp/ro.err"
ok $? "one line: read-only" "$(cat "$tmp/ro.err")"
no_leaks "read-only state, no image"

ro_run env FIRECLAW_STATE="$ro" "$fc" snapshot create --name rosnap 2>"$tmp/ro.err"
rc=$?
is "$rc" 1 "snapshot create into a read-only state: exit 1 (before booting)"
one_line "$tmp/ro.err" && grep -q "Read-only file system" "$tmp/ro.err"
ok $? "one line: read-only" "$(cat "$tmp/ro.err")"
no_leaks "read-only state, snapshot create"

ro_run env FIRECLAW_RUN="$ro/run" "$fc" run -- true 2>"$tmp/ro.err"
rc=$?
is "$rc" 1 "read-only run dir: exit 1"
one_line "$tmp/ro.err" && grep -q "cannot create the VM directory.*Read-only file system" "$tmp/ro.err"
ok $? "one line: cannot create the VM directory" "$(cat "$tmp/ro.err")"
no_leaks "read-only run dir"

done_testing
