"""`python -m bitdance_core imagenet ...`: class-conditional generation with a released ImageNet checkpoint."""
from __future__ import annotations

from . import continuation, options
from .common import add_common, device_dtype, progress, require_outputs, save_outputs


def cmd_imagenet(args):
    from ..pipelines.imagenet import load_imagenet
    from ..pipelines.imagenet_classes import parse_classes
    from ..pipelines.images import to_uint8

    require_outputs(args)
    dev, dtype = device_dtype(args)
    parse_classes(args.classes, None)  # a misspelt name is refused before the checkpoint loads
    init = continuation.Init(args)
    pipe = load_imagenet(args.checkpoint, vae=args.vae, config=args.config, device=dev, dtype=dtype)
    init_bits = keep = None
    if init:
        classes = parse_classes(args.classes, pipe.num_classes, allow_null=True)
        init_bits, keep = continuation.inputs(args, pipe.block_grid(), init.encode(pipe.autoencoder, dev), len(classes))
    bits = pipe.generate(args.classes, steps=args.steps, cfg=args.cfg, cfg_schedule=args.cfg_schedule, seed=args.seed,
                         callback=progress("steps"), init_bits=init_bits, keep=keep)
    pixels = pipe.decode(bits, tile=args.decode_tile)
    save_outputs(to_uint8(pixels).numpy(), bits, args)


def register(sub) -> None:
    p = sub.add_parser("imagenet", help="ImageNet class-conditional generation (BitDance-B/L/H, 1x/4x/16x)")
    p.add_argument("--checkpoint", required=True, help="BitDance_*.pt (or a .safetensors re-save of its state dict)")
    p.add_argument("--vae", default=None, help="tokenizer: ae_d16c32.pt, BitDance-Tokenizer's ae_d16c32.safetensors or a tokenizer folder; default: the vae.* weights in the checkpoint")
    p.add_argument("--config", default=None, help="JSON with the model's constructor arguments (default: config.json "
                   "beside the checkpoint if present, else read from the tensor shapes)")
    p.add_argument("--classes", required=True, help="comma-separated class ids or ImageNet names, e.g. 3,7 or 'goldfish,207'")
    p.add_argument("--steps", type=options.positive_int, default=100, help="diffusion-head steps per token (official: 100)")
    p.add_argument("--cfg", type=options.non_negative_float, default=None,
                   help="guidance scale (default: the model's README value, e.g. 3.2 for B-1x)")
    p.add_argument("--cfg-schedule", default="linear", choices=["linear", "constant"])
    p.add_argument("--seed", type=options.seed, default=0,
                   help="means what torch.manual_seed(SEED) before the official model.sample means")
    p.add_argument("--decode-tile", type=options.tile_pixels, default=None,
                   help="decode in tiles of this many pixels (approximate, less memory); 0 or unset: no tiling")
    continuation.add_options(p)
    add_common(p)
    p.set_defaults(func=cmd_imagenet)
