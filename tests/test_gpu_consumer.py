"""benchmarks/gpu_consumer.sh (the issue-10 GPU script) through its DRY mode: the same steps and
the same code on the CPU, with a small model and caps simulated (planned as for a GPU with that
much free memory, run on the CPU). Checks the JSON it writes and the summary it prints; and the
bench under a simulated cap on its own."""
import functools
import json
import os
import subprocess
import sys

import torch

from bitdance_core.cli.bench import BenchConfig, format_report, run_bench
from bitdance_core.cli.synthetic import custom_shape
from bitdance_core.errors import BitDanceError
from bitdance_core.runtime.fitting import plan_for
from paths import cpu_fp8_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1 << 30
# the script's DRY model (its COMMON arguments): weights, not activations, fill the memory
SHAPE = custom_shape("tiny", layers=4, hidden=512, heads=8, kv_heads=4, intermediate=2048, head_width=256,
                     height=128, width=128, steps=2)
PLAN_KW = dict(device="cuda", height=128, width=128, num_images=1, cfg=SHAPE.cfg, dtype=torch.bfloat16)


def _decision(free):
    try:
        d = plan_for((SHAPE.llm, SHAPE.head, SHAPE.ae), free, **PLAN_KW)
    except BitDanceError:
        return None
    return d


def _rank(d):
    """Orders decisions by how much they keep on the device: nothing fits < streaming k layers < 4bit < fp8 < as-is."""
    if d is None:
        return -1
    if d.offload == "stream":
        return d.resident_layers
    return {("4bit", "none"): 75, ("fp8", "none"): 100, ("as-is", "none"): 200}.get((d.weights, d.offload), 50)


def _smallest_free(rank, lo=int(0.5 * GiB), hi=int(0.7 * GiB)):
    """The smallest free figure whose decision ranks at least `rank` (the ranks grow with free memory)."""
    while hi - lo > 1 << 14:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _rank(_decision(mid)) >= rank else (mid, hi)
    return hi


