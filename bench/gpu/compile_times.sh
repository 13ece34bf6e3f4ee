#!/usr/bin/env bash
# First compile and second-process start of `fast_decode` recipes: each recipe runs in two processes
# one after the other on one fresh Inductor cache directory (first: cold; second: what a user's next
# run pays). Rows go to $OUT/compile_times.jsonl. Recipes are run in the order given; once BUDGET_S
# seconds (default 540) have gone, the rest are skipped, so a device call's limit cuts no row in half.
#   usage (device run): [BUDGET_S=540] bash bench/gpu/compile_times.sh MODEL 'PASSES_JSON' ['PASSES_JSON' ...]
set -euo pipefail
source bench/gpu/setup.sh
model=$1; shift
budget=${BUDGET_S:-540}
start=$(date +%s)
for passes in "$@"; do
  TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
  export TORCHINDUCTOR_CACHE_DIR
  for process in first second; do
    left=$(( budget - ($(date +%s) - start) ))
    if [ "$left" -lt 30 ]; then echo "$model $passes: $process process skipped (budget spent)"; continue; fi
    echo "[$process process] $passes"
    timeout "$left" python3 bench/gpu/first_answer.py "$model" "$passes" "$(date +%s.%N)" "$OUT/compile_times.jsonl" \
      || echo "$model $passes: $process process failed or timed out (exit $?)"
  done
done
