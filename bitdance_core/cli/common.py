"""What the engine's commands share: device and dtype, a progress bar, writing the outputs, reading .npy inputs
(and checking images and bits), the benchmarks' JSON-lines records.

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

from ..errors import BitDanceError, require
from . import options

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def native_bf16(dev: str) -> bool:
    """Whether this CUDA GPU computes in bf16 natively (compute capability 8.0, Ampere, or newer); not
    torch.cuda.is_bf16_supported(), which says yes to emulated bf16 on older GPUs."""
    return torch.cuda.get_device_properties(torch.device(dev)).major >= 8


def device_dtype(args):
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise BitDanceError("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
    index = torch.device(dev).index
    if index is not None and index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise BitDanceError(f"--device {dev}: this machine has {n} CUDA GPU{'s' if n != 1 else ''} "
                            f"(cuda:0{f' to cuda:{n - 1}' if n > 1 else ''})")
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


def require_outputs(args, what: str = "--out FILE.png, --pixels-npy or --tokens-npy") -> None:
    """A generating command with nothing to write would sample and keep nothing: refused before it starts."""
    require(args.out or getattr(args, "pixels_npy", None) or getattr(args, "tokens_npy", None),
            f"nothing would be kept: give {what} (where to write the result)")


def make_parent(path: str | None) -> None:
    if path and os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)  # e.g. out/seven.png in a fresh checkout


def save_outputs(pixels_u8: np.ndarray, bits: torch.Tensor, args) -> None:
    for path in (args.pixels_npy, args.tokens_npy, args.out):
        make_parent(path)
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
    p.add_argument("--device", type=options.device, default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="compute dtype; auto: bfloat16 on a GPU that has it (the official dtype), else float32")
    if out:  # at least one of the three is needed
        p.add_argument("--out", type=options.image_file, default=None,
                       help="PNG path (IMG_0.png, IMG_1.png, ... for several images; .png added when it has no "
                            "extension; another image extension, e.g. .jpg, writes that format)")
        p.add_argument("--pixels-npy", default=None, help="pixels as uint8 [B, H, W, 3]")
        p.add_argument("--tokens-npy", default=None, help="bits as float32 ±1 [B, C, H/f, W/f]")


def read_npy(path: str | None, option: str) -> np.ndarray:
    """The array of an .npy file given as `option` (e.g. "--bits-npy"): numbers only, never unpickled."""
    if not path or not os.path.isfile(path):
        raise BitDanceError(f"missing {option} file: {path}")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        why = "it holds pickled data or an object array, which are never loaded" if "pickle" in str(e) else str(e)
        raise BitDanceError(f"{option} {path}: not an .npy array of numbers as np.save writes one ({why})") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive
        arr.close()
        raise BitDanceError(f"{option} {path}: an .npz archive; give one array as an .npy file (np.save)")
    if arr.dtype.kind not in "biuf":
        raise BitDanceError(f"{option} {path}: holds {arr.dtype} values; expected numbers")
    return arr


def _values(arr: np.ndarray) -> str:
    """What an array holds, for an error: its dtype, shape and value range."""
    if arr.size == 0:
        return f"an empty {arr.dtype} array of shape {list(arr.shape)}"
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        return f"{arr.dtype} {list(arr.shape)} with NaN or infinite values"
    lo, hi = (float(arr.min()), float(arr.max())) if arr.dtype.kind == "f" else (int(arr.min()), int(arr.max()))
    return f"{arr.dtype} {list(arr.shape)} with values {lo:g}..{hi:g}"


def read_image_npy(path: str | None, option: str = "--image-npy") -> np.ndarray:
    """Images to encode: float [B, 3, H, W] in [-1, 1], as float32 (a pixels array, uint8 [B, H, W, 3], is
    refused with the conversion)."""
    arr = read_npy(path, option)
    channels_last = arr.ndim == 4 and arr.shape[1] != 3 and arr.shape[3] == 3
    in_range = (arr.dtype.kind == "f" and arr.size > 0 and bool(np.isfinite(arr).all())
                and arr.min() >= -1 and arr.max() <= 1)
    if arr.ndim != 4 or channels_last or not in_range:
        fix = "x"
        if channels_last:
            fix += ".transpose(0, 3, 1, 2)"
        if arr.size and np.isfinite(arr).all() and arr.min() >= 0 and 1 < arr.max() <= 255:
            fix += " / 127.5 - 1"  # 0..255 pixels
        hint = f": convert with {fix}" if fix != "x" else ""
        raise BitDanceError(f"{option} {path}: images must be float [B, 3, H, W] with values in [-1, 1]; got "
                            f"{_values(arr)}{hint}")
    return np.ascontiguousarray(arr.astype(np.float32))


def read_bits_npy(path: str | None, option: str = "--bits-npy") -> np.ndarray:
    """Bits to decode: ±1 [B, C, h, w] (0 where a sampler's torch.sign met an exact 0, rarely), as float32."""
    arr = read_npy(path, option)
    values = set(np.unique(arr).tolist())
    signs = bool(values) and values <= {-1, 0, 1} and (0 not in values or -1 in values)  # no -1 at all: 0/1 bits
    if not (arr.ndim == 4 and arr.dtype.kind in "fi" and signs):
        hint = ": 0/1 bits? convert with 2 * b - 1" if values and values <= {0, 1} else ""
        raise BitDanceError(f"{option} {path}: bits must be ±1 float [B, C, h, w] (as `tokenizer encode` and "
                            f"--tokens-npy write them); got {_values(arr)}{hint}")
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
