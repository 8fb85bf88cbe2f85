"""What a new user's manifest mistakes are called: a folder for a manifest, a YAML syntax error, a
per-video prompts entry with nothing under it, a glob that matches nothing, comments in a prompts .txt."""
from __future__ import annotations

import pytest

from orchestrator.manifest import ManifestError
from orchestrator.validation import load_manifest

from .conftest import synthetic_manifest


def _problems(path) -> list[str]:
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    return [str(p) for p in caught.value.problems]


def test_a_folder_given_as_the_manifest_is_called_a_folder(write_manifest, tmp_path):
    write_manifest(synthetic_manifest(), name="sweep.yaml")
    (problem,) = _problems(tmp_path)
    assert "is a folder, not a manifest file" in problem and "does not exist" not in problem
    assert f"e.g. {tmp_path / 'sweep.yaml'}" in problem


def test_an_unclosed_bracket_is_reported_at_the_line_it_opens(write_manifest):
    path = write_manifest("name: x\nmodel: {backend: synthetic, task: t2v}\ngeneration: {}\noutput_dir: out\n"
                          "seeds: [42, 142\ncategories: {a: {prompts: [p]}}\n")
    (problem,) = _problems(path)
    assert problem.startswith(f"{path}:5: the manifest is not valid YAML: the flow sequence that starts on "
                              "this line runs on to line 6"), problem
    assert "close the `[` with `]`" in problem


def test_a_misindented_key_is_still_reported_at_its_own_line(write_manifest):
    # PyYAML's context here is the enclosing block (line 1): the problem's own line is the right one
    path = write_manifest("name: x\nmodel:\n  backend: synthetic\n task: t2v\n")
    (problem,) = _problems(path)
    assert problem.startswith(f"{path}:4: the manifest is not valid YAML"), problem


def test_an_unclosed_quote_in_a_prompts_file_is_reported_at_its_line(make_refs, write_manifest, tmp_path):
    folder = make_refs("cam", ["a"])
    (folder / "prompts.yaml").write_text('a:\n  - "a red ball\n  - two\n', encoding="utf-8")
    path = write_manifest(synthetic_manifest(model={"task": "v2v"}, categories={
        "cam": {"videos": "refs/cam/*.mp4", "prompts": "refs/cam/prompts.yaml"}}))
    (problem,) = _problems(path)
    assert problem.startswith(f"{folder / 'prompts.yaml'}:2: the prompts file is not valid YAML: the quoted "
                              "scalar"), problem


def test_an_empty_per_video_entry_names_its_stem_and_line(make_refs, write_manifest):
    folder = make_refs("cam", ["a", "dolly zoom in"])
    prompts = folder / "prompts.yaml"
    prompts.write_text("a:\n  - one\ndolly zoom in:\n", encoding="utf-8")
    path = write_manifest(synthetic_manifest(model={"task": "v2v"}, categories={
        "cam": {"videos": "refs/cam/*.mp4", "prompts": "refs/cam/prompts.yaml"}}))
    (problem,) = _problems(path)
    assert problem.startswith(f"{prompts}:3: category `cam`: the prompts of `dolly zoom in` are empty"), problem


def test_each_wrong_entry_is_named_at_its_own_line(make_refs, write_manifest):
    folder = make_refs("cam", ["a", "b", "c"])
    prompts = folder / "prompts.yaml"
    prompts.write_text("a: [one]\nb: [one, '']\nc: just one text\n", encoding="utf-8")
    path = write_manifest(synthetic_manifest(model={"task": "v2v"}, categories={
        "cam": {"videos": "refs/cam/*.mp4", "prompts": "refs/cam/prompts.yaml"}}))
    problems = _problems(path)
    assert [p.split(": ", 1)[0] for p in problems] == [f"{prompts}:2", f"{prompts}:3"], problems
    assert "`b` have an empty or non-text prompt (number 2)" in problems[0]
    assert "`c` must be a list of texts" in problems[1]


def test_a_glob_matching_nothing_is_reported_once_not_once_per_stem(make_refs, write_manifest, tmp_path):
    folder = tmp_path / "refs" / "cam"
    folder.mkdir(parents=True)
    (folder / "prompts.yaml").write_text("a: [one]\nb: [two]\nc: [three]\n", encoding="utf-8")
    path = write_manifest(synthetic_manifest(model={"task": "v2v"}, categories={
        "cam": {"videos": "refs/cam/*.mp4", "prompts": "refs/cam/prompts.yaml"}}))
    (problem,) = _problems(path)
    assert "glob `refs/cam/*.mp4` matches no file" in problem


def test_prompts_for_a_stem_without_video_are_still_reported_when_every_glob_matched(make_refs, write_manifest):
    folder = make_refs("cam", ["a"])
    (folder / "prompts.yaml").write_text("a: [one]\nb: [two]\n", encoding="utf-8")
    path = write_manifest(synthetic_manifest(model={"task": "v2v"}, categories={
        "cam": {"videos": "refs/cam/*.mp4", "prompts": "refs/cam/prompts.yaml"}}))
    (problem,) = _problems(path)
    assert "prompts are given for `b`, but there is no such video" in problem


def test_a_missing_listed_video_is_not_reported_again_for_its_prompts(make_refs, write_manifest):
    folder = make_refs("cam", ["a"])
    (folder / "prompts.yaml").write_text("a: [one]\ngone: [two]\n", encoding="utf-8")
    path = write_manifest(synthetic_manifest(model={"task": "v2v"}, categories={
        "cam": {"videos": ["refs/cam/a.mp4", "refs/cam/gone.mp4"], "prompts": "refs/cam/prompts.yaml"}}))
    (problem,) = _problems(path)
    assert "video `refs/cam/gone.mp4` does not exist" in problem


def test_a_folder_under_videos_suggests_the_glob_of_its_videos(make_refs, write_manifest):
    make_refs("motion", ["a", "b"])
    path = write_manifest(synthetic_manifest(model={"task": "v2v"}, categories={
        "cam": {"videos": ["refs/motion"], "prompts": ["x"]},
        "pan": {"videos": "refs/motion/", "prompts": ["x"]}}))
    problems = _problems(path)
    assert len(problems) == 2, problems
    for problem in problems:
        assert "is a folder" in problem and "does not exist" not in problem, problem
        assert "`videos: refs/motion/*.mp4`" in problem, problem
