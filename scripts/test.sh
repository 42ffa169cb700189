#!/usr/bin/env bash
# Set up (if needed) and run the test suite. This is the README's test command.
# With no arguments (the whole suite) it then runs the mutation check of the privacy-critical code
# (scripts/mutation_check.py): every listed mutation must make the privacy tests fail.
# DPFPL_SKIP_MUTATION_CHECK=1 skips it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export FLWR_TELEMETRY_ENABLED=0
python -m pytest -q tests "$@"
if [ "$#" -eq 0 ] && [ "${DPFPL_SKIP_MUTATION_CHECK:-0}" != "1" ]; then
    python scripts/mutation_check.py
fi
