"""The options of `t2i` and `imagenet` that continue an image: --init-tokens-npy / --init-image, and
--keep-rows / --keep-mask-npy (pipelines/continuation.py does the arithmetic).

An init smaller than the generation sits in its top-left corner: the rest is outpainted (kept by
default: every block inside the init).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from ..errors import BitDanceError, require
from ..pipelines import continuation
from ..pipelines.images import from_unit_hwc
from .common import read_bits_npy, read_npy


def add_options(p) -> None:
    g = p.add_argument_group("continue an image (keep some blocks, generate the rest)")
    init = g.add_mutually_exclusive_group()
    init.add_argument("--init-tokens-npy", default=None,
                      help="bits to continue: float32 ±1 [B, C, H/16, W/16], as --tokens-npy writes (one image is "
                           "used for every image generated)")
    init.add_argument("--init-image", default=None, help="an image to continue (PNG), encoded with the model's tokenizer")
    keep = g.add_mutually_exclusive_group()
    keep.add_argument("--keep-rows", type=int, default=None,
                      help="keep this many latent rows from the top (a multiple of the block side) and redraw the rest")
    keep.add_argument("--keep-mask-npy", default=None,
                      help="bool [rows, cols] of blocks (latent / block side), True = keep")


class Init:
    """The init given on the command line: bits (tokens) or pixels [1, 3, H, W] in [-1, 1] (image)."""

    def __init__(self, args):
        self.path, self.bits, self.pixels = None, None, None
        if args.init_tokens_npy:
            self.path = args.init_tokens_npy
            arr = read_bits_npy(self.path, "--init-tokens-npy")
            self.bits = torch.from_numpy(arr)
        elif args.init_image:
            self.path = args.init_image
            self.pixels = read_image(self.path)
        elif args.keep_rows is not None or args.keep_mask_npy:
            raise BitDanceError("--keep-rows / --keep-mask-npy need the image to continue: give --init-tokens-npy or --init-image")

    def __bool__(self) -> bool:
        return self.path is not None

    def size(self, downsample: int) -> tuple[int, int]:
        """(height, width) in pixels."""
        if self.bits is not None:
            return self.bits.shape[2] * downsample, self.bits.shape[3] * downsample
        return self.pixels.shape[2], self.pixels.shape[3]

    def encode(self, autoencoder, device) -> torch.Tensor:
        if self.bits is not None:
            return self.bits
        h, w = self.pixels.shape[2:]
        f = autoencoder.downsample
        require(h % f == 0 and w % f == 0, f"--init-image {self.path} is {w}x{h}: its sides must divide by the "
                                           f"tokenizer's factor {f}")
        return autoencoder.encode(self.pixels.to(device)).to("cpu", torch.float32)


def read_image(path: str) -> torch.Tensor:
    """A PNG (or any image PIL reads) as RGB pixels [1, 3, H, W] in [-1, 1] (as ComfyUI's LoadImage
    and BitDance Encode see it): turned as its EXIF orientation says (a phone photo stands as shown),
    16-bit grayscale scaled from 0..65535 (an RGB conversion would clip it to white)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not os.path.isfile(path):
        raise BitDanceError(f"missing --init-image file: {path}")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode == "F":
                raise BitDanceError(f"--init-image {path}: a 32-bit float image; save it as an 8- or 16-bit PNG")
            if im.mode.startswith("I"):  # 16-bit grayscale (PIL's "I;16*" modes, or "I" from older PIL)
                gray = np.asarray(im).astype(np.float32) / 65535.0
                unit = np.repeat(np.clip(gray, 0.0, 1.0)[..., None], 3, axis=-1)
            else:
                unit = np.asarray(im.convert("RGB")).astype(np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise BitDanceError(f"--init-image {path}: not an image PIL can read ({e})") from e
    return from_unit_hwc(torch.from_numpy(unit)[None])


def inputs(args, grid: continuation.BlockGrid, bits: torch.Tensor, num_images: int):
    """(init_bits, keep) for generate(): the init on the generation's grid (outpainted to it when
    smaller) and the blocks to keep, from --keep-rows / --keep-mask-npy or the init's own area."""
    f = grid.downsample
    h, w = bits.shape[2], bits.shape[3]
    require(h <= grid.lat_h and w <= grid.lat_w,
            f"the init ({w * f}x{h * f} px) is larger than the generation, {grid.describe()}")
    regen = None
    if h < grid.lat_h:
        bits, regen = continuation.extend_canvas(bits, regen, "bottom", grid.lat_h - h)
    if w < grid.lat_w:
        bits, regen = continuation.extend_canvas(bits, regen, "right", grid.lat_w - w)
    if args.keep_rows is not None:
        keep = continuation.keep_rows(grid, args.keep_rows)
    elif args.keep_mask_npy:
        keep = read_npy(args.keep_mask_npy, "--keep-mask-npy")
        require(keep.ndim in (2, 3), f"--keep-mask-npy {args.keep_mask_npy}: expected bool [{grid.rows}, {grid.cols}] "
                                     f"(True = keep) for {grid.describe()}, got shape {list(keep.shape)}")
    elif regen is not None:
        keep = continuation.keep_from_noise_mask(grid, regen, bits.shape[0])
    else:
        bigger = ("a larger --height/--width to outpaint" if hasattr(args, "height")  # t2i; imagenet has one size
                  else f"an init smaller than the model's {grid.lat_w * f}x{grid.lat_h * f} px to outpaint the rest")
        raise BitDanceError(f"nothing to regenerate: give --keep-rows or --keep-mask-npy (the blocks to keep), or {bigger}")
    return bits, keep
