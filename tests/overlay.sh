# Throw-away disks (docs/DECISIONS.md, "A throw-away VM's disk is a qcow2 overlay"): a QEMU
# run that is not kept gets a qcow2 overlay on the golden disk (the snapshot's, or cold,
# the image's) instead of a copy. On real VMs: restored and cold runs write 20 MB and read
# them back from the disk; two concurrent clones that wrote each see only their own
# writes and leave the golden disk as it was; while they run, QEMU holds the golden disk
# only read-only and its user cannot open it again for writing; a guest filling its disk
# gets ENOSPC inside, the run ends, the overlay stays within the disk's size; --put/--get;
# fireclaw SIGKILLed mid-run, then cleanup, leaves nothing; snapshot create, run --keep,
# --disk and a root VMM still copy (a raw ext4).
set -u
source "$FIRECLAW_TESTS/lib/tap.sh"
source "$FIRECLAW_TESTS/lib/leaks.sh"
if [ -n "${FIRECLAW_TEST_SKIP_VM:-}" ]; then
	echo "1..0 # skip FIRECLAW_TEST_SKIP_VM"
	exit 0
fi
fc=$FIRECLAW
tmp=$(mktemp -d)
FAULTS_PREFIX=fc-${FIRECLAW_TEST_TAG:-}ovd
source "$FIRECLAW_TESTS/lib/faults.sh"
snap=ovd-$$
pids=()
trap 'for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null; done; "$fc" cleanup --all -q >/dev/null 2>&1; rm -rf "$tmp"' EXIT

