"""The digits demo models: official layouts, size, strict loading, and real quality.

Quality: an SVM trained on scikit-learn's real digits must recognise what the models draw
(class-conditional at its default guidance: >= 90% overall, >= 70% for every digit; text-to-image:
>= 80% overall; text-to-image with fp8 or 4-bit weights: >= 95% overall, >= 80% for every digit). The tokenizer's round-trip PSNR on held-out digits is printed and bounded below.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from paths import REPO

from bitdance_core import demo_models as dm
from bitdance_core.pipelines.tokenizers import load_autoencoder
from bitdance_core.formats.checkpoints import load_pt
from bitdance_core.train import data
from bitdance_core.train.evaluate import describe, recognition
from bitdance_core.train.tokenizer import roundtrip_psnr

PER_CLASS = 20
T2I_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "ae_config.json",
             "ae.safetensors", "vision_head_config.json", "vision_head.safetensors", "projector.safetensors"]


def demo_cli(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "bitdance_core", "demo", *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def classifier():
    return data.digit_classifier(dm.SIZE)


def test_files_are_official_layouts_and_small():
    t2i = [os.path.join(dm.T2I, f) for f in T2I_FILES]
    assert all(os.path.isfile(f) for f in t2i), [f for f in t2i if not os.path.isfile(f)]
    cc_cfg = os.path.join(os.path.dirname(dm.IMAGENET), "config.json")
    total = sum(os.path.getsize(f) for f in t2i + [dm.IMAGENET, cc_cfg])
    print(f"\ndemo models: {total / 1e6:.2f} MB")
    assert total <= 15e6
    ckpt = load_pt(dm.IMAGENET)
    assert list(ckpt) == ["ema"], "the released ImageNet .pt layout: {'ema': state_dict}"
    assert any(k.startswith("vae.encoder.") for k in ckpt["ema"]) and any(k.startswith("vae.decoder.") for k in ckpt["ema"])
    kwargs = json.load(open(cc_cfg))["kwargs"]
    assert kwargs["num_classes"] == 10 and kwargs["resolution"] == dm.SIZE
    # One tokenizer for both models: the ImageNet vae.* are the T2I ae.safetensors.
    ae = load_autoencoder(dm.T2I)
    for k, v in ae.state_dict().items():
        assert torch.equal(ckpt["ema"]["vae." + k], v), k
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(dm.T2I, "tokenizer.json"))
    side = dm.SIZE // ae.downsample
    for t in ["<|im_start|>", "<|im_end|>", "<|vision_start|>", f"<|res_{side}|>", "<|query_1|>", "<|query_3|>"]:
        assert tok.token_to_id(t) is not None, t
    assert tok.encode("<|im_start|>user\n", add_special_tokens=False).ids[0] == tok.token_to_id("<|im_start|>")


def test_tokenizer_roundtrip_psnr():
    images, labels = data.load_digits_8x8()
    (train, _), (held, _) = data.split(images, labels)
    ae = load_autoencoder(dm.T2I)
    held_psnr = roundtrip_psnr(ae, data.to_pixels(torch.from_numpy(held), dm.SIZE))
    train_psnr = roundtrip_psnr(ae, data.to_pixels(torch.from_numpy(train[:300]), dm.SIZE))
    print(f"\ntokenizer round-trip PSNR: held-out digits {held_psnr:.2f} dB ({len(held)} images), training digits {train_psnr:.2f} dB")
    assert held_psnr >= 23.0


def test_class_conditional_model_draws_recognisable_digits(tmp_path, classifier):
    out = tmp_path / "cc.npy"
    demo_cli("--per-class", str(PER_CLASS), "--seed", "0", "--pixels-npy", str(out))
    px = np.load(out)
    assert px.dtype == np.uint8 and px.shape == (10 * PER_CLASS, dm.SIZE, dm.SIZE, 3)
    r = recognition(px, PER_CLASS, classifier)
    print(f"\nclass-conditional, default guidance: {describe(r)}")
    assert r["overall"] >= 0.90 and r["worst"] >= 0.70, describe(r)
    assert len({a.tobytes() for a in px}) == len(px), "every image is different"


def test_text_to_image_model_draws_recognisable_digits(tmp_path, classifier):
    out = tmp_path / "t2i.npy"
    demo_cli("--t2i", "--per-class", str(PER_CLASS), "--seed", "0", "--pixels-npy", str(out))
    px = np.load(out)
    assert px.dtype == np.uint8 and px.shape == (10 * PER_CLASS, dm.SIZE, dm.SIZE, 3)
    r = recognition(px, PER_CLASS, classifier)
    print(f"\ntext-to-image, 'a handwritten digit <name>': {describe(r)}")
    assert r["overall"] >= 0.80, describe(r)


@pytest.mark.parametrize("weights", ["fp8", "4bit"])
def test_text_to_image_model_draws_its_digits_with_smaller_weights(tmp_path, classifier, weights):
    """fp8: backbone and head linears in float8; 4bit: backbone linears GGUF Q4_0 (quantised on load), head fp8."""
    out = tmp_path / f"t2i_{weights}.npy"
    demo_cli("--t2i", "--weights", weights, "--per-class", str(PER_CLASS), "--seed", "0", "--pixels-npy", str(out))
    px = np.load(out)
    assert px.dtype == np.uint8 and px.shape == (10 * PER_CLASS, dm.SIZE, dm.SIZE, 3)
    r = recognition(px, PER_CLASS, classifier)
    print(f"\ntext-to-image, {weights} weights: {describe(r)}")
    assert r["overall"] >= 0.95 and r["worst"] >= 0.80, describe(r)


def test_demo_weights_apply_to_the_text_to_image_model_only(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "bitdance_core", "demo", "--weights", "4bit", "--per-class", "1",
                        "--pixels-npy", str(tmp_path / "x.npy")], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "--weights 4bit applies to the text-to-image demo model (--t2i)" in r.stderr


def test_demo_cli_is_deterministic_and_ordered(tmp_path):
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    demo_cli("--per-class", "2", "--seed", "5", "--pixels-npy", str(a), "--out", str(tmp_path / "grid.png"))
    demo_cli("--per-class", "2", "--seed", "5", "--pixels-npy", str(b))
    assert np.array_equal(np.load(a), np.load(b))
    assert (tmp_path / "grid.png").is_file()
