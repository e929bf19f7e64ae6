"""`python -m bitdance_core t2i ...`: text to image with a model folder (official or diffusers layout),
and the loading options it shares with eval-generate."""
from __future__ import annotations

import sys
import time

import torch

from ..errors import BitDanceError
from . import continuation, options
from .common import ShowDefaults, add_common, device_dtype, progress, require_outputs, save_outputs


def add_t2i_load_options(p) -> None:
    """How a text-to-image model is loaded and accelerated (t2i, eval-generate)."""
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "flash"], help="attention kernels")
    p.add_argument("--weights", default="auto", choices=["auto", "as-is", "fp8", "4bit"],
                   help="fp8: backbone and head linears in float8; 4bit: backbone linears GGUF Q4_0 (from "
                        "<model>/backbone-Q4_0.gguf, see `convert`, or quantised on load), head fp8. auto: the first of "
                        "as-is, fp8, 4bit that fits the GPU without offloading, then 4bit with offloading")
    p.add_argument("--offload", default="auto", choices=["auto", "none", "stage", "stream"],
                   help="auto: the fastest mode that fits the GPU's free memory for this size and batch")
    p.add_argument("--graphs", action="store_true", help="CUDA graphs for the head's sampling loop and the block step")
    p.add_argument("--compile", action="store_true", help="torch.compile the head and the backbone (GPU)")


def device_free_bytes(dev: str) -> int | None:
    """The free memory of a CUDA device (None on the CPU: nothing is planned against it there)."""
    return torch.cuda.mem_get_info(torch.device(dev))[0] if dev.startswith("cuda") else None


def plan_t2i_load(args, dev: str, dtype, height: int, width: int, num_images: int, cfg: float, log_prefix: str = "",
                  source=None, free_bytes: int | None = None):
    """The weights/offload decision for `args.weights`/`args.offload` (see add_t2i_load_options), planned
    for this size and batch against the device's free memory (or `free_bytes`), printed to stderr.
    source: the model's configs when already read (default: read from args.model)."""
    from ..runtime.fitting import plan_for

    # auto: as stored, no offload, when that fits; on the CPU auto is always that
    free = device_free_bytes(dev) if free_bytes is None else free_bytes
    decision = plan_for(source if source is not None else args.model, free, device=dev, height=height, width=width, num_images=num_images, cfg=cfg,
                        dtype=dtype, weights=args.weights, offload=args.offload)
    print(f"{log_prefix}[bitdance] {decision.summary()}", file=sys.stderr)
    return decision


def load_t2i_as_planned(args, decision, dev: str, dtype):
    """The pipeline loaded as `decision` says, with --graphs / --compile applied."""
    from ..runtime.fitting import load_planned
    from ..runtime.graphs import enable_compile, enable_graphs

    pipe, _offload = load_planned(args.model, decision, dev, dtype=dtype, attention=args.attention)
    if args.graphs:
        enable_graphs(pipe)  # after the offload hooks; a no-op on the CPU
    if args.compile:
        enable_compile(pipe)  # GPU only
    return pipe


def cmd_t2i(args):
    from ..pipelines.images import to_uint8
    from ..pipelines.t2i_loading import describe_t2i, read_t2i_configs

    if not args.dry_run:
        require_outputs(args)
    configs = read_t2i_configs(args.model)  # each config file read once for the whole command
    info = describe_t2i(configs)
    init = continuation.Init(args)
    ih, iw = init.size(info.downsample) if init else (1024, 1024)  # the size defaults to the init's
    args.height = ih if args.height is None else args.height
    args.width = iw if args.width is None else args.width
    try:
        info.check_size(args.height, args.width)  # from the config files and tokenizer: before any weights are read
    except BitDanceError as e:
        if init:  # the size may have come from the init: say so
            raise BitDanceError(f"{init.path} ({args.width}x{args.height} px) does not fit this model: {e}") from e
        raise
    dev, dtype = device_dtype(args)
    decision = plan_t2i_load(args, dev, dtype, args.height, args.width, args.num_images, args.cfg, source=configs)
    if args.dry_run:
        print(f"[bitdance] {info.name}: {args.width}x{args.height} is {info.ar_steps(args.height, args.width)} "
              f"AR steps of {info.parallel_num} tokens; --dry-run: nothing loaded", file=sys.stderr)
        return
    pipe = load_t2i_as_planned(args, decision, dev, dtype)
    init_bits = keep = None
    if init:
        grid = pipe.block_grid(args.height, args.width)
        init_bits, keep = continuation.inputs(args, grid, init.encode(pipe.autoencoder, dev), args.num_images)
    start = time.perf_counter()
    bits = pipe.generate(pipe.encode_prompt(args.prompt, args.negative_prompt), args.height, args.width, args.steps,
                         args.cfg, args.num_images, args.seed, callback=progress("blocks"), init_bits=init_bits,
                         keep=keep)
    pixels = to_uint8(pipe.decode(bits)).numpy()
    n = args.num_images
    print(f"[bitdance] generated {n} image{'s' if n != 1 else ''} of {args.width}x{args.height} in "
          f"{time.perf_counter() - start:.2f} s (sampling and decoding)", file=sys.stderr)
    save_outputs(pixels, bits, args)


def register(sub) -> None:
    p = sub.add_parser("t2i", help="text to image", formatter_class=ShowDefaults)
    p.add_argument("--model", type=options.model_folder, required=True, help="model folder (official or diffusers layout)")
    p.add_argument("--prompt", required=True, help="what to draw")
    p.add_argument("--negative-prompt", default=None, help="replaces the official unconditional prompt")
    p.add_argument("--height", type=options.positive_int, default=None,
                   help="px; a size the model makes, an error lists them (default: 1024), or the init's with --init-*")
    p.add_argument("--width", type=options.positive_int, default=None,
                   help="px (default: 1024), or the init's with --init-*")
    p.add_argument("--steps", type=options.positive_int, default=50, help="diffusion-head steps per AR block")
    p.add_argument("--cfg", type=options.non_negative_float, default=7.5, help="guidance scale (1 or less: no guidance)")
    p.add_argument("--num-images", type=options.positive_int, default=1, help="images in the batch")
    p.add_argument("--seed", type=options.seed, default=0, help="seed of the sampling noise")
    add_t2i_load_options(p)
    continuation.add_options(p)
    p.add_argument("--dry-run", action="store_true",
                   help="check the size against the model and print the memory plan (config files and tokenizer only), "
                        "then stop without loading the weights")
    add_common(p)
    p.set_defaults(func=cmd_t2i)
