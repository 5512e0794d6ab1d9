# Libraries loaded on first use (docs/DECISIONS.md, core/fc_ssh2.c, fc_ext2fs.c):
# fireclaw is linked against none of libssh2, libcrypto, libext2fs, libcom_err (nor libcurl,
# libnftables, libedit); `fireclaw -e ''`, a disk copy and a restored run through the guest
# agent never map them; an SSH run and the ext4 editor do, and work; with the library
# hidden (a private mount namespace with /dev/null bound over it) each says, in one line,
# which Debian package to install. What a process mapped is read from the dynamic loader's
# own log (LD_DEBUG=files, one file per process).
source "$FIRECLAW_TESTS/lib/vmsuite.sh" lzl
cleanup() {
	"$fc" -q snapshot rm lazylibs >/dev/null 2>&1
	rm -rf "$tmp"
}
trap cleanup EXIT
unset FIRECLAW_EXEC
LAZY='lib(ssh2|crypto|ext2fs|com_err|curl|nftables|edit)\.so'

# The loader's logs of the fireclaw processes of a command (the VMM and other programs
# fireclaw starts have their own files, without libmnl, and are not looked at; LuaJIT and
# json-c are linked in).
ld_run() { # ld_run NAME CMD…: runs CMD with the log in $tmp/ld-NAME/
	rm -rf "$tmp/ld-$1"
	mkdir -p "$tmp/ld-$1"
	local name=$1
	shift
	LD_DEBUG=files LD_DEBUG_OUTPUT="$tmp/ld-$name/ld" "$@"
}
fireclaw_loaded() { # fireclaw_loaded NAME: the libraries fireclaw's processes loaded
	local f
	for f in "$tmp/ld-$1"/ld.*; do
		grep -q 'file=libmnl' "$f" && grep -o 'file=[^ ]*' "$f"
	done | sort -u | sed 's/^file=//'
}

out=$(ldd "$fc" | grep -E "$LAZY")
is "$out" "" "fireclaw is not linked against libssh2, libcrypto, libext2fs, libcom_err, libcurl, libnftables, libedit"

ld_run e "$fc" -e ''
ok $? "fireclaw -e ''"
libs=$(fireclaw_loaded e)
like "$libs" 'libmnl' "… the loader's log names what it loaded" "$libs"
unlike "$libs" "$LAZY" "… and none of the libraries loaded on first use"

# a disk copy (what a run does with the image's rootfs) needs no libext2fs
truncate -s 8M "$tmp/disk.img"
mkfs.ext4 -q -F "$tmp/disk.img"
ld_run copy "$fc" -e "require('fireclaw.rootfs').copy('$tmp/disk.img', '$tmp/copy.img')"
ok $? "rootfs.copy"
unlike "$(fireclaw_loaded copy)" 'libext2fs' "… without loading libext2fs"
# the ext4 editor loads it on its first open, and works
ld_run ext4 "$fc" -e "local r = require 'fireclaw.rootfs'
	r.write('$tmp/copy.img', '/etc/x', 'lazy\n')
	io.write(r.read('$tmp/copy.img', '/etc/x'))" >"$tmp/ext4.out"
ok $? "rootfs.write + rootfs.read on the copy"
is "$(cat "$tmp/ext4.out")" "lazy" "… give the file back"
like "$(fireclaw_loaded ext4)" 'libext2fs\.so\.2' "… with libext2fs loaded on first use"
unlike "$(fireclaw_loaded ext4)" 'libssh2' "… and no libssh2"

# a restored run through the agent: no SSH, no ext4 editor
"$fc" cleanup -q >/dev/null 2>&1
"$fc" -q image build >/dev/null
ok $? "default image present"
"$fc" -q snapshot create --name lazylibs 2>"$tmp/err"
ok $? "snapshot create" "$(cat "$tmp/err")"
ld_run agent "$fc" run -v --snapshot lazylibs -- echo via-agent >"$tmp/out" 2>"$tmp/err"
ok $? "a restored run" "$(tail -5 "$tmp/err")"
is "$(cat "$tmp/out")" "via-agent" "… prints the command's output"
grep -q "agent ready" "$tmp/err" && ! grep -q "SSH ready" "$tmp/err"
ok $? "… through the guest agent" "$(grep -E 'ready' "$tmp/err")"
libs=$(fireclaw_loaded agent)
like "$libs" 'libmnl' "… the loader's log of fireclaw found"
unlike "$libs" "$LAZY" "… which loaded none of the libraries loaded on first use"

# the SSH path loads libssh2 (and with it libcrypto) on the first connect, and works
ld_run ssh "$fc" run -v --exec ssh --snapshot lazylibs -- echo via-ssh >"$tmp/out" 2>"$tmp/err"
ok $? "run --exec ssh" "$(tail -5 "$tmp/err")"
is "$(cat "$tmp/out")" "via-ssh" "… prints the command's output"
grep -q "SSH ready" "$tmp/err"
ok $? "… through SSH" "$(grep -E 'ready' "$tmp/err")"
libs=$(fireclaw_loaded ssh)
like "$libs" 'libssh2\.so\.1' "… with libssh2 loaded" "$libs"
like "$libs" 'libcrypto\.so' "… and libcrypto through it" "$libs"
no_leaks "runs"

# A library missing: one line naming the package, only where it is needed.
hide() { # hide SONAME CMD…: run CMD with SONAME's file replaced by an empty one
	local so
	so=$(ldconfig -p | awk -v s="$1" '$1 == s && /x86-64/ {print $NF; exit}')
	shift
	unshare -m --propagation private sh -c 'mount --bind /dev/null "$1" && shift && exec "$@"' \
		sh "$so" "$@"
}
if [ "$(id -u)" != 0 ] || ! unshare -m --propagation private true 2>/dev/null; then
	skip "hiding a library needs root and unshare -m"
else
	install -m 600 /dev/null "$tmp/key"
	err=$(hide libssh2.so.1 "$fc" -e "require('fireclaw.ssh').connect{host='127.0.0.1', port=1,
		key='$tmp/key', insecure_ignore_host_key=true}" 2>&1)
	rc=$?
	like "$err" '^fireclaw: ssh\.connect: cannot load libssh2\.so\.1 \(.*\): install libssh2-1$' \
		"libssh2 missing: ssh.connect says which package to install"
	is "$(printf '%s\n' "$err" | wc -l) $rc" "1 1" "… in one line, exit status 1"
	err=$(hide libssh2.so.1 "$fc" -e "require('fireclaw.ssh'); print(require('fireclaw.json').base64('ok'))" 2>&1)
	is "$err" "b2s=" "… while require of fireclaw.ssh and json.base64 still work"
	err=$(hide libext2fs.so.2 "$fc" -e "require('fireclaw.rootfs').read('$tmp/disk.img', '/x')" 2>&1)
	like "$err" "^fireclaw: rootfs: open $tmp/disk.img: cannot load libext2fs\.so\.2 \(.*\): install libext2fs2$" \
		"libext2fs missing: rootfs.open says which package to install"
	err=$(hide libext2fs.so.2 "$fc" -e "print(require('fireclaw.rootfs').copy('$tmp/disk.img', '$tmp/copy2.img'))" 2>&1)
	like "$err" '^(reflink|sparse)$' "… while a disk copy still works" "$err"
fi
done_testing
