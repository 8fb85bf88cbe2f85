#!/usr/bin/env bash
# The GPU machine's side of issue 5 and issue 7 item 3 (see docs/benchmarks.md). Run from the repo root:
#   bash bench/gpu_run.sh sizing   # NVML readings, calibration via `plan --recalibrate`, induced out-of-memory
#   bash bench/gpu_run.sh ab       # (a) bare loop and (b) orchestrator, same jobs, same machine
#   bash bench/gpu_run.sh c        # (c) one process per job
#   bash bench/gpu_run.sh tmux     # a real-model sweep under the default (tmux) executor, watched from outside
# Wheels for what the machine lacks travel in .whl/ (diffusers, av, importlib_metadata).
set -uo pipefail
STAGE=${1:?stage}
source bench/_gpu_env.sh  # OUT, the environment, the carried wheels
MODEL=/tmp/wan13b WORK=/tmp/gpubench STEPS=${STEPS:-4} JOBS=${JOBS:-12}
mkdir -p $WORK
{ date -u +%Y-%m-%dT%H:%M:%SZ; nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv;
  python3 -c "import torch, diffusers, av; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'av', av.__version__)"; } 2>&1 | tee -a "$OUT/machine.txt"
if [ ! -f $MODEL/model_index.json ]; then
    python3 bench/gpu_build_model.py $MODEL --size wan-1.3b --device cuda --dtype bfloat16 2>&1 | grep -v "Writing\|float32" | tee -a "$OUT/machine.txt"
fi
if [ -d .gpucarry/profiles ]; then mkdir -p $WORK/b/.sweep && cp -r .gpucarry/profiles $WORK/b/.sweep/; fi
case $STAGE in
  sizing)
    python3 bench/gpu_sizing.py --model $MODEL --work $WORK --steps $STEPS --jobs $JOBS 2>&1 | grep -v "Loading\|it/s\]" | tee "$OUT/sizing.log"
    cp $WORK/b/.sweep/profiles/*.json "$OUT/" 2>/dev/null
    timeout 240 python3 bench/gpu_sizing.py --model $MODEL --work $WORK --steps $STEPS --oom 2>&1 | grep -v "Loading\|it/s\]" | tee "$OUT/oom.log"
    ;;
  tmux)
    python3 bench/gpu_tmux.py --model $MODEL --work $WORK --steps $STEPS --jobs $JOBS \
        --profile "$(ls bench/gpu_results/diffusers-*.json | head -1)" 2>&1 | grep -v "Loading\|it/s\]" | tee "$OUT/tmux.log"
    ;;
  [abc]*)
    MODES=$(echo $STAGE | sed 's/./&,/g; s/,$//')
    python3 bench/gpu_throughput.py --model $MODEL --work $WORK --steps $STEPS --jobs $JOBS --modes $MODES \
        --json "$OUT/throughput_$STAGE.jsonl" 2>&1 | grep -v "Loading\|it/s\]" | tee "$OUT/throughput_$STAGE.log"
    ;;
esac
