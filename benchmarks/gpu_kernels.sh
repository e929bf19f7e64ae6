#!/usr/bin/env bash
# Issue 11 on one short GPU lease: closer to the floor on one H200. BitDance-14B (random weights at the
# released shapes), bf16, 50 steps, cfg 7.5. Each part under its own timeout, 540 s in all with the
# summary (inside one 600 s device call); JSON written under $OUT as each part finishes.
#   1. profile first: where each millisecond of a head pass and a backbone step goes, fast mode (CUDA
#      graphs) and eager, at 14B-64x 1024x1024 (bench --profile-out)                                  55 s
#   2. the model's GEMM shapes alone at 32/64/128/1024 rows: cuBLAS, cuBLASLt, then Inductor autotune
#      and split-K on the largest consumers at 128 rows until the deadline (bench-gemm)                40 s
#   3. the levers one at a time against the baseline on the same weights, 1 image 512x512 (16 blocks:
#      the per-block times are what a lever changes), each with the bits it changes against the eager
#      path; the eager run itself says what the CUDA graphs are worth (bench-sweep --bits). Compiled
#      levers last (no variant starts after 110 s, none runs past 80 s)                              210 s
#   4. the targets: the best combination (from 3, or $BEST) against today's fast mode, same process:
#      14B-64x 1 image 1024x1024, then 8 images 512x512 (-> 8 at 1024 from per-block times)           140 s
#      14B-16x 1 image 512x512 (64 blocks; -> 1024x1024's 256 blocks from per-block times)             80 s
#   Compilation: the head whole, the block step one layer for all 40 (its cache length dynamic: one
#   compilation per batch size); Inductor's caches on disk make part 4's compilations of part 3's
#   graphs quick, but a new batch size (8 images, the 16x model's 32 rows) compiles again.
# Then the summary (benchmarks/kernels_summary.py): tables, targets met or not, what decides cuda_graphs.
# Files: profile.json gemm.jsonl levers.jsonl targets64.jsonl targets16.jsonl summary.json log.txt.
# On the device tool: run(command="OUT=$OUT bash benchmarks/gpu_kernels.sh", timeout_s=600).
# BEST="compile=loop+fuse" forces the combination of part 4; LEVERS="as-is,..." replaces part 3's list;
# PARTS_S="55 40 210 140 80" the five timeouts (seconds); with the best-combination step (5 s) and the
# summary (10 s), 540 s. Each bench writes a line to log.txt as each stage ends; `timeout -s INT` makes
# Python print where it was, and -k 5 kills what does not stop.
# DRY=1: the same steps through the same code on the CPU with a tiny model (tests/test_gpu_kernels.py
# runs it and checks the JSON).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1  # a killed run's lines and JSON are already written
TO=(timeout -s INT -k 5)
PY=${PY:-python3}
OUT=${OUT:-out/kernels}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: > "$LOG"
if [ "${DRY:-0}" = 1 ]; then
  TINY=(--device cpu --shape custom --base tiny --layers 2 --hidden 128 --heads 4 --kv-heads 2 --intermediate 256
        --head-width 128 --dtype float32 --steps 2 --threads 1)
  C64=("${TINY[@]}" --parallel 64); C16=("${TINY[@]}" --parallel 16)
  PROFILE=(--height 256 --width 256)
  GEMM=(--rows 16,64 --backends default,cublaslt --deadline 60)
  LEVERS=${LEVERS:-as-is,as-is+step-cache=off,as-is+fuse,as-is+sdpa=math,as-is+gqa=native,as-is+gemm=cublaslt,as-is+compile=head+compile-mode=default}
  LEVER_RUNS=1x256; RUNS64=1x256,2x256; RUNS16=1x128
  T=(${PARTS_S:-120 120 240 120 120}); SWEEP_LIMITS=(--variant-timeout 120 --deadline 200)
