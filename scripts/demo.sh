#!/usr/bin/env bash
# Quick start: install, then compress a small MoE end to end (compress, reconstruct, load, generate, report).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
"${PYTHON:-python3}" -m mobe demo "$@"
