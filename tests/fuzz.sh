# The libFuzzer targets (fuzz/, built by `make fuzz`): every input in
# fuzz/regressions/<target>/ once (crashes found before, now fixed), then a bounded fuzzing
# run from fuzz/corpus/<target>/. New crashes are kept in build/fuzz/crashes/ and printed in
# base64; to reproduce: build/fuzz/<target> FILE. FIRECLAW_FUZZ_SECONDS sets the time per
# target (default 6).
set -u
source "$FIRECLAW_TESTS/lib/tap.sh"
cd "$FIRECLAW_TESTS/.."
secs=${FIRECLAW_FUZZ_SECONDS:-6}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export TMPDIR=$tmp # the targets' peer sockets
targets="json fc_api qmp agent"

if ! command -v clang >/dev/null || ! echo 'int LLVMFuzzerTestOneInput(const char *d, long n) { return 0; }' |
	clang -x c -fsanitize=fuzzer -o "$tmp/probe" - 2>/dev/null; then
	for t in $targets; do skip "fuzz $t: no clang with libFuzzer (apt-get install clang libclang-rt-dev)"; done
	done_testing
	exit
fi

# another build in the same tree may be rewriting build/: one retry
make -s fuzz >"$tmp/build.log" 2>&1 || make -s fuzz >"$tmp/build.log" 2>&1
ok $? "make fuzz builds build/fuzz/{${targets// /,}}" "$(tail -20 "$tmp/build.log")"

mkdir -p build/fuzz/crashes
for t in $targets; do
	bin=build/fuzz/$t
	if [ ! -x "$bin" ]; then
		ok 1 "fuzz $t: regression inputs" "no $bin"
		ok 1 "fuzz $t: ${secs}s from the seed corpus" "no $bin"
		continue
	fi
	regs=(fuzz/regressions/$t/*)
	if [ -e "${regs[0]}" ]; then
		"$bin" -runs=1 "${regs[@]}" >"$tmp/$t.reg" 2>&1
		ok $? "fuzz $t: ${#regs[@]} regression inputs pass" "$(grep -E 'ERROR|unexpected|Running' "$tmp/$t.reg" | tail -5)"
	else
		skip "fuzz $t: no regression inputs yet"
	fi
	mkdir -p "$tmp/$t"
	"$bin" -max_total_time="$secs" -timeout=20 -rss_limit_mb=4096 -dict=fuzz/$t.dict -max_len=8192 \
		-artifact_prefix="$tmp/$t-" -print_final_stats=1 "$tmp/$t" fuzz/corpus/$t >"$tmp/$t.log" 2>&1
	rc=$?
	runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$tmp/$t.log")
	diag=""
	for a in "$tmp/$t-"*; do
		[ -e "$a" ] || continue
		cp "$a" build/fuzz/crashes/
		diag+="$(grep -E 'ERROR|unexpected|SUMMARY' "$tmp/$t.log" | head -3)
kept in build/fuzz/crashes/${a##*/}; base64: $(base64 -w0 "$a" | head -c 2000)
"
	done
	ok $rc "fuzz $t: ${secs}s from the seed corpus, ${runs:-?} inputs, no crash" "$diag$(tail -3 "$tmp/$t.log")"
done

done_testing
