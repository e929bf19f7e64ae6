"""The summary of benchmarks/gpu_kernels.sh (issue 11), from the files it wrote (no torch needed).

usage: python benchmarks/kernels_summary.py OUT_DIR [--json OUT_DIR/summary.json]
       python benchmarks/kernels_summary.py OUT_DIR --best     (prints the lever combination to try)

Reads profile.json, gemm.jsonl, levers.jsonl, targets64.jsonl and targets16.jsonl; prints:
1. the profile: ms per head pass and per backbone step by kernel group, wall time and floor;
2. the GEMMs: each linear at each row count per backend, as a share of its floor;
3. the levers, one at a time against the baseline at the same run: s/image, per-block times, bits
   differing from the eager path, graphs;
4. the targets (14B-64x 1024^2, 8 images, 14B-16x), best combination against today's fast mode
   in the same process; figures at sizes other than the timed one are derived from per-block times
   (prefill + blocks x (backbone + head per block) + decode, over the images) and marked so;
5. what decides cuda_graphs' default: graphs against eager (speed, bits), captures, fallbacks.

--best: every single lever that made the 1-image run at least MIN_GAIN faster than the baseline,
combined: the fastest of each kind (sdpa, gqa, gemm), compile parts that helped merged into one
target (head + step -> loop) with the faster mode; an Inductor GEMM autotune is dropped when the
same parts are compiled anyway. Prints "" when no lever helped.
"""
import json
import os
import sys

from summary_files import load_json, load_jsonl

TARGETS = {"64x_1x1024": 4.0, "64x_8x1024": 2.5, "16x_1x1024": 14.0}
MIN_GAIN = 0.02  # a lever counts as faster when it saves at least 2% of the baseline's s/image
BLOCKS_1024 = {"64x": 64, "16x": 256}


def _ms(x):
    return f"{x * 1e3:.2f}" if isinstance(x, (int, float)) else "-"


def profile_lines(out):
    p = load_json(os.path.join(out, "profile.json"))
    if not p:
        return ["1. profile: no results (see log.txt)"]
    lines = [f"1. profile ({p.get('shape')}, {p['size'][0]}x{p['size'][1]}, {p['steps']} steps, cfg {p['cfg']}; "
             f"bandwidth {p['bandwidth_Bps'] / 1e12:.2f} TB/s)" if p.get("bandwidth_Bps") else
             f"1. profile ({p.get('shape')}, {p['size'][0]}x{p['size'][1]}, {p['steps']} steps; no floors on the CPU)"]
    for mode, entry in p["modes"].items():
        for key, label in (("head_pass", "head pass"), ("backbone_step", "backbone step")):
            s = entry.get(key)
            if not s:
                continue
            floor = f", floor {s['floor_ms']:.3f}" if s.get("floor_ms") else ""
            groups = ", ".join(f"{g} {v['ms']:.3f} ({v['share'] * 100:.0f}%, {v['kernels']:.0f})" for g, v in s["groups"].items()
                               if v["ms"] > 0)
            lines.append(f"  {mode:<5} {label:<13} wall {s['wall_ms']:.3f} ms, kernels {s['kernel_ms']:.3f} ms "
                         f"({s['kernels']:.0f}){floor}: {groups}")
            for k in s["top"][:5]:
                lines.append(f"        {k['total_ms']:8.3f} ms {k['count']:5d}x {k['group']:<11} {k['name'][:90]}")
        if not entry.get("kernels_recorded", True):
            lines.append(f"  {mode}: no GPU kernels recorded (graph replay not traced?): read the eager lines")
    return lines


def gemm_lines(out):
    recs = load_jsonl(os.path.join(out, "gemm.jsonl"))
    if not recs:
        return ["2. GEMMs: no results"]
    head = recs[0]
    lines = ["2. GEMMs alone (us per call, % of floor; floors from "
             + (f"{head['bandwidth_Bps'] / 1e12:.2f} TB/s and {head['bf16_flops'] / 1e12:.0f} TFLOP/s measured)"
                if head.get("bandwidth_Bps") else "nothing: CPU)")]
    table, backends = {}, []
    for r in recs:
        if "us" not in r:
            continue
        key = (r["part"], ",".join(r["names"]), r["in"], r["out"], r["rows"])
        table.setdefault(key, {})[r["backend"]] = r
        if r["backend"] not in backends:
            backends.append(r["backend"])
    lines.append(f"  {'linear':<44} {'rows':>5}  " + "  ".join(f"{b:>18}" for b in backends))
    for (part, names, k, n, m), by in table.items():
        cells = []
        for b in backends:
            r = by.get(b)
            cells.append(f"{r['us']:8.1f} ({r['of_floor'] * 100:3.0f}%)" if r and "of_floor" in r else
                         f"{r['us']:8.1f}" if r else "-")
        lines.append(f"  {(part[:8] + ' ' + names)[:34]:<34} {k:>4}x{n:<5} {m:>5}  " + "  ".join(f"{c:>18}" for c in cells))
    notes = [r for r in recs if "us" not in r]
    for r in notes[:6]:
        lines.append(f"  ({r.get('backend')}: {','.join(r.get('names', [])) or '-'} rows {r.get('rows', '-')}: "
                     f"{r.get('error') or r.get('skipped')})")
    if len(notes) > 6:
        lines.append(f"  ({len(notes) - 6} more not timed: see gemm.jsonl)")
    return lines


