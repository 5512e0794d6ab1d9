# image import --oci on real VMs: container images made here (tests/lib/oci_images.py, from
# a static busybox: no registry is reachable) as an OCI layout and as docker save tarballs;
# layers and whiteouts applied, the config's Entrypoint/Cmd/Env/WorkingDir/User honoured by
# run, a distroless image (no shell, no libc) boots and answers, hostile layers are refused
# and write nothing outside the tree, snapshots restore; sizes and times are printed.
set -u
source "$FIRECLAW_TESTS/lib/tap.sh"
source "$FIRECLAW_TESTS/lib/leaks.sh"
source "$FIRECLAW_TESTS/lib/seed.sh"
if [ -n "${FIRECLAW_TEST_SKIP_VM:-}" ]; then
	echo "1..0 # skip FIRECLAW_TEST_SKIP_VM"
	exit 0
fi
fc=$FIRECLAW
bb=$(command -v busybox)
if [ -z "$bb" ] || ! file -L "$bb" | grep -q "statically linked"; then
	echo "1..0 # skip no static busybox on the host (busybox-static, tools/deps.sh)"
	exit 0
fi
tmp=$(mktemp -d)
export FIRECLAW_VMM=qemu
export FIRECLAW_RUN=$tmp/run FIRECLAW_NETNS_PREFIX=fc-${FIRECLAW_TEST_TAG:-}oc
finish() {
	"$fc" -q cleanup --all >/dev/null 2>&1
	rm -rf "$tmp"
}
trap finish EXIT

"$fc" -q image build >/dev/null
ok $? "default image present (its kernel and initramfs boot the imported images)"
FIRECLAW_TEST_SEED=$FIRECLAW_STATE seed_state "$tmp/state"
export FIRECLAW_STATE=$tmp/state
python3 "$FIRECLAW_TESTS/lib/oci_images.py" "$bb" "$tmp/img"
ok $? "test images made (OCI layout, docker save tarballs)"
no_leaks() { local l; l=$(leaks); ok "$([ -z "$l" ] && echo 0 || echo 1)" "nothing left behind: $1" "$l"; }
secs() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

# ---- import: an OCI layout (plain + gzip layers) and the same image as a docker save ----
t0=$EPOCHREALTIME
out=$("$fc" image import --oci "$tmp/img/layout" --name lay 2>&1); rc=$?
ok $rc "import --oci of an OCI layout" "$out"
echo "# import (OCI layout) took $(secs "$t0") s"
like "$out" "import: .*layout \(oci, 2 layers, config sha256:[0-9a-f]{64}\)" "the import names format, layers and digest"
t0=$EPOCHREALTIME
out=$("$fc" image import --oci "$tmp/img/app.tar" --name app 2>&1); rc=$?
ok $rc "import --oci of a docker save tarball" "$out"
echo "# import (docker save) took $(secs "$t0") s"

