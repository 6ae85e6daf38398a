#!/usr/bin/env bash
# Setup (idempotent, including the stock reference engine) + the whole test suite.
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --stock
exec .venv/bin/python -m pytest "$@"
