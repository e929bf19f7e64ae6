"""benchmarks/gpu_kernels.sh (the issue-11 GPU script) through its DRY mode: the same steps and the
same code on the CPU with a tiny model. Checks every file it writes (what a GPU run will bring back)
and the summary it prints."""
import json
import os
import subprocess
import sys

from bitdance_core.runtime import Levers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEST = "fuse+sdpa=math+gqa=native"


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_gpu_kernels_script_dry_run(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "DRY": "1", "OUT": str(out), "PY": sys.executable, "BEST": BEST}
    res = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_kernels.sh")], env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    files = set(os.listdir(out))
    assert files == {"profile.json", "gemm.jsonl", "levers.jsonl", "targets64.jsonl", "targets16.jsonl", "summary.json",
                     "log.txt"}  # at most 8 files come back from a device call

    # 1. the profile: one head pass and one backbone step, by group, in the time the calls take
    p = json.loads((out / "profile.json").read_text())
    assert p["head_passes"] == 3 and p["backbone_steps"] >= 1 and p["block_step_start"] > 0
    assert p["head_weight_bytes"] > 0 and p["backbone_weight_bytes"] > 0 and p["kv_cache_bytes"] > 0
    for key in ("head_pass", "backbone_step"):
        s = p["modes"]["eager"][key]
        assert s["kernel_ms"] > 0 and s["wall_ms"] > 0 and s["floor_ms"] is None  # no floors on the CPU
        assert abs(sum(g["ms"] for g in s["groups"].values()) - s["kernel_ms"]) < 1e-6 * max(1.0, s["kernel_ms"])
        assert s["groups"]["GEMM"]["ms"] > 0 and s["groups"]["GEMM"]["kernels"] >= 1 and s["top"]
    assert p["modes"]["eager"]["backbone_step"]["groups"]["attention"]["ms"] > 0

    # 2. every linear of the model at each row count; cuBLASLt says it needs CUDA
    gemm = _jsonl(out / "gemm.jsonl")
    timed = [r for r in gemm if "us" in r]
    assert {r["rows"] for r in timed} == {16, 64} and all(r["us"] > 0 and r["rel_error"] < 1e-4 for r in timed)
    assert {(r["in"], r["out"]) for r in timed if r["part"] == "backbone (fused)"} == {(128, 256), (128, 512)}
    assert any(r.get("backend") == "cublaslt" and "CUDA only" in r.get("skipped", "") for r in gemm)

    # 3. the levers: the eager reference, then each lever with the bits it changes
    levers = _jsonl(out / "levers.jsonl")
    names = [r["variant"] for r in levers]
    assert names == ["reference (eager)", "as-is", "as-is+step-cache=off", "as-is+fuse", "as-is+sdpa=math",
                     "as-is+gqa=native", "as-is+gemm=cublaslt", "as-is+compile=head+compile-mode=default"]
    by = {r["variant"]: r for r in levers}
    for name in names[1:]:
        r = by[name]
        assert r["s_per_image"] > 0 and r["blocks"] == 4 and r["bits_total"] == 256 * 256 // 256 * 32
        assert 0 <= r["bits_differ"] <= r["bits_total"] and 0 <= r["blocks_identical"] <= 4
    assert by["as-is"]["bits_differ"] == by["as-is+step-cache=off"]["bits_differ"] == 0  # exact by construction
    assert by["as-is+fuse"]["levers_report"]["fuse"]["fused"] == 4
    assert by["as-is+compile=head+compile-mode=default"]["levers_report"]["compiled"] == ["head"]

    # 4. the targets: today's fast mode and the best combination, at each run, same process
    t64, t16 = _jsonl(out / "targets64.jsonl"), _jsonl(out / "targets16.jsonl")
    assert [(r["variant"], r["images"], r["height"]) for r in t64] == [
        (v, n, 256) for v in ("as-is", "as-is+" + BEST) for n in (1, 2)]
    assert [(r["variant"], r["images"], r["height"]) for r in t16] == [("as-is", 1, 128), ("as-is+" + BEST, 1, 128)]
    assert all(r["s_per_image"] > 0 and r["decode_s"] > 0 for r in t64 + t16)
    assert t64[2]["levers_report"]["levers"] == Levers.parse(BEST).spec()
    summary = json.loads((out / "summary.json").read_text())
    assert [t["target"] for t in summary["targets"]] == ["64x_1x1024", "64x_8x1024", "16x_1x1024"]
    assert all(t["today_s"] > 0 and t["best_s"] > 0 and t["derived"] for t in summary["targets"])
    Levers.parse(summary["best_levers"])  # whatever it picked is a valid combination
    assert summary["cuda_graphs"]["eager_s_per_image"] > 0

    text = res.stdout
    s = text[text.index("== summary"):]
    for part in ("1. profile", "2. GEMMs", "3. levers", "4. targets", "5. cuda_graphs", "a CPU dry run"):
        assert part in s
    assert "as-is+" + BEST in (out / "log.txt").read_text()
