# The VMM probe cache: a QEMU binary is asked its version and features once, and again
# only when the binary changes (path, size, mtime, inode).
set -u
source "$FIRECLAW_TESTS/lib/tap.sh"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export FIRECLAW_STATE=$tmp/state
cat > "$tmp/qemu" <<SH
#!/bin/sh
echo run >> "$tmp/count"
echo "QEMU emulator version 9.9.9"
SH
chmod +x "$tmp/qemu"
probe() { "$FIRECLAW" -e "local p = require('fireclaw.vmm.qemu').probe('$tmp/qemu') print(p.version, p.sandbox)"; }
is "$(probe)" "$(printf '9.9.9\ttrue')" "first probe runs the binary"
is "$(wc -l < "$tmp/count")" 1 "once (-sandbox on accepted)"
is "$(probe)" "$(printf '9.9.9\ttrue')" "second probe, another process: same answer"
is "$(wc -l < "$tmp/count")" 1 "from the cache: the binary did not run again"
is "$(stat -c %a "$tmp/state/cache/vmm-probes.json")" 600 "the cache file is 0600"
sed -i 's/9\.9\.9/9.9.10/' "$tmp/qemu"
touch -d '+1 min' "$tmp/qemu"
is "$(probe)" "$(printf '9.9.10\ttrue')" "a changed binary is probed again"
is "$(wc -l < "$tmp/count")" 2 "and ran once more"
echo 'garbage' > "$tmp/state/cache/vmm-probes.json"
is "$(probe)" "$(printf '9.9.10\ttrue')" "a damaged cache is ignored"
done_testing
