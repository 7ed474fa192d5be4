#!/usr/bin/env bash
# The test suite: set up (with the dev extra), then pytest over tests/ and notebooks/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,services
export PYTHONUNBUFFERED=1
# two workers (one per core of the CI machine), whole files per worker so module fixtures are built once
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile tests notebooks --nbmake --nbmake-timeout=600 --durations=25 "$@"
