"""Output names (issue 22): the `output.name` template, the default layout (with axes), the checks
made before anything starts, and what a prompt inserted at the top does to done videos."""
from __future__ import annotations

import os
from dataclasses import replace

import pytest

from orchestrator.errors import UserError
from orchestrator.jobs import expand
from orchestrator.manifest import ManifestError
from orchestrator.output_names import check_names, output_path, prompt_id, slug
from orchestrator.run import RunOptions, run_sweep
from orchestrator.sweep import Sweep
from orchestrator.validation import load_manifest

from .conftest import synthetic_manifest


def _load(write_manifest, **overrides):
    return load_manifest(write_manifest(synthetic_manifest(**overrides)))


def _names(jobs) -> list[str]:
    return [job.name for job in jobs]


def test_the_default_keeps_the_fixed_layout_for_references_and_text_to_video(write_manifest, make_refs, tmp_path):
    t2v = _load(write_manifest)
    jobs = expand(t2v)
    assert _names(jobs)[:2] == ["alpha/seed_1_prompt_0", "alpha/seed_2_prompt_0"]
    assert jobs[0].output == str(tmp_path / "out" / "alpha" / "seed_1_prompt_0.mp4")
    assert jobs[0].key == "alpha/seed_1_prompt_0"
    make_refs("moves", ["walk"])
    v2v = _load(write_manifest, model={"task": "v2v"},
                categories={"moves": {"videos": "refs/moves/*.mp4", "prompts": ["a", "b"]}})
    job = expand(v2v)[-1]
    assert job.output == str(tmp_path / "out" / "moves" / "walk" / "seed_2_prompt_1.mp4")
    assert job.key == "moves/walk/seed_2_prompt_1"


def test_a_job_read_back_without_a_name_keeps_its_key(write_manifest):
    from orchestrator.jobs import Job
    job = expand(_load(write_manifest))[0]
    old = {k: v for k, v in job.to_dict().items() if k not in ("name", "axes")}  # an old ledger row
    assert Job.from_dict(old).key == job.key == "alpha/seed_1_prompt_0"


def test_the_default_name_appends_axis_values_readably(write_manifest):
    manifest = _load(write_manifest)
    name = lambda axes: output_path(manifest, "c", "walk", 0, "a cat", 1, axes)[1]  # noqa: E731
    assert name({"cfg_scale": 3.0}) == "c/walk/seed_1_prompt_0_cfg_scale-3"
    assert name({"cfg_scale": 3.5, "steps": 30}) == "c/walk/seed_1_prompt_0_cfg_scale-3.5_steps-30"
    assert name({"cfg_scale": (5.0, 3.5)}) == "c/walk/seed_1_prompt_0_cfg_scale-5,3.5"
    assert name({"shift": None}) == "c/walk/seed_1_prompt_0_shift-none"
    blurry = name({"negative_prompt": "blurry, low quality: <bad>"})
    assert blurry.startswith("c/walk/seed_1_prompt_0_negative_prompt-blurry-low-quality-bad-")
    assert name({"negative_prompt": "blurry, low quality: <bad>!"}) != blurry  # a hash tells them apart
    t2v = output_path(manifest, "c", None, 2, "a cat", 7, {"quantize": "fp8"})[1]
    assert t2v == "c/seed_7_prompt_2_quantize-fp8"


def test_a_template_renders_every_placeholder(write_manifest):
    template = "{category}/{prompt_id}/{prompt:12}_s{seed:03d}_i{prompt_index}_cfg{cfg_scale}"
    manifest = _load(write_manifest, output={"name": template + ".mp4"})
    assert manifest.output_name == template  # `.mp4` is the product's to add
    prompt = 'A cat\'s "big" day/night!'
    path, name = output_path(manifest, "alpha", None, 1, prompt, 7, {"cfg_scale": 4.0})
    assert name == f"alpha/{prompt_id(prompt)}/A-cat-s-big_s007_i1_cfg4"  # cut at 12, no dash left at the end
    assert path == os.path.join(str(manifest.output_dir), name + ".mp4")
    assert slug("镜头 仰角 rotation", 40) == "镜头-仰角-rotation" and slug("!!!", 5) == "prompt"


