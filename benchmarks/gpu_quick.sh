#!/usr/bin/env bash
# The device check for a session with a short GPU lease (about 15 minutes, start-up included):
# the CUDA tests first (small models, the most informative per second; also under ComfyUI's
# allocator, tests/gpu/test_comfy_allocator_gpu.py), then the issue-5 figures
# at the real 14B-64x shape, each run under its own timeout so one slow mode cannot eat the rest
# (540 s in all: inside one 600 s device call; 170 s of tests, 360 s of runs, 8 s of printing).
# Results: ${OUT:-out/bench}/*.json and the printed summary lines. Full set: benchmarks/run_14b.sh.
# On the device tool: run(command="OUT=$OUT/bench bash benchmarks/gpu_quick.sh", timeout_s=600).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
OUT=${OUT:-out/bench}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader || true
# -v: each test's result line as it ends, so a run stopped by the timeout still says which passed
timeout -s INT -k 5 170 $PY -m pytest -v -s --tb=line tests/gpu 2>&1 | tail -60
run() { local t=$1 name=$2; shift 2; echo "== $name: $*"
        timeout -s INT -k 5 "$t" $PY -m bitdance_core bench --device cuda --json "$@" > "$OUT/$name.json" && \
        timeout 2 $PY -c "import json; r=json.load(open('$OUT/$name.json')); f=r['fast']; print({k: r.get(k) for k in ('ratio_naive_over_fast','peak_memory_bytes','planner_peak_bytes','graph_stats','fp8_matmul_report','host_memory','allocator_backend')}, 's/image', f['s_per_image'])" \
        || echo "   ($name: failed or timed out after $t s)"; }
run 120 14b64x-bf16   --shape 14b-64x --dtype bfloat16
run 70  14b64x-fp8    --shape 14b-64x --dtype bfloat16 --fp8 --fp8-matmul auto --no-naive --no-decode --warmup-size 256
run 90  14b64x-b8     --shape 14b-64x --dtype bfloat16 --num-images 8 --no-naive --no-decode --warmup-size 256
# streaming moves ~27 GB of bf16 layers per block: 512x512 (16 blocks) fits its timeout; the issue-10
# figures (caps, fp8 paths, streaming) are benchmarks/gpu_consumer.sh's
run 80  14b64x-stream --shape 14b-64x --dtype bfloat16 --offload stream --resident-layers 4 --height 512 --width 512 \
    --no-naive --no-decode --warmup-size 256
