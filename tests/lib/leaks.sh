# leaks.sh: what a fireclaw run may leave behind. `leaks` prints nothing when clean.
# Tests use a private FIRECLAW_RUN and FIRECLAW_NETNS_PREFIX (fc-<something>) so that other
# fireclaw runs on the machine do not count.
# Counts VM namespaces (fc-*), VMM processes and the network policy's helpers started for
# fireclaw VMs (dnsmasq, port forwarders: their command lines name a run directory), run
# directories, the egress veths (fcv*) and nftables tables (fireclaw_*) left in the uplink
# namespace when a test names one (FIRECLAW_UPLINK_NETNS; never the host's), jailer chroots (<run>/jail/<exec>/<id>), mounts
# under the run dir, and VM cgroups
# (fireclaw/<namespace name> under the root of every mounted cgroup hierarchy).
FIRECLAW_RUN=${FIRECLAW_RUN:-/run/fireclaw}
leaks() {
	local out=""
	local ns; ns=$(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${FIRECLAW_NETNS_PREFIX:-fc-}" | tr '\n' ' ')
	[ -n "$ns" ] && out+="namespaces: $ns; "
	local procs; procs=$(grep -lsa -- "${FIRECLAW_RUN%/*}/[${FIRECLAW_RUN##*/}]*/vms/" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3 | tr '\n' ' ')
	[ -n "$procs" ] && out+="VMM processes: $procs; "
	local dirs; dirs=$(ls -A "$FIRECLAW_RUN/vms" 2>/dev/null | tr '\n' ' ')
	[ -n "$dirs" ] && out+="run directories: $dirs; "
	local m; m=$(grep -c " $FIRECLAW_RUN/vms" /proc/self/mounts)
	[ "$m" != 0 ] && out+="mounts: $m; "
	local jails; jails=$(ls -d "$FIRECLAW_RUN"/jail/*/* 2>/dev/null | tr '\n' ' ')
	[ -n "$jails" ] && out+="jails: $jails; "
	if [ -n "${FIRECLAW_UPLINK_NETNS:-}" ] && [ -e "/run/netns/$FIRECLAW_UPLINK_NETNS" ]; then
		local up=$FIRECLAW_UPLINK_NETNS veths tables
		# (a deleted VM namespace takes its veth along asynchronously: wait for it, bounded)
		local n=300
		while :; do
			veths=$(ip -n "$up" -o link show 2>/dev/null | awk -F': ' '{print $2}' | grep '^fcv' | tr '\n' ' ')
			[ -z "$veths" ] || [ $n = 0 ] && break
			n=$((n - 1))
			sleep 0.01
		done
		[ -n "$veths" ] && out+="uplink veths: $veths; "
		tables=$(ip netns exec "$up" nft list tables 2>/dev/null | grep fireclaw_ | tr '\n' ' ')
		[ -n "$tables" ] && out+="uplink nft tables: $tables; "
	fi
	local cg; cg=$(leaked_cgroups | tr '\n' ' ')
	[ -n "$cg" ] && out+="cgroups: $cg; "
	printf '%s' "$out"
}
leaked_cgroups() { # the VM cgroups named with this test's namespace prefix, one a line
	local d
	awk '$3 == "cgroup" || $3 == "cgroup2" { print $2 }' /proc/self/mounts | sort -u | while read -r d; do
		ls -d "$d/fireclaw/${FIRECLAW_NETNS_PREFIX:-fc-}"* 2>/dev/null
	done
	return 0
}
no_leaks() { # no_leaks NAME
	local l; l=$(leaks)
	[ -z "$l" ]
	ok $? "nothing left behind: $1" "$l"
}
