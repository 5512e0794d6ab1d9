# image build --base debian on real VMs: mmdebstrap (minbase + python3, from the host's apt
# mirror) builds a real Debian root filesystem with fireclaw's box in /.fireclaw; a second
# build with the same inputs reuses the cached tarball; apt-get and python3 run in it, cold
# and restored; a failed build leaves no mount, no temporary file. Downloads ~30 MB from the
# Debian mirror (~40 s cold here): FIRECLAW_TEST_SKIP_DEBIAN=1 skips it.
set -u
source "$FIRECLAW_TESTS/lib/tap.sh"
source "$FIRECLAW_TESTS/lib/leaks.sh"
source "$FIRECLAW_TESTS/lib/seed.sh"
if [ -n "${FIRECLAW_TEST_SKIP_VM:-}" ] || [ -n "${FIRECLAW_TEST_SKIP_DEBIAN:-}" ]; then
	echo "1..0 # skip FIRECLAW_TEST_SKIP_VM or FIRECLAW_TEST_SKIP_DEBIAN"
	exit 0
fi
fc=$FIRECLAW
tmp=$(mktemp -d)
export FIRECLAW_VMM=qemu
export FIRECLAW_RUN=$tmp/run FIRECLAW_NETNS_PREFIX=fc-${FIRECLAW_TEST_TAG:-}db
finish() {
	"$fc" -q cleanup --all >/dev/null 2>&1
	rm -rf "$tmp"
}
trap finish EXIT
secs() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
no_leaks() { local l; l=$(leaks); ok "$([ -z "$l" ] && echo 0 || echo 1)" "nothing left behind: $1" "$l"; }
mounts() { grep -c -e mmdebstrap -e "$tmp" /proc/self/mounts; }

"$fc" -q image build >/dev/null
ok $? "default image present"
FIRECLAW_TEST_SEED=$FIRECLAW_STATE seed_state "$tmp/state"
export FIRECLAW_STATE=$tmp/state
m0=$(mounts)

# ---- bad input: one line, nothing fetched ----
out=$("$fc" image build --suite bookworm --name x 2>&1); rc=$?
is "$rc:$out" "1:fireclaw: image: --suite goes with --base debian" "--suite without --base debian"
out=$("$fc" image build --base gentoo --name x 2>&1); rc=$?
is "$rc:$out" "1:fireclaw: image: unknown base 'gentoo' (busybox, the small default, or debian)" "an unknown base"

# ---- cold build, then the same inputs again ----
t0=$EPOCHREALTIME
out=$("$fc" image build --base debian --packages python3 --name deb 2>&1); rc=$?
cold=$(secs "$t0")
ok $rc "--base debian --packages python3 builds (cold: $cold s)" "$out"
like "$out" "debian: mmdebstrap bookworm \(minbase\) from [a-z]+://[^ ]+ with python3" "built by mmdebstrap from the host's mirror"
echo "# cold build: $cold s"
t0=$EPOCHREALTIME
out=$("$fc" image build --base debian --packages python3 --name deb 2>&1); rc=$?
like "$rc:$out" "^0:image: 'deb' is up to date" "the same build again does nothing ($(secs "$t0") s)"
t0=$EPOCHREALTIME
out=$("$fc" image build --base debian --packages python3 --name deb2 2>&1); rc=$?
cached=$(secs "$t0")
ok $rc "another image from the same inputs (cached: $cached s)" "$out"
unlike "$out" "mmdebstrap" "it reuses the cached tarball (no mmdebstrap run)"
echo "# cached build: $cached s"
is "$(mounts)" "$m0" "no mount left on the host"

