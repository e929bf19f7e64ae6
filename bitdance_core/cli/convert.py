"""`python -m bitdance_core convert --model DIR --weights 4bit [--out FILE]`: write a model folder's
4-bit backbone once (GGUF, Q4_0 linears), so that loading with weights=4bit reads 4-bit bytes instead
of quantising the released bf16 weights every time.

The loader (CLI `t2i`, the ComfyUI model loader) finds the file at `<model folder>/backbone-Q4_0.gguf`,
the default --out; the model's other files stay where they are.
"""
from __future__ import annotations

import os
import sys
import time

from ..errors import require


def cmd_convert(args):
    from ..pipelines.t2i_loading import read_t2i_configs
    from ..pipelines.t2i_q4 import q4_file, write_q4_backbone

    require(args.weights == "4bit", f"--weights {args.weights}: convert writes 4-bit files only ('4bit')")
    configs = read_t2i_configs(args.model)
    out = args.out or q4_file(configs.path)
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        sys.stderr.write(f"\rquantising the backbone to 4 bits: {done}/{total} tensors")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()
    write_q4_backbone(configs, out, progress)
    print(out)
    where = ("the loader reads it from there" if os.path.realpath(out) == os.path.realpath(q4_file(configs.path))
             else f"the loader reads {q4_file(configs.path)}: move it there to use it")
    print(f"[bitdance] wrote {os.path.getsize(out) / 2**30:.2f} GiB in {time.perf_counter() - start:.0f} s; {where}",
          file=sys.stderr)


def register(sub) -> None:
    p = sub.add_parser("convert", help="write a model folder's 4-bit backbone file once (GGUF Q4_0)")
    p.add_argument("--model", required=True, help="text-to-image model folder (official or diffusers layout)")
    p.add_argument("--weights", required=True, choices=["4bit"], help="the format to write")
    p.add_argument("--out", default=None, help="default: <model>/backbone-Q4_0.gguf, where the loader looks")
    p.set_defaults(func=cmd_convert)
