#!/usr/bin/env bash
# The main job: set up the virtual environment, then evaluate InCTRL on the bundled real sample
# (sample_data/, MVTec AD transistor) with the paper backbone ViT-B-16-plus-240 from the hub.
#
# Offline? Pass the backbone weights file (open_clip_pytorch_model.bin from the hub repo
# timm/vit_base_patch16_plus_clip_240.laion400m_e32, or vit_b_16_plus_240-laion400m_e32-*.pt):
#   bash scripts/run_sample.sh --config.weights=/path/to/open_clip_pytorch_model.bin
# Without weights the job still runs, as a pipeline check with random weights, and every output
# is marked NOT A REAL RESULT. Extra arguments go to evaluate.py (e.g. --config.k_shots=2,4).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -m pip install -q -e . >.venv/pip-install.log 2>&1; then
  cat .venv/pip-install.log >&2
  echo "run_sample.sh: installing the package failed (log above, also in .venv/pip-install.log)" >&2
  exit 1
fi
exec .venv/bin/python evaluate.py --config configs/eval_sample.py "$@"
