#!/usr/bin/env bash
# Install, lint, and run the test suite (about a few minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
"$PY" -m ruff check src tests benchmarks scripts
"$PY" -m pytest "$@"
