#!/usr/bin/env bash
# GPU check (issues 9, 14, 15): DVP log-probs and the fused LM head at V = 151,936, RLOO trainer + TorchEngine
# on CUDA at bf16, and with --horizon the horizon study at a larger model size,
# in about 8 minutes; the logic and what it measures are in benchmarks/gpu_check.py.
# Offline: installs nothing from the network. Writes results/gpu/gpu_check.{json,log}; extra flags go to
# gpu_check.py (e.g. --out DIR, --budget-s 300, --train-dtype fp32).
# Run from anywhere: bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"

# Run from / so that the checkout itself (the current directory) does not count as an install.
if ! (cd / && "$PY" -c "import workbench") 2>/dev/null; then
    echo "workbench is not installed: pip install -e . --no-deps (offline)"
    if ! "$PY" -m pip install --no-deps --no-index --no-build-isolation -e .; then
        echo "pip could not install it; using the checkout through PYTHONPATH instead"
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi

# The script keeps its own 480 s budget and saves after every section; this is only a backstop.
exec timeout -k 10 540 "$PY" benchmarks/gpu_check.py "$@"
