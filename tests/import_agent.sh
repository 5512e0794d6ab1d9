#!/bin/bash
# The guest agent in an image imported with --kernel/--rootfs (real QEMU boots): a rootfs
# made here with its own init (busybox and dropbear of the default image, no fireclaw rcS,
# no agent of its own) gets fireclaw's agent written into /.fireclaw by the ext4 writer and
# booted as init= (the init shim), which execs the image's own init= (a marker shows it ran,
# as PID 1). Commands, exit statuses, --put/--get, a snapshot and its restore go through
# the agent; --no-agent keeps SSH; a kernel without virtio_console (the default initramfs
# with that module removed) falls back to SSH at once, and --exec agent then fails with
# one line; a shim error (/sys a file) is one console line and the image's init still
# runs; a fireclaw rootfs (whose agent the initramfs starts too) runs one agent; a rootfs
# whose /.fireclaw is a symlink, a file, or holds a symlinked bin is refused with one line
# and nothing written.
if [ -n "${FIRECLAW_TEST_SKIP_VM:-}" ]; then
	echo "1..0 # skip FIRECLAW_TEST_SKIP_VM"
	exit 0
fi
source "$FIRECLAW_TESTS/lib/vmsuite.sh" iag
source "$FIRECLAW_TESTS/lib/seed.sh" # private_state
unset FIRECLAW_ACCEL FIRECLAW_FIRECRACKER FIRECLAW_FAULT FIRECLAW_EXEC
shared=${FIRECLAW_STATE:?tests/run sets FIRECLAW_STATE}
finish() {
	"$fc" -q cleanup --all >/dev/null 2>&1
	rm -rf "$tmp"
}
trap finish EXIT
private_state "$shared" "$tmp/state"
export FIRECLAW_STATE=$tmp/state
img=$FIRECLAW_STATE/images/default
secs() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

