"""Continuing an image in a real ComfyUI: LoadImage (an RGBA PNG: its alpha is the mask editor's mask)
-> BitDance Encode -> SetLatentNoiseMask -> the samplers' init; BitDance Extend Canvas. Each result
equals the engine CLI's for the same image and blocks (pixels byte for byte)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from paths import run_cli

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "..",
                        "shared", "fixtures")
T2I = ("t2i-tiny-p16", "A red fox sitting in a snowy forest at sunrise")


def _rgba(comfy, name: str, size: int, hole) -> str:
    """A size x size PNG (a smooth picture) whose alpha is 0 in `hole` (rows, cols), as the mask editor
    saves a painted mask; put in the server's input/ folder."""
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([(x * 255) // size, (y * 255) // size, ((x + y) * 127) // size], -1).astype(np.uint8)
    alpha = np.full((size, size), 255, np.uint8)
    alpha[hole] = 0
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(os.path.join(comfy.base, "input", name))
    return os.path.join(comfy.base, "input", name)


def _one_image(comfy, entry):
    (imgs,) = comfy.images(entry).values()
    assert len(imgs) == 1
    return np.asarray(imgs[0].convert("RGB"))


def _t2i_graph(image: str, seed: int, tail: dict) -> dict:
    wf = {
        "1": {"class_type": "BitDanceModelLoader", "inputs": {"model": T2I[0], "dtype": "auto", "attention": "auto",
                                                               "download": False}},
        "2": {"class_type": "BitDanceTextEncode", "inputs": {"model": ["1", 0], "prompt": T2I[1], "negative_prompt": ""}},
        "3": {"class_type": "LoadImage", "inputs": {"image": image}},
        "4": {"class_type": "BitDanceEncode", "inputs": {"tokenizer": ["1", 1], "image": ["3", 0]}},
        "6": {"class_type": "BitDanceARSampler",
              "inputs": {"model": ["1", 0], "positive": ["2", 0], "width": 1024, "height": 1024, "steps": 3, "cfg": 4.0,
                         "seed": seed, "batch_size": 1, "sampler": "euler_maruyama", "init": ["5", 0]}},
        "7": {"class_type": "BitDanceDecode", "inputs": {"tokenizer": ["1", 1], "bits": ["6", 0], "images_at_once": 0,
                                                          "gan_seed": 0}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
    }
    wf.update(tail)
    return wf


def _cli_t2i(tmp_path, *options):
    out = tmp_path / "cli.npy"
    r = run_cli("t2i", "--model", os.path.join(FIXTURES, T2I[0], "model"), "--prompt", T2I[1], "--steps", "3",
                "--cfg", "4.0", "--device", "cpu", "--dtype", "float32", "--pixels-npy", str(out), *options)
    assert r.returncode == 0, r.stderr[-3000:]
    return np.load(out)[0]


def test_mask_editor_mask_through_set_latent_noise_mask_equals_the_cli(comfy, tmp_path):
    """The painted hole (alpha 0) touches blocks rows 2-3, columns 1-2 of the 4x4 grid of 64 px blocks:
    those are redrawn, the rest kept; the CLI told the same blocks gives the same image."""
    path = _rgba(comfy, "bd_masked.png", 256, (slice(150, 200), slice(70, 130)))
    wf = _t2i_graph("bd_masked.png", 11, {
        "5": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["4", 0], "mask": ["3", 1]}}})
    ours = _one_image(comfy, comfy.run(wf))
    assert ours.shape == (256, 256, 3)
    keep = np.ones((4, 4), dtype=bool)
    keep[2:4, 1:3] = False
    np.save(tmp_path / "keep.npy", keep)
    cli = _cli_t2i(tmp_path, "--init-image", path, "--keep-mask-npy", str(tmp_path / "keep.npy"), "--seed", "11")
    assert np.array_equal(ours, cli), f"{int((ours != cli).sum())} values differ from the CLI"
    # the redrawn blocks are new: the image differs from the input there, and another seed redraws them otherwise
    src = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert np.abs(ours[128:256, 64:192].astype(int) - src[128:256, 64:192]).mean() > 10
    wf["6"]["inputs"]["seed"] = 12
    other = _one_image(comfy, comfy.run(wf))
    assert not np.array_equal(other[128:256, 64:192], ours[128:256, 64:192])


def test_extend_canvas_outpaints_down_and_right_as_the_cli(comfy, tmp_path):
    path = _rgba(comfy, "bd_plain.png", 256, (slice(0, 0), slice(0, 0)))
    wf = _t2i_graph("bd_plain.png", 5, {
        "9": {"class_type": "BitDanceExtendCanvas", "inputs": {"tokenizer": ["1", 1], "bits": ["4", 0], "side": "bottom",
                                                               "pixels": 128}},
        "5": {"class_type": "BitDanceExtendCanvas", "inputs": {"tokenizer": ["1", 1], "bits": ["9", 0], "side": "right",
                                                               "pixels": 64}},
    })
    ours = _one_image(comfy, comfy.run(wf))
    assert ours.shape == (384, 320, 3)  # the sampler's own width/height (1024) are overridden by the init
    cli = _cli_t2i(tmp_path, "--init-image", path, "--height", "384", "--width", "320", "--seed", "5")
    assert np.array_equal(ours, cli), f"{int((ours != cli).sum())} values differ from the CLI"


def test_imagenet_class_sampler_init_equals_the_cli(comfy, tmp_path):
    path = _rgba(comfy, "bd_masked_256.png", 256, (slice(0, 256), slice(200, 256)))  # the right-most 56 px
    wf = {
        "1": {"class_type": "BitDanceImageNetLoader", "inputs": {"checkpoint": "imagenet-tiny-p4/model.pt",
                                                                 "vae": "imagenet-tiny-p4/vae.pt", "dtype": "auto"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "bd_masked_256.png"}},
        "4": {"class_type": "BitDanceEncode", "inputs": {"tokenizer": ["1", 1], "image": ["3", 0]}},
        "5": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["4", 0], "mask": ["3", 1]}},
        "6": {"class_type": "BitDanceImageNetSampler",
              "inputs": {"model": ["1", 0], "class_name": "3: tiger shark", "class_index": 7, "steps": 2, "cfg": 4.0,
                         "cfg_schedule": "linear", "seed": 3, "batch_size": 2, "init": ["5", 0]}},
        "7": {"class_type": "BitDanceDecode", "inputs": {"tokenizer": ["1", 1], "bits": ["6", 0], "images_at_once": 0,
                                                          "gan_seed": 0}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
    }
    (imgs,) = comfy.images(comfy.run(wf)).values()
    ours = np.stack([np.asarray(im.convert("RGB")) for im in imgs])
    keep = np.ones((8, 8), dtype=bool)
    keep[:, 6:] = False  # pixels 200..255: block columns 6 (192..223) and 7
    np.save(tmp_path / "keep.npy", keep)
    out = tmp_path / "cli.npy"
    fx = os.path.join(FIXTURES, "imagenet-tiny-p4")
    r = run_cli("imagenet", "--checkpoint", os.path.join(fx, "model.pt"), "--vae", os.path.join(fx, "vae.pt"),
                "--classes", "7,7", "--steps", "2", "--cfg", "4.0", "--seed", "3", "--device", "cpu",
                "--init-image", path, "--keep-mask-npy", str(tmp_path / "keep.npy"), "--pixels-npy", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    cli = np.load(out)
    assert ours.shape == cli.shape == (2, 256, 256, 3)
    assert np.array_equal(ours, cli), f"{int((ours != cli).sum())} values differ from the CLI"
    assert not np.array_equal(ours[0], ours[1])  # two images from one init: each its own noise


@pytest.mark.parametrize("case", ["no_mask", "mask_marks_nothing", "mask_does_not_fit", "other_tokenizer",
                                  "not_bitdance_bits", "size_the_model_cannot_make"])
def test_bad_init_is_a_clear_error(comfy, case):
    _rgba(comfy, "bd_plain.png", 256, (slice(0, 0), slice(0, 0)))
    _rgba(comfy, "bd_small.png", 96, (slice(0, 0), slice(0, 0)))
    wf = _t2i_graph("bd_small.png" if case == "size_the_model_cannot_make" else "bd_plain.png", 1, {
        "5": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["4", 0], "mask": ["10", 0]}},
        "10": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 256, "height": 256}}})
    if case == "no_mask":
        wf["6"]["inputs"]["init"] = ["4", 0]
    elif case == "mask_marks_nothing":  # e.g. LoadImage's mask of an image without alpha: all 0
        wf["10"]["inputs"].update(value=0.0)
    elif case == "mask_does_not_fit":
        wf["10"]["inputs"].update(width=64, height=128)
    elif case == "other_tokenizer":  # the digits demo model's tokenizer: 8x downsampling, not 16x
        wf["11"] = {"class_type": "BitDanceModelLoader", "inputs": {"model": "demo/digits-t2i", "dtype": "auto",
                                                                    "attention": "auto", "download": False}}
        wf["4"]["inputs"]["tokenizer"] = ["11", 1]
    elif case == "not_bitdance_bits":
        wf["4"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}}
    entry = comfy.wait(comfy.queue_prompt(wf))
    errs = comfy.messages(entry, "execution_error")
    assert errs, json.dumps(entry["status"])[:2000]
    msg = errs[0]["exception_message"]
    assert errs[0]["node_type"] == "BitDanceARSampler", errs[0]
    expected = {"no_mask": "init: this LATENT has no noise_mask",
                "mask_marks_nothing": "nothing to regenerate: every block of 256x256 px",
                "mask_does_not_fit": "noise mask: 64x128 does not fit the image, 256x256 px",
                "other_tokenizer": "init: these bits were made for tokenizer 'bitdance-z32-f8'",
                "not_bitdance_bits": "init: this LATENT was not made by a BitDance node",
                "size_the_model_cannot_make": "init: its size, 96x96 px, does not fit this model"}[case]
    assert expected in msg, msg
