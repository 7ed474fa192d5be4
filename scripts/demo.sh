#!/usr/bin/env bash
# The main job: set up, fetch the offline MNIST digits, train two small models briefly,
# and show VG being recovered from IG answers (float32 and float64).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m jaxrecover.demo "$@"
