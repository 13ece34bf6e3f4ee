#!/usr/bin/env bash
# Train trained-tiny models on the lent GPU, several side by side, and bring back each output folder
# as one tarball (the device returns at most 8 files). With EVAL_SEEDS="3 7", each trained folder is
# then also evaluated (float32, 200 scenes) on those seeds; the JSONs go into its tarball, a line each
# into its log.
#   usage (device run): [EVAL_SEEDS="3 7"] bash bench/gpu/train.sh "NAME FAMILY [vlopt train options]" ...
set -euo pipefail
source bench/gpu/setup.sh
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/machine.txt"
git rev-parse HEAD >> "$OUT/machine.txt" 2>/dev/null || true
for job in "$@"; do
  read -r name family options <<<"$job"
  echo "vlopt train $family $options" > "/tmp/$name.cmd"
  # shellcheck disable=SC2086
  timeout 540 python3 -m vlopt.cli train "$family" --device cuda -o "/tmp/trained/$name" $options \
    > "$OUT/$name.log" 2>&1 &
done
wait || true
for job in "$@"; do
  read -r name family options <<<"$job"
  [ -d "/tmp/trained/$name" ] || continue
  for seed in ${EVAL_SEEDS:-}; do
    ( timeout 120 python3 -m vlopt.cli eval --checkpoint "/tmp/trained/$name" --scenes 200 --seed "$seed" \
        --device cuda --dtype float32 --json "/tmp/trained/$name/eval-seed$seed.json" >/dev/null 2>&1 \
      && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print('eval seed', sys.argv[2], d['accuracy'], d.get('per_kind', ''))" \
        "/tmp/trained/$name/eval-seed$seed.json" "$seed" >> "$OUT/$name.log" ) &
  done
done
wait || true
for job in "$@"; do
  read -r name family options <<<"$job"
  if [ -d "/tmp/trained/$name" ]; then
    cp "/tmp/$name.cmd" "/tmp/trained/$name/vlopt_train_command.txt"
    tar -C /tmp/trained -czf "$OUT/$name.tar.gz" "$name"
  fi
  grep -E "final eval|eval seed|Error|error" "$OUT/$name.log" | tail -4 | sed "s/^/$name: /"
done
