"""Smoke test: each CPU benchmark starts and finishes on a tiny size (no timing assertions)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import PATIENCE_S

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # whole benchmark scripts and pipelines (minutes on a busy 2-core machine)


@pytest.mark.parametrize("script", ["load_balance.py", "overhead.py", "scaling.py"])
def test_bench_script_runs_quick(script):
    run = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--quick"], cwd=ROOT,
                         capture_output=True, text=True, timeout=PATIENCE_S)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "machine:" in run.stdout
    assert "-----" in run.stdout  # the figures' table was printed


def test_conditioned_checkpoints_match_diffsynths_table():
    """The GPU benchmark's full-size conditioned checkpoints (VACE, Fun control, S2V with its wav2vec2
    encoder, Animate) have the tensor names and shapes DiffSynth recognises: checked on meta, no weights."""
    pytest.importorskip("diffsynth")
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_conditioned_build.py"), "--verify-only"],
                         cwd=ROOT, capture_output=True, text=True, timeout=PATIENCE_S)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for model in ("vace13", "control13", "s2v14", "animate14"):
        assert f"{model} (" in run.stdout
    # DiTs 4, the S2V audio encoder, the CLIP image encoder of control13 and animate14 (its text half too)
    assert "DIFFERS" not in run.stdout and run.stdout.count("matches DiffSynth's table") == 7


def test_conditioned_gpu_script_runs_its_whole_flow_on_tiny_checkpoints(tmp_path):
    """bench/gpu_conditioned.sh with TINY=1: tiny checkpoints, its manifests and inputs, the real CLI, and
    the figures read back from the sidecars (the second job of one input reuses its encoding)."""
    pytest.importorskip("diffsynth")
    import json
    import os
    import shutil
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    env = {**os.environ, "TINY": "1", "OUT": str(tmp_path / "out"), "DSW_ROOT": str(tmp_path / "models"),
           "PYTHON": sys.executable, "STAGES": "build13 vace13 control13 animate14",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_conditioned.sh")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=PATIENCE_S)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-3000:]
    summaries = [json.loads(line) for line in (tmp_path / "out" / "conditioned_summary.jsonl").read_text().splitlines()]
    assert [s["task"] for s in sorted(summaries, key=lambda s: s["task"])] == ["animate", "control", "vace"]
    for summary in summaries:
        assert summary["videos"] == 2 and len(summary["seconds_per_step"]) == 2
        assert [set(e.values()) for e in summary["input_encodings"]] == [{"encoded"}, {"reused"}]
    assert "seconds per step" in (tmp_path / "out" / "conditioned_vace13.log").read_text()
    assert not (tmp_path / "models").exists()  # the script cleans up after itself (KEEP=1 keeps it)
