# Golden files on real VMs (QEMU microvm; docs/security.md, "Golden files"): no VMM user can
# open a snapshot's memory, device state or disk, or an image's files, for writing — not by
# path, not by reopening a descriptor it was given; QEMU holds no writable descriptor on
# them; a snapshot's memory holds no zero page and the guest's free memory is zeroed
# before it is taken; a guest writing nearly all its RAM leaves the snapshot unchanged; three clones
# restore from one snapshot at once; a restored clone can be snapshotted and restored. And
# no silent root (fail closed): a 0600 kernel still runs confined, a tap outside a
# namespace is an error naming the fix.
set -u
source "$FIRECLAW_TESTS/lib/tap.sh"
source "$FIRECLAW_TESTS/lib/leaks.sh"
state=${FIRECLAW_STATE:-/var/lib/fireclaw}
tmp=$(mktemp -d)
# a copy of the binary under test: a concurrent build cannot swap it mid-run
cp "$FIRECLAW" "$tmp/fireclaw"
fc=$tmp/fireclaw
export FIRECLAW_VMM=qemu
export FIRECLAW_RUN=$tmp/run FIRECLAW_NETNS_PREFIX=fc-${FIRECLAW_TEST_TAG:-}gd
snap=gd-$$ snap2=gd2-$$ snap3=gd3-$$ snap4=gd4-$$ img=gd-$$
cleanup() {
	"$fc" cleanup --all -q >/dev/null 2>&1
	for s in "$snap" "$snap2" "$snap3" "$snap4"; do "$fc" -q snapshot rm "$s" >/dev/null 2>&1; done
	"$fc" -q image rm "$img" >/dev/null 2>&1
	rm -rf "$tmp"
}
trap cleanup EXIT
# a VMM's user: uid 0x70000000 + 1 + a VM id, the group all VMMs share
VMM_UID=$((0x70000000 + 1 + 0xabcdef)) VMM_GID=$((0x70000000))
AS_VMM=(setpriv --reuid=$VMM_UID --regid=$VMM_GID --clear-groups)
# the value of a field in a JSON file, through fireclaw's own decoder
jget() { "$fc" -e "local v = require('fireclaw.json').decode(io.read('*a')) for k in ('$2'):gmatch('[^.]+') do v = v[k] end print(v)" <"$1"; }
sums() { sha256sum "$state/snapshots/$snap/memory" "$state/snapshots/$snap/vmstate" "$state/snapshots/$snap/disk.ext4" | awk '{print $1}'; }
# A VMM's user opens FILE for writing (append: nothing changes if it works), by its path
# and by reopening a read-only descriptor root gave it (/proc/self/fd checks only the
# file's own mode — how QEMU reaches every file it gets). 0 if either worked.
vmm_can_write() {
	"${AS_VMM[@]}" sh -c ': >>"$1"' sh "$1" </dev/null >/dev/null 2>&1 && return 0
	"${AS_VMM[@]}" sh -c ': >>/proc/self/fd/9' 9<"$1" </dev/null >/dev/null 2>&1
}
# "ALLOCATED NONZERO" (KiB) of a memory file: what its filesystem holds, what is not zero
memstat() {
	/usr/bin/python3 - "$1" 2>/dev/null <<'PY'
import os, sys
p = sys.argv[1]
zero, nz = bytes(4096), 0
with open(p, "rb") as f:
    while True:
        b = f.read(1 << 20)
        if not b:
            break
        nz += sum(1 for i in range(0, len(b), 4096) if b[i:i + 4096].strip(b"\0"))
print(os.stat(p).st_blocks // 2, nz * 4)
PY
}
# a kept VM: its id in $kept, its VMM's pid in $vmm
keep() {
	kept=$("$fc" run --keep "$@" -- true 2>&1 >/dev/null | grep -oE 'fireclaw rm [0-9a-f]+' | awk '{print $3}' | head -1)
	vmm=$([ -n "$kept" ] && jget "$FIRECLAW_RUN/vms/$kept/record.json" vmm.pid)
}

"$fc" cleanup -q >/dev/null 2>&1
no_leaks "before the tests"
if ! "$fc" -q image build >/dev/null 2>"$tmp/err" || ! "$fc" -q snapshot create --name "$snap" >/dev/null 2>"$tmp/err"; then
	ok 1 "default image and a snapshot" "$(cat "$tmp/err")"
	done_testing
	exit
fi
ok 0 "snapshot $snap of the default image"

# ---- the snapshot's memory: zero pages are holes, the guest's free memory was zeroed ----
# Every restore copies the memory's data pages, so the file should hold no zero page
# and little else than what the guest really uses: ~58 MiB of 256 here (kernel image
# ~33, slab ~13, page cache ~6), against ~82 MiB allocated and ~64 MiB non-zero before
# free memory was zeroed and zero pages left out. 30% leaves room for another kernel.
read -r alloc nz < <(memstat "$state/snapshots/$snap/memory")
[ -n "$nz" ] && [ $((alloc - nz)) -le 1024 ]
ok $? "the snapshot's memory holds no zero page as data (${alloc:-?} KiB allocated, ${nz:-?} KiB non-zero)"
[ -n "$alloc" ] && [ "$alloc" -le $((256 * 1024 * 30 / 100)) ]
ok $? "its data is at most 30% of the 256 MiB guest (${alloc:-?} KiB)"

# A guest that dirtied and freed 96 MiB: snapshotted as it is (zero_free = false), its
# memory keeps those pages; a clone restored from that and snapshotted the normal way
# zeroes them first. Either way the restored VM has its RAM, disk and processes.
"$fc" -e "
local cli = require 'fireclaw.cli'
local sandbox = require 'fireclaw.sandbox'
local coldboot, restore, snapshots = cli.use 'coldboot', cli.use 'restore', cli.use 'snapshot'
local sb = coldboot.boot { image = 'default' }
sandbox.with(sb, function()
	local r = sb:exec { 'sh', '-c', [[head -c 1048576 /dev/urandom >/dev/shm/seed && for i in \$(seq 96); do cat /dev/shm/seed; done >/dev/shm/dirty && rm /dev/shm/seed /dev/shm/dirty &&
		echo in-ram >/dev/shm/mark && echo on-disk >/root/mark && sync || exit 1
		setsid sleep 100000 </dev/null >/dev/null 2>&1 & echo \$! >/dev/shm/sleeper]] }
	assert(r.status == 0, r.stderr)
	snapshots.take(sb, '$snap3', { zero_free = false })
end)
local sb2 = restore.restore({ snapshot = '$snap3' }, assert(restore.find { snapshot = '$snap3' }))
sandbox.with(sb2, function()
	-- a zeroing that fails, and one that hangs holding its mount: a note each, nothing left
	local script, timeout = snapshots.ZERO_FREE, snapshots.ZERO_TIMEOUT
	snapshots.ZERO_FREE = 'echo no room here >&2; exit 3'
	snapshots.zero_free(sb2)
	snapshots.ZERO_FREE, snapshots.ZERO_TIMEOUT = [[d=\$(mktemp -d /tmp/.fireclaw-zero.XXXXXX) && mount -t tmpfs -o size=8m fireclaw-zero \$d && head -c 4194304 /dev/zero >\$d/zero && sleep 30]], 3
	snapshots.zero_free(sb2)
	snapshots.ZERO_FREE, snapshots.ZERO_TIMEOUT = script, timeout
	snapshots.take(sb2, '$snap4')
end)" 2>"$tmp/err"
ok $? "a guest that freed 96 MiB of random bytes: snapshot as it is, and a clone of it snapshotted" "$(cat "$tmp/err")"
like "$(cat "$tmp/err")" "the guest's free memory was not zeroed \(exit status 3: no room here\); the snapshot is larger" \
	"a zeroing that fails: one note with the guest's reason"
like "$(cat "$tmp/err")" "not zeroed \(timed out after 3 s\)" "a zeroing that hangs: stopped, one note"
read -r alloc nz < <(memstat "$state/snapshots/$snap3/memory")
[ -n "$nz" ] && [ "$nz" -ge $((256 * 1024 * 50 / 100)) ]
ok $? "zero_free = false: the freed pages stay in its memory (${nz:-?} KiB non-zero: the check below is not vacuous)"
read -r alloc nz < <(memstat "$state/snapshots/$snap4/memory")
[ -n "$alloc" ] && [ "$alloc" -le $((256 * 1024 * 35 / 100)) ]
ok $? "zeroed before the snapshot: at most 35% of it is data (${alloc:-?} KiB, ${nz:-?} KiB non-zero)"
out=$("$fc" run --snapshot "$snap4" -- sh -c 'cat /dev/shm/mark /root/mark; kill -0 $(cat /dev/shm/sleeper) && echo sleeper alive; grep -c fireclaw-zero /proc/mounts' 2>&1)
is "$out" "in-ram
on-disk
sleeper alive
0" "a restore of it has its RAM, disk and processes, and no zeroing mount (the hung one was undone)"
no_leaks "zeroed snapshots"

# ---- no VMM user can write a golden file ----
"$fc" run --snapshot "$snap" -- true; is $? 0 "a restore (an older fireclaw gave the memory file to the VMM group here)"
touch "$tmp/probe" && chgrp $VMM_GID "$tmp/probe" && chmod 660 "$tmp/probe"
"${AS_VMM[@]}" sh -c ': >>/proc/self/fd/9' 9<"$tmp/probe" </dev/null >/dev/null 2>&1
ok $? "the check below is not vacuous: a VMM user reopens a 0660 file of the VMM group given read-only"
for f in memory vmstate disk.ext4 meta.json; do
	vmm_can_write "$state/snapshots/$snap/$f"
	ok $((!$?)) "a VMM user cannot open the snapshot's $f for writing ($(stat -c '%a %U:%G' "$state/snapshots/$snap/$f"))"
done
imgdir=$(readlink -f "$state/images/default")
for f in vmlinuz vmlinux initrd rootfs.ext4 manifest.json host_key.pub; do
	[ -e "$imgdir/$f" ] || continue
	vmm_can_write "$imgdir/$f"
	ok $((!$?)) "a VMM user cannot open the image's $f for writing"
done

# what a restored QEMU holds: no descriptor on the snapshot at all, the image's files read-only
keep --snapshot "$snap"
[ -n "$vmm" ] && kill -0 "$vmm"; ok $? "a kept restored VM (pid ${vmm:-?})"
is "$(ls -l /proc/"$vmm"/fd 2>/dev/null | grep -F "$state/snapshots/" || true)" "" "QEMU holds no descriptor on a snapshot file"
writable=""
for fd in /proc/"$vmm"/fd/*; do
	target=$(readlink "$fd")
	case "$target" in "$state"/*) ;; *) continue ;; esac
	flags=$(awk '/^flags:/ {print $2}' /proc/"$vmm"/fdinfo/"${fd##*/}")
	[ $((0$flags & 3)) != 0 ] && writable+="$target "
