"""`python -m bitdance_core t2i ...`: text to image with a model folder (official or diffusers layout)."""
from __future__ import annotations

import sys

import torch

from ..errors import BitDanceError
from . import continuation
from .common import add_common, device_dtype, progress, save_outputs


def cmd_t2i(args):
    from ..pipelines.images import to_uint8
    from ..pipelines.t2i_loading import describe_t2i
    from ..runtime.fitting import load_planned, plan_for
    from ..runtime.graphs import enable_compile, enable_graphs

    dev, dtype = device_dtype(args)
    init = continuation.Init(args)
    if init:  # the size defaults to the init's
        ih, iw = init.size(describe_t2i(args.model).downsample)
        args.height, args.width = args.height or ih, args.width or iw
    args.height, args.width = args.height or 1024, args.width or 1024
    # weights and offload for this size and batch, against the GPU's free memory (auto: as stored, no
    # offload, when that fits; on the CPU auto is always that)
    free = torch.cuda.mem_get_info(torch.device(dev))[0] if dev.startswith("cuda") else None
    decision = plan_for(args.model, free, device=dev, height=args.height, width=args.width, num_images=args.num_images,
                        cfg=args.cfg, dtype=dtype, weights=args.weights, offload=args.offload)
    print(f"[bitdance] {decision.summary()}", file=sys.stderr)
    pipe, _offload = load_planned(args.model, decision, dev, dtype=dtype, attention=args.attention)
    if args.graphs:
        enable_graphs(pipe)  # after the offload hooks; a no-op on the CPU
    if args.compile:
        enable_compile(pipe)  # GPU only
    init_bits = keep = None
    if init:
        try:
            grid = pipe.block_grid(args.height, args.width)
        except BitDanceError as e:  # the size came from the init: say so
            raise BitDanceError(f"{init.path} ({args.width}x{args.height} px) does not fit this model: {e}") from e
        init_bits, keep = continuation.inputs(args, grid, init.encode(pipe.autoencoder, dev), args.num_images)
    bits = pipe.generate(pipe.encode_prompt(args.prompt, args.negative_prompt), args.height, args.width, args.steps,
                         args.cfg, args.num_images, args.seed, callback=progress("blocks"), init_bits=init_bits,
                         keep=keep)
    save_outputs(to_uint8(pipe.decode(bits)).numpy(), bits, args)


def register(sub) -> None:
    p = sub.add_parser("t2i", help="text to image")
    p.add_argument("--model", required=True, help="model folder (official or diffusers layout)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None, help="replaces the official unconditional prompt")
    p.add_argument("--height", type=int, default=None, help="pixels (default 1024, or the init's)")
    p.add_argument("--width", type=int, default=None, help="pixels (default 1024, or the init's)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "flash"])
    p.add_argument("--weights", default="auto", choices=["auto", "as-is", "fp8"],
                   help="fp8: backbone and head linears in float8 (auto: fp8 only where as-is does not fit the GPU)")
    p.add_argument("--offload", default="auto", choices=["auto", "none", "stage", "stream"],
                   help="auto: the fastest mode that fits the GPU's free memory for this size and batch")
    p.add_argument("--graphs", action="store_true", help="CUDA graphs for the head's sampling loop and the block step")
    p.add_argument("--compile", action="store_true", help="torch.compile the head and the backbone (GPU)")
    continuation.add_options(p)
    add_common(p)
    p.set_defaults(func=cmd_t2i)
