"""Shared helpers of the ComfyUI server tests."""
from __future__ import annotations

import copy
import json
import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACK_NAME = "ComfyUI-BitDance"  # the pack's folder name in the test server's custom_nodes/
WORKFLOWS = os.path.join(REPO, "workflows")  # UI format: what ComfyUI's template browser lists
API_WORKFLOWS = os.path.join(WORKFLOWS, "api")  # their API-format twins (.api.json), for HTTP queueing


def ui_twin(api_path: str) -> str:
    """workflows/api/NAME.api.json -> workflows/NAME.json"""
    return os.path.join(WORKFLOWS, os.path.basename(api_path).replace(".api.json", ".json"))
TEST_WORKFLOWS = os.path.join(REPO, "tests", "workflows")
FIXTURES = os.path.join(os.path.dirname(REPO), "shared", "fixtures")
# Every UniWeTok fixture (the public uniwetok-tiny and any others beside it); conftest places each in models/bitdance/
UNIWETOK = sorted(d for d in (os.listdir(FIXTURES) if os.path.isdir(FIXTURES) else []) if d.startswith("uniwetok"))
NODE_IDS = ["BitDanceModelLoader", "BitDanceSplitModelLoader", "BitDanceTextEncode", "BitDanceARSampler",
            "BitDanceTokenizerLoader", "BitDanceDecode", "BitDanceEncode", "BitDanceExtendCanvas", "BitDanceImageNetLoader",
            "BitDanceImageNetSampler"]


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def node_of(prompt: dict, class_type: str) -> dict:
    nodes = [n for n in prompt.values() if n["class_type"] == class_type]
    assert len(nodes) == 1, f"expected one {class_type} in the workflow, found {len(nodes)}"
    return nodes[0]


def tiny_t2i(width=128, height=128, steps=2, seed=0, prompt="a small wooden boat", cfg=4.0, prefix="t",
             save="PreviewImage") -> dict:
    """The tiny text-to-image test workflow with settings changed."""
    wf = copy.deepcopy(load(os.path.join(TEST_WORKFLOWS, "tiny_t2i.api.json")))
    s = node_of(wf, "BitDanceARSampler")["inputs"]
    s.update(width=width, height=height, steps=steps, seed=seed, cfg=cfg)
    node_of(wf, "BitDanceTextEncode")["inputs"]["prompt"] = prompt
    out = node_of(wf, "SaveImage")
    if save == "PreviewImage":
        out["class_type"] = "PreviewImage"
        out["inputs"].pop("filename_prefix")
    else:
        out["inputs"]["filename_prefix"] = prefix
    return wf


# The start of a probe: a script run by run_probe in a process of its own, with ComfyUI's own modules
# imported as ComfyUI would (on the CPU) and the pack loaded as custom node package `bitdance_pack`.
PROBE_PREAMBLE = """
import importlib.util, os, sys
repo, comfy_dir = sys.argv[1], sys.argv[2]
sys.path.insert(0, os.path.join(repo, "tests"))
import comfy_launcher
comfy_launcher._define_torchvision_schemas()
sys.argv = [os.path.join(comfy_dir, "main.py"), "--cpu"]
sys.path.insert(0, comfy_dir)
import comfy.options
comfy.options.enable_args_parsing()
import comfy.model_management as mm
spec = importlib.util.spec_from_file_location("bitdance_pack", os.path.join(repo, "__init__.py"),
                                              submodule_search_locations=[repo])
pack = importlib.util.module_from_spec(spec)
sys.modules["bitdance_pack"] = pack
spec.loader.exec_module(pack)
"""


def run_probe(tmp_path, script: str):
    """(the finished process, its "NAME value" lines as a dict) of a probe script run in a process of its
    own against ComfyUI's own modules (as ComfyUI would run the pack, on the CPU)."""
    from conftest import COMFY_DIR, COMFY_PYTHON

    probe = tmp_path / "probe.py"
    probe.write_text(script)
    res = subprocess.run([COMFY_PYTHON, str(probe), REPO, COMFY_DIR], capture_output=True, text=True, timeout=600,
                         cwd=str(tmp_path))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res, dict(line.split(" ", 1) for line in res.stdout.splitlines() if line.split(" ", 1)[0].isupper()
                     and " " in line)
