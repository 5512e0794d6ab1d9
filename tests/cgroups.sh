# Resource limits on real VMs (QEMU): the VMM runs in its own cgroup with the memory,
# pids and cpu limits of its VM; `rm`, the end of a run and `cleanup` after a SIGKILL
# leave no cgroup; a guest that allocates past its memory limit ends the run with the
# OOM kill named in one line. Skipped on a host without a usable cgroup controller.
source "$FIRECLAW_TESTS/lib/vmsuite.sh" cg

layout=$("$fc" doctor 2>&1 | awk '$2 == "cgroup" { $1 = $2 = ""; print }' | sed 's/^ *//')
case "$layout" in
v1* | v2*) ;;
*)
	echo "1..0 # skip no usable cgroup controller here: $layout"
	exit 0
	;;
esac
version=${layout%% *}

"$fc" cleanup -q >/dev/null 2>&1
no_leaks "before the tests"
"$fc" -q image build >/dev/null
ok $? "default image present"

# the cgroup directory of controller $1 for cgroup name $2 (v2: the one directory)
cgdir() {
	if [ "$version" = v2 ]; then
		echo "$(awk '$3 == "cgroup2" { print $2; exit }' /proc/self/mounts)/fireclaw/$2"
	else
		echo "$(awk -v c="$1" '$3 == "cgroup" && ("," $4 ",") ~ ("," c ",") { print $2; exit }' /proc/self/mounts)/fireclaw/$2"
	fi
}
field() { # field NAME record.json: a number or string field of the vmm object
	sed -n "/\"vmm\"/,/}/s/.*\"$1\": *\"\{0,1\}\([^\",]*\).*/\1/p" "$2" | head -1
}

# a kept VM with --cpus 0.5: where its VMM is and what its limits are
out=$("$fc" run --keep --no-snapshot --cpus 0.5 -- true 2>"$tmp/err"); rc=$?
is "$rc" 0 "run --keep --cpus 0.5"
[ "$rc" = 0 ] || sed 's/^/#   /' "$tmp/err"
id=$(sed -n 's/^VM \([0-9a-f]*\) is still running.*/\1/p' "$tmp/err")
rec=$FIRECLAW_RUN/vms/$id/record.json
name=${FIRECLAW_NETNS_PREFIX}$id
pid=$(field pid "$rec")
[ -n "$pid" ] && [ -d "/proc/$pid" ]; ok $? "the kept VM's VMM runs (pid ${pid:-none})"
like "$(cat "$rec")" "\"cgroups\"" "its record lists its cgroups"
mem=$(cgdir memory "$name") pids=$(cgdir pids "$name") cpu=$(cgdir cpu "$name")
want_mem=$(((256 + 64 + 64) * 1024 * 1024))
if [ "$version" = v2 ]; then
	like "$(cat "/proc/$pid/cgroup")" "0::/fireclaw/$name\$" "the VMM is in its v2 cgroup"
	is "$(cat "$mem/memory.max")" "$want_mem" "memory.max: 256 MiB guest + 64 MiB + 25%"
	is "$(cat "$pids/pids.max")" 256 "pids.max"
	is "$(cat "$cpu/cpu.max")" "50000 100000" "cpu.max for --cpus 0.5"
else
	for c in memory pids cpu; do
		grep -Eq "^[0-9]+:([^:]*,)?$c(,[^:]*)?:/fireclaw/$name\$" "/proc/$pid/cgroup"
		ok $? "the VMM is in its v1 $c cgroup"
	done
	is "$(cat "$mem/memory.limit_in_bytes")" "$want_mem" "memory.limit_in_bytes: 256 MiB guest + 64 MiB + 25%"
	if [ -e "$mem/memory.memsw.limit_in_bytes" ]; then
		is "$(cat "$mem/memory.memsw.limit_in_bytes")" "$want_mem" "memory.memsw.limit_in_bytes: no swapping past it"
	else
		skip "no memory.memsw.limit_in_bytes (no swap accounting)"
	fi
	is "$(cat "$pids/pids.max")" 256 "pids.max"
	is "$(cat "$cpu/cpu.cfs_quota_us") $(cat "$cpu/cpu.cfs_period_us")" "50000 100000" "cpu quota for --cpus 0.5"
