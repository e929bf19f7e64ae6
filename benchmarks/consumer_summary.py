"""The summary table of benchmarks/gpu_consumer.sh, from the JSON files it wrote (no torch needed).

usage: python benchmarks/consumer_summary.py OUT_DIR
"""
import glob
import json
import os
import sys

GIB = 1 << 30


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _gib(n):
    return f"{n / GIB:.2f}" if isinstance(n, (int, float)) else "-"


def caps(out):
    lines = ["memory caps (weights/offload auto):",
             f"  {'cap GiB':>7}  {'choice':<34} {'s/image':>8}  {'peak GiB (alloc/reserved)':>26}  {'planned GiB':>11}  note"]
    files = sorted(glob.glob(os.path.join(out, "cap*.json")), key=lambda p: -float(os.path.basename(p)[3:-5]))
    for path in files:
        cap = os.path.basename(path)[3:-5]
        r = _load(path)
        if not r:
            lines.append(f"  {cap:>7}  (no result: timed out or failed before writing; see log.txt)")
            continue
        d = r.get("decision") or {}
        choice = f"{d.get('weights')} {d.get('offload')}"
        if d.get("offload") == "stream":
            choice += f" ({d.get('resident_layers')} resident)"
        if r.get("fp8"):
            choice += f", matmul {r.get('fp8_matmul')}"
        fast = r.get("fast") or {}
        spi = f"{fast['s_per_image']:.3f}" if "s_per_image" in fast else "-"
        peak = f"{_gib(r.get('peak_memory_bytes'))}/{_gib(r.get('peak_reserved_bytes'))}"
        note = r.get("error") or ""
        host = r.get("host_memory")
        if host:
            note += f" host copies {host.get('how')} is_pinned {host.get('is_pinned')}"
            if host.get("failures"):
                note += f" failures {host['failures']}"
        fb = (r.get("fp8_matmul_report") or {}).get("fallbacks")
        if fb:
            note += f" {fb} fp8 fallbacks {r['fp8_matmul_report']['paths']}"
        lines.append(f"  {cap:>7}  {choice:<34} {spi:>8}  {peak:>26}  {_gib(r.get('planner_peak_bytes')):>11}  {note.strip()}")
    return lines


def sweep(out):
    path = os.path.join(out, "fp8_sweep.jsonl")
    if not os.path.exists(path):
        return ["fp8 sweep: no results"]
    recs = []
    with open(path) as f:
        for line in f:
            try:
                recs.append(json.loads(line))
            except ValueError:
                pass
    lines = ["fp8 sweep (s/image; x = against the first variant at the same run):"]
    base = {}
    for r in recs:
        if "s_per_image" not in r:
            lines.append(f"  {r.get('variant', '?'):<32} {r.get('error') or r.get('skipped')}")
            continue
        key = (r["images"], r["height"], r["width"])
        base.setdefault(key, r["s_per_image"])
        rep = r.get("fp8_matmul_report") or {}
        fb = f", {rep['fallbacks']} fallbacks {rep['paths']}" if rep.get("fallbacks") else ""
        lines.append(f"  {r['variant']:<32} {r['images']} x {r['height']}x{r['width']}: {r['s_per_image']:.3f} s/image "
                     f"({r['s_per_image'] / base[key]:.2f}x), backbone/block {r['backbone_per_block_s'] * 1e3:.1f} ms, "
                     f"head/block {r['head_per_block_s'] * 1e3:.1f} ms, peak {_gib(r.get('peak_memory_bytes'))} GiB, "
                     f"warm-up {r.get('warmup_s', 0):.1f} s{fb}")
    return lines


def stream(out):
    r = _load(os.path.join(out, "stream.json"))
    if not r:
        return ["stream: no result (timed out or failed; see log.txt)"]
    fast = r.get("fast") or {}
    host = r.get("host_memory") or {}
    return [f"stream ({r.get('resident_layers')} resident layers, {r['settings']['height']}x{r['settings']['width']}): "
            f"{fast.get('s_per_image', float('nan')):.3f} s/image, backbone/block {fast.get('backbone_per_block_s', 0) * 1e3:.1f} ms, "
            f"peak {_gib(r.get('peak_memory_bytes'))} GiB (planned {_gib(r.get('planner_peak_bytes'))}), "
            f"{(r.get('offload_stats') or {}).get('bytes_moved', 0) / GIB:.1f} GiB moved, built in {r.get('build_s', 0):.1f} s",
            f"  host copies: {host.get('how')}, is_pinned {host.get('is_pinned')}, failures {host.get('failures')}, "
            f"registration {host.get('registration')}"]


def main(argv):
    out = argv[1] if len(argv) > 1 else "out/consumer"
    print("\n".join(["== summary"] + caps(out) + sweep(out) + stream(out)))


if __name__ == "__main__":
    main(sys.argv)
