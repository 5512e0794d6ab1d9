# Bad input (issue 9): each case gives one line on stderr ("fireclaw: …"), its documented
# exit status (2 usage, 1 failure, the command's own otherwise), no crash and no leftovers.
# Unknown options and bad values, bad --put/--get (local and remote), recipes with syntax and runtime errors,
# images with a bad or missing kernel or a rootfs that is not ext4, truncated and corrupt
# snapshot files, snapshots from another VMM or version, a command the guest lacks, output
# that is not UTF-8 (byte-exact; --json adds <stream>_base64), 100 MB of output with --json
# (capped, fireclaw's peak RSS bounded). A subset runs again under ASan+UBSan (a copy built
# in build/faults-asan) and under valgrind (the cases that start no VMM: valgrind lacks
# pidfd_open).
set -u
source "$FIRECLAW_TESTS/lib/tap.sh"
source "$FIRECLAW_TESTS/lib/leaks.sh"
fc=$FIRECLAW
repo=$(cd "$FIRECLAW_TESTS/.." && pwd)
tmp=$(mktemp -d)
FAULTS_PREFIX=fc-${FIRECLAW_TEST_TAG:-}fli
source "$FIRECLAW_TESTS/lib/faults.sh"
big_pid=
cleanup_all() {
	[ -n "$big_pid" ] && kill -KILL "$big_pid" 2>/dev/null
	FIRECLAW_RUN=$tmp/run-big FIRECLAW_NETNS_PREFIX=fc-${FIRECLAW_TEST_TAG:-}flb "$fc" cleanup --all -q >/dev/null 2>&1
	"$fc" cleanup --all -q >/dev/null 2>&1
	rm -rf "$tmp"
}
trap cleanup_all EXIT

faults_begin
img=$FIRECLAW_STATE/images/default

# ---- 100 MB of output with --json, in the background (its own run dir and prefix) ----
# run in-process so that VmHWM is fireclaw's own peak (QEMU is a child, not counted)
(
	export FIRECLAW_RUN=$tmp/run-big FIRECLAW_NETNS_PREFIX=fc-${FIRECLAW_TEST_TAG:-}flb
	exec "$fc" -e 'local run = require("fireclaw.runtime").load_recipe("run")
		local status = run("--json", "--", "dd", "if=/dev/zero", "bs=1M", "count=100")
		local f = io.open("/proc/self/status")
		local hwm = f:read("*a"):match("VmHWM:%s*(%d+)")
		f:close()
		io.stderr:write("status ", status, " hwm ", hwm, "\n")'
) >"$tmp/big.json" 2>"$tmp/big.err" &
big_pid=$!

# check CMD…: run it; sets rc, err (stderr) and out (stdout)
check() {
	"$@" >"$tmp/out" 2>"$tmp/err"
	rc=$?
	err=$(cat "$tmp/err")
	out=$(cat "$tmp/out")
}

# expect STATUS REGEX NAME CMD…: exit status, one line on stderr matching REGEX, no leftovers
expect() {
	local want=$1 re=$2 name=$3
	shift 3
	check "$@"
	is "$rc" "$want" "$name: exit $want"
	one_line "$tmp/err" && grep -qE -- "$re" "$tmp/err"
	ok $? "$name: one line on stderr" "$err"
	no_leaks "$name"
}

# ---- options: usage errors (2) before any VM exists ----
usage_cases=(
	"unknown option|unknown option '--bogus'|run --bogus -- true"
	"unknown global option|unknown option '--bogus'|--bogus run -- true"
	"option without its value|--mem needs a value|run --mem"
	"--mem 0|--mem must be 64 to 65536|run --mem 0 -- true"
	"--mem absurdly large|--mem must be 64 to 65536|run --mem 99999999999 -- true"
	"--mem nan|wants a number, got 'nan'|run --mem nan -- true"
	"--vcpu 0|--vcpu must be 1 to 64|run --vcpu 0 -- true"
	"--vcpu 1.5|--vcpu must be 1 to 64|run --vcpu 1.5 -- true"
	"--timeout 0|--timeout must be positive|run --timeout 0 -- true"
	"--max-output -1|--max-output must be a byte count|run --json --max-output -1 -- true"
	"--vmm bogus|--vmm must be auto, firecracker or qemu|run --vmm bogus -- true"
	"no command|no command given|run"
	"--put of a missing file|--put: no such file '/nonexistent'|run --put /nonexistent:/x -- true"
	"--put of a directory over SSH|--put: '/' is a directory; directory trees go through the guest agent, not SSH|run --exec ssh --put /:/x -- true"
	"--put without a colon|--put wants LOCAL:REMOTE|run --put nocolon -- true"
	"--get into a missing directory|--get: no directory '/nonexistent/dir'|run --get /etc/hostname:/nonexistent/dir/x -- true"
	"--get without a colon|--get wants REMOTE:LOCAL|run --get nocolon -- true"
	"--env with a bad name|--env wants K=V|run --env 1A=b -- true"
	"unknown recipe|no recipe named 'nosuchrecipe'|nosuchrecipe"
)
for c in "${usage_cases[@]}"; do
	IFS='|' read -r name re args <<<"$c"
	read -ra argv <<<"$args"
	expect 2 "$re" "$name" "$fc" "${argv[@]}"
