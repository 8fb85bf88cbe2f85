"""Starting and stopping a sweep is exclusive (issue 18): two `run`s started together start one set of
workers, a `run` never cleans up or resets what live workers of its sweep hold (their spec files
included; spec files are replaced whole), and a `stop` issued while a `run` is starting takes effect."""
from __future__ import annotations

import fcntl
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from orchestrator import cli as cli_module
from orchestrator import run as run_module
from orchestrator.ledger import Ledger
from orchestrator.outputs import TEMP_MARK
from orchestrator.planning import WorkerSpec

from .conftest import PATIENCE_S, ROOT, cli, synthetic_manifest

RUN = ("--executor", "local", "--no-progress")


def _launch(*args: str, env: dict | None = None) -> subprocess.Popen:
    import os
    return subprocess.Popen([sys.executable, str(ROOT / "run_experiment.py"), *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})


def _hold(path: Path, mode: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    stream = open(path, "a+")
    fcntl.flock(stream, mode | fcntl.LOCK_NB)
    return stream


def _done_once(out: Path, expected: int) -> None:
    outcomes: dict[str, list[str]] = {}
    for attempt in Ledger(out / ".sweep" / "ledger.sqlite").attempts():
        outcomes.setdefault(attempt["job_id"], []).append(attempt["outcome"])
    assert len(outcomes) == expected and all(o == ["done"] for o in outcomes.values()), outcomes


def test_a_run_in_set_up_elsewhere_makes_a_second_run_start_nothing(write_manifest, tmp_path):
    path = write_manifest(synthetic_manifest(seeds=[1]))
    held = _hold(tmp_path / "out" / ".sweep" / "run.lock", fcntl.LOCK_EX)  # another `run` setting up
    result = cli("run", str(path), *RUN)
    held.close()
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "is being set up by another" in result.stdout and "started" not in result.stdout
    assert not list((tmp_path / "out").rglob("*.mp4")) and not (tmp_path / "out" / "logs").exists()


@pytest.mark.slow
def test_a_live_worker_not_yet_in_the_ledger_keeps_its_sweep_running(write_manifest, tmp_path):
    path = write_manifest(synthetic_manifest(seeds=[1]))
    out = tmp_path / "out"
    assert cli("run", str(path), *RUN).returncode == 0
    (out / "alpha" / "seed_1_prompt_0.mp4").unlink()
    partial = out / "alpha" / f"{TEMP_MARK}cpu0_worker0-abcd1234.mp4"
    partial.write_bytes(b"being written")  # by the live worker below
    held = _hold(out / ".sweep" / "locks" / "cpu0_worker0.lock", fcntl.LOCK_SH)  # its supervisor
    result = cli("run", str(path), *RUN)
    held.close()
    assert result.returncode == 0 and "already running (1 workers alive)" in result.stdout, result.stdout
    assert partial.exists() and not (out / "alpha" / "seed_1_prompt_0.mp4").exists()


@pytest.mark.slow
def test_add_workers_leaves_a_live_workers_spec_file_alone(write_manifest, tmp_path):
    path = write_manifest(synthetic_manifest(seeds=[1]))
    out = tmp_path / "out"
    assert cli("run", str(path), *RUN).returncode == 0
    (out / "alpha" / "seed_1_prompt_0.mp4").unlink()
    live_spec = out / ".sweep" / "workers" / "cpu0_worker0.json"
    live_spec.write_text('{"what its worker reads": "this"}', encoding="utf-8")
    before = live_spec.stat()
    held = _hold(out / ".sweep" / "locks" / "cpu0_worker0.lock", fcntl.LOCK_SH)  # its supervisor, alive
    result = cli("run", str(path), *RUN, "--cpu-slots", "3", "--add-workers")
    held.close()
    assert result.returncode == 0 and "started 2 workers" in result.stdout, result.stdout + result.stderr
    after = live_spec.stat()
    assert live_spec.read_text(encoding="utf-8") == '{"what its worker reads": "this"}'
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(p.name for p in live_spec.parent.iterdir()) == [f"cpu{i}_worker0.json" for i in range(3)]


def _spec(worker: str, folder: Path, **model) -> WorkerSpec:
    from orchestrator.manifest import Execution, GenerationConfig, ModelConfig
    return WorkerSpec(sweep="t", worker=worker, devices=(), queue="cpu0", ledger=str(folder / "ledger.sqlite"),
                      output_dir=str(folder), log=str(folder / f"{worker}.log"), model=ModelConfig(task="t2v", **model),
                      generation=GenerationConfig(), execution=Execution())


def test_a_spec_file_is_replaced_whole_never_written_in_place(tmp_path, monkeypatch):
    import os
    target = tmp_path / "workers" / "cpu0_worker0.json"
    _spec("cpu0_worker0", tmp_path, backend="old").write(target)
    old_text = target.read_text(encoding="utf-8")
    renames = []
    real_replace = os.replace

    def replace(source, destination):
        # At the rename the spec still holds the old text, and the new one is complete beside it.
        renames.append((Path(source).parent, Path(destination), target.read_text(encoding="utf-8"),
                        WorkerSpec.read(source).model.backend))
        real_replace(source, destination)
    monkeypatch.setattr(os, "replace", replace)
    _spec("cpu0_worker0", tmp_path, backend="new").write(target)
    assert renames == [(target.parent, target, old_text, "new")]
    assert WorkerSpec.read(target).model.backend == "new"

    with pytest.raises(TypeError):  # fails halfway through writing: the old spec stays, no temporary file
        _spec("cpu0_worker0", tmp_path, backend="newer", options={"x": object()}).write(target)
    assert WorkerSpec.read(target).model.backend == "new"
    assert [p.name for p in target.parent.iterdir()] == ["cpu0_worker0.json"]


@pytest.mark.slow
def test_runs_started_together_start_one_set_of_workers(write_manifest, tmp_path):
    path = write_manifest(synthetic_manifest(model={"options": {"seconds_per_job": 0.3}}))
    launches = [_launch("run", str(path), *RUN) for _ in range(3)]
    results = [(p.wait(timeout=PATIENCE_S), *p.communicate()) for p in launches]
    assert all("Traceback" not in err for _, _, err in results), results
    started = [out for _, out, _ in results if "started 2 workers" in out]
    assert len(started) == 1, results
    assert all(("is being set up by another" in out or "already running" in out)
               for _, out, _ in results if out not in started), results
    _done_once(tmp_path / "out", 6)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
@pytest.mark.slow
def test_tmux_runs_started_together_start_one_set_and_no_traceback(write_manifest, tmp_path, server):
    # `server`: libtmux's pytest plugin's private tmux server, killed in teardown.
    path = write_manifest(synthetic_manifest(model={"options": {"seconds_per_job": 0.3}}))
    env = {"ORCHESTRATOR_TMUX_SOCKET": server.socket_name}
    launches = [_launch("run", str(path), "--executor", "tmux", env=env) for _ in range(3)]
    results = [(p.wait(timeout=PATIENCE_S), *p.communicate()) for p in launches]
    assert all(code == 0 and "Traceback" not in err for code, _, err in results), results
    assert sum("started 2 workers" in out for _, out, _ in results) == 1, results
    ledger = Ledger(tmp_path / "out" / ".sweep" / "ledger.sqlite")
    deadline = time.monotonic() + PATIENCE_S
    while ledger.unfinished() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cli("stop", str(path), env=env).returncode == 0  # whatever is left of the sessions
    _done_once(tmp_path / "out", 6)


@pytest.mark.parametrize("pause_at", ["check_checkpoint", "plan_resources"])
def test_stop_issued_while_run_is_starting_takes_effect(write_manifest, tmp_path, monkeypatch, capsys, pause_at):
    """`check_checkpoint`: before the ledger exists; `plan_resources`: while the run holds its set-up lock."""
    path = write_manifest(synthetic_manifest())
    paused, go = threading.Event(), threading.Event()
    original = getattr(run_module, pause_at)

    def slow(*args, **kwargs):
        paused.set()
        assert go.wait(PATIENCE_S)
        return original(*args, **kwargs)

    monkeypatch.setattr(run_module, pause_at, slow)
    codes = {}
    run = threading.Thread(target=lambda: codes.setdefault("run", cli_module.main(["run", str(path), *RUN])))
    run.start()
    assert paused.wait(PATIENCE_S)
    stop = threading.Thread(target=lambda: codes.setdefault("stop", cli_module.main(["stop", str(path)])))
    stop.start()
    stop.join(1.0)  # it returns at once (no ledger yet) or waits for the run's set-up
    go.set()
    run.join(PATIENCE_S)
    stop.join(PATIENCE_S)
    assert codes == {"run": 0, "stop": 0}
    printed = capsys.readouterr().out
    assert "`stop` was issued while this `run` was starting: no worker started" in printed
    assert not list((tmp_path / "out").rglob("*.mp4"))


def test_a_second_manifest_racing_for_a_new_folder_is_refused_not_told_it_is_being_set_up(write_manifest, tmp_path):
    # Issue 28: manifest `other` is setting the new folder up (it holds the run lock and has not written
    # .sweep/sweep.json yet) while manifest `t` starts on the same output_dir.
    import json
    path = write_manifest(synthetic_manifest(seeds=[1]))
    held = _hold(tmp_path / "out" / ".sweep" / "run.lock", fcntl.LOCK_EX)
    held.write(json.dumps({"pid": 4242, "command": "run", "since": 0, "sweep": "other"}))
    held.flush()
    result = cli("run", str(path), *RUN)
    held.close()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert f"{path}:2: output_dir {tmp_path / 'out'} holds the sweep `other`" in result.stderr
    assert "being set up" not in result.stdout and not (tmp_path / "out" / ".sweep" / "sweep.json").exists()


@pytest.mark.slow
def test_a_refused_run_leaves_the_folder_named_for_the_manifest_that_made_it(write_manifest, tmp_path):
    import json
    first = write_manifest(synthetic_manifest(seeds=[1]), name="first.yaml")
    assert cli("run", str(first), *RUN).returncode == 0
    changed = write_manifest(synthetic_manifest(seeds=[1], generation={"steps": 3}), name="changed.yaml")
    refused = cli("run", str(changed), *RUN)
    assert refused.returncode == 2 and "made with other settings" in refused.stderr, refused.stdout + refused.stderr
    owner = json.loads((tmp_path / "out" / ".sweep" / "sweep.json").read_text(encoding="utf-8"))
    assert owner["manifest"] == str(first)