# the manifest: base, digests, container settings; list shows base and size
info=$("$fc" image info --json lay)
cfg=$(python3 -c 'import json,sys; m=json.load(open(sys.argv[1]+"/index.json")); print(m["manifests"][0]["digest"])' "$tmp/img/layout")
got=$(printf '%s' "$info" | python3 -c 'import json,sys; m=json.load(sys.stdin); b=m["base"]; c=m["container"]
print(m["source"], b["kind"], b["format"], b["layers"], b["manifest_digest"], b["tags"], c["entrypoint"], c["cmd"], c["working_dir"], c["env"][1], "init=/.fireclaw/init" in m["boot_args"])')
is "$got" "oci oci oci 2 $cfg ['app:test'] ['/entry.sh'] ['default'] /work GREETING=hello from the image True" \
	"image info: source, layers, manifest digest, tag, Entrypoint/Cmd/WorkingDir/Env, init"
list=$("$fc" image list)
like "$list" "app .* oci:app:test@sha256:[0-9a-f]{12}" "image list shows the source image and digest"
sizes=$("$fc" image list --json | python3 -c 'import json,sys
for e in json.load(sys.stdin): print("# %-8s %-40s rootfs tree %5.1f MiB, files %6.1f MiB (%5.1f MiB allocated)" % (e["name"], e["base"], e["rootfs_used"]/2**20, e["size"]/2**20, e["allocated"]/2**20))')
ok $? "image list --json" "$sizes"
echo "$sizes"

# ---- run: the entrypoint by default, layers and whiteouts, Env, WorkingDir ----
want="entry: hello from the image in /work as 0"
for img in lay app; do
	t0=$EPOCHREALTIME
	out=$("$fc" run --image $img --no-snapshot 2>&1)
	is "$out" "$want" "$img: no command runs Entrypoint + Cmd with the image's Env and WorkingDir (cold boot $(secs "$t0") s)"
	out=$("$fc" run --image $img --no-snapshot -- sh -c '
		cat /data/keep /data/replaced; ls /opq; test -e /data/gone || echo gone; cat /etc/layer2; echo "$GREETING"; pwd
		echo "$PATH"' 2>&1)
	is "$out" "kept from layer 1
new content from layer 2
new
gone
layer 2 was here
hello from the image
/work
/usr/local/bin:/usr/bin:/bin" "$img: layer 2 replaced a file, deleted one (.wh.), made /opq opaque; Env and WorkingDir apply to a command too"
done
out=$("$fc" run --image app --no-snapshot --env GREETING=mine 2>&1)
is "$out" "entry: mine in /work as 0" "--env wins over the image's Env"
out=$("$fc" run --image app --no-snapshot --entrypoint /bin/sh -- -c 'echo "$0 $GREETING"; ls /opq' 2>&1)
is "$out" "/bin/sh hello from the image
new" "--entrypoint replaces Entrypoint and Cmd (the image's Env stays)"
out=$("$fc" run --image app --no-snapshot --entrypoint '' -- cat /data/keep 2>&1)
is "$out" "kept from layer 1" "--entrypoint '': the command alone"
out=$("$fc" run --image app --entrypoint '' 2>&1); rc=$?
is "$rc:$out" "2:fireclaw: no command given (fireclaw run -- CMD [ARGS…])" "--entrypoint '' without a command: usage error"
out=$("$fc" run --entrypoint /bin/sh -- true 2>&1); rc=$?
is "$rc:$out" "2:fireclaw: --entrypoint is for images imported with --oci; 'default' is not one" "--entrypoint with the default image: usage error"
out=$("$fc" run --image app --no-snapshot -- false 2>&1); rc=$?
is "$rc" 1 "a command replaces Cmd, not the Entrypoint (the entrypoint execs it), and its status is run's"

# ---- User, and a distroless image: no shell, no passwd, no libc ----
out=$("$fc" image import -q --oci "$tmp/img/user.tar" --name usr --size 200M 2>&1); ok $? "import (User app, --size 200M)" "$out"
size=$("$fc" image info usr | python3 -c 'import json,sys; print(json.load(sys.stdin)["rootfs"]["size"])')
is "$size" $((200 * 1048576)) "--size sets the rootfs size"
out=$("$fc" run --image usr --no-snapshot 2>&1)
is "$out" "entry: hello from the image in /home/app as 1000" "User: the entrypoint runs as the image's user"
out=$("$fc" image import -q --oci "$tmp/img/distroless.tar" --name dl 2>&1); ok $? "import a distroless image" "$out"
head -c 3000 /dev/urandom >"$tmp/blob"
out=$("$fc" run --image dl --no-snapshot --put "$tmp/blob:/blob" --get "/blob:$tmp/back" 2>&1)
is "$out" "distroless ok" "distroless: fireclaw's init, sshd and shell need nothing from the image"
cmp -s "$tmp/blob" "$tmp/back"; ok $? "distroless: --put and --get work (fireclaw's sftp-server)"
out=$("$fc" run --image dl --no-snapshot -- a b 2>&1)
is "$out" "distroless ok a b" "distroless: arguments replace Cmd after the Entrypoint"
t0=$EPOCHREALTIME
"$fc" run --image dl --no-snapshot --timeout 3 --entrypoint /app/busybox -- sleep 60 >/dev/null 2>&1; rc=$?
is "$rc" 124 "distroless: --timeout stops the command (the kill runs in fireclaw's shell; $(secs "$t0") s)"
login=$("$fc" image info dl | python3 -c 'import json,sys; print(json.load(sys.stdin)["guest"]["login_shell"])')
is "$login" "/.fireclaw/bin/sh" "distroless: root logs in with fireclaw's shell"

# ---- hostile layers: refused, nothing written outside the tree, nothing left ----
for h in dotdot link-then-file rel-link-then-file hardlink-out; do
	out=$("$fc" image import -q --oci "$tmp/img/hostile-$h.tar" --name bad 2>&1); rc=$?
	like "$rc:$out" "^1:fireclaw: image: layer 2 refused: .+ \(a layer may not name paths outside the image, hard links out of it, or files below its own symlinks\)$" \
		"hostile layer ($h): refused with one line"
done
"$fc" image info bad >/dev/null 2>&1; ok $(( ! $? )) "no image 'bad' was made"
found=$(find "$tmp" / -xdev -maxdepth 3 -name 'pwned*' 2>/dev/null; ls -A "$tmp/img/outside")
is "$found" "" "nothing written outside the tree (no pwned* file, $tmp/img/outside empty)"
left=$(ls -A "$FIRECLAW_STATE/images" | grep -v '^\.img~\|^[a-z]' )
is "$left" "" "no staging or build directory left behind"

# absolute symlink in one layer, a directory through it in the next, a device node
out=$("$fc" image import --oci "$tmp/img/escape.tar" --name esc 2>&1); rc=$?
ok $rc "a symlink to outside, then files through it in the next layer: imported" "$out"
like "$out" "skipping /dev-null \(a char device node" "the device node is skipped with a note"
is "$(ls -A "$tmp/img/outside")" "" "the host's directory the symlink named is untouched"
out=$("$fc" run --image esc --no-snapshot -- sh -c 'cat /esc/pwned; test -e /dev-null || echo no-dev' 2>&1)
is "$out" "inside the image
no-dev" "the file landed inside the image; no device node"

# ---- snapshots: restored runs of an imported image ----
out=$("$fc" snapshot create --image lay 2>&1); ok $? "snapshot of an imported image" "$out"
t0=$EPOCHREALTIME
out=$("$fc" run --image lay --json | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["boot"], r["stdout"].strip())')
is "$out" "snapshot $want" "restored: the entrypoint runs (restored run $(secs "$t0") s)"
out=$("$fc" snapshot create --image dl 2>&1); ok $? "snapshot of the distroless image" "$out"
t0=$EPOCHREALTIME
out=$("$fc" run --image dl --json | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["boot"], r["stdout"].strip())')
is "$out" "snapshot distroless ok" "distroless restored (the reseed helper runs without the image's shell; $(secs "$t0") s)"

# ---- bad input ----
mkdir -p "$tmp/evil"
ln -s /etc/shadow "$tmp/evil/manifest.json"
tar -C "$tmp/evil" -cf "$tmp/evil.tar" manifest.json
out=$("$fc" image import --oci "$tmp/evil.tar" --name x 2>&1); rc=$?
is "$rc:$out" "1:fireclaw: image: the image's manifest.json is not a regular file" "an archive whose manifest.json is a symlink out: refused, nothing read"
out=$("$fc" image import --oci "$tmp/nope" --name x 2>&1); rc=$?
is "$rc:$out" "1:fireclaw: image: no such file or directory: $tmp/nope (--oci)" "a missing path: one line"
mkdir "$tmp/empty"
out=$("$fc" image import --oci "$tmp/empty" --name x 2>&1); rc=$?
like "$rc:$out" "^1:fireclaw: image: .* is neither a docker save tarball \(manifest.json\) nor an OCI image layout" "not an image: one line"
cp -r "$tmp/img/layout" "$tmp/tampered"
blob=$(ls -S "$tmp/tampered/blobs/sha256" | head -1)
printf 'x' >>"$tmp/tampered/blobs/sha256/$blob"
out=$("$fc" image import --oci "$tmp/tampered" --name x 2>&1); rc=$?
like "$rc:$out" "^1:fireclaw: image: the image's layer 1 does not match its digest" "a blob that does not match its digest is refused"
out=$("$fc" image import --oci "$tmp/img/app.tar" --name app 2>&1); rc=$?
is "$rc:$out" "1:fireclaw: image: an image named 'app' exists (fireclaw image rm app, or --force to replace it)" "an existing name needs --force"
out=$("$fc" image import --oci "$tmp/img/app.tar" --name x --kernel /x 2>&1); rc=$?
is "$rc:$out" "2:fireclaw: image import: --oci and --kernel exclude each other" "--oci with --kernel: usage error"

no_leaks "after the OCI tests"
done_testing
