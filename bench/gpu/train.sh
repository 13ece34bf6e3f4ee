#!/usr/bin/env bash
# Train trained-tiny models on the lent GPU, several side by side, and bring back each output folder
# as one tarball (the device returns at most 8 files).
#   usage (device run): bash bench/gpu/train.sh "NAME FAMILY [vlopt train options]" ...
set -euo pipefail
source bench/gpu/setup.sh
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/machine.txt"
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
  if [ -d "/tmp/trained/$name" ]; then
    cp "/tmp/$name.cmd" "/tmp/trained/$name/vlopt_train_command.txt"
    tar -C /tmp/trained -czf "$OUT/$name.tar.gz" "$name"
  fi
  grep -E "final eval|Error|error" "$OUT/$name.log" | tail -3 | sed "s/^/$name: /"
done
