#!/usr/bin/env bash
# Creates .venv with CPU torch 2.13.0 (the build the official fixtures were made with) and the
# pack's requirements plus the test requirements. Idempotent; fast when already done.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || python3 -m venv "$ROOT/.venv"
pip_q() { "$PY" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; return "${PIPESTATUS[0]}"; }
stamp=".venv/.bitdance-engine-$(cat requirements.txt tests/requirements.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "[setup_engine] installing torch 2.13.0 and requirements into .venv"
    pip_q install -q "torch==2.13.0" -r requirements.txt -r tests/requirements.txt
    touch "$stamp"
fi
