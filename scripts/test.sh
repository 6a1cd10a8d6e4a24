#!/usr/bin/env bash
# Set up and run the test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# PyPI's CPU build of vLLM in an environment of its own: the serve check's vLLM test loads checkpoints in it
# (only that test: every other run stays "vLLM: not checked", as on a worker without it)
QUANTKIT_TEST_VLLM_PYTHON=$(bash scripts/vllm-env.sh)
export QUANTKIT_TEST_VLLM_PYTHON HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
