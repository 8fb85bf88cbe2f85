"""The tmux executor on a real tmux server: one private socket per test, killed in teardown.

Sweeps go through the real CLI (`run_experiment.py` in a subprocess), the supervisor, the worker and
the synthetic backend, with small frames and a 3 s heartbeat timeout so each test takes seconds.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import libtmux
import psutil
import pytest

from orchestrator.executors.tmux import session_name
from orchestrator.ledger import Ledger
from orchestrator.outputs import TEMP_MARK, count_frames

from .conftest import PATIENCE_S, ROOT, cli, synthetic_manifest

pytestmark = [pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (run_tests.sh installs it)"),
              pytest.mark.slow]  # real tmux servers and whole sweeps

FRAMES = 9
GENERATION = {"width": 64, "height": 48, "num_frames": FRAMES, "fps": 8, "steps": 4}
EXECUTION = {"retries": 2, "job_timeout_s": 60, "heartbeat_timeout_s": 3, "max_restarts": 3}
NASTY_NAME = "exp 'q' $(touch PWNED) 镜头.v1"
NASTY_CATEGORY = "镜头 `it's` $(touch PWNED)"  # (a `"` is refused: no Windows or SMB disk takes it)
NASTY_PROMPT = "a cat's \"quoted\" $(touch PWNED) `touch PWNED` prompt"


# ---------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture
def tmux(server, tmp_path, monkeypatch):
    """libtmux's own test server (its pytest plugin's `server`: a private socket, killed in teardown) as
    the sweep's tmux server (ORCHESTRATOR_TMUX_SOCKET), and the sweep's processes a failed test left."""
    monkeypatch.setenv("ORCHESTRATOR_TMUX_SOCKET", server.socket_name)
    yield server
    for process in _processes(tmp_path):
        try:
            process.kill()
        except psutil.Error:
            pass


def _manifest(write_manifest, **overrides) -> Path:
    overrides = {"generation": dict(GENERATION), "execution": dict(EXECUTION), **overrides}
    manifest = synthetic_manifest(**overrides)
    return write_manifest(manifest)


def _run(*args: str, timeout: float = PATIENCE_S):
    """The CLI as a user runs it; ORCHESTRATOR_TMUX_SOCKET (set by the fixture) reaches it."""
    return cli(*args, timeout=timeout)


def _processes(root: Path) -> list[psutil.Process]:
    """Supervisor and worker processes of sweeps under `root` (found by their spec file paths)."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        if process.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if any(part in ("orchestrator.supervisor", "orchestrator.worker") for part in cmdline) \
                and any(part.startswith(str(root)) for part in cmdline):
            found.append(process)
    return found


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _ledger(out: Path) -> Ledger:
    return Ledger(out / ".sweep" / "ledger.sqlite")


def _sessions(server: libtmux.Server) -> dict[str, libtmux.Session]:
    if not server.is_alive():
        return {}
    try:
        return {s.session_name: s for s in server.sessions}
    except libtmux.exc.LibTmuxException:
        return {}


def _screen(session: libtmux.Session) -> str:
    return "\n".join(session.active_window.active_pane.capture_pane())


def _finished(out: Path, root: Path) -> bool:
    return _ledger(out).unfinished() == 0 and not _processes(root)


def _check_complete(path: Path, out: Path, expected: int) -> dict[str, list[str]]:
    """Every job made once: one valid mp4 each, one `done` attempt each, no temp file anywhere."""
    mp4s = sorted(p for p in out.rglob("*.mp4") if ".sweep" not in p.parts)
    assert len(mp4s) == expected, mp4s
    assert all(count_frames(p) == FRAMES for p in mp4s)
    assert not [p for p in out.rglob("*") if p.name.startswith(TEMP_MARK)]
    outcomes: dict[str, list[str]] = {}
    for attempt in _ledger(out).attempts():
        outcomes.setdefault(attempt["job_id"], []).append(attempt["outcome"])
    assert len(outcomes) == expected
    assert all(o.count("done") == 1 for o in outcomes.values()), outcomes
    report = _run("report", str(path), "--json")
    assert report.returncode == 0, report.stderr
    totals = json.loads(report.stdout)["totals"]
    assert totals["expected"] == expected and totals["done"] == expected and totals["failed"] == 0
    return outcomes


