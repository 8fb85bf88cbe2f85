#!/usr/bin/env bash
# Wan's conditioned tasks on the GPU machine (issue 23): full-size random-weight checkpoints in the
# original release layouts, recognised by DiffSynth's own model table (bench/gpu_conditioned_build.py),
# each run through the real CLI (bench/gpu_conditioned_run.py: `run_experiment.py run`, executor local,
# one worker) at 832x480x81, 16 fps, STEPS steps (default 4), 2 prompts x 1 seed on ONE input, beside a
# t2v run on the same 1.3B base model. Run from the repo root, wheels carried in .whl/ (as
# bench/gpu_diffsynth.sh: diffsynth==2.1.12 einops ftfy wcwidth modelscope modelscope-hub av):
#   bash bench/gpu_conditioned.sh                                  # stage 1 (1.3B), about 6 minutes (estimate)
#   STAGES="s2v14 animate14" bash bench/gpu_conditioned.sh         # stage 2 (14B), a call of its own
# Stages: build13 (T2V-1.3B base + VACE-1.3B + Fun-V1.1-1.3B-Control), t2v13, vace13, control13;
# s2v14 (build S2V-14B, run it, delete it), animate14 (build Animate-14B with its CLIP image encoder, run it,
# delete it).
# Prints per task: load time, seconds per step, seconds per video, the first vs the second job's time
# before the first step (input encoding; the second job's input comes from the worker's cache:
# input_encodings "reused"), peak memory. $OUT gets conditioned_machine.txt, conditioned_build.log and
# conditioned_<stage>.log per run.
# TINY=1: the same flow on the CPU in about a minute (tiny random checkpoints, 64x64x9, 2 steps, float32).
# Disk: stage 1 about 24 GB (the base's 13.7 + VACE DiT 4.3 + Fun control DiT 3.1 + CLIP 2.4); stage 2 the base,
# then S2V-14B 33 GB, deleted before Animate-14B's 35 GB and its CLIP 2.4 are written.
set -uo pipefail
[ "${TINY:-0}" = 1 ] && WHEELS=${WHEELS:-0}  # on the CPU: the environment as it is
source bench/_gpu_env.sh  # OUT, the environment, the carried wheels
PYTHON=${PYTHON:-python3}
TINY=${TINY:-0}
STAGES=${STAGES:-"build13 t2v13 vace13 control13"}
ROOT_DIR=${DSW_ROOT:-/tmp/dsc}
START=$(date +%s)
mkdir -p "$ROOT_DIR"
if [ "$TINY" = 1 ]; then
    STEPS=${STEPS:-2}; SIZE="--width 64 --height 64 --frames 9 --dtype float32"; DEVICE=cpu
    OPTIONS=${OPTIONS:-"{}"}
    T2V=$ROOT_DIR/tiny-t2v VACE=$ROOT_DIR/tiny-vace CONTROL=$ROOT_DIR/tiny-control S2V=$ROOT_DIR/tiny-s2v
    ANIMATE=$ROOT_DIR/tiny-animate
else
    STEPS=${STEPS:-4}; SIZE=""; DEVICE=cuda
    T2V=$ROOT_DIR/Wan2.1-T2V-1.3B VACE=$ROOT_DIR/Wan2.1-VACE-1.3B CONTROL=$ROOT_DIR/Wan2.1-Fun-V1.1-1.3B-Control
    S2V=$ROOT_DIR/Wan2.2-S2V-14B ANIMATE=$ROOT_DIR/Wan2.2-Animate-14B
fi
{ date -u +%Y-%m-%dT%H:%M:%SZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  df -h "$ROOT_DIR" | tail -1
  $PYTHON -c "import torch, importlib.metadata as md; print(f'torch {torch.__version__}, diffsynth {md.version(\"diffsynth\")}')"
} 2>&1 | tee "$OUT/conditioned_machine.txt"

elapsed() { echo $(( $(date +%s) - START )); }

build() {  # build MODEL...  (TINY: the tests' tiny builder, one folder per task)
    if [ "$TINY" = 1 ]; then
        $PYTHON - "$ROOT_DIR" "$@" <<'EOF' 2>&1 | tee -a "$OUT/conditioned_build.log"
import sys
from orchestrator.demo.random_checkpoints import build_tiny_checkpoint
for model in sys.argv[2:]:
    task = model[:-2]  # vace13 -> vace
    print(f"built tiny {task} at {build_tiny_checkpoint(f'{sys.argv[1]}/tiny-{task}', task=task)}")
EOF
    else
        $PYTHON bench/gpu_conditioned_build.py "$ROOT_DIR" --device "$DEVICE" --models "$@" 2>&1 \
            | tee -a "$OUT/conditioned_build.log"
    fi
    return "${PIPESTATUS[0]}"
}

run() {  # run STAGE TASK MODEL
    echo "== $1 ($(elapsed)s into the script)"
    $PYTHON bench/gpu_conditioned_run.py --task "$2" --model "$3" --work "$ROOT_DIR/work_$1" --steps "$STEPS" $SIZE \
        ${OPTIONS:+--options "$OPTIONS"} 2>&1 | grep -v "it/s\]\|^Loading\|^Using" | tee "$OUT/conditioned_$1.log"
    return "${PIPESTATUS[0]}"
}

status=0
for stage in $STAGES; do
    case $stage in
      build13) if [ "$TINY" = 1 ]; then build $(echo "$STAGES" | grep -o "[a-z0-9]*13" | grep -v build); else build vace13 control13; fi || status=1 ;;
      t2v13) run t2v13 t2v "$T2V" || status=1 ;;
      vace13) run vace13 vace "$VACE" || status=1 ;;
      control13) run control13 control "$CONTROL" || status=1 ;;
      s2v14) { build s2v14 && run s2v14 s2v "$S2V"; } || status=1
             [ "$TINY" = 1 ] || rm -rf "$S2V" ;;  # disk: the next 14B model needs its room
      animate14) { build animate14 && run animate14 animate "$ANIMATE"; } || status=1
             [ "$TINY" = 1 ] || rm -rf "$ANIMATE" ;;
      *) echo "unknown stage $stage"; status=1 ;;
    esac
done
echo "total $(elapsed)s"
grep -h "^summary: " "$OUT"/conditioned_*.log 2>/dev/null | sed 's/^summary: //' > "$OUT/conditioned_summary.jsonl"
[ "${KEEP:-0}" = 1 ] || rm -rf "$ROOT_DIR"
exit $status
