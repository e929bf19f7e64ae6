"""Every API-format workflow in workflows/api/ runs on the server, with the tiny fixture models put in
place of the released ones they name (and sizes/steps scaled down for the CPU). The demo workflows
(built-in demo models, `demo/...`) run exactly as committed."""
from __future__ import annotations

import copy
import glob
import io
import json
import os
import urllib.request

import pytest
from PIL import Image

from helpers import API_WORKFLOWS, PACK_NAME, WORKFLOWS, load, ui_twin
from thumbnails import SIZE, templates

from bitdance_core import demo_models

# released name -> tiny fixture name, as placed by conftest in models/bitdance/
MODEL_MAP = {
    "BitDance-14B-64x": "t2i-tiny-p16",
    "BitDance-14B-16x": "t2i-tiny-p16",
    "BitDance-ImageNet/BitDance_B_1x.pt": "imagenet-tiny-p4/model.pt",
    "BitDance-Tokenizer/ae_d16c32.safetensors": "ae-tiny",
    "UniWeTok/uniwetok.pt": "uniwetok-tiny/uniwetok.pt",
}
# the community split files -> the tiny ones conftest made from the fixture (models/diffusion_models, ...)
SPLIT_MAP = {
    "BitDance_14B_MainModel_FP8.safetensors": "tiny_fp8_main.safetensors",
    "BitDance_TextEncoder_FP8.safetensors": "tiny_fp8_text_encoder.safetensors",
    "BitDance_VAE_FP16.safetensors": "tiny_fp8_vae.safetensors",
}


MODEL_KEYS = ("model", "checkpoint", "tokenizer")
SPLIT_KEYS = ("main_model", "text_encoder", "vae")


def is_demo(wf: dict) -> bool:
    """Whether the workflow uses the built-in demo models (shipped in the repo: nothing to substitute)."""
    return any(isinstance(n["inputs"].get(k), str) and n["inputs"][k].startswith("demo/")
               for n in wf.values() for k in MODEL_KEYS)


SCALE = 4  # pixel sizes of image and mask nodes in the released workflows, divided for the tiny models


def _size_of_input(input_dir: str, name: str) -> tuple[int, int]:
    from PIL import Image

    with Image.open(os.path.join(input_dir, name)) as im:
        return im.size


def _latent(wf: dict, ref, input_dir: str) -> tuple[int, int, int]:
    """(images, width, height) in pixels of the LATENT at `ref` ([node id, output])."""
    ins, ct = wf[ref[0]]["inputs"], wf[ref[0]]["class_type"]
    if ct in ("BitDanceARSampler", "BitDanceImageNetSampler") and "init" in ins:
        n, w, h = _latent(wf, ins["init"], input_dir)  # a continuation: the init's size, its batch if more than one
        return (ins["batch_size"] if n == 1 else n), w, h
    if ct == "BitDanceARSampler":
        return ins["batch_size"], ins["width"], ins["height"]
    if ct == "BitDanceImageNetSampler":
        side = demo_models.SIZE if is_demo({"loader": wf[ins["model"][0]]}) else 256
        return ins["batch_size"], side, side
    if ct == "BitDanceEncode":
        return _image(wf, ins["image"], input_dir)
    if ct == "BitDanceExtendCanvas":
        n, w, h = _latent(wf, ins["bits"], input_dir)
        return (n, w, h + ins["pixels"]) if ins["side"] == "bottom" else (n, w + ins["pixels"], h)
    if ct == "SetLatentNoiseMask":
        return _latent(wf, ins["samples"], input_dir)
    raise AssertionError(f"{ct}: a LATENT source this test does not know")


def _image(wf: dict, ref, input_dir: str) -> tuple[int, int, int]:
    ins, ct = wf[ref[0]]["inputs"], wf[ref[0]]["class_type"]
    if ct == "LoadImage":
        return (1, *_size_of_input(input_dir, ins["image"]))
    if ct == "ImageScale":
        return _image(wf, ins["image"], input_dir)[0], ins["width"], ins["height"]
    if ct == "BitDanceDecode":
        return _latent(wf, ins["bits"], input_dir)
    raise AssertionError(f"{ct}: an IMAGE source this test does not know")


def expected_sizes(wf: dict, input_dir: str) -> list[tuple[int, int]]:
    """The (width, height) of every image the workflow saves, followed back through the graph."""
    out = []
    for node in wf.values():
        if node["class_type"] in ("SaveImage", "PreviewImage"):
            n, w, h = _image(wf, node["inputs"]["images"], input_dir)
            out += [(w, h)] * n
    return out


