"""UniWeTok checkpoints in the real ComfyUI: listed by the Tokenizer Loader, Encode / Decode equal to the
engine (bits identical, pixels), tiled decoding, and the refusals (another tokenizer's bits, a size that
is not a multiple of 32). Runs for every uniwetok* fixture conftest placed in models/bitdance/."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import bitdance_core as bd
from helpers import UNIWETOK

SEED = 1234


def _error(comfy, entry) -> dict:
    errs = comfy.messages(entry, "execution_error")
    assert errs, entry["status"]
    return errs[0]


def _input_png(comfy, fx_dir: str, name: str) -> str:
    """The fixture's first input image as an 8-bit PNG in the server's input/ folder."""
    img = torch.from_numpy(np.load(os.path.join(fx_dir, "input_image.npy")))[:1]
    Image.fromarray(bd.to_uint8(img)[0].numpy()).save(os.path.join(comfy.base, "input", name))
    return name


def _roundtrip(tokenizer: str, image: str, tile: int = 0, seed: int = SEED, width: int | None = None,
               height: int | None = None) -> dict:
    wf = {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "BitDanceTokenizerLoader", "inputs": {"tokenizer": tokenizer, "dtype": "fp32"}},
        "3": {"class_type": "BitDanceEncode", "inputs": {"tokenizer": ["2", 0], "image": ["1", 0]}},
        "4": {"class_type": "BitDanceDecode", "inputs": {"tokenizer": ["2", 0], "bits": ["3", 0], "gan_seed": seed,
                                                        "images_at_once": 0, "tile": tile}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "uniwetok"}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": "latents/uniwetok"}},
    }
    if width is not None:
        wf["7"] = {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "nearest-exact",
                                                          "width": width, "height": height, "crop": "disabled"}}
        wf["3"]["inputs"]["image"] = ["7", 0]
    return wf


def _saved_bits(comfy, entry) -> torch.Tensor:
    (saved,) = entry["outputs"]["6"]["latents"]
    return load_file(os.path.join(comfy.base, "output", saved["subfolder"], saved["filename"]))["latent_tensor"]


def test_every_uniwetok_fixture_is_placed():
    assert "uniwetok-tiny" in UNIWETOK


def test_tokenizer_loader_lists_uniwetok_checkpoints(comfy):
    info = comfy.get("/object_info/BitDanceTokenizerLoader")["BitDanceTokenizerLoader"]
    opts = info["input"]["required"]["tokenizer"][1]["options"]
    for name in UNIWETOK:
        assert f"{name}/uniwetok.pt" in opts
    assert "ae-tiny" in opts
    assert not any(o.startswith("imagenet-tiny-p4/") for o in opts)  # ImageNet .pt files are not tokenizers


@pytest.mark.parametrize("name", UNIWETOK)
def test_roundtrip_equals_the_engine(comfy, fixtures_dir, name):
    fx = os.path.join(fixtures_dir, name)
    png = _input_png(comfy, fx, f"{name}.png")
    entry = comfy.run(_roundtrip(f"{name}/uniwetok.pt", png))
    (out,) = [im for ims in comfy.images(entry).values() for im in ims]
    bits = _saved_bits(comfy, entry)

    tok = bd.load_tokenizer(os.path.join(fx, "uniwetok.pt"))
    pixels = bd.from_unit_hwc(torch.from_numpy(np.asarray(Image.open(os.path.join(comfy.base, "input", png)).convert("RGB"))
                                               .astype(np.float32) / 255.0)[None])
    want_bits = tok.encode(pixels)
    assert torch.equal(bits, want_bits), f"{int((bits != want_bits).sum())} bits differ from the engine"
    want = bd.to_uint8(tok.decode(want_bits, generator=torch.Generator().manual_seed(SEED)))[0].numpy()
    got = np.asarray(out.convert("RGB"))
    assert got.shape == want.shape == (pixels.shape[2], pixels.shape[3], 3)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1

    # tiled: the same image up to rounding; another seed: another image
    tiled = comfy.run(_roundtrip(f"{name}/uniwetok.pt", png, tile=32))
    (t,) = [im for ims in comfy.images(tiled).values() for im in ims]
    assert np.abs(np.asarray(t.convert("RGB")).astype(int) - got.astype(int)).max() <= 1
    other = comfy.run(_roundtrip(f"{name}/uniwetok.pt", png, seed=SEED + 1))
    (o,) = [im for ims in comfy.images(other).values() for im in ims]
    assert np.abs(np.asarray(o.convert("RGB")).astype(int) - got.astype(int)).max() > 1


def test_bits_of_another_tokenizer_are_refused(comfy, fixtures_dir):
    png = _input_png(comfy, os.path.join(fixtures_dir, "uniwetok-tiny"), "uniwetok-tiny.png")
    wf = _roundtrip("uniwetok-tiny/uniwetok.pt", png)
    wf["8"] = {"class_type": "BitDanceTokenizerLoader", "inputs": {"tokenizer": "ae-tiny", "dtype": "fp32"}}
    wf["4"]["inputs"]["tokenizer"] = ["8", 0]  # UniWeTok bits into the BitDance tokenizer
    err = _error(comfy, comfy.wait(comfy.queue_prompt(wf)))
    msg = err["exception_message"]
    assert err["node_type"] == "BitDanceDecode" and "uniwetok-z32-f32" in msg and "bitdance-z32-f16" in msg, msg

    wf = _roundtrip("ae-tiny", png)
    wf["8"] = {"class_type": "BitDanceTokenizerLoader", "inputs": {"tokenizer": "uniwetok-tiny/uniwetok.pt", "dtype": "fp32"}}
    wf["4"]["inputs"]["tokenizer"] = ["8", 0]  # BitDance bits into UniWeTok
    err = _error(comfy, comfy.wait(comfy.queue_prompt(wf)))
    msg = err["exception_message"]
    assert err["node_type"] == "BitDanceDecode" and "made for tokenizer 'bitdance-z32-f16'" in msg, msg


def test_encode_refuses_a_size_not_a_multiple_of_32(comfy, fixtures_dir):
    png = _input_png(comfy, os.path.join(fixtures_dir, "uniwetok-tiny"), "uniwetok-tiny.png")
    wf = _roundtrip("uniwetok-tiny/uniwetok.pt", png, width=100, height=64)
    err = _error(comfy, comfy.wait(comfy.queue_prompt(wf)))
    msg = err["exception_message"]
    assert err["node_type"] == "BitDanceEncode" and "image size 64x100" in msg and "nearest valid size is 64x96" in msg, msg
