#!/usr/bin/env bash
# Prepare the lent GPU machine (no network): the wheels vlopt pins that the image lacks, then vlopt.
# The wheels come from `pip download` into .whl/ (git-ignored) and travel with the call, made once with:
#   for p in transformers==5.24.0 torchao==0.18.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types \
#            typing-inspection bitsandbytes==0.50.2; do python3 -m pip download --no-deps --only-binary=:all: \
#     --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$p"; done
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null
python3 - <<'PY'
import torch, transformers, torchao
print("torch", torch.__version__, "transformers", transformers.__version__, "torchao", torchao.__version__,
      "gpu", torch.cuda.get_device_name(0))
PY
