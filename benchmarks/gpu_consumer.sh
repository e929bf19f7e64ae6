#!/usr/bin/env bash
# Issue 10 on one short GPU lease: BitDance-14B-64x (random weights at the released shape), 1024x1024,
# 50 steps, cfg 7.5, on the GPUs people own, played on a large one. Each part under its own timeout,
# 540 s in all with the summary (inside one 600 s device call); JSON written under $OUT as each run finishes.
#   1. weights/offload auto under memory caps of 24, 16 and 12 GiB (set_per_process_memory_fraction;
#      the planner plans against the cap): the choice, s/image, the measured peak    70 + 80 + 90 s
#      (planned: fp8; 4bit; 4bit with the token embeddings in host memory, whose JSON says how the
#      host copies were page-locked)
#   2. the fp8 matmul paths on the same weights (bf16 first, then quantised in place): each at 1 image
#      1024x1024 and 8 images 512x512 (16 blocks: the head's per-block work of 8 images at 1024x1024),
#      s/image against bf16's; one JSON line per run                                                 215 s
#   3. streaming bf16 weights (4 resident layers), 512x512                                            75 s
# Each bench writes a line to log.txt as each stage ends (weights built, warmed up, each run), so a part
# stopped by its timeout shows how far it got; `timeout -s INT` makes Python print where it was, and -k 5
# kills what does not stop (worst case 565 s with every part stuck, still inside the 600 s call).
# Warm-ups run at 256x256 (the head's and the block step's shapes do not depend on the size).
# Then a summary table (benchmarks/consumer_summary.py). Files: cap24.json cap16.json cap12.json
# fp8_sweep.jsonl stream.json log.txt (at most 8 files come back from $OUT).
# On the device tool: run(command="OUT=$OUT bash benchmarks/gpu_consumer.sh", timeout_s=600).
# torchao (optional, for the fp8:torchao variant) is not on the device image: carry its wheel and
# set PYTHONPATH (see docs/performance.md); without it that variant records "fp8 matmul 'torchao' needs the torchao package".
# DRY=1: the same steps through the same code on the CPU with the tiny shape and simulated caps
# (CAPS in GiB; tests/test_gpu_consumer.py runs it and checks the JSON).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1  # a killed run's lines and JSON are already written
TO=(timeout -s INT -k 5)
PY=${PY:-python3}
OUT=${OUT:-out/consumer}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: > "$LOG"
if [ "${DRY:-0}" = 1 ]; then
  # a small model whose weights, not its activations, fill the memory (so the caps choose between settings)
  COMMON=(--device cpu --shape custom --base tiny --layers 4 --hidden 512 --heads 8 --kv-heads 4 --intermediate 2048
          --head-width 256 --dtype bfloat16 --height 128 --width 128 --steps 2 --threads 1)
  CAPS=${CAPS:-"0.61 0.59 0.575"}
  VARIANTS=${VARIANTS:-as-is,fp8:dequant,fp8:scaled_mm}
  RUNS=${RUNS:-1x128,2x64}
  WARM=64; STREAM=(--height 128 --width 128 --resident-layers 1); EXTRA=(--measure-memory)
  T_CAP=(120 120 120); T_SWEEP=300; SWEEP_LIMITS=(--variant-timeout 120 --deadline 240); T_STREAM=120
else
  COMMON=(--device cuda --shape 14b-64x --dtype bfloat16)
  CAPS=${CAPS:-"24 16 12"}
  # weight_only_compiled last: Inductor's autotuning of ~16 GEMM shapes may not finish inside one variant's time
  VARIANTS=${VARIANTS:-as-is,fp8:scaled_mm,fp8:scaled_mm_compiled,fp8:torchao,fp8:scaled_mm+compile,fp8:weight_only_compiled}
  RUNS=${RUNS:-1x1024,8x512}
  WARM=256; STREAM=(--height 512 --width 512 --resident-layers 4); EXTRA=()
  # a sweep variant started by the deadline (125 s) ends by 195 s, inside the sweep's 215
  T_CAP=(70 80 90); T_SWEEP=215; SWEEP_LIMITS=(--variant-timeout 70 --deadline 125); T_STREAM=75
fi
say() { echo "$*" | tee -a "$LOG"; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader 2>&1 | tee -a "$LOG"

# 1. memory caps, auto
i=0
for cap in $CAPS; do
  name="cap${cap}"
  say "== $name: auto under a ${cap} GiB cap (timeout ${T_CAP[$i]} s)"
  "${TO[@]}" "${T_CAP[$i]}" $PY -m bitdance_core bench "${COMMON[@]}" --weights auto --offload auto --memory-cap-gb "$cap" \
      --no-naive --warmup-size "$WARM" "${EXTRA[@]}" --json > "$OUT/$name.json" 2>> "$LOG" \
    || say "   ($name: exit $? — failed, out of memory or timed out; see log.txt)"
  i=$((i + 1))
done

# 2. fp8 matmul paths against bf16, same weights
say "== fp8 sweep: $VARIANTS at $RUNS (timeout $T_SWEEP s)"
"${TO[@]}" "$T_SWEEP" $PY -m bitdance_core bench-sweep "${COMMON[@]}" --variants "$VARIANTS" --runs "$RUNS" --no-decode \
    --warmup-size "$WARM" "${SWEEP_LIMITS[@]}" --jsonl "$OUT/fp8_sweep.jsonl" 2>> "$LOG" | tee -a "$LOG" \
  || say "   (fp8 sweep: exit $? — see log.txt; finished runs are in fp8_sweep.jsonl)"

# 3. streaming
say "== stream: bf16 weights streamed (timeout $T_STREAM s)"
"${TO[@]}" "$T_STREAM" $PY -m bitdance_core bench "${COMMON[@]}" "${STREAM[@]}" --offload stream --no-naive --no-decode \
    --warmup-size "$WARM" "${EXTRA[@]}" --json > "$OUT/stream.json" 2>> "$LOG" \
  || say "   (stream: exit $? — see log.txt)"

"${TO[@]}" 10 $PY benchmarks/consumer_summary.py "$OUT" | tee -a "$LOG"
