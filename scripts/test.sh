#!/usr/bin/env bash
# The test suite: set up (with the dev extra), then pytest over tests/ and notebooks/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,services,endpoints
# TorchServe's frontend needs a Java 17 runtime (the endpoint tests start TorchServe for real)
if ! command -v java >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q openjdk-17-jre-headless
fi
export PYTHONUNBUFFERED=1
# two workers (one per core of the CI machine), whole files per worker so module fixtures are built once
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile tests notebooks --nbmake --nbmake-timeout=600 --durations=25 "$@"
