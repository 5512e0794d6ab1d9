# leaks.sh: what a fireclaw run may leave behind. `leaks` prints nothing when clean.
# Tests use a private FIRECLAW_RUN and FIRECLAW_NETNS_PREFIX (fc-<something>) so that other
# fireclaw runs on the machine do not count.
# Counts VM namespaces (fc-*), VMM processes started for fireclaw VMs (their command line
# names a run directory), run directories and mounts under the run dir.
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
	printf '%s' "$out"
}
no_leaks() { # no_leaks NAME
	local l; l=$(leaks)
	[ -z "$l" ]
	ok $? "nothing left behind: $1" "$l"
}
