# Network policy (issue 17) on real VMs (QEMU): --net none|nat, --allow, -p, and what
# cleanup removes. All traffic stays in namespaces this test makes: an "uplink" namespace
# that plays the host (FIRECLAW_UPLINK_NETNS: the VMs' veths go there, never to the real
# host) with an HTTP server on its own address, wired to an "internet" namespace holding
# a DNS server (FIRECLAW_DNS) and HTTP servers on test addresses (tests/lib/internet.py),
# one of them on the cloud metadata address 169.254.169.254. Published ports are on the
# host's loopback only.
set -u
source "$FIRECLAW_TESTS/lib/tap.sh"
source "$FIRECLAW_TESTS/lib/leaks.sh"
source "$FIRECLAW_TESTS/lib/seed.sh"
fc=$FIRECLAW
tmp=$(mktemp -d)
TAG=${FIRECLAW_TEST_TAG:-}
export FIRECLAW_VMM=qemu
export FIRECLAW_RUN=$tmp/run FIRECLAW_NETNS_PREFIX=fc-${TAG}np
UP=fct-${TAG}npup NET=fct-${TAG}npnet
export FIRECLAW_UPLINK_NETNS=$UP FIRECLAW_DNS=198.18.0.1
P1=18080 P2=18081 P3=18082 # host ports on 127.0.0.1
servers=""
finish() {
	"$fc" -q cleanup --all >/dev/null 2>&1
	for p in $servers; do kill "$p" 2>/dev/null; done # our own servers, by pid
	ip netns del "$UP" 2>/dev/null
	ip netns del "$NET" 2>/dev/null
	rm -rf "$tmp"
}
trap finish EXIT

# ---- the test's world ----
ip netns del "$UP" 2>/dev/null
ip netns del "$NET" 2>/dev/null
ip netns add "$UP" && ip netns add "$NET" &&
	ip -n "$UP" link set lo up && ip -n "$NET" link set lo up &&
	ip -n "$UP" link add u0 type veth peer name i0 netns "$NET" &&
	ip -n "$UP" addr add 10.253.0.1/24 dev u0 && ip -n "$UP" link set u0 up &&
	ip -n "$NET" addr add 10.253.0.2/24 dev i0 && ip -n "$NET" link set i0 up &&
	ip -n "$UP" route add default via 10.253.0.2
ok $? "an uplink and an internet namespace"
for a in 198.18.0.1 198.18.1.10 198.18.1.11 198.18.1.20 169.254.169.254; do
	ip -n "$NET" addr add $a/32 dev lo
done
cat >"$tmp/records.json" <<'EOF'
{"nat.test": ["198.18.1.10"], "good.test": ["198.18.1.10", "198.18.1.11"], "bad.test": ["198.18.1.20"],
 "rebind.test": ["198.18.1.10", "169.254.169.254"], "hostaddr.test": ["10.253.0.1"], "port.test": ["198.18.1.20"]}
EOF
start_server() { # start_server NETNS ARGS…: internet.py there, once it says ready
	local out=$tmp/server.$RANDOM
	ip netns exec "$1" python3 "$FIRECLAW_TESTS/lib/internet.py" "${@:2}" >"$out" 2>&1 &
	servers+=" $!"
	local n=500
	while [ $n -gt 0 ] && ! grep -q ready "$out"; do n=$((n - 1)); sleep 0.01; done
	grep -q ready "$out"
}
start_server "$NET" --dns 198.18.0.1 --records "$tmp/records.json" --http 198.18.1.10:80 --http 198.18.1.11:80 \
	--http 198.18.1.20:80 --http 169.254.169.254:80
ok $? "internet: DNS and HTTP servers"
start_server "$UP" --http 10.253.0.1:80
ok $? "uplink: an HTTP server on the uplink's own address"
# without fireclaw in the way, everything the VMs must not reach is reachable
is "$(ip netns exec "$UP" curl -s -m 5 http://169.254.169.254/)" "hello from 169.254.169.254:80" \
	"control: the metadata address answers the uplink"
is "$(ip netns exec "$UP" curl -s -m 5 http://10.253.0.1/)" "hello from 10.253.0.1:80" \
	"control: the uplink's own address answers"

"$fc" -q image build >/dev/null
ok $? "default image present"
FIRECLAW_TEST_SEED=$FIRECLAW_STATE seed_state "$tmp/state"
export FIRECLAW_STATE=$tmp/state
"$fc" -q snapshot create >/dev/null 2>&1
ok $? "a snapshot of our own"
"$fc" cleanup -q >/dev/null 2>&1
no_leaks "before the tests"

