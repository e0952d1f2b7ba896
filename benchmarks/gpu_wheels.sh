#!/usr/bin/env bash
# Wheels the H200 device image lacks, for Python 3.12, slimmed to fit the 64 MiB a device call carries.
# The image has torch 2.11 (cu130), transformers 5.17, peft, accelerate, tokenizers, sentencepiece,
# triton; it lacks unsloth, unsloth_zoo, trl, bitsandbytes, datasets, mistral-common and their light deps.
# Slimming: bitsandbytes ships one 4-26 MB library per CUDA version (keep only cuda130, the image's);
# unsloth's wheel carries its "studio" web app (frontend + backend), which training never imports.
#
# Usage (here, repo root):   bash benchmarks/gpu_wheels.sh          -> .whl/ (git-ignored via .git/info/exclude)
# On the device (run tool):  carry [".whl"], command starts with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; python3 benchmarks/gpu_train.py
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
platforms=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64 any)
args=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl)
for p in "${platforms[@]}"; do args+=(--platform "$p"); done
python3 -m pip download -q "${args[@]}" unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 \
  bitsandbytes==0.50.2 datasets==4.8.5 mistral-common==1.13.1 cut_cross_entropy torchao tyro msgspec \
  structlog json5 nest-asyncio docstring-parser typeguard dill==0.4.1 multiprocess==0.70.19 pycountry \
  pydantic-extra-types
slim() {  # slim WHEEL PATTERN...: delete members matching the patterns, keep the wheel installable
  local wheel=$1; shift
  zip -q -d "$wheel" "$@" >/dev/null
  # RECORD lists hashes of every member; pip --no-deps installs with the stale lines for removed files.
}
slim .whl/bitsandbytes-*.whl 'bitsandbytes/libbitsandbytes_cuda1[12]*.so' 'bitsandbytes/libbitsandbytes_cuda132.so'
slim .whl/unsloth-2026*.whl 'studio/*'
du -ch .whl/*.whl | tail -1
