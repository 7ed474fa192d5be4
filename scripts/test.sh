#!/usr/bin/env bash
# The test suite: set up (with the dev extra), then pytest over tests/ and notebooks/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,services
export PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest -q tests notebooks --nbmake --nbmake-timeout=600 --durations=25 "$@"
