# Security properties on real VMs (QEMU microvm; see docs/security.md): modes of keys and
# run directories, host-key pinning, argv passed verbatim (random bytes), VMM sockets closed
# to other users, nothing listening on the host's network, the VMM's namespace, seccomp
# and unprivileged user, the Firecracker API socket (fake Firecracker), the jailer (when
# installed) — each case that starts a VM followed by a leak check.
set -u
source "$FIRECLAW_TESTS/lib/tap.sh"
source "$FIRECLAW_TESTS/lib/leaks.sh"
state=${FIRECLAW_STATE:-/var/lib/fireclaw}
tmp=$(mktemp -d)
# world-searchable, so that only fireclaw's own modes keep other users out of its run dir
chmod 755 "$tmp"
# a copy of the binary under test: a concurrent build cannot swap it mid-run
cp "$FIRECLAW" "$tmp/fireclaw"
fc=$tmp/fireclaw
bg=()
cleanup() {
	local p
	for p in "${bg[@]}"; do kill -KILL "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
	"$fc" cleanup --all -q >/dev/null 2>&1
	rm -rf "$tmp"
}
trap cleanup EXIT
export FIRECLAW_VMM=qemu
export FIRECLAW_RUN=$tmp/run FIRECLAW_NETNS_PREFIX=fc-${FIRECLAW_TEST_TAG:-}sec
NOBODY=(setpriv --reuid=65534 --regid=65534 --clear-groups)

mode() { stat -c %a "$1" 2>/dev/null || echo missing; }
# run as an unprivileged user; 0 if the command succeeded
as_nobody() { "${NOBODY[@]}" "$@" </dev/null >/dev/null 2>&1; }
# the value of a field in a JSON file, through fireclaw's own decoder
jget() { "$fc" -e "local v = require('fireclaw.json').decode(io.read('*a')) for k in ('$2'):gmatch('[^.]+') do v = v[k] end print(v)" <"$1"; }
# wait (bounded) until a file contains a line, or a process is gone
wait_for() { # FILE REGEX PID
	local i
	for i in $(seq 6000); do
		grep -qE -- "$2" "$1" 2>/dev/null && return 0
		kill -0 "$3" 2>/dev/null || return 1
		sleep 0.01
	done
	return 1
}

"$fc" cleanup -q >/dev/null 2>&1
no_leaks "before the tests"
if ! "$fc" -q image build >/dev/null 2>"$tmp/err"; then
	ok 1 "default image present" "$(cat "$tmp/err")"
	done_testing
	exit
fi

# ---- keys ----
is "$(mode "$state/keys")" 700 "keys directory is 0700"
is "$(mode "$state/keys/id_ed25519")" 600 "client private key is 0600"
is "$(stat -c %u "$state/keys/id_ed25519")" 0 "client private key is root's"
as_nobody cat "$state/keys/id_ed25519"
ok $((!$?)) "another user cannot read the client key"
is "$(mode "$state/snapshots")" 700 "snapshots directory is 0700 (guest memory and disks)"
img=$(readlink -f "$state/images/default")
as_nobody cat "$img/rootfs.ext4"
ok $((!$?)) "another user cannot read the image's root filesystem (it holds the guest's host key)"

