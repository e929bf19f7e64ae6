"""What the engine's commands share: device and dtype, a progress bar, writing the outputs, reading .npy inputs.

Array layouts: pixels .npy uint8 [B, H, W, 3] (the official conversion), tokens .npy float32 ±1
[B, C, h, w] (what a decoder takes).
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch

from ..errors import BitDanceError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device_dtype(args):
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise BitDanceError("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
    dtype = DTYPES[args.dtype]
    if dev == "cpu" and dtype == torch.float16:
        raise BitDanceError("--dtype float16 is not supported on the CPU; use float32 or bfloat16")
    return dev, dtype


def progress(desc: str):
    """A small stderr progress bar as a pipeline callback."""
    def cb(step, total, _bits):
        n = 30 * (step + 1) // total
        sys.stderr.write(f"\r{desc} [{'#' * n}{'.' * (30 - n)}] {step + 1}/{total}")
        if step + 1 == total:
            sys.stderr.write("\n")
        sys.stderr.flush()
    return cb


def save_outputs(pixels_u8: np.ndarray, bits: torch.Tensor, args) -> None:
    if args.pixels_npy:
        np.save(args.pixels_npy, pixels_u8)
    if args.tokens_npy:
        np.save(args.tokens_npy, bits.cpu().numpy().astype(np.float32))
    if args.out:
        from PIL import Image

        stem, ext = os.path.splitext(args.out)
        for i, img in enumerate(pixels_u8):
            path = args.out if len(pixels_u8) == 1 else f"{stem}_{i}{ext or '.png'}"
            Image.fromarray(img).save(path)
            print(path)


def add_common(p, out=True):
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    if out:
        p.add_argument("--out", default=None, help="PNG path (IMG_0.png, IMG_1.png, ... for several images)")
        p.add_argument("--pixels-npy", default=None)
        p.add_argument("--tokens-npy", default=None)


def load_npy(path, what, ndim):
    if not path or not os.path.isfile(path):
        raise BitDanceError(f"missing {what} file: {path}")
    arr = np.load(path, allow_pickle=False)
    if arr.ndim != ndim:
        raise BitDanceError(f"{path}: {what} must have {ndim} dimensions [B, C, H, W], got shape {list(arr.shape)}")
    return np.ascontiguousarray(arr.astype(np.float32))