done
is "$writable" "" "every descriptor QEMU holds on the state dir is read-only"
like "$(ls -l /proc/"$vmm"/fd 2>/dev/null)" "memfd:fireclaw" "its RAM is a memfd of its own"
uid=$(awk '/^Uid:/ {print $2}' /proc/"$vmm"/status 2>/dev/null)
[ -n "$uid" ] && [ "$uid" != 0 ]; ok $? "the restored QEMU runs as uid ${uid:-?}, not root"
"$fc" rm "$kept" >/dev/null 2>&1; is $? 0 "rm the kept VM"
no_leaks "a kept restored VM"

# ---- a guest that writes nearly all its RAM leaves the snapshot as it was ----
before=$(sums)
out=$("$fc" run --snapshot "$snap" -- sh -c 'mount -t tmpfs -o size=200m none /mnt &&
	head -c 16777216 /dev/urandom >/mnt/seed && for i in 1 2 3 4 5 6 7 8 9; do cat /mnt/seed >/mnt/f$i || exit 1; done &&
	echo filled $(du -sm /mnt | cut -f1)' 2>&1)
like "$out" "^filled (1[5-9][0-9])" "the guest fills 150+ MiB of its 256 MiB with random bytes"
is "$(sums)" "$before" "the snapshot's memory, vmstate and disk keep their sha256"

# ---- three clones of one snapshot at once ----
for i in 1 2 3; do "$fc" run --snapshot "$snap" -- sh -c "echo clone$i; cat /proc/sys/kernel/random/uuid" >"$tmp/c$i" 2>&1 & done
wait
is "$(cat "$tmp/c1" "$tmp/c2" "$tmp/c3" | grep -c '^clone')" 3 "three concurrent restores from one memory file all run"
is "$(cat "$tmp/c1" "$tmp/c2" "$tmp/c3" | grep -v '^clone' | sort -u | wc -l)" 3 "with three different uuids"
is "$(sums)" "$before" "the snapshot is still unchanged"
no_leaks "concurrent clones"

# ---- a snapshot of a restored clone (its RAM a memfd, like a cold boot's) ----
"$fc" -e "
local cli = require 'fireclaw.cli'
local sandbox = require 'fireclaw.sandbox'
local restore, snapshots = cli.use 'restore', cli.use 'snapshot'
local sb = restore.restore({ snapshot = '$snap' }, assert(restore.find { snapshot = '$snap' }))
sandbox.with(sb, function()
	assert(sb:exec { 'sh', '-c', 'echo in-ram >/dev/shm/mark; echo on-disk >/root/mark; sync' }.status == 0)
	snapshots.take(sb, '$snap2')
end)" 2>"$tmp/err"
ok $? "snapshot a restored clone" "$(cat "$tmp/err")"
is "$(stat -c %a "$state/snapshots/$snap2/memory" 2>/dev/null)" 600 "its memory file is 0600"
out=$("$fc" run --snapshot "$snap2" -- cat /dev/shm/mark /root/mark 2>&1)
is "$out" "in-ram
on-disk" "a restore of it has the clone's RAM and disk"
no_leaks "snapshot of a clone"

# ---- fail closed: never root without being asked ----
cp "$imgdir/vmlinuz" "$tmp/kernel" && chmod 600 "$tmp/kernel"
cp "$imgdir/rootfs.ext4" "$tmp/rootfs"
"$fc" -q image import --name "$img" --kernel "$tmp/kernel" --initrd "$imgdir/initrd" --rootfs "$tmp/rootfs" \
	--host-key "$imgdir/host_key.pub" >/dev/null 2>"$tmp/err"
ok $? "import an image with a 0600 kernel" "$(cat "$tmp/err")"
is "$(stat -c %a "$state/images/$img/vmlinuz" 2>/dev/null)" 644 "the imported kernel is 0644 (it holds no secret)"
# a kernel and initrd only root can read (as a recipe may pass): a copy for the VMM
for f in vmlinux vmlinuz initrd; do [ -e "$state/images/$img/$f" ] && chmod 600 "$state/images/$img/$f"; done
keep --no-snapshot --image "$img"
uid=$(awk '/^Uid:/ {print $2}' /proc/"${vmm:-0}"/status 2>/dev/null)
[ -n "$vmm" ] && [ -n "$uid" ] && [ "$uid" != 0 ]; ok $? "a 0600 kernel and initrd: QEMU still runs as uid ${uid:-?}, not root"
[ -n "$kept" ] && "$fc" rm "$kept" >/dev/null 2>&1
no_leaks "a 0600 kernel"
FIRECLAW_VMM_USER=root "$fc" run --no-snapshot --image "$img" -- true
is $? 0 "FIRECLAW_VMM_USER=root: the explicit way to a root QEMU still works"
out=$("$fc" -e "
local vm = require 'fireclaw.vm'
local image = require 'fireclaw.image'
local img = image.load('default')
local v = vm.new { id = 'gdtap', dir = '$tmp/vmtap', vmm = 'qemu', tap = 'fcgdtap0' }
local ok, err = pcall(v.boot, v, { kernel = img.kernel, initrd = img.initrd, boot_args = img.boot_args })
v:destroy()
print(err)" 2>&1)
like "$out" "tap fcgdtap0 by name in the host's namespace.*FIRECLAW_VMM_USER=root" "a tap outside a namespace: one line naming the fix, no root QEMU"
ip link show fcgdtap0 >/dev/null 2>&1
ok $((!$?)) "and no tap appeared on the host"
if [ -c /dev/kvm ] && [ $((0$(stat -c %a /dev/kvm) & 066)) = 0 ]; then
	err=$(FIRECLAW_ACCEL=kvm "$fc" run --no-snapshot -- true 2>&1)
	is "$?:$(printf '%s\n' "$err" | wc -l)" "1:1" "KVM forced, /dev/kvm open to root only: one line, exit 1"
	like "$err" "/dev/kvm is open to root only .*chmod 0660 /dev/kvm.*FIRECLAW_VMM_USER=root" "it names the fix"
else
	skip "/dev/kvm is open to others or its group here"
	skip "/dev/kvm is open to others or its group here"
fi
no_leaks "fail closed"

done_testing
