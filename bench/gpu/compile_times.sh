#!/usr/bin/env bash
# First compile and second-process start of `fast_decode` recipes: each recipe runs in two processes
# one after the other on one fresh Inductor cache directory (first: cold; second: what a user's next
# run pays). Rows go to $OUT/compile_times.jsonl.
#   usage (device run): bash bench/gpu/compile_times.sh MODEL 'PASSES_JSON' ['PASSES_JSON' ...]
set -euo pipefail
source bench/gpu/setup.sh
model=$1; shift
for passes in "$@"; do
  TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
  export TORCHINDUCTOR_CACHE_DIR
  for process in first second; do
    echo "[$process process]"
    timeout 400 python3 bench/gpu/first_answer.py "$model" "$passes" "$(date +%s.%N)" "$OUT/compile_times.jsonl" \
      || echo "$model $passes: $process process failed (exit $?)"
  done
done
