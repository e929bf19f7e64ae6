#!/usr/bin/env bash
# The issue-5 figures on a GPU (H100/H200 class), written as JSON under ${OUT:-out/bench}.
# Each line is one `python -m bitdance_core bench` run: fast mode and naive mode, same process.
# Then the CUDA tests (scaled-mm fp8, pinned streaming, graph capture, planner vs allocations).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-out/bench}
mkdir -p "$OUT"
run() { local name=$1; shift; echo "== $name: $*"; timeout 900 $PY -m bitdance_core bench --device cuda --json "$@" > "$OUT/$name.json" && \
        $PY -c "import json,sys; r=json.load(open('$OUT/$name.json')); print({k: r[k] for k in ('ratio_naive_over_fast','peak_memory_bytes','planner_peak_bytes','graphs')}, r['fast']['s_per_image'], r.get('graph_stats'))"; }
run 14b64x-bf16        --shape 14b-64x --dtype bfloat16
run 14b64x-fp8         --shape 14b-64x --dtype bfloat16 --fp8 --fp8-matmul auto --no-naive
run 14b64x-stream      --shape 14b-64x --dtype bfloat16 --offload stream --resident-layers 4 --no-naive
run 14b64x-bf16-b8     --shape 14b-64x --dtype bfloat16 --num-images 8 --no-naive
run 14b16x-bf16        --shape 14b-16x --dtype bfloat16 --no-naive
$PY -m pytest -q -s tests/gpu 2>&1 | tail -20
