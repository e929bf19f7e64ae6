"""`python -m bitdance_core bench`: time a random-weight model at a named shape (no download).

Per stage (prefill, backbone per block, head per block, decode), seconds per image and peak
memory, for the engine's fast mode (batched guidance, CUDA graphs on a GPU, optional
torch.compile) and, in the same run, its naive mode (the two guidance branches as separate
backbone passes, no graphs, no compile), with the ratio naive / fast. Same weights, dtype, fp8
and offload in both. `--json` prints one JSON object for tracking.

`--weights`/`--offload auto` and `--memory-cap-gb N` plan the load as the t2i command does
(`runtime.fitting.plan_for`, for the bench's size and batch): under a cap the process's CUDA
allocations are capped at N GiB (`cap_device_memory`) and the planner sees at most N GiB free; on
the CPU a cap is simulated (planned as for a GPU with N GiB free, run on the CPU). The JSON then
carries the decision, the measured peak (allocated and reserved) and the planner's figure.

`bench-sweep` (cli/bench_sweep.py) times several weight/matmul/lever variants on the same random weights.

The speed levers (runtime/levers.py: --compile [TARGET], --compile-mode, --fuse-projections,
--gemm, --sdpa-backend, --gqa, --step-cache, or all at once as --levers SPEC) apply to the fast
mode; the naive mode keeps them except compilation. `--profile-out FILE` writes where each
millisecond of a head pass and of a backbone step goes (cli/kernel_profile.py); with
`--profile-only` nothing else is timed.

Stage times come from hooks on the backbone (a call at start 0 is a prefill, later calls are
block steps); "head per block" is the rest of the generation loop divided by the blocks (the
head's sampling loop, the projector and the bookkeeping). On a GPU the hooks synchronise.
Random weights are drawn on the GPU when there is one, also when they are kept in CPU memory
for offloading (seconds instead of the CPU's minutes at 14B).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field, replace

import torch

from ..errors import BitDanceError, require
from ..runtime.levers import Levers
from . import options

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


BUILT = ("as-is", "fp8", "4bit")  # the weights formats bench draws at random


def _weights_of(a) -> str:
    fp8, q4 = getattr(a, "fp8", False), getattr(a, "q4", False)
    require(not (fp8 and q4), "--fp8 and --q4 are two weights formats: choose one")
    return "fp8" if fp8 else "4bit" if q4 else getattr(a, "weights", "as-is")


@dataclass
class BenchConfig:
    shape: object
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    fp8: bool = False  # = weights "fp8" (kept for callers that set it)
    fp8_matmul: str = "auto"
    offload: str = "none"  # none | stage | stream | auto (planned)
    resident_layers: int | None = None
    budget_bytes: int | None = None
    graphs: str = "auto"  # auto (on for CUDA), on, off
    compile: bool = False
    naive: bool = True
    decode: bool = True
    repeat: int = 1
    warmup: int | None = None  # default 1 per mode (on the CPU with 1 sampling step)
    warmup_size: tuple[int, int] | None = None  # warm-up at this (height, width) instead of the timed size
    measure_memory: bool = False  # CPU: one extra profiled run (slow); CUDA: always measured
    seed: int = 0
    num_images: int = 1
    threads: int | None = None
    weights: str = "as-is"  # as-is | fp8 | 4bit | auto (planned): runtime.WEIGHTS_CHOICES
    memory_cap_bytes: int | None = None
    levers: Levers = field(default_factory=Levers)  # runtime/levers.py; compile=True means levers.compile "all"
    profile_out: str | None = None  # write the kernel profile (cli/kernel_profile.py) here
    profile_only: bool = False  # the profile's own generation is the only one (no warm-up, no timed runs)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.fp8:
            self.weights = "fp8"
        self.fp8 = self.weights == "fp8"
        if self.compile and self.levers.compile == "off":
            self.levers = replace(self.levers, compile="all")
        self.compile = self.levers.compile != "off"

    @property
    def planned(self) -> bool:
        return self.weights == "auto" or self.offload == "auto" or self.memory_cap_bytes is not None


def plan_bench(cfg: BenchConfig, free_bytes: int | None = None):
    """Plan weights/offload as the t2i command does, for the bench's size and batch, and set them
    on `cfg`. On a GPU `free_bytes` defaults to what the process may allocate (under its cap); on
    the CPU a cap is planned for as a GPU with that much free, and without a cap auto means as-is,
    no offload. Returns the LoadDecision."""
    from ..runtime.fitting import free_device_bytes, plan_for

    s = cfg.shape
    dev = torch.device(cfg.device)
    simulated = dev.type != "cuda" and cfg.memory_cap_bytes is not None
    if free_bytes is None:
        if dev.type == "cuda":
            free_bytes = free_device_bytes(dev, cfg.memory_cap_bytes)
        elif simulated:
            free_bytes = cfg.memory_cap_bytes
    d = plan_for((s.llm, s.head, s.ae), free_bytes, device="cuda" if simulated else dev, height=s.height, width=s.width,
                 num_images=cfg.num_images, cfg=s.cfg, dtype=cfg.dtype, weights=cfg.weights, offload=cfg.offload)
    require(d.weights in BUILT, f"bench builds random weights as {', '.join(BUILT)}; the plan chose '{d.weights}'")
    cfg.weights, cfg.fp8, cfg.offload = d.weights, d.weights == "fp8", d.offload
    cfg.resident_layers, cfg.budget_bytes = d.resident_layers, d.budget_bytes
    return d


def build_pipeline(cfg: BenchConfig):
    """The random pipeline on its device, with fp8 and offload applied. Returns (pipe, offload handle).
    Offloaded weights live in CPU memory but are drawn on the GPU when there is one."""
    from ..runtime.offload import apply_offload
    from ..formats.fp8 import set_matmul
    from .synthetic import build_random_t2i

    require(cfg.weights in BUILT, f"bench builds random weights as {', '.join(BUILT)}, not '{cfg.weights}'")
    host = "cpu" if cfg.offload != "none" else cfg.device
    draw = cfg.device if torch.device(cfg.device).type == "cuda" else host
    ae_dtype = cfg.dtype if cfg.dtype != torch.float32 else None
    pipe = build_random_t2i(cfg.shape, device=host, dtype=cfg.dtype, seed=cfg.seed, weights=cfg.weights,
                            ae_dtype=ae_dtype, draw_device=draw)
    if cfg.weights != "as-is":  # fp8 linears: both parts with fp8, the head with 4bit
        set_matmul(pipe.backbone, cfg.fp8_matmul)
        set_matmul(pipe.head, cfg.fp8_matmul)
    off = apply_offload(pipe, cfg.offload, cfg.device, budget_bytes=cfg.budget_bytes,
                        resident_layers=cfg.resident_layers) if cfg.offload != "none" else None
    return pipe, off


def _progress(msg: str) -> None:
    """A line on stderr as each stage ends, so that a run stopped by a timeout shows how far it got."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _check_host_memory(cfg: BenchConfig) -> str | None:
    """A model whose weights look too big for this machine's memory: refused, with the numbers, when
    the bench runs on the CPU (it would be killed for memory); on a GPU, where only the offloaded part
    lives in host memory and some virtual machines report less memory than they grow to (MemTotal
    starts low), the same numbers are returned as a note for the report and the run goes on."""
    import os

    from ..runtime.planner import ModelSizes

    on_gpu = torch.device(cfg.device).type == "cuda"
    if on_gpu and cfg.offload == "none":
        return None
    s = cfg.shape
    need = ModelSizes.from_configs(s.llm, s.head, s.ae, cfg.dtype, weights=cfg.weights).total
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    if need <= 0.8 * have:
        return None
    note = (f"the {cfg.extra.get('shape_name', 'custom')} weights need {need / 2**30:.1f} GiB of host memory in "
            f"{str(cfg.dtype).replace('torch.', '')}{'' if cfg.weights == 'as-is' else ' with ' + cfg.weights + ' weights'}; "
            f"this machine reports {have / 2**30:.1f} GiB")
    require(on_gpu, f"{note}: use --device cuda, --fp8, or a smaller --shape")
    _progress(f"{note}; going on (offload {cfg.offload})")
    return note


