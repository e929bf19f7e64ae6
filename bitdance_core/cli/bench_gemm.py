"""`python -m bitdance_core bench-gemm`: the model's linear shapes timed alone, at the row counts a
generation uses (2 guidance rows x P tokens x images: 32 for 16x, 128 for 64x, 1024 for eight 64x
images), per GEMM backend, against the floors measured on the same device.

Which linears: the backbone's (q, k, v, o, gate, up, down, and the fused qkv and gate_up that
`--fuse-projections` makes) and the head's, read from the shape's modules (built on the meta device:
no memory), each with how many times one backbone step or one head pass runs it.

Backends: `default` (F.linear as PyTorch dispatches it: cuBLAS), `cublaslt` (PyTorch's preferred
BLAS library switched to cuBLASLt), `autotune` (F.linear through torch.compile max-autotune: Triton
GEMM templates and cuBLAS benchmarked per shape, the fastest kept) and `autotune-splitk` (the same
with Inductor's split-K "decompose-K" offered; runtime/levers.py). The plain backends run first for
every shape and row count (milliseconds each); the compiled ones after, on the largest consumer
(per call x weight size) first, each compiled backend in turn on it, until `--deadline`.

Timing: CUDA events around many calls that rotate over enough copies of the weight to miss the L2
cache (inputs and weights random, never zeros); the median of three such runs. Each record has
µs per call, GB/s and TFLOP/s achieved, and the floor: the larger of bytes over the copy bandwidth
and FLOPs over the bf16 matrix rate, both measured at the start (on the CPU: no floors).
"""
from __future__ import annotations

import json
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import require
from ..runtime.levers import SPLITK_THRESHOLD
from . import options
from .common import JsonlRecords

BACKENDS = ("default", "cublaslt", "autotune", "autotune-splitk")
PLAIN = ("default", "cublaslt")


def linear_shapes(shape) -> list[dict]:
    """The distinct linears of a synthetic Shape: {"part", "names", "in", "out", "bias", "per_call"}
    (per_call: how many run per backbone step or per head pass), the fused backbone groups included."""
    from ..models.head import DiffusionHead
    from ..models.qwen3 import DecoderLayer

    with torch.device("meta"):
        layer, head = DecoderLayer(shape.llm), DiffusionHead(shape.head)
    out: dict = {}

    def add(part, name, lin_in, lin_out, bias, n):
        key = (part, lin_in, lin_out, bias)
        e = out.setdefault(key, {"part": part, "names": [], "in": lin_in, "out": lin_out, "bias": bias, "per_call": 0})
        e["names"].append(name)
        e["per_call"] += n

    layers = shape.llm.num_hidden_layers
    for name, m in layer.named_modules():
        if isinstance(m, nn.Linear):
            add("backbone", name, m.in_features, m.out_features, m.bias is not None, layers)
    a, mlp = layer.self_attn, layer.mlp
    add("backbone (fused)", "self_attn.qkv_proj", a.q_proj.in_features,
        a.q_proj.out_features + a.k_proj.out_features + a.v_proj.out_features, False, layers)
    add("backbone (fused)", "mlp.gate_up_proj", mlp.gate_proj.in_features, 2 * mlp.gate_proj.out_features, False, layers)
    for name, m in head.named_modules():
        if isinstance(m, nn.Linear) and not name.startswith("net.time_embed"):  # time_embed: 2 rows, cached (step cache)
            add("head", name, m.in_features, m.out_features, m.bias is not None, 1)
    return list(out.values())


def measure_peaks(device) -> dict:
    """The device's copy bandwidth (bytes/s, read + written) and bf16 matrix rate (FLOP/s), or {} off a GPU."""
    from .kernel_profile import copy_bandwidth

    device = torch.device(device)
    if device.type != "cuda":
        return {}
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize(device)
    flops = 2 * 8192 ** 3 * 10 / (time.perf_counter() - t)
    del a, b
    return {"bandwidth_Bps": copy_bandwidth(device), "bf16_flops": flops}


