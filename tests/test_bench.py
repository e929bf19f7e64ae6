"""The benchmark command: discovered by the CLI, runs a random model, reports every stage (no
timing is asserted: the machine is shared)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from bitdance_core.cli.bench import BenchConfig, format_report, run_bench
from bitdance_core.cli.synthetic import custom_shape
from paths import cpu_fp8_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(1)


def test_cli_bench_json():
    out = subprocess.run([sys.executable, "-m", "bitdance_core", "bench", "--shape", "tiny", "--height", "128", "--width", "128",
                          "--steps", "1", "--threads", "1", "--device", "cpu", "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    for mode in ("fast", "naive"):
        for k in ("prefill_s", "backbone_per_block_s", "head_per_block_s", "decode_s", "s_per_image"):
            assert r[mode][k] >= 0
    assert r["settings"]["blocks"] == 4 and r["naive"]["backbone_step_calls"] == 2 * r["fast"]["backbone_step_calls"] == 6
    assert r["ratio_naive_over_fast"] > 0 and r["planner_peak_bytes"] > 0 and r["graphs"] is False


def test_bench_custom_shape_fp8_stream_and_memory():
    shape = custom_shape("tiny", layers=3, hidden=64, heads=4, kv_heads=2, height=128, width=128, steps=1)
    r = run_bench(BenchConfig(shape=shape, fp8=True, offload="stream", resident_layers=1, naive=False, warmup=0,
                              measure_memory=True, extra={"shape_name": "custom"}))
    assert r["naive"] is None and r["fp8"] and r["offload"] == "stream"
    assert r["offload_stats"]["streamed_loads"] > 0
    assert r["peak_memory_bytes"] > 0
    text = format_report(r)
    assert "backbone/block" in text and "head/block" in text and "planner:" in text


def test_host_memory_too_small_is_refused_on_the_cpu_and_noted_on_a_gpu(monkeypatch):
    """A machine that reports less memory than the weights need: on the CPU the bench refuses with the
    numbers (the run would be killed); on a GPU with offload (some virtual machines report less memory
    than they grow to) it goes on and says so in its report."""
    from bitdance_core.cli.bench import _check_host_memory
    from bitdance_core.errors import BitDanceError

    shape = custom_shape("tiny", layers=3, hidden=64, heads=4, kv_heads=2, height=128, width=128, steps=1)
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 16}  # 64 KiB
    monkeypatch.setattr(os, "sysconf", lambda name: pages[name])
    cpu = BenchConfig(shape=shape, extra={"shape_name": "custom"})
    with pytest.raises(BitDanceError, match=r"the custom weights need [\d.]+ GiB of host memory in float32; this machine "
                                            r"reports 0.0 GiB: use --device cuda"):
        _check_host_memory(cpu)
    gpu = BenchConfig(shape=shape, device="cuda", offload="stream", extra={"shape_name": "custom"})
    note = _check_host_memory(gpu)
    assert note is not None and note.startswith("the custom weights need") and "reports 0.0 GiB" in note
    assert _check_host_memory(BenchConfig(shape=shape, device="cuda", offload="none")) is None
    pages["SC_PHYS_PAGES"] = 2**30  # 4 TiB
    assert _check_host_memory(cpu) is None


def test_bench_cfg_script_help():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_cfg.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "batched" in out.stdout.lower()


def test_sweep_variants_and_runs_parsing():
    from bitdance_core.cli.bench_sweep import Variant, parse_runs, parse_variants
    from bitdance_core.cli.synthetic import SHAPES
    from bitdance_core.errors import BitDanceError

    assert parse_variants("as-is, fp8:scaled_mm,fp8,fp8:torchao+compile") == [
        Variant("as-is"), Variant("fp8", "scaled_mm"), Variant("fp8", "auto"), Variant("fp8", "torchao", True)]
    assert [v.name for v in parse_variants("as-is,fp8:weight_only_compiled+compile")] == ["as-is", "fp8:weight_only_compiled+compile"]
    for bad, msg in (("fp8:fast", "fp8 matmul 'fast' unknown"), ("fp8:scaled_mm,as-is", "as-is variants must come before"),
                     ("int4", "weights must be as-is or fp8"), ("as-is:dequant", "as-is weights take no matmul"),
                     ("fp8+graphs", "lever 'graphs' unknown")):
        with pytest.raises(BitDanceError, match=msg):
            parse_variants(bad)
    s = SHAPES["14b-64x"]
    assert parse_runs("1x1024,8x512,2x512x1024,4", s) == [(1, 1024, 1024), (8, 512, 512), (2, 512, 1024), (4, 1024, 1024)]
    with pytest.raises(BitDanceError, match="IMAGESxSIZE"):
        parse_runs("1xbig", s)


def test_sweep_times_each_variant_on_the_same_weights(tmp_path):
    """as-is first, then the linears quantised in place and each fp8 path; one JSON line per run as
    it finishes; a mode that cannot run here is recorded and the sweep goes on."""
    from bitdance_core.cli.bench_sweep import format_sweep, parse_variants, run_sweep

    shape = custom_shape("tiny", layers=2, hidden=64, heads=4, kv_heads=2, height=128, width=128, steps=1)
    jsonl = tmp_path / "sweep.jsonl"
    r = run_sweep(BenchConfig(shape=shape, dtype=torch.bfloat16, decode=False, warmup=0, extra={"shape_name": "custom"}),
                  parse_variants("as-is,fp8:dequant,fp8:scaled_mm,fp8:torchao"), [(1, 128, 128), (2, 64, 64)], jsonl=str(jsonl))
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert lines == r["records"] and r["fp8_linears"] > 0
    timed = [(x["variant"], x["images"]) for x in lines if "s_per_image" in x]
    assert timed[:6] == [("as-is", 1), ("as-is", 2), ("fp8:dequant", 1), ("fp8:dequant", 2), ("fp8:scaled_mm", 1), ("fp8:scaled_mm", 2)]
    assert all(x["s_per_image"] > 0 and x["blocks"] == (4 if x["images"] == 1 else 1) for x in lines if "s_per_image" in x)
    sm = [x for x in lines if x["variant"] == "fp8:scaled_mm"]
    assert all(x["fp8_matmul_report"]["paths"] == {cpu_fp8_path("scaled_mm"): r["fp8_linears"]} for x in sm)  # bf16: no fallback of its own
    ao = [x for x in lines if x["variant"] == "fp8:torchao"]
    from bitdance_core.formats.fp8_matmul import torchao_available
    if torchao_available():
        assert len(ao) == 2 and all(x["fp8_matmul_report"]["paths"] == {"torchao": r["fp8_linears"]} for x in ao)
    else:
        assert len(ao) == 1 and "needs the torchao package" in ao[0]["error"]
    text = format_sweep(r)
    assert "fp8:scaled_mm" in text and "x the first" in text


def test_sweep_deadline_and_variant_timeout():
    from bitdance_core.cli.bench_sweep import parse_variants, run_sweep

    shape = custom_shape("tiny", layers=2, hidden=64, heads=4, kv_heads=2, height=128, width=128, steps=1)
    cfg = BenchConfig(shape=shape, dtype=torch.bfloat16, decode=False, warmup=0)
    r = run_sweep(cfg, parse_variants("as-is,fp8:dequant"), [(1, 128, 128)], deadline_s=0.0)
    assert [x.get("skipped", "")[:10] for x in r["records"]] == ["the sweep'", "the sweep'"]
    r = run_sweep(cfg, parse_variants("as-is"), [(1, 128, 128)] * 200, variant_timeout_s=0.5)
    assert r["records"][-1]["error"] == "timed out after 0.5 s" and len(r["records"]) < 200