def test_jobs_with_axes_are_named_by_the_template_and_checked(write_manifest):
    manifest = _load(write_manifest, output={"name": "{category}/{prompt_id}_{seed}_cfg-{cfg_scale}"})
    base = expand(replace(manifest, output_name=None))[0]  # a job as the expansion with axes builds it
    jobs = []
    for cfg in (3.0, 5.0):
        output, name = output_path(manifest, base.category, None, 0, base.prompt, base.seed, {"cfg_scale": cfg})
        jobs.append(replace(base, axes={"cfg_scale": cfg}, output=output, name=name))
    check_names(manifest, jobs)  # distinct: no problem
    assert [job.key for job in jobs] == [f"alpha/{prompt_id('a cat')}_1_cfg-3", f"alpha/{prompt_id('a cat')}_1_cfg-5"]
    same = [replace(job, output=jobs[0].output, name=jobs[0].name) for job in jobs]
    with pytest.raises(ManifestError) as caught:
        check_names(manifest, same)
    assert "two jobs would write the same file" in str(caught.value)
    assert "cfg_scale 3 and" in str(caught.value) and "cfg_scale 5" in str(caught.value)


def _problem(write_manifest, template, **overrides):
    with pytest.raises(ManifestError) as caught:
        expand(_load(write_manifest, output={"name": template}, **overrides))
    problems = caught.value.problems
    assert all(p.file.name == "manifest.yaml" and p.line > 0 and p.fix for p in problems)
    return " ".join(p.message for p in problems), problems


def test_an_unknown_placeholder_is_named_at_the_output_line(write_manifest):
    message, problems = _problem(write_manifest, "{category}/{seed}_{cfg}_{promt_id}")
    assert "unknown placeholders `{cfg}`, `{promt_id}`" in message
    text = problems[0].file.read_text(encoding="utf-8").splitlines()
    assert text[problems[0].line - 1].strip().startswith("name: ")  # the line of output.name
    assert "{prompt_id}" in problems[0].fix  # the placeholders there are


@pytest.mark.parametrize("template, expected", [
    ("{category}/{seed}_{0}", "no positions"),
    ("{category}/{seed!r}", "conversion"),
    ("{category}/{prompt:x}", "width from 1 to"),
    ("{category}/{seed", "not a valid template"),
    ("{category}/{stem}/{seed}_{prompt_index}", "text-to-video jobs have no reference stem"),
    ("{category}/{seed:q}", "cannot be formatted"),
])
def test_a_template_of_the_wrong_form_is_refused(write_manifest, template, expected):
    assert expected in _problem(write_manifest, template)[0]


def test_two_jobs_on_one_file_are_both_named(write_manifest):
    message, _ = _problem(write_manifest, "{category}/{prompt_index}")  # the seeds share a file
    assert "two jobs would write the same file" in message
    assert "`alpha/0.mp4`: category alpha, prompt 0, seed 1 and category alpha, prompt 0, seed 2" in message


@pytest.mark.parametrize("template, expected", [
    ("../{category}/{seed}_{prompt_index}", "leaves the output folder"),
    ("/tmp/{category}_{seed}_{prompt_index}", "leaves the output folder"),
    ("{category}//{seed}_{prompt_index}", "empty folder name"),
    ("logs/{category}_{seed}_{prompt_index}", "the sweep's own files"),
    (".hidden/{category}_{seed}_{prompt_index}", "starts with `.`"),
    ("{category}/a:b_{seed}_{prompt_index}", "refuse"),
    ("{category}/a|b?_{seed}_{prompt_index}", "refuse"),
    ("{category}./{seed}_{prompt_index}", "ends with a dot or a space"),
    ("{category}/" + "x" * 250 + "_{seed}_{prompt_index}", "file systems allow 255"),
    ("{category}/" + "y" * 256 + "/{seed}_{prompt_index}", "more than 255 bytes"),
])
def test_a_name_that_no_file_system_can_hold_is_refused(write_manifest, template, expected):
    assert expected in _problem(write_manifest, template)[0]


def test_a_control_character_from_a_prompt_never_reaches_a_name(write_manifest):
    manifest = _load(write_manifest, output={"name": "{category}/{prompt:40}_{seed}"},
                     categories={"alpha": {"prompts": ["a\x1b]2;x\x07 cat", "a dog"]}})
    assert [job.name for job in expand(manifest)][:2] == ["alpha/a-2-x-cat_1", "alpha/a-2-x-cat_2"]


