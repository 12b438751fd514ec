#!/usr/bin/env bash
# Sets up a fresh machine and runs the whole test suite (unit, pipelines, multi-process, UI).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --browser
exec .venv/bin/python -m pytest -q "$@"