faults_begin
golden=$(readlink -f "$FIRECLAW_STATE/snapshots/default/disk.ext4")
rootfs=$(readlink -f "$FIRECLAW_STATE/images/default/rootfs.ext4")
gsum=$(sha256sum <"$golden")
isum=$(sha256sum <"$rootfs")
# the VMM pids of the VMs now in the run directory, one a line
vmm_pids() { sed -n '/"vmm"/,/}/s/.*"pid": *\([0-9][0-9]*\).*/\1/p' "$FIRECLAW_RUN"/vms/*/record.json 2>/dev/null; }
# an ext4 superblock's magic (0xEF53 at byte 1080): a raw ext4 disk, not a qcow2 file
is_ext4() { [ "$(od -An -tx1 -j1080 -N2 "$1" 2>/dev/null | tr -d ' ')" = 53ef ]; }
# fifo N: a fifo for a run's stdin; the run blocks on `read` until the test writes a line
fifo() { mkfifo "$tmp/in$1"; }

# ---- a restored run and a cold one write 20 MB and read them back from their disk ----
WRITE='dd if=/dev/urandom of=/root/big bs=1M count=20 2>/dev/null && sync && a=$(sha256sum </root/big) &&
	echo 3 >/proc/sys/vm/drop_caches && b=$(sha256sum </root/big) && [ "$a" = "$b" ] && echo same $(ls -l /root/big | awk "{print \$5}") &&
	sha256sum /bin/busybox'
want_bb=$(IMG=$rootfs "$fc" -e 'io.write(require("fireclaw.rootfs").read(os.getenv("IMG"), "/bin/busybox"))' | sha256sum | cut -d' ' -f1)
for how in restored cold; do
	flag=""
	[ $how = cold ] && flag=--no-snapshot
	out=$("$fc" -v run $flag -- sh -c "$WRITE" 2>"$tmp/err")
	like "$out" "^same 20971520
$want_bb  /bin/busybox$" "$how run: the guest writes 20 MB, reads the same back from its disk (caches dropped), and the image's files" \
		"$(tail -3 "$tmp/err")"
	src=$golden
	[ $how = cold ] && src=$rootfs
	like "$(cat "$tmp/err")" "disk: a qcow2 overlay on $src \(read-only to the VMM; nothing copied\)" "$how run: -v says its disk is an overlay on $src"
	like "$(cat "$tmp/err")" "disk overlay \(qcow2\)" "$how run: its disk stage is the overlay's"
	unlike "$(cat "$tmp/err")" "rest of the disk copy|disk head|disk copy" "$how run: nothing copied"
	no_leaks "$how run with an overlay"
done
is "$(sha256sum <"$golden"):$(sha256sum <"$rootfs")" "$gsum:$isum" "the snapshot's and the image's disks are unchanged"

# ---- --put and --get through the agent, with an overlay ----
head -c 300000 /dev/urandom >"$tmp/in.bin"
"$fc" run --put "$tmp/in.bin:/root/in.bin" --get "/root/out.txt:$tmp/out.txt" -- sh -c 'sync; echo 3 >/proc/sys/vm/drop_caches; sha256sum </root/in.bin >/root/out.txt' >/dev/null 2>"$tmp/err"
is "$?:$(cat "$tmp/out.txt" 2>/dev/null)" "0:$(sha256sum <"$tmp/in.bin")" "--put a file onto the overlay disk, --get one back" "$(cat "$tmp/err")"
no_leaks "--put/--get"

# ---- two clones at once, each writing: the golden disk and the other clone see none of it ----
for i in 1 2; do
	fifo "$i"
	"$fc" run -- sh -c "echo clone$i >/root/mark && dd if=/dev/urandom of=/root/r$i bs=1M count=4 2>/dev/null && sync && echo written && read x &&
		echo 3 >/proc/sys/vm/drop_caches && cat /root/mark && ls /root | grep -c '^r[12]\$'" <"$tmp/in$i" >"$tmp/c$i.out" 2>"$tmp/c$i.err" &
	pids+=($!)
done
exec 7>"$tmp/in1" 8>"$tmp/in2"
wait_for 6000 eval 'grep -q written "$tmp/c1.out" && grep -q written "$tmp/c2.out"'
ok $? "two restored clones have written their files and wait (the synchronisation point)" "$(cat "$tmp/c1.err" "$tmp/c2.err")"

# while they wait: what their QEMUs hold on the golden disk
vmms=$(vmm_pids | tr '\n' ' ')
is "$(echo $vmms | wc -w)" 2 "two VMMs are running (${vmms})"
ro=0 rw="" ovl=0 each=""
for v in $vmms; do
	n=$ro
	for fd in /proc/"$v"/fd/*; do
		target=$(readlink "$fd" 2>/dev/null) || continue
		flags=$(awk '/^flags:/ {print $2}' /proc/"$v"/fdinfo/"${fd##*/}" 2>/dev/null)
		case "$target" in
		"$golden") if [ $((0$flags & 3)) = 0 ]; then ro=$((ro + 1)); else rw+="$v:${fd##*/}(flags $flags) "; fi ;;
		*/disk.qcow2) ovl=$((ovl + 1)) ;;
		esac
	done
	each+="$((ro - n)) "
done
# (the one it was given in its fd set, and QEMU's own dup of it)
like "$each" "^[1-9][0-9]* [1-9][0-9]* $" "each QEMU holds descriptors on the golden disk $golden (${each})"
is "$rw" "" "... read-only (O_RDONLY in /proc/PID/fdinfo): no writable descriptor on it"
[ "$ovl" -ge 4 ]
ok $? "... and its own overlay, read-write and read-only ($ovl descriptors)"
v=${vmms%% *}
uid=$(awk '/^Uid:/ {print $2}' /proc/"$v"/status 2>/dev/null)
gid=$(awk '/^Gid:/ {print $2}' /proc/"$v"/status 2>/dev/null)
[ -n "$uid" ] && [ "$uid" != 0 ]
ok $? "QEMU runs as uid ${uid:-?}, not root"
AS_VMM=(setpriv --reuid="${uid:-0}" --regid="${gid:-0}" --clear-groups)
touch "$tmp/probe" && chmod 606 "$tmp/probe"
"${AS_VMM[@]}" sh -c ': >>/proc/self/fd/9' 9<"$tmp/probe" </dev/null >/dev/null 2>&1
ok $? "the check below is not vacuous: QEMU's user reopens for writing a file others may write, given read-only"
"${AS_VMM[@]}" sh -c ': >>/proc/self/fd/9' 9<"$golden" </dev/null >/dev/null 2>&1
ok $((!$?)) "QEMU's user cannot reopen the golden disk ($(stat -c '%a %U' "$golden")) for writing from a read-only descriptor"
"${AS_VMM[@]}" sh -c 'cat /proc/self/fd/9 >/dev/null' 9<"$golden" </dev/null >/dev/null 2>&1
ok $((!$?)) "... nor even for reading: it uses the descriptor it was given"

