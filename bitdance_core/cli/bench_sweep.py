"""`python -m bitdance_core bench-sweep`: several weight/matmul variants timed on the same random
weights in one process, for choosing the fp8 path by measurement (docs/performance.md, "fp8").

The weights are built once as the first variant's (as-is, or fp8), on the device. As-is variants
run first; the backbone's and the head's big linears are then quantised to fp8 in place and each
fp8 matmul mode (formats/fp8_matmul.py) runs in turn, optionally with the whole model compiled
("+compile"). Each variant runs every `--runs` spec (images x size) once after a warm-up; one JSON
line per run is appended to `--jsonl` as it finishes, so a time limit loses only the run in
progress. A variant past `--variant-timeout`, or started after `--deadline`, is recorded as such and
the sweep goes on; so is a mode this GPU or build cannot run (with its error).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch

from ..errors import BitDanceError, require
from .bench import (PROMPT, BenchConfig, _check_host_memory, _device_name, _graph_stats, _peaks, _setup, _warmup_args,
                    add_common_arguments, build_pipeline, config_from_args, time_generation)


@dataclass
class Variant:
    """One line of a sweep: weights "as-is" or "fp8" with a matmul mode, optionally torch.compile'd."""

    weights: str
    matmul: str | None = None
    compile: bool = False

    @property
    def name(self) -> str:
        return (self.weights if self.matmul is None else f"{self.weights}:{self.matmul}") + ("+compile" if self.compile else "")


def parse_variants(text: str) -> list[Variant]:
    """"as-is,fp8:scaled_mm,fp8:weight_only_compiled+compile" -> variants (as-is before any fp8:
    the weights are quantised in place, once)."""
    from ..formats.fp8_matmul import MATMUL_MODES

    out = []
    for item in [t.strip() for t in text.split(",") if t.strip()]:
        body, plus, rest = item.partition("+")
        require(not plus or rest == "compile", f"sweep variant '{item}': only '+compile' may follow")
        weights, _, matmul = body.partition(":")
        require(weights in ("as-is", "fp8"), f"sweep variant '{item}': weights must be as-is or fp8")
        if weights == "fp8":
            matmul = matmul or "auto"
            require(matmul in MATMUL_MODES, f"sweep variant '{item}': fp8 matmul '{matmul}' unknown; choose one of "
                                            f"{list(MATMUL_MODES)}")
        else:
            require(not matmul, f"sweep variant '{item}': as-is weights take no matmul mode")
        out.append(Variant(weights, matmul or None, bool(plus)))
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


