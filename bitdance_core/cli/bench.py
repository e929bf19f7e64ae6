"""`python -m bitdance_core bench`: time a random-weight model at a named shape (no download).

Per stage (prefill, backbone per block, head per block, decode), seconds per image and peak
memory, for the engine's fast mode (batched guidance, CUDA graphs on a GPU, optional
torch.compile) and, in the same run, its naive mode (the two guidance branches as separate
backbone passes, no graphs, no compile), with the ratio naive / fast. Same weights, dtype, fp8
and offload in both. `--json` prints one JSON object for tracking.

Stage times come from hooks on the backbone (a call at start 0 is a prefill, later calls are
block steps); "head per block" is the rest of the generation loop divided by the blocks (the
head's sampling loop, the projector and the bookkeeping). On a GPU the hooks synchronise.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from dataclasses import dataclass, field

import torch

from ..errors import BitDanceError, require

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROMPT = "A red fox sitting in a snowy forest at sunrise, photographed with a telephoto lens"


@dataclass
class StageTimes:
    prefill_s: float = 0.0
    steps_s: float = 0.0
    step_calls: int = 0
    generate_s: float = 0.0
    decode_s: float = 0.0
    blocks: int = 0
    num_images: int = 1

    @property
    def backbone_per_block_s(self) -> float:
        return self.steps_s / max(1, self.blocks - 1)

    @property
    def head_per_block_s(self) -> float:
        return max(0.0, self.generate_s - self.prefill_s - self.steps_s) / max(1, self.blocks)

    @property
    def total_s(self) -> float:
        return self.generate_s + self.decode_s

    @property
    def s_per_image(self) -> float:
        return self.total_s / self.num_images

    def to_json(self) -> dict:
        return {"prefill_s": self.prefill_s, "backbone_per_block_s": self.backbone_per_block_s,
                "head_per_block_s": self.head_per_block_s, "decode_s": self.decode_s, "generate_s": self.generate_s,
                "total_s": self.total_s, "s_per_image": self.s_per_image, "blocks": self.blocks,
                "backbone_step_calls": self.step_calls}


class _BackboneTimer:
    def __init__(self, module, sync):
        self.sync, self.t0, self.times = sync, 0.0, None
        self.h1 = module.register_forward_pre_hook(self._pre, prepend=True)  # before an offload hook: loads count
        self.h2 = module.register_forward_hook(self._post)

    def _pre(self, _m, args):
        self.sync()
        self.t0 = time.perf_counter()

    def _post(self, _m, args, _out):
        self.sync()
        dt = time.perf_counter() - self.t0
        if self.times is None:
            return
        start = args[3] if len(args) > 3 else 0
        if start == 0:
            self.times.prefill_s += dt
        else:
            self.times.steps_s += dt
            self.times.step_calls += 1

    def remove(self):
        self.h1.remove()
        self.h2.remove()


def _sync_fn(device):
    if torch.device(device).type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_generation(pipe, prompt, height, width, steps, cfg, num_images, seed, batched_cfg=True, decode=True) -> tuple[StageTimes, torch.Tensor]:
    """One timed generate (+ decode) with per-stage times."""
    sync = _sync_fn(pipe.device)
    times = StageTimes(num_images=num_images)
    timer = _BackboneTimer(pipe.backbone, sync)
    timer.times = times
    try:
        sync()
        t = time.perf_counter()
        bits = pipe.generate(prompt, height, width, steps, cfg, num_images, seed, batched_cfg=batched_cfg)
        sync()
        times.generate_s = time.perf_counter() - t
    finally:
        timer.remove()
    times.blocks = (height // pipe.downsample) * (width // pipe.downsample) // pipe.parallel_num
    if decode:
        t = time.perf_counter()
        pipe.decode(bits)
        sync()
        times.decode_s = time.perf_counter() - t
    return times, bits


@dataclass
class BenchConfig:
    shape: object
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    fp8: bool = False
    fp8_matmul: str = "dequant"
    q4: bool = False  # the 4bit weights: backbone linears GGUF Q4_0, head fp8
    offload: str = "none"
    resident_layers: int | None = None
    budget_bytes: int | None = None
    graphs: str = "auto"  # auto (on for CUDA), on, off
    compile: bool = False
    naive: bool = True
    decode: bool = True
    repeat: int = 1
    warmup: int | None = None  # default 1 per mode (on the CPU with 1 sampling step)
    measure_memory: bool = False  # CPU: one extra profiled run (slow); CUDA: always measured
    seed: int = 0
    num_images: int = 1
    threads: int | None = None
    extra: dict = field(default_factory=dict)


def build_pipeline(cfg: BenchConfig):
    """The random pipeline on its device, with fp8 and offload applied. Returns (pipe, offload handle)."""
    from ..runtime.offload import apply_offload
    from ..formats.fp8 import set_matmul
    from .synthetic import build_random_t2i

    host = "cpu" if cfg.offload != "none" else cfg.device
    ae_dtype = cfg.dtype if cfg.dtype != torch.float32 else None
    weights = "4bit" if cfg.q4 else "fp8" if cfg.fp8 else "as-is"
    pipe = build_random_t2i(cfg.shape, device=host, dtype=cfg.dtype, seed=cfg.seed, weights=weights, ae_dtype=ae_dtype)
    if cfg.fp8 or cfg.q4:
        set_matmul(pipe.backbone, cfg.fp8_matmul)
        set_matmul(pipe.head, cfg.fp8_matmul)
    off = apply_offload(pipe, cfg.offload, cfg.device, budget_bytes=cfg.budget_bytes,
                        resident_layers=cfg.resident_layers) if cfg.offload != "none" else None
    return pipe, off


def _check_host_memory(cfg: BenchConfig) -> None:
    """Refuse, with the numbers, a model whose weights cannot fit this machine's memory."""
    import os

    from ..runtime.planner import ModelSizes

    if torch.device(cfg.device).type == "cuda" and cfg.offload == "none":
        return
    s = cfg.shape
    need = ModelSizes.from_configs(s.llm, s.head, s.ae, cfg.dtype,
                                   weights="4bit" if cfg.q4 else "fp8" if cfg.fp8 else "as-is").total
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > 0.8 * have:
        raise BitDanceError(f"the {cfg.extra.get('shape_name', 'custom')} weights need {need / 2**30:.1f} GiB of host memory in "
                            f"{str(cfg.dtype).replace('torch.', '')}{' with fp8 linears' if cfg.fp8 else ''}; this machine has "
                            f"{have / 2**30:.1f} GiB: use --device cuda, --fp8, or a smaller --shape")


