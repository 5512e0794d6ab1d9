# Restores overlap their copies with QEMU's start (docs/DECISIONS.md, the entry of that
# name), and so do cold boots their disk copy (QEMU paused until it is done): QEMU is
# forked first, and the snapshot's memory (into
# the VM's memfd) and the rest of its disk are copied while QEMU joins its cgroups, execs
# and starts; the incoming migration waits for both. Checked here: a restored guest reads
# back 96 MiB it wrote to RAM before the snapshot (pages far into its 256 MiB) and a file
# on its disk past the disk's head, read from the disk (caches dropped); fireclaw killed
# (SIGKILL) or failing in the middle of the copies leaves nothing behind (QEMU killed and
# reaped, then cleanup); proc.spawn{wait_exec = false} and p:wait_exec(). The copies are
# those of VMs whose disk is read again (`fireclaw restore`, `coldboot`, kept VMs): a `run`
# that is not kept gives QEMU an overlay instead (tests/overlay.sh).
set -u
source "$FIRECLAW_TESTS/lib/tap.sh"
source "$FIRECLAW_TESTS/lib/leaks.sh"
fc=$FIRECLAW
tmp=$(mktemp -d)
FAULTS_PREFIX=fc-${FIRECLAW_TEST_TAG:-}ovl
source "$FIRECLAW_TESTS/lib/faults.sh"
snap=ovl-$$
trap '"$fc" cleanup --all -q >/dev/null 2>&1; rm -rf "$tmp"' EXIT