def _run(manifest) -> None:
    result = run_sweep(manifest, RunOptions(executor="local", progress=False), say=lambda line: None)
    assert result.exit_code == 0


@pytest.mark.slow
def test_named_by_content_a_prompt_inserted_at_the_top_leaves_the_others_done(write_manifest):
    content = {"name": "{category}/seed_{seed}_{prompt_id}"}
    categories = {"alpha": {"prompts": ["a cat", "a dog"]}}
    _run(_load(write_manifest, output=content, categories=categories))
    inserted = _load(write_manifest, output=content, categories={"alpha": {"prompts": ["a bird", "a cat", "a dog"]}})
    scan = Sweep(inserted).scan()
    assert len(scan.complete) == 4 and not scan.stale  # 4 of 6 done: only the new prompt's 2 are left
    _run(inserted)
    sweep = Sweep(inserted)
    ledger = sweep.ledger(readonly=True)
    made = [attempt["job_id"] for attempt in ledger.attempts() if attempt["outcome"] == "done"]
    ledger.close()
    assert len(made) == 6 and len(set(made)) == 6  # each video made once: none of the 4 again
    assert len(sweep.scan().complete) == 6


@pytest.mark.slow
def test_named_by_position_the_settings_change_message_says_to_append_prompts(write_manifest):
    _run(_load(write_manifest, categories={"alpha": {"prompts": ["a cat", "a dog"]}}))
    inserted = _load(write_manifest, categories={"alpha": {"prompts": ["a bird", "a cat", "a dog"]}})
    with pytest.raises(UserError) as caught:
        run_sweep(inserted, RunOptions(executor="local", progress=False), say=lambda line: None)
    message = str(caught.value)
    assert "alpha/seed_1_prompt_0.mp4: made for another prompt at this position" in message
    assert "Append new prompts at the end of the list instead" in message
    assert "{prompt_id}" in message


def test_the_same_prompt_twice_named_by_content_says_which_prompts_and_how_to_fix_it(write_manifest):
    with pytest.raises(ManifestError) as caught:
        expand(_load(write_manifest, output={"name": "{category}/{prompt_id}_{seed}"},
                     categories={"alpha": {"prompts": ["a cat", "a dog", "a cat"]}}))
    (problem,) = caught.value.problems
    assert "prompts 0 and 2 of the same list are the same text" in problem.message
    assert "remove the repeated prompt" in problem.fix


def test_a_category_name_the_manifest_accepts_is_not_refused_by_a_template(write_manifest):
    categories = {"镜头 'it's' $(x)": {"prompts": ["a cat"]}}  # (`"` is refused in both layouts: Windows)
    for template in (None, "{category}/{prompt_id}_{seed}"):
        manifest = _load(write_manifest, categories=categories, **({"output": {"name": template}} if template else {}))
        assert len(expand(manifest)) == 2
    assert "refuse" in _problem(write_manifest, "{category}/a?{prompt_id}_{seed}", categories=categories)[0]


@pytest.mark.parametrize("category, expected", [
    ("x:y", "refuse"), ("a*b", "refuse"), ('say "hi"', "refuse"), (".hidden", "starts with `.`"),
    ("dots.", "ends with a dot or a space"),
])
@pytest.mark.parametrize("template", [None, "{category}/{prompt_id}_{seed}", "{prompt_id}_{seed}"])
def test_a_category_name_that_no_file_system_can_hold_is_refused_at_its_line_in_every_layout(
        write_manifest, category, expected, template):
    # one rule (manifest.names.portable_name_problem) for the default layout and for templates
    path = write_manifest(synthetic_manifest(categories={"alpha": {"prompts": ["a cat"]}, category: {"prompts": ["x"]}},
                                             **({"output": {"name": template}} if template else {})))
    with pytest.raises(ManifestError) as caught:
        expand(load_manifest(path))
    (problem,) = caught.value.problems
    line = path.read_text(encoding="utf-8").splitlines()[problem.line - 1]
    assert line.strip().startswith(f"{category}:") or line.strip().startswith(f"'{category}':"), (line, problem)
    assert f"category name {category!r}" in problem.message and expected in problem.message, problem
