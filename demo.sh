#!/usr/bin/env bash
# The demo: a 14-video sweep on the synthetic (test) backend, about a minute, then the report.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e .
exec .venv/bin/python run_experiment.py run experiments/demo.yaml --follow "$@"