fi
# the memory limit is in effect: the VMM's memory is charged there (the CPU quota's
# effect is checked in tests/cgroup.lua: on a busy host a VMM may never reach 0.5 CPU)
if [ "$version" = v2 ]; then used=$(cat "$mem/memory.current"); else used=$(cat "$mem/memory.usage_in_bytes"); fi
[ "$used" -gt $((16 * 1024 * 1024)) ]; ok $? "the VMM's memory is charged to its cgroup ($((used / 1048576)) MiB)"
# QEMU's tasks all live under the limits: every thread of the VMM is in the cgroup
threads=$(ls "/proc/$pid/task" | wc -l)
[ "$threads" -ge 1 ] && [ "$threads" -le 256 ]; ok $? "the VMM's $threads threads fit under pids.max"
"$fc" rm "$id" >/dev/null 2>&1; is $? 0 "rm the kept VM"
[ ! -e "$mem" ] && [ ! -e "$pids" ] && [ ! -e "$cpu" ]; ok $? "rm removes its cgroups"
no_leaks "run --keep then rm"

# bad input costs nothing
out=$("$fc" run --cpus 0 -- true 2>&1); rc=$?
is "$rc:$out" "2:fireclaw: --cpus must be 0.01 to 1024, got 0" "--cpus 0 is a usage error"
out=$("$fc" run --cpus lots -- true 2>&1); rc=$?
is "$rc" 2 "--cpus lots is a usage error"

# no cgroup (FIRECLAW_CGROUP=none stands for a host without controllers): no limits, a -v note
FIRECLAW_CGROUP=none "$fc" -v run --no-snapshot -- true 2>"$tmp/err"; rc=$?
is "$rc" 0 "a run without cgroups"
like "$(cat "$tmp/err")" "no resource limits: cgroup none: VMs run without limits" "-v says the VM runs without limits"
like "$(FIRECLAW_CGROUP=none "$fc" doctor 2>&1)" "cgroup +none: VMs run without limits" "doctor says so too"
no_leaks "a run without cgroups"

# a plain run: the cgroup goes with the VM
"$fc" run --no-snapshot -- true; is $? 0 "a run with limits"
no_leaks "a run with limits"

# fireclaw SIGKILLed with its VM up, then cleanup
FIRECLAW_FAULT=agent-ready "$fc" run --no-snapshot -- true >/dev/null 2>&1
is $? 137 "fireclaw SIGKILLed with its VM up"
left=$(leaked_cgroups | wc -l)
[ "$left" -ge 1 ]; ok $? "its cgroups are still there (the leak check sees them: $left)"
"$fc" cleanup -q; is $? 0 "cleanup after the SIGKILL"
no_leaks "SIGKILL + cleanup"

# SIGKILLed right after the cgroups were made, before any VMM
FIRECLAW_FAULT=cgroup "$fc" run --no-snapshot -- true >/dev/null 2>&1
is $? 137 "fireclaw SIGKILLed after creating the cgroups"
left=$(leaked_cgroups | wc -l)
[ "$left" -ge 1 ]; ok $? "the cgroups exist, with no VMM yet ($left)"
"$fc" cleanup -q; is $? 0 "cleanup"
no_leaks "SIGKILL at cgroup + cleanup"

# a guest that allocates far past a small memory limit: one line naming the OOM kill
FIRECLAW_CGROUP_MEM_MIB=bad "$fc" run --no-snapshot -- true 2>"$tmp/err"
like "$(cat "$tmp/err")" "FIRECLAW_CGROUP_MEM_MIB must be a whole number" "a bad FIRECLAW_CGROUP_MEM_MIB is refused"
no_leaks "bad FIRECLAW_CGROUP_MEM_MIB"
FIRECLAW_CGROUP_MEM_MIB=${FIRECLAW_TEST_OOM_MIB:-300} "$fc" run --no-snapshot --mem 1024 -- \
	sh -c 'echo allocating; dd if=/dev/zero of=/dev/null bs=700M count=1; echo survived' >"$tmp/out" 2>"$tmp/err"
rc=$?
[ "$rc" != 0 ]; ok $? "a guest past its memory limit fails the run (status $rc)"
like "$(cat "$tmp/err")" "was killed by the kernel's OOM killer .*memory limit \\([0-9]+ MiB" \
	"the run says the OOM killer ended it"
is "$(cat "$tmp/out")" "allocating" "the guest command had started, and did not get past its allocation"
is "$(grep -c . "$tmp/err")" 1 "in one line"
[ "$(grep -c . "$tmp/err")" = 1 ] || sed 's/^/#   /' "$tmp/err"
no_leaks "OOM kill"

done_testing
