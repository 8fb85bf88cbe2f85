"""Faults around the sweep rather than in its jobs (issue 18): a damaged ledger, a read-only output
folder, a full disk. Each gets one clear message, no traceback, and loses nothing made.

Read-only folders: a process running as root ignores permission bits, so as root the CLI runs
without CAP_DAC_OVERRIDE (`setpriv`), which makes `chmod` bind it as it binds any user.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.ledger import Ledger
from orchestrator.outputs import TEMP_MARK, count_frames

from .conftest import PATIENCE_S, ROOT, cli, synthetic_manifest

RUN = ("--executor", "local", "--no-progress")


def _mp4s(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*.mp4") if ".sweep" not in p.parts)


def _unprivileged_prefix() -> list[str]:
    """What runs a command as a user without the power to ignore permissions (root loses CAP_DAC_OVERRIDE)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions cannot be enforced")
    return ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search,-fowner"]


def _run_broken_midway(path: Path, out: Path, made: int, break_it, prefix: list[str] = ()) -> tuple[int, str, str]:
    """`run` the sweep; once `made` videos are there, `break_it()` (fill or fail its disk, …); return how
    the run ended (exit code, stdout, stderr), which never shows a traceback."""
    import time
    run = subprocess.Popen([*prefix, sys.executable, str(ROOT / "run_experiment.py"), "run", str(path), *RUN],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + PATIENCE_S
    while len(_mp4s(out)) < made and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.05)
    break_it()
    stdout, stderr = run.communicate(timeout=PATIENCE_S)
    assert "Traceback" not in stdout + stderr, stdout + stderr
    return run.returncode, stdout, stderr


