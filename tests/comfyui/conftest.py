"""A real ComfyUI 0.3.75 server for the node-pack tests, one per test session.

scripts/setup_comfyui.sh installs it into .comfyui/. The server runs on the CPU on a free loopback
port with its own --base-directory (a temp dir): the pack is linked into custom_nodes/, the tiny
fixture models of ../shared/fixtures into models/bitdance/, and split files made from the tiny
text-to-image fixture (tests/split_files.py: fp8, fp32 and a Qwen-sized vocabulary) into
models/diffusion_models/, text_encoders/ and vae/ as tiny_<kind>_main / _text_encoder / _vae.safetensors.

Opt-in, for another ComfyUI (scripts/check_latest_comfyui.sh): BITDANCE_COMFYUI_DIR names a ComfyUI
checkout to serve instead of .comfyui/, and BITDANCE_COMFYUI_PYTHON the interpreter (its own venv)
that runs it; pytest itself and the CLI the tests compare against keep running in this venv.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
from comfy_client import ComfyClient  # noqa: E402
from helpers import PACK_NAME  # noqa: E402
from run_workflow import free_port, stop_server, tail  # noqa: E402  (the demo command's own helpers)
from helpers import UNIWETOK  # noqa: E402
from split_files import KINDS, write_split  # noqa: E402  (tests/: on the pytest pythonpath)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMFY_DIR = os.path.abspath(os.environ.get("BITDANCE_COMFYUI_DIR") or os.path.join(REPO, ".comfyui"))
COMFY_PYTHON = os.environ.get("BITDANCE_COMFYUI_PYTHON") or sys.executable
FIXTURES = os.path.join(os.path.dirname(REPO), "shared", "fixtures")
ARTIFACTS = os.path.join(REPO, "tests", "artifacts")
START_TIMEOUT = 180

# Fixture models as the server sees them: models/bitdance/<name>
MODELS = {
    "t2i-tiny-p16": os.path.join(FIXTURES, "t2i-tiny-p16", "model"),
    "ae-tiny": os.path.join(FIXTURES, "ae-tiny"),
    "imagenet-tiny-p4": os.path.join(FIXTURES, "imagenet-tiny-p4"),
}
MODELS.update({d: os.path.join(FIXTURES, d) for d in UNIWETOK})  # models/bitdance/<name>/uniwetok.pt


def _place_models(models_dir: str) -> None:
    bitdance = os.path.join(models_dir, "bitdance")
    os.makedirs(bitdance, exist_ok=True)
    for name, src in MODELS.items():
        os.symlink(src, os.path.join(bitdance, name))
    # Broken copies for the error tests: one misses a weights file, one has it truncated.
    t2i = MODELS["t2i-tiny-p16"]
    for broken in ("broken-missing", "broken-corrupt"):
        d = os.path.join(bitdance, broken)
        os.makedirs(d)
        for f in os.listdir(t2i):
            if f != "model.safetensors":
                os.symlink(os.path.join(t2i, f), os.path.join(d, f))
    with open(os.path.join(t2i, "model.safetensors"), "rb") as f:
        head = f.read(4096)
    with open(os.path.join(bitdance, "broken-corrupt", "model.safetensors"), "wb") as f:
        f.write(head)


# split-file slot -> ComfyUI model folder (the tokenizer, when there is one, sits beside the text encoder)
SPLIT_FOLDERS = {"main_model": "diffusion_models", "text_encoder": "text_encoders", "tokenizer": "text_encoders",
                 "vae": "vae"}


def _place_split_files(models_dir: str, staging: str) -> None:
    """tiny_<kind>_{main,text_encoder,vae}.safetensors in ComfyUI's folders, from the tiny T2I fixture."""
    for kind in KINDS:
        for slot, path in write_split(MODELS["t2i-tiny-p16"], staging, f"tiny_{kind}", kind).items():
            folder = os.path.join(models_dir, SPLIT_FOLDERS[slot])
            os.makedirs(folder, exist_ok=True)
            shutil.move(path, os.path.join(folder, os.path.basename(path)))


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """A running ComfyUI with the pack and the fixture models; yields a ComfyClient."""
    if not os.path.isfile(os.path.join(COMFY_DIR, "main.py")):
        if os.environ.get("BITDANCE_COMFYUI_DIR"):
            pytest.fail(f"BITDANCE_COMFYUI_DIR={COMFY_DIR} has no ComfyUI main.py")
        pytest.fail("ComfyUI is not installed in .comfyui/: run `bash scripts/setup_comfyui.sh`")
    if not os.path.isdir(FIXTURES):
        pytest.fail(f"fixtures not found at {FIXTURES} (expected ../shared/fixtures beside the repo)")
    base = str(tmp_path_factory.mktemp("comfy_base"))
    for d in ("custom_nodes", "models", "input", "output", "temp", "user"):
        os.makedirs(os.path.join(base, d), exist_ok=True)
    os.symlink(REPO, os.path.join(base, "custom_nodes", PACK_NAME))
    _place_models(os.path.join(base, "models"))
    _place_split_files(os.path.join(base, "models"), str(tmp_path_factory.mktemp("split_staging")))

    port = free_port()
    log_path = os.path.join(base, "comfyui.log")
    cmd = [COMFY_PYTHON, os.path.join(REPO, "tests", "comfy_launcher.py"), COMFY_DIR,
           "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", base,
           "--disable-auto-launch", "--database-url", "sqlite:///:memory:", "--disable-api-nodes",
           "--preview-method", "auto"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=COMFY_DIR)
    client = ComfyClient(f"http://127.0.0.1:{port}", proc, base, log_path)
    try:
        deadline = time.time() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with {proc.returncode} while starting:\n{tail(log_path, 60)}")
            if client.ready("BitDanceModelLoader"):
                break
            if time.time() > deadline:
                pytest.fail(f"ComfyUI did not answer /object_info within {START_TIMEOUT} s:\n{tail(log_path, 60)}")
            time.sleep(0.5)
        client.startup_s = START_TIMEOUT - (deadline - time.time())
        yield client
    finally:
        stop_server(proc)
        log.close()
        os.makedirs(ARTIFACTS, exist_ok=True)
        shutil.copy(log_path, os.path.join(ARTIFACTS, "comfyui.log"))


@pytest.fixture(scope="session")
def fixtures_dir():
    return FIXTURES


def load_json(path: str):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def upload_example(comfy):
    """ComfyUI's own example.png in the server's input/ folder (what the LoadImage workflows name)."""
    dst = os.path.join(comfy.base, "input", "example.png")
    if not os.path.exists(dst):
        shutil.copy(os.path.join(COMFY_DIR, "input", "example.png"), dst)
    return "example.png"


def pytest_configure(config):
    config.addinivalue_line("markers", "writer: regenerates committed files; runs only with BITDANCE_WRITE_UI_WORKFLOWS=1")


def pytest_collection_modifyitems(config, items):
    """File writers are tools, not tests: deselected (not skipped) unless asked for."""
    if os.environ.get("BITDANCE_WRITE_UI_WORKFLOWS"):
        return
    keep = [i for i in items if i.get_closest_marker("writer") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep
