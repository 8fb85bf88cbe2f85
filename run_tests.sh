#!/usr/bin/env bash
# The test command (README, CI): sets up everything on a fresh machine, then runs the test suite.
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v tmux >/dev/null 2>&1; then
    echo "tmux is missing: installing it (the tmux executor's tests need a real tmux server)"
    if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq tmux
    else sudo apt-get update -qq && sudo apt-get install -y -qq tmux; fi
fi

if ! command -v chromium >/dev/null 2>&1; then
    echo "chromium is missing: installing it (the review page's test plays its videos in headless Chromium)"
    if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium
    else sudo apt-get update -qq && sudo apt-get install -y -qq chromium; fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
# torch is a loose requirement of the package (bring your own CUDA build); the tests pin the one
# pair whose torchvision imports on the CI machines.
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
# The ray extra too: the Ray executor's tests run a two-node Ray cluster on this machine.
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,wan,ray,diffsynth,speed]" -c tests/constraints.txt
exec .venv/bin/python -m pytest -q "$@"
