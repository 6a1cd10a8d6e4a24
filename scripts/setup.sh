#!/usr/bin/env bash
# Set up quantkit on a fresh machine: a venv with the CPU torch first (so no
# range can pull a CUDA build), quantkit and its extras, and the pinned
# llama.cpp toolchain (built once, cached in ~/.cache/quantkit).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev,gptq,prefect,eval,ray]"
# Where nvcc is installed without cuBLAS (a slim CUDA toolkit), cuBLAS from PyPI, so that
# `quantkit toolchain --build --cuda --cuda-arch 90` links (docs/gpu.md); setup builds only the CPU tools.
if .venv/bin/python -c 'from quantkit.toolchain import NoCublas, find_cuda_toolkit
try:
    find_cuda_toolkit()
except NoCublas:
    raise SystemExit(0)
raise SystemExit(1)' 2>/dev/null; then
  .venv/bin/python -m pip install -q -e ".[cuda]"
fi
.venv/bin/quantkit toolchain --build
