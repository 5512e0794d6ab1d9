# QEMU >= 8.2 (tools/qemu-next.sh's 10.0): a throw-away restore maps the snapshot's memory
# file privately and read-only (readonly=on,rom=off) instead of copying it into a memfd
# (the docs/DECISIONS.md entry on golden memory mapped on QEMU >= 8.2). Checked here:
# restored runs' exit codes and output; the VMM holds the golden `memory` O_RDONLY and no
# memfd; the file becomes root:<the snapshot's group> 0640, and that group only is the
# VMM's; the VMM's user reads its own snapshot's memory, cannot write it, cannot read
# another snapshot's; the file's sha256 is unchanged after guests that write a lot of RAM,
# two at a time, each seeing only its own writes; kept VMs (start, snapshot create --from,
# pause/resume) keep the memfd copy and work; a snapshot of a mapped clone (the library:
# its RAM goes in the stream) restores; a group held by another snapshot, and a VMM running
# as root, fall back to the copy; a 0660 file of an older fireclaw is taken back first;
# tests/vm_qemu.lua passes on QEMU 10; nothing left behind. Skipped when tools/qemu-next.sh has not fetched the QEMU.
set -u
cd "$(dirname "$0")/.." || exit 1
source "$FIRECLAW_TESTS/lib/tap.sh"
if [ -n "${FIRECLAW_TEST_SKIP_VM:-}" ]; then
	echo "1..0 # skip FIRECLAW_TEST_SKIP_VM"
	exit 0
fi
if ! qemu=$(tools/qemu-next.sh --check 2>&1); then
	echo "1..0 # skip $qemu"
	exit 0
fi
source "$FIRECLAW_TESTS/lib/vmsuite.sh" qnx
source "$FIRECLAW_TESTS/lib/seed.sh"
export FIRECLAW_QEMU=$qemu
shared=$FIRECLAW_STATE
export FIRECLAW_STATE=$tmp/state # its snapshots are QEMU 10's: not the other suites'
trap '"$fc" cleanup --all -q >/dev/null 2>&1; rm -rf "$tmp"' EXIT
snaps=$FIRECLAW_STATE/snapshots

"$fc" cleanup -q >/dev/null 2>&1
no_leaks "before the tests"
private_state "$shared" "$FIRECLAW_STATE"
ok $? "a private state with the default image"

like "$("$fc" doctor 2>&1)" "qemu 10\.[0-9.]+ at $qemu: .*restores map the snapshot's memory" \
	"doctor: QEMU 10's restores map the snapshot's memory"

# ---- a snapshot taken with QEMU 10 ----
"$fc" -q snapshot create >/dev/null 2>"$tmp/err"
ok $? "snapshot create with $qemu" "$(cat "$tmp/err")"
like "$(cat "$snaps/default/meta.json")" '"vmm_version": *"10\.' "the snapshot records QEMU 10"
is "$(stat -c '%a %u:%g' "$snaps/default/memory")" "600 0:0" "a new snapshot's memory: root's alone (0600)"
sgid() { D=$1 "$fc" -e 'print(require("fireclaw.vmm.qemu").snapshot_gid(os.getenv("D")))'; }
gid=$(sgid "$snaps/default")
base=$("$fc" -e 'local q = require("fireclaw.vmm.qemu") print(q.SNAP_GID_BASE, q.UID_BASE)')
read -r gbase ubase <<<"$base"
[ "$gid" -ge "$gbase" ] && [ "$gid" -lt $((gbase + 16777216)) ] && [ "$gbase" -ge $((ubase + 1 + 16777216)) ]
ok $? "the snapshot's group ($gid) is in a range of its own, above every per-VM user (UID_BASE $ubase + 1 + 24 bits)"
sum0=$(sha256sum <"$snaps/default/memory")

# ---- a throw-away restore maps it ----
out=$("$fc" -v run -- sh -c 'echo out; echo err >&2; exit 7' 2>"$tmp/err")
is "$?:$out" "7:out" "a restored run: its exit status and stdout"
like "$(cat "$tmp/err")" "^err$" "… and its stderr"
like "$(cat "$tmp/err")" "guest RAM: [^ ]*/snapshots/default/memory mapped privately \(group $gid\)" \
	"the restore maps the snapshot's memory (fireclaw -v)"
is "$(stat -c '%a %u:%g' "$snaps/default/memory")" "640 0:$gid" \
	"its first restore gave the memory to the snapshot's group: root:$gid 0640"

