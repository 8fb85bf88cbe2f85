"""Faults around the sweep rather than in its jobs (issue 18): a damaged ledger, a read-only output
folder, a full disk. Each gets one clear message, no traceback, and loses nothing made.

Read-only folders: a process running as root ignores permission bits, so as root the CLI runs
without CAP_DAC_OVERRIDE (`setpriv`), which makes `chmod` bind it as it binds any user.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.ledger import Ledger

from .conftest import ROOT, cli, synthetic_manifest

RUN = ("--executor", "local", "--no-progress")


def _mp4s(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*.mp4") if ".sweep" not in p.parts)


def _unprivileged(*args: str) -> subprocess.CompletedProcess:
    """The CLI as a user without the power to ignore permissions (root loses CAP_DAC_OVERRIDE)."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: permissions cannot be enforced")
        prefix = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search,-fowner"]
    return subprocess.run([*prefix, sys.executable, str(ROOT / "run_experiment.py"), *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _chmod_tree(folder: Path, writable: bool) -> None:
    for path in [folder, *folder.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode | 0o200 if writable else mode & ~0o222)


def test_a_damaged_ledger_report_falls_back_to_the_disk_and_run_says_how_to_recover(write_manifest, tmp_path):
    path = write_manifest(synthetic_manifest())
    out = tmp_path / "out"
    assert cli("run", str(path), *RUN).returncode == 0
    (out / "alpha" / "seed_1_prompt_0.mp4").unlink()
    ledger = out / ".sweep" / "ledger.sqlite"
    for extra in ("-wal", "-shm"):
        Path(f"{ledger}{extra}").unlink(missing_ok=True)
    ledger.write_bytes(os.urandom(8192))

    report = cli("report", str(path))
    assert report.returncode == 0 and "Traceback" not in report.stderr, report.stderr
    assert "ledger unreadable: done counts are from the disk" in report.stdout
    assert "total" in report.stdout and f"mv {ledger} {ledger}.damaged" in report.stdout
    as_json = json.loads(cli("report", str(path), "--json").stdout)
    assert as_json["totals"]["done"] == 5 and as_json["ledger"] is False and "damaged" in as_json["ledger_problem"]
    page = cli("report", str(path), "--html")
    assert page.returncode == 0 and "Ledger unreadable" in (out / "index.html").read_text(encoding="utf-8")

    for command in (("run", str(path), *RUN), ("stop", str(path))):
        result = cli(*command)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert f"the ledger {ledger} is damaged" in result.stderr and f"mv {ledger} {ledger}.damaged" in result.stderr
    assert len(_mp4s(out)) == 5

    ledger.rename(f"{ledger}.damaged")  # what the message says to do
    again = cli("run", str(path), *RUN)
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(_mp4s(out)) == 6
    made = [a for a in Ledger(ledger).attempts() if a["outcome"] == "done"]
    assert len(made) == 1  # only the missing video was made again


def test_a_read_only_output_folder_is_reported_from_the_disk_and_refused_by_run(write_manifest, tmp_path):
    path = write_manifest(synthetic_manifest())
    out = tmp_path / "out"
    assert cli("run", str(path), *RUN).returncode == 0
    (out / "beta" / "seed_2_prompt_0.mp4").unlink()
    before = sorted(p.name for p in _mp4s(out))
    _chmod_tree(out, writable=False)
    try:
        report = _unprivileged("report", str(path))
        assert report.returncode == 0 and "Traceback" not in report.stderr, report.stderr
        assert "ledger unreadable" in report.stdout and "read-only" in report.stdout
        assert json.loads(_unprivileged("report", str(path), "--json").stdout)["totals"]["done"] == 5
        run = _unprivileged("run", str(path), *RUN)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        assert f"{path}:2: " in run.stderr and "is not writable (Permission denied)" in run.stderr
        stop = _unprivileged("stop", str(path))
        assert stop.returncode == 2 and "Traceback" not in stop.stderr and "read-only" in stop.stderr
        html = _unprivileged("report", str(path), "--html")
        assert html.returncode == 2 and "Traceback" not in html.stderr and "cannot write the review page" in html.stderr
    finally:
        _chmod_tree(out, writable=True)
    assert sorted(p.name for p in _mp4s(out)) == before
