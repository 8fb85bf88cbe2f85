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


@pytest.mark.slow
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


def _circular() -> dict:
    data = synthetic_manifest()
    data["model"]["options"]["again"] = data["model"]
    return data


def _deep(levels: int) -> dict:
    data = synthetic_manifest()
    inner = data["generation"]["extra"] = {}
    for _ in range(levels):
        inner["x"] = {}
        inner = inner["x"]
    return data


class _Opaque:
    def __repr__(self):
        return "<opaque>"


# (id, a wrong call given a loaded manifest `m` and a folder `tmp`, what the message names) — issue 28: each
# raised a KeyError, TypeError, AttributeError or RecursionError, or turned a value into text silently
WRONG_CALLS = [
    ("load(None)", lambda m, tmp: api.load(None), "`path` must be the manifest file's path"),
    ("load(123)", lambda m, tmp: api.load(123), "not int 123"),
    ("load(bytes)", lambda m, tmp: api.load(b"sweep.yaml"), "not bytes"),
    ("load(list)", lambda m, tmp: api.load(["sweep.yaml"]), "not list"),
    ("load(a Manifest)", lambda m, tmp: api.load(m), "is a Manifest already"),
    ("load(NUL)", lambda m, tmp: api.load("a\x00b.yaml"), "NUL"),
    ("from_dict(None)", lambda m, tmp: api.from_dict(None, base=tmp), "`data` must be a dict"),
    ("from_dict(text)", lambda m, tmp: api.from_dict("name: x", base=tmp), "not str"),
    ("from_dict(list)", lambda m, tmp: api.from_dict([synthetic_manifest()], base=tmp), "not list"),
    ("from_dict circular", lambda m, tmp: api.from_dict(_circular(), base=tmp),
     "data['model']['options']['again'] refers back to data['model']"),
    ("from_dict 5,000 deep", lambda m, tmp: api.from_dict(_deep(5000), base=tmp), "more than 64 levels"),
    ("from_dict bytes", lambda m, tmp: api.from_dict({**synthetic_manifest(), "name": b"x"}, base=tmp),
     "data['name'] is bytes b'x'"),
    ("from_dict object", lambda m, tmp: api.from_dict(
        {**synthetic_manifest(), "categories": {"a": {"prompts": [_Opaque()]}}}, base=tmp),
     "data['categories']['a']['prompts'][0] is _Opaque <opaque>"),
    ("from_dict set", lambda m, tmp: api.from_dict({**synthetic_manifest(), "seeds": {1, 2}}, base=tmp),
     "data['seeds'] is a set"),
    ("from_dict tuple key", lambda m, tmp: api.from_dict({**synthetic_manifest(), (1, 2): 3}, base=tmp),
     "a key of data is tuple (1, 2)"),
    ("from_dict lone surrogate", lambda m, tmp: api.from_dict({**synthetic_manifest(), "name": "a\ud800"}, base=tmp),
     "data['name'] holds a lone surrogate"),
    ("from_dict 5,000-digit seed", lambda m, tmp: api.from_dict({**synthetic_manifest(), "seeds": [10**5000]},
                                                                base=tmp), "data['seeds'][0] is an integer of"),
    ("from_dict base None", lambda m, tmp: api.from_dict(synthetic_manifest(), base=None), "`base` must be a folder"),
    ("from_dict base int", lambda m, tmp: api.from_dict(synthetic_manifest(), base=3), "not int 3"),
    ("from_dict base a file", lambda m, tmp: api.from_dict(synthetic_manifest(), base=m.path), "cannot write"),
    ("dict_manifest_path base int", lambda m, tmp: api.dict_manifest_path(synthetic_manifest(), base=3), "`base`"),
    ("expand(None)", lambda m, tmp: api.expand(None), "`manifest` must be a Manifest"),
    ("expand(path)", lambda m, tmp: api.expand(str(m.path)), "api.load("),
    ("expand(dict)", lambda m, tmp: api.expand(synthetic_manifest()), "api.from_dict("),
    ("expand say=3", lambda m, tmp: api.expand(m, say=3), "`say` must be a function"),
    ("plan(None)", lambda m, tmp: api.plan(None), "`manifest` must be a Manifest"),
    ("plan executor bogus", lambda m, tmp: api.plan(m, executor="bogus"), "`executor` is 'bogus'"),
    ("plan executor 3", lambda m, tmp: api.plan(m, executor=3), "`executor` is 3"),
    ("plan executor empty", lambda m, tmp: api.plan(m, executor=""), "`executor` is ''"),
    ("plan unknown option", lambda m, tmp: api.plan(m, executor="local", recalibarte=True), "`recalibarte`"),
    ("plan recalibrate text", lambda m, tmp: api.plan(m, executor="local", recalibrate="yes"),
     "`recalibrate` must be True or False, not str 'yes'"),
    ("plan allow_non_empty None", lambda m, tmp: api.plan(m, executor="local", allow_non_empty=None),
     "`allow_non_empty` must be True or False"),
    ("run(None)", lambda m, tmp: api.run(None, say=None), "`manifest` must be a Manifest"),
    ("run(path)", lambda m, tmp: api.run(str(m.path), say=None), "api.load("),
    ("run executor bogus", lambda m, tmp: api.run(m, executor="bogus", say=None), "use one of"),
    ("run executor a list", lambda m, tmp: api.run(m, executor=["local"], say=None), "`executor` is ['local']"),
    ("run unknown option", lambda m, tmp: api.run(m, executor="local", say=None, prgress=False), "`prgress`"),
    ("run say=3", lambda m, tmp: api.run(m, executor="local", say=3, progress=False), "`say` must be a function"),
    ("run progress text", lambda m, tmp: api.run(m, executor="local", say=None, progress="no"), "`progress`"),
    ("run follow 1", lambda m, tmp: api.run(m, executor="local", say=None, follow=1), "`follow`"),
    ("report(None)", lambda m, tmp: api.report(None), "`manifest` must be a Manifest"),
    ("report(text)", lambda m, tmp: api.report("x"), "api.load('x')"),
    ("report(int)", lambda m, tmp: api.report(1), "not int 1"),
    ("stop(None)", lambda m, tmp: api.stop(None), "`manifest` must be a Manifest"),
    ("stop(text)", lambda m, tmp: api.stop("x"), "api.load('x')"),
    ("stop now text", lambda m, tmp: api.stop(m, now="yes"), "`now` must be True or False"),
    ("stop say=3", lambda m, tmp: api.stop(m, say=3), "`say` must be a function"),
]


@pytest.mark.parametrize("call, named", [case[1:] for case in WRONG_CALLS], ids=[case[0] for case in WRONG_CALLS])
def test_a_wrong_call_raises_a_wan_sweep_error_naming_the_argument(call, named, tmp_path):
    manifest = api.from_dict(synthetic_manifest(), base=tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(api.ArgumentError) as caught:
        call(manifest, tmp_path / "base")
    assert isinstance(caught.value, api.WanSweepError) and named in str(caught.value), str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, nothing started
