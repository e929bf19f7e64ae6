"""The model loader's memory options on the real server (CPU): weights (auto / as-is / fp8 / 4bit) and
offload (auto / none / stage / stream), decided by the engine's planner and announced in the console."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from helpers import REPO, node_of, tiny_t2i

SEED = 7301  # seeds of this module only: every run below computes (none is a cached result)


def _loader(wf: dict) -> dict:
    return node_of(wf, "BitDanceModelLoader")["inputs"]


def _run(comfy, wf: dict) -> tuple[np.ndarray, str]:
    """(the one output image as uint8 HxWx3, what the server printed while running it)."""
    start = os.path.getsize(comfy.log_path)
    entry = comfy.run(wf, timeout=600)
    images = [im for ims in comfy.images(entry).values() for im in ims]
    assert len(images) == 1, entry.get("outputs")
    with open(comfy.log_path, errors="replace") as f:
        f.seek(start)
        log = f.read()
    return np.asarray(images[0].convert("RGB")), log


def _decision(log: str) -> str:
    lines = [l for l in log.splitlines() if l.startswith("[BitDance] t2i-tiny-p16 (")]
    assert len(lines) == 1, f"expected one decision line from the loader, got:\n{log[-3000:]}"
    return lines[0]


def _plain_float32(seed: int) -> dict:
    """The workflow as it was before the memory options existed (they are optional), in float32."""
    wf = tiny_t2i(seed=seed)
    ins = _loader(wf)
    ins.pop("weights", None)
    ins.pop("offload", None)
    ins["dtype"] = "fp32"
    return wf


def test_loader_lists_the_memory_options(comfy):
    info = comfy.get("/object_info/BitDanceModelLoader")["BitDanceModelLoader"]["input"]
    weights, offload = info["optional"]["weights"], info["optional"]["offload"]
    assert weights[1]["options"] == ["auto", "as-is", "fp8", "4bit"] and weights[1]["default"] == "auto"
    assert offload[1]["options"] == ["auto", "none", "stage", "stream"] and offload[1]["default"] == "auto"
    # a value the dropdown does not have (an API prompt): refused, naming it. ComfyUI 0.3.75 leaves a
    # combo with validate_inputs to the node, so the loader refuses it, naming the choices (the queue-time
    # check covers the model list only: see nodes/validation.py); ComfyUI 0.8+ refuses it at /prompt.
    status, body = comfy.post_prompt(_with(tiny_t2i(seed=SEED), weights="int4"))
    if status == 400:
        assert "int4" in json.dumps(body) and "weights" in json.dumps(body), body
        return
    assert status == 200, body
    entry = comfy.wait(body["prompt_id"])
    (err,) = comfy.messages(entry, "execution_error")
    assert err["node_type"] == "BitDanceModelLoader", err
    assert "weights 'int4' unknown; choose one of ['auto', 'as-is', 'fp8', '4bit']" in err["exception_message"], err


def _with(wf: dict, **inputs) -> dict:
    _loader(wf).update(inputs)
    return wf


def test_fp8_weights_make_an_image(comfy):
    img, log = _run(comfy, _with(tiny_t2i(seed=SEED + 1), weights="fp8", offload="auto"))
    assert img.shape == (128, 128, 3) and img.std() > 1.0
    line = _decision(log)
    assert "weights fp8, offload none" in line and "on cpu" in line, line


def test_4bit_weights_make_an_image(comfy, tmp_path, fixtures_dir):
    """weights=4bit: the backbone's linears quantised to GGUF Q4_0 on load (no backbone-Q4_0.gguf in the
    fixture folder; the decision line says how to write it once), the head's in fp8; the image is the
    engine CLI's with --weights 4bit."""
    wf = _with(tiny_t2i(seed=SEED + 6), dtype="fp32", weights="4bit", offload="auto")
    img, log = _run(comfy, wf)
    assert img.shape == (128, 128, 3) and img.std() > 1.0
    line = _decision(log)
    assert "weights 4bit, offload none" in line and "quantised on load" in line and "convert --model" in line, line
    s = node_of(wf, "BitDanceARSampler")["inputs"]
    out = tmp_path / "cli.npy"
    cmd = [sys.executable, "-m", "bitdance_core", "t2i", "--model", os.path.join(fixtures_dir, "t2i-tiny-p16", "model"),
           "--prompt", node_of(wf, "BitDanceTextEncode")["inputs"]["prompt"], "--height", str(s["height"]),
           "--width", str(s["width"]), "--steps", str(s["steps"]), "--cfg", str(s["cfg"]), "--seed", str(s["seed"]),
           "--device", "cpu", "--dtype", "float32", "--weights", "4bit", "--pixels-npy", str(out)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "weights 4bit, offload none" in r.stderr
    assert np.array_equal(img, np.load(out)[0])
    plain, _ = _run(comfy, _plain_float32(SEED + 6))
    assert not np.array_equal(img, plain)  # 4-bit weights are another (close) model


def test_auto_is_the_plain_float32_run(comfy):
    plain, _ = _run(comfy, _plain_float32(SEED + 2))
    auto, log = _run(comfy, _with(tiny_t2i(seed=SEED + 2), dtype="auto", weights="auto", offload="auto"))
    line = _decision(log)
    assert "weights as-is, offload none" in line and "on the CPU" in line, line
    assert np.array_equal(auto, plain)


def test_offload_modes_give_the_same_image(comfy):
    """Explicit offload on the CPU runs the engine's hooks (real copies, device "cpu") through the
    nodes: the ModelPatcher leaves the model alone, and the image is the plain run's. The offloaded
    model gives its device parts back after each node (park); a second prompt on the same loaded
    model (the loader's result cached) brings them back and gives the plain image of its seed."""
    plain, _ = _run(comfy, _plain_float32(SEED + 3))
    plain2, _ = _run(comfy, _plain_float32(SEED + 4))
    for mode in ("stage", "stream"):
        img, log = _run(comfy, _with(tiny_t2i(seed=SEED + 3), dtype="fp32", weights="as-is", offload=mode))
        assert f"weights as-is, offload {mode}" in _decision(log)
        assert np.array_equal(img, plain), mode
        again, log = _run(comfy, _with(tiny_t2i(seed=SEED + 4), dtype="fp32", weights="as-is", offload=mode))
        assert "[BitDance] t2i-tiny-p16 (" not in log, "the loader ran again: its result was meant to be cached"
        assert np.array_equal(again, plain2), mode


def test_cuda_graphs_option(comfy):
    """The loader's opt-in CUDA graphs: listed (off by default); without CUDA it says so and changes nothing."""
    info = comfy.get("/object_info/BitDanceModelLoader")["BitDanceModelLoader"]["input"]
    assert info["optional"]["cuda_graphs"][0] == "BOOLEAN" and info["optional"]["cuda_graphs"][1]["default"] is False
    plain, _ = _run(comfy, _plain_float32(SEED + 5))
    img, log = _run(comfy, _with(_plain_float32(SEED + 5), cuda_graphs=True))
    assert "[BitDance] t2i-tiny-p16: CUDA graphs off (no CUDA device)" in log, log[-2000:]
    assert np.array_equal(img, plain)
