"""Smoke test: each CPU benchmark starts and finishes on a tiny size (no timing assertions)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script", ["load_balance.py", "overhead.py", "scaling.py"])
def test_bench_script_runs_quick(script):
    run = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--quick"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "machine:" in run.stdout
    assert "-----" in run.stdout  # the figures' table was printed
