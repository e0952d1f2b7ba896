#!/usr/bin/env bash
# The test command of README.md: installs what it needs into .venv, then runs the whole suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k tokenizer`). `--quick`: the fast lane for the
# edit-test loop (no slow, end-to-end notebook, converter or multi-process test; <= 5 min on 2 cores, see
# tests/conftest.py); CI runs everything.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh --test  # the demo layer plus the test suite's packages (llama-cpp-python, Unsloth, Go)
# Two cores shared by tiny matrix products: one thread each is fastest (see DESIGN.md).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .  # the package, tests, benchmarks, scripts and the notebooks
# Two workers (pytest-xdist), a whole file each at a time: module fixtures are built once, and the slowest files
# start first (tests/conftest.py SLOWEST_FILES). MISTRAL_FAST_TEST_WORKERS=0 runs in one process.
exec .venv/bin/python -m pytest -n "${MISTRAL_FAST_TEST_WORKERS:-2}" --dist loadfile "$@"
