#!/bin/bash
# Static checks of the Lua sources (make lint; tests/lint.sh checks that they catch what
# they should).
#   tools/lint.sh [ROOT]          both checks below on the tree at ROOT (default: this one)
#   tools/lint.sh --ffi [ROOT]    the FFI check only (needs nothing installed)
# 1. No LuaJIT FFI outside core/: system calls, C structs and constants live in
#    fireclaw.sys (core/sys.c), where the C headers give every architecture's values.
#    Hand-typed declarations (an x86_64 struct stat, O_PATH = 0x200000) are wrong elsewhere.
#    The one exception is a test helper that spawns and reaps its own children.
# 2. luacheck (Debian package lua-check) with ROOT/.luacheckrc.
set -u
only_ffi=0
if [ "${1:-}" = "--ffi" ]; then only_ffi=1; shift; fi
root=${1:-$(cd "$(dirname "$0")/.." && pwd)}
cd "$root" || exit 2

# files (relative to ROOT) allowed to use the FFI outside core/, and why: see each file
FFI_ALLOWED="tests/lib/ssh_sys.lua"

status=0
ffi_users=$(grep -rlE --include='*.lua' \
	-e 'ffi\.(cdef|C|new|cast|string|errno)' -e "require *\(? *[\"']ffi[\"']" . 2>/dev/null |
	sed 's|^\./||' | grep -vE '^(core|build|vendor|\.git)/' | sort)
for f in $ffi_users; do
	case " $FFI_ALLOWED " in *" $f "*) continue ;; esac
	echo "lint: $f uses the LuaJIT FFI: use fireclaw.sys instead (core/sys.c: add the call there)" >&2
	status=1
done
[ "$only_ffi" = 1 ] && exit $status

if ! command -v luacheck >/dev/null; then
	echo "lint: luacheck is not installed (Debian package lua-check; tools/deps.sh installs it)" >&2
	exit 1
fi
files=()
for f in lua recipes tests/*.lua tests/lib bench docs/example.lua; do
	[ -e "$f" ] && files+=("$f")
done
luacheck --quiet --formatter plain --config .luacheckrc "${files[@]}" || status=1
exit $status