done

# ---- failures (1) ----
expect 1 "no image named 'nosuch'" "--image nosuch (the default image exists)" "$fc" run --image nosuch -- true
expect 1 "bad image name" "--image with a path in it" "$fc" run --image a/../b -- true
mkdir -p "$tmp/empty"
expect 1 "no image named 'nosuch'" "--image nosuch, and no default image either" \
	env FIRECLAW_STATE="$tmp/empty" "$fc" run --image nosuch -- true
is "$(ls -A "$tmp/empty")" "" "and no default image was built for it"

mkdir -p "$tmp/recipes"
printf -- '-- broken\nlocal x = = 1\n' >"$tmp/recipes/synerr.lua"
printf -- '-- fails\nlocal t = nil\nreturn t.field\n' >"$tmp/recipes/rterr.lua"
printf -- '-- raises a table\nerror({})\n' >"$tmp/recipes/errtab.lua"
cat >"$tmp/recipes/halfway.lua" <<'LUA'
-- restores a VM, then fails without destroying it
local restore = require("fireclaw.cli").use("restore")
local sb = restore.restore({}, assert(restore.find {}))
assert(sb:exec({ "true" }).status == 0)
error("failed with a VM up", 0)
LUA
expect 1 "synerr\.lua:2: unexpected symbol" "recipe with a syntax error" env FIRECLAW_PATH="$tmp/recipes" "$fc" synerr
expect 1 "synerr\.lua:2: unexpected symbol" "script with a syntax error" "$fc" "$tmp/recipes/synerr.lua"
expect 1 "rterr\.lua:3: attempt to index" "recipe with a runtime error" env FIRECLAW_PATH="$tmp/recipes" "$fc" rterr
expect 1 "the error object is not a string" "recipe raising a table" env FIRECLAW_PATH="$tmp/recipes" "$fc" errtab
expect 1 "failed with a VM up" "recipe failing with a VM it never destroys" env FIRECLAW_PATH="$tmp/recipes" "$fc" halfway

# ---- images: bad kernels, no kernel, a rootfs that is not ext4 ----
import() { "$fc" -q image import --name "$1" --kernel "$2" --initrd "$img/initrd" --rootfs "${3:-$img/rootfs.ext4}" \
	--host-key "$img/host_key.pub" >/dev/null 2>"$tmp/import.err"; }
head -c 100000 /dev/urandom >"$tmp/garbage"
{ printf '\177ELF'; head -c 100000 /dev/urandom; } >"$tmp/elf-garbage"
head -c 600 "$img/vmlinuz" >"$tmp/bz-truncated"
expect 1 "neither an ELF vmlinux nor a bzImage" "import of a kernel that is garbage" \
	"$fc" image import --name garbage --kernel "$tmp/garbage" --rootfs "$img/rootfs.ext4"
expect 1 "no such file: /nonexistent" "import of a missing kernel" \
	"$fc" image import --name missing --kernel /nonexistent --rootfs "$img/rootfs.ext4"
import elfgarbage "$tmp/elf-garbage"
ok $? "import of an ELF header + garbage" "$(cat "$tmp/import.err")"
expect 1 "qemu exited \(status 1\) before answering" "run with a corrupt ELF kernel" "$fc" run --image elfgarbage -- true
import notakernel /bin/true
ok $? "import of an ELF that is not a kernel" "$(cat "$tmp/import.err")"
expect 1 "qemu exited \(status 1\).*PVH" "run with an ELF that is not a kernel" "$fc" run --image notakernel -- true
import bztruncated "$tmp/bz-truncated"
ok $? "import of a truncated bzImage" "$(cat "$tmp/import.err")"
expect 1 "qemu exited \(status 1\).*invalid kernel header" "run with a truncated bzImage" "$fc" run --image bztruncated -- true
import nokernel "$img/vmlinux"
rm -f "$(readlink -f "$FIRECLAW_STATE/images/nokernel")"/vmlinu*
expect 1 "'nokernel' in .* is incomplete" "run with the kernel file gone" "$fc" run --image nokernel -- true
expect 1 "cannot write the agent into the rootfs: .*not an ext2/3/4 filesystem \(import with --no-agent" \
	"import of a rootfs that is not ext4 (the agent cannot be written)" \
	"$fc" image import --name notext4 --kernel "$img/vmlinux" --rootfs "$tmp/garbage"
