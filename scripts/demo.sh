#!/usr/bin/env bash
# Set up (if needed) and run DP-FPL with 10 simulated clients on the embedded default. README's main command.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export FLWR_TELEMETRY_ENABLED=0
dpfpl demo "$@"
