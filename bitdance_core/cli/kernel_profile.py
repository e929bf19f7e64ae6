"""`bench --profile-out FILE`: where each millisecond of one head pass and one backbone step goes.

One generation at the bench's size records the calls the pipeline makes (the head's sampler call
of the last block, the backbone's block steps); then torch.profiler runs those same calls again:
one sampler call (steps + 1 head passes) and a few block steps from the middle of the image (the
cache as full as it is there). On a GPU the CUDA kernels are read from the profiler's trace (a
kernel launched by a CUDA-graph replay is recorded like any other); on the CPU the operators'
own time. Kernels are summed by name and grouped:

| group | what (kernel or operator names) |
|---|---|
| GEMM | cuBLAS/cuBLASLt (nvjet, sm90 xmma, cutlass gemm), Inductor's GEMM templates (triton_tem_*), aten::mm/addmm |
| attention | SDPA's flash, memory-efficient (fmha), cuDNN kernels; softmax |
| norm | layer/RMS norms and other reductions (mean, Inductor's triton_red_/triton_per_ kernels: split-K sums land here too) |
| copies | copies, casts between dtypes, cat, index_copy_, memcpy/memset |
| elementwise | the rest of PyTorch's elementwise kernels and Inductor's pointwise ones (triton_poi_*) |
| other | anything else (on the CPU: views, reshapes and other operators that do no arithmetic) |

Each is given per head pass and per backbone step, with the wall time of the same calls outside the
profiler and the floor: the bytes the call must read (weights; the KV cache for a step) over the
bandwidth measured here by a device-to-device copy. With CUDA graphs on, the same calls are then
profiled eagerly too (the graphs' wrappers bypassed), which shows the launch overhead they remove.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time

import torch

GROUPS = ("GEMM", "attention", "norm", "copies", "elementwise", "other")
_RULES = [
    ("attention", r"flash|fmha|attention|sdpa|softmax|cudnn_generated|scaled_dot_product"),
    ("GEMM", r"gemm|nvjet|cutlass|xmma|cublas|matmul|splitk|triton_tem|gemv|wgmma|aten::(mm|addmm|bmm|linear|_scaled_mm|baddbmm)$"),
    ("norm", r"layer_?norm|rms_?norm|reduce|mean|rsqrt|triton_per_|triton_red_|aten::(native_layer_norm|layer_norm|sum|var|amax|pow)$"),
    ("copies", r"copy|memcpy|memset|cat|index|gather|scatter|fill|aten::(to|_to_copy|clone|contiguous|zero_|stack|zeros|full|empty_like)$"),
    ("other", r"aten::(view|_unsafe_view|reshape|transpose|permute|expand|as_strided|empty|empty_strided|t|unsqueeze|"
              r"squeeze|slice|select|split|split_with_sizes|chunk|unbind|narrow|detach|alias|resolve_conj|resolve_neg|"
              r"lift_fresh|result_type|item|_local_scalar_dense)$"),  # metadata only, no arithmetic
    ("elementwise", r"elementwise|triton_poi_|vectorized|unrolled|aten::"),
]
TOP = 25


def classify(name: str) -> str:
    """The group of a kernel or operator name (see the module docstring)."""
    low = name.lower()
    for group, pattern in _RULES:
        if re.search(pattern, low):
            return group
    return "other"


def copy_bandwidth(device) -> float | None:
    """Bytes per second of a device-to-device copy (read + written), or None off a GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    a = torch.empty(1 << 29, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize(device)
    dt = time.perf_counter() - t
    del a, b
    return 2 * (1 << 29) * 10 / dt


def _kernel_events(prof) -> list[tuple[str, float]]:
    """(name, µs) of every GPU kernel, copy and memset in a profile's trace."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    events = trace.get("traceEvents", []) if isinstance(trace, dict) else trace
    return [(e.get("name", "?"), float(e.get("dur", 0.0))) for e in events
            if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]


def _cpu_ops(prof) -> list[tuple[str, float, int]]:
    """(name, self µs, count) of every aten operator."""
    return [(e.key, float(e.self_cpu_time_total), int(e.count)) for e in prof.key_averages() if e.key.startswith("aten::")]


def summarize(items: list[tuple[str, float, int]], units: int) -> dict:
    """Per unit (pass or step): total ms, kernels, by group, and the top kernels by time."""
    by_name: dict[str, list] = {}
    for name, us, count in items:
        agg = by_name.setdefault(name, [0.0, 0])
        agg[0] += us
        agg[1] += count
    total_us = sum(v[0] for v in by_name.values())
    groups = {g: {"ms": 0.0, "share": 0.0, "kernels": 0.0} for g in GROUPS}
    for name, (us, count) in by_name.items():
        g = groups[classify(name)]
        g["ms"] += us / 1e3 / units
        g["kernels"] += count / units
    for g in groups.values():
        g["share"] = g["ms"] * 1e3 * units / total_us if total_us else 0.0
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:TOP]
    return {"kernel_ms": total_us / 1e3 / units, "kernels": sum(v[1] for v in by_name.values()) / units, "groups": groups,
            "top": [{"name": n[:240], "group": classify(n), "count": c, "total_ms": us / 1e3, "mean_us": us / max(1, c)}
                    for n, (us, c) in top]}


def _profile_calls(fn, units: int, device) -> tuple[dict, bool]:
    """torch.profiler around fn(); (summary per unit, whether GPU kernels were recorded)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    if cuda:
        items = [(n, us, 1) for n, us in _kernel_events(prof)]
        return summarize(items, units), bool(items)
    return summarize(_cpu_ops(prof), units), True


def _wall_ms(fn, units: int, device, repeat: int = 2) -> float:
    sync = (lambda: torch.cuda.synchronize(device)) if torch.device(device).type == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best * 1e3 / units


def _bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def record_calls(pipe, prompt, height: int, width: int, steps: int, cfg: float, num_images: int, seed: int):
    """One generation, recording its last head sampler call and its block steps' arguments."""
    name = "euler_maruyama"
    rec = {"head": None, "steps": []}
    sample = pipe.samplers[name]

    def recording(net, cond, g, n, generator, **kw):
        rec["head"] = (net, cond, g, n, kw)
        return sample(net, cond, g, n, generator, **kw)

    def on_step(_m, args):
        if len(args) > 3 and args[3] > 0:
            rec["steps"].append(args)

    pipe.samplers[name] = recording
    hook = pipe.backbone.register_forward_pre_hook(on_step)
    try:
        pipe.generate(prompt, height, width, steps, cfg, num_images, seed)
    finally:
        pipe.samplers[name] = sample
        hook.remove()
    return rec


def profile_generation(pipe, prompt, height: int, width: int, steps: int, cfg: float, num_images: int = 1,
                       seed: int = 0, backbone_steps: int = 3, eager_too: bool = True) -> dict:
    """The profile of one head pass and one backbone step as this pipeline runs them now (graphs,
    compile and levers as set), and, when graphs are on and `eager_too`, of the same calls eagerly."""
    from ..runtime.graphs import GraphedBackbone, GraphedModule

    dev = pipe.device
    rec = record_calls(pipe, prompt, height, width, steps, cfg, num_images, seed)
    net, cond, g, n, kw = rec["head"]
    passes = n + 1
    mid = rec["steps"][len(rec["steps"]) // 2:][:max(1, backbone_steps)] if rec["steps"] else []
    bw = copy_bandwidth(dev)
    head_bytes = _bytes(pipe.head)
    bb = pipe.backbone.inner if isinstance(pipe.backbone, GraphedBackbone) else pipe.backbone
    layer_bytes = _bytes(bb.model.layers) + _bytes(bb.model.norm)
    cache = mid[0][2] if mid else None
    cache_bytes = 2 * cache.k.numel() * cache.k.element_size() if cache is not None else 0
    sampler = pipe.samplers["euler_maruyama"]
    graphed = isinstance(pipe.head.net, GraphedModule) or isinstance(pipe.backbone, GraphedBackbone) \
        or hasattr(sampler, "__wrapped__")

    def head_call(net=net, sample=sampler):
        gen = torch.Generator(device=dev).manual_seed(seed)
        return lambda: sample(net, cond, g, n, gen, **kw)

    def steps_call(backbone):
        return lambda: [backbone(*args) for args in mid]

    modes = [("fast" if graphed else "eager", head_call(), steps_call(pipe.backbone))]
    if graphed and eager_too:
        bare_net = net.inner if isinstance(net, GraphedModule) else net
        modes.append(("eager", head_call(bare_net, getattr(sampler, "__wrapped__", sampler)), steps_call(bb)))
    out = {"size": [height, width], "steps": steps, "cfg": cfg, "num_images": num_images, "device": str(dev),
           "head_passes": passes, "backbone_steps": len(mid), "bandwidth_Bps": bw,
           "head_weight_bytes": head_bytes, "backbone_weight_bytes": layer_bytes, "kv_cache_bytes": cache_bytes,
           "block_step_start": mid[0][3] if mid else None, "modes": {}}
    from ..pipelines.cpu_threads import generation_threads

    width_of_ops = max(bb.config.hidden_size, pipe.head.config.ch_latent)
    with generation_threads(dev, cond.shape[0] * cond.shape[1], width_of_ops):  # the threads generate() uses
        for mode, head_fn, step_fn in modes:
            out["modes"][mode] = _profile_mode(head_fn, step_fn, passes, mid, dev, head_bytes, layer_bytes + cache_bytes, bw)
    return out


def _profile_mode(head_fn, step_fn, passes, mid, dev, head_bytes, step_bytes, bw) -> dict:
    """One mode: a first run of each call outside the profile (captures, compilation), the profiled
    run, the wall time of the same calls, the floor."""
    head_fn()
    head, seen = _profile_calls(head_fn, passes, dev)
    head["wall_ms"] = _wall_ms(head_fn, passes, dev)
    head["floor_ms"] = head_bytes / bw * 1e3 if bw else None
    entry = {"head_pass": head, "kernels_recorded": seen}
    if mid:
        step_fn()
        step, seen_b = _profile_calls(step_fn, len(mid), dev)
        step["wall_ms"] = _wall_ms(step_fn, len(mid), dev)
        step["floor_ms"] = step_bytes / bw * 1e3 if bw else None
        entry["backbone_step"] = step
        entry["kernels_recorded"] = seen and seen_b
    return entry


def format_profile(p: dict) -> str:
    """A short table per mode: ms per head pass / backbone step by group, wall time, floor."""
    lines = [f"profile: {p['size'][0]}x{p['size'][1]}, {p['steps']} steps, cfg {p['cfg']}, {p['num_images']} image(s) on "
             f"{p['device']}; {p['head_passes']} head passes, {p['backbone_steps']} block steps from start {p['block_step_start']}"]
    for mode, entry in p["modes"].items():
        for key, label in (("head_pass", "head pass"), ("backbone_step", "backbone step")):
            s = entry.get(key)
            if not s:
                continue
            floor = f", floor {s['floor_ms']:.3f} ms" if s.get("floor_ms") else ""
            groups = ", ".join(f"{g} {v['ms']:.3f} ({v['share'] * 100:.0f}%, {v['kernels']:.0f} k)"
                               for g, v in s["groups"].items() if v["ms"] > 0)
            lines.append(f"  {mode} {label}: wall {s['wall_ms']:.3f} ms, {'kernels' if 'cuda' in p['device'] else 'ops'} "
                         f"{s['kernel_ms']:.3f} ms ({s['kernels']:.0f}){floor}: {groups}")
        if not entry.get("kernels_recorded", True):
            lines.append(f"  {mode}: no GPU kernels recorded (CUPTI under graph replay?): read the eager lines")
    return "\n".join(lines)


__all__ = ["GROUPS", "classify", "copy_bandwidth", "format_profile", "profile_generation", "record_calls", "summarize"]