def _setup(cfg: BenchConfig) -> torch.device:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = torch.device(cfg.device)
    require(dev.type != "cuda" or torch.cuda.is_available(), "--device cuda asked for, but no CUDA GPU is available; use --device cpu")
    require(not (dev.type == "cpu" and cfg.dtype == torch.float16), "float16 is not supported on the CPU; use float32 or bfloat16")
    warnings.filterwarnings("ignore", message=".*not one of the official BitDance sizes.*")
    return dev


def _memory_fields(cfg: BenchConfig, dev: torch.device) -> dict:
    out = {"memory_cap_bytes": cfg.memory_cap_bytes, "memory_cap_simulated": dev.type != "cuda" and cfg.memory_cap_bytes is not None}
    if dev.type == "cuda":
        # "native" here; ComfyUI starts CUDA with "cudaMallocAsync" (PYTORCH_CUDA_ALLOC_CONF), which
        # counts peaks and graph memory its own way: the figures say which one they were measured with
        out["allocator_backend"] = torch.cuda.get_allocator_backend()
    if cfg.memory_cap_bytes is not None and dev.type == "cuda":
        from ..runtime.fitting import cap_device_memory

        out["memory_fraction"] = cap_device_memory(dev, cfg.memory_cap_bytes)
    return out


def _warmup_args(args, cfg: BenchConfig, dev):
    """CPU: a one-step warm-up (same shapes, lazy initialisations); GPU: a full one (graph capture,
    compilation), at `warmup_size` when given (the head's and the block step's shapes do not depend
    on the image size; each generation captures its own block-step graph anyway)."""
    prompt, h, w, steps, guidance, n, seed = args
    if cfg.warmup_size is not None:
        h, w = cfg.warmup_size
    return (prompt, h, w, steps if dev.type == "cuda" else 1, guidance, n, seed)


