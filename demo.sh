#!/usr/bin/env bash
# The demo: 14 videos from the real diffusers Wan pipeline on a tiny random-weight checkpoint (built
# on first use, no download), on the CPU, about a minute; then the report.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
# torch is yours to bring (a CUDA build for real runs); the demo takes the pair the tests use when
# no torch is installed yet.
.venv/bin/python -c "import torch" 2>/dev/null || \
    .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[wan]"
if command -v tmux >/dev/null 2>&1; then
    exec .venv/bin/python run_experiment.py run experiments/demo.yaml --follow "$@"
fi
echo "tmux is not installed: running the demo's workers as child processes (--executor local)."
echo "Install tmux (sudo apt-get install tmux) to get one attachable session per worker."
exec .venv/bin/python run_experiment.py run experiments/demo.yaml --executor local "$@"
