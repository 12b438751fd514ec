#!/usr/bin/env bash
# Sets up a fresh machine and starts the app on the built-in models (http://127.0.0.1:7860).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python app.py "$@"
