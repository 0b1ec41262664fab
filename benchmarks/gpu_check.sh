#!/usr/bin/env bash
# One prepared run on a lent GPU machine (see the device tool's README): the CUDA tests, then
# the GPU inference table. Uses the machine's own python3 (torch, triton, pytest, hypothesis),
# with the package from src/. Copies the table to $OUT when that is set.
#   bash benchmarks/gpu_check.sh            # about 3-5 minutes on an H100/H200
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_kernels.py tests/test_linear.py \
    tests/test_masks.py 2>&1 | tail -n 15
(cd benchmarks && timeout 300 python3 inference_gpu.py --dtype bf16)
if [ -n "${OUT:-}" ]; then cp docs/benchmarks/inference_gpu.md docs/benchmarks/inference_gpu.json "$OUT"/ 2>/dev/null; fi
