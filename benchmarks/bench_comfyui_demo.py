"""Issue 12's benchmark: a warm ComfyUI run of demo_digits_t2i against the CLI's generate time.

The demo (workflows/api/demo_digits_t2i.api.json: the built-in digits model, 32x32, 50 steps, cfg 4)
runs --runs times through the engine CLI and, after one warm-up, --runs times on a ComfyUI server
started here (CPU, previews on as in a browser session: --preview-method auto), each with a new
seed. Measured: the CLI's own "generated ... in X s" line (sampling and decoding, no start-up or
loading), and ComfyUI's execution_start -> execution_success time of each prompt (all its nodes:
sampler, previews, decode, save; the loader and text encode are cached). Prints the medians and
ComfyUI / CLI; exits 1 when that ratio is above --max-ratio (2).

--busy K runs K busy-looping processes during both measurements: a machine with other work on its
cores (a browser, a test suite), where the slowdown of issue 12 showed. It came from the CPU
threads: the demo's thousands of tiny operations, split over several threads, wait for each other
at every one; with the cores busy the waits cost 10-30x (measured on a 2-core machine: 0.2 s idle,
2.5-14 s busy, in the CLI as in ComfyUI). The engine now runs small models on one thread
(bitdance_core/cpu_threads.py). Usage:
    .venv/bin/python benchmarks/bench_comfyui_demo.py [--runs 5] [--busy 2] [--json]
"""
from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))

from run_workflow import request, run, start_server, stop_server  # noqa: E402

WORKFLOW = os.path.join(REPO, "workflows", "api", "demo_digits_t2i.api.json")
GENERATED = re.compile(r"\[bitdance\] generated \d+ images? of \d+x\d+ in ([0-9.]+) s")


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def cli_times(workflow: dict, runs: int) -> list[float]:
    """The CLI's generate time (sampling + decoding) for the workflow's settings, one process per run."""
    enc = next(n["inputs"] for n in workflow.values() if n["class_type"] == "BitDanceTextEncode")
    s = next(n["inputs"] for n in workflow.values() if n["class_type"] == "BitDanceARSampler")
    model = os.path.join(REPO, "bitdance_core", "demo_models", "digits-t2i")
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(runs):
            r = subprocess.run([sys.executable, "-m", "bitdance_core", "t2i", "--model", model, "--prompt", enc["prompt"],
                                "--height", str(s["height"]), "--width", str(s["width"]), "--steps", str(s["steps"]),
                                "--cfg", str(s["cfg"]), "--seed", str(seed), "--device", "cpu",
                                "--pixels-npy", os.path.join(tmp, "p.npy")],
                               cwd=REPO, capture_output=True, text=True, check=True)
            out.append(float(GENERATED.search(r.stderr).group(1)))
    return out


def comfyui_times(workflow: dict, runs: int, base: str) -> tuple[list[float], int]:
    """Execution times of warm runs (new seed each) on a ComfyUI started here, and its torch threads."""
    proc, url, _ = start_server(os.path.join(REPO, ".comfyui"), base, "BitDanceModelLoader", 300,
                                extra_args=["--preview-method", "auto"])
    try:
        times = []
        for seed in range(runs + 1):
            wf = copy.deepcopy(workflow)
            next(n for n in wf.values() if n["class_type"] == "BitDanceARSampler")["inputs"]["seed"] = 1000 + seed
            entry = run(url, wf, 600)
            stamps = {m[0]: m[1]["timestamp"] for m in entry["status"]["messages"]}
            if seed > 0:  # the first run loads the model
                times.append((stamps["execution_success"] - stamps["execution_start"]) / 1000)
        _, stats = request(f"{url}/system_stats")
        return times, stats
    finally:
        stop_server(proc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--busy", type=int, default=0, help="busy-looping processes during the measurements")
    ap.add_argument("--max-ratio", type=float, default=2.0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    with open(WORKFLOW) as f:
        workflow = json.load(f)
    stop = multiprocessing.Event()
    spinners = [multiprocessing.Process(target=_spin, args=(stop,), daemon=True) for _ in range(a.busy)]
    for p in spinners:
        p.start()
    try:
        cli = cli_times(workflow, a.runs)
        with tempfile.TemporaryDirectory() as base:
            comfy, stats = comfyui_times(workflow, a.runs, base)
    finally:
        stop.set()
        for p in spinners:
            p.join(5)
    result = {"cli_s": cli, "comfyui_s": comfy, "cli_median_s": statistics.median(cli),
              "comfyui_median_s": statistics.median(comfy), "busy_processes": a.busy, "cpus": os.cpu_count(),
              "comfyui_version": stats["system"]["comfyui_version"]}
    result["ratio"] = result["comfyui_median_s"] / result["cli_median_s"]
    result["ok"] = result["ratio"] <= a.max_ratio
    if a.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"demo_digits_t2i, {a.runs} runs, {a.busy} busy processes, {os.cpu_count()} CPUs")
        print(f"  CLI generate (sampling + decoding): median {result['cli_median_s']:.2f} s  {[round(t, 2) for t in cli]}")
        print(f"  ComfyUI warm prompt (all nodes):   median {result['comfyui_median_s']:.2f} s  {[round(t, 2) for t in comfy]}")
        print(f"  ComfyUI / CLI = {result['ratio']:.2f} (at most {a.max_ratio:g}: {'ok' if result['ok'] else 'TOO SLOW'})")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
