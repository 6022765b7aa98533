#!/usr/bin/env bash
# Install mobe and its test tools into the current Python. torch is pinned first so that pip takes the
# CPU build (a bare "torch" requirement may pull several GB of CUDA packages).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install --quiet "torch==2.13.0"
"$PY" -m pip install --quiet -e ".[dev,ray]"
