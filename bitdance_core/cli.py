"""The command line: `python -m bitdance_core {t2i,tokenizer,imagenet,demo,bench} ...`.

Array layouts: pixels .npy uint8 [B, H, W, 3] (the official conversion), tokens .npy float32 ±1
[B, C, h, w] (what a decoder takes).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

from .errors import BitDanceError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _device_dtype(args):
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise BitDanceError("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
    dtype = DTYPES[args.dtype]
    if dev == "cpu" and dtype == torch.float16:
        raise BitDanceError("--dtype float16 is not supported on the CPU; use float32 or bfloat16")
    return dev, dtype


def _progress(desc: str):
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

        from .images import output_paths

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


def _add_common(p, out=True):
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="compute dtype")
    if out:
        p.add_argument("--out", default=None, help="PNG path (IMG_0.png, IMG_1.png, ... for several images)")
        p.add_argument("--pixels-npy", default=None, help="pixels as uint8 [B, H, W, 3]")
        p.add_argument("--tokens-npy", default=None, help="bits as float32 ±1 [B, C, H/f, W/f]")


def cmd_t2i(args):
    from .fitting import load_planned, plan_for
    from .graphs import enable_compile, enable_graphs
    from .images import to_uint8
    from .t2i import describe_t2i

    info = describe_t2i(args.model)
    info.check_size(args.height, args.width)  # from the config files and tokenizer: before any weights are read
    dev, dtype = _device_dtype(args)
    # weights and offload for this size and batch, against the GPU's free memory (auto: as stored, no
    # offload, when that fits; on the CPU auto is always that)
    free = torch.cuda.mem_get_info(torch.device(dev))[0] if dev.startswith("cuda") else None
    decision = plan_for(args.model, free, device=dev, height=args.height, width=args.width, num_images=args.num_images,
                        cfg=args.cfg, dtype=dtype, weights=args.weights, offload=args.offload)
    print(f"[bitdance] {decision.summary()}", file=sys.stderr)
    if args.dry_run:
        print(f"[bitdance] {info.name}: {args.width}x{args.height} is {info.ar_steps(args.height, args.width)} "
              f"AR steps of {info.parallel_num} tokens; --dry-run: nothing loaded", file=sys.stderr)
        return
    pipe, _offload = load_planned(args.model, decision, dev, dtype=dtype, attention=args.attention)
    if args.graphs:
        enable_graphs(pipe)  # after the offload hooks; a no-op on the CPU
    if args.compile:
        enable_compile(pipe)  # GPU only
    start = time.perf_counter()
    bits = pipe.generate(pipe.encode_prompt(args.prompt, args.negative_prompt), args.height, args.width, args.steps,
                         args.cfg, args.num_images, args.seed, callback=_progress("blocks"))
    pixels = to_uint8(pipe.decode(bits)).numpy()
    n = args.num_images
    print(f"[bitdance] generated {n} image{'s' if n != 1 else ''} of {args.width}x{args.height} in "
          f"{time.perf_counter() - start:.2f} s (sampling and decoding)", file=sys.stderr)
    save_outputs(pixels, bits, args)


def cmd_tokenizer(args):
    from .autoencoder import load_autoencoder

    dev, dtype = _device_dtype(args)
    ae = load_autoencoder(args.model, device=dev, dtype=dtype)
    if args.action == "encode":
        img = _load_npy(args.image_npy, "image", ndim=4)
        bits = ae.encode(torch.from_numpy(img).to(dev))
        np.save(args.bits_npy, bits.float().cpu().numpy())
    else:
        bits = _load_npy(args.bits_npy, "bits", ndim=4)
        gen = torch.Generator(device=dev).manual_seed(args.seed)
        out = ae.decode(torch.from_numpy(bits).to(dev), generator=gen, chunk=args.chunk, tile=args.tile)
        np.save(args.pixels_npy, out.float().cpu().numpy())


def _load_npy(path, what, ndim):
    if not path or not os.path.isfile(path):
        raise BitDanceError(f"missing {what} file: {path}")
    arr = np.load(path, allow_pickle=False)
    if arr.ndim != ndim:
        raise BitDanceError(f"{path}: {what} must have {ndim} dimensions [B, C, H, W], got shape {list(arr.shape)}")
    return np.ascontiguousarray(arr.astype(np.float32))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bitdance_core", description="BitDance engine")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("t2i", help="text to image", formatter_class=ShowDefaults)
    p.add_argument("--model", required=True, help="model folder (official or diffusers layout)")
    p.add_argument("--prompt", required=True, help="what to draw")
    p.add_argument("--negative-prompt", default=None, help="replaces the official unconditional prompt")
    p.add_argument("--height", type=int, default=1024, help="px; a size the model makes (an error lists them)")
    p.add_argument("--width", type=int, default=1024, help="px")
    p.add_argument("--steps", type=int, default=50, help="diffusion-head steps per AR block")
    p.add_argument("--cfg", type=float, default=7.5, help="guidance scale (1 or less: no guidance)")
    p.add_argument("--num-images", type=int, default=1, help="images in the batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "flash"], help="attention kernels")
    p.add_argument("--weights", default="auto", choices=["auto", "as-is", "fp8"],
                   help="fp8: backbone and head linears in float8 (auto: fp8 only where as-is does not fit the GPU)")
    p.add_argument("--offload", default="auto", choices=["auto", "none", "stage", "stream"],
                   help="auto: the fastest mode that fits the GPU's free memory for this size and batch")
    p.add_argument("--graphs", action="store_true", help="CUDA graphs for the head's sampling loop and the block step")
    p.add_argument("--compile", action="store_true", help="torch.compile the head and the backbone (GPU)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the size against the model and print the memory plan (config files and tokenizer only), "
                        "then stop without loading the weights")
    _add_common(p)
    p.set_defaults(func=cmd_t2i)

    p = sub.add_parser("tokenizer", help="binary tokenizer encode / decode", formatter_class=ShowDefaults)
    p.add_argument("action", choices=["encode", "decode"])
    p.add_argument("--model", required=True, help="folder with ae_config.json + ae.safetensors, or an ae_*.safetensors")
    p.add_argument("--image-npy", default=None)
    p.add_argument("--bits-npy", default=None)
    p.add_argument("--pixels-npy", default=None)
    p.add_argument("--seed", type=int, default=0, help="noise seed of GAN decoders")
    p.add_argument("--chunk", type=int, default=None, help="decode this many images at a time")
    p.add_argument("--tile", type=int, default=None, help="decode in tiles of about this many pixels a side (less memory)")
    _add_common(p, out=False)
    p.set_defaults(func=cmd_tokenizer)

    for register in _extra_commands():
        register(sub)
    return ap


def _extra_commands():
    """Subcommands that live beside their pipelines (imagenet, demo, bench), when present."""
    import importlib

    out = []
    for mod in ("imagenet_cli", "demo_cli", "bench"):
        try:
            m = importlib.import_module(f"{__package__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{mod}":
                raise
            continue
        out.append(m.register)
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except BitDanceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
