#!/usr/bin/env bash
# Sets up .venv and trains the quickstart recipe with 2 processes on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/launch recipes/quickstart.yaml --nodes 1 --gpus 2 "$@"
