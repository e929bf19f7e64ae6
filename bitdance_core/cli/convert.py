"""`python -m bitdance_core convert (--model DIR | --text-encoder FILE) --weights 4bit [--out FILE]`: write
a model's 4-bit backbone once (GGUF, Q4_0 linears), so that loading with weights=4bit reads 4-bit bytes
instead of quantising the released weights every time.

The loaders find the file where this writes it by default:
- a model folder (CLI `t2i`, the ComfyUI Model Loader): `<model folder>/backbone-Q4_0.gguf`;
- the community's split text encoder (the Split Model Loader): `<text encoder stem>-Q4_0.gguf` beside it, in
  ComfyUI's models/text_encoders/.
The model's other files stay where they are.
"""
from __future__ import annotations

import functools
import os
import sys
import time

from ..errors import require
from . import options


def cmd_convert(args):
    from ..pipelines.comfy_split import split_q4_file, write_split_q4
    from ..pipelines.t2i_loading import read_t2i_configs
    from ..pipelines.t2i_q4 import q4_file, write_q4_backbone

    require(args.weights == "4bit", f"--weights {args.weights}: convert writes 4-bit files only ('4bit')")
    require((args.model is None) != (args.text_encoder is None),
            "give either --model (a model folder) or --text-encoder (a split text encoder file), not both")
    if args.model is not None:
        configs = read_t2i_configs(args.model)
        where_read, write = q4_file(configs.path), functools.partial(write_q4_backbone, configs)
    else:
        where_read, write = split_q4_file(args.text_encoder), functools.partial(write_split_q4, args.text_encoder)
    out = args.out or where_read
    if out.endswith(("/", os.sep)) or os.path.isdir(out):  # a folder: the file goes in it, under the name the loader reads
        out = os.path.join(out, os.path.basename(where_read))
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        sys.stderr.write(f"\rquantising the backbone to 4 bits: {done}/{total} tensors")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()
    write(out, progress)
    print(out)
    where = ("the loader reads it from there" if os.path.realpath(out) == os.path.realpath(where_read)
             else f"the loader reads {where_read}: move it there to use it")
    print(f"[bitdance] wrote {os.path.getsize(out) / 2**30:.2f} GiB in {time.perf_counter() - start:.0f} s; {where}",
          file=sys.stderr)


def register(sub) -> None:
    p = sub.add_parser("convert", help="write a model's 4-bit backbone file once (GGUF Q4_0)")
    p.add_argument("--model", type=options.model_folder, default=None,
                   help="text-to-image model folder (official or diffusers layout)")
    p.add_argument("--text-encoder", default=None,
                   help="or the community's split text encoder (e.g. BitDance_TextEncoder_FP8.safetensors)")
    p.add_argument("--weights", required=True, choices=["4bit"], help="the format to write")
    p.add_argument("--out", default=None, help="the file to write, or a folder to write it in (under the name the "
                                               "loader reads); default: where the loader looks: "
                                               "<model>/backbone-Q4_0.gguf, or <text encoder stem>-Q4_0.gguf beside "
                                               "the text encoder")
    p.set_defaults(func=cmd_convert)
