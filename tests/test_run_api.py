"""The run sequence as a Python API, and the one executor interface and list the CLI relies on."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from orchestrator.validation import load_manifest

from .conftest import ROOT, synthetic_manifest


@pytest.mark.slow
def test_a_python_caller_runs_a_sweep_without_the_cli(write_manifest, tmp_path):
    from orchestrator.run import RunOptions, preview, run_sweep
    manifest = load_manifest(write_manifest(synthetic_manifest()))
    planned = preview(manifest, RunOptions(executor="local"))
    assert [w.id for w in planned.plan.workers] == ["cpu0_worker0", "cpu1_worker0"]
    said: list[str] = []
    result = run_sweep(manifest, RunOptions(executor="local", progress=False), say=said.append)
    assert result.exit_code == 0 and result.report.totals.done == 6
    assert any(line.startswith("started 2 workers (local) for 6 of 6 jobs") for line in said)
    assert len(list((tmp_path / "out").rglob("*.mp4"))) == 6
    said.clear()
    again = run_sweep(manifest, RunOptions(executor="local", progress=False), say=said.append)
    assert again.exit_code == 0 and said[0].startswith("all 6 jobs of `t` are done.")


def test_the_cli_names_no_executor_and_asks_the_interface_only():
    from orchestrator.cli import _parser
    from orchestrator.executor_names import EXECUTOR_NAMES
    from orchestrator.executors import executor_class
    from orchestrator.executors.base import Executor
    from orchestrator.manifest import EXECUTORS
    source = (Path(ROOT) / "orchestrator" / "cli.py").read_text(encoding="utf-8")
    calls = {node.func.id for node in ast.walk(ast.parse(source))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert "hasattr" not in calls
    strings = {node.value for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Constant)}
    assert not strings & set(EXECUTOR_NAMES)
    assert EXECUTORS == EXECUTOR_NAMES  # the manifest's choices are the registry's
    run = next(a for a in _parser()._subparsers._group_actions[0].choices["run"]._actions if a.dest == "executor")
    assert tuple(run.choices) == EXECUTOR_NAMES
    for name in EXECUTOR_NAMES:
        kind = executor_class(name)
        assert issubclass(kind, Executor) and kind.name == name
        assert isinstance(kind.drives.__self__, type)  # a classmethod: asked before any executor is made


def test_every_user_facing_error_shares_one_base_and_the_cli_reports_it_in_one_place(write_manifest, monkeypatch,
                                                                                      capsys):
    from orchestrator import cli, run
    from orchestrator.checkpoints import CheckpointError, DownloadError
    from orchestrator.errors import UserError, WanSweepError
    from orchestrator.executors.base import ExecutorError
    from orchestrator.ledger import LedgerError
    from orchestrator.manifest import ManifestError
    from orchestrator.planning import PlanError
    from orchestrator.speed_trial import TrialError
    from orchestrator.sweep import FolderProblem
    for kind in (ManifestError, LedgerError, PlanError, ExecutorError, CheckpointError, DownloadError, UserError,
                 TrialError, FolderProblem):
        assert issubclass(kind, WanSweepError), kind
    assert DownloadError.exit_code == 1 and PlanError.exit_code == 2

    class Odd(WanSweepError):
        exit_code = 5

    def refuse(*args, **kwargs):
        raise Odd("the plan cannot be made here (do this instead)")

    monkeypatch.setattr(run, "plan_resources", refuse)
    path = write_manifest(synthetic_manifest())
    assert cli.main(["plan", str(path)]) == 5
    assert capsys.readouterr().err == "error: the plan cannot be made here (do this instead)\n"
