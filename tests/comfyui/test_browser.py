"""In a real browser (Debian chromium driven by playwright-core, tests/browser/driver.mjs).

- every UI-format workflow in workflows/ loads as a dropped file does (app.loadGraphData) and the
  page would queue exactly its API-format twin;
- the tiny UI workflow is loaded, the web extension's size presets follow the model (entries,
  AR step counts, selecting one sets width/height, not sent to the server), it is queued from the
  page and the output image appears on its Save Image node; a screenshot is kept in tests/artifacts/.

- the demo workflow run from the page: the AR sampler's preview ends as the whole image at its own
  size (32x32, not scaled to 512); the presets are the demo model's sizes;
- the class sampler lists the connected model's classes ("0" .. "9" for the digits model);
- a model not on disk is shown in the sampler's status line in the warning colour;
- no BitDance node's title is cut off;
- the template browser shows this pack's thumbnails (served, not the 404 placeholder), demos first;
- under the Vue node renderer ("Nodes 2.0"): presets, class list and status line as above, a preset
  picked on the page.

`BITDANCE_WRITE_UI_WORKFLOWS=1 pytest tests/comfyui/test_browser.py -k write` regenerates the
UI-format files from the API-format ones through the real frontend, the README's screenshot
(docs/images/comfyui_demo_digits.png: workflows/demo_digits_t2i.json after a run in the page), and
the template thumbnails (workflows/NAME.jpg, see thumbnails.py).
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess

import pytest

from helpers import API_WORKFLOWS, PACK_NAME, REPO, TEST_WORKFLOWS, WORKFLOWS, load, ui_twin
from thumbnails import compose, grid, templates

BROWSER_DIR = os.path.join(REPO, "tests", "browser")
ARTIFACTS = os.path.join(REPO, "tests", "artifacts")


def _drive(comfy, mode: str, config: dict, tmp_path, timeout: int = 420) -> dict:
    if not os.path.isfile(os.path.join(BROWSER_DIR, "node_modules", "playwright-core", "package.json")) \
            or not os.path.exists("/usr/bin/chromium"):
        pytest.fail("chromium / playwright-core missing: run `bash scripts/setup_comfyui.sh`")
    cfg_path = tmp_path / f"{mode}.json"
    cfg_path.write_text(json.dumps({"url": comfy.url, **config}))
    proc = subprocess.run(["node", "driver.mjs", mode, str(cfg_path)], cwd=BROWSER_DIR, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"browser driver failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


OK_COLOUR, WARNING_COLOUR = "#8fc", "#fb3"  # web/bitdance.js: the status line's colours


def _api_files():
    return sorted(glob.glob(os.path.join(API_WORKFLOWS, "*.api.json")))


def _pairs():
    return [(ui_twin(p), p) for p in _api_files()]


@pytest.mark.writer  # a tool, not a check: collected only with BITDANCE_WRITE_UI_WORKFLOWS=1 (see conftest)
def test_write_ui_workflows(comfy, upload_example, tmp_path):
    # the released names the workflows use, backed by the tiny fixtures, so every dropdown lists them
    bitdance = os.path.join(comfy.base, "models", "bitdance")
    made = [os.path.join(bitdance, "BitDance-ImageNet"), os.path.join(bitdance, "BitDance-Tokenizer"),
            os.path.join(bitdance, "UniWeTok")]
    for d in made:
        os.makedirs(d)
    os.symlink(os.path.join(bitdance, "imagenet-tiny-p4", "model.pt"), os.path.join(made[0], "BitDance_B_1x.pt"))
    os.symlink(os.path.join(bitdance, "ae-tiny", "ae.safetensors"), os.path.join(made[1], "ae_d16c32.safetensors"))
    os.symlink(os.path.join(bitdance, "ae-tiny", "ae_config.json"), os.path.join(made[1], "ae_d16c32_config.json"))
    os.symlink(os.path.join(bitdance, "uniwetok-tiny", "uniwetok.pt"), os.path.join(made[2], "uniwetok.pt"))
    os.symlink(os.path.join(bitdance, "uniwetok-tiny", "config.json"), os.path.join(made[2], "config.json"))
    # the community split files' names, backed by the tiny fp8 split files
    models = os.path.join(comfy.base, "models")
    for folder, community, tiny in (("diffusion_models", "BitDance_14B_MainModel_FP8", "tiny_fp8_main"),
                                    ("text_encoders", "BitDance_TextEncoder_FP8", "tiny_fp8_text_encoder"),
                                    ("vae", "BitDance_VAE_FP16", "tiny_fp8_vae")):
        link = os.path.join(models, folder, community + ".safetensors")
        os.symlink(os.path.join(models, folder, tiny + ".safetensors"), link)
        made.append(link)
    try:
        pairs = [[api, ui] for ui, api in _pairs()]
        pairs += [[p, p.replace(".api.json", ".json")] for p in sorted(glob.glob(os.path.join(TEST_WORKFLOWS, "*.api.json")))]
        out = _drive(comfy, "convert", {"convert": pairs}, tmp_path)
    finally:
        for d in made:
            shutil.rmtree(d) if os.path.isdir(d) and not os.path.islink(d) else os.remove(d)
    assert out["converted"] == len(pairs)


@pytest.mark.writer
def test_write_readme_screenshot(comfy, tmp_path):
    shot = os.path.join(REPO, "docs", "images", "comfyui_demo_digits.png")
    ui = os.path.join(WORKFLOWS, "demo_digits_t2i.json")
    # after the UI-format files (-k write runs both; this one needs the regenerated demo workflow)
    out = _drive(comfy, "shot", {"screenshot": shot, "run": ui}, tmp_path)
    assert not out["console_errors"], out["console_errors"]
    assert out["new_prompts"] == 1 and out["output"]["width"] > 0, out
    assert os.path.getsize(shot) > 10_000


@pytest.mark.writer
def test_write_template_thumbnails(comfy, tmp_path):
    """workflows/NAME.jpg: a demo workflow's own output (run here), another's graph as the UI draws it."""
    entries = templates()
    graphs = [[os.path.join(WORKFLOWS, e["name"] + ".json"), str(tmp_path / (e["name"] + ".png"))]
              for e in entries if not e["no_download"]]
    _drive(comfy, "graphs", {"graphs": graphs}, tmp_path)
    for e in entries:
        if e["no_download"]:
            entry = comfy.run(load(os.path.join(API_WORKFLOWS, e["name"] + ".api.json")))
            picture = grid([im for ims in comfy.images(entry).values() for im in ims])
        else:
            from PIL import Image

            picture = Image.open(tmp_path / (e["name"] + ".png"))
        compose(picture, e["description"], e["no_download"]).save(os.path.join(WORKFLOWS, e["name"] + ".jpg"),
                                                                  quality=90)


def test_browser(comfy, upload_example, tmp_path):
    os.makedirs(ARTIFACTS, exist_ok=True)
    shot = os.path.join(ARTIFACTS, "browser_tiny_t2i.png")
    if os.path.exists(shot):
        os.remove(shot)
    out = _drive(comfy, "test", {
        "screenshot": shot,
        "ui_workflows": [list(p) for p in _pairs()] + [[os.path.join(TEST_WORKFLOWS, f"{n}.json"),
                                                         os.path.join(TEST_WORKFLOWS, f"{n}.api.json")]
                                                        for n in ("tiny_t2i", "tiny_t2i_split")],
        "run": os.path.join(TEST_WORKFLOWS, "tiny_t2i.json"),
        "split_ui": os.path.join(TEST_WORKFLOWS, "tiny_t2i_split.json"),
        "demo_run": os.path.join(WORKFLOWS, "demo_digits_t2i.json"),
        "class_workflow": os.path.join(WORKFLOWS, "demo_digits_class.json"),
        "missing_model": os.path.join(WORKFLOWS, "bitdance_t2i_64x_1024.json"),
        "pack": PACK_NAME,
        "template_names": [os.path.basename(ui_twin(p))[:-5] for p in _api_files()],
    }, tmp_path)
    assert out["extension_loaded"], out
    assert not out["console_errors"], out["console_errors"]
    for path, diffs in out["ui_workflows"].items():
        assert diffs == [], f"{path}: the UI would queue something else than its API twin: {diffs}"
    web = out["web"]
    assert web["parallel_num"] == 16
    assert "512x512 · 64 AR steps" in web["presets"] and "1024x1024 · 256 AR steps" in web["presets"]
    assert web["after_preset"]["width"] == 512 and web["after_preset"]["height"] == 512
    assert web["after_preset"]["status"].startswith("64 AR steps")
    assert web["after_typing"] == {"preset": "custom", "status": "16 AR steps · 16 tokens per step"}
    assert web["preset_in_prompt"] is False
    # the split loader's model, read from its files' headers (16 tokens per step: the tiny fixture)
    split = out["split_web"]
    assert split["parallel_num"] == 16 and split["presets"] == web["presets"]
    assert split["status"] == "16 AR steps · 16 tokens per step"
    assert web["with_init"] == "continues init: its size (width/height unused)"
    assert web["after_init_removed"] == web["after_typing"]["status"]
    assert out["output"]["width"] == 256 and out["output"]["height"] == 256 and "/view?" in out["output"]["src"]
    assert out["new_prompts"] == 1
    assert os.path.getsize(shot) > 10_000
    for path, cut in out["cut_titles"].items():
        assert cut == [], f"{path}: titles cut off: {cut}"

    demo = out["demo"]
    assert demo["presets"][0] == [32, 32] and demo["presets"][-1] == [512, 512] and demo["colour"] == OK_COLOUR, demo
    pv = demo["preview"]
    assert demo["new_prompts"] == 1 and pv["previews"] >= 1, demo
    assert pv["preview"] == pv["output"] == [32, 32], pv  # the caption reads 32 x 32
    assert pv["mean_abs_diff"] < 8, pv  # the whole image (JPEG of the PNG output), not a partial one

    classes = out["classes"]
    assert classes["options"] == [str(i) for i in range(10)] and classes["value"] == "7", classes
    assert classes["colour"] == OK_COLOUR, classes
    assert classes["relabelled"] == "3" and classes["queued"] == "3", classes

    missing = out["missing"]
    assert missing["status"] == "model not on disk: BitDance-14B-64x" and missing["colour"] == WARNING_COLOUR, missing

    order = [t["name"] for t in out["templates"]]
    assert sorted(order) == sorted(os.path.basename(ui_twin(p))[:-5] for p in _api_files()), order
    assert order == [e["name"] for e in templates()], order  # demo workflows (no download) first
    assert all(t["width"] == 512 for t in out["templates"]), out["templates"]
    assert out["thumbnail_responses"] and all(st == 200 for st, _ in out["thumbnail_responses"]), out["thumbnail_responses"]


def _rgb(hex_colour: str) -> str:
    """'#8fc' -> 'rgb(136, 255, 204)', as getComputedStyle writes it."""
    h = hex_colour.lstrip("#")
    h = "".join(c * 2 for c in h) if len(h) == 3 else h
    return "rgb({}, {}, {})".format(*(int(h[i:i + 2], 16) for i in (0, 2, 4)))


def test_browser_vue_nodes(comfy, tmp_path):
    """The web extension under the frontend's Vue node renderer ("Nodes 2.0", Comfy.VueNodes.Enabled),
    which calls no onDrawForeground: the sampler's presets and the class list still follow the model
    (the extension's timer), the status line is a text widget shown on the page in its colours, a
    preset picked on the page sets the size, and neither the preset nor the status enters the prompt
    or the saved workflow."""
    os.makedirs(ARTIFACTS, exist_ok=True)
    shot = os.path.join(ARTIFACTS, "browser_vue_nodes.png")
    out = _drive(comfy, "vue", {
        "screenshot": shot,
        "vue_workflow": [os.path.join(TEST_WORKFLOWS, "tiny_t2i.json"), os.path.join(TEST_WORKFLOWS, "tiny_t2i.api.json")],
        "class_workflow": os.path.join(WORKFLOWS, "demo_digits_class.json"),
        "missing_model": os.path.join(WORKFLOWS, "bitdance_t2i_64x_1024.json"),
    }, tmp_path)
    assert not out["console_errors"], out["console_errors"]
    vue = out["vue"]
    assert vue["enabled"] is True
    first = vue["first"]
    assert first["shown"] and first["text"] == first["status"] == "16 AR steps · 16 tokens per step", first
    assert first["css_colour"] == _rgb(OK_COLOUR), first
    assert "512x512 · 64 AR steps" in vue["presets"] and vue["listed"] == ["custom", *vue["presets"]], vue["listed"]
    pick = vue["after_pick"]
    assert (pick["width"], pick["height"], pick["preset"]) == (512, 512, "512x512 · 64 AR steps") and pick["shown"], pick
    assert pick["text"] == "64 AR steps · 16 tokens per step", pick
    typed = vue["after_typing"]
    assert (typed["width"], typed["height"], typed["preset"]) == (256, 256, "custom") and typed["shown"], typed
    assert typed["text"] == "16 AR steps · 16 tokens per step", typed
    assert vue["prompt_diffs"] == [], vue["prompt_diffs"]
    assert vue["saved_widgets_values"] == vue["ui_widgets_values"], vue["saved_widgets_values"]
    classes = vue["classes"]
    assert classes["options"] == [str(i) for i in range(10)] and classes["text"] == "10 classes", classes
    assert classes["shown"] and classes["css_colour"] == _rgb(OK_COLOUR), classes
    missing = vue["missing"]
    assert missing["text"] == "model not on disk: BitDance-14B-64x" and missing["shown"], missing
    assert missing["css_colour"] == _rgb(WARNING_COLOUR), missing
    assert os.path.getsize(shot) > 10_000
