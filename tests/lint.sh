#!/bin/bash
# tools/lint.sh (make lint): this tree passes, and each check fails on a tree that has
# what it must catch — FFI outside core/ (fireclaw.sys is the one home of system calls),
# a luacheck warning. Needs neither root nor a VM.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
source "$root/tests/lib/tap.sh"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
lint=$root/tools/lint.sh

out=$("$lint" --ffi "$root" 2>&1)
ok $? "no FFI outside core/ in this tree" "$out"

# a tree of its own for each case: ROOT/lua/fireclaw/x.lua etc.
plant() { # plant DIR FILE TEXT
	mkdir -p "$(dirname "$1/$2")"
	printf '%s\n' "$3" > "$1/$2"
}
plant "$tmp/a" lua/fireclaw/x.lua 'local ffi = require "ffi"
ffi.cdef "int getpid(void);"'
out=$("$lint" --ffi "$tmp/a" 2>&1)
[ $? != 0 ]
ok $? "an ffi.cdef in lua/ fails the check" "$out"
like "$out" "lua/fireclaw/x.lua uses the LuaJIT FFI: use fireclaw.sys" "the message names the file and what to use"
plant "$tmp/b" recipes/r.lua 'return require("ffi").C.getpid()'
out=$("$lint" --ffi "$tmp/b" 2>&1)
[ $? != 0 ]
ok $? "ffi.C in a recipe (no cdef of its own) fails the check" "$out"
plant "$tmp/c" tests/t.lua "local ffi = require 'ffi'"
out=$("$lint" --ffi "$tmp/c" 2>&1)
[ $? != 0 ]
ok $? "requiring ffi in a test fails the check" "$out"
plant "$tmp/d" core/x.lua 'ffi.cdef "int getpid(void);"'
plant "$tmp/d" tests/lib/ssh_sys.lua 'ffi.cdef "int getpid(void);"'
out=$("$lint" --ffi "$tmp/d" 2>&1)
ok $? "core/ and the one allowed test helper may use the FFI" "$out"

if command -v luacheck >/dev/null; then
	out=$("$lint" "$root" 2>&1)
	ok $? "luacheck: no warnings in lua/ recipes/ tests/ bench/ docs/example.lua" "$out"
	cp "$root/.luacheckrc" "$tmp/d/"
	plant "$tmp/d" lua/fireclaw/y.lua 'local unused = 1
return {}'
	out=$("$lint" "$tmp/d" 2>&1)
	[ $? != 0 ]
	ok $? "luacheck: an unused variable fails" "$out"
	like "$out" "y.lua:1:7: \(W211\) unused variable 'unused'" "luacheck: it says where and what"
else
	skip "luacheck not installed (lua-check; tools/deps.sh)"
	skip "luacheck not installed"
	skip "luacheck not installed"
fi
echo "1..$_tap_n"
[ "$_tap_failed" = 0 ]