def _peaks(dev) -> dict:
    if dev.type != "cuda":
        return {}
    return {"allocated": torch.cuda.max_memory_allocated(dev), "reserved": torch.cuda.max_memory_reserved(dev)}


def run_bench(cfg: BenchConfig) -> dict:
    from ..formats.fp8 import matmul_report
    from ..runtime.graphs import HEAD_FORWARDS, cuda_graphs_available, enable_graphs
    from ..runtime.levers import apply_levers
    from ..runtime.planner import estimate_pipeline, measure_peak

    dev = _setup(cfg)
    shape = cfg.shape
    mem = _memory_fields(cfg, dev)  # the cap first: the build and the plan live under it
    decision = plan_bench(cfg) if cfg.planned else None
    host_note = _check_host_memory(cfg)
    t = time.perf_counter()
    try:
        pipe, off = build_pipeline(cfg)
    except torch.cuda.OutOfMemoryError as e:  # under a cap: the plan did not fit after all; say so in the JSON
        if cfg.memory_cap_bytes is None:
            raise
        return {"shape": cfg.extra.get("shape_name", "custom"), "device": str(dev), "device_name": _device_name(dev),
                "weights": cfg.weights, "offload": cfg.offload, "fp8": cfg.fp8, "fast": None, "build_s": time.perf_counter() - t,
                "decision": decision.as_dict() if decision is not None else None, **mem, **_peaks_json(dev),
                "error": f"out of memory while building the weights: {_first_line(e)}"}
    build_s = time.perf_counter() - t
    _progress(f"weights built in {build_s:.1f} s ({cfg.weights}, offload {cfg.offload})")
    prompt = pipe.encode_prompt(PROMPT)
    args = (prompt, shape.height, shape.width, shape.steps, shape.cfg, cfg.num_images, cfg.seed)
    use_graphs = cfg.graphs == "on" or (cfg.graphs == "auto" and cuda_graphs_available(dev))
    warmup = 1 if cfg.warmup is None else cfg.warmup
    plan = estimate_pipeline(pipe, shape.height, shape.width, cfg.num_images, shape.cfg, mode=cfg.offload,
                             prompt=PROMPT, budget_bytes=cfg.budget_bytes,
                             **({"resident_layers": cfg.resident_layers} if cfg.offload == "stream" else {}))

    results = {"fast": [], "naive": []}
    peaks = {}
    acc = enable_graphs(pipe) if use_graphs else None
    applied = apply_levers(pipe, cfg.levers, force_compile=True)
    # the compiled forwards, to take out for the naive runs and put back
    compiled = {(m, name): m.__dict__[name] for m, names in [(_bare(pipe.head.net), HEAD_FORWARDS)] +
                [(layer, ("forward",)) for layer in pipe.backbone.model.layers] for name in names if name in m.__dict__}

    def set_mode(mode):
        fast = mode == "fast"
        if acc is not None:
            acc.resume() if fast else acc.suspend()
        for (m, name), f in compiled.items():
            if fast:
                setattr(m, name, f)
            else:
                m.__dict__.pop(name, None)

    order = ["fast", "naive"] if cfg.naive and not cfg.profile_only else ["fast"]
    error = None
    profile = None
    try:
        for mode in order if not cfg.profile_only else []:
            set_mode(mode)
            for _ in range(warmup):
                time_generation(pipe, *_warmup_args(args, cfg, dev), batched_cfg=mode == "fast", decode=cfg.decode)
            _progress(f"{mode} mode warmed up")
        for r in range(cfg.repeat if not cfg.profile_only else 0):  # interleaved: a change in load hits both modes
            for mode in order:
                set_mode(mode)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                    torch.cuda.reset_peak_memory_stats(dev)
                times, _ = time_generation(pipe, *args, batched_cfg=mode == "fast", decode=cfg.decode)
                results[mode].append(times)
                _progress(f"{mode} run {r + 1}: {times.total_s:.2f} s")
                if dev.type == "cuda":
                    got = _peaks(dev)
                    old = peaks.get(mode, {"allocated": 0, "reserved": 0})
                    peaks[mode] = {k: max(old[k], got[k]) for k in got}
        if cfg.profile_out:
            set_mode("fast")
            profile = _write_profile(pipe, cfg, args)
    except torch.cuda.OutOfMemoryError as e:  # under a cap: report what was planned and how far it got
        if cfg.memory_cap_bytes is None:
            raise
        error = f"out of memory: {_first_line(e)}"
        peaks.setdefault("fast", _peaks(dev))
    set_mode("fast")
    if dev.type == "cpu" and cfg.measure_memory and error is None:
        from ..runtime.planner import ModelSizes

        resident = ModelSizes.of_pipeline(pipe).total if off is None else (off.stream.resident_bytes if off.stream else 0)
        _, peak = measure_peak(lambda: time_generation(pipe, *args, batched_cfg=True, decode=cfg.decode), "cpu")
        peaks["fast"] = {"allocated": resident + peak}

    def best(mode):
        runs = results[mode]
        return min(runs, key=lambda r: r.total_s) if runs else None

    fast, naive = best("fast"), best("naive")
    fast_peak, naive_peak = peaks.get("fast", {}), peaks.get("naive", {})
    out = {
        "shape": cfg.extra.get("shape_name", "custom"), "note": shape.note,
        "settings": {"height": shape.height, "width": shape.width, "steps": shape.steps, "cfg": shape.cfg,
                     "num_images": cfg.num_images, "blocks": _blocks(pipe, shape.height, shape.width),
                     "warmup_size": list(cfg.warmup_size) if cfg.warmup_size else None},
        "device": str(dev), "device_name": _device_name(dev),
        "threads": torch.get_num_threads(), "dtype": str(cfg.dtype).replace("torch.", ""), "fp8": cfg.fp8,
        "weights": cfg.weights, "q4": cfg.weights == "4bit",
        "fp8_matmul": cfg.fp8_matmul if cfg.weights != "as-is" else None, "offload": cfg.offload,
        "resident_layers": cfg.resident_layers if cfg.offload == "stream" else None, "graphs": use_graphs,
        "compile": cfg.compile, "levers": cfg.levers.spec() or "baseline", "levers_report": applied.report,
        "decode": cfg.decode, "torch": torch.__version__, "build_s": build_s,
        "fast": fast.to_json() if fast else None, "fast_runs_s": [r.total_s for r in results["fast"]],
        "naive": naive.to_json() if naive else None, "naive_runs_s": [r.total_s for r in results["naive"]],
        "ratio_naive_over_fast": (naive.s_per_image / fast.s_per_image) if naive and fast else None,
        "peak_memory_bytes": fast_peak.get("allocated"), "peak_reserved_bytes": fast_peak.get("reserved"),
        "naive_peak_memory_bytes": naive_peak.get("allocated"),
        "planner_peak_bytes": plan.peak_bytes, "planner": plan.describe(),
        "decision": decision.as_dict() if decision is not None else None, "error": error, **mem,
    }
    if cfg.weights != "as-is":
        out["fp8_matmul_report"] = matmul_report(pipe.backbone, pipe.head)
    if host_note is not None:
        out["host_memory_note"] = host_note
    if profile is not None:
        from .kernel_profile import format_profile

        out["profile_file"] = cfg.profile_out
        out["profile_summary"] = format_profile(profile)
    if acc is not None:
        out["graph_stats"] = _graph_stats(acc)
    if off is not None:
        out["offload_stats"] = {"loads": off.stats.loads, "bytes_moved": off.stats.bytes_moved,
                                "streamed_loads": off.stats.streamed_loads, "prefetch_hits": off.stats.prefetch_hits}
        out["host_memory"] = off.host_report()
    return out


