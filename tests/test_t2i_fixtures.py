"""The official text-to-image fixtures, reproduced through the CLI on the CPU in float32."""
import json
import os

import numpy as np
import pytest

from paths import compare_with_official, fixture_dirs, fixture_tokens_raster, run_cli

CASES = [(fx, c) for fx in fixture_dirs("t2i-") for c in sorted(os.listdir(fx))
         if os.path.isfile(os.path.join(fx, c, "params.json"))]


@pytest.mark.parametrize("fixture,case", CASES, ids=[f"{os.path.basename(f)}/{c}" for f, c in CASES])
def test_t2i_fixture_through_cli(fixture, case, tmp_path):
    p = json.load(open(os.path.join(fixture, case, "params.json")))
    pix, tok = tmp_path / "p.npy", tmp_path / "t.npy"
    r = run_cli("t2i", "--model", os.path.join(fixture, "model"), "--prompt", p["prompt"],
                "--height", str(p["height"]), "--width", str(p["width"]), "--steps", str(p["num_sampling_steps"]),
                "--cfg", str(p["guidance_scale"]), "--num-images", str(p["num_images"]), "--seed", str(p["seed"]),
                "--device", "cpu", "--dtype", "float32", "--pixels-npy", str(pix), "--tokens-npy", str(tok),
                "--out", str(tmp_path / "img.png"))
    assert r.returncode == 0, r.stderr[-3000:]
    ref_tokens = fixture_tokens_raster(os.path.join(fixture, case))
    diff = compare_with_official(tok, ref_tokens, pix, os.path.join(fixture, case, "image.npy"))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.001, f"max {diff.max()}, {(diff > 0).sum()} values off"
    n = p["num_images"]
    pngs = [tmp_path / "img.png"] if n == 1 else [tmp_path / f"img_{i}.png" for i in range(n)]
    assert all(f.is_file() for f in pngs)
    assert "blocks" in r.stderr  # the progress bar


def test_cli_reports_bad_size_clearly(tmp_path):
    fx = fixture_dirs("t2i-tiny-p16")[0]
    r = run_cli("t2i", "--model", os.path.join(fx, "model"), "--prompt", "a cat", "--height", "100", "--width", "256",
                "--steps", "2", "--cfg", "1", "--num-images", "1", "--seed", "0", "--device", "cpu",
                "--tokens-npy", str(tmp_path / "never-written.npy"))
    assert r.returncode == 2
    assert "height 100" in r.stderr and "multiple of 64" in r.stderr


@pytest.mark.parametrize("options,decision", [
    (["--offload", "stream", "--graphs"], "weights as-is, offload stream (1 resident layer)"),
    (["--offload", "stage"], "weights as-is, offload stage"),
])
def test_cli_memory_options_keep_the_official_tokens(options, decision, tmp_path):
    """--weights/--offload (planned for this size and batch) and --graphs (a no-op without CUDA)
    change where the weights live, not the arithmetic: the official tokens, bit for bit."""
    fixture, case = CASES[0]
    p = json.load(open(os.path.join(fixture, case, "params.json")))
    tok = tmp_path / "t.npy"
    r = run_cli("t2i", "--model", os.path.join(fixture, "model"), "--prompt", p["prompt"],
                "--height", str(p["height"]), "--width", str(p["width"]), "--steps", str(p["num_sampling_steps"]),
                "--cfg", str(p["guidance_scale"]), "--num-images", str(p["num_images"]), "--seed", str(p["seed"]),
                "--device", "cpu", "--dtype", "float32", "--tokens-npy", str(tok), *options)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"[bitdance] {decision}" in r.stderr and f"planned for {p['width']}x{p['height']}" in r.stderr, r.stderr[-2000:]
    assert np.array_equal(np.load(tok), fixture_tokens_raster(os.path.join(fixture, case)))


def test_cli_fp8_weights_make_an_image(tmp_path):
    fx = fixture_dirs("t2i-tiny-p16")[0]
    r = run_cli("t2i", "--model", os.path.join(fx, "model"), "--prompt", "a cat", "--height", "128", "--width", "128",
                "--steps", "2", "--cfg", "4", "--seed", "0", "--device", "cpu", "--weights", "fp8",
                "--pixels-npy", str(tmp_path / "p.npy"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[bitdance] weights fp8, offload none" in r.stderr
    pixels = np.load(tmp_path / "p.npy")
    assert pixels.shape == (1, 128, 128, 3) and pixels.std() > 1.0
