"""The command line: `python -m bitdance_core {t2i,tokenizer,imagenet,demo,bench,bench-sweep,bench-gemm,eval-generate,convert} ...`.

Each command lives in its own module with a `register(subparsers)`; see common.py for the array layouts.
"""
from __future__ import annotations

import argparse
import sys

from ..errors import BitDanceError
from . import bench, bench_gemm, bench_sweep, convert, demo, eval_generate, imagenet, t2i, tokenizer

COMMANDS = (t2i, tokenizer, imagenet, demo, bench, bench_sweep, bench_gemm, eval_generate, convert)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bitdance_core", description="BitDance engine")
    sub = ap.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except BitDanceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