@functools.lru_cache(maxsize=1)
def _caps():
    """Three caps (bytes) inside the bands of: as-is no offload, fp8 no offload, streaming 3 of 4 layers (in
    the smallest format: 4bit, the planner's choice once nothing fits without offloading)."""
    asis, fp8, k1, k2 = _smallest_free(200), _smallest_free(100), _smallest_free(1), _smallest_free(2)
    return (asis + (1 << 20), (fp8 + asis) // 2, (k1 + k2) // 2)


def test_bench_under_a_simulated_cap_runs_what_it_planned():
    """On the CPU a cap is planned for as a GPU with that much free; the run builds and times what
    was planned (here: quantised weights, 3 of 4 layers streamed)."""
    free = _caps()[2]
    want = _decision(free)
    assert want.weights in ("fp8", "4bit") and (want.offload, want.resident_layers) == ("stream", 1)
    r = run_bench(BenchConfig(shape=SHAPE, dtype=torch.bfloat16, weights="auto", offload="auto", memory_cap_bytes=free,
                              naive=False, warmup=0, measure_memory=True, threads=1, extra={"shape_name": "custom"}))
    assert r["memory_cap_simulated"] and r["memory_cap_bytes"] == free and r["error"] is None
    assert r["decision"]["summary"] == want.summary()
    assert (r["weights"], r["offload"], r["resident_layers"], r["fp8"]) == (want.weights, "stream", 1, want.weights == "fp8")
    assert r["offload_stats"]["streamed_loads"] > 0 and r["fast"]["s_per_image"] > 0 and r["peak_memory_bytes"] > 0
    assert r["fp8_matmul_report"]["layers"] > 0 and r["fp8_matmul_report"]["fallbacks"] == 0
    assert set(r["fp8_matmul_report"]["paths"]) == {"dequant"}  # "auto" on the CPU
    assert r["host_memory"]["how"] == {}  # no CUDA here: nothing is page-locked (and nothing claims to be)
    text = format_report(r)
    assert "(simulated: planned as for a GPU, run on the CPU)" in text and f"plan: weights {want.weights}, offload stream" in text


def test_gpu_consumer_script_dry_run(tmp_path):
    caps = _caps()
    want = [_decision(c) for c in caps]
    assert len({(d.weights, d.offload, d.resident_layers) for d in want}) == 3
    out = tmp_path / "out"
    env = {**os.environ, "DRY": "1", "OUT": str(out), "PY": sys.executable,
           "CAPS": " ".join(f"{c / GiB:.9f}" for c in caps)}
    res = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_consumer.sh")], env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert len(files) <= 8  # what a device call brings back
    assert {"fp8_sweep.jsonl", "stream.json", "log.txt"} <= set(files)
    # 1. the caps: each planned as plan_for plans that much free memory, run, timed, measured
    cap_files = sorted((f for f in files if f.startswith("cap")), key=lambda f: -float(f[3:-5]))
    assert len(cap_files) == 3
    for f, cap, d in zip(cap_files, caps, want):
        r = json.loads((out / f).read_text())
        assert r["memory_cap_simulated"] and abs(r["memory_cap_bytes"] - cap) < 1 << 10 and r["error"] is None
        got = r["decision"]
        assert (got["weights"], got["offload"], got["resident_layers"]) == (d.weights, d.offload, d.resident_layers)
        assert r["fast"]["s_per_image"] > 0 and r["peak_memory_bytes"] > 0 and r["planner_peak_bytes"] <= got["usable_bytes"]
    # 2. the sweep: every variant at every run, fp8 on the paths asked for, no fallback in bf16
    recs = [json.loads(x) for x in (out / "fp8_sweep.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["images"], r["height"]) for r in recs] == [
        (v, n, s) for v in ("as-is", "fp8:dequant", "fp8:scaled_mm") for n, s in ((1, 128), (2, 64))]
    assert all(r["s_per_image"] > 0 for r in recs)
    assert all(r["fp8_matmul_report"]["paths"] == {cpu_fp8_path("scaled_mm"): r["fp8_matmul_report"]["layers"]}
               for r in recs if r["variant"] == "fp8:scaled_mm")
    # 3. streaming, with its host copies reported
    st = json.loads((out / "stream.json").read_text())
    assert st["offload"] == "stream" and st["resident_layers"] == 1 and st["offload_stats"]["streamed_loads"] > 0
    assert "registration" in st["host_memory"]
    # the summary table at the end
    text = res.stdout
    summary = text[text.index("== summary"):]
    for d in want:
        assert f"{d.weights} {d.offload}" in summary
    assert "fp8:scaled_mm" in summary and "stream (1 resident layers" in summary
    targets = summary[summary.index("targets (issue 10):"):]
    assert targets.count("completed") == 3 and "DID NOT COMPLETE" not in targets
    assert "fp8 at one image 128x128: best fp8:" in targets and "fp8 at 2 images: best fp8:" in targets
    assert "AUTO_ON_FP8_GPUS (formats/fp8_matmul.py) -> 'dequant'" in targets or \
        "AUTO_ON_FP8_GPUS (formats/fp8_matmul.py) -> 'scaled_mm'" in targets, targets
    assert (out / "log.txt").read_text().count("== cap") == 3


def _sweep_record(variant, images, s_per_image, fallbacks=0):
    return {"variant": variant, "images": images, "height": 1024 if images == 1 else 512, "width": 1024 if images == 1 else 512,
            "s_per_image": s_per_image, "fp8_matmul_report": {"fallbacks": fallbacks, "paths": {}}}


def test_the_summary_picks_the_fp8_path_for_auto_by_the_rule_it_states():
    """benchmarks/consumer_summary.py's choice for AUTO_ON_FP8_GPUS: a plain fp8 path (no lever combined)
    that ran without a fallback; not slower than bf16 at the batched run if any path manages that;
    then the fastest at one image."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import consumer_summary as cs
    finally:
        sys.path.pop(0)
    r = _sweep_record
    recs = [r("as-is", 1, 7.0), r("as-is", 8, 3.5),
            r("fp8:scaled_mm", 1, 5.0), r("fp8:scaled_mm", 8, 3.6),
            r("fp8:weight_only_compiled", 1, 4.5), r("fp8:weight_only_compiled", 8, 4.0),  # fastest alone, loses batched
            r("fp8:scaled_mm_compiled", 1, 4.8), r("fp8:scaled_mm_compiled", 8, 3.4),
            r("fp8:torchao", 1, 3.0, fallbacks=5), r("fp8:torchao", 8, 2.0, fallbacks=5),  # fell back: not its own figure
            r("fp8:scaled_mm+compile", 1, 2.4)]  # a combination, not a matmul path
    assert cs.pick_auto_path(recs)[0] == "scaled_mm_compiled"
    # no path keeps up with bf16 at the batched run: the fastest at one image
    slow = [x for x in recs if x["variant"] != "fp8:scaled_mm_compiled"]
    assert cs.pick_auto_path(slow)[0] == "weight_only_compiled"
    mode, why = cs.pick_auto_path(recs[:2])
    assert mode is None and "no plain fp8 path" in why
