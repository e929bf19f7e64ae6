"""In a real browser (Debian chromium driven by playwright-core, tests/browser/driver.mjs).

- every UI-format workflow in workflows/ loads as a dropped file does (app.loadGraphData) and the
  page would queue exactly its API-format twin;
- the tiny UI workflow is loaded, the web extension's size presets follow the model (entries,
  AR step counts, selecting one sets width/height, not sent to the server), it is queued from the
  page and the output image appears on its Save Image node; a screenshot is kept in tests/artifacts/.

`BITDANCE_WRITE_UI_WORKFLOWS=1 pytest tests/comfyui/test_browser.py -k write` regenerates the
UI-format files from the API-format ones through the real frontend, and the README's screenshot
(docs/images/comfyui_demo_digits.png: workflows/demo_digits_t2i.json after a run in the page).
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess

import pytest

from helpers import API_WORKFLOWS, REPO, TEST_WORKFLOWS, WORKFLOWS, ui_twin

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


def _pairs():
    return [(ui_twin(p), p) for p in sorted(glob.glob(os.path.join(API_WORKFLOWS, "*.api.json")))]


@pytest.mark.writer  # a tool, not a check: collected only with BITDANCE_WRITE_UI_WORKFLOWS=1 (see conftest)
def test_write_ui_workflows(comfy, upload_example, tmp_path):
    # the released names the workflows use, backed by the tiny fixtures, so every dropdown lists them
    bitdance = os.path.join(comfy.base, "models", "bitdance")
    made = [os.path.join(bitdance, "BitDance-ImageNet"), os.path.join(bitdance, "BitDance-Tokenizer")]
    os.makedirs(made[0])
    os.makedirs(made[1])
    os.symlink(os.path.join(bitdance, "imagenet-tiny-p4", "model.pt"), os.path.join(made[0], "BitDance_B_1x.pt"))
    os.symlink(os.path.join(bitdance, "ae-tiny", "ae.safetensors"), os.path.join(made[1], "ae_d16c32.safetensors"))
    os.symlink(os.path.join(bitdance, "ae-tiny", "ae_config.json"), os.path.join(made[1], "ae_d16c32_config.json"))
    try:
        pairs = [[api, ui] for ui, api in _pairs()]
        pairs += [[p, p.replace(".api.json", ".json")] for p in sorted(glob.glob(os.path.join(TEST_WORKFLOWS, "*.api.json")))]
        out = _drive(comfy, "convert", {"convert": pairs}, tmp_path)
    finally:
        for d in made:
            shutil.rmtree(d)
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


def test_browser(comfy, upload_example, tmp_path):
    os.makedirs(ARTIFACTS, exist_ok=True)
    shot = os.path.join(ARTIFACTS, "browser_tiny_t2i.png")
    if os.path.exists(shot):
        os.remove(shot)
    out = _drive(comfy, "test", {
        "screenshot": shot,
        "ui_workflows": [list(p) for p in _pairs()] + [[os.path.join(TEST_WORKFLOWS, "tiny_t2i.json"),
                                                         os.path.join(TEST_WORKFLOWS, "tiny_t2i.api.json")]],
        "run": os.path.join(TEST_WORKFLOWS, "tiny_t2i.json"),
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
    assert web["with_init"] == "continues init: its size (width/height unused)"
    assert web["after_init_removed"] == web["after_typing"]["status"]
    assert out["output"]["width"] == 256 and out["output"]["height"] == 256 and "/view?" in out["output"]["src"]
    assert out["new_prompts"] == 1
    assert os.path.getsize(shot) > 10_000
