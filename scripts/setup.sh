#!/usr/bin/env bash
# Creates .venv (idempotent) with the package, its test extras and the pinned CPU torch from constraints.txt.
# Usage: scripts/setup.sh            (then: . .venv/bin/activate)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.launcher-setup
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/python -m pip install -q -c constraints.txt -e '.[test,recipes]' 2>&1 \
        | grep -v "is ignored: it is neither a file nor a directory" || true
    .venv/bin/python -c "import torch, omegaconf, submitit, fsspec, s3fs, sklearn" \
        || { echo "setup: the install is incomplete (see pip's output above)" >&2; exit 1; }
    echo "$want" > "$stamp"
fi
