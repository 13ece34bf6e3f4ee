#!/usr/bin/env bash
# Prepare the lent GPU machine (no network): the wheels vlopt pins that the image lacks, then vlopt.
# The wheels come from `pip download` into .whl/ (see bench/README.md) and travel with the call.
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null
python3 - <<'PY'
import torch, transformers, torchao
print("torch", torch.__version__, "transformers", transformers.__version__, "torchao", torchao.__version__,
      "gpu", torch.cuda.get_device_name(0))
PY
