#!/usr/bin/env bash
# Sets up a fresh machine, then lints, type-checks and runs the whole test suite (unit, engine,
# pipelines, multi-process, app, browser, benchmark). Extra arguments go to pytest, e.g.
#   bash scripts/test.sh -m "not slow"     # the fast suite only (under 2 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --browser
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