"$fc" -q image import --name notext4 --kernel "$img/vmlinux" --initrd "$img/initrd" --rootfs "$tmp/garbage" \
	--host-key "$img/host_key.pub" --no-agent >/dev/null 2>"$tmp/import.err"
ok $? "import --no-agent of a rootfs that is not ext4" "$(cat "$tmp/import.err")"
# a boot that fails: one line with the likely cause, then the console's last lines
check "$fc" run --image notext4 -- true
is "$rc" 1 "run with a rootfs that is not ext4: exit 1"
like "$(head -1 "$tmp/err")" "qemu exited \(status 0\) before its SSH server answered; likely cause: the kernel cannot find or mount its root disk .*the console says: fireclaw-initrd: cannot mount" \
	"run with a rootfs that is not ext4: the guest says why, on the first line"
like "$(sed -n 2p "$tmp/err")" "^the console ends with:$" "then the console's last lines"
no_leaks "run with a rootfs that is not ext4"

# ---- snapshots: truncated, corrupt, from another VMM or version (restore --snapshot bad) ----
snaps=$FIRECLAW_STATE/snapshots
mkbad() { # a fresh copy of the default snapshot: big files linked (never written), others copied
	rm -rf "$snaps/bad"
	link_dir "$snaps/default" "$snaps/bad"
}
replace() { mv -f "$1.new" "$1"; } # a new inode: linked files stay untouched
setmeta() { # setmeta PYTHON: edit meta.json of snapshot bad (m is the parsed object)
	/usr/bin/python3 -c 'import json, sys
p = sys.argv[2]; m = json.load(open(p)); exec(sys.argv[1]); open(p + ".new", "w").write(json.dumps(m))' "$1" "$snaps/bad/meta.json"
	replace "$snaps/bad/meta.json"
}
vmstate_size=$(stat -c %s "$snaps/default/vmstate")
restore_bad() { "$fc" restore --snapshot bad -- true; }

mkbad
head -c 30000 "$snaps/default/vmstate" >"$snaps/bad/vmstate.new" && replace "$snaps/bad/vmstate"
expect 1 "vmstate is 30000 bytes, meta.json says $vmstate_size \(truncated" "vmstate truncated" restore_bad
setmeta 'm["files"]["vmstate"]["size"] = 30000'
expect 1 "restore failed \(a damaged snapshot\?\).*load of migration failed" "vmstate truncated, meta.json agreeing" restore_bad
mkbad
head -c "$vmstate_size" /dev/urandom >"$snaps/bad/vmstate.new" && replace "$snaps/bad/vmstate"
expect 1 "restore failed \(a damaged snapshot\?\)" "vmstate garbage of the right size" restore_bad
mkbad
truncate -s 100M "$snaps/bad/memory.new" && replace "$snaps/bad/memory"
expect 1 "memory is 104857600 bytes, meta.json says" "memory truncated" restore_bad
setmeta 'm["files"]["memory"]["size"] = 100 << 20'
expect 1 "restore failed \(a damaged snapshot\?\): .*memory is 104857600 bytes, the VM's RAM is 256 MiB" \
	"memory truncated, meta.json agreeing" restore_bad
mkbad
rm "$snaps/bad/disk.ext4"
expect 1 "snapshot 'bad' is missing disk.ext4" "disk.ext4 missing" restore_bad
mkbad
printf 'garbage{' >"$snaps/bad/meta.json.new" && replace "$snaps/bad/meta.json"
expect 1 "snapshot 'bad' has an unreadable meta.json" "meta.json garbage" restore_bad
mkbad
setmeta 'm["format"] = 2'
expect 1 "unreadable meta.json \(unknown format\)" "meta.json of another format" restore_bad
mkbad
setmeta 'm["mem_mib"] = "lots"'
expect 1 "snapshot 'bad' has a damaged meta.json" "meta.json with a string for mem_mib" restore_bad
mkbad
setmeta 'm["vmm"] = "firecracker"'
expect 1 "snapshot 'bad' cannot be used: it was taken with firecracker, this run uses qemu" \
	"snapshot from another VMM" restore_bad
