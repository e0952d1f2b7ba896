#!/usr/bin/env bash
# Create (or reuse) .venv at the repository root and install mistral_fast with what the demo and the
# tests need. Idempotent: a stamp of the install inputs skips pip when nothing changed.
#
# Order matters on a CPU machine: torch==2.13.0 first (a CPU wheel; a bare `torch` requirement would
# pull a multi-GB CUDA build), then the package with exact versions from requirements-ci.txt as
# constraints, then unsloth and unsloth_zoo with --no-deps: their own requirements drag in
# torchvision, xformers and triton, and PyPI's torchvision breaks `import unsloth` beside CPU torch.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
stamp=.venv/.mistral_fast_install
want="$(cat pyproject.toml requirements-ci.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  .venv/bin/python scripts/fetch_converters.py >/dev/null  # test layer (below): a no-op when .cache has them
  exit 0
fi
echo "setup: installing into $root/.venv (first run takes a few minutes)" >&2
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${pip[@]}" torch==2.13.0
fi
# llama-cpp-python is a source package: it compiles llama.cpp (about 3 min on 2 cores, then cached by pip).
# Portable CPU kernels, and none of the examples, server or tools we don't use.
export CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF -DGGML_OPENMP=OFF"
export CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)"
"${pip[@]}" -c requirements-ci.txt -e ".[dev,gguf]"
# pip then notes "unsloth requires torchvision / xformers, which is not installed": expected, on purpose.
"${pip[@]}" -c requirements-ci.txt --no-deps unsloth unsloth_zoo
"${pip[@]}" -c requirements-ci.txt tyro hf_transfer json5 structlog einops msgspec "wheel>=0.42" torchao \
  cut_cross_entropy diffusers nest-asyncio
# --- test layer: converter source + wheel build backend ---
# The tests never touch the network: llama.cpp's converters (for the byte-for-byte GGUF comparisons) are
# fetched here once into .cache/llama-cpp-src (git-ignored, kept across runs), and hatchling is installed so
# the wheel test builds with --no-build-isolation.
"${pip[@]}" -c requirements-ci.txt hatchling
.venv/bin/python scripts/fetch_converters.py >/dev/null
# --- end of test layer ---
echo "$want" > "$stamp"
