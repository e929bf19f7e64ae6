"""Issue 2's benchmark: batched guidance against separate guidance passes, same engine, same run.

A mid-size random model (Qwen3 8 layers x 512, head 3 x 512, parallel 64, 512x512, 20 steps, cfg 4),
no download. Prints both times (generation only: the decode is the same in both modes) and
naive / batched. Usage: python benchmarks/bench_cfg.py [--device cuda] [--repeat 2] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bitdance_core.cli.bench import BenchConfig, format_report, run_bench  # noqa: E402
from bitdance_core.cli.synthetic import SHAPES  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if a.device.startswith("cuda") else torch.float32)
    cfg = BenchConfig(shape=SHAPES["mid"], device=a.device, dtype=dtype, graphs="off", decode=False, repeat=a.repeat,
                      threads=a.threads, extra={"shape_name": "mid"})
    r = run_bench(cfg)
    if a.json:
        print(json.dumps(r, indent=1))
        return 0
    print(format_report(r))
    f, n = r["fast"]["generate_s"], r["naive"]["generate_s"]
    print(f"batched CFG: {f:.3f} s   separate passes: {n:.3f} s   ratio separate/batched: {n / f:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