# ---------------------------------------------------------------------------- tests
def test_session_name_is_safe_for_tmux():
    assert session_name("wan", "gpu0_worker1") == "wan-gpu0-w1"
    assert session_name("wan", "gpu0+1_worker0") == "wan-gpu0+1-w0"
    assert session_name("wan", "cpu0_worker0") == "wan-cpu0-w0"
    assert session_name("v1.2: 镜头 run", "gpu3_worker0") == "v1_2__镜头_run-gpu3-w0"
    assert session_name("$(x)", "gpu0_worker0") == "_$(x)-gpu0-w0"
    assert session_name("w#{pane_pid}#(x)", "cpu0_worker0") == "w_{pane_pid}_(x)-cpu0-w0"  # no tmux format


def test_sessions_per_worker_show_live_output_and_nothing_reaches_a_shell(tmux, write_manifest, tmp_path):
    path = _manifest(write_manifest, name=NASTY_NAME, output_dir="out dir $(touch PWNED) 'x'",
                     model={"options": {"seconds_per_job": 0.8}},
                     categories={NASTY_CATEGORY: {"prompts": [NASTY_PROMPT, "狗"]}, "beta": {"prompts": ["a boat"]}})
    out = tmp_path / "out dir $(touch PWNED) 'x'"
    result = _run("run", str(path), "--cpu-slots", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    names = [session_name(NASTY_NAME, f"cpu{i}_worker0") for i in range(3)]
    assert names[0] == "exp_'q'_$(touch_PWNED)_镜头_v1-cpu0-w0"
    socket = os.environ["ORCHESTRATOR_TMUX_SOCKET"]
    assert f"tmux -L {socket} attach -t " in result.stdout and "report" in result.stdout
    assert all(name in result.stdout for name in names)
    # the printed report command, pasted into a shell in another folder, reports this sweep
    (progress,) = [line.split(":", 1)[1] for line in result.stdout.splitlines() if line.startswith("progress:")]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    pasted = subprocess.run(["bash", "-c", progress], cwd=elsewhere, capture_output=True, text=True, timeout=PATIENCE_S)
    assert pasted.returncode == 0 and "sweep " in pasted.stdout, pasted.stdout + pasted.stderr

    sessions = _sessions(tmux)
    assert sorted(sessions) == sorted(names)
    for i, name in enumerate(names):
        windows = sessions[name].windows
        assert [w.window_name for w in windows] == [f"cpu{i}_worker0"]
        assert len(windows[0].panes) == 1
    screen = _wait_for(lambda: (lambda s: "step 4/4" in s and " done " in s and s)(_screen(sessions[names[0]])),
                       PATIENCE_S, "worker output in the pane")
    assert "job " in screen and "(attempt 1)" in screen

    _wait_for(lambda: _finished(out, tmp_path), PATIENCE_S, "the sweep to finish")
    _wait_for(lambda: not _sessions(tmux), PATIENCE_S, "the sessions of finished workers to end")
    _check_complete(path, out, 6)
    assert (out / NASTY_CATEGORY / "seed_2_prompt_0.mp4").exists()
    sidecar = json.loads((out / NASTY_CATEGORY / "seed_1_prompt_0.json").read_text(encoding="utf-8"))
    assert sidecar["job"]["prompt"] == NASTY_PROMPT
    assert not list(tmp_path.rglob("PWNED")) and not (ROOT / "PWNED").exists() and not Path("PWNED").exists()


def test_killed_worker_is_restarted_and_its_job_redone(tmux, write_manifest, tmp_path):
    path = _manifest(write_manifest, model={"options": {"seconds_per_job": 1.2}})
    out = tmp_path / "out"
    assert _run("run", str(path), "--cpu-slots", "1").returncode == 0
    ledger = _ledger(out)
    # Mid-job: the worker holds a claim and has worked on it for a while.
    worker = _wait_for(lambda: next((w for w in ledger.workers() if w.job and w.pid
                                     and any(j["id"] == w.job and j["state"] == "running"
                                             for j in ledger.jobs())), None), PATIENCE_S, "a running job")
    time.sleep(0.5)
    killed_job = worker.job
    os.kill(worker.pid, signal.SIGKILL)

    session = _sessions(tmux)[session_name("t", "cpu0_worker0")]
    _wait_for(lambda: "restarting in" in _screen(session), PATIENCE_S, "the supervisor's restart message in the pane")
    _wait_for(lambda: _finished(out, tmp_path), PATIENCE_S, "the sweep to finish")
    outcomes = _check_complete(path, out, 6)
    assert outcomes[killed_job] == ["lost", "done"]
    assert all(o == ["done"] for job, o in outcomes.items() if job != killed_job)
    assert _ledger(out).worker("cpu0_worker0").restarts == 1
    log = (out / "logs" / "cpu0_worker0.log").read_text(encoding="utf-8")
    assert "SUPERVISOR [cpu0_worker0] worker exited with code -9; 1 job(s) back to the queue" in log


def test_hung_worker_is_detected_by_heartbeat_and_replaced(tmux, write_manifest, tmp_path):
    path = _manifest(write_manifest, model={"options": {"hang_jobs": ["alpha/seed_1_prompt_1"]}})
    out = tmp_path / "out"
    assert _run("run", str(path), "--cpu-slots", "1").returncode == 0
    _wait_for(lambda: _finished(out, tmp_path), PATIENCE_S, "the sweep to finish")
    outcomes = _check_complete(path, out, 6)
    hung = [job for job, o in outcomes.items() if o != ["done"]]
    assert len(hung) == 1 and outcomes[hung[0]] == ["lost", "done"]
    error = next(a["error"] for a in _ledger(out).attempts(hung[0]) if a["outcome"] == "lost")
    assert "no heartbeat" in error  # replaced after missed heartbeats, not at the job timeout
    log = (out / "logs" / "cpu0_worker0.log").read_text(encoding="utf-8")
    assert "(hung?): killed the worker" in log


def test_killing_the_tmux_server_then_running_again_resumes(tmux, write_manifest, tmp_path):
    path = _manifest(write_manifest, seeds=[1, 2, 3, 4], model={"options": {"seconds_per_job": 0.8}})
    out = tmp_path / "out"
    assert _run("run", str(path), "--cpu-slots", "2").returncode == 0
    ledger = _ledger(out)
    _wait_for(lambda: ledger.counts()["done"] >= 2, PATIENCE_S, "two finished jobs")
    tmux.kill()  # like a reboot of tmux, or a `tmux kill-server` by mistake
    _wait_for(lambda: not _processes(tmp_path), PATIENCE_S, "the workers to end with their panes")
    assert ledger.unfinished() > 0

    again = _run("run", str(path), "--cpu-slots", "2")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "started 2 workers" in again.stdout
    _wait_for(lambda: _finished(out, tmp_path), PATIENCE_S, "the resumed sweep to finish")
    outcomes = _check_complete(path, out, 12)
    # The workers stopped cleanly with their panes: an interrupted job was released, no attempt burned.
    assert {o for job in outcomes.values() for o in job} <= {"done", "released"}, outcomes


def test_second_run_does_not_double_workers_add_workers_and_stop(tmux, write_manifest, tmp_path):
    path = _manifest(write_manifest, seeds=[1, 2, 3, 4], model={"options": {"seconds_per_job": 2.0}})
    out = tmp_path / "out"
    assert _run("run", str(path), "--cpu-slots", "2").returncode == 0
    second = _run("run", str(path), "--cpu-slots", "2")  # at once: the supervisors may not be registered yet
    assert second.returncode == 0 and "already running (2 workers alive)" in second.stdout
    assert len(_sessions(tmux)) == 2
    _wait_for(lambda: len(_processes(tmp_path)) == 4, PATIENCE_S, "2 supervisors and 2 workers")
    time.sleep(1)
    assert len(_processes(tmp_path)) == 4

    added = _run("run", str(path), "--cpu-slots", "3", "--add-workers")
    assert added.returncode == 0, added.stdout + added.stderr
    assert "started 1 worker (tmux)" in added.stdout
    assert sorted(_sessions(tmux)) == [session_name("t", f"cpu{i}_worker0") for i in range(3)]
    _wait_for(lambda: len(_processes(tmp_path)) == 6, PATIENCE_S, "3 supervisors and 3 workers")

    stopped = _run("stop", str(path))
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not _processes(tmp_path)
    assert not _sessions(tmux)
    ledger = _ledger(out)
    assert ledger.counts()["running"] == 0
    assert all(w.state not in ("starting", "loading", "idle", "running") for w in ledger.workers()), [(w.id, w.state, w.message) for w in ledger.workers()]


def test_stop_now_kills_everything(tmux, write_manifest, tmp_path):
    path = _manifest(write_manifest, model={"options": {"seconds_per_job": 30.0}})
    out = tmp_path / "out"
    assert _run("run", str(path), "--cpu-slots", "2").returncode == 0
    ledger = _ledger(out)
    _wait_for(lambda: ledger.counts()["running"] == 2, PATIENCE_S, "two running jobs")
    stopped = _run("stop", str(path), "--now")
    assert stopped.returncode == 0 and "(killed)" in stopped.stdout  # not waiting for the 30 s jobs
    assert not _processes(tmp_path) and not _sessions(tmux)
    assert ledger.counts()["running"] == 0
    assert not list(out.rglob("*.mp4"))


def test_missing_tmux_says_how_to_install_it(write_manifest, tmp_path):
    path = _manifest(write_manifest, seeds=[1], categories={"beta": {"prompts": ["a boat"]}})
    no_tmux = tmp_path / "bin"
    no_tmux.mkdir()
    env = {"PATH": str(no_tmux)}
    result = cli("run", str(path), "--no-progress", env=env)
    assert result.returncode == 2
    assert "sudo apt-get install tmux" in result.stderr and "brew install tmux" in result.stderr
    assert "--executor local" in result.stderr
    assert not (tmp_path / "out" / ".sweep" / "workers").exists()
    local = cli("run", str(path), "--no-progress", "--executor", "local", env=env)
    assert local.returncode == 0, local.stdout + local.stderr
    assert count_frames(tmp_path / "out" / "beta" / "seed_1_prompt_0.mp4") == FRAMES


def test_worker_that_keeps_crashing_fails_with_its_reason_left_on_screen(tmux, write_manifest, tmp_path):
    path = _manifest(write_manifest, seeds=[1], model={"options": {"crash_rate": 1.0}},
                     execution={**EXECUTION, "max_restarts": 1})
    out = tmp_path / "out"
    assert _run("run", str(path), "--cpu-slots", "1").returncode == 0
    name = session_name("t", "cpu0_worker0")
    _wait_for(lambda: _ledger(out).worker("cpu0_worker0") and
              _ledger(out).worker("cpu0_worker0").state == "failed", PATIENCE_S, "the worker to be marked failed")
    _wait_for(lambda: not _processes(tmp_path), PATIENCE_S, "the supervisor to exit")
    session = _sessions(tmux)[name]  # kept open to show why
    pane = session.active_window.active_pane
    screen = _wait_for(lambda: (lambda s: "FAILED" in s and s)(_screen(session)), PATIENCE_S, "the reason in the pane")
    assert "gave up after 1 restarts in a row" in "".join(screen.splitlines()) and pane.pane_dead == "1"
    assert "gave up after 1 restarts" in _ledger(out).worker("cpu0_worker0").message

    again = _run("run", str(path), "--cpu-slots", "1")  # a fresh try replaces the dead pane's session
    assert again.returncode == 0 and "started 1 worker (tmux)" in again.stdout, again.stdout + again.stderr
    assert list(_sessions(tmux)) == [name]
    _wait_for(lambda: _processes(tmp_path), PATIENCE_S, "the new supervisor")


def test_follow_shows_progress_until_the_sweep_ends(tmux, write_manifest, tmp_path):
    path = _manifest(write_manifest, seeds=[1], model={"options": {"seconds_per_job": 0.3}})
    result = _run("run", str(path), "--cpu-slots", "2", "--follow", "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "started 2 workers (tmux)" in result.stdout and "total" in result.stdout
    _wait_for(lambda: not _processes(tmp_path), PATIENCE_S, "the workers to exit")
    _check_complete(path, tmp_path / "out", 3)
    _wait_for(lambda: not _sessions(tmux), PATIENCE_S, "the sessions to end")


def test_no_folder_or_name_reaches_tmux_formats(tmux, write_manifest, tmp_path):
    """tmux expands `#{…}` and runs `#(…)` in a session's name, window name and start directory."""
    refused = _manifest(write_manifest, name="inj#(touch${IFS}PWNED)")
    result = _run("run", str(refused))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{refused}:1: name 'inj#(touch${{IFS}}PWNED)' contains `#`" in result.stderr
    assert "fix: remove the `#`" in result.stderr and not _sessions(tmux)

    workdir = tmp_path / "cwd #(touch${IFS}PWNED) #{pane_pid}"
    workdir.mkdir()
    out_name = "out #(touch${IFS}PWNED) #{session_id}"
    path = _manifest(write_manifest, name="fmt", output_dir=out_name, seeds=[1],
                     categories={"beta": {"prompts": ["a #(touch${IFS}PWNED) boat"]}})
    out = tmp_path / out_name
    started = subprocess.run([sys.executable, str(ROOT / "run_experiment.py"), "run", str(path), "--cpu-slots", "1"],
                             capture_output=True, text=True, timeout=PATIENCE_S, cwd=workdir,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert started.returncode == 0, started.stdout + started.stderr
    sessions = _sessions(tmux)
    assert list(sessions) == ["fmt-cpu0-w0"]
    window = sessions["fmt-cpu0-w0"].active_window
    assert window.window_name == "cpu0_worker0"
    assert window.active_pane.pane_current_path == str(workdir)
    _wait_for(lambda: _finished(out, tmp_path), PATIENCE_S, "the sweep to finish")
    _check_complete(path, out, 1)
    assert not list(tmp_path.rglob("PWNED")) and not (ROOT / "PWNED").exists()


def test_a_worker_added_back_after_its_supervisor_and_worker_were_killed_does_not_keep_their_claim(
        tmux, write_manifest, tmp_path):
    # Issue 28: kill -9 the supervisor and the worker of cpu1_worker0 while it holds a job, then
    # `run --add-workers` (what "already running" advises). The new cpu1_worker0 must not keep the dead
    # one's claim alive: the sweep finishes, every video made once.
    path = _manifest(write_manifest, model={"options": {"seconds_per_job": 1.0}},
                     categories={"a": {"prompts": [f"prompt {i}" for i in range(10)]}})
    out = tmp_path / "out"
    assert _run("run", str(path), "--cpu-slots", "2").returncode == 0
    ledger = _ledger(out)
    victim = _wait_for(lambda: next((w for w in ledger.workers() if w.id == "cpu1_worker0" and w.job
                                     and w.pid and w.supervisor_pid), None), PATIENCE_S,
                       "cpu1_worker0 holding a job")
    held = victim.job
    for pid in (victim.supervisor_pid, victim.pid):
        os.kill(pid, signal.SIGKILL)
    _wait_for(lambda: not any("cpu1_worker0" in " ".join(p.cmdline()) for p in _processes(tmp_path)),
              PATIENCE_S, "cpu1_worker0's processes to be gone")
    added = _run("run", str(path), "--cpu-slots", "2", "--add-workers")
    assert added.returncode == 0 and "started 1 worker" in added.stdout, added.stdout + added.stderr
    _wait_for(lambda: _finished(out, tmp_path), PATIENCE_S, "the sweep to finish")
    outcomes = _check_complete(path, out, 20)
    assert outcomes[held][-1] == "done" and outcomes[held].count("lost") == 1, outcomes[held]


def test_run_follow_inside_a_pane_of_another_tmux_server_follows_until_the_sweep_ends(write_manifest, tmp_path):
    # Issue 28: `run --follow` in a pane of `tmux -L work` quit after 1 s with exit 1 while the workers ran
    # on: libtmux made the sessions without $TMUX (on the default server) and looked for them with it.
    # TMUX_TMPDIR gives this test its own "default" server, so the user's is never touched.
    sockets = tmp_path / "tmux-sockets"
    sockets.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "ORCHESTRATOR_TMUX_SOCKET"}
    env["TMUX_TMPDIR"] = str(sockets)
    subprocess.run(["tmux", "-L", "work", "new-session", "-d", "-s", "shell"], env=env, check=True)
    try:
        socket_path = sockets / f"tmux-{os.getuid()}" / "work"
        env["TMUX"] = f"{socket_path},1,0"  # as inside a pane of that server
        path = _manifest(write_manifest, model={"options": {"seconds_per_job": 0.5}})
        followed = subprocess.run([sys.executable, str(ROOT / "run_experiment.py"), "run", str(path), "--follow",
                                   "--no-progress"], capture_output=True, text=True, env=env, cwd=ROOT,
                                  timeout=PATIENCE_S)
        assert followed.returncode == 0, followed.stdout + followed.stderr
        assert "tmux -L default attach" in followed.stdout
        _check_complete(path, tmp_path / "out", 6)
    finally:
        for socket in ("work", "default"):
            subprocess.run(["tmux", "-L", socket, "kill-server"], env=env, capture_output=True)



def test_a_supervision_rule_changed_in_its_one_place_takes_effect_under_tmux(tmux, write_manifest, tmp_path):
    # Issue 29: the restart back-off lives in supervision.Policy only; changed there (a sitecustomize on
    # PYTHONPATH, so the supervisors in their tmux sessions see it too), a crashed worker waits 7 s. The same
    # change under Ray: tests/test_ray.py::test_a_supervision_rule_changed_in_its_one_place_takes_effect_under_ray
    path = _manifest(write_manifest, model={"options": {"crash_jobs": ["alpha/seed_1_prompt_0"]}})
    out = tmp_path / "out"
    stub = ROOT / "tests" / "stubs" / "restart_back_off"
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(stub), os.environ.get("PYTHONPATH")]))}
    assert cli("run", str(path), "--cpu-slots", "1", env=env).returncode == 0
    _wait_for(lambda: _finished(out, tmp_path), PATIENCE_S, "the sweep to finish")
    log = (out / "logs" / "cpu0_worker0.log").read_text(encoding="utf-8")
    assert "worker exited with code 137; 1 job(s) back to the queue; restarting in 7s (restart 1" in log
    _check_complete(path, out, 6)
