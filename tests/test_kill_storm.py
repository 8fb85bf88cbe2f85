"""SIGKILL storms: workers and supervisors killed at random moments of a sweep, under the local and the tmux
executor, then the same command run again until the sweep is done. Every video is made exactly once
(one valid mp4 per job, never two `done` attempts for one job), no temporary file is left, and no job
fails for good because of the kills. (A two-node Ray cluster with a node removed mid-sweep:
tests/test_ray.py.)"""
from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from orchestrator.ledger import Ledger
from orchestrator.outputs import TEMP_MARK, count_frames

from .conftest import PATIENCE_S, ROOT, cli, synthetic_manifest

pytestmark = pytest.mark.slow

JOBS = 24  # 12 prompts x 2 seeds
FRAMES = 5


def _sweep_processes(root: Path) -> list[psutil.Process]:
    """The supervisors and workers of sweeps under `root` (found by their spec files' paths)."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        if process.info["status"] != psutil.STATUS_ZOMBIE and any(
                part in ("orchestrator.supervisor", "orchestrator.worker") for part in cmdline) \
                and any(part.startswith(str(root)) for part in cmdline):
            found.append(process)
    return found


def _storm(root: Path, kills: int, rng: random.Random, until_done) -> int:
    """Kill up to `kills` random supervisor or worker processes, one every 0.3-1.2 s, until none is left
    or the sweep is done; return how many."""
    killed, seen = 0, False
    while killed < kills and not until_done():
        time.sleep(rng.uniform(0.3, 1.2))
        victims = _sweep_processes(root)
        if not victims:
            if seen:
                break  # every one killed or ended: the caller runs the sweep again
            continue  # not started yet
        seen = True
        try:
            rng.choice(victims).send_signal(signal.SIGKILL)
            killed += 1
        except psutil.Error:
            continue
    return killed


def _check_made_once(out: Path) -> None:
    mp4s = sorted(p for p in out.rglob("*.mp4") if ".sweep" not in p.parts)
    assert len(mp4s) == JOBS and all(count_frames(p) == FRAMES for p in mp4s), mp4s
    assert not [p for p in out.rglob("*") if p.name.startswith(TEMP_MARK)]
    ledger = Ledger(out / ".sweep" / "ledger.sqlite")
    assert ledger.counts()["done"] == JOBS and ledger.counts()["failed"] == 0
    outcomes: dict[str, list[str]] = {}
    for attempt in ledger.attempts():
        outcomes.setdefault(attempt["job_id"], []).append(attempt["outcome"])
    for job, seen in outcomes.items():  # made once: a video written but not recorded is skipped, not made again
        assert seen.count("done") <= 1 and seen.count("done") + seen.count("skipped") >= 1, (job, seen)


def _manifest(write_manifest, trial: int) -> Path:
    return write_manifest(synthetic_manifest(
        categories={"a": {"prompts": [f"prompt {i}" for i in range(12)]}},
        model={"options": {"seconds_per_job": 0.4, "jitter": 0.5}},
        execution={"retries": 100, "heartbeat_timeout_s": 3, "job_timeout_s": 60, "max_restarts": 100}),
        name=f"storm{trial}.yaml")


@pytest.mark.parametrize("trial", range(3))
def test_a_local_sweep_survives_a_storm_of_kills_and_makes_every_video_once(write_manifest, tmp_path, trial):
    rng = random.Random(trial)
    path = _manifest(write_manifest, trial)
    out = tmp_path / "out"
    runs = 0
    while True:
        runs += 1
        run = subprocess.Popen([sys.executable, str(ROOT / "run_experiment.py"), "run", str(path), "--executor",
                                "local", "--no-progress"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        if runs == 1:
            assert _storm(tmp_path, 6, rng, lambda: run.poll() is not None) >= 2  # the storm did hit
        stdout, stderr = run.communicate(timeout=PATIENCE_S)
        assert "Traceback" not in stdout + stderr, stdout + stderr
        if run.returncode == 0:
            break
        assert runs < 10, stdout + stderr
    _check_made_once(out)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (run_tests.sh installs it)")
@pytest.mark.parametrize("trial", range(2))
def test_a_tmux_sweep_survives_a_storm_of_kills_and_makes_every_video_once(write_manifest, tmp_path, server, trial):
    # `server`: libtmux's pytest plugin's private tmux server, killed in teardown.
    rng = random.Random(100 + trial)
    path = _manifest(write_manifest, trial)
    out = tmp_path / "out"
    env = {"ORCHESTRATOR_TMUX_SOCKET": server.socket_name}
    ledger_path = out / ".sweep" / "ledger.sqlite"

    def finished() -> bool:
        return ledger_path.exists() and Ledger(ledger_path, readonly=True).unfinished() == 0 \
            and not _sweep_processes(tmp_path)

    started = cli("run", str(path), "--executor", "tmux", env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    assert _storm(tmp_path, 6, rng, finished) >= 2  # the storm did hit
    deadline = time.monotonic() + PATIENCE_S
    while not finished() and time.monotonic() < deadline:
        if not _sweep_processes(tmp_path):  # every worker killed or given up on: the user runs it again
            again = cli("run", str(path), "--executor", "tmux", env=env)
            assert again.returncode == 0 and "Traceback" not in again.stderr, again.stdout + again.stderr
        time.sleep(0.5)
    assert finished()
    _check_made_once(out)