mirror=$(grep -hoE '^(deb +|URIs: *)[a-z]+://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
	/etc/apt/sources.list.d/*.sources 2>/dev/null | head -1 | sed -E 's/^(deb +|URIs: *)//; s/ *$//; s|/$||')
got=$("$fc" image info deb | python3 -c 'import json,sys; m=json.load(sys.stdin); b=m["base"]
print(b["kind"], b["suite"], b["mirror"], b["packages"], b["variant"], m["guest"]["login_shell"], m["rootfs"]["used"] > 100*2**20)')
is "$got" "debian bookworm $mirror ['python3'] minbase /bin/bash True" "image info: base debian, suite, the host's mirror, packages"
"$fc" image list --json | python3 -c 'import json,sys
for e in json.load(sys.stdin): print("# %-8s %-28s rootfs tree %6.1f MiB, files %6.1f MiB (%6.1f MiB allocated)" % (e["name"], e["base"], e["rootfs_used"]/2**20, e["size"]/2**20, e["allocated"]/2**20))'

# ---- run it: apt, python3, dpkg (the maintainer scripts ran) ----
t0=$EPOCHREALTIME
out=$("$fc" run --image deb --no-snapshot -- sh -c '
	apt-get --version | head -1; python3 -c "print(6 * 7)"; dpkg-query -W -f "\${Status}\n" python3
	cut -d. -f1 /etc/debian_version; readlink /proc/1/exe' 2>&1); rc=$?
cold_run=$(secs "$t0")
ok $rc "a command runs in the Debian image (cold boot $cold_run s)" "$out"
like "$out" "^apt [0-9]+\.[0-9]+" "apt-get --version"
is "$(printf '%s\n' "$out" | sed -n 2,5p)" "42
install ok installed
12
/.fireclaw/bin/busybox" "python3 -c runs; python3 is configured (maintainer scripts ran); Debian 12; fireclaw's init is PID 1"
out=$("$fc" snapshot create --image deb 2>&1); ok $? "snapshot of the Debian image" "$out"
t0=$EPOCHREALTIME
out=$("$fc" run --image deb --json -- python3 -c 'print(6 * 7)' | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["boot"], r["stdout"].strip())')
is "$out" "snapshot 42" "restored: python3 runs ($(secs "$t0") s)"

# ---- a failed build: one line, no mount, no temporary tarball, no build directory ----
out=$("$fc" image build -q --base debian --packages no-such-package-fireclaw --name bad 2>&1); rc=$?
like "$rc:$out" "^1:fireclaw: image: mmdebstrap failed \(status [0-9]+\): E: Unable to locate package no-such-package-fireclaw$" "an unknown package fails the build with one line"
is "$(mounts)" "$m0" "no mount left after the failure"
is "$(ls -A "$FIRECLAW_STATE/cache/rootfs" | grep -c '~')" "0" "no temporary tarball left"
is "$(ls -A "$FIRECLAW_STATE/images" | grep -c '^\.tmp')" "0" "no build directory left"
"$fc" image info bad >/dev/null 2>&1; ok $(( ! $? )) "no image 'bad'"

# ---- a build killed (SIGKILL) while mmdebstrap runs: nothing of it survives ----
"$fc" -q image build --base debian --packages hello --name killed >/dev/null 2>&1 &
pid=$!
n=0
until pgrep -f "mmdebstrap .*$FIRECLAW_STATE" >/dev/null || [ $n -ge 600 ]; do sleep 0.1; n=$((n + 1)); done
pgrep -f "mmdebstrap .*$FIRECLAW_STATE" >/dev/null; ok $? "mmdebstrap started"
{ kill -9 $pid; wait $pid; } 2>/dev/null
n=0
while pgrep -f "mmdebstrap .*$FIRECLAW_STATE" >/dev/null && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
is "$(pgrep -f "mmdebstrap .*$FIRECLAW_STATE")" "" "no mmdebstrap process outlives the killed fireclaw (its pid namespace dies with it)"
is "$(mounts)" "$m0" "no mount left by the killed build"
out=$("$fc" image build --base debian --packages python3 --name deb 2>&1)
like "$out" "removing \.tmp~killed~$pid \(left by an interrupted build\)" "the next build removes what it left"

"$fc" -q image rm deb deb2
is "$(ls -A "$FIRECLAW_STATE/cache/rootfs")" "" "the cached tarball goes with the last image built from it"

no_leaks "after the Debian tests"
done_testing