mkbad
setmeta 'm["vmm_version"] = "6.0.0"'
expect 1 "snapshot 'bad' cannot be used: it was taken with qemu 6\.0\.0" "snapshot from another VMM version" restore_bad
check "$fc" snapshot list
is "$rc" 0 "snapshot list with a damaged snapshot around"
rm -rf "$snaps/bad"
no_leaks "snapshot cases"

# run with a damaged default snapshot: a note, then a cold boot that works
cp -p "$snaps/default/meta.json" "$tmp/meta.json"
printf 'garbage{' >"$snaps/default/meta.json.new" && replace "$snaps/default/meta.json"
check "$fc" run -- echo cold
is "$rc:$out" "0:cold" "run with a damaged snapshot still runs (cold boot)"
like "$err" "unreadable meta\.json.*cold booting" "with a one-line note"
cp -p "$tmp/meta.json" "$snaps/default/meta.json"
no_leaks "run with a damaged snapshot"

# bad --put/--get paths only the guest can judge: one line, no partial local file
echo data >"$tmp/put.txt"
expect 1 "remote /nonexistent: no such file" "--get of a missing remote file" \
	"$fc" run --get "/nonexistent:$tmp/got" -- true
expect 1 "remote /etc is not a regular file" "--get of a remote directory over SSH" \
	"$fc" run --exec ssh --get "/etc:$tmp/got" -- true
is "$(ls "$tmp" | grep -c '^got')" 0 "no local file from a failed --get"
expect 1 "remote /nonexistent/dir/x: no such file" "--put into a missing remote directory" \
	"$fc" run --put "$tmp/put.txt:/nonexistent/dir/x" -- true

# ---- commands and their output ----
check "$fc" run -- no-such-command-xyz
is "$rc" 127 "a command the guest lacks: 127"
like "$err" "no-such-command-xyz: not found" "the guest's shell says so"
no_leaks "command not found"

printf '\377\376a\300\200b\000c\351\n' >"$tmp/bytes"
"$fc" run -- printf '\377\376a\300\200b\000c\351\n' >"$tmp/bytes.out"
cmp -s "$tmp/bytes" "$tmp/bytes.out"
ok $? "output that is not UTF-8 passes through byte for byte (NUL included)"
"$fc" run --json -- printf '\377\376a\300\200b\000c\351\n' >"$tmp/bytes.json"
/usr/bin/python3 - "$tmp/bytes.json" "$tmp/bytes" <<'PY'
import base64, json, sys
j = json.loads(open(sys.argv[1], "rb").read().decode("utf-8"))  # strict: valid UTF-8 JSON
want = open(sys.argv[2], "rb").read()
assert base64.b64decode(j["stdout_base64"]) == want, "stdout_base64"
assert j["stdout"] == want.decode("utf-8", "replace"), j["stdout"]
assert j["stderr"] == "" and "stderr_base64" not in j
PY
ok $? "--json: valid UTF-8 JSON, stdout with U+FFFD, stdout_base64 with the exact bytes"
check "$fc" run --json -- printf 'h\303\251 \342\202\254\n'
/usr/bin/python3 -c 'import json, sys; j = json.loads(sys.argv[1]); assert j["stdout"] == "hé €\n" and "stdout_base64" not in j' "$out"
ok $? "--json: UTF-8 output is plain text, no base64"
no_leaks "output bytes"

# ---- ASan + UBSan: a subset again with a sanitizer build ----
if ldd "$fc" 2>/dev/null | grep -q libasan; then
	asan=$fc
elif [ "${FIRECLAW_FAULTS_ASAN:-1}" = 1 ]; then
	# in a copy of the sources: a build next to other people's never races with theirs
	d=$repo/build/faults-asan
	(
		flock 9
		mkdir -p "$d" && cd "$d" && rm -rf core guest lua recipes tools vendor &&
			cp -rp "$repo"/{Makefile,core,guest,lua,recipes,tools,vendor} . &&
			make -s -j2 SANITIZE=1
	) 9>"$repo/build/faults-asan.lock" >"$tmp/asan.log" 2>&1
	ok $? "a sanitizer build (build/faults-asan)" "$(tail -5 "$tmp/asan.log")"
	asan=$d/build/san/fireclaw # where `make SANITIZE=1` puts it
	[ -x "$asan" ] || asan=$d/fireclaw