echo go >&7
echo go >&8
exec 7>&- 8>&-
for i in 1 2; do
	wait "${pids[$((i - 1))]}"
	is "$?:$(tr '\n' ' ' <"$tmp/c$i.out")" "0:written clone$i 1 " "clone $i reads its own mark and only its own file back from its disk"
done
pids=()
is "$(sha256sum <"$golden")" "$gsum" "the golden disk's sha256 is unchanged after two clones wrote"
no_leaks "two clones at once"

# ---- the guest fills its disk: ENOSPC inside, the overlay stays within the disk's size ----
fifo 3
"$fc" run -- sh -c 'dd if=/dev/zero of=/root/fill bs=1M 2>&1 | grep -o "No space left on device" | head -1; sync; echo filled; read x; rm /root/fill' \
	<"$tmp/in3" >"$tmp/fill.out" 2>"$tmp/fill.err" &
pid=$!
pids=("$pid")
exec 7>"$tmp/in3"
wait_for 12000 grep -q filled "$tmp/fill.out"
ok $? "the guest fills its disk" "$(cat "$tmp/fill.err")"
is "$(head -1 "$tmp/fill.out")" "No space left on device" "... and gets ENOSPC from its filesystem"
ovl=$(ls "$FIRECLAW_RUN"/vms/*/disk.qcow2 2>/dev/null | head -1)
size=$(stat -c %s "$ovl" 2>/dev/null || echo 0)
held=$(( $(stat -c %b "$ovl" 2>/dev/null || echo 0) * 512 ))
virtual=$(stat -c %s "$golden")
[ "$size" -gt $((virtual / 4)) ] && [ "$size" -le $((virtual + 2 * 1048576)) ] && [ "$held" -le $((virtual + 2 * 1048576)) ]
ok $? "the overlay holds the guest's writes, within the disk's size + 2 MiB of metadata (${size} bytes, ${held} held; disk ${virtual})"
echo go >&7
exec 7>&-
wait "$pid"
is "$?" 0 "the run ends, exit 0"
pids=()
no_leaks "a guest filling its disk"

# ---- fireclaw SIGKILLed while the VM runs: cleanup removes the overlay with the rest ----
fifo 4
"$fc" run -- sh -c 'echo started; read x' <"$tmp/in4" >"$tmp/kill.out" 2>/dev/null &
pid=$!
pids=("$pid")
exec 7>"$tmp/in4"
wait_for 6000 grep -q started "$tmp/kill.out"
ok $? "a run waits on its stdin"
ovl=$(ls "$FIRECLAW_RUN"/vms/*/disk.qcow2 2>/dev/null | head -1)
[ -f "$ovl" ]
ok $? "its overlay is in its run directory (${ovl:-none})"
vp=$(vmm_pid)
kill -KILL "$pid"
wait "$pid" 2>/dev/null
exec 7>&-
pids=()
wait_gone "$vp"
ok $? "QEMU dies with fireclaw"
[ -f "$ovl" ]
ok $? "the overlay is left behind by the killed run (the check below is not vacuous)"
finish "SIGKILL during a run with an overlay"
[ ! -e "$ovl" ] && [ -z "$(find "$FIRECLAW_RUN" -name 'disk.*' 2>/dev/null)" ]
ok $? "cleanup removed the overlay and the run directory"