def _timed(recs, images=1):
    return [r for r in recs if "s_per_image" in r and r.get("images") == images]


def lever_lines(out):
    recs = load_jsonl(os.path.join(out, "levers.jsonl"))
    if not recs:
        return ["3. levers: no results"]
    lines = ["3. levers, one at a time (x: against the baseline 'as-is' at the same run; bits: against the eager path)"]
    base = next((r for r in _timed(recs) if r["variant"] == "as-is"), None)
    for r in recs:
        if "s_per_image" not in r:
            lines.append(f"  {r.get('variant', '?'):<44} {r.get('error') or r.get('skipped')}")
            continue
        x = f"{r['s_per_image'] / base['s_per_image']:.3f}x" if base else "-"
        bits = (f", bits {r['bits_differ']}/{r['bits_total']} ({r['blocks_identical']}/{r['blocks']} blocks same)"
                if "bits_differ" in r else "")
        graphs = r.get("graph_stats") or {}
        g = f", graphs {graphs.get('captures')}c/{graphs.get('eager_calls')}e/{len(graphs.get('failures', []))}f" if graphs else ""
        lines.append(f"  {r['variant']:<44} {r['images']}x{r['height']}: {r['s_per_image']:.3f} s/image {x}, backbone "
                     f"{_ms(r['backbone_per_block_s'])} ms, head {_ms(r['head_per_block_s'])} ms/block{bits}{g}")
    return lines


def best_levers(out) -> str:
    """The combination to try (see the module docstring)."""
    recs = _timed(load_jsonl(os.path.join(out, "levers.jsonl")))
    base = next((r for r in recs if r["variant"] == "as-is"), None)
    if base is None:
        return ""
    gains = {}
    for r in recs:
        name = r["variant"]
        if not name.startswith("as-is+") or r["s_per_image"] > base["s_per_image"] * (1 - MIN_GAIN):
            continue
        items = dict(_items(name[len("as-is+"):]))
        gains[name] = (r["s_per_image"], items)
    chosen = {}
    for kind in ("sdpa", "gqa", "gemm", "fuse", "step-cache"):
        cands = [(s, it) for s, it in gains.values() if set(it) == {kind}]
        if cands:
            chosen[kind] = min(cands, key=lambda c: c[0])[1][kind]
    compiled = [(s, it) for s, it in gains.values() if "compile" in it]
    if compiled:
        parts = set()
        for _s, it in compiled:
            parts |= {"head", "step"} if it["compile"] in ("loop", "all") else {it["compile"]}
        fastest = min(compiled, key=lambda c: c[0])[1]
        chosen["compile"] = "loop" if {"head", "step"} <= parts else parts.pop()
        if "compile-mode" in fastest:
            chosen["compile-mode"] = fastest["compile-mode"]
        if chosen.get("gemm", "").startswith("autotune"):
            del chosen["gemm"]  # the compiled parts autotune their GEMMs themselves
    order = ["compile", "compile-mode", "fuse", "gemm", "sdpa", "gqa", "step-cache"]
    return "+".join(k if v is True else f"{k}={v}" for k in order for v in [chosen.get(k)] if v is not None)


def _items(spec):
    for item in spec.split("+"):
        k, eq, v = item.partition("=")
        yield k, (v if eq else True)


def _derived(rec, blocks, decode_s=None):
    """s/image at a size of `blocks` blocks from a run's per-block times (prefill once per batch)."""
    per_block = rec["backbone_per_block_s"] + rec["head_per_block_s"]
    dec = rec["decode_s"] if decode_s is None else decode_s * rec["images"]
    return (rec["prefill_s"] + blocks * per_block - rec["backbone_per_block_s"] + dec) / rec["images"]


