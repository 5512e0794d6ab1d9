#!/bin/bash
# The hand-made baseline: one throw-away VM run with plain tools only — ip netns + ip for
# the tap, cp --sparse=always for the disk, qemu-system-x86_64 with the machine and device
# options fireclaw uses (lua/fireclaw/vmm/qemu.lua), QMP through socat for a restore,
# a TCP probe + the OpenSSH client for the command, then teardown.
#
#   bench/baseline.sh restore ID SNAPDIR   restore SNAPDIR/{vmstate,memory,disk.ext4}, run the command
#   bench/baseline.sh cold ID IMAGEDIR     cold boot IMAGEDIR/rootfs.ext4, run the command
#   bench/baseline.sh snapshot ID IMAGEDIR SNAPDIR   cold boot, then save vmstate, memory and
#                                          disk.ext4 in SNAPDIR (the recipe fireclaw uses)
#
# Everything else comes from the environment (bench/bench.py sets it):
#   FCB_TMP      directory for this run's files (the run uses FCB_TMP/vm-ID, removed at the end)
#   FCB_QEMU     qemu-system-x86_64;  FCB_ACCEL "tcg"|"kvm";  FCB_SANDBOX 1 to add -sandbox on
#   FCB_QEMU_DATA  -L for a QEMU outside /usr (its own firmware), as fireclaw gives it
#   FCB_KERNEL FCB_INITRD FCB_APPEND   kernel, initrd and boot args (the snapshot's for a restore)
#   FCB_MEM FCB_VCPU                   memory (MiB) and vCPUs
#   FCB_KEY FCB_KNOWN_HOSTS            client key; known_hosts pinning the image's host key
#   FCB_STAGES   optional: append "stage epoch-seconds" lines there (free: bash's EPOCHREALTIME)
#   FCB_PROBE=0  no TCP probe before ssh (default 1)
#   FCB_DRY=1    print the QEMU command line (one word a line) and exit, touching nothing
# The VM lives in its own network namespace fcb-ID (tap0 172.16.0.1/30, fixed MACs); nothing
# is added to the host's namespace. Exit status: 0 when the command ran and returned 0.
set -u
set -m # every background job in its own process group: teardown can end it as a whole
mode=$1 id=$2 src=$3 out=${4:-}
ns=fcb-$id
dir=$FCB_TMP/vm-$id
qpid="" job="" created=""
guest=172.16.0.2

stamp() { [ -z "${FCB_STAGES:-}" ] || echo "$1 $EPOCHREALTIME" >>"$FCB_STAGES"; }
stamp start

teardown() {
	if [ -n "$job" ]; then
		kill -TERM -- "-$job" 2>/dev/null
		wait "$job" 2>/dev/null
		job=""
	fi
	if [ -n "$qpid" ]; then
		kill -KILL "$qpid" 2>/dev/null
		wait "$qpid" 2>/dev/null
		qpid=""
	fi
	[ -z "$created" ] && return
	[ -e "/run/netns/$ns" ] && ip netns del "$ns"
	rm -rf "$dir"
	created=""
}
die() {
	echo "baseline $mode $id: $*" >&2
	[ -f "$dir/vmm.log" ] && tail -n 3 "$dir/vmm.log" >&2
	exit 1
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

case $mode in
restore) disk=$src/disk.ext4 memory=$src/memory share=off ;;
cold | snapshot) disk=$src/rootfs.ext4 memory=$dir/memory share=on ;;
*) die "unknown mode (restore, cold, snapshot)" ;;
esac

# The VMM's command line: the same machine and device options as fireclaw's QEMU driver
if [ "$FCB_ACCEL" = kvm ]; then accel=(-accel kvm -cpu host,-arch-capabilities); else accel=(-accel tcg -cpu max,-erms,-fsrm); fi
args=()
[ -n "${FCB_QEMU_DATA:-}" ] && args+=(-L "$FCB_QEMU_DATA")
args+=(-M microvm,memory-backend=mem "${accel[@]}" -smp "$FCB_VCPU" -m "${FCB_MEM}M"
	-object "memory-backend-file,id=mem,size=${FCB_MEM}M,mem-path=$memory,share=$share"
	-nodefaults -no-user-config -nographic -no-reboot
	-serial "file:$dir/console.log"
	-qmp "unix:$dir/qmp.sock,server=on,wait=off"
	-kernel "$FCB_KERNEL" -append "$FCB_APPEND")
[ -n "$FCB_INITRD" ] && args+=(-initrd "$FCB_INITRD")
args+=(-drive "id=root,if=none,format=raw,werror=report,rerror=report,file.locking=off,file=$dir/disk.ext4"
	-device virtio-blk-device,drive=root
	-object rng-random,id=rng0,filename=/dev/urandom -device virtio-rng-device,rng=rng0)
# the guest agent's ports (FCB_AGENT_PORTS, as the snapshot has them): the same devices in
# the same place, or the snapshot would not load; the baseline itself uses SSH
ports=${FCB_AGENT_PORTS:-0}
if [ "$ports" -gt 0 ]; then
	args+=(-device "virtio-serial-device,max_ports=$((ports + 1))")
	for k in $(seq 0 $((ports - 1))); do
		args+=(-chardev "socket,id=agent$k,path=$dir/agent-$k.sock,server=on,wait=off"
			-device "virtserialport,chardev=agent$k,name=org.fireclaw.agent.$k,nr=$((k + 1))")
	done
