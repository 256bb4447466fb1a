#!/usr/bin/env bash
# One go on a machine with a GPU: install, GPU tests, merge and extract on CUDA vs CPU.
# Writes everything to ${OUT:-/tmp}/gpu-*.txt as well as stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp}
python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null || pip install -q torch
pip install -q -e ".[test]"
python -m pytest -q -m gpu 2>&1 | tee "$OUT/gpu-tests.txt"
python benchmarks/gpu_merge.py --layers 8 2>&1 | tee "$OUT/gpu-merge.txt"
python benchmarks/gpu_extract.py 2>&1 | tee "$OUT/gpu-extract.txt"