# ---- still copies (a raw ext4): snapshot create, run --keep, --disk, a VMM running as root ----
"$fc" -v snapshot create --name "$snap" >/dev/null 2>"$tmp/err"
ok $? "snapshot create" "$(tail -2 "$tmp/err")"
like "$(cat "$tmp/err")" "disk head \(sparse\)" "snapshot create copies the image's disk (its head, then the rest)"
unlike "$(cat "$tmp/err")" "qcow2" "... no overlay"
is_ext4 "$FIRECLAW_STATE/snapshots/$snap/disk.ext4"
ok $? "the snapshot's disk is a raw ext4"
"$fc" -q snapshot rm "$snap" >/dev/null 2>&1

"$fc" -v run --keep -- true >/dev/null 2>"$tmp/err"
kept=$(grep -oE 'fireclaw rm [0-9a-f]+' "$tmp/err" | awk '{print $3}' | head -1)
like "$(cat "$tmp/err")" "disk head \(sparse\)" "run --keep copies the snapshot's disk"
is_ext4 "$FIRECLAW_RUN/vms/$kept/disk.ext4" && [ ! -e "$FIRECLAW_RUN/vms/$kept/disk.qcow2" ]
ok $? "... a raw ext4 in its run directory, no overlay"
"$fc" rm "$kept" >/dev/null 2>&1
no_leaks "run --keep"

"$fc" -v run --no-snapshot --disk 96M -- true >/dev/null 2>"$tmp/err"
is "$?" 0 "run --disk 96M" "$(tail -2 "$tmp/err")"
like "$(cat "$tmp/err")" "disk: a copy of .*rootfs.ext4 \(not an overlay: a disk grown with --disk is a copy \(resize2fs grows its ext4\)\)" \
	"run --disk: a copy, and -v says why"
like "$(cat "$tmp/err")" "disk grown to 96 MiB" "... grown to 96 MiB"

"$fc" -v run --disk "$(( $(stat -c %s "$golden") / 1048576 ))M" -- true >/dev/null 2>"$tmp/err"
like "$(cat "$tmp/err")" "disk: a qcow2 overlay on $golden" "run --disk of the snapshot's own disk size grows nothing: an overlay"

FIRECLAW_VMM_USER=root "$fc" -v run -- true >/dev/null 2>"$tmp/err"
like "$(cat "$tmp/err")" "disk: a copy of $golden \(not an overlay: a VMM running as root gets a copy\)" \
	"a VMM running as root gets a copy (it could reopen the golden disk for writing)"
# a golden disk whose path a qcow2 header cannot hold (1023 bytes): a copy (the Lua API, no VMM)
long=$tmp/long
while [ ${#long} -lt 1100 ]; do long+=/$(printf 'd%.0s' $(seq 200)); done
mkdir -p "$long" && truncate -s 1M "$long/disk.ext4"
out=$(LONG=$long/disk.ext4 "$fc" -v -e '
local sandbox = require "fireclaw.sandbox"
local sb = sandbox.new { throwaway_disk = true }
local ok, err = pcall(sb.disk, sb, os.getenv("LONG"))
print(ok, err, sb.disk_method, sb.disk_backing)
sb:destroy()' 2>"$tmp/err")
is "$out" "true	nil	sparse	nil" "a golden disk with a ${#long}-byte path: the sandbox copies it" "$(cat "$tmp/err")"
like "$(cat "$tmp/err")" "not an overlay: its path is longer than a qcow2 header holds \(1023 bytes\)" "... and -v says why"
no_leaks "copies"
is "$(sha256sum <"$golden"):$(sha256sum <"$rootfs")" "$gsum:$isum" "the golden disks are unchanged at the end"

done_testing