# ---- proc.spawn{wait_exec = false}: the fork returns at once, the exec is checked later ----
out=$("$fc" -e '
local proc = require "fireclaw.proc"
local p = proc.spawn { argv = { "/nonexistent/ovl-prog" }, wait_exec = false }
local ok, err = pcall(p.wait_exec, p)
print(ok, err, p:alive())
p:close()
local q = proc.spawn { argv = { "sh", "-c", "exit 3" }, wait_exec = false }
print(q:wait_exec(), q:wait_exec(), q:wait(10).status)
q:close()' 2>&1)
is "$out" "false	proc: cannot run /nonexistent/ovl-prog: No such file or directory	false
true	true	3" "wait_exec: a program that cannot run raises as spawn would (reaped); one that runs: true, twice"

faults_begin

# ---- the restored memory and disk are the snapshot's, whole ----
"$fc" -q start --name ovl >"$tmp/id" 2>"$tmp/err"
ok $? "a kept VM" "$(cat "$tmp/err")"
sums=$("$fc" exec ovl -- sh -c 'dd if=/dev/urandom of=/dev/shm/big bs=1M count=96 2>/dev/null &&
	dd if=/dev/urandom of=/root/big bs=1M count=8 2>/dev/null &&
	sync && sha256sum /dev/shm/big /root/big' 2>"$tmp/err")
like "$sums" "^[0-9a-f]{64}  /dev/shm/big
[0-9a-f]{64}  /root/big$" "the guest writes 96 MiB of random bytes to RAM and 8 MiB to its disk" "$(cat "$tmp/err")"
"$fc" -q snapshot create --from ovl --name "$snap" >/dev/null 2>"$tmp/err"
ok $? "snapshot it" "$(cat "$tmp/err")"
"$fc" -q stop ovl >/dev/null 2>&1
# the check below is not vacuous: the memory file has data in its last quarter
far=$(dd if="$FIRECLAW_STATE/snapshots/$snap/memory" bs=1M skip=192 count=64 status=none | tr -d '\0' | head -c 4096 | wc -c)
[ "$far" -gt 0 ]
ok $? "the snapshot's memory has data past 192 MiB (${far} non-zero bytes seen)"
READ='sync; echo 3 >/proc/sys/vm/drop_caches; sha256sum /dev/shm/big /root/big'
for i in 1 2; do
	got=$("$fc" run --snapshot "$snap" -- sh -c "$READ" 2>"$tmp/err")
	is "$got" "$sums" "restore $i (run: a disk overlay): the guest reads back its RAM and its disk (from the disk), unchanged" "$(cat "$tmp/err")"
done
# a copy of the disk, its head first and the rest while QEMU starts (fireclaw restore)
got=$("$fc" -v restore --snapshot "$snap" -- sh -c "$READ" 2>"$tmp/err")
is "$got" "$sums" "restore 3 (a disk copy): the guest reads back its RAM and its disk (from the disk), unchanged" "$(tail -3 "$tmp/err")"
like "$(cat "$tmp/err")" "disk head \\(sparse\\)" "... its disk stage copied the head only"
like "$(cat "$tmp/err")" "rest of the disk copy" "... and the rest while QEMU started"
is "$(status_of env FIRECLAW_FAULT=disk-rest "$fc" restore --snapshot "$snap" -- echo hi)" 137 "SIGKILL at disk-rest of a restore"
vp=$(vmm_pid)
[ -n "$vp" ]
ok $? "QEMU was forked and recorded before the disk's rest (pid ${vp:-none})"
wait_gone "$vp"
ok $? "QEMU dies with fireclaw (its parent-death signal)"
finish "SIGKILL at disk-rest of a restore"
no_leaks "restores of $snap"

# ---- fireclaw killed or failing between the memory copy and the rest of the disk ----
is "$(status_of env FIRECLAW_FAULT=ram-filled "$fc" run -- echo hi)" 137 "SIGKILL at ram-filled: fireclaw died there"
vp=$(vmm_pid)
[ -n "$vp" ]
ok $? "QEMU was forked and recorded before the copies (pid ${vp:-none})"
wait_gone "$vp"
ok $? "QEMU dies with fireclaw (its parent-death signal)"
finish "SIGKILL at ram-filled"
FIRECLAW_FAULT=ram-filled:error "$fc" run -- echo hi >/dev/null 2>"$tmp/err"
is "$?:$(cat "$tmp/err")" "1:fireclaw: fault injected at ram-filled" "an error at ram-filled: exit 1, one line"
no_leaks "an error at ram-filled, without cleanup (QEMU killed and reaped by the run)"

# ---- cold boots with a disk copy (coldboot): QEMU forked paused (-S), the disk's rest copied, then `cont` ----
img=$FIRECLAW_STATE/images/default/rootfs.ext4
want=$(IMG=$img "$fc" -e 'io.write(require("fireclaw.rootfs").read(os.getenv("IMG"), "/bin/busybox"))' | sha256sum | cut -d' ' -f1)
got=$("$fc" -v coldboot -- sh -c 'echo 3 >/proc/sys/vm/drop_caches; sha256sum /bin/busybox' 2>"$tmp/err")
is "${got%% *}" "$want" "a cold boot reads its disk past the head (busybox, from the disk), as in the image" "$(tail -3 "$tmp/err")"
like "$(cat "$tmp/err")" "disk head \\(sparse\\)" "... its disk stage copied the head only"
like "$(cat "$tmp/err")" "rest of the disk copy" "... and the rest while QEMU started"
is "$(status_of env FIRECLAW_FAULT=disk-rest "$fc" coldboot -- echo hi)" 137 "SIGKILL at disk-rest of a cold boot"
vp=$(vmm_pid)
[ -n "$vp" ]
ok $? "QEMU was forked and recorded before the disk's rest (pid ${vp:-none})"
wait_gone "$vp"
ok $? "QEMU dies with fireclaw (its parent-death signal)"
finish "SIGKILL at disk-rest of a cold boot"
FIRECLAW_FAULT=disk-rest:error "$fc" coldboot -- echo hi >/dev/null 2>"$tmp/err"
is "$?:$(cat "$tmp/err")" "1:fireclaw: fault injected at disk-rest" "an error at disk-rest of a cold boot: exit 1, one line"
no_leaks "an error at disk-rest of a cold boot, without cleanup"

"$fc" -q snapshot rm "$snap" >/dev/null 2>&1
done_testing
