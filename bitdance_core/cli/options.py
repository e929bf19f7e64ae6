"""Option values checked as argparse reads them (`type=` callables), so that a mistyped value is refused
before any file is read or any weights load: argparse prints one `error: argument --X: ...` line that
names the value and what would be right (and exits with status 2, as a BitDanceError does).
"""
from __future__ import annotations

import argparse
import io
import math
import os
import re

import torch

SEED_RANGE = (-2 ** 63, 2 ** 64 - 1)  # what torch.Generator.manual_seed takes
_ENGINE_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def _refuse(message: str):
    raise argparse.ArgumentTypeError(message)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        _refuse(f"{text!r} is not a whole number")


def device(text: str) -> str:
    """cpu, cuda or cuda:N: the devices the engine runs on (its memory planning, offload and generators
    know only those two)."""
    if _ENGINE_DEVICE.fullmatch(text):
        return text
    try:
        kind = torch.device(text).type
    except (RuntimeError, ValueError):
        _refuse(f"{text}: not a device; use cpu or cuda (cuda:N)")
    if kind == "cpu":
        _refuse(f"{text}: use cpu (the engine names the CPU without an index) or cuda (cuda:N)")
    _refuse(f"{text}: a torch device ({kind}) the engine does not run on; use cpu or cuda (cuda:N)")


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        _refuse(f"must be a whole number >= 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        _refuse(f"{text!r} is not a number")
    if not (math.isfinite(value) and value >= 0):
        _refuse(f"must be a number >= 0, got {text}")
    return value


def seed(text: str) -> int:
    value = _int(text)
    lo, hi = SEED_RANGE
    if not lo <= value <= hi:
        _refuse(f"{value} is out of range: a seed is a whole number from -2**63 to 2**64-1 (what "
                f"torch.Generator.manual_seed takes)")
    return value


def tile_pixels(text: str) -> int | None:
    """A decode's tile side in pixels; 0 means no tiling (as in ComfyUI's BitDance Decode node)."""
    value = _int(text)
    if value < 0:
        _refuse(f"must be a number of pixels >= 1, or 0 for a whole (untiled) decode; got {value}")
    return value or None


def images_at_once(text: str) -> int | None:
    """How many images a decode takes at a time; 0 means all at once (as in ComfyUI's BitDance Decode node)."""
    value = _int(text)
    if value < 0:
        _refuse(f"must be a number of images >= 1, or 0 for all at once; got {value}")
    return value or None


def image_file(text: str) -> str:
    """An image file to write: its extension names a format PIL writes RGB images in; none means PNG
    (`.png` is added, as for the numbered files of several images)."""
    from PIL import Image

    if text.endswith(("/", os.sep)) or os.path.isdir(text):
        _refuse(f"{text} is a folder; give an image file name, e.g. {os.path.join(text, 'image.png')}")
    ext = os.path.splitext(text)[1]
    if not ext:
        return text + ".png"
    fmt = Image.registered_extensions().get(ext.lower())
    if fmt is None or fmt not in Image.SAVE:
        _refuse(f"{text}: '{ext}' is not an image extension PIL writes; use .png (or .jpg, .webp, ...)")
    try:
        Image.new("RGB", (1, 1)).save(io.BytesIO(), format=fmt)
    except (OSError, ValueError, KeyError) as e:
        _refuse(f"{text}: PIL cannot write RGB images as {fmt} ({e}); use .png (or .jpg, .webp, ...)")
    return text


def model_folder(text: str) -> str:
    """A text-to-image model folder; a file given instead is named as one (a missing path is left to
    the loader, which says what it expected)."""
    if not os.path.isfile(text):
        return text
    ext = os.path.splitext(text)[1].lower()
    if ext in (".pt", ".pth", ".ckpt"):
        _refuse(f"{text} is a file, not a model folder; for a class-conditional ImageNet checkpoint use "
                f"`python -m bitdance_core imagenet --checkpoint {text}`")
    if ext == ".json":
        _refuse(f"{text} is a file, not a model folder; give the folder that holds it: "
                f"{os.path.dirname(text) or '.'}")
    _refuse(f"{text} is a file, not a model folder; give the folder with config.json (official layout) or "
            f"text_encoder/config.json (diffusers layout)")
