#!/usr/bin/env bash
# The GPU check (see bench/gpu_check.py): one script, one table. On a lent GPU machine:
#   bash bench/gpu_check.sh --out "$OUT/check"        (≈ 10 minutes on one H100/H200, estimated)
# In the test suite and on CPU:
#   bash bench/gpu_check.sh --dry --out /tmp/check
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" bench/gpu_check.py "$@"