def _write_profile(pipe, cfg: BenchConfig, args) -> dict:
    """The kernel profile (cli/kernel_profile.py) of the fast mode at the bench's size, written to cfg.profile_out."""
    import os

    from .kernel_profile import profile_generation

    prompt, h, w, steps, guidance, n, seed = args
    p = profile_generation(pipe, prompt, h, w, steps, guidance, n, seed)
    p.update({"shape": cfg.extra.get("shape_name", "custom"), "levers": cfg.levers.spec() or "baseline",
              "dtype": str(cfg.dtype).replace("torch.", ""), "torch": torch.__version__})
    if os.path.dirname(cfg.profile_out):
        os.makedirs(os.path.dirname(cfg.profile_out), exist_ok=True)
    with open(cfg.profile_out, "w") as f:
        json.dump(p, f, indent=1)
    return p


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _peaks_json(dev) -> dict:
    p = _peaks(dev)
    return {"peak_memory_bytes": p.get("allocated"), "peak_reserved_bytes": p.get("reserved")}


def _blocks(pipe, height, width) -> int:
    return (height // pipe.downsample) * (width // pipe.downsample) // pipe.parallel_num


def _device_name(dev) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"


def _graph_stats(acc) -> dict:
    return {"captures": acc.stats.captures, "replays": acc.stats.replays, "eager_calls": acc.stats.eager_calls,
            "failures": sorted({v.split("\n")[0][:200] for v in acc.stats.failures.values()})}


def format_report(r: dict) -> str:
    gib = 1 << 30
    st = r["settings"]
    lines = [f"BitDance bench: {r['shape']} ({r['note']}), {st['height']}x{st['width']}, {st['steps']} steps, cfg {st['cfg']}, "
             f"{st['num_images']} image(s), {st['blocks']} blocks",
             f"  device {r['device']} ({r['device_name']}, {r['threads']} threads), {r['dtype']}"
             f"{', fp8 ' + r['fp8_matmul'] if r['fp8'] else ''}{', 4bit (Q4_0 backbone, fp8 head)' if r.get('q4') else ''}, "
             f"offload {r['offload']}, graphs {'on' if r['graphs'] else 'off'}"
             f"{', levers ' + r['levers'] if r.get('levers', 'baseline') != 'baseline' else ''}; torch {r['torch']}; "
             f"built in {r['build_s']:.1f} s"]
    if r.get("memory_cap_bytes") is not None:
        lines.append(f"  memory cap {r['memory_cap_bytes'] / gib:.1f} GiB"
                     f"{' (simulated: planned as for a GPU, run on the CPU)' if r.get('memory_cap_simulated') else ''}")
    if r.get("decision"):
        lines.append(f"  plan: {r['decision']['summary']}")
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
        lines.append(f"  peak memory (measured): {r['peak_memory_bytes'] / gib:.3f} GiB allocated"
                     + (f", {r['peak_reserved_bytes'] / gib:.3f} GiB reserved" if r.get("peak_reserved_bytes") else ""))
    lines.append(f"  planner: {r['planner']}")
    if r.get("error"):
        lines.append(f"  error: {r['error']}")
    if "fp8_matmul_report" in r:
        lines.append(f"  fp8 linears: {r['fp8_matmul_report']}")
    if "graph_stats" in r:
        lines.append(f"  graphs: {r['graph_stats']}")
    if r.get("levers_report") and set(r["levers_report"]) != {"levers"}:
        lines.append(f"  levers: {r['levers_report']}")
    if r.get("profile_summary"):
        lines.append(f"  {r['profile_summary']}".replace("\n", "\n  ") + f"\n  (profile written to {r['profile_file']})")
    if "offload_stats" in r:
        lines.append(f"  offload: {r['offload_stats']}")
    if "host_memory" in r:
        lines.append(f"  host copies: {r['host_memory']}")
    if r.get("host_memory_note"):
        lines.append(f"  host memory: {r['host_memory_note']}")
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


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """What `bench` and `bench-sweep` share: the shape, device, dtype, sizes, warm-up, graphs."""
    from .synthetic import SHAPES

    p.add_argument("--shape", default="mid", choices=sorted(SHAPES) + ["custom"])
    p.add_argument("--device", type=options.device, default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--graphs", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--no-decode", action="store_true", help="time the generation only")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--warmup-size", default=None, help="warm up at SIZE or HEIGHTxWIDTH instead of the timed size")
    p.add_argument("--num-images", type=options.positive_int, default=1)
    p.add_argument("--height", type=options.positive_int, default=None)
    p.add_argument("--width", type=options.positive_int, default=None)
    p.add_argument("--steps", type=options.positive_int, default=None)
    p.add_argument("--cfg", type=options.non_negative_float, default=None)
    p.add_argument("--seed", type=options.seed, default=0)
    p.add_argument("--threads", type=options.positive_int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    g = p.add_argument_group("custom shape (--shape custom; unset values come from --base)")
    g.add_argument("--base", default="mid", choices=sorted(SHAPES))
    for name in ("layers", "hidden", "heads", "kv-heads", "head-dim", "intermediate", "vocab", "head-depth", "head-width",
                 "head-adaln", "parallel", "ae-ch"):
        g.add_argument(f"--{name}", type=int, default=None)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..formats.fp8_matmul import MATMUL_MODES
    from ..runtime import OFFLOAD_CHOICES, WEIGHTS_CHOICES

    add_common_arguments(p)
    p.add_argument("--weights", default="as-is", choices=list(WEIGHTS_CHOICES),
                   help="as-is, fp8 (backbone and head linears in float8_e4m3fn), or auto: planned as the t2i command "
                        "plans (for this size and batch, against the free memory or --memory-cap-gb)")
    p.add_argument("--fp8", action="store_true", help="the same as --weights fp8")
    p.add_argument("--q4", action="store_true", help="the same as --weights 4bit (backbone linears GGUF Q4_0, head fp8)")
    p.add_argument("--fp8-matmul", default="auto", choices=list(MATMUL_MODES), help="the fp8 linears' matmul path")
    p.add_argument("--offload", default="none", choices=list(OFFLOAD_CHOICES), help="auto: planned (see --weights)")
    p.add_argument("--memory-cap-gb", type=float, default=None,
                   help="cap this process's CUDA memory at N GiB (torch.cuda.set_per_process_memory_fraction) and plan "
                        "auto settings against it; on the CPU: planned as for a GPU with N GiB free")
    p.add_argument("--resident-layers", type=int, default=None, help="stream: backbone layers kept on the device")
    p.add_argument("--budget-gb", type=float, default=None, help="stage offload: GiB the weights may occupy")
    add_lever_arguments(p)
    p.add_argument("--no-naive", action="store_true", help="skip the naive-mode run")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--measure-memory", action="store_true", help="CPU: one extra run under the allocation profiler")
    p.add_argument("--profile-out", default=None, metavar="FILE",
                   help="write where each millisecond of a head pass and a backbone step goes (torch.profiler; JSON)")
    p.add_argument("--profile-only", action="store_true", help="with --profile-out: profile only, no timed runs")


def add_lever_arguments(p: argparse.ArgumentParser) -> None:
    """The speed levers (runtime/levers.py), each alone, or several as --levers SPEC."""
    from ..models.attention import SDPA_BACKENDS
    from ..runtime.levers import COMPILE_MODES, COMPILE_TARGETS, GEMM_CHOICES, GQA_LAYOUTS

    g = p.add_argument_group("speed levers (issue 11; docs/performance.md)")
    g.add_argument("--compile", nargs="?", const="all", default=None, choices=[c for c in COMPILE_TARGETS if c != "off"],
                   help="torch.compile: head, step (the static block step), loop (head + step), backbone (layers + step) "
                        "or all (the default when given alone: head, layers and step)")
    g.add_argument("--compile-mode", default=None, choices=list(COMPILE_MODES),
                   help="Inductor mode (default: max-autotune-no-cudagraphs)")
    g.add_argument("--fuse-projections", action="store_const", const=True, default=None,
                   help="the backbone's q/k/v and gate/up projections as one GEMM each (fused after loading)")
    g.add_argument("--gemm", default=None, choices=list(GEMM_CHOICES),
                   help="cublaslt: PyTorch's preferred BLAS; autotune[-splitk]: each linear compiled with max-autotune "
                        "(with Inductor's split-K offered)")
    g.add_argument("--sdpa-backend", default=None, choices=list(SDPA_BACKENDS), help="the block step's SDPA backend")
    g.add_argument("--gqa", default=None, choices=list(GQA_LAYOUTS),
                   help="grouped-query layout of the block step: stack (the shared heads along the queries) or native (enable_gqa)")
    g.add_argument("--step-cache", default=None, choices=["on", "off"],
                   help="the head's per-call cache of the condition's and the time grid's embeddings (exact; default on)")
    g.add_argument("--levers", default=None, help="several at once, as bench-sweep variants write them, e.g. fuse+compile=head")


def levers_from_args(a) -> Levers:
    """--levers SPEC, then each lever flag given on top of it."""
    lv = Levers.parse(getattr(a, "levers", None))
    flags = {"compile": getattr(a, "compile", None), "compile_mode": getattr(a, "compile_mode", None),
             "fuse": getattr(a, "fuse_projections", None), "gemm": getattr(a, "gemm", None),
             "sdpa": getattr(a, "sdpa_backend", None), "gqa": getattr(a, "gqa", None),
             "step_cache": None if getattr(a, "step_cache", None) is None else a.step_cache == "on"}
    return replace(lv, **{k: v for k, v in flags.items() if v is not None})


def _size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.lower().split("x")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise BitDanceError(f"--warmup-size '{text}': write SIZE or HEIGHTxWIDTH, e.g. 256") from None
    require(len(nums) in (1, 2) and min(nums) > 0, f"--warmup-size '{text}': write SIZE or HEIGHTxWIDTH, e.g. 256")
    return (nums[0], nums[-1])


def config_from_args(a) -> BenchConfig:
    """A BenchConfig from `bench`'s (or, with the single-run options left at their defaults, `bench-sweep`'s) arguments."""
    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[a.dtype] if a.dtype else (torch.bfloat16 if dev.startswith("cuda") else torch.float32)
    repeat, cap = getattr(a, "repeat", 1), getattr(a, "memory_cap_gb", None)
    budget = getattr(a, "budget_gb", None)
    require(repeat >= 1, f"--repeat must be >= 1, got {repeat}")
    require(not getattr(a, "profile_only", False) or getattr(a, "profile_out", None), "--profile-only needs --profile-out FILE")
    require(a.num_images >= 1, f"--num-images must be >= 1, got {a.num_images}")
    require(cap is None or cap > 0, f"--memory-cap-gb must be > 0, got {cap}")
    return BenchConfig(shape=shape_from_args(a), device=dev, dtype=dtype,
                       weights=_weights_of(a),
                       fp8_matmul=getattr(a, "fp8_matmul", "auto"), offload=getattr(a, "offload", "none"),
                       resident_layers=getattr(a, "resident_layers", None),
                       budget_bytes=int(budget * (1 << 30)) if budget is not None else None,
                       graphs=a.graphs, levers=levers_from_args(a), naive=not getattr(a, "no_naive", True),
                       decode=not a.no_decode, repeat=repeat, warmup=a.warmup, warmup_size=_size(a.warmup_size),
                       measure_memory=getattr(a, "measure_memory", False), seed=a.seed, num_images=a.num_images,
                       threads=a.threads, memory_cap_bytes=int(cap * (1 << 30)) if cap is not None else None,
                       profile_out=getattr(a, "profile_out", None), profile_only=getattr(a, "profile_only", False),
                       extra={"shape_name": a.shape})


def cmd_bench(a) -> None:
    r = run_bench(config_from_args(a))
    if a.json:
        print(json.dumps(r, indent=1))
    elif "settings" in r:
        print(format_report(r))
    if r.get("error"):
        raise BitDanceError(f"bench: {r['error']}")


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark a random-weight model at a named shape (no download)")
    add_arguments(p)
    p.set_defaults(func=cmd_bench)


__all__ = ["BenchConfig", "StageTimes", "format_report", "plan_bench", "register", "run_bench", "time_generation", "BitDanceError"]