# a second snapshot, its memory given to its own group the same way (a copy of the first
# under another name: another group)
cp -a --sparse=always "$snaps/default" "$snaps/other"
ogid=$(sgid "$snaps/other")
out=$("$fc" -v run --snapshot other -- echo other 2>"$tmp/err")
is "$out" "other" "a restore of another snapshot" "$(cat "$tmp/err")"
is "$(stat -c '%a %u:%g' "$snaps/other/memory")" "640 0:$ogid" "… whose memory is its own group's ($ogid, not $gid)"

# ---- while a restored VM runs: its VMM's descriptors and user ----
"$fc" run -- sh -c 'echo ready; sleep 60' >"$tmp/live" 2>&1 &
runpid=$!
n=0
while ! grep -q ready "$tmp/live" 2>/dev/null && [ $n -lt 3000 ]; do sleep 0.01; n=$((n + 1)); done
vp=$(sed -n '/"vmm"/,/}/s/.*"pid": *\([0-9][0-9]*\).*/\1/p' "$FIRECLAW_RUN"/vms/*/record.json 2>/dev/null | head -1)
[ -n "$vp" ] && grep -q ready "$tmp/live"
ok $? "a restored VM running (VMM pid ${vp:-none})" "$(cat "$tmp/live")"
mem_fds="" mem_flags="" memfds=0
for f in /proc/"$vp"/fd/*; do
	t=$(readlink "$f") || continue
	if [ "$t" = "$snaps/default/memory" ]; then
		mem_fds+="${f##*/} "
		mem_flags+="$(awk '/^flags:/ {print $2}' "/proc/$vp/fdinfo/${f##*/}") "
	fi
	case $t in /memfd:*) [ "$(stat -L -c %s "$f")" = 268435456 ] && memfds=$((memfds + 1)) ;; esac
