"""The embedded default: the built-in demo models are in the loaders' lists (no copying), and the
Python part of scripts/demo.sh (scripts/run_workflow.py on workflows/api/demo_digits_t2i.api.json)
writes a PNG of the demo model's native size, against the session server and with a server of its
own, as `bash scripts/demo.sh` runs it."""
from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

import pytest
from PIL import Image

from helpers import API_WORKFLOWS, REPO, load

from bitdance_core import demo_models

SCRIPT = os.path.join(REPO, "scripts", "run_workflow.py")
DEMO_WORKFLOW = os.path.join(API_WORKFLOWS, "demo_digits_t2i.api.json")
T2I_NAME = "demo/digits-t2i"
IMAGENET_NAME = "demo/digits-imagenet/model.pt"


@pytest.fixture(scope="module")
def demo_models_present():
    missing = [p for p in (demo_models.T2I, demo_models.IMAGENET) if not os.path.exists(p)]
    if missing:
        pytest.fail(f"demo models missing: {missing} (bitdance_core/demo_models, see docs/demo-models.md)")


def _options(info: dict, node: str, name: str) -> list[str]:
    return info[node]["input"]["required"][name][1]["options"]


def test_demo_models_are_listed(comfy, demo_models_present):
    info = comfy.get("/object_info")
    models = _options(info, "BitDanceModelLoader", "model")
    # models on disk first, then the demo, then released names still to download
    assert models.index("t2i-tiny-p16") < models.index(T2I_NAME) < models.index("BitDance-14B-64x")
    assert T2I_NAME in _options(info, "BitDanceTokenizerLoader", "tokenizer")
    checkpoints = _options(info, "BitDanceImageNetLoader", "checkpoint")
    assert IMAGENET_NAME in checkpoints and "imagenet-tiny-p4/model.pt" in checkpoints
    assert IMAGENET_NAME not in _options(info, "BitDanceImageNetLoader", "vae")
    # nothing was copied into models/bitdance/
    assert not os.path.exists(os.path.join(comfy.base, "models", "bitdance", "demo"))
    route = comfy.get(f"/bitdance/model_info?model={T2I_NAME}")
    assert route["available"], route
    assert 2 * demo_models.SIZE % (round(route["parallel_num"] ** 0.5) * route["downsample"]) == 0


def _check_png(path: str, stdout: str):
    assert stdout.strip().splitlines()[-1] == path, stdout
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (demo_models.SIZE, demo_models.SIZE)
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 64, "a blank image"


def test_run_workflow_on_the_session_server(comfy, demo_models_present, tmp_path):
    out = str(tmp_path / "demo.png")
    proc = subprocess.run([sys.executable, SCRIPT, DEMO_WORKFLOW, "--url", comfy.url, "--out", out],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _check_png(out, proc.stdout)


def test_demo_command_starts_its_own_server(comfy, demo_models_present, tmp_path):
    """scripts/demo.sh's last step, with a temporary base directory instead of out/comfyui-demo
    (`comfy` only makes sure ComfyUI is installed; this run starts and stops a second server)."""
    out = str(tmp_path / "out" / "demo.png")
    comfy_dir = os.environ.get("BITDANCE_COMFYUI_DIR") or os.path.join(REPO, ".comfyui")  # as conftest
    python = os.environ.get("BITDANCE_COMFYUI_PYTHON") or sys.executable
    proc = subprocess.run([python, SCRIPT, DEMO_WORKFLOW, "--out", out, "--base", str(tmp_path / "base"),
                           "--comfyui", comfy_dir], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _check_png(out, proc.stdout)
    assert os.path.islink(tmp_path / "base" / "custom_nodes" / "ComfyUI-BitDance")
    # the server it started is gone
    assert "starting ComfyUI on http://127.0.0.1:" in proc.stdout
    url = proc.stdout.split("starting ComfyUI on ", 1)[1].split()[0]
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/object_info", timeout=2)


def test_demo_script_runs_this_workflow():
    """scripts/demo.sh sets up (engine, ComfyUI without the browser) and runs run_workflow.py on the demo workflow."""
    with open(os.path.join(REPO, "scripts", "demo.sh")) as f:
        sh = f.read()
    for part in ("scripts/setup_engine.sh", "scripts/setup_comfyui.sh", "SKIP_BROWSER", "scripts/run_workflow.py",
                 "workflows/api/demo_digits_t2i.api.json", "out/demo.png", "out/comfyui-demo"):
        assert part in sh, part


def test_a_batch_is_named_as_the_cli_names_it(comfy, demo_models_present, tmp_path):
    """Four images from a workflow (scripts/run_workflow.py) and from the engine CLI, both asked for as
    sevens.png: the same names, sevens_0.png .. sevens_3.png."""
    wf_out, cli_out = tmp_path / "workflow" / "sevens.png", tmp_path / "cli" / "sevens.png"
    proc = subprocess.run([sys.executable, SCRIPT, os.path.join(API_WORKFLOWS, "demo_digits_class.api.json"),
                           "--url", comfy.url, "--out", str(wf_out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    os.makedirs(cli_out.parent)
    cli = subprocess.run([sys.executable, "-m", "bitdance_core", "t2i", "--model", demo_models.T2I,
                          "--prompt", demo_models.prompt(7), "--height", "32", "--width", "32", "--steps", "2",
                          "--cfg", "4", "--num-images", "4", "--device", "cpu", "--out", str(cli_out)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr[-3000:]
    names = ["sevens_0.png", "sevens_1.png", "sevens_2.png", "sevens_3.png"]
    assert [os.path.basename(p) for p in proc.stdout.strip().splitlines()[-4:]] == names, proc.stdout
    assert [os.path.basename(p) for p in cli.stdout.strip().splitlines()[-4:]] == names, cli.stdout
    for folder in (wf_out.parent, cli_out.parent):
        assert sorted(os.listdir(folder)) == names
        for n in names:
            with Image.open(folder / n) as im:
                assert im.format == "PNG" and im.size == (32, 32)


def test_the_loaders_console_line_describes_the_demo_model(comfy, demo_models_present):
    """The memory planner's line names the model's own geometry and plans for a size it makes (not the
    14B models' 1024x1024)."""
    comfy.run(load(DEMO_WORKFLOW))
    with open(comfy.log_path) as f:
        lines = [ln for ln in f if ln.startswith(f"[BitDance] {T2I_NAME} (")]
    assert lines, "no planner line for the demo model in the server log"
    assert lines[-1].startswith(f"[BitDance] {T2I_NAME} (4 tokens per step, 13 sizes from 32x32 to 512x512; memory "
                                "planned for its largest square, 512x512): weights as-is, offload none"), lines[-1]
    assert "planned for 512x512, 1 image" in lines[-1] and "1024x1024" not in lines[-1], lines[-1]
