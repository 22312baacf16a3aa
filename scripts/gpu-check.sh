#!/usr/bin/env bash
# The GPU test set on a CUDA (or ROCm) machine that has torch installed but maybe no network:
#
#     scripts/gpu-check.sh [WHEEL_DIR]
#
# It makes .venv-gpu on top of the python that has the GPU build of torch (--system-site-packages: that torch is
# used as it is, never reinstalled), adds the launcher in place (no download, no build), installs the pure-Python
# dependencies that python lacks from WHEEL_DIR when given (`pip download -d WHEEL_DIR omegaconf submitit fsspec
# s3fs pytest tensorboard` on a machine with network), runs the tests marked `gpu` (tests/test_gpu.py) and prints
# a table: check, result, figure. Without a GPU it exits 1 with one line that says so.
# PYTHON=/path/to/python picks the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu-check: $PY has no torch that sees a GPU (torch.cuda.is_available() is false or torch is missing): nothing to check" >&2
    exit 1
fi
VENV=.venv-gpu
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv --system-site-packages "$VENV"
fi
# The launcher in place: this checkout on the path and a `launch` command, without pip (no build, no network).
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PWD" > "$site/launcher-checkout.pth"
# and what $PY itself sees (torch among it), also when $PY is a venv's python, which --system-site-packages skips
"$PY" -c 'import site, sys; print("\n".join(p for p in site.getsitepackages() + [site.getusersitepackages()]))' \
    > "$site/launcher-base-sites.pth"
need=(omegaconf yaml submitit fsspec s3fs numpy pytest)
missing=()
for mod in "${need[@]}"; do
    "$VENV/bin/python" -c "import $mod" 2>/dev/null || missing+=("$mod")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ -z "${1:-}" ]; then
        echo "gpu-check: $PY lacks ${missing[*]}; give a folder of wheels: scripts/gpu-check.sh WHEEL_DIR" >&2
        exit 1
    fi
    pkgs=()
    for mod in "${missing[@]}"; do pkgs+=("$([ "$mod" = yaml ] && echo pyyaml || echo "$mod")"); done
    "$VENV/bin/python" -m pip install -q --no-index --find-links "$1" "${pkgs[@]}"
    "$VENV/bin/python" -m pip install -q --no-index --find-links "$1" tensorboard 2>/dev/null || true
fi
cat > "$VENV/bin/launch" <<EOF
#!$PWD/$VENV/bin/python
import sys
from launcher.cli import main
sys.exit(main())
EOF
chmod +x "$VENV/bin/launch"
table=$(mktemp)
trap 'rm -f "$table"' EXIT
"$VENV/bin/python" -c 'import torch; v = torch.version; print("gpu-check: torch", torch.__version__, "CUDA", v.cuda,
    "HIP", getattr(v, "hip", None), "GPUs", torch.cuda.device_count(), torch.cuda.get_device_name(0))'
rc=0
LAUNCHER_GPU_TABLE="$table" timeout 900 "$VENV/bin/python" -m pytest -o addopts="" -ra -q -m gpu tests/test_gpu.py \
    --junitxml="$table.xml" || rc=$?
"$VENV/bin/python" - "$table" "$table.xml" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    rows[r["check"]] = r
results = []
try:
    for case in ET.parse(sys.argv[2]).getroot().iter("testcase"):
        outcome = "pass"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "FAIL: " + (child.get("message") or "").splitlines()[0][:80] if child.get("message") else "FAIL"
            elif child.tag == "skipped":
                outcome = "skipped: " + (child.get("message") or "")[:60]
        results.append((case.get("name"), outcome))
except (OSError, ET.ParseError):
    pass
print(f"\n| {'test':62} | {'result':40} |")
print(f"|{'-' * 64}|{'-' * 42}|")
for name, outcome in results:
    print(f"| {name[:62]:62} | {outcome[:40]:40} |")
print(f"\n| {'check':45} | {'figure':50} |")
print(f"|{'-' * 47}|{'-' * 52}|")
for r in rows.values():
    print(f"| {r['check'][:45]:45} | {r['figure'][:50]:50} |")
EOF
rm -f "$table.xml"
exit $rc
