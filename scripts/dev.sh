#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv (if missing), installs gblr with its
# development extras and the pinned CPU build of PyTorch, then runs what was asked:
#   scripts/dev.sh run     the main job: learn a GBLR ViT on Fashion-MNIST (python -m gblr train
#                          --out runs/demo --overwrite; a few minutes on 2 cores; extra arguments go
#                          to it; with --resume it continues an interrupted run instead)
#   scripts/dev.sh demo    a tour of the core in seconds (python -m gblr demo)
#   scripts/dev.sh test    the test suite (fast tests; extra arguments go to pytest)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_PIN="torch==2.13.0"  # the CPU build on this platform's local disk; a bare "torch" pulls a CUDA build

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import gblr, pytest, hypothesis, PIL, tqdm, matplotlib, transformers, safetensors, gguf, accelerate" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet "$TORCH_PIN"
  .venv/bin/python -m pip install --quiet -e ".[dev]"
fi

task=${1:-run}
shift || true
case "$task" in
  run)
    # runs/demo is the main job's own folder: each run starts it afresh (--overwrite), unless the
    # arguments say what to do with the run in it (--resume continues an interrupted one).
    fresh=--overwrite
    for arg in "$@"; do
      case "$arg" in --resume|--overwrite) fresh= ;; esac
    done
    exec .venv/bin/python -m gblr train --out runs/demo $fresh "$@" ;;
  demo) exec .venv/bin/python -m gblr demo "$@" ;;
  test) exec .venv/bin/python -m pytest "$@" ;;
  *) echo "usage: scripts/dev.sh {run|demo|test} [args...]" >&2; exit 2 ;;
esac