else
	asan=
fi
# sanitized CMD STATUS NAME: the status, and no sanitizer report
sanitized() {
	local name=$1 want=$2
	shift 2
	check env ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 "$@"
	is "$rc" "$want" "ASan: $name: exit $want"
	unlike "$err" "AddressSanitizer|LeakSanitizer|runtime error:" "ASan: $name: no report"
	no_leaks "ASan: $name"
}
if [ -n "$asan" ] && [ -x "$asan" ]; then
	sanitized "unknown option" 2 "$asan" run --bogus -- true
	sanitized "--mem 0" 2 "$asan" run --mem 0 -- true
	sanitized "--put of a missing file" 2 "$asan" run --put /nonexistent:/x -- true
	sanitized "--image nosuch" 1 "$asan" run --image nosuch -- true
	sanitized "recipe with a syntax error" 1 env FIRECLAW_PATH="$tmp/recipes" "$asan" synerr
	sanitized "recipe with a runtime error" 1 env FIRECLAW_PATH="$tmp/recipes" "$asan" rterr
	sanitized "recipe failing with a VM up" 1 env FIRECLAW_PATH="$tmp/recipes" "$asan" halfway
	sanitized "corrupt kernel" 1 "$asan" run --image elfgarbage -- true
	sanitized "a missing snapshot" 1 "$asan" restore --snapshot nosuch -- true
	sanitized "a command the guest lacks" 127 "$asan" run -- no-such-command-xyz
	sanitized "non-UTF-8 output with --json" 0 "$asan" run --json -- printf '\377\376a\n'
	sanitized "the guest's sshd killed" 1 "$asan" run --exec ssh -- sh -c 'kill -9 $(pidof dropbear)'
else
	skip "no sanitizer build (FIRECLAW_FAULTS_ASAN=0)"
fi

# ---- valgrind: the cases that start no VMM (valgrind 3.19 has no pidfd_open) ----
if command -v valgrind >/dev/null; then
	vg() { # vg STATUS NAME ARGS…
		local want=$1 name=$2
		shift 2
		check valgrind -q --error-exitcode=99 --leak-check=no "$fc" "$@"
		is "$rc" "$want" "valgrind: $name: exit $want (99: memory errors)" "$err"
	}
	vg 2 "unknown option" run --bogus -- true
	vg 2 "--vcpu 0" run --vcpu 0 -- true
	vg 1 "--image nosuch" run --image nosuch -- true
	mkbad
	setmeta 'm["vcpu"] = {}'
	vg 1 "damaged meta.json" restore --snapshot bad -- true
	vg 0 "snapshot list with a damaged snapshot" snapshot list
	rm -rf "$snaps/bad"
	export FIRECLAW_PATH=$tmp/recipes
	vg 1 "recipe with a runtime error" rterr
	unset FIRECLAW_PATH
	no_leaks "valgrind cases"
else
	skip "valgrind is not installed"
fi

# ---- the 100 MB run started at the top ----
wait_for 12000 eval "! kill -0 $big_pid 2>/dev/null" # bounded: 120 s
ok $? "100 MB of output with --json finishes"
kill -KILL "$big_pid" 2>/dev/null
wait "$big_pid"
is "$?" 0 "100 MB --json: exit 0"
big_pid=
/usr/bin/python3 - "$tmp/big.json" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
assert j["exit_code"] == 0 and j["truncated"] is True, j.get("truncated")
assert len(j["stdout"]) == 16 << 20, len(j["stdout"])
PY
ok $? "100 MB --json: stdout capped at 16 MiB, truncated: true"
like "$(cat "$tmp/big.err")" "output beyond 16777216 bytes per stream was dropped" "and a note says so"
hwm=$(sed -n 's/^status 0 hwm \([0-9]*\)$/\1/p' "$tmp/big.err")
# 16 MiB of NULs is ~100 MB of JSON (\u0000): a bounded peak is a few times that, an
# unbounded capture would be 100 MB + 600 MB of JSON
[ -n "$hwm" ] && [ "$hwm" -lt $((512 * 1024)) ]
ok $? "100 MB --json: fireclaw's peak RSS stays bounded (< 512 MiB)" "VmHWM ${hwm:-?} kB"
FIRECLAW_RUN=$tmp/run-big FIRECLAW_NETNS_PREFIX=fc-${FIRECLAW_TEST_TAG:-}flb no_leaks "100 MB --json"

done_testing
