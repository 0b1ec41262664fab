#!/usr/bin/env bash
# One prepared run on a lent GPU machine (see the device tool's README): the CUDA tests, the
# Triton kernel's settings sweep, then the GPU inference table. Uses the machine's own python3
# (torch, triton, pytest, hypothesis) with the package from src/. Copies the table and the logs
# to $OUT when that is set. On an H200 (2026-11-27): tests about 20 s, sweep about 40 s, table
# about 100 s, plus Triton's compilation.
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
logs="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/kernels tests/test_product.py \
    tests/test_linear.py tests/test_frozen.py 2>&1 | tail -n 15
(cd benchmarks && timeout 150 python3 inference_gpu.py --sweep --skip-dense 2>&1 | tee "$logs/sweep.log")
(cd benchmarks && timeout 240 python3 inference_gpu.py --ratios 0.1 0.25 0.5 --tokens 1 16 256 4096 8192 2>&1 \
    | tee "$logs/table.log" | grep -v '^|')
if [ -n "${OUT:-}" ]; then cp docs/benchmarks/inference_gpu.md docs/benchmarks/inference_gpu.json "$OUT"/ 2>/dev/null; fi
