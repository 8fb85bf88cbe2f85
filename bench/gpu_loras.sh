#!/usr/bin/env bash
# Issue 30 on the GPU machine: LoRAs and the 4-step recipe on a Wan2.1-14B-sized random checkpoint, through
# the product's diffusers backend (bench/gpu_loras.py says what each stage measures).
#   STAGES=eager bash bench/gpu_loras.sh            # one device call (about 9 minutes)
#   STAGES="compile fp8" bash bench/gpu_loras.sh    # the next (the checkpoint is kept in /tmp while warm)
# Needs, as wheels in .whl/: diffusers, importlib_metadata, zipp, peft, torchao, av.
set -uo pipefail
source bench/_gpu_env.sh  # OUT, the environment, the carried wheels
STAGES=${STAGES:-eager}
WORK=${WORK:-/tmp/loras}
MODEL=$WORK/wan-14b
mkdir -p "$WORK"
{ date -u +%Y-%m-%dT%H:%M:%SZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; } \
    2>&1 | tee -a "$OUT/loras_machine.txt"
if [ ! -f "$MODEL/model_index.json" ]; then
    python3 bench/gpu_build_model.py "$MODEL" --size wan-14b --device cuda --dtype bfloat16 2>&1 \
        | grep -v "Writing\|^W1\|Enum subclass" | tee -a "$OUT/loras_machine.txt"
fi
for stage in $STAGES; do
    echo "== $stage"
    python3 bench/gpu_loras.py "$MODEL" "$WORK/loras" --stage "$stage" 2>&1 \
        | grep -v "^W1\|Enum subclass\|torchao. Tensor objects\|it/s\]" | tee -a "$OUT/loras_$stage.log"
done
