"""The Python API (issue 22): a manifest from a dict with located errors, expand, plan, run with an
executor, the report as the same data as `report --json`, and the CLI as a thin layer over it."""
from __future__ import annotations

import ast
import json

import pytest

from orchestrator import api
from orchestrator.manifest import ManifestError

from .conftest import ROOT, cli, synthetic_manifest


def test_a_dict_manifest_is_read_by_the_same_reader_and_its_problems_are_located(tmp_path):
    data = synthetic_manifest(seeds=[7, 7], output={"name": "{category}/{sed}"})
    with pytest.raises(ManifestError) as caught:
        api.from_dict(data, base=tmp_path)
    (problem,) = caught.value.problems
    assert problem.file == api.dict_manifest_path(data, tmp_path) == tmp_path / ".wan-sweep-t.yaml"
    lines = problem.file.read_text(encoding="utf-8").splitlines()
    assert "seed 7 is listed twice" in problem.message and lines[problem.line - 1].strip() == "- 7"
    fixed = api.from_dict({**data, "seeds": [7, 8]}, base=tmp_path)  # the next problem: after expansion
    with pytest.raises(ManifestError) as caught:
        api.expand(fixed)
    (problem,) = caught.value.problems
    assert "unknown placeholder `{sed}`" in problem.message
    assert lines[problem.line - 1].strip().startswith("name: ")  # output.name's line in the same file


def test_expand_plan_run_and_report_as_data_the_same_as_report_json(tmp_path):
    manifest = api.from_dict(synthetic_manifest(), base=tmp_path)
    assert manifest.output_dir == tmp_path / "out"  # relative paths start at `base`
    jobs = api.expand(manifest)
    assert [job.key for job in jobs][:2] == ["alpha/seed_1_prompt_0", "alpha/seed_2_prompt_0"]
    planned = api.plan(manifest, executor="local")
    assert len(planned.plan.workers) == 2 and not planned.scan.complete
    said: list[str] = []
    result = api.run(manifest, executor="local", progress=False, say=said.append)
    assert result.exit_code == 0 and result.report.totals.done == 6 and said
    data = api.report(manifest).to_dict()
    printed = json.loads(cli("report", str(manifest.path), "--json").stdout)
    volatile = ("generated_at", "workers")
    assert {k: v for k, v in data.items() if k not in volatile} == \
        {k: v for k, v in printed.items() if k not in volatile}
    assert data["totals"]["done"] == 6 and data["totals"]["left"] == 0
    assert [w["id"] for w in data["workers"]] == [w["id"] for w in printed["workers"]]


def test_the_cli_is_a_thin_layer_over_the_api(tmp_path, monkeypatch):
    from orchestrator import cli as cli_module
    tree = ast.parse((ROOT / "orchestrator" / "cli.py").read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert not imported & {"run_sweep", "preview", "stop_sweep", "load_manifest"}  # all through `api`
    calls = []
    monkeypatch.setattr(api, "run", lambda manifest, **kw: calls.append((manifest.name, kw)) or api.RunResult(0))
    path = api.dict_manifest_path({"name": "t"}, tmp_path)
    api.from_dict(synthetic_manifest(), base=tmp_path)
    assert cli_module.main(["run", str(path), "--executor", "local", "--no-progress"]) == 0
    assert calls == [("t", {**calls[0][1], "executor": "local", "progress": False})]


@pytest.mark.parametrize("value", [0, 257, 10**6, "2", 2.0, True])
def test_cpu_slots_of_the_wrong_type_or_out_of_range_are_refused(tmp_path, value):
    manifest = api.from_dict(synthetic_manifest(), base=tmp_path)
    with pytest.raises(api.WanSweepError) as caught:
        api.plan(manifest, executor="local", cpu_slots=value)
    assert f"cpu_slots={value!r}" in str(caught.value) and "a whole number from 1 to 256" in str(caught.value)
    assert api.plan(manifest, executor="local", cpu_slots=256).plan.workers  # the bound itself is taken
