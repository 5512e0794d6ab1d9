#!/bin/sh
# Fetches a newer QEMU than Debian 12's 7.2 (bookworm-backports' qemu-system-x86, 10.0)
# into a cache directory without installing it, for tests/qemu_next.sh: QEMU >= 8.2 maps a
# snapshot's memory privately instead of fireclaw copying it (docs/DECISIONS.md).
#   tools/qemu-next.sh [DIR]           fetch into DIR (default build/qemu-next) if not there
#   tools/qemu-next.sh --check [DIR]   fetch nothing: exit 1 when it is not there
# Prints the binary's path (DIR/root/usr/bin/qemu-system-x86_64) on success, else one
# line on stderr saying what failed. Idempotent: a binary already there that answers
# -version with the wanted version is kept. QEMU_NEXT_VERSION picks another Debian
# version of the packages (the mirror drops old ones: `apt-cache policy` after adding
# bookworm-backports shows the current one). Its libraries are Debian 12's (installed
# with qemu-system-x86 by tools/deps.sh); it finds its firmware in DIR/root/usr/share/qemu
# (fireclaw gives it -L for that).
set -eu
VERSION=${QEMU_NEXT_VERSION:-1:10.0.2+ds-2+deb13u1~bpo12+1}
check=""
if [ "${1:-}" = "--check" ]; then check=1; shift; fi
dir=$(realpath -m "${1:-$(dirname "$0")/../build/qemu-next}") # absolute: apt reads relative paths under /etc/apt
bin=$dir/root/usr/bin/qemu-system-x86_64
want=$(echo "$VERSION" | sed 's/^[0-9]*://; s/[+~-].*//') # 1:10.0.2+ds-… -> 10.0.2

fail() { echo "qemu-next: $*" >&2; exit 1; }

have() {
	[ -x "$bin" ] && "$bin" -version 2>/dev/null | grep -q "version $want\b"
}

if have; then
	echo "$bin"
	exit 0
fi
[ -z "$check" ] || fail "no QEMU $want in $dir (fetch it: tools/qemu-next.sh)"
command -v apt-get >/dev/null || fail "needs apt-get (Debian)"
mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial" "$dir/debs" "$dir/sources.list.d"
: >"$dir/status"
echo "deb http://deb.debian.org/debian bookworm-backports main" >"$dir/sources.list"
opts="-o Dir::Etc::sourcelist=$dir/sources.list -o Dir::Etc::sourceparts=$dir/sources.list.d \
-o Dir::State::Lists=$dir/lists -o Dir::Cache=$dir/cache -o Dir::State::status=$dir/status \
-o APT::Sandbox::User=root -qq"
log=$dir/fetch.log
# shellcheck disable=SC2086 # opts is a list of words
apt-get $opts update >"$log" 2>&1 || fail "apt-get update of bookworm-backports failed (network?): see $log"
rm -f "$dir/debs/"*.deb
# shellcheck disable=SC2086
(cd "$dir/debs" && apt-get $opts download "qemu-system-x86=$VERSION" "qemu-system-common=$VERSION" \
	"qemu-system-data=$VERSION") >>"$log" 2>&1 ||
	fail "cannot download QEMU $VERSION from bookworm-backports (gone from the mirror? set QEMU_NEXT_VERSION): see $log"
rm -rf "$dir/root"
for d in "$dir/debs/"*.deb; do dpkg-deb -x "$d" "$dir/root" || fail "cannot unpack $d"; done
have || fail "$bin does not run or is not version $want: $("$bin" -version 2>&1 | head -1)"
echo "$bin"
