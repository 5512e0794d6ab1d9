# tools/deps.sh: the policy-rc.d guard that stops packages from starting services while
# they are installed goes away on every way out — apt-get failing (set -e), SIGTERM,
# Ctrl-C, success — and a policy-rc.d that was there before is left alone. Driven with a
# fake apt-get and a guard path of its own: nothing is installed, nothing on the host
# changes.
set -u
source "$FIRECLAW_TESTS/lib/tap.sh"
deps=$FIRECLAW_TESTS/../tools/deps.sh
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export FIRECLAW_DEPS_POLICY_RC=$tmp/policy-rc.d FIRECLAW_DEPS_APT_GET=$tmp/apt-get
export FIRECLAW_DEPS_EXTRA=fct-no-such-package LOG=$tmp/log
# the fake apt-get notes whether the guard refuses services while it runs, then does
# what MODE says (to its parent, the deps.sh shell, for the signals)
cat >"$tmp/apt-get" <<'SH'
#!/bin/sh
"$FIRECLAW_DEPS_POLICY_RC" >/dev/null 2>&1
echo "$1 guard=$?" >>"$LOG"
case "$MODE" in
ok) exit 0 ;;
fail) exit 100 ;;
term) kill -TERM "$PPID"; exit 100 ;;
int) kill -INT "$PPID"; exit 100 ;;
esac
SH
chmod 755 "$tmp/apt-get"

out=$(sh "$deps" --check 2>&1); rc=$?
like "$rc:$out" "^1:missing Debian packages:.* fct-no-such-package" "--check lists a missing package, exit 1"
ok "$([ ! -e "$tmp/policy-rc.d" ]; echo $?)" "--check installs no guard"

for m in ok:0 fail:100 term:143 int:130; do
	mode=${m%%:*} want=${m#*:}
	: >"$LOG"
	# a background job inherits SIGINT ignored, which a shell cannot trap: reset it
	MODE=$mode env --default-signal=INT sh "$deps" >/dev/null 2>&1; rc=$?
	is "$rc" "$want" "apt-get $mode: deps.sh exits $want"
	like "$(head -1 "$LOG")" "^install guard=101$" "apt-get $mode: services were refused while apt-get ran"
	ok "$([ ! -e "$tmp/policy-rc.d" ]; echo $?)" "apt-get $mode: the guard is gone afterwards"
done

printf '#!/bin/sh\nexit 0\n' >"$tmp/policy-rc.d"
chmod 755 "$tmp/policy-rc.d"
MODE=fail sh "$deps" >/dev/null 2>&1
is "$(cat "$tmp/policy-rc.d" 2>/dev/null)" "$(printf '#!/bin/sh\nexit 0')" "a policy-rc.d that was there before stays"

done_testing
