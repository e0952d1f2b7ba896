#!/usr/bin/env bash
# Create (or reuse) .venv at the repository root and install mistral_fast in two layers:
#
#   bash scripts/setup.sh          the demo layer (scripts/demo.sh): torch, then the package with its own
#                                  requirements; what `mistral-fast demo`, training, evaluation, the merge
#                                  and the notebooks import. No compiler runs: a fresh clone is ready in
#                                  about 2 minutes with pip's cache warm (benchmarks/README.md).
#   bash scripts/setup.sh --test   the demo layer, then what the test suite needs (scripts/test.sh): the
#                                  `dev` and `gguf` extras (llama-cpp-python compiles llama.cpp once, about
#                                  3 min on 2 cores, then pip reuses the wheel), Unsloth for its CPU tests,
#                                  and Go for the Ollama template tests when we may install it.
#
# Each layer is idempotent: a stamp of the install inputs per layer skips pip when nothing changed, so the
# demo after the tests (or the tests after the demo) installs nothing twice.
#
# Order matters on a CPU machine: torch==2.13.0 first (a CPU wheel; a bare `torch` requirement would
# pull a multi-GB CUDA build), then the package with exact versions from requirements-ci.txt as
# constraints. Unsloth and unsloth_zoo come last and with --no-deps: their own requirements drag in
# torchvision, xformers and triton, and PyPI's torchvision breaks `import unsloth` beside CPU torch.
set -euo pipefail
layer=demo
case "${1:-}" in
  "") ;;
  --test) layer=test ;;
  *) echo "usage: bash scripts/setup.sh [--test]   (--test: also what the test suite needs)" >&2; exit 2 ;;
esac
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
# --no-compile: pip would byte-compile every module it installs (torch and transformers alone hold thousands,
# most never imported); Python compiles what is imported, once, on first use.
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q --no-compile)
want="$(cat pyproject.toml requirements-ci.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)"
installed() { [ -f ".venv/.mistral_fast_$1" ] && [ "$(cat ".venv/.mistral_fast_$1")" = "$want" ]; }
stamp() { echo "$want" > ".venv/.mistral_fast_$1"; }

# --- started first, in the background, when the test layer is to be installed ---------------------
# The two slow steps of a fresh test set-up need neither the venv's packages nor each other: compiling
# llama.cpp for llama-cpp-python's wheel (CPU-bound, about 3 min on 2 cores) and Go from apt (network). They run
# beside the demo layer's installs (mostly downloads and unpacking) instead of after them.
wheels=".venv/.wheels"  # relative: setup.sh runs at the repository root
builder="" go_installer=""
if [ "$layer" = test ] && ! installed test; then
  if ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
    mkdir -p "$wheels"
    # llama-cpp-python is a source package: it compiles llama.cpp (then cached by pip as a wheel).
    # Portable CPU kernels, and none of the examples, server or tools we don't use.
    (CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF -DGGML_OPENMP=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      .venv/bin/python -m pip wheel --disable-pip-version-check -q --no-deps -c requirements-ci.txt \
      -w "$wheels" llama-cpp-python > "$wheels/build.log" 2>&1) &
    builder=$!
  fi
  # Go renders our Ollama Modelfile template the way Ollama does (tests/ollama_template). Debian's golang-go;
  # installed here when we may (root with apt-get, as in CI), else those tests skip locally (and fail in CI).
  if ! command -v go >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    ( (apt-get update -qq && apt-get install -y -qq --no-install-recommends golang-go) >/dev/null 2>&1 \
      || echo "setup: could not install golang-go (the Ollama template tests will skip)" >&2) &
    go_installer=$!
  fi
fi

# --- the demo layer -------------------------------------------------------------------------------
if ! installed demo; then
  echo "setup: installing the demo's packages into $root/.venv (first run: about 2 minutes)" >&2
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    "${pip[@]}" torch==2.13.0
  fi
  "${pip[@]}" -c requirements-ci.txt -e .
  stamp demo
fi
[ "$layer" = test ] || exit 0

# --- the test layer -------------------------------------------------------------------------------
if ! installed test; then
  echo "setup: installing the test suite's packages (first run compiles llama.cpp for llama-cpp-python:" \
    "about 3 min on 2 cores)" >&2
  # Everything but llama-cpp-python first (downloads, while llama.cpp still compiles), then its wheel.
  "${pip[@]}" -c requirements-ci.txt -e ".[dev,tracking,ray]"
  if [ -n "$builder" ] && ! wait "$builder"; then
    echo "setup: building llama-cpp-python failed; its log:" >&2
    tail -n 40 "$wheels/build.log" >&2
    exit 1
  fi
  "${pip[@]}" -c requirements-ci.txt --find-links "$wheels" -e ".[dev,gguf,tracking,ray]"
  # Unsloth's own requirements that its CPU path imports (not its GPU-only torchvision/xformers).
  "${pip[@]}" -c requirements-ci.txt tyro hf_transfer json5 structlog einops msgspec "wheel>=0.42" torchao \
    cut_cross_entropy diffusers nest-asyncio
  # hatchling: the wheel test builds with --no-build-isolation (no package index at test time).
  "${pip[@]}" -c requirements-ci.txt hatchling
  # Unsloth last: with --no-deps pip checks no requirements. A later install that brought one of Unsloth's
  # requirements would make pip print "unsloth requires torchvision / xformers, which is not installed".
  "${pip[@]}" -c requirements-ci.txt --no-deps unsloth unsloth_zoo
  stamp test
fi
[ -z "$go_installer" ] || wait "$go_installer" || true
# The tests never touch the network: llama.cpp's converters (for the byte-for-byte GGUF comparisons) are
# fetched here once into .cache/llama-cpp-src (git-ignored, kept across runs); a no-op when it has them.
.venv/bin/python scripts/fetch_converters.py >/dev/null
