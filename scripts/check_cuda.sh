#!/usr/bin/env bash
# One prepared GPU check: the CUDA path gives the same predictions as the CPU-proven reference.
# Run from the repository root on a machine with an NVIDIA GPU and the venv from `make venv`
# (or any Python with torch+CUDA and this package installed):   bash scripts/check_cuda.sh
# Every step runs even when an earlier one fails (a lent GPU is run once); the exit status is
# non-zero when any step failed, and each failure is named at the end.
set -uo pipefail
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
"$PY" -c "import torch, sys; ok = torch.cuda.is_available(); print('cuda:', ok, torch.__version__, torch.cuda.get_device_name(0) if ok else ''); sys.exit(0 if ok else 1)" || exit 1
failed=()
step() { echo "=== $*"; "$@" || failed+=("$*"); }
# Step == full forward, padded == per-row, engine == per-event reference, re-warm == replay;
# CUDA graphs (streamer/graphs.py) == eager step == reference at every bucket, after hot swaps.
step env STREAMER_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider tests/streamer/test_model.py tests/streamer/test_engine.py tests/streamer/test_graphs.py
# Step p50/p99 and key-steps/s at batch 1..8192, eager and CUDA graphs side by side, with the
# goals at batch 4,096; exits non-zero when GPU (eager or graphs) and CPU differ > 1e-5.
step "$PY" benchmarks/bench_engine.py --device cuda --keys 10000
step env STREAMER_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider tests/streamer/test_copies.py
# The whole service on the GPU against the relay (confluent client, one run).
step "$PY" -m streamer.cli bench --device cuda --client confluent --repeats 1
if [ ${#failed[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "all CUDA checks passed"
