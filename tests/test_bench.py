"""The benchmark command: discovered by the CLI, runs a random model, reports every stage (no
timing is asserted: the machine is shared)."""
import json
import os
import subprocess
import sys

import torch

from bitdance_core.cli.bench import BenchConfig, format_report, run_bench
from bitdance_core.cli.synthetic import custom_shape

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


def test_bench_cfg_script_help():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_cfg.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "batched" in out.stdout.lower()
