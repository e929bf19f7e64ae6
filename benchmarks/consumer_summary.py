"""The summary table of benchmarks/gpu_consumer.sh, from the JSON files it wrote (no torch needed).

usage: python benchmarks/consumer_summary.py OUT_DIR
"""
import glob
import os
import sys

from summary_files import load_json, load_jsonl

GIB = 1 << 30


def _gib(n):
    return f"{n / GIB:.2f}" if isinstance(n, (int, float)) else "-"


def cap_runs(out):
    """(cap in GiB as the file names it, its bench JSON or None), largest cap first."""
    files = sorted(glob.glob(os.path.join(out, "cap*.json")), key=lambda p: -float(os.path.basename(p)[3:-5]))
    return [(os.path.basename(p)[3:-5], load_json(p)) for p in files]


def caps(out):
    lines = ["memory caps (weights/offload auto):",
             f"  {'cap GiB':>7}  {'choice':<34} {'s/image':>8}  {'peak GiB (alloc/reserved)':>26}  {'planned GiB':>11}  note"]
    for cap, r in cap_runs(out):
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
    recs = load_jsonl(os.path.join(out, "fp8_sweep.jsonl"))
    if not recs:
        return ["fp8 sweep: no results"]
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
    r = load_json(os.path.join(out, "stream.json"))
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


FP8_TARGET_S = 2.5  # issue 10: fp8 weights, 14B-64x 1024x1024, one image (the sweep runs without the decode)
FP8_PEAK_GIB = 18.0
Q4_PEAK_GIB = 11.0  # 4-bit weights at 14B-64x 1024x1024 on a 12 GB card


def pick_auto_path(recs):
    """The fp8 matmul mode for formats/fp8_matmul.AUTO_ON_FP8_GPUS: among the plain `fp8:<mode>` variants
    that ran every run without a fallback, those not slower per image than bf16 (`as-is`) at the
    batched run first, then the fastest at one image. Returns (mode or None, why)."""
    one = [r for r in recs if r["images"] == 1]
    many = [r for r in recs if r["images"] > 1]
    bf16_many = next((r["s_per_image"] for r in many if r["variant"] == "as-is"), None)
    by_mode = {}
    for r in recs:
        v = r["variant"]
        if not v.startswith("fp8:") or "+" in v:
            continue
        ok = not (r.get("fp8_matmul_report") or {}).get("fallbacks")
        by_mode.setdefault(v[4:], []).append((r, ok))
    scored = []
    for mode, runs in by_mode.items():
        if not all(ok for _, ok in runs):
            continue
        t1 = next((r["s_per_image"] for r, _ in runs if r in one), None)
        tn = next((r["s_per_image"] for r, _ in runs if r in many), None)
        if t1 is None:
            continue
        keeps_batch = bf16_many is None or (tn is not None and tn <= bf16_many)
        scored.append((not keeps_batch, t1, mode, tn))
    if not scored:
        return None, "no plain fp8 path ran at one image without a fallback"
    slower, t1, mode, tn = min(scored)
    why = f"{t1:.3f} s/image at one image" + (f", {tn:.3f} at the batched run" if tn is not None else "")
    if bf16_many is not None:
        why += f" (bf16 {bf16_many:.3f}: {'slower' if slower else 'not slower'})"
    return mode, why


def targets(out):
    """Issue 10's GPU targets, each met or not, and the fp8 path for `auto`."""
    lines = ["targets (issue 10):"]
    for cap, r in cap_runs(out):
        done = bool(r) and not r.get("error") and "s_per_image" in (r.get("fast") or {})
        line = f"  cap {cap} GiB: {'completed' if done else 'DID NOT COMPLETE'}"
        if done and (r.get("decision") or {}).get("weights") == "4bit":
            peak = r.get("peak_memory_bytes") or 0
            line += f"; 4-bit peak {_gib(peak)} GiB (<= {Q4_PEAK_GIB:g}: {'met' if peak <= Q4_PEAK_GIB * GIB else 'NOT met'})"
        lines.append(line)
    recs = [r for r in load_jsonl(os.path.join(out, "fp8_sweep.jsonl")) if "s_per_image" in r]
    one = [r for r in recs if r["images"] == 1 and r["variant"].startswith("fp8:")]
    if one:
        best = min(one, key=lambda r: r["s_per_image"])
        peak = best.get("peak_memory_bytes") or 0
        lines.append(f"  fp8 at one image {best['width']}x{best['height']}: best {best['variant']} {best['s_per_image']:.3f} s "
                     f"(<= {FP8_TARGET_S:g} s: {'met' if best['s_per_image'] <= FP8_TARGET_S else 'NOT met'}), peak "
                     f"{_gib(peak)} GiB (<= {FP8_PEAK_GIB:g}: {'met' if peak <= FP8_PEAK_GIB * GIB else 'NOT met'})")
    many = [r for r in recs if r["images"] > 1]
    base = next((r for r in many if r["variant"] == "as-is"), None)
    fp8_many = [r for r in many if r["variant"].startswith("fp8:")]
    if base and fp8_many:
        best = min(fp8_many, key=lambda r: r["s_per_image"])
        lines.append(f"  fp8 at {best['images']} images: best {best['variant']} {best['s_per_image']:.3f} s/image against bf16 "
                     f"{base['s_per_image']:.3f} (not slower: {'met' if best['s_per_image'] <= base['s_per_image'] else 'NOT met'})")
    mode, why = pick_auto_path(recs)
    lines.append(f"  AUTO_ON_FP8_GPUS (formats/fp8_matmul.py) -> {mode!r}: {why}" if mode else f"  AUTO_ON_FP8_GPUS: unchanged ({why})")
    return lines


def main(argv):
    out = argv[1] if len(argv) > 1 else "out/consumer"
    print("\n".join(["== summary"] + caps(out) + sweep(out) + stream(out) + targets(out)))


if __name__ == "__main__":
    main(sys.argv)
