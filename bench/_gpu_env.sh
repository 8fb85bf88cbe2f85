# Sourced by the bench/gpu_*.sh scripts, from the repo root on the GPU machine: the output folder, the
# environment every run there needs, and the wheels of what the machine lacks (carried in .whl/,
# installed into /tmp/site, which goes first on PYTHONPATH).
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 DIFFSYNTH_SKIP_DOWNLOAD=True
if [ -d .whl ] && [ "${WHEELS:-1}" = 1 ]; then  # WHEELS=0: use the environment as it is (CPU tries)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