def _l2_bytes(device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    return 32 << 20


def _time_us(fn, n_calls: int, device) -> float:
    """Median of three runs of n_calls calls, µs per call."""
    runs = []
    for _ in range(3):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(n_calls):
                fn(i)
            end.record()
            end.synchronize()
            runs.append(start.elapsed_time(end) * 1e3 / n_calls)
        else:
            t = time.perf_counter()
            for i in range(n_calls):
                fn(i)
            runs.append((time.perf_counter() - t) * 1e6 / n_calls)
    return sorted(runs)[1]


def _linear(x, w, b):
    return F.linear(x, w, b)


def _backend_fn(backend: str):
    """The function of (x, w, b) a backend times (the plain ones: settings made by the caller)."""
    if backend in PLAIN:
        return _linear
    import torch._dynamo

    torch._dynamo.reset()  # one code object serves every shape: a fresh cache each, never the recompile limit's eager
    return torch.compile(_linear, mode="max-autotune-no-cudagraphs", dynamic=False)


def time_linear(entry: dict, rows: int, backend: str, device, dtype, peaks: dict) -> dict:
    """One (linear, rows, backend): the record described in the module docstring."""
    g = torch.Generator(device=device).manual_seed(rows * 7919 + entry["in"] + entry["out"])
    k, n = entry["in"], entry["out"]
    w_bytes = k * n * torch.tensor([], dtype=dtype).element_size()
    copies = max(2, math.ceil(4 * _l2_bytes(device) / w_bytes))
    ws = [(torch.randn(n, k, generator=g, device=device, dtype=torch.float32) * k ** -0.5).to(dtype) for _ in range(copies)]
    b = (torch.randn(n, generator=g, device=device, dtype=torch.float32) * 0.05).to(dtype) if entry["bias"] else None
    x = torch.randn(rows, k, generator=g, device=device, dtype=torch.float32).to(dtype)
    fn = _backend_fn(backend)
    t = time.perf_counter()
    out = fn(x, ws[0], b)  # compilation and autotuning (compiled backends), lazy initialisation (plain)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first_s = time.perf_counter() - t
    ref = _linear(x.float(), ws[0].float(), None if b is None else b.float())
    err = float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))
    once = _time_us(lambda i: fn(x, ws[i % copies], b), 3, device)
    calls = max(5, min(2000, int(20000 / max(once, 1.0))))  # about 20 ms per run
    us = _time_us(lambda i: fn(x, ws[i % copies], b), calls, device)
    nbytes = w_bytes + (rows * k + rows * n) * x.element_size() + (n * x.element_size() if b is not None else 0)
    flops = 2 * rows * k * n
    rec = {"part": entry["part"], "names": entry["names"], "in": k, "out": n, "bias": entry["bias"], "rows": rows,
           "backend": backend, "us": us, "GBps": nbytes / us / 1e3, "TFLOPs": flops / us / 1e6, "rel_error": err,
           "first_call_s": first_s, "per_call": entry["per_call"], "weight_copies": copies}
    if peaks:
        floor = max(nbytes / peaks["bandwidth_Bps"], flops / peaks["bf16_flops"]) * 1e6
        rec.update({"floor_us": floor, "of_floor": floor / us,
                    "bound": "memory" if nbytes / peaks["bandwidth_Bps"] >= flops / peaks["bf16_flops"] else "compute"})
    return rec


