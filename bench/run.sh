#!/bin/sh
# make bench: measure fireclaw on this machine and write BENCHMARKS.md (see bench/bench.py).
# Creates the default image and its snapshot first when they are missing. Takes about
# 5–10 minutes on a 2-core TCG host; run counts: BENCH_RESTORE_RUNS, BENCH_COLD_RUNS, ….
set -eu
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
	echo "bench: needs root (network namespaces, taps)" >&2
	exit 1
fi
[ -x ./fireclaw ] || { echo "bench: ./fireclaw is not built (run make)" >&2; exit 1; }
exec /usr/bin/python3 bench/bench.py "$@"
