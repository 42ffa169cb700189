#!/usr/bin/env bash
# Set up (if needed) and run the test suite. This is the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export FLWR_TELEMETRY_ENABLED=0
python -m pytest -q tests "$@"