def run_gemm_bench(shape, device, dtype, rows: list[int], backends: list[str], autotune_rows: list[int] | None = None,
                   deadline_s: float | None = None, jsonl: str | None = None, emit=None) -> dict:
    """Every linear of `shape` at every row count on the plain backends, then on the compiled ones
    (at `autotune_rows`, largest consumer first) until the deadline. Records appended to `jsonl`."""
    import torch._dynamo
    import torch._inductor.config as inductor

    device = torch.device(device)
    t0 = time.perf_counter()
    peaks = measure_peaks(device)
    shapes = linear_shapes(shape)
    head = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__, **peaks}
    record = JsonlRecords(head, jsonl, emit)

    def one(entry, m, backend):
        try:
            record(time_linear(entry, m, backend, device, dtype, peaks))
        except Exception as e:
            record({"part": entry["part"], "names": entry["names"], "in": entry["in"], "out": entry["out"], "rows": m,
                    "backend": backend, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"})

    prefer = torch.backends.cuda.preferred_blas_library if device.type == "cuda" else None
    for backend in [b for b in backends if b in PLAIN]:
        if backend == "cublaslt" and prefer is None:
            record({"backend": backend, "skipped": "cuBLASLt: CUDA only"})
            continue
        old = prefer() if prefer else None
        if backend == "cublaslt":
            prefer("cublaslt")
        try:
            for entry in shapes:
                for m in rows:
                    one(entry, m, backend)
        finally:
            if prefer is not None:
                prefer(old)
    by_cost = sorted(shapes, key=lambda e: -e["per_call"] * e["in"] * e["out"])
    compiled = [b for b in backends if b not in PLAIN]
    has_splitk = hasattr(inductor.triton, "decompose_k_threshold")
    if "autotune-splitk" in compiled and not has_splitk:
        record({"backend": "autotune-splitk", "skipped": f"this torch ({torch.__version__}) has no Inductor decompose-K"})
        compiled.remove("autotune-splitk")
    old = inductor.triton.decompose_k_threshold if has_splitk else None
    try:
        for entry in by_cost:  # the largest consumer first, each compiled backend in turn on it
            for m in autotune_rows or rows:
                for backend in compiled:
                    if deadline_s is not None and time.perf_counter() - t0 > deadline_s:
                        record({"part": entry["part"], "names": entry["names"], "rows": m, "backend": backend,
                                "skipped": f"the {deadline_s:g} s deadline had passed"})
                        continue
                    if has_splitk:
                        inductor.triton.decompose_k_threshold = SPLITK_THRESHOLD if backend == "autotune-splitk" else old
                    one(entry, m, backend)
    finally:
        if has_splitk:
            inductor.triton.decompose_k_threshold = old
        if compiled:
            torch._dynamo.reset()
    return {**head, "records": record.records, "total_s": time.perf_counter() - t0}


def gemm_line(r: dict) -> str:
    if "us" not in r:
        return f"  {r.get('backend', '?'):<16} {','.join(r.get('names', [])) or '-':<36} rows {r.get('rows', '-')}: " \
               f"{r.get('error') or r.get('skipped')}"
    floor = f", {r['of_floor'] * 100:.0f}% of the {r['bound']} floor" if "of_floor" in r else ""
    return (f"  {r['backend']:<16} {r['part'][:8]:<8} {','.join(r['names'])[:28]:<28} {r['in']}->{r['out']} rows {r['rows']}: "
            f"{r['us']:.1f} us, {r['GBps']:.0f} GB/s, {r['TFLOPs']:.1f} TFLOP/s{floor}")


def cmd_gemm(a) -> None:
    from .bench import DTYPES, shape_from_args

    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    require(not dev.startswith("cuda") or torch.cuda.is_available(), "--device cuda asked for, but no CUDA GPU is available")
    dtype = DTYPES[a.dtype] if a.dtype else (torch.bfloat16 if dev.startswith("cuda") else torch.float32)
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    for b in backends:
        require(b in BACKENDS, f"--backends: '{b}' unknown; choose from {list(BACKENDS)}")
    rows = _ints(a.rows, "--rows")
    if a.threads:
        torch.set_num_threads(a.threads)
    r = run_gemm_bench(shape_from_args(a), dev, dtype, rows, backends, _ints(a.autotune_rows, "--autotune-rows") if a.autotune_rows else None,
                       a.deadline, a.jsonl, emit=None if a.json else lambda rec: print(gemm_line(rec), flush=True))
    if a.json:
        print(json.dumps(r, indent=1))


def _ints(text: str, flag: str) -> list[int]:
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        out = []
    require(out and min(out) > 0, f"{flag} '{text}': write positive integers separated by commas, e.g. 32,64,128")
    return out


def register(subparsers) -> None:
    from .synthetic import SHAPES

    p = subparsers.add_parser("bench-gemm", help="time the model's linear shapes alone per GEMM backend, against the floors")
    p.add_argument("--shape", default="14b-64x", choices=sorted(SHAPES) + ["custom"])
    p.add_argument("--device", type=options.device, default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--rows", default="32,64,128,1024", help="row counts (M) to time, e.g. 32,64,128,1024")
    p.add_argument("--backends", default="default,cublaslt,autotune", help=f"comma-separated from {list(BACKENDS)}")
    p.add_argument("--autotune-rows", default="128", help="row counts for the compiled backends (default 128)")
    p.add_argument("--deadline", type=float, default=None, help="seconds after which no compiled backend starts a shape")
    p.add_argument("--jsonl", default=None, help="append one JSON line per record as it finishes")
    p.add_argument("--threads", type=options.positive_int, default=None)
    p.add_argument("--json", action="store_true")
    # the custom-shape options of bench, so the DRY scripts can time a small model's shapes
    for name in ("base",):
        p.add_argument(f"--{name}", default="mid", choices=sorted(SHAPES))
    for name in ("layers", "hidden", "heads", "kv-heads", "head-dim", "intermediate", "vocab", "head-depth", "head-width",
                 "head-adaln", "parallel", "ae-ch"):
        p.add_argument(f"--{name}", type=int, default=None)
    for name in ("height", "width", "steps"):
        p.add_argument(f"--{name}", type=options.positive_int, default=None)
    p.add_argument("--cfg", type=float, default=None)
    p.set_defaults(func=cmd_gemm)


__all__ = ["BACKENDS", "gemm_line", "linear_shapes", "register", "run_gemm_bench", "time_linear"]
