# --disk SIZE on real VMs (QEMU microvm): the per-run disk copy and its ext4 are grown
# offline before the VMM starts, sparsely, without touching the image; bad sizes are one
# line before any VM exists; a snapshot made with --disk hands its disk to every restore,
# and a restore cannot change a saved VM's disk; a guest cannot grow the host file.
source "$FIRECLAW_TESTS/lib/vmsuite.sh" dk
source "$FIRECLAW_TESTS/lib/seed.sh"
kept=""
finish() {
	[ -n "$kept" ] && "$fc" -q rm "$kept" >/dev/null 2>&1
	"$fc" -q cleanup --all >/dev/null 2>&1
	rm -rf "$tmp"
}
trap finish EXIT

# the image in the tests' state (built once), then a state of our own seeded from it by
# hard links: the snapshots made here never reach the other tests
"$fc" -q image build >/dev/null
ok $? "default image present"
FIRECLAW_TEST_SEED=$FIRECLAW_STATE seed_state "$tmp/state"
export FIRECLAW_STATE=$tmp/state
golden=$(readlink -f "$FIRECLAW_STATE/images/default")/rootfs.ext4
golden_sum=$(sha256sum <"$golden")
golden_size=$(stat -c %s "$golden")
MiB=1048576

"$fc" cleanup -q >/dev/null 2>&1
no_leaks "before the tests"

# ---- bad sizes: one line, before any VM exists ----
no_vm() { [ -z "$(ls -A "$FIRECLAW_RUN/vms" 2>/dev/null)" ]; }
err=$("$fc" run --no-snapshot --disk junk -- true 2>&1); rc=$?
is "$rc:$err" "2:fireclaw: --disk: bad disk size 'junk' (e.g. 512M, 2G)" "junk size: usage error"
err=$("$fc" run --no-snapshot --disk 1000T -- true 2>&1); rc=$?
is "$rc:$err" "2:fireclaw: --disk: disk size 1000T is more than 1 TiB" "1000T: usage error"
err=$("$fc" run --no-snapshot --disk 16M -- true 2>&1); rc=$?
is "$rc:$err" "1:fireclaw: sandbox: disk size 16 MiB is smaller than the disk of image 'default' ($((golden_size / MiB)) MiB): shrinking is not supported" \
	"smaller than the image: one line, shrinking is not supported"
free_gib=$(df -B1G --output=avail "$tmp" | tail -1 | tr -d ' ')
err=$("$fc" run --no-snapshot --disk $((free_gib + 100))G -- true 2>&1); rc=$?
like "$rc:$err" "^1:fireclaw: sandbox: disk size [0-9.]+ GiB is more than [^ ]+ has free \([0-9.]+ GiB\)$" \
	"more than the run directory's filesystem has free: one line"
err=$("$fc" coldboot --disk 2X 2>&1); rc=$?
is "$rc:$err" "2:fireclaw: --disk: bad disk size '2X' (e.g. 512M, 2G)" "coldboot --disk checks too"
err=$("$fc" snapshot create --disk x 2>&1); rc=$?
is "$rc:$err" "2:fireclaw: --disk: bad disk size 'x' (e.g. 512M, 2G)" "snapshot create --disk checks too"
err=$("$fc" -e 'require("fireclaw.sandbox").new{disk = "lots"}' 2>&1); rc=$?
like "$rc:$err" "^1:.*sandbox: bad disk size 'lots' \(e.g. 512M, 2G\)$" "sandbox.new{disk = junk} raises"
no_vm; ok $? "no VM was created for any of them" "$(ls -A "$FIRECLAW_RUN/vms" 2>&1)"
no_leaks "bad sizes"

