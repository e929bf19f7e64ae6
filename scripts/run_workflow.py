"""Run one API-format workflow on ComfyUI and copy its output image(s) out (stdlib and this pack).

    python scripts/run_workflow.py WORKFLOW.api.json --out out/demo.png [--url http://127.0.0.1:8188]
    python scripts/run_workflow.py WORKFLOW.api.json --out out/demo.png --base out/comfyui-demo

With --url it talks to a running server. Without it, it starts ComfyUI itself (.comfyui/, installed by
scripts/setup_comfyui.sh) through tests/comfy_launcher.py on the CPU on a free loopback port, with
--base out/comfyui-demo as its base directory (this pack linked into custom_nodes/), and stops it
at the end. Then: POST /prompt, poll /history until the prompt ends, GET /view for each output
image. One image goes to --out; several (a batch) beside it as NAME_0.png, NAME_1.png, ..., as the
engine CLI names them (bitdance_core.pipelines.images.output_paths). Prints the paths written; exits 1 with
ComfyUI's message if the prompt is refused or fails.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_NAME = "ComfyUI-BitDance"
sys.path.insert(0, REPO)

from bitdance_core.pipelines.images import output_paths  # noqa: E402  (the CLI's names for a batch)


def request(url: str, method: str = "GET", body=None, timeout: float = 30):
    """(status, parsed JSON or raw bytes)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status = r.read(), r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: str, n: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return "(no log)"


def start_server(comfy_dir: str, base: str, wait_for: str, timeout: float, extra_args=()):
    """(process, url, log path) of a ComfyUI serving this pack from `base`, once /object_info lists
    `wait_for`; `extra_args` go to ComfyUI's command line."""
    if not os.path.isfile(os.path.join(comfy_dir, "main.py")):
        sys.exit(f"no ComfyUI in {comfy_dir}: run `bash scripts/setup_comfyui.sh` first")
    base = os.path.abspath(base)
    for d in ("custom_nodes", "models", "input", "output", "temp", "user"):
        os.makedirs(os.path.join(base, d), exist_ok=True)
    link = os.path.join(base, "custom_nodes", PACK_NAME)
    if os.path.islink(link) and os.path.realpath(link) != os.path.realpath(REPO):
        os.remove(link)
    if not os.path.lexists(link):
        os.symlink(REPO, link)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = os.path.join(base, "comfyui.log")
    cmd = [sys.executable, os.path.join(REPO, "tests", "comfy_launcher.py"), comfy_dir,
           "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", base,
           "--disable-auto-launch", "--database-url", "sqlite:///:memory:", "--disable-api-nodes", *extra_args]
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    print(f"[run_workflow] starting ComfyUI on {url} (log: {log_path})", flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=comfy_dir)
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            sys.exit(f"ComfyUI exited with {proc.returncode} while starting:\n{tail(log_path)}")
        try:
            status, body = request(f"{url}/object_info/{wait_for}", timeout=2)
            if status == 200 and isinstance(body, dict) and wait_for in body:
                return proc, url, log_path
        except OSError:
            pass
        if time.time() > deadline:
            stop_server(proc)
            sys.exit(f"ComfyUI did not answer within {timeout:.0f} s:\n{tail(log_path)}")
        time.sleep(0.5)


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def run(url: str, workflow: dict, timeout: float) -> dict:
    """The history entry of the finished prompt; exits with ComfyUI's message on failure."""
    status, body = request(f"{url}/prompt", "POST", {"prompt": workflow, "client_id": uuid.uuid4().hex})
    if status != 200:
        sys.exit(f"ComfyUI refused the workflow ({status}): {json.dumps(body, indent=1)[:4000]}")
    prompt_id = body["prompt_id"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        _, hist = request(f"{url}/history/{prompt_id}")
        entry = (hist or {}).get(prompt_id)
        state = (entry or {}).get("status", {})
        if state.get("completed") is not None and state.get("status_str") in ("success", "error"):
            if state["status_str"] != "success":
                errors = [m[1] for m in state.get("messages", []) if m[0] == "execution_error"]
                msg = "; ".join(f"{e.get('node_type')}: {e.get('exception_message', '').strip()}" for e in errors)
                sys.exit(f"the workflow failed: {msg or json.dumps(state)[:4000]}")
            return entry
        time.sleep(0.1)
    sys.exit(f"the workflow did not finish within {timeout:.0f} s")


def save_images(url: str, entry: dict, out: str) -> list[str]:
    images = [im for node_out in entry.get("outputs", {}).values() for im in node_out.get("images", [])
              if im.get("type", "output") == "output"]
    if not images:
        sys.exit("the workflow finished without an output image (no Save Image node?)")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    written = []
    for im, path in zip(images, output_paths(out, len(images))):
        q = urllib.parse.urlencode({"filename": im["filename"], "subfolder": im.get("subfolder", ""),
                                    "type": im.get("type", "output")})
        with urllib.request.urlopen(f"{url}/view?{q}", timeout=60) as r:
            data = r.read()
        with open(path, "wb") as f:
            f.write(data)
        written.append(path)
    return written


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workflow", help="an API-format workflow (.api.json)")
    ap.add_argument("--out", required=True, help="where the output PNG goes (OUT_0.png, OUT_1.png, ... for several)")
    ap.add_argument("--url", default=None, help="a running ComfyUI; default: start one for this run")
    ap.add_argument("--base", default=os.path.join(REPO, "out", "comfyui-demo"),
                    help="base directory of the server this script starts (default out/comfyui-demo)")
    ap.add_argument("--comfyui", default=os.path.join(REPO, ".comfyui"), help="the ComfyUI to start")
    ap.add_argument("--timeout", type=float, default=600, help="seconds for the workflow to finish")
    ap.add_argument("--start-timeout", type=float, default=300, help="seconds for ComfyUI to start")
    args = ap.parse_args(argv)

    with open(args.workflow) as f:
        workflow = json.load(f)
    proc = None
    url = args.url
    try:
        if url is None:
            first = next(iter(workflow.values()))["class_type"]
            proc, url, _ = start_server(os.path.abspath(args.comfyui), args.base, first, args.start_timeout)
        url = url.rstrip("/")
        t0 = time.time()
        entry = run(url, workflow, args.timeout)
        written = save_images(url, entry, args.out)
        print(f"[run_workflow] {os.path.basename(args.workflow)} ran in {time.time() - t0:.1f} s", flush=True)
        for path in written:
            print(path)
    finally:
        if proc is not None:
            stop_server(proc)


if __name__ == "__main__":
    main()
