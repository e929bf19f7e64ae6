"""`python -m bitdance_core demo [--t2i] [--weights as-is|fp8|4bit] --per-class K --seed S --pixels-npy OUT.npy`:
the digits demo models.

Writes uint8 [10*K, 32, 32, 3], classes 0..9 in order, K images each: the class-conditional model
(ImageNet format) by default, the text-to-image model ("a handwritten digit seven") with --t2i, whose
weights may be loaded as fp8 or 4-bit (as the 14B models are) to see what those formats cost.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from . import options
from .common import device_dtype, make_parent, require_outputs
from ..errors import require


def generate_digits(t2i: bool, per_class: int, seed: int, steps: int | None = None, cfg: float | None = None,
                    device="cpu", dtype=torch.float32, model: str | None = None, weights: str = "as-is") -> np.ndarray:
    """uint8 [10*per_class, 32, 32, 3], digits 0..9 in order. model: another checkpoint of the same kind
    (default: the shipped demo model). weights: the text-to-image model's weights format (load_t2i)."""
    from .. import demo_models as dm
    from ..pipelines.images import to_uint8

    require(isinstance(per_class, int) and per_class >= 1, f"--per-class must be >= 1, got {per_class}")
    require(t2i or weights == "as-is", f"--weights {weights} applies to the text-to-image demo model (--t2i); "
                                       "the class-conditional one loads as stored")
    if t2i:
        from ..pipelines.t2i_loading import load_t2i

        pipe = load_t2i(model or dm.T2I, device=device, dtype=dtype, weights=weights)
        steps = dm.T2I_DEFAULTS["steps"] if steps is None else steps
        cfg = dm.T2I_DEFAULTS["cfg"] if cfg is None else cfg
        out = []
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not one of the official BitDance sizes.*")
            for d in range(10):
                bits = pipe.generate(dm.prompt(d), dm.SIZE, dm.SIZE, steps, cfg, num_images=per_class, seed=seed)
                out.append(to_uint8(pipe.decode(bits)))
        return torch.cat(out).numpy()
    from ..pipelines.imagenet import load_imagenet

    pipe = load_imagenet(model or dm.IMAGENET, device=device, dtype=dtype)
    classes = [d for d in range(10) for _ in range(per_class)]
    bits = pipe.generate(classes, steps=dm.IMAGENET_DEFAULTS["steps"] if steps is None else steps, cfg=cfg,
                         cfg_schedule=dm.IMAGENET_DEFAULTS["cfg_schedule"], seed=seed)
    return to_uint8(pipe.decode(bits)).numpy()


def grid(pixels: np.ndarray, per_class: int) -> np.ndarray:
    """[10*K, H, W, 3] -> one picture, a row per digit."""
    n, h, w, c = pixels.shape
    return pixels.reshape(10, per_class, h, w, c).transpose(0, 2, 1, 3, 4).reshape(10 * h, per_class * w, c)


def cmd_demo(args):
    require_outputs(args, "--out FILE.png or --pixels-npy")
    dev, dtype = device_dtype(args)
    pixels = generate_digits(args.t2i, args.per_class, args.seed, args.steps, args.cfg, dev, dtype,
                             weights=args.weights)
    for path in (args.pixels_npy, args.out):
        make_parent(path)
    if args.pixels_npy:
        np.save(args.pixels_npy, pixels)
    if args.out:
        from PIL import Image

        Image.fromarray(grid(pixels, args.per_class)).save(args.out)
        print(args.out)


def register(sub) -> None:
    p = sub.add_parser("demo", help="the digits demo models (trained BitDance that draws on a CPU)")
    p.add_argument("--t2i", action="store_true", help="the text-to-image model (default: the class-conditional one)")
    p.add_argument("--per-class", type=options.positive_int, default=4,
                   help="images per digit (output: 10*K images, digits 0..9 in order)")
    p.add_argument("--seed", type=options.seed, default=0)
    p.add_argument("--steps", type=options.positive_int, default=None, help="diffusion-head steps (default 50)")
    p.add_argument("--cfg", type=options.non_negative_float, default=None,
                   help="guidance scale (default: the class model's own default, 4.0 for the text-to-image model)")
    p.add_argument("--weights", default="as-is", choices=["as-is", "fp8", "4bit"],
                   help="with --t2i: as stored; fp8 (backbone and head linears); 4bit (backbone linears GGUF Q4_0 "
                        "quantised on load, head fp8)")
    p.add_argument("--device", type=options.device, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--pixels-npy", default=None, help="uint8 [10*K, 32, 32, 3]")
    p.add_argument("--out", type=options.image_file, default=None,
                   help="PNG: a grid with one row per digit (.png added when it has no extension)")
    p.set_defaults(func=cmd_demo)
