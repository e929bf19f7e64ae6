"""`python -m bitdance_core tokenizer encode|decode ...`: a binary tokenizer on .npy arrays."""
from __future__ import annotations

import numpy as np
import torch

from .common import ShowDefaults, add_common, device_dtype, load_npy


def cmd_tokenizer(args):
    from ..pipelines.tokenizers import load_tokenizer

    dev, dtype = device_dtype(args)
    ae = load_tokenizer(args.model, device=dev, dtype=dtype)
    if args.action == "encode":
        img = load_npy(args.image_npy, "image", ndim=4)
        bits = ae.encode(torch.from_numpy(img).to(dev))
        np.save(args.bits_npy, bits.float().cpu().numpy())
    else:
        bits = load_npy(args.bits_npy, "bits", ndim=4)
        # on the CPU this draws what torch.manual_seed(seed) right before the official decode draws
        gen = torch.Generator(device=dev).manual_seed(args.seed)
        out = ae.decode(torch.from_numpy(bits).to(dev), generator=gen, chunk=args.chunk, tile=args.tile)
        np.save(args.pixels_npy, out.float().cpu().numpy())


def register(sub) -> None:
    p = sub.add_parser("tokenizer", help="binary tokenizer encode / decode", formatter_class=ShowDefaults)
    p.add_argument("action", choices=["encode", "decode"])
    p.add_argument("--model", required=True, help="folder with ae_config.json + ae.safetensors, an ae_*.safetensors / "
                                                 "ae_*.pt, or a UniWeTok .pt (its ddconfig in <stem>_config.json or "
                                                 "config.json beside it, else read from the shapes)")
    p.add_argument("--image-npy", default=None)
    p.add_argument("--bits-npy", default=None)
    p.add_argument("--pixels-npy", default=None)
    p.add_argument("--seed", type=int, default=0, help="noise seed of GAN decoders (d32 tokenizers, UniWeTok): "
                                                         "on the CPU the same as torch.manual_seed(SEED) before the official decode")
    p.add_argument("--chunk", type=int, default=None, help="decode this many images at a time")
    p.add_argument("--tile", type=int, default=None, help="decode in tiles of about this many pixels a side (less memory)")
    add_common(p, out=False)
    p.set_defaults(dtype="float32")  # the tokens of an encode are signs: float32 keeps them the official ones
    p.set_defaults(func=cmd_tokenizer)
