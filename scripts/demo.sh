#!/usr/bin/env bash
# The demo command of README.md: installs into .venv, then runs the main job on the embedded default
# (a tiny local Mistral with the real v0.3 tokenizer, and the sample data in data/).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/mistral-fast demo "$@"