def tiny_version(wf: dict) -> dict:
    """The workflow with fixture models, small sizes and few steps. A demo workflow stays as it is."""
    if is_demo(wf):
        return copy.deepcopy(wf)
    wf = copy.deepcopy(wf)
    for node in wf.values():
        ins, ct = node["inputs"], node["class_type"]
        for key in MODEL_KEYS:
            if isinstance(ins.get(key), str):
                assert ins[key] in MODEL_MAP, f"{ct}.{key} = {ins[key]!r}: not a released name this test knows"
                ins[key] = MODEL_MAP[ins[key]]
        if ct == "BitDanceSplitModelLoader":
            for key in SPLIT_KEYS:
                assert ins[key] in SPLIT_MAP, f"{ct}.{key} = {ins[key]!r}: not a community file this test knows"
                ins[key] = SPLIT_MAP[ins[key]]
        if ct == "BitDanceARSampler":
            ins.update(steps=2)
            if "init" not in ins:  # a continuation's size is its init's
                ins.update(width=128, height=ins["height"] * 128 // ins["width"])
        elif ct == "BitDanceImageNetSampler":
            ins.update(class_index=3, steps=2, batch_size=1)  # the tiny model knows 10 classes
        elif ct in ("ImageScale", "SolidMask"):
            ins.update(width=ins["width"] // SCALE, height=ins["height"] // SCALE)
        elif ct == "MaskComposite":
            ins.update(x=ins["x"] // SCALE, y=ins["y"] // SCALE)
        elif ct == "BitDanceExtendCanvas":
            ins.update(pixels=ins["pixels"] // SCALE)
    return wf


API_FILES = sorted(glob.glob(os.path.join(API_WORKFLOWS, "*.api.json")))


def test_every_workflow_has_both_formats():
    assert len(API_FILES) >= 4
    assert os.path.join(API_WORKFLOWS, "demo_digits_t2i.api.json") in API_FILES
    for api in API_FILES:
        assert os.path.isfile(ui_twin(api)), f"{api}: no UI-format twin"
    # workflows/ itself holds only UI-format files (ComfyUI lists them as this pack's templates) and
    # their thumbnails
    names = [os.path.basename(ui_twin(p))[:-5] for p in API_FILES]
    assert sorted(os.listdir(WORKFLOWS)) == sorted([n + ".json" for n in names] + [n + ".jpg" for n in names] + ["api"])


def test_every_template_is_described_demos_first():
    """web/templates.json (the template browser's order, the thumbnails' captions): every workflow
    once, a one-line description each, the demo workflows first and only they marked no_download."""
    entries = templates()
    assert sorted(e["name"] for e in entries) == sorted(os.path.basename(ui_twin(p))[:-5] for p in API_FILES)
    for e in entries:
        assert e["description"].strip() and "\n" not in e["description"], e
        assert e["no_download"] == is_demo(load(os.path.join(API_WORKFLOWS, e["name"] + ".api.json"))), e
    flags = [e["no_download"] for e in entries]
    assert flags == sorted(flags, reverse=True) and flags[0], "the demo workflows come first"


@pytest.mark.parametrize("path", API_FILES, ids=[os.path.basename(p) for p in API_FILES])
def test_workflow_runs(comfy, upload_example, path):
    wf = tiny_version(load(path))
    expect = expected_sizes(wf, os.path.join(comfy.base, "input"))
    entry = comfy.run(wf, timeout=600)
    sizes = [im.size for ims in comfy.images(entry).values() for im in ims]
    assert expect and sorted(sizes) == sorted(expect)


def test_workflows_are_the_packs_templates(comfy):
    """ComfyUI lists a pack's workflows/ folder in its template browser (Workflow > Browse Templates):
    the UI workflows, not their API twins, each served as a loadable UI workflow, with its thumbnail."""

    listed = comfy.get("/workflow_templates")
    assert sorted(listed.get(PACK_NAME, [])) == sorted(os.path.basename(ui_twin(p))[:-5] for p in API_FILES)
    for name in listed[PACK_NAME]:
        wf = json.loads(comfy.get_bytes(f"/api/workflow_templates/{PACK_NAME}/{name}.json"))
        assert wf["nodes"] and "links" in wf and any(n["type"].startswith("BitDance") for n in wf["nodes"]), name
        # the thumbnail, where ComfyUI's frontend asks for it (a custom pack's template: NAME.jpg)
        with urllib.request.urlopen(f"{comfy.url}/api/workflow_templates/{PACK_NAME}/{name}.jpg", timeout=30) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "image/jpeg", name
            thumb = Image.open(io.BytesIO(r.read()))
        assert thumb.format == "JPEG" and thumb.size == (SIZE, SIZE), name