fi
args+=(-netdev tap,id=net0,ifname=tap0,script=no,downscript=no
	-device virtio-net-device,netdev=net0,mac=06:00:ac:10:00:02)
# fireclaw's seccomp groups, but spawn: the baseline's migration streams go through exec:cat
[ "${FCB_SANDBOX:-0}" = 1 ] && args+=(-sandbox on,obsolete=deny,elevateprivileges=deny,resourcecontrol=deny)
[ "$mode" = restore ] && args+=(-incoming defer)
if [ "${FCB_DRY:-0}" = 1 ]; then
	printf '%s\n' "$FCB_QEMU" "${args[@]}"
	exit 0
fi

# -- network: namespace, tap0 with the fixed MAC, address, static neighbour for the guest
created=1
ip netns add "$ns" || die "ip netns add failed"
ip -n "$ns" -batch - <<EOF || die "tap setup failed"
tuntap add tap0 mode tap
link set tap0 address 06:00:ac:10:00:01
addr add 172.16.0.1/30 dev tap0
link set tap0 up
neigh add $guest lladdr 06:00:ac:10:00:02 dev tap0 nud permanent
EOF
stamp network

# -- disk: this run's own copy
mkdir -p "$dir" || die "mkdir failed"
cp --sparse=always "$disk" "$dir/disk.ext4" || die "disk copy failed"
stamp disk

# -- VMM, inside the namespace
ip netns exec "$ns" "$FCB_QEMU" "${args[@]}" </dev/null >"$dir/vmm.log" 2>&1 &
qpid=$!

# -- QMP over one socat connection (it retries until QEMU has created the socket)
qmp_open() {
	coproc QMP { exec socat - "UNIX-CONNECT:$dir/qmp.sock,retry=5000,interval=0.002" 2>/dev/null; }
	read -r -t 10 line <&"${QMP[0]}" || die "no QMP greeting"
	qmp '{"execute":"qmp_capabilities"}'
}
# send one command; its reply line ends up in $reply (events are skipped)
qmp() {
	echo "$1" >&"${QMP[1]}"
	while read -r -t 30 reply <&"${QMP[0]}"; do
		case $reply in
		*'"return"'*) return 0 ;;
		*'"error"'*) die "QMP $1: $reply" ;;
		esac
	done
	die "QMP $1: no answer"
}
qmp_close() {
	exec {QMP[1]}>&-
	wait "$QMP_PID" 2>/dev/null
}

if [ "$mode" = restore ]; then
	qmp_open
	stamp spawn
	qmp '{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"x-ignore-shared","state":true}]}}'
	qmp "{\"execute\":\"migrate-incoming\",\"arguments\":{\"uri\":\"exec:cat $src/vmstate\"}}"
	# a cont sent while the state is still coming in is lost: wait until it is in
	for ((i = 0; ; i++)); do
		qmp '{"execute":"query-status"}'
		[[ $reply == *'"inmigrate"'* ]] || break
		((i < 10000)) || die "incoming migration did not finish"
		sleep 0.002
	done
	qmp '{"execute":"cont"}'
	qmp_close
	stamp restore
	# a restored guest wakes up at snapshot time: set its clock in the same round trip
	cmd="date -s @$(date +%s) >/dev/null 2>&1; true"
else
	stamp spawn
	cmd=true
fi

# -- SSH: a fast TCP probe loop first (ssh's ConnectTimeout is coarse), then the command
ip netns exec "$ns" bash -c '
	for ((i = 0; i < 3000 && ${FCB_PROBE:-1}; i++)); do
		socat -u OPEN:/dev/null "TCP:$1:22,connect-timeout=0.05" 2>/dev/null && break
		sleep 0.01
	done
	[ -z "${FCB_STAGES:-}" ] || echo "probe $EPOCHREALTIME" >>"$FCB_STAGES"
	for ((i = 0; i < 20; i++)); do
		ssh -F /dev/null -i "$FCB_KEY" -o UserKnownHostsFile="$FCB_KNOWN_HOSTS" \
			-o StrictHostKeyChecking=yes -o BatchMode=yes -o ConnectTimeout=5 \
			-o LogLevel=ERROR "root@$1" "$2" && exit 0
		st=$?
		[ $st = 255 ] || exit $st
		sleep 0.05
	done
	exit 255' probe "$guest" "$cmd" &
job=$! # in the background, so that a signal is handled at once
wait "$job"
st=$? job=""
[ $st = 0 ] || die "ssh exit status $st"
stamp ssh

if [ "$mode" = snapshot ]; then
	mkdir -p "$out" || die "mkdir $out failed"
	qmp_open
	qmp '{"execute":"stop"}'
	qmp '{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"x-ignore-shared","state":true}]}}'
	qmp "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"exec:cat > $out/vmstate\"}}"
	for ((i = 0; ; i++)); do
		qmp '{"execute":"query-migrate"}'
		[[ $reply == *'"completed"'* ]] && break
		[[ $reply == *'"failed"'* ]] && die "migration failed: $reply"
		((i < 10000)) || die "migration did not finish"
		sleep 0.01
	done
	qmp_close
	cp --sparse=always "$dir/memory" "$out/memory" || die "copy memory failed"
	cp --sparse=always "$dir/disk.ext4" "$out/disk.ext4" || die "copy disk failed"
fi

# -- teardown: kill the VMM by its pid, delete the namespace (and the tap), remove the copy
teardown
stamp teardown
exit 0
