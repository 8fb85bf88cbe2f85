#!/usr/bin/env bash
# Issue 20 on the GPU machine: the speed settings, measured side by side in one run through the product's
# own trial command (`models speed`, orchestrator/speed_trial.py), on random-weight checkpoints of real
# size at the user's shapes (832x480x81, CFG on; s/video at 38 steps = 50 steps at strength 0.75).
#   bash bench/gpu_speed.sh                       # STAGES="diffusers13 diffsynth13" by default
#   STAGES=diffusers14 bash bench/gpu_speed.sh
#   LIMIT_S=580 STAGES=diffsynth14 bash bench/gpu_speed.sh   # copies the candidates' logs before a 600 s limit
# Stages:
#   diffusers13  Wan-1.3B-sized diffusers checkpoint: eager, compile=blocks, compile=blocks+fp8 (+ warm cache)
#   diffusers14  Wan-14B-sized diffusers checkpoint (28.6 GB DiT): eager, compile=blocks, compile=blocks+fp8
#   diffsynth13  Wan2.1-T2V-1.3B original layout (recognised by DiffSynth's loader): the same three
#   diffsynth14  Wan2.1-T2V-14B original layout (28.6 GB DiT in 6 shards): eager, compile=blocks+fp8 (TRIES_DIFFSYNTH14)
# Needs, as wheels in .whl/: diffusers, importlib_metadata, torchao, av, and for diffsynth: diffsynth ftfy
# wcwidth modelscope. Each stage prints the trial table and writes $OUT/speed_<stage>.log.
set -uo pipefail
source bench/_gpu_env.sh  # OUT, the environment, the carried wheels
STAGES=${STAGES:-"diffusers13 diffsynth13"}
STEPS=${STEPS:-3}
DEVICE=${DEVICE:-cuda}
WORK=${WORK:-/tmp/speed}
START=$(date +%s)
mkdir -p "$WORK"
# Each candidate's own log (its load, compile and job, as the child process wrote them) into $OUT: at the
# end, and, with LIMIT_S (the device call's limit), once more shortly before it, so a run that is cut off
# still says where its time went.
snapshot_trials() {
    for log in "$WORK"/out_*/.sweep/speed_trial/*/trial*.log; do
        [ -f "$log" ] || continue
        candidate=$(basename "$(dirname "$log")"); stage=$(basename "${log%%/.sweep/*}")
        cp "$log" "$OUT/trial_${stage#out_}_${candidate}_$(basename "$log")"
    done
}
SNAPSHOT=
[ -n "${LIMIT_S:-}" ] && { { sleep $(( LIMIT_S - 20 )); snapshot_trials; } >/dev/null 2>&1 & SNAPSHOT=$!; }
{ date -u +%Y-%m-%dT%H:%M:%SZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, diffusers, torchao; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'torchao', torchao.__version__, 'capability', torch.cuda.get_device_capability() if torch.cuda.is_available() else None)"
} 2>&1 | grep -v "^W1\|Enum subclass" | tee -a "$OUT/speed_machine.txt"

manifest() {  # manifest NAME BACKEND MODEL OPTIONS -> $WORK/NAME.yaml
    cat > "$WORK/$1.yaml" <<EOF
name: speed_$1
output_dir: $WORK/out_$1
model: {backend: $2, task: t2v, path: $3, dtype: bfloat16, options: $4}
generation: {width: ${WIDTH:-832}, height: ${HEIGHT:-480}, num_frames: ${FRAMES:-81}, fps: 15, steps: 38, cfg_scale: 5.0}
seeds: [0]
categories:
  bench: {prompts: ["a red ball rolls across a wooden table"]}
EOF
    echo "$WORK/$1.yaml"
}

trial() {  # trial STAGE MANIFEST [models speed flags]
    local stage=$1 file=$2; shift 2
    echo "== $stage ($(( $(date +%s) - START ))s into the script)"
    python3 run_experiment.py models speed "$file" --steps "$STEPS" "$@" 2>&1 \
        | grep -v "^W1\|Enum subclass\|torchao. Tensor objects\|it/s\]" | tee -a "$OUT/speed_$stage.log"  # after the build lines of the stage
    for log in "$WORK"/out_"$stage"/.sweep/speed_trial/*/trial.log; do  # a failed candidate's own words
        grep -q "Traceback" "$log" && { echo "-- $log"; tail -15 "$log"; } | tee -a "$OUT/speed_$stage.log"
    done
}

for stage in $STAGES; do
    case $stage in
      diffusers13|diffusers14)
        size=wan-1.3b; [ $stage = diffusers14 ] && size=wan-14b
        model=$WORK/diffusers_$size
        [ -f "$model/model_index.json" ] || python3 bench/gpu_build_model.py "$model" --size $size --device "$DEVICE" \
            --dtype bfloat16 2>&1 | grep -v "Writing\|^W1\|Enum subclass" | tee -a "$OUT/speed_$stage.log"
        # 14B: eager and fp8 + compile only, to stay inside one 10-minute device call
        tries="--try compile=blocks --try compile=blocks,quantize=fp8 --warm"
        [ $stage = diffusers14 ] && tries="${TRIES14:---try compile=blocks,quantize=fp8}"
        trial $stage "$(manifest $stage diffusers "$model" '{}')" $tries
        [ "${KEEP:-0}" = 1 ] || [ $stage = diffusers13 ] || rm -rf "$model"
        ;;
      diffsynth13|diffsynth14)
        size=1.3b; tries=${TRIES_DIFFSYNTH:---try compile=blocks --try compile=blocks,quantize=fp8}
        [ $stage = diffsynth14 ] && { size=14b; tries=${TRIES_DIFFSYNTH14:---try compile=blocks,quantize=fp8}; }
        model=$WORK/Wan2.1-T2V-${size^^}
        built=$(date +%s)
        [ -f "$model/.built" ] || { python3 bench/gpu_diffsynth_build.py "$model" --size $size --device "$DEVICE" 2>&1 \
            | tee -a "$OUT/speed_$stage.log" && touch "$model/.built" \
            && echo "built in $(( $(date +%s) - built ))s" | tee -a "$OUT/speed_$stage.log"; }
        trial $stage "$(manifest $stage diffsynth "$model" '{vram_management: text_encoder}')" $tries
        ;;
      *) echo "unknown stage $stage" ;;
    esac
done
[ -n "$SNAPSHOT" ] && kill "$SNAPSHOT" 2>/dev/null
snapshot_trials
echo "total $(( $(date +%s) - START ))s"