# ---- the user's rootfs: the default one's userland with an init of its own ----
tree=$tmp/tree
mkdir "$tree" && debugfs -R "rdump / $tree" "$img/rootfs.ext4" >/dev/null 2>&1 && rm -rf "$tree/lost+found"
# no fireclaw guest side: no rcS/rcK, no agent, no helper; busybox init with its own inittab
rm -f "$tree/etc/init.d/rcS" "$tree/etc/init.d/rcK" "$tree/usr/sbin/fireclaw-agent" "$tree/usr/sbin/fireclaw-guest"
printf '::sysinit:/etc/init.d/userinit\n' >"$tree/etc/inittab"
cat >"$tree/sbin/myinit" <<'EOF'
#!/bin/sh
# the image's own first stage (init= in its boot args): a marker, then busybox init
echo "myinit ran as pid $$ with args: $*" >/dev/console
echo "myinit pid $$" >/myinit.marker
exec /sbin/init "$@"
EOF
cat >"$tree/etc/init.d/userinit" <<'EOF'
#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
[ -e /proc/self ] || mount -t proc proc /proc
mount -t tmpfs tmpfs /run
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
echo "userinit ran" >/userinit.marker
ip link set lo up
for a in $(cat /proc/cmdline); do case "$a" in ip=*) cfg=${a#ip=} ;; esac; done
IFS=: read -r addr _ gw mask _ <<X
$cfg
X
eval "$(ipcalc -p "$addr" "$mask")"
ip link set eth0 up && ip addr add "$addr/$PREFIX" dev eth0 && ip route add default via "$gw"
dropbear -s -p 22 -P /run/dropbear.pid -r /etc/dropbear/dropbear_ed25519_host_key 2>/dev/null
EOF
chmod 755 "$tree/sbin/myinit" "$tree/etc/init.d/userinit"
mke2fs -q -t ext4 -d "$tree" "$tmp/user.ext4" 96M >/dev/null 2>&1
ok $? "a rootfs with its own init made (mke2fs -d)"
user_sum=$(sha256sum <"$tmp/user.ext4")
boot="console=ttyS0 root=/dev/vda rw ip=172.16.0.2::172.16.0.1:255.255.255.252::eth0:off panic=1 pci=off quiet init=/sbin/myinit"
import() { # import NAME ROOTFS [ARGS…]
	local name=$1 rootfs=$2
	shift 2
	"$fc" -q image import --name "$name" --kernel "$img/vmlinux" --initrd "${INITRD:-$img/initrd}" \
		--rootfs "$rootfs" --host-key "$img/host_key.pub" --boot-args "$boot" "$@"
}

# ---- import: the agent written into the copy, init= its shim ----
import ia "$tmp/user.ext4" 2>"$tmp/err"
ok $? "image import --kernel/--rootfs writes the agent" "$(cat "$tmp/err")"
is "$(sha256sum <"$tmp/user.ext4")" "$user_sum" "the user's own rootfs file is unchanged (the copy got the agent)"
got=$("$fc" image info ia | python3 -c 'import json,sys; m=json.load(sys.stdin); g=m["guest"]
print(g.get("agent"), g.get("agent_start"), " ".join(a for a in m["boot_args"] if "init" in a))')
is "$got" "/.fireclaw/bin/fireclaw-agent init-shim fireclaw.init=/sbin/myinit init=/.fireclaw/bin/fireclaw-agent" \
	"image info: the agent, its init shim, the image's own init= kept as fireclaw.init="
is "$(debugfs -R "stat /.fireclaw/bin/fireclaw-agent" "$FIRECLAW_STATE/images/ia/rootfs.ext4" 2>/dev/null |
	grep -oE 'Mode: +[0-7]+' | tr -s ' ')" "Mode: 0755" "the agent is in the image's ext4, mode 0755"
e2fsck -fn "$FIRECLAW_STATE/images/ia/rootfs.ext4" >"$tmp/fsck" 2>&1
ok $? "e2fsck finds the written image clean" "$(tail -5 "$tmp/fsck")"

# ---- a cold boot: through the agent; the image's init ran as PID 1 ----
printf 'one\ntwo\n' >"$tmp/in"
t0=$EPOCHREALTIME
out=$("$fc" run -v --no-snapshot --image ia --put "$tmp/in:/root/in" --get "/root/out:$tmp/out" -- \
	sh -c 'n=100; until [ -e /userinit.marker ] || [ $n = 0 ]; do n=$((n - 1)); sleep 0.1; done
		cat /myinit.marker /userinit.marker /proc/1/comm; cat /root/in /root/in >/root/out; exit 7' \
	2>"$tmp/err")
rc=$?
echo "# cold boot through the agent: $(secs "$t0") s"
is "$rc" 7 "run -- sh -c 'exit 7': exit status 7 through the agent"
is "$out" "myinit pid 1
userinit ran
init" "the image's own init= ran as PID 1 (then its busybox init and its sysinit; the agent may answer before)"
grep -q "agent ready" "$tmp/err" && ! grep -q "SSH ready" "$tmp/err"
ok $? "… over the agent, not SSH (-v)" "$(grep -E 'ready|agent' "$tmp/err")"
is "$(cat "$tmp/out" 2>/dev/null)" "one
two
one
two" "--put and --get went through"
"$fc" run --no-snapshot --image ia -- true
is $? 0 "run -- true"
no_leaks "cold boots of the imported image"

# ---- a snapshot: its restores use the agent ----
"$fc" -q snapshot create --image ia --name ias 2>"$tmp/err"
ok $? "snapshot create of the imported image" "$(cat "$tmp/err")"
"$fc" -q snapshot info ias | python3 -c 'import json,sys; assert "agent" in json.load(sys.stdin)["exec_channels"]'
ok $? "the snapshot records the agent as an exec channel"
out=$("$fc" run -v --snapshot ias -- sh -c 'cat /userinit.marker; exit 3' 2>"$tmp/err")
rc=$?
is "$rc:$out" "3:userinit ran" "a restored run: exit status and output"
grep -q "agent ready" "$tmp/err" && grep -q "hand-off" "$tmp/err" && ! grep -q "SSH ready" "$tmp/err"
ok $? "… through the agent and its hand-off (-v)" "$(grep -E 'ready|hand' "$tmp/err")"
"$fc" -q snapshot rm ias >/dev/null 2>&1
no_leaks "snapshot and restore"

# ---- --no-agent: the image as it was, SSH ----
import ina "$tmp/user.ext4" --no-agent 2>"$tmp/err"
ok $? "image import --no-agent" "$(cat "$tmp/err")"
got=$("$fc" image info ina | python3 -c 'import json,sys; m=json.load(sys.stdin)
print(m["guest"].get("agent"), " ".join(a for a in m["boot_args"] if "init" in a))')
is "$got" "None init=/sbin/myinit" "its manifest: no agent, the boot arguments as given"
cmp -s "$tmp/user.ext4" "$FIRECLAW_STATE/images/ina/rootfs.ext4"
ok $? "its rootfs is a byte-exact copy"
t0=$EPOCHREALTIME
out=$("$fc" run -v --no-snapshot --image ina -- sh -c 'cat /myinit.marker; exit 5' 2>"$tmp/err")
rc=$?
t_ssh=$(secs "$t0")
echo "# cold boot over SSH (--no-agent): $t_ssh s"
is "$rc:$out" "5:myinit pid 1" "run over SSH: exit status, the image's init"
grep -q "SSH ready" "$tmp/err" && ! grep -q "agent" "$tmp/err"
ok $? "… over SSH (-v)" "$(grep -E 'ready|agent' "$tmp/err")"
out=$("$fc" run --no-snapshot --exec agent --image ina -- true 2>&1)
is "$?:$(printf '%s\n' "$out" | wc -l)" "1:1" "--exec agent on a --no-agent image: one line, exit 1"
like "$out" "has no guest agent \(it was imported with --no-agent" "it says why"
no_leaks "--no-agent"

# ---- a kernel without virtio_console: the agent finds no channel, SSH at once ----
mkdir "$tmp/initrd" && (cd "$tmp/initrd" && cpio -id --quiet <"$img/initrd")
ls "$tmp/initrd/lib/modules/virtio_console.ko" >/dev/null 2>&1
ok $? "the default initramfs loads virtio_console (a module: the kernel has none built in)"
rm -f "$tmp/initrd/lib/modules/virtio_console.ko"
(cd "$tmp/initrd" && find . -mindepth 1 | sort | cpio --quiet -o -H newc -R 0:0 >"$tmp/initrd.noconsole")
INITRD=$tmp/initrd.noconsole import inc "$tmp/user.ext4" 2>"$tmp/err"
ok $? "import with that initramfs (the agent injected)" "$(cat "$tmp/err")"
t0=$EPOCHREALTIME
out=$("$fc" run -v --no-snapshot --image inc -- sh -c 'cat /myinit.marker; exit 4' 2>"$tmp/err")
rc=$?
t_fb=$(secs "$t0")
echo "# cold boot, no agent channel, SSH fallback: $t_fb s (over SSH without the agent: $t_ssh s)"
is "$rc:$out" "4:myinit pid 1" "no virtio_console: the run still works (exit status, the image's init)"
grep -q "no agent channel: .*virtio_console" "$tmp/err" && grep -q "SSH ready" "$tmp/err" && ! grep -q "agent ready" "$tmp/err"
ok $? "… over SSH, after the agent's console line said it has no port (-v)" "$(grep -E 'ready|agent' "$tmp/err")"
awk -v a="$t_fb" -v b="$t_ssh" 'BEGIN { exit !(a < b + 10) }'
ok $? "the fallback costs no wait for the agent ($t_fb s vs $t_ssh s without it)"
grep -q "agent line" "$tmp/err"
ok $? "-v shows the wait for the agent's line as a stage" "$(grep -E 'agent' "$tmp/err")"
line=$(grep -oE 'agent line [0-9.]+ ms' "$tmp/err" | head -1)
echo "# $line"
out=$("$fc" run --no-snapshot --exec agent --image inc -- true 2>&1)
is "$?:$(printf '%s\n' "$out" | wc -l)" "1:1" "--exec agent without a channel: one line, exit 1"
like "$out" "has no agent channel: its kernel gave the agent no virtio-serial port .*virtio_console.*--exec ssh" \
	"it names the missing driver and the way out"
"$fc" -q snapshot create --image inc --name incs 2>"$tmp/err"
ok $? "snapshot create without the agent's channel" "$(cat "$tmp/err")"
got=$("$fc" -q snapshot info incs | python3 -c 'import json,sys; print(json.load(sys.stdin)["exec_channels"])')
is "$got" "['ssh']" "it records SSH only"
"$fc" -q snapshot rm incs >/dev/null 2>&1
no_leaks "no agent channel"

# ---- a shim error does not stop the boot: /sys is a file in the rootfs (a kept VM) ----
# (an initramfs creates a missing /sys; a file there it cannot replace either)
rm -rf "$tmp/h" && cp -a "$tree" "$tmp/h" && rm -rf "$tmp/h/sys" && echo "not a directory" >"$tmp/h/sys"
mke2fs -q -t ext4 -d "$tmp/h" "$tmp/h.ext4" 96M >/dev/null 2>&1
import insys "$tmp/h.ext4" 2>"$tmp/err"
ok $? "import of a rootfs whose /sys is a file" "$(cat "$tmp/err")"
"$fc" -q start --image insys --name iak >/dev/null 2>"$tmp/err"
ok $? "start a kept VM of it" "$(cat "$tmp/err")"
out=$("$fc" exec -v iak -- cat /myinit.marker 2>"$tmp/err")
is "$out" "myinit pid 1" "the image's init still ran as PID 1"
grep -q "SSH ready" "$tmp/err" && ! grep -q "agent ready" "$tmp/err"
ok $? "exec from another process: over SSH (the record offers no agent port)" "$(grep -E 'ready|agent' "$tmp/err")"
log=$("$fc" logs iak 2>&1)
like "$log" "fireclaw-agent: init shim: mount sysfs on /sys: Not a directory" "the shim's error: one console line"
like "$log" "fireclaw-agent: channels: ports=0 vsock=0" "the agent's line: no channel"
out=$("$fc" exec --exec agent iak -- true 2>&1)
is "$?:$(printf '%s\n' "$out" | wc -l)" "1:1" "exec --exec agent on it: one line, exit 1"
"$fc" -q rm iak >/dev/null 2>&1
no_leaks "a kept VM whose /sys is a file"

# ---- the default image's own rootfs: its initramfs starts its agent too; one serves ----
import idf "$img/rootfs.ext4" --boot-args "console=ttyS0 root=/dev/vda rw panic=1 pci=off" 2>"$tmp/err"
ok $? "import of the default image's rootfs (it has /usr/sbin/fireclaw-agent)" "$(cat "$tmp/err")"
"$fc" -q start --image idf --name idk >/dev/null 2>"$tmp/err"
ok $? "start a kept VM of it" "$(cat "$tmp/err")"
out=$("$fc" exec -v idk -- true 2>&1)
like "$out" "agent ready" "exec: through the agent"
log=$("$fc" logs idk 2>&1)
like "$log" "fireclaw-agent: channels: ports=4 vsock=0" "the shim's agent printed its line"
is "$(printf '%s\n' "$log" | grep -c "another agent serves this guest already: this one exits")" 1 \
	"of the two agents started, one exits (one console line)"
"$fc" -q rm idk >/dev/null 2>&1
no_leaks "two agents in one guest"

# ---- hostile rootfs content: /.fireclaw in the way ----
hostile() { # hostile NAME DESCRIPTION: a rootfs from $tree plus what the caller put in $tmp/h
	local name=$1 what=$2 out rc
	mke2fs -q -t ext4 -d "$tmp/h" "$tmp/h.ext4" 96M >/dev/null 2>&1
	local sum; sum=$(sha256sum <"$tmp/h.ext4")
	out=$(import "$name" "$tmp/h.ext4" 2>&1)
	rc=$?
	is "$rc:$(printf '%s\n' "$out" | wc -l)" "1:1" "$what: refused, one line"
	like "$out" "^fireclaw: image: the rootfs has /.fireclaw.* \\(move it away, or import with --no-agent\\)$" \
		"… naming what is in the way and the way out"
	[ ! -e "$FIRECLAW_STATE/images/$name" ] && [ -z "$(ls -A "$FIRECLAW_STATE/images" | grep '^\.tmp')" ]
	ok $? "… no image and no work directory left" "$(ls -A "$FIRECLAW_STATE/images")"
	is "$(sha256sum <"$tmp/h.ext4")" "$sum" "… the user's file untouched"
}
rm -rf "$tmp/h" && cp -a "$tree" "$tmp/h" && ln -s /etc "$tmp/h/.fireclaw"
hostile ih1 "/.fireclaw a symlink to /etc"
rm -rf "$tmp/h" && cp -a "$tree" "$tmp/h" && echo mine >"$tmp/h/.fireclaw"
hostile ih2 "/.fireclaw a file"
rm -rf "$tmp/h" && cp -a "$tree" "$tmp/h" && mkdir "$tmp/h/.fireclaw" && ln -s ../sbin "$tmp/h/.fireclaw/bin"
hostile ih3 "/.fireclaw/bin a symlink to /sbin"
rm -rf "$tmp/h" && cp -a "$tree" "$tmp/h" && mkdir -p "$tmp/h/.fireclaw/bin/fireclaw-agent"
hostile ih4 "/.fireclaw/bin/fireclaw-agent a directory"
rm -rf "$tmp/h" && cp -a "$tree" "$tmp/h" && mkdir -p "$tmp/h/.fireclaw/bin" &&
	ln -s /usr/bin/busybox "$tmp/h/.fireclaw/bin/fireclaw-agent"
hostile ih6 "/.fireclaw/bin/fireclaw-agent a symlink to busybox"
# the agent's path a hard link to the image's busybox: a new inode takes the name, busybox stays
rm -rf "$tmp/h" && cp -a "$tree" "$tmp/h" && mkdir -p "$tmp/h/.fireclaw/bin" &&
	ln "$tmp/h/usr/bin/busybox" "$tmp/h/.fireclaw/bin/fireclaw-agent"
mke2fs -q -t ext4 -d "$tmp/h" "$tmp/h.ext4" 96M >/dev/null 2>&1
import ih7 "$tmp/h.ext4" 2>"$tmp/err"
ok $? "the agent's path a hard link to busybox: imported" "$(cat "$tmp/err")"
is "$(debugfs -R "cat /usr/bin/busybox" "$FIRECLAW_STATE/images/ih7/rootfs.ext4" 2>/dev/null | sha256sum)" \
	"$(sha256sum <"$tree/usr/bin/busybox")" "… the image's busybox is not written through the link"
is "$(debugfs -R "cat /.fireclaw/bin/fireclaw-agent" "$FIRECLAW_STATE/images/ih7/rootfs.ext4" 2>/dev/null | sha256sum)" \
	"$("$fc" -e 'io.write(require("fireclaw.guest").agent())' | sha256sum)" "… the agent has the name"
# a real /.fireclaw directory of the user's: the agent goes in, the user's file stays
rm -rf "$tmp/h" && cp -a "$tree" "$tmp/h" && mkdir "$tmp/h/.fireclaw" && echo mine >"$tmp/h/.fireclaw/notes"
mke2fs -q -t ext4 -d "$tmp/h" "$tmp/h.ext4" 96M >/dev/null 2>&1
import ih5 "$tmp/h.ext4" 2>"$tmp/err"
ok $? "a rootfs with a /.fireclaw directory of its own: imported" "$(cat "$tmp/err")"
is "$(debugfs -R "cat /.fireclaw/notes" "$FIRECLAW_STATE/images/ih5/rootfs.ext4" 2>/dev/null)" "mine" \
	"… its own file there kept"
no_leaks "hostile rootfs content"

done_testing