# In the guest: each argument fetched over HTTP (busybox wget; 3 s at most), or with
# dns:NAME only resolved, all at once; one line each, sorted.
PROBE='for u in "$@"; do
	( case $u in
	dns:*) if busybox nslookup "${u#dns:}" >/dev/null 2>&1; then echo "$u: resolves"; else echo "$u: no"; fi ;;
	*) if r=$(busybox timeout 3 busybox wget -q -O - "http://$u/" 2>/dev/null); then echo "$u: $r"; else echo "$u: blocked"; fi ;;
	esac ) 2>/dev/null &
done
wait'
probe() { # probe RUN-OPTIONS… -- TARGETS…
	local opts=()
	while [ "$1" != "--" ]; do opts+=("$1"); shift; done
	shift
	"$fc" run "${opts[@]}" -- sh -c "$PROBE" probe "$@" 2>"$tmp/probe.err" | sort
}
lines() { printf '%s\n' "$@" | sort; }

# ---- --net none (the default): nothing but the namespace ----
is "$(probe -- nat.test dns:nat.test 198.18.1.20 169.254.169.254 10.253.0.1)" "$(lines \
	"10.253.0.1: blocked" "169.254.169.254: blocked" "198.18.1.20: blocked" "dns:nat.test: no" "nat.test: blocked")" \
	"--net none: no name resolves, no address answers"

# ---- --net nat: the world, but not link-local or the host ----
is "$(probe --net nat -- nat.test dns:nat.test 198.18.1.20 169.254.169.254 10.253.0.1 hostaddr.test)" "$(lines \
	"nat.test: hello from 198.18.1.10:80" "dns:nat.test: resolves" "198.18.1.20: hello from 198.18.1.20:80" \
	"169.254.169.254: blocked" "10.253.0.1: blocked" "hostaddr.test: blocked")" \
	"--net nat: resolves and fetches; metadata and the host's address blocked"

is "$(FIRECLAW_NET=nat "$fc" run -- busybox wget -q -O - http://nat.test/ 2>"$tmp/err")" "hello from 198.18.1.10:80" \
	"FIRECLAW_NET=nat: the default mode"
# a restore's resolver comes with the hand-off (one write on the agent's channel), not an exec
out=$("$fc" run -v --net nat -- cat /etc/resolv.conf 2>&1)
like "$out" "^nameserver 172\.16\.0\.1$" "--net nat, restored: the hand-off wrote the resolver"
unlike "$out" "guest network" "… with no exec of its own (no 'guest network' stage)"

