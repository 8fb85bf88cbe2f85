#!/usr/bin/env bash
# The demo: a 14-video sweep on the synthetic (test) backend, about a minute, then the report.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e .
if command -v tmux >/dev/null 2>&1; then
    exec .venv/bin/python run_experiment.py run experiments/demo.yaml --follow "$@"
fi
echo "tmux is not installed: running the demo's workers as child processes (--executor local)."
echo "Install tmux (sudo apt-get install tmux) to get one attachable session per worker."
exec .venv/bin/python run_experiment.py run experiments/demo.yaml --executor local "$@"