# ---- a live VM: modes, sockets, listeners, namespace, seccomp, user ----
ss -ltnupH >"$tmp/ss.before" 2>&1
"$fc" run -- sh -c 'echo started; sleep 60' </dev/null >"$tmp/live.out" 2>"$tmp/live.err" &
pid=$!
bg+=("$pid")
wait_for "$tmp/live.out" '^started' "$pid"
ok $? "a VM runs a command (fireclaw pid $pid)" "$(cat "$tmp/live.err")"
vmdir=$(ls -d "$FIRECLAW_RUN"/vms/* 2>/dev/null | head -1)
rec=$vmdir/record.json
vmm=$(jget "$rec" vmm.pid 2>/dev/null)
ns=$(jget "$rec" netns 2>/dev/null)
is "$(mode "$FIRECLAW_RUN/vms")" 700 "\$FIRECLAW_RUN/vms is 0700"
is "$(mode "$vmdir")" 700 "the VM's directory is 0700"
is "$(mode "$rec")" 600 "its record is 0600"
is "$(find "$FIRECLAW_RUN" -perm -o+w ! -type l | tr '\n' ' ')" "" "nothing under the run dir is world-writable"
sock=$vmdir/qmp.sock
[ -S "$sock" ]
ok $? "QMP socket at $sock"
is "$(( 0$(mode "$sock") & 022 ))" 0 "QMP socket mode $(mode "$sock"): no write for group or others"
socat -u OPEN:/dev/null "UNIX-CONNECT:$sock" </dev/null >/dev/null 2>&1
ok $? "root can connect to the QMP socket (the check below is not vacuous)"
as_nobody socat -u OPEN:/dev/null "UNIX-CONNECT:$sock"
ok $((!$?)) "another user cannot connect to the QMP socket"
as_nobody ls "$vmdir"
ok $((!$?)) "another user cannot list the VM's directory"
as_nobody cat "$rec"
ok $((!$?)) "another user cannot read the VM's record"

# nothing on the host's network: no socket of fireclaw or its VMM in the root namespace
ss -ltnupH >"$tmp/ss.during" 2>&1
new=$(comm -13 <(sort "$tmp/ss.before") <(sort "$tmp/ss.during"))
mine=$(ss -tuanpH 2>/dev/null | grep -E "pid=($pid|${vmm:-none})," || true)
is "$mine" "" "no TCP/UDP socket of fireclaw or the VMM in the host's namespace" 
unlike "$new" "pid=($pid|${vmm:-none})," "no new listener owned by fireclaw or the VMM (new listeners: ${new:-none})"
[ -n "$vmm" ] && [ "$(readlink /proc/"$vmm"/ns/net)" != "$(readlink /proc/self/ns/net)" ]
ok $? "the VMM (pid ${vmm:-?}) is not in the host's network namespace"
is "$(ip netns identify "$vmm" 2>/dev/null)" "$ns" "it is in the VM's own namespace $ns"
is "$(ip -n "$ns" -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | sort | tr '\n' ' ')" "lo tap0 " \
	"the namespace holds only lo and tap0"
is "$(ip -n "$ns" route show default 2>/dev/null)" "" "the namespace has no default route (no way out)"
like "$(tr '\0' ' ' </proc/"$vmm"/cmdline 2>/dev/null)" "-sandbox on" "QEMU runs with -sandbox on"
like "$(grep '^Seccomp:' /proc/"$vmm"/status 2>/dev/null)" "Seccomp:[[:space:]]+2" "QEMU is under a seccomp filter (Seccomp: 2)"
uid=$(awk '/^Uid:/ {print $2}' /proc/"$vmm"/status 2>/dev/null)
[ -n "$uid" ] && [ "$uid" != 0 ]
ok $? "QEMU runs as an unprivileged user (uid ${uid:-?})"
like "$(grep '^CapEff:' /proc/"$vmm"/status 2>/dev/null)" "CapEff:[[:space:]]+0+$" "QEMU has no capabilities"
gid=$(awk '/^Gid:/ {print $2}' /proc/"$vmm"/status 2>/dev/null)
AS_VMM=(setpriv --reuid="${uid:-0}" --regid="${gid:-0}" --clear-groups)
"${AS_VMM[@]}" touch "$vmdir/x" </dev/null >/dev/null 2>&1
ok $((!$?)) "QEMU's user cannot write in the VM's directory (records are root's alone)"
"${AS_VMM[@]}" cat "$rec" </dev/null >/dev/null 2>&1
ok $((!$?)) "QEMU's user cannot read the VM's record"
"${AS_VMM[@]}" cat "$state/keys/id_ed25519" </dev/null >/dev/null 2>&1
ok $((!$?)) "QEMU's user cannot read the client key"
is "$(ls -l /proc/"$vmm"/fd 2>/dev/null | grep -E "keys/|record\.json|snapshots/[^/]*/vmstate" || true)" "" \
	"QEMU holds no descriptor on keys, records or a snapshot's device state"
# its disk is an overlay on the snapshot's (cold: the image's) disk: that one it holds read-only
golden_fds=""
for fd in /proc/"$vmm"/fd/*; do
	case "$(readlink "$fd" 2>/dev/null)" in
	*/snapshots/*/disk.ext4 | */images/*/rootfs.ext4) golden_fds+="$(awk '/^flags:/ {print $2}' /proc/"$vmm"/fdinfo/"${fd##*/}" 2>/dev/null) " ;;
	esac
