"""Whole sweeps through the real CLI, local executor, supervisor, worker and synthetic backend."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from orchestrator.jobs import expand
from orchestrator.ledger import Ledger
from orchestrator.validation import load_manifest
from orchestrator.outputs import TEMP_MARK, count_frames

from .conftest import PATIENCE_S, ROOT, cli, cli_into_closed_pipe, synthetic_manifest


def _report(path) -> dict:
    result = cli("report", str(path), "--json")
    report = json.loads(result.stdout)
    assert result.returncode == (1 if report["totals"]["failed"] else 0), result.stderr
    return report


def _mp4s(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*.mp4") if ".sweep" not in p.parts)


def _done_attempts(out: Path) -> dict[str, int]:
    ledger = Ledger(out / ".sweep" / "ledger.sqlite")
    counts: dict[str, int] = {}
    for attempt in ledger.attempts():
        if attempt["outcome"] == "done":
            counts[attempt["job_id"]] = counts.get(attempt["job_id"], 0) + 1
    return counts


@pytest.mark.slow
def test_sweep_runs_to_completion_and_reports(write_manifest, tmp_path):
    path = write_manifest(synthetic_manifest(categories={
        "镜头 motion": {"prompts": ["a cat's \"quoted\" $(rm -rf /) prompt", "狗"]},
        "beta": {"prompts": ["a boat"]}}))
    result = cli("run", str(path), "--executor", "local", "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / "out"
    mp4s = _mp4s(out)
    assert len(mp4s) == 6 and all(count_frames(p) == 5 for p in mp4s)
    assert (out / "镜头 motion" / "seed_2_prompt_1.mp4").exists()
    sidecar = json.loads((out / "镜头 motion" / "seed_1_prompt_0.json").read_text(encoding="utf-8"))
    assert sidecar["job"]["prompt"] == "a cat's \"quoted\" $(rm -rf /) prompt"
    assert sidecar["settings"]["generation"]["steps"] == 4 and "python" in sidecar["versions"]
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["cpu0_worker0.log", "cpu1_worker0.log"]
    report = _report(path)
    assert report["totals"]["expected"] == 6 and report["totals"]["done"] == 6
    assert {c["name"]: c["done"] for c in report["categories"]} == {"镜头 motion": 4, "beta": 2}
    assert sum(w["jobs_done"] for w in report["workers"]) == 6
    again = cli("run", str(path), "--executor", "local", "--no-progress")
    assert again.returncode == 0 and "all 6 jobs" in again.stdout


@pytest.mark.slow
def test_failures_are_retried_and_crashed_workers_restarted(write_manifest, tmp_path):
    path = write_manifest(synthetic_manifest(
        model={"options": {"fail_attempts": 1, "crash_jobs": ["alpha/seed_2_*", "beta/*"]}},
        execution={"retries": 2, "max_restarts": 10},
        seeds=[1, 2, 3]))
    result = cli("run", str(path), "--executor", "local", "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / "out"
    assert len(_mp4s(out)) == 9
    ledger = Ledger(out / ".sweep" / "ledger.sqlite")
    outcomes = [a["outcome"] for a in ledger.attempts()]
    # The crashes: first attempts of alpha seed 2 and beta; a crash may also take the video of the
    # job before it, which was still being encoded in the background (that job is redone).
    assert 5 <= outcomes.count("lost") <= 10
    assert outcomes.count("error") == 4  # the other first attempts failed in Python
    assert outcomes.count("done") == 9
    assert set(_done_attempts(out).values()) == {1}
    logs = "".join(p.read_text(encoding="utf-8") for p in (out / "logs").iterdir())
    assert "synthetic failure" in logs and "Traceback" in logs


@pytest.mark.slow
def test_permanent_failure_is_reported_and_exit_code_is_nonzero(write_manifest, tmp_path):
    path = write_manifest(synthetic_manifest(
        model={"options": {"fail_jobs": ["alpha/seed_1_prompt_0"]}}, execution={"retries": 1}))
    result = cli("run", str(path), "--executor", "local", "--no-progress")
    assert result.returncode == 1
    assert "alpha/seed_1_prompt_0 (2 attempts): RuntimeError: synthetic permanent failure" in result.stdout
    report = _report(path)
    assert report["totals"]["done"] == 5 and report["totals"]["failed"] == 1
    assert report["failed"][0]["job"] == "alpha/seed_1_prompt_0"
    text = cli("report", str(path))
    assert text.returncode == 1 and "failed jobs (1)" in text.stdout  # a script can tell, as from `run`


@pytest.mark.slow
def test_resume_after_sigkill_mid_job(write_manifest, tmp_path):
    prompts = [f"prompt {i}" for i in range(6)]
    path = write_manifest(synthetic_manifest(
        model={"options": {"seconds_per_job": 1.5}}, categories={"a": {"prompts": prompts}},
        generation={"steps": 30}))
    out = tmp_path / "out"
    run = subprocess.Popen([sys.executable, str(ROOT / "run_experiment.py"), "run", str(path),
                            "--executor", "local", "--no-progress"], cwd=ROOT, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + PATIENCE_S
    while len(_mp4s(out)) < 2 and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.1)
    time.sleep(0.7)  # both workers are now half-way through a job
    processes = psutil.Process(run.pid).children(recursive=True) + [psutil.Process(run.pid)]
    os.killpg(run.pid, signal.SIGKILL)
    psutil.wait_procs(processes, timeout=PATIENCE_S)
    done_before = len(_mp4s(out))
    assert 2 <= done_before < 12
    result = cli("run", str(path), "--executor", "local", "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    mp4s = _mp4s(out)
    assert len(mp4s) == 12 and all(count_frames(p) == 5 for p in mp4s)
    assert not [p for p in out.rglob(f"{TEMP_MARK}*")]
    done = _done_attempts(out)
    assert len(done) == 12 and set(done.values()) == {1}  # none done twice


@pytest.mark.slow
def test_report_counts_the_disk_even_without_the_ledger(write_manifest, tmp_path):
    path = write_manifest(synthetic_manifest())
    assert cli("run", str(path), "--executor", "local", "--no-progress").returncode == 0
    out = tmp_path / "out"
    victim = _mp4s(out)[0]
    victim.write_bytes(victim.read_bytes()[:200])  # a truncated file does not count
    shutil.rmtree(out / ".sweep")
    report = _report(path)
    assert report["ledger"] is False
    assert report["totals"]["done"] == 5 and report["totals"]["left"] == 1
    text = cli("report", str(path)).stdout
    assert "total" in text and "83.3%" in text


@pytest.mark.slow
def test_changed_settings_are_detected_and_never_overwritten(write_manifest, tmp_path):
    manifest = synthetic_manifest()
    path = write_manifest(manifest)
    assert cli("run", str(path), "--executor", "local", "--no-progress").returncode == 0
    out = tmp_path / "out"
    before = {p: p.read_bytes() for p in _mp4s(out)}
    manifest["generation"]["steps"] = 6
    write_manifest(manifest)
    result = cli("run", str(path), "--executor", "local", "--no-progress")
    assert result.returncode == 2
    assert "6 existing mp4s" in result.stderr and "generation.steps 4 → 6" in result.stderr
    assert {p: p.read_bytes() for p in _mp4s(out)} == before  # untouched
    result = cli("run", str(path), "--executor", "local", "--no-progress", "--redo-changed")
    assert result.returncode == 0, result.stderr
    superseded = list((out / ".sweep" / "superseded").rglob("*.mp4"))
    assert len(superseded) == 6
    new_ids = {j.id for j in expand(load_manifest(path))}
    assert {json.loads(p.with_suffix(".json").read_text())["job_id"] for p in _mp4s(out)} == new_ids


def _start_until_two_run(path, tmp_path):
    """`run --executor local` in the background, returned once both its workers are running a job."""
    run = subprocess.Popen([sys.executable, str(ROOT / "run_experiment.py"), "run", str(path),
                            "--executor", "local", "--no-progress"], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ledger_path = tmp_path / "out" / ".sweep" / "ledger.sqlite"
    deadline = time.monotonic() + PATIENCE_S
    while time.monotonic() < deadline and run.poll() is None:
        if ledger_path.exists() and Ledger(ledger_path).counts()["running"] == 2:
            break
        time.sleep(0.2)
    return run, ledger_path


@pytest.mark.slow
def test_stop_ends_workers_cleanly_and_releases_claims(write_manifest, tmp_path):
    path = write_manifest(synthetic_manifest(
        model={"options": {"seconds_per_job": 30}}, generation={"steps": 300}))
    run, ledger_path = _start_until_two_run(path, tmp_path)
    pids = [p.pid for p in psutil.Process(run.pid).children(recursive=True)]
    assert len(pids) == 4  # two supervisors, two workers
    result = cli("stop", str(path))
    assert result.returncode == 0 and "stopped" in result.stdout
    run.wait(timeout=PATIENCE_S)
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    ledger = Ledger(ledger_path)
    assert ledger.counts()["running"] == 0
    assert all(row["attempts"] == 0 for row in ledger.jobs())  # stopping used no attempt
    assert not list((tmp_path / "out").rglob(f"{TEMP_MARK}*"))


@pytest.mark.slow
def test_stop_now_uses_no_attempt_and_leaves_no_worker_running(write_manifest, tmp_path):
    path = write_manifest(synthetic_manifest(
        model={"options": {"seconds_per_job": 30}}, generation={"steps": 300}, execution={"retries": 0}))
    run, ledger_path = _start_until_two_run(path, tmp_path)
    result = cli("stop", str(path), "--now")
    assert result.returncode == 0 and "(killed)" in result.stdout
    run.wait(timeout=PATIENCE_S)
    ledger = Ledger(ledger_path)
    # With retries: 0 a killed job used to be failed for good; a stop is not the job's fault.
    assert ledger.counts() == {"pending": 6, "running": 0, "done": 0, "failed": 0}
    assert all(row["attempts"] == 0 for row in ledger.jobs())
    report = _report(path)
    assert {w["state"] for w in report["workers"]} == {"stopped"} and report["workers_alive"] == 0
    assert report["totals"]["running"] == 0 and report["eta_s"] is None


@pytest.mark.slow
def test_job_timeout_abandons_the_job(write_manifest, tmp_path):
    path = write_manifest(synthetic_manifest(
        model={"options": {"hang_rate": 1.0}}, categories={"a": {"prompts": ["p"]}}, seeds=[1],
        execution={"retries": 0, "job_timeout_s": 1.5, "heartbeat_timeout_s": 60}))
    result = cli("run", str(path), "--executor", "local", "--no-progress", "--cpu-slots", "1")
    assert result.returncode == 1
    assert "timed out after 2s" in result.stdout or "timed out after 1s" in result.stdout


@pytest.mark.slow
def test_next_job_starts_while_the_previous_video_is_written(write_manifest, tmp_path):
    # One worker, videos big enough that encoding takes a moment: each job after the first is
    # claimed before the previous one is recorded as done (its video is written in the background).
    path = write_manifest(synthetic_manifest(
        generation={"width": 320, "height": 320, "num_frames": 33, "fps": 8, "steps": 2},
        model={"options": {"seconds_per_job": 0.2}}, resources={"cpu_slots": 1}, seeds=[1, 2]))
    assert cli("run", str(path), "--executor", "local", "--no-progress").returncode == 0
    attempts = sorted(Ledger(tmp_path / "out" / ".sweep" / "ledger.sqlite").attempts(),
                      key=lambda a: a["started_at"])
    assert [a["outcome"] for a in attempts] == ["done"] * 6
    overlapping = sum(b["started_at"] < a["finished_at"] for a, b in zip(attempts, attempts[1:]))
    assert overlapping >= 4
    assert all(count_frames(p) == 33 for p in _mp4s(tmp_path / "out"))


@pytest.mark.slow
def test_terminal_escapes_in_prompts_and_names_are_printed_escaped(write_manifest, tmp_path):
    """A prompt that retitles the tmux pane and clears it, and a category name with a one-character CSI
    (U+009B): the worker's log (what its pane shows) and the report print them escaped."""
    prompt = "a cat\x1b]2;PWNED\x07\x1b[2J\r"
    path = write_manifest(synthetic_manifest(seeds=[1], resources={"cpu_slots": 1}, categories={
        "cat\x9b2J": {"prompts": [prompt]}}))
    result = cli("run", str(path), "--executor", "local", "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    log = (tmp_path / "out" / "logs" / "cpu0_worker0.log").read_text(encoding="utf-8")
    assert "a cat\\x1b]2;PWNED\\x07\\x1b[2J\\r" in log
    assert not {"\x1b", "\x07", "\r", "\x9b"} & set(log)
    report = cli("report", str(path))
    assert "cat\\x9b2J" in report.stdout and "\x9b" not in report.stdout
    sidecar = json.loads(next((tmp_path / "out").rglob("seed_1_prompt_0.json")).read_text(encoding="utf-8"))
    assert sidecar["job"]["prompt"] == prompt  # the data keeps the prompt as it was written

@pytest.mark.slow
def test_output_into_a_closed_pipe_ends_quietly_and_a_run_still_finishes(write_manifest, tmp_path):
    # `plan … | head -1`, `run … | head -1`, `report … | head`: no BrokenPipeError traceback, and the
    # run makes every video (its workers are not abandoned because nobody reads its output).
    path = write_manifest(synthetic_manifest())
    plan = cli_into_closed_pipe("plan", str(path))
    assert plan.returncode == 141 and not plan.stderr
    run = cli_into_closed_pipe("run", str(path), "--executor", "local")
    assert run.returncode == 0 and "Traceback" not in run.stderr and "BrokenPipe" not in run.stderr, run.stderr
    assert len(_mp4s(tmp_path / "out")) == 6
    for args in (["report", str(path)], ["report", str(path), "--json"]):
        report = cli_into_closed_pipe(*args)
        assert report.returncode == 141 and not report.stderr


def test_report_json_watch_prints_json_lines(write_manifest):
    path = write_manifest(synthetic_manifest())
    process = subprocess.Popen([sys.executable, str(ROOT / "run_experiment.py"), "report", str(path),
                                "--json", "--watch", "0.2"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    try:
        lines = [process.stdout.readline() for _ in range(3)]
    finally:
        process.terminate()
        process.communicate(timeout=PATIENCE_S)
    assert not any("\033" in line for line in lines)  # no screen clearing, no clock
    assert [json.loads(line)["totals"]["expected"] for line in lines] == [6, 6, 6]  # one object a line


@pytest.mark.slow
def test_run_follow_on_a_running_sweep_follows_it_to_the_end(write_manifest, tmp_path):
    path = write_manifest(synthetic_manifest(model={"options": {"seconds_per_job": 2.0}}))
    first = subprocess.Popen([sys.executable, str(ROOT / "run_experiment.py"), "run", str(path),
                              "--executor", "local", "--no-progress"], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ledger_path = tmp_path / "out" / ".sweep" / "ledger.sqlite"
    try:
        deadline = time.monotonic() + PATIENCE_S
        while not (ledger_path.exists() and Ledger(ledger_path).counts()["running"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        follow = cli("run", str(path), "--executor", "local", "--follow")
        assert "already running" in follow.stdout, follow.stdout + follow.stderr
        # It followed the sweep to its end (a progress bar, then the final report), not a one-off report.
        assert len(_mp4s(tmp_path / "out")) == 6 and follow.returncode == 0, follow.stdout + follow.stderr
        assert "6/6" in follow.stderr and "100.0%" in follow.stdout
    finally:
        first.wait(timeout=PATIENCE_S)


@pytest.mark.slow
def test_progress_bar_says_what_the_workers_do_before_their_first_job(write_manifest, tmp_path):
    path = write_manifest(synthetic_manifest(model={"options": {"load_seconds": 3.0}}))
    result = cli("run", str(path), "--executor", "local")  # with the progress bar (on stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"[12] workers? loading the model \(synthetic\)", result.stderr)  # not a silent 0/6
    ledger = Ledger(tmp_path / "out" / ".sweep" / "ledger.sqlite")
    assert {w.phase for w in ledger.workers()} == {None}  # said until the first job, then cleared


def test_runtime_options_of_the_backend_change_no_job_id(write_manifest):
    """The backend names its runtime options when it checks the manifest (validation); the ids
    (jobs, which knows no backend) leave them out."""
    slow = load_manifest(write_manifest(synthetic_manifest(model={"options": {"seconds_per_job": 2.0}}), "slow.yaml"))
    fast = load_manifest(write_manifest(synthetic_manifest(), "fast.yaml"))
    assert "seconds_per_job" in slow.runtime_options
    assert [job.id for job in expand(slow)] == [job.id for job in expand(fast)]


@pytest.mark.slow
def test_library_notes_at_import_go_to_the_worker_log_not_its_pane(tmp_path):
    # Issue 28: torch's pytree deprecation notes and diffusers' torchao note filled every worker pane.
    import subprocess
    import sys
    log = tmp_path / "w.log"
    script = (
        "import warnings\n"
        "from orchestrator.planning import WorkerSpec\n"
        "from orchestrator.worker import setup_logging\n"
        f"spec = WorkerSpec(sweep='t', worker='w', devices=(), queue='cpu0', ledger='', output_dir='', log={str(log)!r},\n"
        "                  model={}, generation={}, execution={})\n"
        "setup_logging(spec).info('worker w starting')\n"
        "import diffusers.quantizers.torchao.torchao_quantizer\n"  # the import that prints them
        "import logging\n"
        "logging.getLogger('torch.utils._pytree').warning('an Enum subclass note')\n"
        "warnings.warn('a library warning')\n")
    shown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    pane = shown.stdout + shown.stderr
    assert "worker w starting" in pane
    assert "Enum subclass" not in pane and "a library warning" not in pane and "torchao" not in pane, pane
    kept = log.read_text(encoding="utf-8")
    assert "an Enum subclass note" in kept and "a library warning" in kept
