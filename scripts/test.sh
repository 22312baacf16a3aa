#!/usr/bin/env bash
# Sets up .venv and runs the whole test suite. `.ci/run` calls exactly this.
# Usage: scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