done
like "$golden_fds" "^([0-7]*[04] )+$" "... and the golden disk below its overlay read-only only (flags: ${golden_fds:-none})"

kill -INT "$pid"
wait "$pid"
is $? 130 "SIGINT ends the run (130)"
[ ! -e "$vmdir" ] && ! kill -0 "$vmm" 2>/dev/null
ok $? "its directory and VMM are gone"
no_leaks "live VM"

# ---- the VMM dies with fireclaw, even on SIGKILL (the parent-death signal survives the uid change) ----
"$fc" run -- sh -c 'echo started; sleep 60' </dev/null >"$tmp/kill.out" 2>&1 &
pid=$!
bg+=("$pid")
wait_for "$tmp/kill.out" '^started' "$pid"
ok $? "a VM runs a command" "$(cat "$tmp/kill.out")"
vmdir=$(ls -d "$FIRECLAW_RUN"/vms/* 2>/dev/null | head -1)
vmm=$(jget "$vmdir/record.json" vmm.pid 2>/dev/null)
kill -KILL "$pid"
wait "$pid" 2>/dev/null
for _ in $(seq 1000); do [ -n "$vmm" ] && kill -0 "$vmm" 2>/dev/null || break; sleep 0.01; done
[ -n "$vmm" ] && ! kill -0 "$vmm" 2>/dev/null
ok $? "SIGKILL of fireclaw: its unprivileged QEMU (pid ${vmm:-?}) is gone without cleanup"
"$fc" cleanup -q >/dev/null 2>&1
no_leaks "SIGKILL + cleanup"

# ---- the host key is pinned (SSH: the guest agent's channel needs no host key) ----
fake=$tmp/state
mkdir -p "$fake/images/default" "$fake/keys"
chmod 700 "$fake/keys"
cp -p "$state/keys/"id_ed25519* "$fake/keys/"
for f in "$img"/*; do ln -s "$f" "$fake/images/default/${f##*/}"; done
rm -f "$fake/images/default/host_key.pub"
ssh-keygen -q -t ed25519 -N '' -f "$tmp/other_host_key"
cut -d' ' -f1,2 "$tmp/other_host_key.pub" >"$fake/images/default/host_key.pub"
err=$(FIRECLAW_STATE=$fake "$fc" run --no-snapshot --exec ssh -- echo reached 2>&1 </dev/null); rc=$?
is "$rc" 1 "a guest whose host key differs from the image's: the run fails"
like "$err" "host key mismatch" "and says: host key mismatch"
unlike "$err" "reached" "the command did not run"
no_leaks "host key mismatch"

