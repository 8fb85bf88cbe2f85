"""The output folder belongs to one sweep: what `run`, `report` and `stop` refuse, and what they never
delete or replace (issue 18: a folder that is not a sweep's, `/`, the home folder, a second manifest,
a foreign index.html, the product's own names as categories)."""
from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.manifest import ManifestError
from orchestrator.validation import load_manifest
from orchestrator.outputs import TEMP_MARK
from orchestrator.sweep import FolderProblem, Sweep

from .conftest import cli, synthetic_manifest

RUN = ("--executor", "local", "--no-progress")


def _line_of(path: Path, key: str) -> int:
    return next(i for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                if line.startswith(f"{key}:"))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_folder_that_is_not_a_sweeps_is_refused_and_nothing_in_it_deleted(write_manifest, tmp_path):
    out = tmp_path / "out"
    (out / "alpha").mkdir(parents=True)
    (out / "other").mkdir()
    (out / ".partial-draft.txt").write_text("a user's draft")
    (out / "alpha" / ".partial-keep.mp4").write_bytes(b"a user's clip")  # in a job's folder, not ours
    (out / "other" / f"{TEMP_MARK}cpu0_worker0-abcd1234.mp4").write_bytes(b"x")  # not a job's folder
    before = _files(out)
    path = write_manifest(synthetic_manifest(seeds=[1]))

    refused = cli("run", str(path), *RUN)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"{path}:{_line_of(path, 'output_dir')}: output_dir {out} is not empty and is not a sweep's" in refused.stderr
    assert "--allow-non-empty" in refused.stderr and "nothing was started" in refused.stderr
    assert _files(out) == before and not (out / ".sweep").exists()
    planned = cli("plan", str(path))
    assert planned.returncode == 2 and "is not empty" in planned.stderr

    (out / "alpha" / f"{TEMP_MARK}cpu0_worker0-abcd1234.mp4").write_bytes(b"half")  # a killed worker's
    allowed = cli("run", str(path), "--allow-non-empty", *RUN)
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert {k: v for k, v in _files(out).items() if k in before} == before  # every file of the user's kept
    assert not (out / "alpha" / f"{TEMP_MARK}cpu0_worker0-abcd1234.mp4").exists()  # ours removed
    assert (out / "alpha" / "seed_1_prompt_0.mp4").exists()
    again = cli("run", str(path), *RUN)  # now a sweep's folder: no flag needed
    assert again.returncode == 0 and "are done" in again.stdout, again.stdout + again.stderr


@pytest.mark.parametrize("where", ["/", "~", "~/.."])
def test_root_and_home_are_refused_even_when_allowed(write_manifest, tmp_path, monkeypatch, where):
    home = tmp_path / "home" / "me"
    home.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    output_dir = where.replace("~", str(home))
    manifest = load_manifest(write_manifest(synthetic_manifest(output_dir=output_dir)))
    with pytest.raises(FolderProblem, match="a folder of its own"):
        Sweep(manifest).check_folder(allow_non_empty=True)


def test_home_folder_refused_by_run_with_file_and_line(write_manifest, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    path = write_manifest(synthetic_manifest(output_dir=str(home)))
    result = cli("run", str(path), "--allow-non-empty", *RUN, env={"HOME": str(home)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{path}:{_line_of(path, 'output_dir')}: output_dir is {home}, your home folder" in result.stderr
    assert list(home.iterdir()) == []


@pytest.mark.slow
def test_report_html_never_replaces_a_foreign_index_html(write_manifest, tmp_path):
    path = write_manifest(synthetic_manifest(seeds=[1]))
    assert cli("run", str(path), *RUN).returncode == 0
    page = tmp_path / "out" / "index.html"
    first = cli("report", str(path), "--html")
    assert first.returncode == 0 and page.exists(), first.stderr
    assert cli("report", str(path), "--html").returncode == 0  # our own page is replaced
    page.write_text("<html>my own notes</html>", encoding="utf-8")
    refused = cli("report", str(path), "--html")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"{page} exists and is not a review page of this product" in refused.stderr
    assert f"{path}:{_line_of(path, 'output_dir')}:" in refused.stderr
    assert page.read_text(encoding="utf-8") == "<html>my own notes</html>"


@pytest.mark.parametrize("name", [".sweep", "logs", "index.html", "Logs"])
def test_the_products_own_names_cannot_be_categories(write_manifest, name):
    path = write_manifest(synthetic_manifest(categories={name: {"prompts": ["a cat"]}}))
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    (problem,) = caught.value.problems
    lines = path.read_text(encoding="utf-8").splitlines()
    assert name in lines[problem.line - 1] and lines[problem.line - 1].strip().endswith(":")
    assert f"category name {name!r} is taken" in problem.message and problem.fix


@pytest.mark.slow
def test_a_second_manifest_cannot_take_over_a_sweeps_folder(write_manifest, tmp_path):
    a = write_manifest(synthetic_manifest(name="swa", seeds=[1]), name="a.yaml")
    b = write_manifest(synthetic_manifest(name="swb", seeds=[7], generation={"num_frames": 9}), name="b.yaml")
    assert cli("run", str(a), *RUN).returncode == 0
    out = tmp_path / "out"
    before = _files(out / "alpha")
    for command in (("run", str(b), *RUN), ("plan", str(b)), ("report", str(b)), ("stop", str(b))):
        result = cli(*command)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (command, result.stdout, result.stderr)
        assert f"{b}:{_line_of(b, 'output_dir')}: output_dir {out} holds the sweep `swa` (manifest {a})" in result.stderr
        assert "set its name to `swa`" in result.stderr
    assert _files(out / "alpha") == before
    report = cli("report", str(a), "--json")
    assert report.returncode == 0 and '"done": 3' in report.stdout
