#!/usr/bin/env bash
# The diffsynth backend on the GPU machine (issue 10): full-size random-weight Wan2.1 models in the
# original file layout, recognised by DiffSynth's own loader, run through the real CLI as v2v sweeps
# at 832x480x81 (steps reduced). Run from the repo root; about 7-8 minutes on an H100:
#   bash bench/gpu_diffsynth.sh                 # build 1.3B and 14B, then sweep each
#   STAGES="build13 run13" bash bench/gpu_diffsynth.sh    # a subset
# Stages: build13 build14 run13 run14 run13resident (the last only if time is left, see BUDGET_S).
# Needs, as wheels in .whl/ (the machine has torch, torchvision, transformers, safetensors, tokenizers):
#   diffsynth==2.1.12 einops ftfy wcwidth modelscope modelscope-hub, and av for the mp4s
#   (plus whatever the first line's import check below names as missing).
# Prints, per model: load time (per component), seconds per step, seconds per video, peak memory per
# worker (torch's reserved, and NVML's memory.used with the CUDA context), and how long the GPU idled
# between jobs (sidecar timelines, and nvidia-smi utilisation sampled every 200 ms).
# $OUT gets at most 5 files: diffsynth_machine.txt, diffsynth_build.log, diffsynth_{13,14,13resident}.log.
# Disk: 1.3B set 14.8 GB (DiT 2.8, text encoder 11.4, VAE 0.5) + 14B DiT 28.6 GB (the rest linked).
set -uo pipefail
source bench/_gpu_env.sh  # OUT, the environment, the carried wheels
STAGES=${STAGES:-"build13 build14 run13 run14 run13resident"}
STEPS=${STEPS:-4}
BUDGET_S=${BUDGET_S:-400}   # optional stages start only before this many seconds have passed
ROOT_DIR=${DSW_ROOT:-/tmp/dsw}
M13=$ROOT_DIR/Wan2.1-T2V-1.3B M14=$ROOT_DIR/Wan2.1-T2V-14B
START=$(date +%s)
mkdir -p "$ROOT_DIR"
{ date -u +%Y-%m-%dT%H:%M:%SZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  df -h "$ROOT_DIR" | tail -1; free -g | head -2
  python3 - <<'EOF'
import importlib, sys
missing = [m for m in ("torch", "torchvision", "diffsynth", "einops", "ftfy", "modelscope", "av", "yaml")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing modules: {missing}")
t = __import__("time").time()
from diffsynth.pipelines.wan_video import WanVideoPipeline  # noqa: F401  (import cost, and that it imports)
import torch, diffsynth, importlib.metadata as md
print(f"torch {torch.__version__}, diffsynth {md.version('diffsynth')}, import {__import__('time').time() - t:.1f}s")
EOF
} 2>&1 | tee "$OUT/diffsynth_machine.txt"
grep -q "missing modules" "$OUT/diffsynth_machine.txt" && exit 1

elapsed() { echo $(( $(date +%s) - START )); }

build() {  # build NAME SIZE FOLDER [LINK_FROM]
    local link=""; [ -n "${4:-}" ] && link="--link-from $4"
    if [ -f "$3/.built" ]; then echo "$1: already built"; return 0; fi
    python3 bench/gpu_diffsynth_build.py "$3" --size "$2" --device cuda $link 2>&1 | tee -a "$OUT/diffsynth_build.log"
    [ "${PIPESTATUS[0]}" = 0 ] && touch "$3/.built"
}

sweep() {  # sweep NAME MODEL JOBS OPTIONS_JSON TIMEOUT
    local name=$1 work=$ROOT_DIR/work_$1
    rm -rf "$work"
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 200 \
        > "$ROOT_DIR/util_$name.csv" 2>/dev/null &
    local smi=$!
    echo "== $name: $2, v2v 832x480x81, $STEPS steps, $3 videos, options $4 ($(elapsed)s into the script)"
    python3 bench/gpu_backends.py --backend diffsynth --model "$2" --work "$work" --task v2v --steps "$STEPS" \
        --jobs "$3" --options "$4" --timeout "$5" 2>&1 | grep -v "it/s\]\|^Loading\|^Using\|^\s*[\"{}\[]" \
        | tee "$OUT/diffsynth_$name.log"
    kill $smi 2>/dev/null; wait $smi 2>/dev/null
    python3 - "$work" "$ROOT_DIR/util_$name.csv" <<'EOF' 2>&1 | tee -a "$OUT/diffsynth_$name.log"
import json, sys
from datetime import datetime
from pathlib import Path
work, csv = Path(sys.argv[1]), Path(sys.argv[2])
cars = sorted((json.loads(p.read_text()) for p in (work / "out").rglob("seed_*.json")),
              key=lambda c: c["timeline"]["called"])
if not cars:
    sys.exit("no sidecars: the sweep did not finish")
samples = []
for line in csv.read_text().splitlines():
    try:
        stamp, util, used = [x.strip() for x in line.split(",")]
        samples.append((datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp(), float(util), float(used)))
    except ValueError:
        pass
t0, t1 = cars[0]["timeline"]["called"], cars[-1]["timeline"]["returned"]
window = [s for s in samples if t0 <= s[0] <= t1]
busy = sum(1 for s in window if s[1] > 0) / max(len(window), 1)
gaps = [b["timeline"]["called"] - a["timeline"]["returned"] for a, b in zip(cars, cars[1:])]
idle = []
for a, b in zip(cars, cars[1:]):  # zero-utilisation samples from one job's last step to the next's first
    span = [s for s in samples if a["timeline"]["last_step_done"] <= s[0] <= b["timeline"]["first_step_done"]]
    idle.append(sum(0.2 for s in span if s[1] == 0))
before = [c["timeline"]["first_step_done"] - c["timeline"]["called"] - c.get("seconds_per_step", 0) for c in cars]
after = [c["timeline"]["returned"] - c["timeline"]["last_step_done"] for c in cars]
load = cars[0].get("load", {})
print(f"load {load.get('load_seconds')} s (import {load.get('import_seconds')} s; components {load.get('components')})")
print(f"per video: generate {[c['generate_seconds'] for c in cars]} s; s/step {[c.get('seconds_per_step') for c in cars]}")
print(f"  before the first step (prompt/reference encoding, onloading) {[round(x, 2) for x in before]} s; "
      f"after the last (VAE decode) {[round(x, 2) for x in after]} s")
print(f"  prompt encodings {[c.get('prompt_encodings') for c in cars]}, reference encoding reused "
      f"{[c.get('reference_encoding_reused') for c in cars]}")
print(f"peak memory per worker: torch reserved {max(c.get('peak_memory_bytes') or 0 for c in cars) / 2**30:.1f} GiB, "
      f"allocated {max(c.get('peak_memory_allocated_bytes') or 0 for c in cars) / 2**30:.1f} GiB; NVML memory.used max "
      f"{max((s[2] for s in samples), default=0) / 1024:.1f} GiB")
print(f"between generate() calls: {[round(g, 3) for g in gaps]} s; GPU at 0% from one job's last step to the "
      f"next's first: {[round(i, 1) for i in idle]} s; GPU busy in {busy:.0%} of the sweep's samples")
EOF
}

for stage in $STAGES; do
    case $stage in
      build13) build 13 1.3b "$M13" ;;
      build14) build 14 14b "$M14" "$M13" ;;
      run13) sweep 13 "$M13" 4 '{}' 300 ;;
      run14) sweep 14 "$M14" 2 '{}' 420 ;;
      run13resident)
        if [ "$(elapsed)" -lt "$BUDGET_S" ]; then sweep 13resident "$M13" 4 '{"vram_management": false}' 180
        else echo "run13resident skipped: $(elapsed)s passed (BUDGET_S=$BUDGET_S)"; fi ;;
      *) echo "unknown stage $stage" ;;
    esac
done
echo "total $(elapsed)s"
[ "${KEEP:-0}" = 1 ] || rm -rf "$M13" "$M14"