# ---- argv arrives verbatim: random bytes 1-255, quotes, newlines, $(), backslashes ----
gen() { # SEED COUNT MAXLEN -> NUL-separated arguments
	/usr/bin/python3 - "$@" <<-'EOF'
	import random, sys
	seed, count, maxlen = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
	r = random.Random(seed)
	tokens = [b" ", b"'", b'"', b"\n", b"$(id)", b"`id`", b"\\", b"$HOME", b"*", b";", b"|",
	          b"&", b"%s", b"-n", b"--", b"\t", b"!", b"${x:-y}", b"'\\''", b"\r", b"#", b"~"]
	out = []
	for _ in range(count):
	    a = b""
	    n = maxlen if maxlen >= 1000 else r.randrange(maxlen + 1)  # long ones: exactly maxlen
	    for _ in range(n):
	        a += r.choice(tokens) if r.random() < 0.3 else bytes([r.randrange(1, 256)])
	    out.append(a)
	sys.stdout.buffer.write(b"".join(a + b"\0" for a in out))
	EOF
}
# the last two exceed dropbear's 9000-byte command line: they go through a script
for batch in "1 40 24" "2 40 24" "3 200 6" "4 3 3000" "5 1 20000"; do
	set -- $batch
	gen "$@" >"$tmp/want"
	mapfile -d '' -t args <"$tmp/want"
	"$fc" run -- printf '%s\0' "${args[@]}" </dev/null >"$tmp/got" 2>"$tmp/err"
	rc=$?
	cmp -s "$tmp/want" "$tmp/got"
	ok $? "argv batch $1: $2 random arguments of up to $3 bytes arrive byte for byte (exit $rc)" \
		"$(head -3 "$tmp/err"; cmp "$tmp/want" "$tmp/got" 2>&1)"
done
gen 6 1 200 | tr -d '\0' >"$tmp/want"
"$fc" run --env "V=$(cat "$tmp/want")" -- sh -c 'printf %s "$V"' </dev/null >"$tmp/got" 2>"$tmp/err"
cmp -s "$tmp/want" "$tmp/got"
ok $? "an --env value of random bytes arrives byte for byte" "$(head -3 "$tmp/err")"
no_leaks "argv batches"

# ---- Firecracker: the API socket (fake Firecracker: the real one cannot boot a guest here) ----
cat >"$tmp/fcsock.lua" <<'EOF'
local vm = require "fireclaw.vm"
local proc = require "fireclaw.proc"
local dir, fake = arg[1], arg[2]
local v = vm.new { id = "fct-secfc", dir = dir, vmm = "firecracker", firecracker = fake }
io.open(dir .. "/vmlinux", "w"):close()
local ok, err = pcall(function()
	v:boot { kernel = dir .. "/vmlinux", boot_args = "console=ttyS0" }
	local function st(argv) return proc.run(argv).status end
	local sock = v.jail and (v.jail.root .. "/api.sock") or (dir .. "/api.sock")
	if v.jail then print("uid " .. (proc.run({ "stat", "-c", "%u", "/proc/" .. v.jail.pid }).stdout:gsub("%s+$", ""))) end
	print("mode " .. proc.run({ "stat", "-c", "%a", sock }).stdout:gsub("%s+$", ""))
	print("root " .. st({ "socat", "-u", "OPEN:/dev/null", "UNIX-CONNECT:" .. sock }))
	print("nobody " .. st({ "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "socat", "-u",
		"OPEN:/dev/null", "UNIX-CONNECT:" .. sock }))
end)
v:destroy()
if not ok then print("error " .. tostring(err)) end
EOF
mkdir -p "$FIRECLAW_RUN/vms/fct-secfc"
chmod 700 "$FIRECLAW_RUN/vms/fct-secfc"
out=$(FIRECLAW_UNSAFE_NO_JAILER=1 FIRECLAW_JAILER= FIRECLAW_VMM=firecracker "$fc" "$tmp/fcsock.lua" "$FIRECLAW_RUN/vms/fct-secfc" "$FIRECLAW_TESTS/fake-firecracker" 2>&1)
rm -rf "$FIRECLAW_RUN/vms/fct-secfc"
like "$out" "root 0" "firecracker: root can connect to the API socket" 
like "$out" "nobody [1-9]" "firecracker: another user cannot connect to the API socket"
no_leaks "firecracker API socket"