# ---- a grown disk: the guest sees it, the host file is sparse, the guest cannot grow it ----
# (kept, so the disk copy can be looked at while the VM runs)
out=$("$fc" run --keep --json --no-snapshot --disk 512M -- sh -c '
	df -k / | tail -1
	echo "sectors $(cat /sys/block/vda/size)"
	dd if=/dev/zero of=/dev/vda bs=1M seek=512 count=1 2>/dev/null; echo "past-end $?"
	dd if=/dev/zero of=/dev/vda bs=512 seek=$((2 * 1024 * 1024)) count=1 2>/dev/null; echo "far-past-end $?"
	sync; echo "sectors-after $(cat /sys/block/vda/size)"' 2>"$tmp/err"); rc=$?
is "$rc" 0 "run --no-snapshot --disk 512M"
[ $rc = 0 ] || sed 's/^/#   /' "$tmp/err"
kept=$(printf '%s' "$out" | grep -o '"vm_id":"[^"]*"' | cut -d'"' -f4)
stdout=$(printf '%s' "$out" | grep -o '"stdout":"[^"]*"' | cut -d'"' -f4 | sed 's/\\n/\n/g')
total_kib=$(printf '%s\n' "$stdout" | awk '$NF == "/" { print $2 }')
[ -n "$total_kib" ] && [ "$total_kib" -gt $((480 * 1024)) ] && [ "$total_kib" -le $((512 * 1024)) ]
ok $? "df / in the guest shows ~512 MiB" "$stdout"
like "$stdout" "sectors 1048576" "the guest's disk is 512 MiB (virtio-blk capacity)"
unlike "$stdout" "past-end 0" "writing at the disk's end fails in the guest"
unlike "$stdout" "far-past-end 0" "writing far past the disk's end fails in the guest"
like "$stdout" "sectors-after 1048576" "the guest's disk has not grown"
disk=$FIRECLAW_RUN/vms/$kept/disk.ext4
is "$(stat -c %s "$disk" 2>&1)" $((512 * MiB)) "the host's disk copy is 512 MiB, and stayed so"
alloc=$(du -k "$disk" | cut -f1)
[ -n "$alloc" ] && [ "$alloc" -lt $((64 * 1024)) ]
ok $? "the host's disk copy is sparse (${alloc:-?} KiB allocated of 512 MiB)"
"$fc" -q rm "$kept" >/dev/null 2>&1; ok $? "rm the kept VM"
kept=""
no_leaks "a grown disk"

# ---- killed while the disk is being grown: cleanup leaves nothing ----
FIRECLAW_FAULT=disk-grown "$fc" -q run --no-snapshot --disk 512M -- true >/dev/null 2>&1; rc=$?
is "$rc" 137 "a run killed right after growing its disk"
"$fc" -q cleanup >/dev/null 2>&1
no_leaks "cleanup after a kill at disk-grown"
err=$(FIRECLAW_FAULT=disk-grown:error "$fc" run --no-snapshot --disk 512M -- true 2>&1); rc=$?
is "$rc" 1 "a run failing right after growing its disk exits 1"
no_leaks "a failure at disk-grown cleans up after itself"

# ---- coldboot --disk ----
out=$("$fc" -q coldboot --disk 1G -- cat /sys/block/vda/size 2>"$tmp/err"); rc=$?
is "$rc:$out" "0:2097152" "coldboot --disk 1G: the guest's disk is 1 GiB"
[ $rc = 0 ] || sed 's/^/#   /' "$tmp/err"
no_leaks "coldboot --disk"

# ---- room to work: 200 MiB fit with --disk 512M, not without ----
big='dd if=/dev/zero of=/root/big bs=1M count=200 && sync'
"$fc" run --no-snapshot --disk 512M -- sh -c "$big" >"$tmp/out" 2>&1; rc=$?
is "$rc" 0 "writing 200 MiB works with --disk 512M"
[ $rc = 0 ] || sed 's/^/#   /' "$tmp/out"
"$fc" run --no-snapshot -- sh -c "$big" >"$tmp/out" 2>&1; rc=$?
[ "$rc" != 0 ] && grep -q "No space left on device" "$tmp/out"
ok $? "without --disk the same fails with ENOSPC" "exit $rc: $(tail -3 "$tmp/out")"
no_leaks "writing 200 MiB"

# ---- snapshots made with --disk; restores keep their snapshot's disk ----
"$fc" snapshot create --disk 512M 2>"$tmp/err"; rc=$?
is "$rc" 0 "snapshot create --disk 512M"
[ $rc = 0 ] || sed 's/^/#   /' "$tmp/err"
is "$(stat -c %s "$FIRECLAW_STATE/snapshots/default/disk.ext4" 2>&1)" $((512 * MiB)) "the snapshot's disk is 512 MiB"
df_of() { printf '%s' "$1" | grep -o '"stdout":"[^"]*"' | cut -d'"' -f4 | sed 's/\\n/\n/g' | awk '$NF == "/" { print $2 }'; }
out=$("$fc" run --json -- df -k / 2>"$tmp/err"); rc=$?
is "$rc" 0 "a restore from it"
like "$out" '"boot":"snapshot"' "it was restored"
kib=$(df_of "$out")
[ -n "$kib" ] && [ "$kib" -gt $((480 * 1024)) ]
ok $? "the restored clone has a copy of the 512 MiB disk" "$out"
out=$("$fc" run --json --disk 512M -- true 2>"$tmp/err"); rc=$?
like "$rc:$out" '^0:.*"boot":"snapshot"' "--disk equal to the snapshot's disk restores"
out=$("$fc" run --json --disk 1G -- df -k / 2>"$tmp/err"); rc=$?
like "$rc:$out" '^0:.*"boot":"cold"' "--disk unlike the snapshot's disk cold boots"
kib=$(df_of "$out")
[ -n "$kib" ] && [ "$kib" -gt $((960 * 1024)) ]
ok $? "... with the disk asked for" "$out"
is "$(cat "$tmp/err")" "[fireclaw] snapshot 'default' cannot be used: its disk is 512 MiB, not 1 GiB (a restored VM keeps its snapshot's disk; make one with: fireclaw snapshot create --disk 1G); cold booting" \
	"... with a one-line note saying why"
err=$("$fc" run --snapshot default --disk 1G -- true 2>&1); rc=$?
is "$rc:$err" "1:fireclaw: snapshot 'default' cannot be used: its disk is 512 MiB, not 1 GiB (a restored VM keeps its snapshot's disk; make one with: fireclaw snapshot create --disk 1G)" \
	"with --snapshot NAME it is an error, one line"
no_vm; ok $? "... before any VM exists" "$(ls -A "$FIRECLAW_RUN/vms" 2>&1)"
# the Lua API: restore.restore with another size refuses before a VM exists
err=$("$fc" -e 'local cli = require "fireclaw.cli"; local r = cli.use "restore"
	local snap = require("fireclaw.snapshot").load("default")
	r.restore({ disk = "2G" }, snap)' 2>&1); rc=$?
like "$rc:$err" "^1:.*its disk is 512 MiB, not 2 GiB" "restore.restore{disk = other size} refuses"
no_vm; ok $? "... before any VM exists" "$(ls -A "$FIRECLAW_RUN/vms" 2>&1)"
no_leaks "snapshots with --disk"

# ---- the golden image is untouched ----
is "$(sha256sum <"$golden")" "$golden_sum" "the image's rootfs.ext4 is unchanged (sha256)"
is "$(stat -c %s "$golden")" "$golden_size" "... and so is its size"
no_leaks "the end"
done_testing