def run_sweep(cfg: BenchConfig, variants: list[Variant], runs: list[tuple[int, int, int]], jsonl: str | None = None,
              variant_timeout_s: float | None = None, deadline_s: float | None = None, emit=None) -> dict:
    """Each variant in turn on the same random weights (built as the first variant's weights, on the
    device, no offload), each run spec timed once after a warm-up. One record per (variant, run),
    appended to `jsonl` as it finishes; a variant past its time limit, or started after
    `deadline_s` of the sweep, is recorded as such and the sweep goes on."""
    from ..formats.fp8 import Fp8Linear, matmul_report, set_matmul
    from ..runtime.graphs import cuda_graphs_available, disable_compile, enable_compile, enable_graphs
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
    records = []

    def record(r: dict) -> None:
        r = {**head, **r}
        records.append(r)
        if jsonl:
            with open(jsonl, "a") as f:
                f.write(json.dumps(r) + "\n")
        if emit:
            emit(r)

    for v in variants:
        if deadline_s is not None and time.perf_counter() - t_start > deadline_s:
            record({"variant": v.name, "skipped": f"the sweep's {deadline_s:g} s had passed"})
            continue
        acc, t_variant = None, time.perf_counter()
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
                if v.compile:
                    enable_compile(pipe, force=True)
                for n_img, h, w in runs:
                    args = (prompt, h, w, shape.steps, shape.cfg, n_img, cfg.seed)
                    t = time.perf_counter()
                    for _ in range(warmup):
                        time_generation(pipe, *_warmup_args(args, cfg, dev), decode=cfg.decode)
                    warm_s = time.perf_counter() - t
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                        torch.cuda.reset_peak_memory_stats(dev)
                    times, _ = time_generation(pipe, *args, decode=cfg.decode)
                    pk = _peaks(dev)
                    plan = estimate_pipeline(pipe, h, w, n_img, shape.cfg, prompt=PROMPT)
                    r = {"variant": v.name, "images": n_img, "height": h, "width": w, "warmup_s": warm_s,
                         **times.to_json(), "peak_memory_bytes": pk.get("allocated"),
                         "peak_reserved_bytes": pk.get("reserved"), "planner_peak_bytes": plan.peak_bytes}
                    if v.weights == "fp8":
                        r["fp8_matmul_report"] = matmul_report(pipe.backbone, pipe.head)
                    if acc is not None:
                        r["graph_stats"] = _graph_stats(acc)
                    record(r)
        except VariantTimeout as e:
            record({"variant": v.name, "error": str(e), "elapsed_s": time.perf_counter() - t_variant})
        except Exception as e:  # a mode this GPU or build cannot run: say so, go on with the next
            record({"variant": v.name, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}",
                    "elapsed_s": time.perf_counter() - t_variant})
        finally:
            if v.compile:
                disable_compile(pipe)
            if acc is not None:
                acc.remove()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
    return {**head, "variants": [v.name for v in variants], "runs": [list(r) for r in runs], "records": records,
            "total_s": time.perf_counter() - t_start}


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
            f"peak {peak}" + (f", {fb} fp8 fallbacks" if fb else ""))


def format_sweep(r: dict) -> str:
    """A table: one line per (variant, run), with s/image relative to the first variant's same run."""
    lines = [f"BitDance bench sweep: {r['shape']} on {r['device_name']}, {r['dtype']}, {r['steps']} steps, cfg {r['cfg']}, "
             f"graphs {'on' if r['graphs'] else 'off'}; build {r['build_s']:.1f} s"]
    base = {}
    for rec in r["records"]:
        if "s_per_image" in rec:
            base.setdefault((rec["images"], rec["height"], rec["width"]), rec["s_per_image"])
            lines.append(sweep_line(rec, base[(rec["images"], rec["height"], rec["width"])]))
        else:
            lines.append(sweep_line(rec))
    return "\n".join(lines)


def cmd_sweep(a) -> None:
    cfg = config_from_args(a)
    runs = parse_runs(a.runs, cfg.shape) if a.runs else [(cfg.num_images, cfg.shape.height, cfg.shape.width)]
    r = run_sweep(cfg, parse_variants(a.variants), runs, jsonl=a.jsonl, variant_timeout_s=a.variant_timeout,
                  deadline_s=a.deadline, emit=None if a.json else lambda rec: print(sweep_line(rec), flush=True))
    print(json.dumps(r, indent=1) if a.json else format_sweep(r))


def register(subparsers) -> None:
    p = subparsers.add_parser("bench-sweep", help="time several weight/fp8-matmul variants on the same random weights")
    add_common_arguments(p)
    p.add_argument("--variants", required=True,
                   help="comma-separated: as-is, fp8:MODE, fp8:MODE+compile (as-is first), e.g. as-is,fp8:scaled_mm,fp8:torchao")
    p.add_argument("--runs", default=None, help="comma-separated IMAGESxSIZE[xWIDTH] timed per variant, e.g. 1x1024,8x512 "
                                                "(default: --num-images at the shape's size)")
    p.add_argument("--jsonl", default=None, help="append one JSON line per run to this file as it finishes")
    p.add_argument("--variant-timeout", type=float, default=None, help="seconds per variant (then the next one)")
    p.add_argument("--deadline", type=float, default=None, help="seconds after which no further variant starts")
    p.set_defaults(func=cmd_sweep)


__all__ = ["Variant", "format_sweep", "parse_runs", "parse_variants", "register", "run_sweep", "sweep_line", "BitDanceError"]