done
[ -n "$mem_fds" ]
ok $? "the VMM holds the golden memory (fds: ${mem_fds:-none})"
bad=""
for fl in $mem_flags; do [ $((8#$fl & 3)) = 0 ] || bad+="$fl "; done
is "$bad" "" "… every descriptor of it O_RDONLY (fdinfo flags: $mem_flags)"
is "$memfds" 0 "… and no memfd of the RAM's size: no copy was made"
grep -q "$snaps/default/memory" "/proc/$vp/maps"
ok $? "the guest's RAM is a mapping of the golden file"
like "$(tr '\0' ' ' <"/proc/$vp/cmdline")" " -L ${qemu%/bin/*}/share/qemu " \
	"it reads its own firmware (-L its share/qemu), not the system's QEMU's"
groups=$(awk '/^Groups:/ {$1 = ""; print}' "/proc/$vp/status" | xargs)
vuid=$(awk '/^Uid:/ {print $2}' "/proc/$vp/status")
vgid=$(awk '/^Gid:/ {print $2}' "/proc/$vp/status")
is "$groups" "$gid" "the VMM's only supplementary group is this snapshot's"
[ "$vuid" -gt "$ubase" ] && [ "$vgid" = "$ubase" ]
ok $? "the VMM runs as its own user ($vuid:$vgid)"
# The hostile checks: as the VMM's uid, gid and groups, open the files through an O_PATH
# descriptor taken by root (as QEMU reopens its /proc/self/fd/N: the file's own mode
# decides; the state directory's 0700 is not what protects it here).
probe() { # probe PATH MODE(r|w): "ok" or the error, as the VMM's user
	python3 - "$1" "$2" "$vuid" "$vgid" "$groups" <<'EOF'
import os, sys
path, mode, uid, gid, groups = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
fd = os.open(path, os.O_PATH)
os.setgroups([int(g) for g in groups.split()])
os.setgid(gid)
os.setuid(uid)
try:
    os.close(os.open("/proc/self/fd/%d" % fd, os.O_RDONLY if mode == "r" else os.O_RDWR))
    print("ok")
except OSError as e:
    print(os.strerror(e.errno))
EOF
}
is "$(probe "$snaps/default/memory" r)" "ok" "the VMM's user can read its own snapshot's memory"
is "$(probe "$snaps/default/memory" w)" "Permission denied" "… but not open it for writing"
is "$(probe "$snaps/other/memory" r)" "Permission denied" "… nor read another snapshot's memory (root:$ogid 0640)"
is "$(probe "$snaps/default/vmstate" r)" "Permission denied" "… nor the snapshot's other files"
# its disk: a qcow2 overlay on the snapshot's disk, which it holds read-only only
disk_flags=""
for f in /proc/"$vp"/fd/*; do
	[ "$(readlink "$f")" = "$snaps/default/disk.ext4" ] && disk_flags+="$(awk '/^flags:/ {print $2}' "/proc/$vp/fdinfo/${f##*/}") "
done
bad=""
for fl in $disk_flags; do [ $((8#$fl & 3)) = 0 ] || bad+="$fl "; done
[ -n "$disk_flags" ] && [ -z "$bad" ]
ok $? "its disk is an overlay on the snapshot's disk, held O_RDONLY only (fdinfo flags: ${disk_flags:-none})"
is "$(probe "$snaps/default/disk.ext4" w):$(probe "$snaps/default/disk.ext4" r)" "Permission denied:Permission denied" \
	"… which the VMM's user can open again neither for writing nor for reading"
kill "$runpid" 2>/dev/null
wait "$runpid" 2>/dev/null
no_leaks "a restored run stopped half-way (its fireclaw killed by SIGTERM)"

# ---- guests that write a lot, two at a time: their own pages, never the file ----
clone() { # clone TAG: write 64 MiB of random data to RAM, re-read it 3 times
	"$fc" run -- sh -c 'dd if=/dev/urandom of=/dev/shm/x bs=1M count=64 2>/dev/null
		echo '"$1"' >/dev/shm/tag
		a=$(sha256sum </dev/shm/x)
		for i in 1 2 3; do [ "$(sha256sum </dev/shm/x)" = "$a" ] || echo changed; done
		cat /dev/shm/tag; echo "$a"' >"$tmp/clone-$1" 2>&1
}
clone A &
pa=$!
clone B &
pb=$!
wait "$pa"
ra=$?
wait "$pb"
rb=$?
is "$ra:$rb" "0:0" "two concurrent clones ran" "$(cat "$tmp/clone-A" "$tmp/clone-B")"
like "$(cat "$tmp/clone-A")" "^A
[0-9a-f]{64}  -$" "clone A read back only its own data, unchanged"
like "$(cat "$tmp/clone-B")" "^B
[0-9a-f]{64}  -$" "clone B read back only its own data, unchanged"
[ "$(tail -1 "$tmp/clone-A")" != "$(tail -1 "$tmp/clone-B")" ]
ok $? "… different data each"
is "$(sha256sum <"$snaps/default/memory")" "$sum0" "the golden memory's sha256 is unchanged"
no_leaks "the restored runs"

# ---- disks: restored and cold runs write 20 MB into their overlay and read them back ----
dsum0=$(sha256sum <"$snaps/default/disk.ext4")
for flag in "" --no-snapshot; do
	out=$("$fc" -v run $flag -- sh -c 'dd if=/dev/urandom of=/root/big bs=1M count=20 2>/dev/null && sync &&
		a=$(sha256sum </root/big) && echo 3 >/proc/sys/vm/drop_caches && [ "$(sha256sum </root/big)" = "$a" ] && echo same' 2>"$tmp/err")
	is "$out" "same" "a ${flag:+cold }run writes 20 MB and reads them back from its disk (caches dropped)" "$(tail -3 "$tmp/err")"
	like "$(cat "$tmp/err")" "disk: a qcow2 overlay on" "… a qcow2 overlay"
done
is "$(sha256sum <"$snaps/default/disk.ext4")" "$dsum0" "the snapshot's disk is unchanged"
no_leaks "runs writing their disk"

# ---- kept VMs: a copy (their RAM is snapshotted from the memfd) ----
"$fc" -q start --name qk >/dev/null 2>"$tmp/err"
ok $? "a kept VM from the snapshot" "$(cat "$tmp/err")"
kp=$(sed -n '/"vmm"/,/}/s/.*"pid": *\([0-9][0-9]*\).*/\1/p' "$FIRECLAW_RUN"/vms/*/record.json 2>/dev/null | head -1)
kmem=$(for f in /proc/"$kp"/fd/*; do readlink "$f"; done | grep -c "^$snaps/")
kmemfd=$(for f in /proc/"$kp"/fd/*; do
	case $(readlink "$f") in /memfd:*) [ "$(stat -L -c %s "$f")" = 268435456 ] && echo "$f" ;; esac
done | wc -l)
[ "$kmem" = 0 ] && [ "$kmemfd" -ge 1 ]
ok $? "its VMM holds a memfd copy of the RAM (fds: $kmemfd), not the snapshot's file ($kmem)"
"$fc" exec qk -- sh -c 'echo kept-mark >/dev/shm/m' 2>"$tmp/err"
ok $? "exec into it" "$(cat "$tmp/err")"
"$fc" -q snapshot create --from qk --name fromkept >/dev/null 2>"$tmp/err"
ok $? "snapshot create --from the kept VM" "$(cat "$tmp/err")"
"$fc" -q pause qk >/dev/null 2>"$tmp/err" && "$fc" -q resume qk >/dev/null 2>>"$tmp/err"
ok $? "pause and resume it" "$(cat "$tmp/err")"
is "$("$fc" exec qk -- cat /dev/shm/m 2>&1)" "kept-mark" "… its RAM came back"
"$fc" -q stop qk >/dev/null 2>&1
out=$("$fc" -v run --snapshot fromkept -- cat /dev/shm/m 2>"$tmp/err")
is "$out" "kept-mark" "a clone of the kept VM's snapshot (mapped) reads its RAM" "$(cat "$tmp/err")"
like "$(cat "$tmp/err")" "fromkept/memory mapped privately" "… mapped"

# ---- the library: a snapshot of a mapped (throw-away) clone: its RAM in the stream ----
"$fc" -e '
local restore = require("fireclaw.cli").use("restore")
local snapshot = require("fireclaw.cli").use("snapshot")
local sandbox = require "fireclaw.sandbox"
local snap = assert(restore.find {})
local sb = restore.restore({}, snap)
sandbox.with(sb, function()
	local r = sb:exec({ "sh", "-c", "echo clone-mark >/dev/shm/c" })
	assert(r.status == 0, "exec")
	snapshot.take(sb, "fromclone")
end)' >/dev/null 2>"$tmp/err"
ok $? "snapshot.take of a mapped clone (the library)" "$(cat "$tmp/err")"
out=$("$fc" run --snapshot fromclone -- cat /dev/shm/c 2>"$tmp/err")
is "$out" "clone-mark" "its restore has the clone's RAM" "$(cat "$tmp/err")"

# ---- a group another snapshot's memory holds: the copy ----
chgrp "$gid" "$snaps/fromkept/memory"
out=$("$fc" -v run -- echo copied 2>"$tmp/err")
is "$out" "copied" "a restore whose group another snapshot holds runs" "$(cat "$tmp/err")"
like "$(cat "$tmp/err")" "guest RAM: a copy of [^ ]*/default/memory \(group $gid is snapshot fromkept's\)" \
	"… from a copy, saying why"
is "$(sha256sum <"$snaps/default/memory")" "$sum0" "the golden memory's sha256 is still unchanged"

fkgid=$(sgid "$snaps/fromkept") # the collision undone: fromkept's memory its own group's again
chgrp "$fkgid" "$snaps/fromkept/memory"

# ---- a VMM running as root, and a memory file an older fireclaw gave to every VMM ----
out=$(FIRECLAW_VMM_USER=root "$fc" -v run -- echo root 2>"$tmp/err")
is "$out" "root" "a restore with FIRECLAW_VMM_USER=root" "$(cat "$tmp/err")"
like "$(cat "$tmp/err")" "guest RAM: a copy of [^ ]*/default/memory \(a VMM running as root gets a copy\)" "… copies"
chgrp "$ubase" "$snaps/default/memory" && chmod 660 "$snaps/default/memory"
out=$("$fc" run -- echo old 2>"$tmp/err")
is "$out:$(stat -c '%a %u:%g' "$snaps/default/memory")" "old:640 0:$gid" \
	"a memory file 0660 for the VMMs' group (an older fireclaw): taken back, then given to its own group"
is "$(sha256sum <"$snaps/default/memory")" "$sum0" "the golden memory's sha256 is still unchanged"

# ---- the driver's own suite on QEMU 10 (boot, pause, snapshot, two clones at once, a
# snapshot of a clone: through fireclaw.vm, the clones mapped) ----
out=$("$fc" "$FIRECLAW_TESTS/vm_qemu.lua" 2>&1)
fails=$(grep -c '^not ok' <<<"$out")
plan=$(grep -oE '^1\.\.[0-9]+' <<<"$out")
[ "$fails" = 0 ] && [ -n "$plan" ] && [ "${plan#1..}" -gt 20 ]
ok $? "tests/vm_qemu.lua passes on QEMU 10 (${plan:-no plan}, $fails failed)" "$(grep -E '^not ok|^#' <<<"$out" | head -20)"

"$fc" cleanup -q >/dev/null 2>&1
no_leaks "the end"
done_testing
