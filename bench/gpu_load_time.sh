#!/usr/bin/env bash
# Checkpoint load time on the GPU machine (issue 13; docs/benchmarks.md, "Checkpoint load time").
# From the repo root:   bash bench/gpu_load_time.sh        (OUT=/some/dir to keep the results elsewhere)
# Builds a Wan-1.3B-sized random checkpoint (~3.9 GB) and measures it, deletes it, then builds a
# Wan-14B-sized one (28.6 GB transformer + 11.4 GB umt5-xxl text encoder + VAE, ~40 GB of files) and
# measures it: `load_components` sequential and parallel, cold (pages dropped) and warm page cache, each
# in a fresh process, until every component is on the GPU. About 6 minutes on an H100 box (128 GB RAM,
# 64 GB disk); each size has its own time limit so a slow disk still returns the 1.3B figures.
# Wheels for what the machine lacks travel in .whl/ (diffusers, as for bench/gpu_run.sh).
set -uo pipefail
WORK=${WORK:-/tmp/loadbench}; mkdir -p "$WORK"
source bench/_gpu_env.sh  # OUT, the environment, the carried wheels
{ date -u +%Y-%m-%dT%H:%M:%SZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
  free -g | head -2; df -h "$WORK" | tail -1; nproc
  findmnt -no SOURCE,FSTYPE -T "$WORK"; } 2>&1 | tee "$OUT/load_machine.txt"

run() {  # SIZE LIMIT_S
    timeout "$2" python3 bench/load_time.py --size "$1" --folder "$WORK/$1" --device cuda --dtype bfloat16 \
        --json "$OUT/load_time.jsonl" 2>&1 | grep -v "Loading\|it/s\]\|Writing" | tee "$OUT/load_time_$1.log"
    echo "exit ${PIPESTATUS[0]} for $1" | tee -a "$OUT/load_time_$1.log"
    rm -rf "$WORK/$1" "$WORK/$1.building"   # the disk holds one size at a time
}
run wan-1.3b 150
run wan-14b 330
df -h "$WORK" | tail -1 | tee -a "$OUT/load_machine.txt"
