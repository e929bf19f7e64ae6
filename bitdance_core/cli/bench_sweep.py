"""`python -m bitdance_core bench-sweep`: several weight/matmul/lever variants timed on the same
random weights in one process, for choosing the fp8 path and the speed levers by measurement
(docs/performance.md, "fp8" and "Issue 11").

The weights are built once as the first variant's (as-is, or fp8), on the device. As-is variants
run first; the backbone's and the head's big linears are then quantised to fp8 in place and each
fp8 matmul mode (formats/fp8_matmul.py) runs in turn, optionally with the whole model compiled
("+compile"). Each variant runs every `--runs` spec (images x size) once after a warm-up; one JSON
line per run is appended to `--jsonl` as it finishes, so a time limit loses only the run in
progress. A variant past `--variant-timeout`, or started after `--deadline`, is recorded as such and
the sweep goes on; so is a mode this GPU or build cannot run (with its error).

A variant may carry speed levers after its weights (runtime/levers.py: "as-is+fuse",
"as-is+compile=head+compile-mode=default", "as-is+sdpa=efficient", ...; "+compile" alone is
compile=all, as before), switched on after the CUDA graphs and off again after the variant. With
`--bits`, the eager path (no graphs, no levers, the step cache off) first generates each 1-image run
once at the sweep's seed; every variant's 1-image run then records how many bits differ from it and
how many AR blocks came out identical before the first difference. The eager run is recorded too
(variant "reference (eager)"): against the "as-is" variant it is what the CUDA graphs are worth.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace

import torch

from ..errors import BitDanceError, require
from ..runtime.levers import Levers
from .bench import (PROMPT, BenchConfig, _check_host_memory, _device_name, _graph_stats, _peaks, _setup, _warmup_args,
                    add_common_arguments, build_pipeline, config_from_args, time_generation)
from .common import JsonlRecords


@dataclass
class Variant:
    """One line of a sweep: weights "as-is" or "fp8" with a matmul mode, and speed levers
    (compile=True: the levers' compile=all, as "+compile" has always meant)."""

    weights: str
    matmul: str | None = None
    compile: bool = False
    levers: Levers = field(default_factory=Levers)

    def __post_init__(self):
        if self.compile and self.levers.compile == "off":
            self.levers = replace(self.levers, compile="all")
        self.compile = self.levers.compile != "off"

    @property
    def name(self) -> str:
        spec = self.levers.spec()
        return (self.weights if self.matmul is None else f"{self.weights}:{self.matmul}") + ("+" + spec if spec else "")


def parse_variants(text: str) -> list[Variant]:
    """"as-is,as-is+fuse,fp8:scaled_mm,fp8:weight_only_compiled+compile" -> variants (as-is before
    any fp8: the weights are quantised in place, once; levers after a "+", runtime/levers.py)."""
    from ..formats.fp8_matmul import MATMUL_MODES

    out = []
    for item in [t.strip() for t in text.split(",") if t.strip()]:
        body, plus, rest = item.partition("+")
        try:
            levers = Levers.parse(rest)
        except BitDanceError as e:
            raise BitDanceError(f"sweep variant '{item}': {e}") from None
        weights, _, matmul = body.partition(":")
        require(weights in ("as-is", "fp8"), f"sweep variant '{item}': weights must be as-is or fp8")
        if weights == "fp8":
            matmul = matmul or "auto"
            require(matmul in MATMUL_MODES, f"sweep variant '{item}': fp8 matmul '{matmul}' unknown; choose one of "
                                            f"{list(MATMUL_MODES)}")
        else:
            require(not matmul, f"sweep variant '{item}': as-is weights take no matmul mode")
        out.append(Variant(weights, matmul or None, levers=levers))
    require(out, "--sweep needs at least one variant")
    first_fp8 = next((i for i, v in enumerate(out) if v.weights == "fp8"), len(out))
    require(all(v.weights == "fp8" for v in out[first_fp8:]),
            "--sweep: as-is variants must come before the fp8 ones (the weights are quantised in place once)")
    return out


def parse_runs(text: str, shape) -> list[tuple[int, int, int]]:
    """"1x1024,8x512x256" -> [(images, height, width)] ("N" alone: the shape's size)."""
    out = []
    for item in [t.strip() for t in text.split(",") if t.strip()]:
        parts = item.split("x")
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            raise BitDanceError(f"--runs item '{item}': write IMAGESxSIZE or IMAGESxHEIGHTxWIDTH, e.g. 8x512") from None
        require(1 <= len(nums) <= 3 and nums[0] >= 1, f"--runs item '{item}': write IMAGESxSIZE or IMAGESxHEIGHTxWIDTH")
        n = nums[0]
        h = nums[1] if len(nums) > 1 else shape.height
        w = nums[2] if len(nums) > 2 else h if len(nums) > 1 else shape.width
        out.append((n, h, w))
    require(out, "--runs needs at least one IMAGESxSIZE")
    return out


class VariantTimeout(BaseException):
    """Raised by the alarm of --variant-timeout (a BaseException: no `except Exception` swallows it)."""


def _alarm(seconds: float | None):
    import contextlib
    import signal
    import threading

    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def limit():
        def fire(*_):
            raise VariantTimeout(f"timed out after {seconds:g} s")
        old = signal.signal(signal.SIGALRM, fire)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    return limit()


def quantize_pipeline_(pipe, matmul: str = "auto") -> int:
    """The backbone's and the head's big linears quantised to fp8 in place (the loaders' selection),
    on whatever device they are. Returns how many were swapped."""
    from ..formats.fp8 import quantize_linears

    n = len(quantize_linears(pipe.backbone, matmul=matmul)) + len(quantize_linears(pipe.head, matmul=matmul))
    if torch.device(pipe.device).type == "cuda":
        torch.cuda.empty_cache()  # the 16-bit weights' blocks: not counted against the next runs' reserved peak
    return n


def bits_difference(bits: torch.Tensor, ref: torch.Tensor, block_side: int) -> dict:
    """How many of the ±1 bits differ, and how many AR blocks (in generation order) are identical
    before the first that differs."""
    from ..models.positions import raster_to_blocks

    diff = bits.to(ref.device) != ref
    per_block = raster_to_blocks(diff.float(), block_side)  # [B, tokens in block order, C]
    b, n, c = per_block.shape
    blocks = per_block.reshape(b, n // (block_side * block_side), -1).sum(dim=(0, 2))
    bad = (blocks > 0).nonzero()
    return {"bits_differ": int(diff.sum()), "bits_total": diff.numel(),
            "blocks_identical": int(bad[0, 0]) if len(bad) else int(blocks.numel()), "blocks": int(blocks.numel())}


def eager_reference(pipe, prompt, runs, cfg: BenchConfig) -> dict:
    """{(h, w): (bits, StageTimes)} of the eager path (no graphs, no levers, no step cache) for each
    1-image run, at the sweep's seed."""
    from ..runtime.levers import apply_levers

    out = {}
    applied = apply_levers(pipe, Levers(step_cache=False))
    try:
        for n_img, h, w in runs:
            if n_img == 1 and (h, w) not in out:
                args = (prompt, h, w, cfg.shape.steps, cfg.shape.cfg, 1, cfg.seed)
                for _ in range(1 if cfg.warmup is None else cfg.warmup):  # lazy initialisations out of its time
                    time_generation(pipe, *_warmup_args(args, cfg, torch.device(pipe.device)), decode=cfg.decode)
                times, bits = time_generation(pipe, *args, decode=cfg.decode)
                out[(h, w)] = (bits, times)
    finally:
        applied.remove()
    return out


def run_sweep(cfg: BenchConfig, variants: list[Variant], runs: list[tuple[int, int, int]], jsonl: str | None = None,
              variant_timeout_s: float | None = None, deadline_s: float | None = None, emit=None,
              bits: bool = False) -> dict:
    """Each variant in turn on the same random weights (built as the first variant's weights, on the
    device, no offload), each run spec timed once after a warm-up. One record per (variant, run),
    appended to `jsonl` as it finishes; a variant past its time limit, or started after
    `deadline_s` of the sweep, is recorded as such and the sweep goes on. bits: compare each
    1-image run with the eager path's bits (see the module docstring)."""
    from ..formats.fp8 import Fp8Linear, matmul_report, set_matmul
    from ..runtime.graphs import cuda_graphs_available, enable_graphs
    from ..runtime.levers import apply_levers
    from ..runtime.planner import estimate_pipeline

    require(cfg.offload == "none", "--sweep times the models on the device: use it without --offload")
    dev = _setup(cfg)
    t_start = time.perf_counter()
    cfg.weights, cfg.fp8 = variants[0].weights, variants[0].weights == "fp8"
    if cfg.fp8:
        cfg.fp8_matmul = variants[0].matmul or "auto"
    _check_host_memory(cfg)
    pipe, _ = build_pipeline(cfg)
    build_s = time.perf_counter() - t_start
    prompt = pipe.encode_prompt(PROMPT)
    shape = cfg.shape
    use_graphs = cfg.graphs == "on" or (cfg.graphs == "auto" and cuda_graphs_available(dev))
    warmup = 1 if cfg.warmup is None else cfg.warmup
    head = {"shape": cfg.extra.get("shape_name", "custom"), "device": str(dev), "device_name": _device_name(dev),
            "dtype": str(cfg.dtype).replace("torch.", ""), "torch": torch.__version__, "steps": shape.steps,
            "cfg": shape.cfg, "graphs": use_graphs, "build_s": build_s}
    record = JsonlRecords(head, jsonl, emit)

    refs = {}
    if bits:
        t = time.perf_counter()
        try:
            with _alarm(variant_timeout_s):
                refs = eager_reference(pipe, prompt, runs, cfg)
            for (h, w), (_bits, times) in refs.items():
                record({"variant": "reference (eager)", "images": 1, "height": h, "width": w, "levers": "eager, step-cache=off",
                        **times.to_json()})
        except (Exception, VariantTimeout) as e:
            record({"variant": "reference (eager)", "error": _error_text(e), "elapsed_s": time.perf_counter() - t})

    for v in variants:
        if deadline_s is not None and time.perf_counter() - t_start > deadline_s:
            record({"variant": v.name, "skipped": f"the sweep's {deadline_s:g} s had passed"})
            continue
        acc, applied, t_variant = None, None, time.perf_counter()
        try:
            with _alarm(variant_timeout_s):
                if v.weights == "fp8" and not any(isinstance(m, Fp8Linear) for m in pipe.backbone.modules()):
                    t = time.perf_counter()
                    n = quantize_pipeline_(pipe)
                    head["quantize_s"], head["fp8_linears"] = time.perf_counter() - t, n
                if v.weights == "fp8":
                    set_matmul(pipe.backbone, v.matmul)
                    set_matmul(pipe.head, v.matmul)
                acc = enable_graphs(pipe) if use_graphs else None
                applied = apply_levers(pipe, v.levers, force_compile=True)
                for n_img, h, w in runs:
                    args = (prompt, h, w, shape.steps, shape.cfg, n_img, cfg.seed)
                    t = time.perf_counter()
                    for _ in range(warmup):
                        time_generation(pipe, *_warmup_args(args, cfg, dev), decode=cfg.decode)
                    warm_s = time.perf_counter() - t
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                        torch.cuda.reset_peak_memory_stats(dev)
                    times, out_bits = time_generation(pipe, *args, decode=cfg.decode)
                    pk = _peaks(dev)
                    plan = estimate_pipeline(pipe, h, w, n_img, shape.cfg, prompt=PROMPT)
                    r = {"variant": v.name, "images": n_img, "height": h, "width": w, "warmup_s": warm_s,
                         **times.to_json(), "peak_memory_bytes": pk.get("allocated"),
                         "peak_reserved_bytes": pk.get("reserved"), "planner_peak_bytes": plan.peak_bytes,
                         "levers": v.levers.spec() or "baseline", "levers_report": applied.report}
                    if n_img == 1 and (h, w) in refs:
                        r.update(bits_difference(out_bits, refs[(h, w)][0], pipe.block_side))
                    if v.weights == "fp8":
                        r["fp8_matmul_report"] = matmul_report(pipe.backbone, pipe.head)
                    if acc is not None:
                        r["graph_stats"] = _graph_stats(acc)
                    record(r)
        except VariantTimeout as e:
            record({"variant": v.name, "error": str(e), "elapsed_s": time.perf_counter() - t_variant})
        except Exception as e:  # a mode this GPU or build cannot run: say so, go on with the next
            record({"variant": v.name, "error": _error_text(e), "elapsed_s": time.perf_counter() - t_variant})
        finally:
            if applied is not None:
                applied.remove()
            if acc is not None:
                acc.remove()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
    return {**head, "variants": [v.name for v in variants], "runs": [list(r) for r in runs], "records": record.records,
            "total_s": time.perf_counter() - t_start}


def _error_text(e: BaseException) -> str:
    if isinstance(e, VariantTimeout):
        return str(e)
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def sweep_line(rec: dict, base: float | None = None) -> str:
    """One record of a sweep as a line (base: the first variant's s/image at the same run, for the ratio)."""
    if "s_per_image" not in rec:
        return f"  {rec['variant']:<32} {rec.get('error') or rec.get('skipped')}"
    gib = 1 << 30
    peak = f"{rec['peak_memory_bytes'] / gib:.2f} GiB" if rec.get("peak_memory_bytes") else "-"
    fb = rec.get("fp8_matmul_report", {}).get("fallbacks")
    ratio = f" ({rec['s_per_image'] / base:.2f}x the first)" if base else ""
    return (f"  {rec['variant']:<32} {rec['images']} x {rec['height']}x{rec['width']}: {rec['s_per_image']:.3f} s/image{ratio}, "
            f"backbone/block {rec['backbone_per_block_s'] * 1e3:.1f} ms, head/block {rec['head_per_block_s'] * 1e3:.1f} ms, "
            f"peak {peak}" + (f", {fb} fp8 fallbacks" if fb else "")
            + (f", {rec['bits_differ']}/{rec['bits_total']} bits differ ({rec['blocks_identical']}/{rec['blocks']} blocks "
               "identical)" if "bits_differ" in rec else ""))


def format_sweep(r: dict) -> str:
    """A table: one line per (variant, run), with s/image relative to the first variant's same run
    (the eager reference of --bits excluded)."""
    lines = [f"BitDance bench sweep: {r['shape']} on {r['device_name']}, {r['dtype']}, {r['steps']} steps, cfg {r['cfg']}, "
             f"graphs {'on' if r['graphs'] else 'off'}; build {r['build_s']:.1f} s"]
    base = {}
    for rec in r["records"]:
        if "s_per_image" in rec and not rec["variant"].startswith("reference"):
            base.setdefault((rec["images"], rec["height"], rec["width"]), rec["s_per_image"])
        if "s_per_image" in rec:
            lines.append(sweep_line(rec, base.get((rec["images"], rec["height"], rec["width"]))))
        else:
            lines.append(sweep_line(rec))
    return "\n".join(lines)


def cmd_sweep(a) -> None:
    cfg = config_from_args(a)
    runs = parse_runs(a.runs, cfg.shape) if a.runs else [(cfg.num_images, cfg.shape.height, cfg.shape.width)]
    r = run_sweep(cfg, parse_variants(a.variants), runs, jsonl=a.jsonl, variant_timeout_s=a.variant_timeout,
                  deadline_s=a.deadline, emit=None if a.json else lambda rec: print(sweep_line(rec), flush=True),
                  bits=a.bits)
    print(json.dumps(r, indent=1) if a.json else format_sweep(r))


def register(subparsers) -> None:
    p = subparsers.add_parser("bench-sweep", help="time several weight/fp8-matmul variants on the same random weights")
    add_common_arguments(p)
    p.add_argument("--variants", required=True,
                   help="comma-separated: as-is, fp8:MODE, each optionally +LEVER[+LEVER...] (runtime/levers.py; as-is "
                        "first), e.g. as-is,as-is+fuse,as-is+compile=head,fp8:scaled_mm,fp8:torchao+compile")
    p.add_argument("--runs", default=None, help="comma-separated IMAGESxSIZE[xWIDTH] timed per variant, e.g. 1x1024,8x512 "
                                                "(default: --num-images at the shape's size)")
    p.add_argument("--jsonl", default=None, help="append one JSON line per run to this file as it finishes")
    p.add_argument("--variant-timeout", type=float, default=None, help="seconds per variant (then the next one)")
    p.add_argument("--deadline", type=float, default=None, help="seconds after which no further variant starts")
    p.add_argument("--bits", action="store_true",
                   help="generate each 1-image run eagerly first (no graphs, no levers) and count the bits each variant changes")
    p.set_defaults(func=cmd_sweep)


__all__ = ["Variant", "format_sweep", "parse_runs", "parse_variants", "register", "run_sweep", "sweep_line", "BitDanceError"]