def run_bench(cfg: BenchConfig) -> dict:
    from ..runtime.graphs import cuda_graphs_available, enable_compile, enable_graphs
    from ..runtime.planner import estimate_pipeline, measure_peak

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = torch.device(cfg.device)
    require(dev.type != "cuda" or torch.cuda.is_available(), "--device cuda asked for, but no CUDA GPU is available; use --device cpu")
    require(not (dev.type == "cpu" and cfg.dtype == torch.float16), "float16 is not supported on the CPU; use float32 or bfloat16")
    shape = cfg.shape
    _check_host_memory(cfg)
    warnings.filterwarnings("ignore", message=".*not one of the official BitDance sizes.*")
    t = time.perf_counter()
    pipe, off = build_pipeline(cfg)
    build_s = time.perf_counter() - t
    prompt = pipe.encode_prompt(PROMPT)
    args = (prompt, shape.height, shape.width, shape.steps, shape.cfg, cfg.num_images, cfg.seed)
    use_graphs = cfg.graphs == "on" or (cfg.graphs == "auto" and cuda_graphs_available(dev))
    warmup = 1 if cfg.warmup is None else cfg.warmup
    plan = estimate_pipeline(pipe, shape.height, shape.width, cfg.num_images, shape.cfg, mode=cfg.offload,
                             prompt=PROMPT, budget_bytes=cfg.budget_bytes,
                             **({"resident_layers": cfg.resident_layers} if cfg.offload == "stream" else {}))

    def fast_on():
        acc = enable_graphs(pipe) if use_graphs else None
        if cfg.compile:
            enable_compile(pipe, force=True)
        return acc

    results = {"fast": [], "naive": []}
    peaks = {}
    acc = fast_on()
    compiled = {}
    if cfg.compile:  # the compiled forwards, to take out for the naive runs and put back
        compiled = {m: m.__dict__["forward"] for m in [_bare(pipe.head.net)] + list(pipe.backbone.model.layers)
                    if "forward" in m.__dict__}

    def set_mode(mode):
        fast = mode == "fast"
        if acc is not None:
            acc.resume() if fast else acc.suspend()
        for m, f in compiled.items():
            if fast:
                m.forward = f
            else:
                m.__dict__.pop("forward", None)

    order = ["fast", "naive"] if cfg.naive else ["fast"]
    for mode in order:
        set_mode(mode)
        for _ in range(warmup):
            # CPU: a one-step warm-up (same shapes, lazy initialisations); GPU: a full one (graph capture)
            wargs = args if dev.type == "cuda" else args[:3] + (1,) + args[4:]
            time_generation(pipe, *wargs, batched_cfg=mode == "fast", decode=cfg.decode)
    for r in range(cfg.repeat):  # interleaved, so a change in the machine's load hits both modes
        for mode in order:
            set_mode(mode)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            times, _ = time_generation(pipe, *args, batched_cfg=mode == "fast", decode=cfg.decode)
            results[mode].append(times)
            if dev.type == "cuda":
                peaks[mode] = max(peaks.get(mode, 0), torch.cuda.max_memory_allocated(dev))
    set_mode("fast")
    if dev.type == "cpu" and cfg.measure_memory:
        from ..runtime.planner import ModelSizes

        resident = ModelSizes.of_pipeline(pipe).total if off is None else (off.stream.resident_bytes if off.stream else 0)
        _, peak = measure_peak(lambda: time_generation(pipe, *args, batched_cfg=True, decode=cfg.decode), "cpu")
        peaks["fast"] = resident + peak

    def best(mode):
        runs = results[mode]
        return min(runs, key=lambda r: r.total_s) if runs else None

    fast, naive = best("fast"), best("naive")
    out = {
        "shape": cfg.extra.get("shape_name", "custom"), "note": shape.note,
        "settings": {"height": shape.height, "width": shape.width, "steps": shape.steps, "cfg": shape.cfg,
                     "num_images": cfg.num_images, "blocks": fast.blocks},
        "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "dtype": str(cfg.dtype).replace("torch.", ""), "fp8": cfg.fp8, "q4": cfg.q4,
        "fp8_matmul": cfg.fp8_matmul if cfg.fp8 or cfg.q4 else None, "offload": cfg.offload, "graphs": use_graphs,
        "compile": cfg.compile, "decode": cfg.decode, "torch": torch.__version__, "build_s": build_s,
        "fast": fast.to_json(), "fast_runs_s": [r.total_s for r in results["fast"]],
        "naive": naive.to_json() if naive else None, "naive_runs_s": [r.total_s for r in results["naive"]],
        "ratio_naive_over_fast": (naive.s_per_image / fast.s_per_image) if naive else None,
        "peak_memory_bytes": peaks.get("fast"), "naive_peak_memory_bytes": peaks.get("naive"),
        "planner_peak_bytes": plan.peak_bytes, "planner": plan.describe(),
    }
    if acc is not None:
        out["graph_stats"] = {"captures": acc.stats.captures, "replays": acc.stats.replays,
                              "eager_calls": acc.stats.eager_calls,
                              "failures": sorted({v.split("\n")[0][:200] for v in acc.stats.failures.values()})}
    if off is not None:
        out["offload_stats"] = {"loads": off.stats.loads, "bytes_moved": off.stats.bytes_moved,
                                "streamed_loads": off.stats.streamed_loads, "prefetch_hits": off.stats.prefetch_hits}
    return out