# the same through the jailer (tests/fake-jailer): Firecracker as the VM's user, its socket
# in the chroot (0700, that user's): root connects, nobody else
mkdir -p "$FIRECLAW_RUN/vms/fct-secfc"
chmod 700 "$FIRECLAW_RUN/vms/fct-secfc"
out=$(FIRECLAW_JAILER="$FIRECLAW_TESTS/fake-jailer" FIRECLAW_VMM=firecracker "$fc" "$tmp/fcsock.lua" "$FIRECLAW_RUN/vms/fct-secfc" "$FIRECLAW_TESTS/fake-firecracker" 2>&1)
rm -rf "$FIRECLAW_RUN/vms/fct-secfc"
juid=$(printf '%s\n' "$out" | awk '$1 == "uid" {print $2}')
[ -n "$juid" ] && [ "$juid" -gt $((0x70000000)) ] && [ "$juid" -le $((0x70000000 + 0x1000000)) ]
ok $? "jailed firecracker: runs as a VM user (UID_BASE + 1 + id)" "$out"
like "$out" "root 0" "jailed firecracker: root connects to the API socket in the chroot"
like "$out" "nobody [1-9]" "jailed firecracker: another user cannot"
[ -z "$(ls -A "$FIRECLAW_RUN/jail/fake-firecracker" 2>/dev/null)" ]
ok $? "jailed firecracker: its chroot is gone after destroy" "$(ls -A "$FIRECLAW_RUN/jail/fake-firecracker" 2>/dev/null)"
no_leaks "jailed firecracker API socket"

# ---- the jailer (docs/security.md): only where a real jailer and firecracker are installed
# (FIRECLAW_JAILER / FIRECLAW_FIRECRACKER, else on PATH; tests/jailer.lua drives fireclaw
# through tests/fake-jailer everywhere) ----
jailer=${FIRECLAW_JAILER:-$(command -v jailer)}
fcbin=${FIRECLAW_FIRECRACKER:-$(command -v firecracker)}
case "$fcbin" in *fake-firecracker) fcbin=$(command -v firecracker) ;; esac
case "$jailer" in *fake-jailer) jailer="" ;; esac
if [ -n "$jailer" ] && [ -x "$jailer" ] && [ -n "$fcbin" ]; then
	jns=fct-secjail-$$ jid=fct-secjail
	juid=$((0x70000000 + 1 + 0xfffffe)) jgid=$((0x70000000))
	ip netns add "$jns"
	"$jailer" --id "$jid" --exec-file "$fcbin" --uid "$juid" --gid "$jgid" \
		--chroot-base-dir "$tmp/jail" --netns "/run/netns/$jns" -- --api-sock /api.sock \
		</dev/null >"$tmp/jailer.log" 2>&1 &
	jpid=$!
	bg+=("$jpid")
	jsock=$tmp/jail/${fcbin##*/}/$jid/root/api.sock
	for _ in $(seq 1000); do [ -S "$jsock" ] && break; kill -0 "$jpid" 2>/dev/null || break; sleep 0.01; done
	[ -S "$jsock" ]
	ok $? "jailer: firecracker's API socket appears in the jail" "$(cat "$tmp/jailer.log")"
	like "$(printf 'GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' | socat - "UNIX-CONNECT:$jsock" 2>&1)" \
		'"state"' "jailer: the API answers"
	is "$(awk '/^Uid:/ {print $2}' /proc/"$jpid"/status 2>/dev/null)" "$juid" "jailer: firecracker runs as uid $juid"
	is "$(ip netns identify "$jpid" 2>/dev/null)" "$jns" "jailer: firecracker is in namespace $jns"
	as_nobody socat -u OPEN:/dev/null "UNIX-CONNECT:$jsock"
	ok $((!$?)) "jailer: another user cannot connect to the API socket"
	kill -KILL "$jpid" 2>/dev/null
	wait "$jpid" 2>/dev/null
	ip netns delete "$jns"
	rm -rf "$tmp/jail"
else
	skip "no real jailer and firecracker (FIRECLAW_JAILER, FIRECLAW_FIRECRACKER or PATH): the real jailer is not run here (tests/jailer.lua uses the fake)"
fi

done_testing