# another VM's namespace: a kept VM with egress, its veth address reachable from the uplink
# (control) but not from a second VM's guest
"$fc" run --keep --net nat -- true >/dev/null 2>"$tmp/kA.err"
ok $? "a kept VM with --net nat" "$(cat "$tmp/kA.err")"
idA=$("$fc" ps --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
cidrA=$("$fc" -e "io.write(require('fireclaw.netpolicy').cidr('$idA'))")
vethA=$(python3 -c "import ipaddress,sys; n=ipaddress.ip_network(sys.argv[1]); print(n[1], n[2])" "$cidrA")
upA=${vethA% *} vmA=${vethA#* }
ip netns exec "$UP" busybox ping -c1 -W2 "$vmA" >/dev/null 2>&1
ok $? "control: the kept VM's namespace ($vmA) answers ping from the uplink"
is "$("$fc" run --net nat -- sh -c "busybox ping -c1 -W2 $vmA >/dev/null 2>&1 && echo reached $vmA; \
	busybox ping -c1 -W2 $upA >/dev/null 2>&1 && echo reached $upA; busybox ping -c1 -W2 198.18.1.10 >/dev/null 2>&1 \
	&& echo reached internet" 2>"$tmp/err")" "reached internet" \
	"--net nat: another VM's namespace and its uplink address do not answer; the internet does"
"$fc" -q rm "$idA" >/dev/null 2>&1
ok $? "rm the kept VM"

# a cold boot gets its resolver from the kernel command line (ip=…:DNS0)
is "$("$fc" run --no-snapshot --net nat -- sh -c 'cat /etc/resolv.conf; busybox wget -q -O - http://nat.test/' 2>"$tmp/err")" \
	"$(printf 'nameserver 172.16.0.1\nhello from 198.18.1.10:80')" "--net nat, cold boot: resolver set at boot, fetches"
unlike "$("$fc" run -v --no-snapshot --net nat -- true 2>&1)" "guest network" \
	"--net nat, cold boot: no exec waits for the network (the initramfs set it before the agent started)"

# ---- --allow: only the listed names resolve, only their addresses answer ----
out=$("$fc" run --allow good.test --allow rebind.test --allow hostaddr.test -- sh -c "$PROBE
echo --
set -- good.test rebind.test
$PROBE" probe good.test dns:bad.test bad.test 198.18.1.20 198.18.1.11 169.254.169.254 10.253.0.1 hostaddr.test \
	rebind.test 2>"$tmp/err")
first=$(printf '%s\n' "$out" | sed '/^--$/,$d' | sort)
second=$(printf '%s\n' "$out" | sed '1,/^--$/d' | sort)
is "$first" "$(lines "good.test: hello from 198.18.1.10:80" "dns:bad.test: no" "bad.test: blocked" \
	"198.18.1.20: blocked" "198.18.1.11: blocked" "169.254.169.254: blocked" "10.253.0.1: blocked" \
	"hostaddr.test: blocked" "rebind.test: hello from 198.18.1.10:80")" \
	"--allow good.test: it fetches; bad.test neither resolves nor answers by address; metadata and host blocked"
is "$second" "$(lines "good.test: hello from 198.18.1.11:80" "rebind.test: blocked")" \
	"--allow: a changed answer is followed for an allowed name, but never to link-local"

# addresses named explicitly: reachable, even the host's own; nothing else, no names
is "$(probe --allow 198.18.1.20:80 --allow 10.253.0.1 -- 198.18.1.20 198.18.1.11 10.253.0.1 169.254.169.254 dns:nat.test)" \
	"$(lines "198.18.1.20: hello from 198.18.1.20:80" "198.18.1.11: blocked" "10.253.0.1: hello from 10.253.0.1:80" \
		"169.254.169.254: blocked" "dns:nat.test: no")" \
	"--allow IP:PORT and the host's address named explicitly: reachable; nothing else"
is "$(probe --allow 198.18.1.20:81 -- 198.18.1.20)" "198.18.1.20: blocked" "--allow IP:PORT: another port is blocked"
# (good.test answers its last address by now, 198.18.1.11)
is "$(probe --allow good.test:80 --allow port.test:8080 -- good.test dns:port.test port.test)" \
	"$(lines "good.test: hello from 198.18.1.11:80" "dns:port.test: resolves" "port.test: blocked")" \
	"--allow NAME:PORT: reachable on that port; another name's other port is blocked though it resolves"
no_leaks "after the policy runs"

# ---- -p: a guest port on the host's loopback, two VMs at once ----
HTTPD='mkdir -p /tmp/w && echo "$0" >/tmp/w/index.html && busybox httpd -p 8080 -h /tmp/w'
"$fc" run --keep -p 127.0.0.1:$P1:8080 -- sh -c "$HTTPD" one >/dev/null 2>"$tmp/k1.err"
ok $? "a kept VM publishing 127.0.0.1:$P1 -> 8080" "$(cat "$tmp/k1.err")"
"$fc" run --keep --allow good.test -p $P2:8080 -- sh -c "$HTTPD" two >/dev/null 2>"$tmp/k2.err"
ok $? "a second kept VM (same guest address) publishing $P2 -> 8080, with an allow list" "$(cat "$tmp/k2.err")"
is "$(curl -s -m 5 http://127.0.0.1:$P1/)" "one" "-p 127.0.0.1:$P1:8080 reaches the first guest's busybox httpd"
is "$(curl -s -m 5 http://127.0.0.1:$P2/)" "two" "-p $P2:8080 reaches the second guest's at the same time"
ps=$("$fc" ps)
like "$ps" "none +127\.0\.0\.1:$P1->8080" "ps: the first VM's mode and port"
like "$ps" "nat\+allow\(1\) +127\.0\.0\.1:$P2->8080" "ps: the second VM's mode and port"
err=$("$fc" run -p $P1:9999 -- true 2>&1)
rc=$?
is "$rc:$err" "1:fireclaw: net: listen on 127.0.0.1:$P1: Address already in use" "a host port in use: one line"
ids=$("$fc" ps --json | python3 -c 'import json,sys; print(" ".join(r["id"] for r in json.load(sys.stdin)))')
# a helper that never made it into the record (fireclaw killed between its spawn and the
# record's update, a kept VM has no parent-death signal): rm still finds it, by namespace
for rec in "$FIRECLAW_RUN"/vms/*/record.json; do
	python3 - "$rec" <<'EOF2'
import json, sys
p = sys.argv[1]
r = json.load(open(p))
# (their log sinks stay listed: they end by themselves at EOF, but not at once under ASan)
r["net"]["procs"] = [x for x in r["net"]["procs"] if x["role"].endswith("log sink")]
json.dump(r, open(p, "w"))
EOF2
done
like "$(grep -la -- "$FIRECLAW_RUN/vms/" /proc/[0-9]*/cmdline 2>/dev/null | wc -l)" "^[1-9]" \
	"the kept VMs' resolver and forwarders run (their records no longer list them)"
"$fc" -q rm $ids >/dev/null 2>&1
ok $? "fireclaw rm the kept VMs"
curl -s -m 2 http://127.0.0.1:$P1/ >/dev/null
ok $(($? == 0)) "the published port is gone with its VM"
no_leaks "after rm of VMs with published ports and an allow list"

# ---- start (a kept, named VM) takes the same options ----
sid=$("$fc" start --name np-web --allow good.test -p 127.0.0.1:$P3:8080 2>"$tmp/start.err")
ok $? "fireclaw start --allow good.test -p 127.0.0.1:$P3:8080" "$(cat "$tmp/start.err")"
"$fc" exec np-web -- sh -c "$HTTPD" three >/dev/null 2>&1
is "$(curl -s -m 5 http://127.0.0.1:$P3/)" "three" "start -p: the port reaches the kept VM's httpd"
is "$("$fc" exec np-web -- sh -c "$PROBE" probe good.test 198.18.1.20 2>/dev/null | sort)" \
	"$(lines "good.test: hello from 198.18.1.11:80" "198.18.1.20: blocked")" "start --allow: exec sees the policy"
like "$("$fc" ps)" "np-web .*nat\+allow\(1\) +127\.0\.0\.1:$P3->8080" "ps: the started VM's mode and port"
"$fc" -q pause np-web >/dev/null 2>"$tmp/pause.err" && "$fc" -q resume np-web >/dev/null 2>>"$tmp/pause.err"
ok $? "pause and resume the started VM" "$(cat "$tmp/pause.err")"
is "$("$fc" exec np-web -- busybox wget -q -O - http://good.test/ 2>/dev/null)" "hello from 198.18.1.11:80" \
	"after resume: its resolver and allow list still work"
is "$(curl -s -m 5 http://127.0.0.1:$P3/)" "three" "after resume: the published port still reaches its httpd"
"$fc" -q stop np-web >/dev/null 2>&1
ok $? "fireclaw stop"
no_leaks "after stop of a started VM with a policy"

# ---- SIGKILL of fireclaw, then cleanup ----
"$fc" -v run --allow good.test -p $P3:8080 -- sleep 60 >/dev/null 2>"$tmp/kill.err" &
pid=$!
n=3000
while [ $n -gt 0 ] && ! grep -qE "reseed|hand-off" "$tmp/kill.err"; do n=$((n - 1)); sleep 0.01; done
like "$(cat "$tmp/kill.err")" "network policy \(nat\+allow\(1\)\)" "a run with an allow list and a port is up"
kill -0 $pid 2>/dev/null
ok $? "… and still running its command when killed" "$(cat "$tmp/kill.err")"
kill -KILL $pid
wait $pid 2>/dev/null
like "$(ip netns exec "$UP" nft list tables)" "fireclaw_fcv" "after SIGKILL its uplink table is still there"
"$fc" cleanup -q >/dev/null 2>&1
ok $? "cleanup after SIGKILL"
no_leaks "SIGKILL, then cleanup: no veth, nft table, dnsmasq or forwarder"

# ---- fault points of the policy: SIGKILL there, or an error ----
for p in egress resolver publish; do
	{ FIRECLAW_FAULT=$p "$fc" run --allow good.test -p $P3:8080 -- true >/dev/null 2>&1; echo $? >"$tmp/rc"; } 2>/dev/null
	is "$(cat "$tmp/rc")" 137 "SIGKILL at $p"
	"$fc" cleanup -q >/dev/null 2>&1
	no_leaks "SIGKILL at $p, then cleanup"
	err=$(FIRECLAW_FAULT=$p:error "$fc" run --allow good.test -p $P3:8080 -- true 2>&1)
	is "$?:$err" "1:fireclaw: fault injected at $p" "error at $p: exit 1, one line"
	no_leaks "error at $p, without cleanup"
done

# ---- bad input: one line, exit 2, before any VM ----
for bad in "--net wifi" "--allow a..b" "--allow 10.0.0.0/33" "--net none --allow good.test" "-p 8080" "-p 1.2.3:80:80" \
	"-p 80:70000"; do
	# shellcheck disable=SC2086
	err=$("$fc" run $bad -- true 2>&1)
	rc=$?
	[ $rc = 2 ] && [ "$(printf '%s\n' "$err" | wc -l)" = 1 ]
	ok $? "$bad: usage error, one line" "$rc: $err"
done
no_leaks "after bad input"

done_testing