def format_report(r: dict) -> str:
    gib = 1 << 30
    st = r["settings"]
    lines = [f"BitDance bench: {r['shape']} ({r['note']}), {st['height']}x{st['width']}, {st['steps']} steps, cfg {st['cfg']}, "
             f"{st['num_images']} image(s), {st['blocks']} blocks",
             f"  device {r['device']} ({r['device_name']}, {r['threads']} threads), {r['dtype']}"
             f"{', fp8 ' + r['fp8_matmul'] if r['fp8'] else ''}{', 4bit (Q4_0 backbone)' if r.get('q4') else ''}, offload {r['offload']}, graphs {'on' if r['graphs'] else 'off'}"
             f"{', compile' if r['compile'] else ''}; torch {r['torch']}"]
    for name, key in (("fast (batched CFG)", "fast"), ("naive (separate CFG passes)", "naive")):
        t = r.get(key)
        if not t:
            continue
        lines.append(f"  {name}: prefill {t['prefill_s'] * 1e3:.1f} ms, backbone/block {t['backbone_per_block_s'] * 1e3:.2f} ms, "
                     f"head/block {t['head_per_block_s'] * 1e3:.2f} ms, decode {t['decode_s'] * 1e3:.1f} ms, "
                     f"generate {t['generate_s']:.3f} s -> {t['s_per_image']:.3f} s/image")
    if r.get("ratio_naive_over_fast"):
        lines.append(f"  ratio naive/fast: {r['ratio_naive_over_fast']:.3f}x")
    if r.get("peak_memory_bytes"):
        lines.append(f"  peak memory (measured): {r['peak_memory_bytes'] / gib:.3f} GiB")
    lines.append(f"  planner: {r['planner']}")
    if "graph_stats" in r:
        lines.append(f"  graphs: {r['graph_stats']}")
    if "offload_stats" in r:
        lines.append(f"  offload: {r['offload_stats']}")
    return "\n".join(lines)