else
  C64=(--device cuda --shape 14b-64x --dtype bfloat16); C16=(--device cuda --shape 14b-16x --dtype bfloat16)
  PROFILE=(--height 1024 --width 1024)
  GEMM=(--rows 32,64,128,1024 --backends default,cublaslt,autotune,autotune-splitk --autotune-rows 128 --deadline 25)
  LEVERS=${LEVERS:-as-is,as-is+step-cache=off,as-is+fuse,as-is+sdpa=efficient,as-is+sdpa=cudnn,as-is+sdpa=flash,as-is+gqa=native,as-is+gemm=cublaslt,as-is+compile=head+compile-mode=default,as-is+compile=step+compile-mode=default,as-is+compile=head,as-is+compile=step,as-is+gemm=autotune}
  LEVER_RUNS=1x512; RUNS64=1x1024,8x512; RUNS16=1x512
  T=(${PARTS_S:-55 40 210 140 80}); SWEEP_LIMITS=(--variant-timeout 80 --deadline 110)  # started by 110 s, ends by 210
fi
say() { echo "$*" | tee -a "$LOG"; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm --format=csv,noheader 2>&1 | tee -a "$LOG"

# 1. profile (the bench's report, with the profile's table, goes to the log)
say "== profile: ${C64[*]} ${PROFILE[*]} (timeout ${T[0]} s)"
"${TO[@]}" "${T[0]}" $PY -m bitdance_core bench "${C64[@]}" "${PROFILE[@]}" --no-naive --profile-out "$OUT/profile.json" \
    --profile-only >> "$LOG" 2>&1 || say "   (profile: exit $? — failed or timed out; see log.txt)"

# 2. GEMM shapes alone
say "== gemm: ${GEMM[*]} (timeout ${T[1]} s)"
"${TO[@]}" "${T[1]}" $PY -m bitdance_core bench-gemm "${C64[@]}" "${GEMM[@]}" --jsonl "$OUT/gemm.jsonl" >> "$LOG" 2>&1 \
  || say "   (gemm: exit $? — see log.txt; finished records are in gemm.jsonl)"

# 3. the levers, one at a time, with the bits they change
say "== levers: $LEVERS at $LEVER_RUNS (timeout ${T[2]} s)"
"${TO[@]}" "${T[2]}" $PY -m bitdance_core bench-sweep "${C64[@]}" --variants "$LEVERS" --runs "$LEVER_RUNS" --bits \
    --no-decode "${SWEEP_LIMITS[@]}" --jsonl "$OUT/levers.jsonl" 2>> "$LOG" | tee -a "$LOG" \
  || say "   (levers: exit $? — see log.txt; finished runs are in levers.jsonl)"

# 4. the targets: the best combination against today's fast mode
BEST=${BEST-$("${TO[@]}" 5 $PY benchmarks/kernels_summary.py "$OUT" --best 2>> "$LOG")}
say "== best combination: '${BEST}' (from levers.jsonl unless \$BEST was given)"
TARGETS="as-is"
[ -n "$BEST" ] && TARGETS="as-is,as-is+$BEST"
say "== targets 14B-64x: $TARGETS at $RUNS64 (timeout ${T[3]} s)"
"${TO[@]}" "${T[3]}" $PY -m bitdance_core bench-sweep "${C64[@]}" --variants "$TARGETS" --runs "$RUNS64" \
    --variant-timeout $(( (T[3] - 20) / 2 )) --deadline $(( (T[3] - 20) / 2 )) --jsonl "$OUT/targets64.jsonl" 2>> "$LOG" | tee -a "$LOG" \
  || say "   (targets 64x: exit $? — see log.txt)"
say "== targets 14B-16x: $TARGETS at $RUNS16 (timeout ${T[4]} s)"
"${TO[@]}" "${T[4]}" $PY -m bitdance_core bench-sweep "${C16[@]}" --variants "$TARGETS" --runs "$RUNS16" \
    --variant-timeout $(( (T[4] - 20) / 2 )) --deadline $(( (T[4] - 20) / 2 )) --jsonl "$OUT/targets16.jsonl" 2>> "$LOG" | tee -a "$LOG" \
  || say "   (targets 16x: exit $? — see log.txt)"

"${TO[@]}" 10 $PY benchmarks/kernels_summary.py "$OUT" --json "$OUT/summary.json" | tee -a "$LOG"
