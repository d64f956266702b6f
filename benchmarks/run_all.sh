#!/usr/bin/env bash
# Every benchmark, one after the other (CPU). Each prints its own table with ratios against a plain
# reference measured in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
for bench in bench_replay bench_losses bench_update bench_envs bench_checkpoint; do
  echo "=== benchmarks/$bench.py"
  python "benchmarks/$bench.py"
  echo
done
