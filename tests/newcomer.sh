# What a newcomer runs into on real VMs (QEMU microvm): a sandbox used after it was
# destroyed says so, and a second Ctrl-C says what it leaves behind, which
# `fireclaw cleanup` then removes. Each followed by a leak check.
source "$FIRECLAW_TESTS/lib/vmsuite.sh" nw

if [ -n "${FIRECLAW_TEST_SKIP_VM:-}" ]; then
	skip "FIRECLAW_TEST_SKIP_VM is set"
	done_testing
	exit
fi
"$fc" -q image build >/dev/null
ok $? "default image present"
no_leaks "before the tests"

# sb:exec after sb:destroy(): the VM was destroyed, not "killed by signal 9"
cat > "$tmp/destroyed.lua" <<'LUA'
local coldboot = require("fireclaw.cli").use("coldboot")
local sb = coldboot.boot {}
io.write(sb:exec({ "echo", "alive" }).stdout)
sb:destroy()
local ok, err = pcall(sb.exec, sb, { "true" })
print(ok, err)
ok, err = pcall(sb.get, sb, "/etc/hostname", "x")
print(ok, err)
return 0
LUA
out=$("$fc" "$tmp/destroyed.lua" 2>&1); rc=$?
is "$rc" 0 "a script that destroys its sandbox and uses it again"
like "$out" "^alive" "the sandbox ran a command before"
like "$out" "false	sandbox: cannot exec: VM [0-9a-f]+ was destroyed \(sb:destroy\(\)\); make a new sandbox" \
	"sb:exec after sb:destroy() says the VM was destroyed"
unlike "$out" "signal 9|killed" "not how its VMM died"
like "$out" "false	sandbox: cannot get: VM [0-9a-f]+ was destroyed" "sb:get too"
no_leaks "destroy, then exec"

# a second signal while the first is being handled: fireclaw exits at once and names
# what it leaves. SIGINT then SIGTERM, sent together (two SIGINTs sent together may
# merge into one): whichever is handled second takes the exit-at-once path.
"$fc" run --no-snapshot -- sh -c 'echo started; sleep 60' > "$tmp/twice.out" 2>&1 &
pid=$!
for _ in $(seq 3000); do grep -q started "$tmp/twice.out" && break; sleep 0.01; done
kill -INT $pid; kill -TERM $pid
wait $pid; rc=$?
like "$rc" "^(130|143)$" "two signals: fireclaw exits at once (128+N)"
id=$(ls "$FIRECLAW_RUN/vms" 2>/dev/null | head -1)
like "$(cat "$tmp/twice.out")" "interrupted again: exiting at once, leaving VM $id \(namespace ${FIRECLAW_NETNS_PREFIX}$id, $FIRECLAW_RUN/vms/$id\) behind .*'fireclaw cleanup' removes it" \
	"it says which VM it leaves behind and that fireclaw cleanup removes it"
"$fc" cleanup -q; is $? 0 "fireclaw cleanup"
no_leaks "two signals, then cleanup"

done_testing
