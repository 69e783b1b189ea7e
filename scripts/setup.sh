#!/usr/bin/env bash
# One-time set-up on a fresh machine, safe to rerun: a virtual environment in .venv with the CPU build of
# torch pinned (never a CUDA build), the optional backends' dependencies, and fastrnn itself installed
# editable with its C++ extension built against that torch (no build isolation).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
# torch first and pinned to the CPU build: a bare `torch` requirement would pull a CUDA build of several GB.
# FASTRNN_TORCH_SPEC overrides the pin (e.g. a CUDA machine that wants its own build).
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  "$VPY" -m pip install --quiet --upgrade pip setuptools wheel
  "$VPY" -m pip install --quiet "${FASTRNN_TORCH_SPEC:-torch==2.13.0+cpu}"
fi
"$VPY" -m pip install --quiet --no-build-isolation -e ".[test,numba,triton,bench,inspect,dev]"
"$VPY" -c "import fastrnn; print('fastrnn backends available:', fastrnn.available_backends())"