def _unprivileged(*args: str) -> subprocess.CompletedProcess:
    """The CLI as a user without the power to ignore permissions (root loses CAP_DAC_OVERRIDE)."""
    prefix = _unprivileged_prefix()
    return subprocess.run([*prefix, sys.executable, str(ROOT / "run_experiment.py"), *args], capture_output=True,
                          text=True, timeout=PATIENCE_S, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _chmod_tree(folder: Path, writable: bool) -> None:
    for path in [folder, *folder.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode | 0o200 if writable else mode & ~0o222)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.fixture
def small_disk(tmp_path):
    """An 80 MiB tmpfs of its own (a real disk that can fill up); needs root to mount."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=80m", "tmpfs", str(disk)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield disk
    subprocess.run(["umount", "-l", str(disk)])


def _fill(disk: Path) -> Path:
    """Take every free byte of the disk, as another program would."""
    filler = disk / "filler.bin"
    with open(filler, "wb") as stream:
        try:
            while True:
                stream.write(b"\0" * 65536)
                stream.flush()
        except OSError:
            pass
    return filler


@pytest.mark.slow
def test_a_disk_that_fills_up_mid_run_stops_the_workers_cleanly_and_loses_nothing(write_manifest, small_disk):
    prompts = [f"prompt {i}" for i in range(8)]
    path = write_manifest(synthetic_manifest(
        output_dir=str(small_disk / "out"), categories={"a": {"prompts": prompts}},
        model={"options": {"seconds_per_job": 0.4}}, generation={"steps": 8}))
    out = small_disk / "out"
    fillers = []
    returncode, stdout, stderr = _run_broken_midway(path, out, 3, lambda: fillers.append(_fill(small_disk)))
    (filler,) = fillers
    assert returncode == 1 and stdout.count(f"the disk of {out} is full") == 1, stdout + stderr
    assert "free some space and run the same command again" in stdout
    made = _mp4s(out)
    assert 3 <= len(made) < 16
    ledger = Ledger(out / ".sweep" / "ledger.sqlite")
    assert ledger.counts()["failed"] == 0  # no attempt burnt on the full disk

    filler.unlink()
    again = cli("run", str(path), *RUN)
    assert again.returncode == 0, again.stdout + again.stderr
    mp4s = _mp4s(out)
    assert len(mp4s) == 16 and all(count_frames(p) == 5 for p in mp4s)
    assert not [p for p in out.rglob(f"{TEMP_MARK}*")]


@pytest.mark.slow
def test_no_room_or_a_read_only_category_folder_is_refused_before_the_start(write_manifest, tmp_path, monkeypatch,
                                                                             capsys):
    from orchestrator import cli as cli_module
    from orchestrator import sweep as sweep_module
    path = write_manifest(synthetic_manifest())
    real = shutil.disk_usage
    monkeypatch.setattr(sweep_module.shutil, "disk_usage",
                        lambda folder: real(folder)._replace(free=10 * 2**20))  # a nearly full disk
    assert cli_module.main(["run", str(path), *RUN]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: the disk holding {tmp_path / 'out'} has 10.0 MiB free; a sweep needs 64.0 MiB" in err
    assert "free some space" in err and not (tmp_path / "out" / ".sweep" / "ledger.sqlite").exists()
    monkeypatch.undo()

    assert cli("run", str(path), *RUN).returncode == 0
    for mp4 in (tmp_path / "out" / "alpha").glob("*.mp4"):
        mp4.unlink()
    (tmp_path / "out" / "alpha").chmod(0o555)
    try:
        refused = _unprivileged("run", str(path), *RUN)
    finally:
        (tmp_path / "out" / "alpha").chmod(0o755)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert f"{tmp_path / 'out' / 'alpha'} is not writable (Permission denied)" in refused.stderr
    attempts = Ledger(tmp_path / "out" / ".sweep" / "ledger.sqlite").attempts()
    assert len(attempts) == 6  # the first run's, none burnt since


@pytest.mark.slow
def test_a_crash_charges_only_the_crashing_job_not_the_one_whose_video_was_being_written(write_manifest, tmp_path):
    # Issue 28's repro: each c/seed_2_* job crashes its worker while the job before it is still being
    # written; with `retries: 0` only the four crashing jobs may fail.
    path = write_manifest(synthetic_manifest(
        categories={"c": {"prompts": [f"prompt {i}" for i in range(4)]}}, seeds=[1, 2, 3],
        model={"options": {"crash_jobs": ["c/seed_2_*"]}}, execution={"retries": 0}))
    result = cli("run", str(path), *RUN, timeout=PATIENCE_S)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stdout + result.stderr
    failed = {row["id"]: row for row in Ledger(tmp_path / "out" / ".sweep" / "ledger.sqlite").jobs()
              if row["state"] == "failed"}
    report = json.loads(cli("report", str(path), "--json").stdout)
    assert report["totals"]["done"] == 8 and report["totals"]["failed"] == 4, report["totals"]
    assert sorted(p.name for p in _mp4s(tmp_path / "out")) == sorted(
        f"seed_{seed}_prompt_{i}.mp4" for seed in (1, 3) for i in range(4))
    assert len(failed) == 4


@pytest.fixture
def ext4_disk(tmp_path):
    """A 128 MiB ext4 file system of its own, mounted with errors=remount-ro, and a function that triggers
    a file-system error on it (the kernel then remounts it read-only, as after a real disk error).
    Needs root and loop devices."""
    if os.geteuid() != 0 or not all(shutil.which(tool) for tool in ("mount", "mkfs.ext4", "findmnt")):
        pytest.skip("an ext4 loop mount needs root, mount and mkfs.ext4")
    image, disk = tmp_path / "ext4.img", tmp_path / "disk"
    disk.mkdir()
    with open(image, "wb") as stream:
        stream.truncate(128 * 2**20)
    if subprocess.run(["mkfs.ext4", "-q", str(image)]).returncode or subprocess.run(
            ["mount", "-o", "loop,errors=remount-ro", str(image), str(disk)]).returncode:
        pytest.skip("cannot loop-mount an ext4 image here")
    device = Path(subprocess.run(["findmnt", "-no", "SOURCE", str(disk)], capture_output=True,
                                 text=True).stdout.strip()).name
    trigger = Path("/sys/fs/ext4") / device / "trigger_fs_error"

    def fail_the_disk() -> None:
        trigger.write_text("1")

    if not trigger.exists():
        subprocess.run(["umount", "-l", str(disk)])
        pytest.skip("this kernel cannot trigger an ext4 error")
    yield disk, fail_the_disk
    subprocess.run(["umount", "-l", str(disk)])


@pytest.mark.slow
def test_an_output_folder_remounted_read_only_mid_run_stops_the_workers_and_burns_no_attempt(write_manifest,
                                                                                                ext4_disk, tmp_path):
    # ext4's errors=remount-ro mid-run: every write fails with EROFS, the ledger's too (it is on that disk).
    disk, fail_the_disk = ext4_disk
    prompts = [f"prompt {i}" for i in range(8)]
    path = write_manifest(synthetic_manifest(
        output_dir=str(disk / "out"), categories={"a": {"prompts": prompts}},
        model={"options": {"seconds_per_job": 0.4}}, generation={"steps": 8}, execution={"retries": 0}))
    out = disk / "out"
    returncode, stdout, stderr = _run_broken_midway(path, out, 3, fail_the_disk)
    assert returncode == 1 and stdout.count(f"the output folder {out} takes no more writes") == 1, stdout + stderr
    assert "make it writable and run the same command again" in stdout
    made = _mp4s(out)
    assert 3 <= len(made) < 16

    # The user repairs the disk (here: copies the folder to a healthy one) and runs the same command.
    healthy = tmp_path / "healthy"
    shutil.copytree(out, healthy / "out", symlinks=True)
    subprocess.run(["umount", "-l", str(disk)])
    shutil.copytree(healthy / "out", out)
    assert Ledger(out / ".sweep" / "ledger.sqlite").counts()["failed"] == 0  # no attempt burnt
    again = cli("run", str(path), *RUN, timeout=PATIENCE_S)
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(_mp4s(out)) == 16 and not [p for p in out.rglob(f"{TEMP_MARK}*")]


@pytest.mark.slow
def test_a_category_folder_made_read_only_mid_run_burns_no_attempt(write_manifest, tmp_path):
    # A permission change under a running sweep (the ledger stays writable): the workers stop at the
    # first refused write, the job goes back unused, and a later run resumes.
    prompts = [f"prompt {i}" for i in range(6)]
    path = write_manifest(synthetic_manifest(
        categories={"a": {"prompts": prompts}}, model={"options": {"seconds_per_job": 0.4}},
        generation={"steps": 8}, execution={"retries": 0}))
    out = tmp_path / "out"
    try:
        returncode, stdout, stderr = _run_broken_midway(path, out, 2, lambda: (out / "a").chmod(0o555),
                                                        prefix=_unprivileged_prefix())
    finally:
        (out / "a").chmod(0o755)
    assert returncode == 1 and "takes no more writes" in stdout, stdout + stderr
    assert Ledger(out / ".sweep" / "ledger.sqlite").counts()["failed"] == 0
    again = cli("run", str(path), *RUN, timeout=PATIENCE_S)
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(_mp4s(out)) == 12


@pytest.mark.slow
def test_a_hung_worker_whose_supervisor_was_killed_ends_itself_and_the_sweep_resumes(write_manifest, tmp_path):
    # Issue 28: an orphaned hung worker lived on, and `run` said "already running" until `stop`.
    import time

    import psutil
    path = write_manifest(synthetic_manifest(
        model={"options": {"hang_jobs": ["alpha/seed_1_prompt_0"]}}, resources={"cpu_slots": 1},
        execution={"heartbeat_timeout_s": 3}))
    out = tmp_path / "out"
    run = subprocess.Popen([sys.executable, str(ROOT / "run_experiment.py"), "run", str(path), *RUN], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hung = None
    while hung is None and run.poll() is None:
        time.sleep(0.05)
        try:
            ledger = Ledger(out / ".sweep" / "ledger.sqlite", readonly=True)
        except Exception:
            continue
        hung = next((w for w in ledger.workers() if w.pid and w.supervisor_pid and w.job), None)
        ledger.close()
    assert hung is not None, run.communicate()
    os.kill(hung.supervisor_pid, signal.SIGKILL)  # before it sees the hang and replaces the worker
    run.communicate(timeout=PATIENCE_S)
    deadline = time.monotonic() + PATIENCE_S
    while psutil.pid_exists(hung.pid) and psutil.Process(hung.pid).status() != psutil.STATUS_ZOMBIE \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    log = (out / "logs" / "cpu0_worker0.log").read_text(encoding="utf-8")
    assert "its supervisor is gone: the worker ended itself" in log
    again = cli("run", str(path), *RUN)
    assert again.returncode == 0 and "already running" not in again.stdout, again.stdout + again.stderr
    assert len(_mp4s(out)) == 6


@pytest.mark.slow
def test_plan_refuses_a_damaged_ledger_as_run_does(write_manifest, tmp_path):
    path = write_manifest(synthetic_manifest())
    ledger = tmp_path / "out" / ".sweep" / "ledger.sqlite"
    assert cli("run", str(path), *RUN).returncode == 0
    for extra in ("-wal", "-shm"):
        Path(f"{ledger}{extra}").unlink(missing_ok=True)
    ledger.write_bytes(os.urandom(8192))
    planned = cli("plan", str(path))
    assert planned.returncode == 2 and "Traceback" not in planned.stderr, planned.stdout + planned.stderr
    assert f"the ledger {ledger} is damaged" in planned.stderr and f"mv {ledger} {ledger}.damaged" in planned.stderr


def test_a_ledger_path_that_is_a_folder_is_named_as_one(write_manifest, tmp_path):
    path = write_manifest(synthetic_manifest())
    ledger = tmp_path / "out" / ".sweep" / "ledger.sqlite"
    ledger.mkdir(parents=True)
    result = cli("run", str(path), *RUN)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert f"the ledger {ledger} is a folder, not a ledger file" in result.stderr
    assert "read-only" not in result.stderr and f"mv {ledger} {ledger}.aside" in result.stderr


@pytest.mark.slow
def test_a_job_row_of_an_unknown_state_is_reported_and_repaired(write_manifest, tmp_path):
    path = write_manifest(synthetic_manifest())
    out = tmp_path / "out"
    assert cli("run", str(path), *RUN).returncode == 0
    (out / "alpha" / "seed_1_prompt_0.mp4").unlink()
    ledger = Ledger(out / ".sweep" / "ledger.sqlite")
    ledger.db.execute("UPDATE jobs SET state = 'bogus' WHERE id = (SELECT id FROM jobs ORDER BY ordinal LIMIT 1)")
    ledger.close()
    note = "the ledger holds 1 job row(s) in a state it does not know ('bogus')"
    report = cli("report", str(path))
    assert note in report.stdout, report.stdout
    assert json.loads(cli("report", str(path), "--json").stdout)["ledger_note"].startswith(f"note: {note}")
    assert note in cli("plan", str(path)).stdout
    again = cli("run", str(path), *RUN)
    assert again.returncode == 0 and "in a state it does not know ('bogus'): put back in the queue" in again.stdout
    assert len(_mp4s(out)) == 6 and Ledger(out / ".sweep" / "ledger.sqlite").unknown_states() == {}


@pytest.mark.slow
def test_a_crash_while_loading_leaves_its_reason_in_the_workers_log(write_manifest, tmp_path):
    # Issue 28: the local executor sent a worker's stderr to /dev/null, so the log said only "exited with code 1".
    path = write_manifest(synthetic_manifest(
        model={"options": {"load_error": "the checkpoint's shard 3 is truncated"}}, resources={"cpu_slots": 1},
        execution={"max_restarts": 1}))
    result = cli("run", str(path), *RUN)
    assert result.returncode == 1, result.stdout + result.stderr
    log = (tmp_path / "out" / "logs" / "cpu0_worker0.log").read_text(encoding="utf-8")
    assert "Traceback" in log and "RuntimeError: the checkpoint's shard 3 is truncated" in log


def test_a_full_or_read_only_ledger_behind_the_ray_ledger_actor_is_recognised():
    # A Ray worker's ledger calls run in the ledger actor: their errors come back wrapped (Ray's `cause`).
    import sqlite3

    from orchestrator.job_loop import FULL, READ_ONLY, storage_problem

    class RayTaskError(Exception):  # FAKE: how Ray hands a remote call's error back
        def __init__(self, cause: BaseException):
            super().__init__(str(cause))
            self.cause = cause

    assert storage_problem(RayTaskError(sqlite3.OperationalError("attempt to write a readonly database"))) == READ_ONLY
    assert storage_problem(RayTaskError(sqlite3.OperationalError("database or disk is full"))) == FULL
    assert storage_problem(RayTaskError(ValueError("a bad prompt"))) is None