def target_lines(out, summary):
    lines = ["4. targets (H200, 1024x1024, 50 steps, cfg 7.5; best combination against today's fast mode, same process)"]
    r64 = [r for r in load_jsonl(os.path.join(out, "targets64.jsonl")) if "s_per_image" in r]
    r16 = _timed(load_jsonl(os.path.join(out, "targets16.jsonl")), 1)
    decode_1024 = next((r["decode_s"] for r in r64 if r["images"] == 1 and r["height"] == 1024 and r.get("decode_s")), None)
    batch = max([r["images"] for r in r64 if r["images"] > 1], default=8)  # 8 on the GPU
    rows = []
    for label, recs, key, images, model in (("14B-64x, 1 image", r64, "64x_1x1024", 1, "64x"),
                                             (f"14B-64x, {batch} images (per image)", r64, "64x_8x1024", batch, "64x"),
                                             ("14B-16x, 1 image", r16, "16x_1x1024", 1, "16x")):
        figs = {}
        for r in recs:
            if r["images"] != images:
                continue
            role = "today" if r["variant"] == "as-is" else "best"
            exact = r["height"] == 1024 and r["width"] == 1024
            figs[role] = (r["s_per_image"] if exact else _derived(r, BLOCKS_1024[model], decode_1024), exact, r)
        if not figs:
            lines.append(f"  {label:<32} no result")
            continue
        today, best = figs.get("today"), figs.get("best")
        t = TARGETS[key]
        cells = []
        for role, f in (("today", today), ("best", best)):
            if f:
                cells.append(f"{role} {f[0]:.2f} s{'' if f[1] else ' (derived from ' + str(f[2]['height']) + '^2)'}")
        verdict = ""
        on_cpu = (best or today)[2].get("device") == "cpu"
        if on_cpu:
            verdict = "; a CPU dry run: no target applies"
        elif best:
            verdict = f"; target {t} s: {'met' if best[0] <= t else 'not met'}"
        if best and today:
            verdict += f"; {'never slower' if best[0] <= today[0] * 1.01 else 'SLOWER than today'}"
        lines.append(f"  {label:<32} " + ", ".join(cells) + verdict)
        rows.append({"target": key, "target_s": t, "today_s": today[0] if today else None, "best_s": best[0] if best else None,
                     "derived": not (best or today)[1], "levers": best[2]["variant"] if best else None})
    summary["targets"] = rows
    return lines


def graph_lines(out, summary):
    recs = load_jsonl(os.path.join(out, "levers.jsonl"))
    ref = next((r for r in _timed(recs) if r["variant"].startswith("reference")), None)
    base = next((r for r in _timed(recs) if r["variant"] == "as-is"), None)
    lines = ["5. cuda_graphs (off by default in the loaders until measured safe)"]
    if not (ref and base):
        return lines + ["  no eager reference or baseline run: nothing to decide on"]
    g = base.get("graph_stats") or {}
    info = {"eager_s_per_image": ref["s_per_image"], "graphs_s_per_image": base["s_per_image"],
            "bits_differ": base.get("bits_differ"), "bits_total": base.get("bits_total"), "captures": g.get("captures"),
            "replays": g.get("replays"), "eager_calls": g.get("eager_calls"), "failures": g.get("failures")}
    summary["cuda_graphs"] = info
    lines.append(f"  eager {ref['s_per_image']:.3f} s/image, graphs {base['s_per_image']:.3f} s/image "
                 f"({ref['s_per_image'] / base['s_per_image']:.2f}x); bits differing {info['bits_differ']}/{info['bits_total']}; "
                 f"captures {info['captures']}, replays {info['replays']}, eager calls {info['eager_calls']}, "
                 f"failures {info['failures'] or 'none'}")
    lines.append("  safe to default on when: no failures, no eager calls in the fast path, bits differing of the order of "
                 "the other levers' (the static step attends over the whole cache under a mask: other kernels)")
    return lines


def main(argv):
    out = argv[1] if len(argv) > 1 else "out/kernels"
    if "--best" in argv:
        print(best_levers(out))
        return 0
    summary = {"best_levers": best_levers(out)}
    lines = ["== summary (issue 11)"] + profile_lines(out) + gemm_lines(out) + lever_lines(out)
    lines.append(f"  best combination: {summary['best_levers'] or '(none faster)'}")
    lines += target_lines(out, summary) + graph_lines(out, summary)
    print("\n".join(lines))
    if "--json" in argv:
        with open(argv[argv.index("--json") + 1], "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
