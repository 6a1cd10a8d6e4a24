#!/usr/bin/env bash
# The main job: set up, make the demo model, run the demo recipe end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/quantkit demo-model models/smollm2-135m-instruct
.venv/bin/quantkit run recipes/smollm2-135m-demo.yaml "$@"
