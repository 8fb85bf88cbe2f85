#!/usr/bin/env bash
# Build a SageAttention 2 wheel on the GPU machine, for the card it runs on, from a pinned commit; record the
# build time; copy the wheel (and its record) to $OUT; then check its kernel with the attention guard.
#
# SageAttention 2 is not on PyPI (PyPI's `sageattention` 1.x is the Triton SageAttention 1): it builds from
# source with nvcc. The source comes carried in .sage/ (bench/export_sageattention.sh puts it there; a device
# call carries it with `carry: [".sage"]`).
#
# Why this commit: d1a57a5 (2026-01-17, "Update README", the head of thu-ml/SageAttention when fetched) is
# later than the fix of the sm90 kernel that drew "confetti" noise on Wan2.2 (SageAttention #320, diffusers
# #12783): the 2.2.0 release is broken on Hopper. sglang enables SageAttention on Hopper only at d9704247
# (2025-11-18), an ancestor of this commit. setup.py still says version 2.2.0 at this commit, so the wheel
# is given the local version 2.2.0+d1a57a5: the guard's record in every sidecar then names the commit.
#
#   bench/build_sageattention.sh            on the GPU machine, from the repo root
#   env: OUT (default /tmp/out), PYTHON (default python3), MAX_JOBS (16), EXT_PARALLEL (extensions built at
#        once, 2: each runs MAX_JOBS nvcc jobs of --threads=8)
set -euo pipefail
SAGE_COMMIT=d1a57a5
SRC=${SAGE_SRC:-.sage}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-16} EXT_PARALLEL=${EXT_PARALLEL:-2}

for need in setup.py pyproject.toml README.md LICENSE csrc sageattention COMMIT; do
    [ -e "$SRC/$need" ] || { echo "$SRC/$need is missing: run bench/export_sageattention.sh here first" >&2; exit 1; }
done
case "$(cat "$SRC/COMMIT")" in
    "$SAGE_COMMIT"*) ;;
    *) echo "$SRC holds $(cat "$SRC/COMMIT"), not $SAGE_COMMIT" >&2; exit 1 ;;
esac
command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] || { echo "no nvcc on this machine" >&2; exit 1; }
export PATH=$PATH:/usr/local/cuda/bin

# the card this machine has, e.g. 9.0 (an H100/H200); SageAttention builds one extension per architecture
ARCH=$("$PYTHON" -c "import torch; major, minor = torch.cuda.get_device_capability(); print(f'{major}.{minor}')")
export TORCH_CUDA_ARCH_LIST=$ARCH
echo "building SageAttention $SAGE_COMMIT for compute capability $ARCH (MAX_JOBS=$MAX_JOBS, EXT_PARALLEL=$EXT_PARALLEL)"

BUILD=$(mktemp -d /tmp/sage-build.XXXXXX)
cp -r "$SRC"/. "$BUILD"/
grep -q "version='2.2.0'," "$BUILD/setup.py" || { echo "setup.py's version line changed: check the commit" >&2; exit 1; }
sed -i "s/version='2.2.0',/version='2.2.0+$SAGE_COMMIT',/" "$BUILD/setup.py"

started=$(date +%s)
(cd "$BUILD" && "$PYTHON" setup.py bdist_wheel) > "$OUT/build_sageattention.log" 2>&1 \
    || { tail -40 "$OUT/build_sageattention.log"; echo "build failed: $OUT/build_sageattention.log" >&2; exit 1; }
seconds=$(( $(date +%s) - started ))
WHEEL=$(ls "$BUILD"/dist/sageattention-*.whl)
cp "$WHEEL" "$OUT"/
echo "built $(basename "$WHEEL") in ${seconds}s ($(du -h "$WHEEL" | cut -f1))"

"$PYTHON" - "$OUT/build_sageattention.json" "$SAGE_COMMIT" "$ARCH" "$seconds" "$(basename "$WHEEL")" "$(stat -c %s "$WHEEL")" <<'PY'
import json, subprocess, sys, time, torch
path, commit, arch, seconds, wheel, size = sys.argv[1:]
nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
json.dump({"commit": commit, "arch": arch, "build_seconds": int(seconds), "wheel": wheel, "wheel_bytes": int(size),
           "card": torch.cuda.get_device_name(), "torch": torch.__version__, "nvcc": nvcc,
           "max_jobs": int(__import__("os").environ["MAX_JOBS"]), "date": time.strftime("%Y-%m-%d")},
          open(path, "w"), indent=1)
PY

# The new build through the guard: Sage2 and cuDNN against float32 math at the guard's Wan shape (40 heads)
SITE=$(mktemp -d /tmp/sage-site.XXXXXX)
"$PYTHON" -m pip install -q --no-deps --no-index --target "$SITE" "$WHEEL"
PYTHONPATH="$SITE:.${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" - "$OUT/build_sageattention_guard.json" <<'PY'
import json, sys, torch
from sageattention import sageattn
from orchestrator import attention_guard as guard
shape = guard.shape_for(40, 128, "cuda")
kernels = [guard.Kernel("sageattn", guard.package_version("sageattention"), sageattn, eight_bit=True),
           guard.Kernel("sdpa cudnn", guard.torch_version("cudnn"), guard.sdpa_run("cudnn"))]
records = []
for kernel in kernels:
    guard.measure(kernel, shape, torch.bfloat16, "cuda")  # the first call compiles or loads the kernel
    records.append(guard.measure(kernel, shape, torch.bfloat16, "cuda"))
    print(records[-1])
json.dump(records, open(sys.argv[1], "w"), indent=1)
sys.exit(0 if all(r["passed"] for r in records) else 1)
PY
