"""`python -m bitdance_core tokenizer encode|decode ...`: a binary tokenizer on .npy arrays."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import require
from . import options
from .common import ShowDefaults, add_common, device_dtype, make_parent, read_bits_npy, read_image_npy

NEEDS = {"encode": {"--image-npy": "the images to encode", "--bits-npy": "where to write the bits"},
         "decode": {"--bits-npy": "the bits to decode", "--pixels-npy": "where to write the images"}}


def cmd_tokenizer(args):
    from ..pipelines.tokenizers import load_tokenizer

    for option, what in NEEDS[args.action].items():  # the arguments first: nothing is read before they are right
        require(getattr(args, option[2:].replace("-", "_")), f"tokenizer {args.action} needs {option}: {what}")
    inputs = read_image_npy(args.image_npy) if args.action == "encode" else read_bits_npy(args.bits_npy)
    dev, dtype = device_dtype(args)
    ae = load_tokenizer(args.model, device=dev, dtype=dtype)
    if args.action == "encode":
        bits = ae.encode(torch.from_numpy(inputs).to(dev))
        make_parent(args.bits_npy)
        np.save(args.bits_npy, bits.float().cpu().numpy())
    else:
        # on the CPU this draws what torch.manual_seed(seed) right before the official decode draws
        gen = torch.Generator(device=dev).manual_seed(args.seed)
        out = ae.decode(torch.from_numpy(inputs).to(dev), generator=gen, chunk=args.chunk, tile=args.tile)
        make_parent(args.pixels_npy)
        np.save(args.pixels_npy, out.float().cpu().numpy())


def register(sub) -> None:
    p = sub.add_parser("tokenizer", help="binary tokenizer encode / decode", formatter_class=ShowDefaults)
    p.add_argument("action", choices=["encode", "decode"])
    p.add_argument("--model", required=True, help="folder with ae_config.json + ae.safetensors, an ae_*.safetensors / "
                                                 "ae_*.pt, or a UniWeTok .pt (its ddconfig in <stem>_config.json or "
                                                 "config.json beside it, else read from the shapes)")
    p.add_argument("--image-npy", default=None, help="encode: images, float [B, 3, H, W] with values in [-1, 1] "
                                                     "(uint8 pixels p [B, H, W, 3]: p.transpose(0, 3, 1, 2) / 127.5 - 1)")
    p.add_argument("--bits-npy", default=None, help="encode writes, decode reads: bits, float32 ±1 [B, C, H/f, W/f]")
    p.add_argument("--pixels-npy", default=None, help="decode: images, float32 [B, 3, H, W] in about [-1, 1]")
    p.add_argument("--seed", type=options.seed, default=0, help="noise seed of GAN decoders (d32 tokenizers, UniWeTok): "
                                                                 "on the CPU the same as torch.manual_seed(SEED) before the official decode")
    p.add_argument("--chunk", type=options.images_at_once, default=None,
                   help="decode this many images at a time (0 or none: all at once)")
    p.add_argument("--tile", type=options.tile_pixels, default=None,
                   help="decode in tiles of about this many pixels a side (less memory); 0: no tiling")
    add_common(p, out=False)
    p.set_defaults(dtype="float32")  # the tokens of an encode are signs: float32 keeps them the official ones
    p.set_defaults(func=cmd_tokenizer)
