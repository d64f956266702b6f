#!/usr/bin/env bash
# Every benchmark, one after the other (CPU). Each prints its own table with ratios against a plain
# reference measured in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
for bench in bench_replay bench_losses bench_update bench_envs bench_checkpoint; do
  echo "=== benchmarks/$bench.py"
  # a benchmark that misses its target exits 1: note it and go on with the others
  python "benchmarks/$bench.py" || { rc=$?; status=1; echo "(benchmarks/$bench.py exited with status $rc)"; }
  echo
done
exit $status
