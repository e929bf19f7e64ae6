#!/usr/bin/env bash
# One command: set everything up (venv, ComfyUI 0.3.75, chromium) and run the whole test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_engine.sh
bash scripts/setup_comfyui.sh
exec .venv/bin/python -m pytest tests "$@"
