#!/usr/bin/env bash
# Set up (if needed) and run the test suite. This is the README's test command and what CI runs.
#   bash scripts/test.sh          everything: ruff (lint + format check), every test tier, then the mutation
#                                 check of the privacy-critical code (scripts/mutation_check.py: every listed
#                                 mutation must make the privacy tests fail; DPFPL_SKIP_MUTATION_CHECK=1 skips it)
#   bash scripts/test.sh --fast   the inner loop: unit and in-process tests (not marked flower, deployment or
#                                 slow), a few minutes on 2 cores
#   bash scripts/test.sh ARGS     pytest ARGS (e.g. tests/test_server.py -k books)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export FLWR_TELEMETRY_ENABLED=0
if [ "${1:-}" = "--fast" ]; then
    shift
    exec python -m pytest -q tests -m "not flower and not deployment and not slow" "$@"
fi
if [ "$#" -eq 0 ]; then
    ruff check .
    ruff format --check .
fi
python -m pytest -q tests "$@"
if [ "$#" -eq 0 ] && [ "${DPFPL_SKIP_MUTATION_CHECK:-0}" != "1" ]; then
    python scripts/mutation_check.py
fi
