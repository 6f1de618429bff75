#!/usr/bin/env bash
# Shortened `paper` run on one GPU: simulate 9,000 galaxies of 239x239 px, train the Table-3
# network for two dropout rates, calibrate, catalog the test split, write the validation
# report (benchmarks/paper_short.py). About 6 minutes on an H200; no network access.
# On a machine without CUDA it runs the `tiny` profile instead (that is what CI tests).
#
# Usage: benchmarks/paper_short_gpu.sh [OUT_DIR]   (default: $OUT/paper_short or ./paper_short)
#   PROFILE   override the profile;  BUDGET_S  start no stage after this (default 540);  PYTHON
#   Extra arguments go to benchmarks/paper_short.py (e.g. --dropout-rates 0.01 --epochs 12
#   --learning-rate 3e-4).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-.}/paper_short}"
shift || true
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PYTHON" -m benchmarks.paper_short "$OUT_DIR" ${PROFILE:+--profile "$PROFILE"} \
  --budget-s "${BUDGET_S:-540}" "$@"
