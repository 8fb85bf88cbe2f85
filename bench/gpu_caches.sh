#!/usr/bin/env bash
# Issue 31 on the GPU machine: step caches (speed.cache) on a Wan2.1-14B-sized random checkpoint at
# 832x480x81 through the product's diffusers backend: none, taylorseer, first_block 0.05 and 0.1 with CFG 5,
# faster_cache against none at cfg 1 (bench/gpu_caches.py says what each run measures, and why 12 steps).
#   bash bench/gpu_caches.sh                 # one device call on an H100 (about 9 minutes with the build)
#   RUNS=first_block_0.05,first_block_0.1 bash bench/gpu_caches.sh   # some runs only (checkpoint kept in /tmp)
#   TINY=1 WHEELS=0 OUT=/tmp/out bash bench/gpu_caches.sh             # a CPU dry run on the tiny checkpoint
# Needs, as wheels in .whl/: diffusers, importlib_metadata, zipp, av.
set -uo pipefail
source bench/_gpu_env.sh  # OUT, the environment, the carried wheels
WORK=${WORK:-/tmp/caches}
ARGS=()
[ -n "${RUNS:-}" ] && ARGS+=(--only "$RUNS")
[ -n "${STEPS:-}" ] && ARGS+=(--steps "$STEPS")
mkdir -p "$WORK"
if [ "${TINY:-0}" = 1 ]; then
    MODEL=$WORK/wan-tiny  # (built by gpu_caches.py --tiny)
    ARGS+=(--tiny)
else
    MODEL=$WORK/wan-14b
    { date -u +%Y-%m-%dT%H:%M:%SZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; } \
        2>&1 | tee -a "$OUT/caches_machine.txt"
    if [ ! -f "$MODEL/model_index.json" ]; then
        python3 bench/gpu_build_model.py "$MODEL" --size wan-14b --device cuda --dtype bfloat16 2>&1 \
            | grep -v "Writing\|^W1\|Enum subclass" | tee -a "$OUT/caches_machine.txt"
    fi
fi
python3 bench/gpu_caches.py "$MODEL" "${ARGS[@]}" 2>&1 \
    | grep -v "^W1\|Enum subclass\|it/s\]" | tee -a "$OUT/caches.log"
