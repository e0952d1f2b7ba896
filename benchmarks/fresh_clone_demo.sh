#!/usr/bin/env bash
# The first five minutes (issue 26): `bash scripts/demo.sh` from a fresh clone into a fresh .venv, timed,
# with the set-up's share and its ERROR lines. pip's cache is whatever this machine has (say which).
#
#   bash benchmarks/fresh_clone_demo.sh [REF]     REF: a commit of this repository (default HEAD), e.g. the
#                                                 one before the layered set-up, to measure side by side
#
# The clone goes to a temporary directory (never this checkout's .venv) and is removed afterwards.
# The machine's load average is printed before and after: on shared cores it moves the figures a lot.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ref="${1:-HEAD}"
work="$(mktemp -d /tmp/mistral_fast_fresh.XXXXXX)"
trap 'rm -rf "$work"' EXIT
git clone -q "$root" "$work/repo"
git -C "$work/repo" checkout -q "$ref"
cd "$work/repo"
echo "commit $(git rev-parse --short HEAD); load before: $(cut -d' ' -f1-3 /proc/loadavg)"
start=$(date +%s.%N)
bash scripts/setup.sh > "$work/setup.out" 2> "$work/setup.err"
installed=$(date +%s.%N)
bash scripts/demo.sh > "$work/demo.out" 2> "$work/demo.err"
end=$(date +%s.%N)
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
awk -v s="$start" -v i="$installed" -v e="$end" \
  'BEGIN { printf "set-up %.0f s, demo %.0f s, total %.0f s (%d min %02d s)\n", i-s, e-i, e-s, (e-s)/60, (e-s)%60 }'
echo "ERROR lines in the set-up output: $(grep -c '^ERROR' "$work/setup.err" || true)"
grep "held-out exact match" "$work/demo.out"
