#!/usr/bin/env bash
# What one GPU can show, in one table (under 10 minutes on one GPU): the CUDA-capable tests in
# float16, the degree-1 hook cost and BatchStep on a full-size random-weight SD1.5-sized UNet,
# CUDA tensors through the comm layer's packing. Two NCCL ranks need two GPUs: not run here.
# Without a GPU: prints "no GPU: skipped" and exits 0. Options: python -m launcher.gpu_check --help
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m launcher.gpu_check "$@"
