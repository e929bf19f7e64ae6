"""What the engine's commands share: device and dtype, a progress bar, writing the outputs, reading .npy inputs,
the benchmarks' JSON-lines records.

Array layouts: pixels .npy uint8 [B, H, W, 3] (the official conversion), tokens .npy float32 ±1
[B, C, h, w] (what a decoder takes).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

from ..errors import BitDanceError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def native_bf16(dev: str) -> bool:
    """Whether this CUDA GPU computes in bf16 natively (compute capability 8.0, Ampere, or newer); not
    torch.cuda.is_bf16_supported(), which says yes to emulated bf16 on older GPUs."""
    return torch.cuda.get_device_properties(torch.device(dev)).major >= 8


def device_dtype(args):
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise BitDanceError("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
    if args.dtype == "auto":  # the official dtype where the GPU has it; float32 elsewhere (never float16: see README)
        dtype = torch.bfloat16 if dev.startswith("cuda") and native_bf16(dev) else torch.float32
    else:
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
    for path in (args.pixels_npy, args.tokens_npy, args.out):
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)  # e.g. out/seven.png in a fresh checkout
    if args.pixels_npy:
        np.save(args.pixels_npy, pixels_u8)
    if args.tokens_npy:
        np.save(args.tokens_npy, bits.cpu().numpy().astype(np.float32))
    if args.out:
        from PIL import Image

        from ..pipelines.images import output_paths

        for img, path in zip(pixels_u8, output_paths(args.out, len(pixels_u8))):
            Image.fromarray(img).save(path)
            print(path)


class ShowDefaults(argparse.HelpFormatter):
    """--help shows each option's default, where it has one (not for required or on/off options)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not any(action.default is v for v in (None, False, argparse.SUPPRESS)) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def add_common(p, out=True):
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="compute dtype; auto: bfloat16 on a GPU that has it (the official dtype), else float32")
    if out:
        p.add_argument("--out", default=None, help="PNG path (IMG_0.png, IMG_1.png, ... for several images)")
        p.add_argument("--pixels-npy", default=None, help="pixels as uint8 [B, H, W, 3]")
        p.add_argument("--tokens-npy", default=None, help="bits as float32 ±1 [B, C, H/f, W/f]")


def load_npy(path, what, ndim):
    if not path or not os.path.isfile(path):
        raise BitDanceError(f"missing {what} file: {path}")
    arr = np.load(path, allow_pickle=False)
    if arr.ndim != ndim:
        raise BitDanceError(f"{path}: {what} must have {ndim} dimensions [B, C, H, W], got shape {list(arr.shape)}")
    return np.ascontiguousarray(arr.astype(np.float32))


class JsonlRecords:
    """A benchmark's records: each is the run's `common` fields plus its own, kept in `.records`,
    appended to the JSON-lines file `jsonl` as it comes (a run cut short by its timeout keeps what
    finished) and handed to `emit` (the printed progress)."""

    def __init__(self, common: dict, jsonl: str | None = None, emit=None):
        self.common, self.jsonl, self.emit, self.records = common, jsonl, emit, []

    def __call__(self, r: dict) -> None:
        r = {**self.common, **r}
        self.records.append(r)
        if self.jsonl:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(r) + "\n")
        if self.emit:
            self.emit(r)
