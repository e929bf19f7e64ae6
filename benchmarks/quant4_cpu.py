"""Issue 10's 4-bit comparison on the CPU: one linear at the 14B shapes, each candidate's speed, error and bytes.

Candidates (each skipped with a note when its package is not importable):
- bf16 / fp32 F.linear (the references) and the engine's fp8 linear (weight-only, widened per forward);
- GGUF Q4_0 and Q4_1 blocks, quantised by the `gguf` package, dequantised in torch per forward and
  multiplied with F.linear (what ComfyUI-GGUF does), and the engine's Q4Linear (Q4_0, the same idea
  in three elementwise passes: formats/q4.py);
- the same GGUF blocks through PyTorch's int4 weight-only kernel (`_weight_int4pack_mm_for_cpu`; on
  CUDA `_weight_int4pack_mm`, tinygemm): the blocks map onto its groups of 32 exactly;
- PyTorch's int4 kernel with groups of 128 and min/max parameters (torchao's tinygemm recipe);
- bitsandbytes nf4 (blocks of 64);
- torchao's Int4WeightOnlyConfig (tried; in 0.18 it has no CPU layout).

Usage: python benchmarks/quant4_cpu.py [--threads 1] [--repeat 5] [--rows 2 32 128] [--json OUT.json]
The results of issue 10 are in docs/quantization.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [(5120, 17408), (17408, 5120), (5120, 5120)]  # (in, out): MLP up/gate, MLP down, attention q/o


def weights(k: int, n: int, seed: int = 0) -> torch.Tensor:
    """[n, k] fp32, heavy-tailed like trained LLM weights (Student t, 5 degrees of freedom), std ~0.02."""
    t = torch.distributions.StudentT(5.0)
    torch.manual_seed(seed)
    return (t.sample((n, k)) * 0.02 / (5 / 3) ** 0.5).float()


def timed(fn, repeat: int) -> float:
    """Median CPU time of this thread per call (one torch thread: the work runs here). CPU time, not
    wall time, so that other processes on a shared machine do not count; memory-bandwidth
    contention still does."""
    fn()
    ts = []
    for _ in range(repeat):
        t = time.thread_time()
        fn()
        ts.append(time.thread_time() - t)
    return statistics.median(ts)


def gguf_dequant_torch(blocks: torch.Tensor, kind: str, n: int, k: int, dtype) -> torch.Tensor:
    """GGUF Q4_0/Q4_1 blocks [n, k/32*bytes] -> [n, k] in torch (ComfyUI-GGUF's arithmetic)."""
    per = 18 if kind == "Q4_0" else 20
    b = blocks.reshape(-1, per)
    d = b[:, :2].contiguous().view(torch.float16).to(dtype)
    if kind == "Q4_0":
        qs = b[:, 2:]
        m = None
    else:
        m = b[:, 2:4].contiguous().view(torch.float16).to(dtype)
        qs = b[:, 4:]
    q = torch.stack([qs & 0x0F, qs >> 4], dim=1).reshape(-1, 32)
    if kind == "Q4_0":
        w = (q.to(torch.int8) - 8).to(dtype) * d
    else:
        w = q.to(dtype) * d + m
    return w.reshape(n, k)


def gguf_to_int4pack(blocks, kind, n, k, dtype):
    """GGUF Q4_0/Q4_1 blocks -> (CPU int4pack weight, scales_and_zeros [k/32, n, 2]) with
    (q - 8) * scale + zero = the block's value."""
    per = 18 if kind == "Q4_0" else 20
    b = blocks.reshape(n, k // 32, per)
    d = b[..., :2].contiguous().view(torch.float16).float().squeeze(-1)
    if kind == "Q4_0":
        qs, zero = b[..., 2:], torch.zeros_like(d)
    else:
        m = b[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1)
        qs, zero = b[..., 4:], m + 8 * d
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(n, k).to(torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
    sz = torch.stack([d, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)
    return packed, sz


def minmax_int4(w: torch.Tensor, group: int, dtype):
    """torchao's tinygemm recipe: per group of `group` inputs, scale = (max-min)/15, zero = min + 8*scale."""
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    zero = lo + 8 * scale
    q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    deq = ((q.reshape(n, k // group, group).float() - 8) * scale[..., None] + zero[..., None]).reshape(n, k)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)
    return packed, sz, deq


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def run(rows, repeat, only=None):
    out, notes = [], []
    try:
        import gguf
    except ImportError:
        gguf = None
        notes.append("gguf not importable: GGUF rows skipped")
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except Exception as e:  # noqa: BLE001
        bnb = None
        notes.append(f"bitsandbytes not importable ({type(e).__name__}): nf4 rows skipped")
    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_
        lin = torch.nn.Linear(256, 128, bias=False).to(torch.bfloat16)
        quantize_(lin, Int4WeightOnlyConfig(group_size=128))
        lin(torch.randn(2, 256, dtype=torch.bfloat16))
    except Exception as e:  # noqa: BLE001
        notes.append(f"torchao Int4WeightOnlyConfig on the CPU: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    from bitdance_core.formats.fp8 import Fp8Linear
    from bitdance_core.formats.q4 import Q4Linear

    for k, n in SHAPES:
        if only and (k, n) not in only:
            continue
        w = weights(k, n)
        wb = w.to(torch.bfloat16)
        cands = {}  # name -> (bytes per parameter, dequantised weight fp32, {dtype: forward(x)})
        cands["bf16"] = (2.0, wb.float(), {torch.bfloat16: lambda x: F.linear(x, wb)})
        cands["fp32"] = (4.0, w, {torch.float32: lambda x: F.linear(x, w)})
        base = torch.nn.Linear(k, n, bias=False)
        base.weight.data = w.clone()
        f8 = Fp8Linear.from_linear(base)
        cands["fp8 e4m3 per-channel (engine)"] = (1 + 4 / k, f8.dequantized_weight(), {
            torch.bfloat16: lambda x: f8(x), torch.float32: lambda x: f8(x)})
        if gguf is not None:
            for kind in ("Q4_0", "Q4_1"):
                qt = getattr(gguf.GGMLQuantizationType, kind)
                t0 = time.perf_counter()
                blocks = torch.from_numpy(gguf.quants.quantize(w.numpy(), qt))
                qsec = time.perf_counter() - t0
                deq = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), qt)).float()
                bpp = blocks.numel() / (n * k)
                fw = {dt: (lambda x, dt=dt, kind=kind, blocks=blocks: F.linear(x, gguf_dequant_torch(blocks, kind, n, k, dt)))
                      for dt in (torch.bfloat16, torch.float32)}
                cands[f"GGUF {kind}, dequantised per forward (ComfyUI-GGUF)"] = (bpp, deq, fw)
                if kind == "Q4_0":
                    q4 = Q4Linear(k, n, bias=False)
                    q4.weight.data = blocks
                    cands["GGUF Q4_0, engine Q4Linear"] = (bpp, deq, {torch.bfloat16: q4, torch.float32: q4})
                # bf16 only: the CPU kernel's float32 path is unvectorised (seconds per call at these shapes)
                packs = {dt: gguf_to_int4pack(blocks, kind, n, k, dt) for dt in (torch.bfloat16,)}
                fw = {dt: (lambda x, p=packs[dt]: torch._weight_int4pack_mm_for_cpu(x, p[0], 32, p[1]))
                      for dt in (torch.bfloat16,)}
                cands[f"GGUF {kind} -> torch int4pack mm (g32)"] = (bpp, deq, fw)
                notes.append(f"gguf {kind} quantise {n}x{k}: {qsec:.2f} s ({n * k / qsec / 1e6:.0f} M params/s)")
        for dt_name, dt in (("bf16", torch.bfloat16),):
            packed, sz, deq = minmax_int4(w, 128, torch.float32)
            sz_b = sz.to(dt)
            cands["torch int4pack mm, g128 min/max (torchao recipe)"] = (0.5 + 4 / 128, deq, {
                torch.bfloat16: lambda x, p=packed, z=sz_b: torch._weight_int4pack_mm_for_cpu(x, p, 128, z)})
        if bnb is not None:
            q4, st = bnbf.quantize_4bit(wb, blocksize=64, quant_type="nf4")
            deq = bnbf.dequantize_4bit(q4, st).float()
            cands["bitsandbytes nf4 (blocks of 64)"] = (0.5 + 4 / 64, deq, {
                torch.bfloat16: lambda x, q=q4, st=st: bnb.matmul_4bit(x, q.t(), quant_state=st),
                torch.float32: lambda x, q=q4, st=st: bnb.matmul_4bit(x, q.t(), quant_state=st)})
        gx = torch.Generator().manual_seed(1)
        x0 = torch.randn(128, k, generator=gx)
        ref_y = F.linear(x0, w)
        for name, (bpp, deq, fws) in cands.items():
            row = {"in": k, "out": n, "method": name, "bytes_per_param": round(bpp, 4),
                   "weight_rel_err": rel(deq, w), "times_ms": {}, "out_rel_err": {}}
            for dt, fw in fws.items():
                y = fw(x0.to(dt))
                row["out_rel_err"][str(dt).replace("torch.", "")] = rel(y, ref_y)
                for m in rows:
                    x = x0[:m].to(dt).contiguous()
                    row["times_ms"][f"{str(dt).replace('torch.', '')} M={m}"] = 1e3 * timed(lambda: fw(x), repeat)
            out.append(row)
            print(json.dumps(row), flush=True)
    return out, notes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--rows", type=int, nargs="+", default=[2, 32, 128])
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.threads != 1:
        print("# --threads > 1: the times are CPU seconds of the calling thread only, which undercounts", file=sys.stderr)
    torch.set_num_threads(a.threads)
    res, notes = run(a.rows, a.repeat)
    for line in notes:
        print("#", line)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"threads": a.threads, "cpu": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
                       "rows": res, "notes": notes}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))
    sys.exit(main())