def _bare(net):
    return getattr(net, "inner", net)


def shape_from_args(a):
    from .synthetic import SHAPES, custom_shape

    if a.shape == "custom":
        return custom_shape(a.base, a.layers, a.hidden, a.heads, a.kv_heads, a.head_dim, a.intermediate, a.vocab,
                            a.head_depth, a.head_width, a.head_adaln, a.parallel, a.ae_ch, a.height, a.width, a.steps, a.cfg)
    s = SHAPES[a.shape]
    from dataclasses import replace

    return replace(s, height=a.height or s.height, width=a.width or s.width, steps=a.steps or s.steps,
                   cfg=s.cfg if a.cfg is None else a.cfg)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .synthetic import SHAPES

    p.add_argument("--shape", default="mid", choices=sorted(SHAPES) + ["custom"])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--fp8", action="store_true", help="backbone and head linears in float8_e4m3fn")
    p.add_argument("--fp8-matmul", default="auto", choices=["dequant", "scaled_mm", "auto"])
    p.add_argument("--q4", action="store_true", help="the 4bit weights: backbone linears GGUF Q4_0, head fp8")
    p.add_argument("--offload", default="none", choices=["none", "stage", "stream"])
    p.add_argument("--resident-layers", type=int, default=None, help="stream: backbone layers kept on the device")
    p.add_argument("--budget-gb", type=float, default=None, help="stage offload: GiB the weights may occupy")
    p.add_argument("--graphs", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--compile", action="store_true", help="torch.compile the head and the backbone layers")
    p.add_argument("--no-naive", action="store_true", help="skip the naive-mode run")
    p.add_argument("--no-decode", action="store_true", help="time the generation only")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--measure-memory", action="store_true", help="CPU: one extra run under the allocation profiler")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--cfg", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    g = p.add_argument_group("custom shape (--shape custom; unset values come from --base)")
    g.add_argument("--base", default="mid", choices=sorted(SHAPES))
    for name in ("layers", "hidden", "heads", "kv-heads", "head-dim", "intermediate", "vocab", "head-depth", "head-width",
                 "head-adaln", "parallel", "ae-ch"):
        g.add_argument(f"--{name}", type=int, default=None)


def config_from_args(a) -> BenchConfig:
    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[a.dtype] if a.dtype else (torch.bfloat16 if dev.startswith("cuda") else torch.float32)
    require(a.repeat >= 1, f"--repeat must be >= 1, got {a.repeat}")
    require(a.num_images >= 1, f"--num-images must be >= 1, got {a.num_images}")
    require(not (a.fp8 and a.q4), "--fp8 and --q4 are two weights formats: choose one")
    return BenchConfig(shape=shape_from_args(a), device=dev, dtype=dtype, fp8=a.fp8, fp8_matmul=a.fp8_matmul, q4=a.q4,
                       offload=a.offload, resident_layers=a.resident_layers,
                       budget_bytes=int(a.budget_gb * (1 << 30)) if a.budget_gb is not None else None,
                       graphs=a.graphs, compile=a.compile, naive=not a.no_naive, decode=not a.no_decode,
                       repeat=a.repeat, warmup=a.warmup, measure_memory=a.measure_memory, seed=a.seed,
                       num_images=a.num_images, threads=a.threads, extra={"shape_name": a.shape})


def cmd_bench(a) -> None:
    r = run_bench(config_from_args(a))
    print(json.dumps(r, indent=1) if a.json else format_report(r))


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark a random-weight model at a named shape (no download)")
    add_arguments(p)
    p.set_defaults(func=cmd_bench)


__all__ = ["BenchConfig", "StageTimes", "format_report", "register", "run_bench", "time_generation", "BitDanceError"]
