#!/usr/bin/env bash
# Fetch the offline data once (set-up step; nothing is downloaded at run time).
# The vaderSentiment==3.3.2 source distribution carries the four labelled VADER
# corpora (movie / amazon / tweets / nyt). Destination: $PEFT_EXPRESSIVITY_DATA
# or ~/.cache/peft-expressivity. Usage: scripts/fetch_data.sh [PYTHON]
set -euo pipefail
PY="${1:-${PYTHON:-python}}"
cd "$(dirname "$0")/.."
"$PY" -m finetune.data fetch
