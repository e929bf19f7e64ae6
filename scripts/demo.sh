#!/usr/bin/env bash
# The embedded default: sets everything up (.venv, ComfyUI 0.3.75 in .comfyui/; no browser), starts
# ComfyUI on the CPU (loopback, base directory out/comfyui-demo with this pack linked in), runs
# workflows/api/demo_digits_t2i.api.json on the built-in demo model (bitdance_core/demo_models/digits-t2i:
# "a handwritten digit seven", 32x32) and writes out/demo.png. No model download, no GPU.
# Usage: bash scripts/demo.sh [WORKFLOW.api.json [OUT.png]]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WORKFLOW="${1:-workflows/api/demo_digits_t2i.api.json}"
OUT="${2:-out/demo.png}"
bash scripts/setup_engine.sh
SKIP_BROWSER="${SKIP_BROWSER:-1}" bash scripts/setup_comfyui.sh
exec .venv/bin/python scripts/run_workflow.py "$WORKFLOW" --out "$OUT" --base out/comfyui-demo
