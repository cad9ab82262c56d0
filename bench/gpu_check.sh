#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py) on a CUDA machine that holds a copy of the repository:
#     bench/gpu_check.sh [--key=value ...]      # keys of bench/gpu_check.py; writes bench/results/gpu-<date>.json
# It runs with the first Python that imports torch: .venv's, then python3's. Where neither does, it
# makes .venv from requirements-dev.txt, which needs PyPI; such a machine may have no network, and
# gpu_check.py then says in its JSON what is missing. The install's time comes out of the check's
# 460 s, so that the whole ends within 8 minutes.
set -u
cd "$(dirname "$0")/.."

imports_torch() { "$1" -c "import torch" 2>/dev/null; }

if [ -x .venv/bin/python ] && imports_torch .venv/bin/python; then
    python=.venv/bin/python
elif imports_torch python3; then
    python=python3
else
    echo "no Python here imports torch: making .venv from requirements-dev.txt (needs PyPI)" >&2
    python3 -m venv .venv || { echo "error: python3 -m venv .venv failed" >&2; exit 2; }
    if ! timeout 300 .venv/bin/pip install -q --retries 1 --timeout 15 -r requirements-dev.txt; then
        echo "pip install -r requirements-dev.txt failed (no PyPI from here?); the check will list what is missing" >&2
    fi
    python=.venv/bin/python
fi
echo "python: $python" >&2
exec "$python" bench/gpu_check.py --budget_seconds=$((460 - SECONDS)) "$@"
