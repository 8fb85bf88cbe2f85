"""Generation axes (`axes:`): the product of jobs, their identities and files, per-job settings in the
backends and the job loop, the report per axis value, and each located error before anything starts."""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator.jobs import expand, settings_fingerprint
from orchestrator.manifest import ManifestError, read_manifest
from orchestrator.outputs import count_frames, read_sidecar
from orchestrator.validation import load_manifest

from .conftest import ROOT, cli, synthetic_manifest

AXES = {"cfg_scale": [3.0, 5.0, [4.0, 3.0]], "steps": [4, 8],
        "zip": [{"width": [32, 48], "height": [48, 32]}]}


def _load(write_manifest, **overrides):
    return load_manifest(write_manifest(synthetic_manifest(**overrides)))


def _problems(write_manifest, axes, **overrides) -> list[str]:
    path = write_manifest(synthetic_manifest(axes=axes, **overrides))
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    return [str(p) for p in caught.value.problems]


def _line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if text in line)


# ------------------------------------------------------------------------------------------- expansion

def test_jobs_are_the_product_with_the_axes_in_a_fixed_order(write_manifest):
    manifest = _load(write_manifest, axes=AXES)
    jobs = expand(manifest)
    assert len(jobs) == 3 * 2 * (3 * 2 * 2)  # prompts × seeds × cfg × steps × (width, height)
    assert [j.ordinal for j in jobs] == list(range(len(jobs)))
    assert len({j.id for j in jobs}) == len({j.output for j in jobs}) == len(jobs)
    # one prompt and seed's settings side by side, the first axis varying slowest, the zip's pairs kept
    first = [j for j in jobs if (j.category, j.prompt_index, j.seed) == ("alpha", 0, 1)]
    assert jobs[:12] == first
    assert [j.axes for j in first[:4]] == [
        {"cfg_scale": 3.0, "steps": 4, "width": 32, "height": 48},
        {"cfg_scale": 3.0, "steps": 4, "width": 48, "height": 32},
        {"cfg_scale": 3.0, "steps": 8, "width": 32, "height": 48},
        {"cfg_scale": 3.0, "steps": 8, "width": 48, "height": 32}]
    assert first[-1].axes == {"cfg_scale": [4.0, 3.0], "steps": 8, "width": 48, "height": 32}
    generation = first[-1].generation  # resolved by the expansion
    assert (generation.guidance, generation.steps, generation.width, generation.height) == ((4.0, 3.0), 8, 48, 32)
    assert generation.num_frames == manifest.generation.num_frames  # not swept: the manifest's
    assert expand(manifest) == jobs  # deterministic
    assert [type(j).from_dict(json.loads(json.dumps(j.to_dict()))) for j in jobs] == jobs  # a spec's round trip


def test_a_jobs_identity_is_its_axis_values_so_adding_a_value_keeps_the_others(write_manifest):
    before = {j.key: j.id for j in expand(_load(write_manifest, axes={"cfg_scale": [3.0, 5.0]}))}
    after = {j.key: j.id for j in expand(_load(write_manifest, axes={"cfg_scale": [3.0, 5.0, 7.0]}))}
    assert len(after) == len(before) * 3 // 2
    assert all(after[key] == job_id for key, job_id in before.items())
    # nor does listing the axes in another order change an id
    swapped = _load(write_manifest, axes={"steps": [4, 8], "cfg_scale": [3.0, 5.0]})
    straight = _load(write_manifest, axes={"cfg_scale": [3.0, 5.0], "steps": [4, 8]})
    assert sorted(j.id for j in expand(swapped)) == sorted(j.id for j in expand(straight))
    # the manifest's own value of a swept setting is not part of any job: changing it changes nothing
    other = _load(write_manifest, axes={"cfg_scale": [3.0, 5.0]}, generation={"cfg_scale": 9.0})
    assert {j.key: j.id for j in expand(other)} == before


def test_a_manifest_without_axes_keeps_the_ids_it_had_before_axes(tmp_path):
    # demo.yaml with a fixed checkpoint path (the fingerprint holds the absolute path); the digest was
    # computed with the code before axes existed
    text = (ROOT / "experiments" / "demo.yaml").read_text(encoding="utf-8")
    manifest = tmp_path / "demo.yaml"
    manifest.write_text(text.replace("path: ../models/random-tiny-wan-t2v", "path: /opt/models/random-tiny-wan-t2v"),
                        encoding="utf-8")
    jobs = expand(read_manifest(manifest))
    assert len(jobs) == 14 and jobs[0].id == "7090a6a2275ae1b8"
    assert hashlib.sha1(" ".join(j.id for j in jobs).encode()).hexdigest() == "1d537f469651272c4fac9c6a7c0f8c95ea261163"
    assert all(j.axes == {} and j.output.endswith(f"seed_{j.seed}_prompt_{j.prompt_index}.mp4") for j in jobs)


def test_sizing_plans_for_the_heaviest_job(write_manifest):
    manifest = _load(write_manifest, axes={"steps": [4, 8], "num_frames": [9, 5],
                                           "zip": [{"width": [32, 64], "height": [48, 32]}]})
    heaviest = manifest.heaviest_generation
    assert (heaviest.steps, heaviest.num_frames, heaviest.width, heaviest.height) == (8, 9, 64, 32)


# ------------------------------------------------------------------------------------------- errors

def test_an_axis_on_an_unknown_key_or_on_extra_is_located(write_manifest):
    problems = _problems(write_manifest, {"sampler": ["unipc", "dpm++"], "extra": [{}]})
    assert len(problems) == 2
    assert all(":" in p.split(" ")[0] and "manifest.yaml:" in p for p in problems)
    assert "unknown key `sampler` in axes" in problems[0] and "cfg_scale" in problems[0]
    assert "unknown key `extra` in axes" in problems[1]


@pytest.mark.parametrize("axes, expected", [
    ({"steps": []}, "axes.steps must be a non-empty list of values"),
    ({"steps": 30}, "axes.steps must be a non-empty list of values"),
    ({"steps": [30, 50, 30]}, "axes.steps lists 30 twice"),
    ({"cfg_scale": [3, 3.0]}, "axes.cfg_scale lists 3.0 twice"),
    ({"steps": [30, "fifty"]}, "axes.steps must be integer, got 'fifty'"),
    ({"num_frames": [81, 80]}, "axes.num_frames is 80, not of the form 4n+1"),
    ({"width": [832, 5000]}, "axes.width is 5000, more than 4096 pixels"),
    ({"cfg_scale": [[4.0, 3.0, 2.0]]}, "axes.cfg_scale is [4.0, 3.0, 2.0]"),
    ({"denoising_strength": [0.5, 1.5]}, "axes.denoising_strength is 1.5"),
    ({"shift": [3.0, -1.0]}, "axes.shift is -1.0"),
])
def test_each_value_is_checked_as_the_generation_key_is_at_its_own_line(write_manifest, axes, expected):
    path = write_manifest(synthetic_manifest(axes=axes))
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    (problem,) = caught.value.problems
    assert expected in problem.message and problem.fix
    assert problem.line >= _line_of(path, next(iter(axes)) + ":")  # the key's line, or its value's below it


def test_a_bad_value_is_reported_at_its_own_line_in_a_block_list(write_manifest, tmp_path):
    text = write_manifest(synthetic_manifest()).read_text(encoding="utf-8") + "axes:\n  steps:\n    - 30\n    - 0\n"
    path = write_manifest(text)
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    (problem,) = caught.value.problems
    assert problem.line == _line_of(path, "- 0") and "axes.steps is 0" in problem.message and problem.fix


def test_zip_groups_need_equal_lists_and_a_setting_is_swept_once(write_manifest):
    problems = _problems(write_manifest, {"width": [32, 48], "zip": [{"width": [32, 48], "height": [48, 32, 64]}]})
    assert any("axes sweeps `width` twice" in p for p in problems)
    problems = _problems(write_manifest, {"zip": [{"width": [32, 48], "height": [48, 32, 64]}]})
    assert len(problems) == 1 and "must be equally long (width has 2, height has 3)" in problems[0]
    problems = _problems(write_manifest, {"zip": [{"width": [32, 32], "height": [48, 48]}]})
    assert len(problems) == 1 and "the combination {'width': 32, 'height': 48} is listed twice" in problems[0]
    assert "axes.zip must be a list" in _problems(write_manifest, {"zip": {"width": [32]}})[0]


def test_a_bad_quantize_value_is_located_at_its_line(write_manifest, tmp_path):
    path = write_manifest(synthetic_manifest(axes={"quantize": ["none", "int4"]}))
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    (problem,) = caught.value.problems
    assert problem.line == _line_of(path, "int4")
    assert "axes.quantize is 'int4'" in problem.message and "none, fp8, int8, fp8_storage" in str(problem)
    assert "axes.zip.quantize lists" not in str(problem)
    repeated = _problems(write_manifest, {"quantize": ["int8", "int8"]})
    assert len(repeated) == 1 and "axes.quantize lists 'int8' twice" in repeated[0]


def test_an_axis_value_the_backend_does_not_take_is_located(write_manifest, tmp_path):
    # the command backend runs Wan's generate.py, which takes no denoising strength nor negative prompt
    from .test_command_backend import STUB, fake_checkpoint
    model = {"backend": "command", "task": "t2v", "path": str(fake_checkpoint(tmp_path / "ckpt")),
             "options": {"script": str(STUB)}}
    generation = {"width": 832, "height": 480, "num_frames": 81, "fps": 16, "steps": 4}
    path = write_manifest(synthetic_manifest(model=model, generation=generation,
                                             axes={"steps": [4, 8], "denoising_strength": [1.0, 0.6]}))
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    found = [p for p in caught.value.problems if "axes (" in p.message]
    assert len(found) == 1, caught.value.problems
    assert found[0].line == _line_of(path, "denoising_strength:")
    assert "axes (denoising_strength = 0.6): generate.py takes no denoising strength" in found[0].message
    # without the refused value, the same sweep is fine for the backend
    ok = write_manifest(synthetic_manifest(model=model, generation=generation, axes={"steps": [4, 8]}))
    assert [a.keys for a in load_manifest(ok).axes] == [("steps",)]


def test_more_than_a_million_jobs_need_confirming(write_manifest):
    axes = {"steps": list(range(1, 101)), "num_frames": [4 * n + 1 for n in range(100)],
            "cfg_scale": [float(n) for n in range(20)]}  # 6 base jobs × 200,000
    (problem,) = _problems(write_manifest, axes)
    assert "the axes make 1,200,000 jobs, more than 1,000,000" in problem and "confirm_jobs: 1200000" in problem
    (problem,) = _problems(write_manifest, {**axes, "confirm_jobs": 1_100_000})
    assert "more than axes.confirm_jobs (1,100,000)" in problem
    manifest = read_manifest(write_manifest(synthetic_manifest(axes={**axes, "confirm_jobs": 1_200_000})))
    assert [len(a.points) for a in manifest.axes] == [100, 100, 20]


def test_a_bad_axis_starts_nothing(write_manifest, tmp_path):
    path = write_manifest(synthetic_manifest(axes={"steps": [4, 4]}))
    result = cli("run", str(path), "--executor", "local", "--no-progress")
    assert result.returncode == 2
    assert f"{path}:" in result.stderr and "axes.steps lists 4 twice" in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_report_names_each_axis_value_as_the_file_names_do(write_manifest, tmp_path):
    """A [high, low] cfg pair is `4,3` in the report, as in its files' names and on the review page; the
    JSON keeps the value itself beside that label."""
    from orchestrator.api import report as report_of
    from orchestrator.report import format_report
    path = write_manifest(synthetic_manifest(axes={"cfg_scale": [3.0, [4.0, 3.5]]}))
    jobs = expand(load_manifest(path))
    assert {Path(j.output).name for j in jobs if j.axes["cfg_scale"] == [4.0, 3.5]} >= {"seed_1_prompt_0_cfg_scale-4,3.5.mp4"}
    report = report_of(load_manifest(path))
    assert [row.name for row in report.axes["cfg_scale"]] == ["3", "4,3.5"]
    lines = format_report(report).splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("cfg_scale "))
    assert [lines[header + 2].split()[0], lines[header + 3].split()[0]] == ["3", "4,3.5"]
    rows = json.loads(cli("report", str(path), "--json").stdout)["axes"]["cfg_scale"]
    assert [(row["value"], row["label"]) for row in rows] == [(3.0, "3"), ([4.0, 3.5], "4,3.5")]


# ------------------------------------------------------------------------------------------- running

@pytest.mark.slow
def test_a_sweep_with_axes_makes_each_combination_with_its_own_settings(write_manifest, tmp_path):
    # num_frames is swept: the job loop checks each video against its job's frame count, not the manifest's
    path = write_manifest(synthetic_manifest(
        categories={"alpha": {"prompts": ["a cat"]}}, seeds=[1],
        axes={"num_frames": [5, 9], "zip": [{"width": [32, 48], "height": [48, 32]}]}))
    result = cli("run", str(path), "--executor", "local", "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = expand(load_manifest(path))
    assert len(jobs) == 4
    assert len({Path(j.output).read_bytes() for j in jobs}) == 4  # four distinct videos
    for job in jobs:
        assert count_frames(job.output) == job.axes["num_frames"]
        sidecar = read_sidecar(job.output)
        assert sidecar["job_id"] == job.id and sidecar["axes"] == job.axes == sidecar["job"]["axes"]
        assert (sidecar["generation"]["num_frames"], sidecar["generation"]["width"]) == \
            (job.axes["num_frames"], job.axes["width"])
    report = cli("report", str(path))
    assert report.returncode == 0
    lines = report.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("num_frames "))
    assert lines[header + 2].split()[:3] == ["5", "2", "2"] and lines[header + 3].split()[:3] == ["9", "2", "2"]
    assert any(line.startswith("width ") for line in lines)
    data = json.loads(cli("report", str(path), "--json").stdout)
    assert [(row["value"], row["expected"], row["done"]) for row in data["axes"]["num_frames"]] == [(5, 2, 2), (9, 2, 2)]
    assert list(data["axes"]) == ["num_frames", "width", "height"]
    # running again finds every combination done
    again = cli("run", str(path), "--executor", "local", "--no-progress")
    assert again.returncode == 0 and "all 4 jobs of `t` are done" in again.stdout


def test_the_command_backend_runs_each_job_with_its_own_settings(tmp_path):
    from orchestrator.backends.command import CommandBackend
    from orchestrator.jobs import Job
    from orchestrator.manifest import GenerationConfig, ModelConfig
    model = ModelConfig(backend="command", task="t2v", path=str(tmp_path),
                        options={"command": ["{python}", "gen.py", "{steps}", "{cfg_scale}", "{width}x{height}"]})
    backend = CommandBackend(model, GenerationConfig(steps=50, cfg_scale=5.0), ())
    backend.load()
    axes = {"steps": 30, "cfg_scale": 3.0, "width": 480, "height": 832}
    job = Job("j", 0, "c", None, None, 0, "p", 1, str(tmp_path / "c" / "x.mp4"), axes=axes, model=model,
              generation=GenerationConfig(**axes))  # its own settings, as the expansion resolves them
    assert backend.command_line(job, "out.mp4")[2:] == ["30", "3.0", "480x832"]
    plain = Job("j", 0, "c", None, None, 0, "p", 1, str(tmp_path / "c" / "x.mp4"))
    assert backend.command_line(plain, "out.mp4")[2:] == ["50", "5.0", "832x480"]


@pytest.mark.slow
def test_the_diffusers_backend_takes_size_length_and_shift_per_job(tmp_path, random_wan):
    pytest.importorskip("diffusers")
    from orchestrator.backends.diffusers_wan import DiffusersWanBackend
    from orchestrator.manifest import GenerationConfig, ModelConfig

    from .conftest import backend_job
    path = random_wan("t2v")
    backend = DiffusersWanBackend(ModelConfig(backend="diffusers", task="t2v", path=str(path), dtype="float32"),
                                  GenerationConfig(width=32, height=32, num_frames=5, fps=5, steps=2), ())
    backend.load()
    try:
        own_shift = backend.pipe.scheduler.config.flow_shift
        plain = backend.generate(backend_job(seed=1), lambda s, n: None)
        assert plain.shape == (5, 32, 32, 3)
        steps = []
        axes = {"width": 48, "num_frames": 9, "steps": 3, "shift": 7.0}  # with its settings, as expand resolves them
        job = replace(backend_job(seed=1), axes=axes, model=backend.model,
                      generation=replace(backend.generation, **axes))
        swept = backend.generate(job, lambda s, n: steps.append(n))
        assert swept.shape == (9, 32, 48, 3) and steps == [3, 3, 3]
        assert backend.pipe.scheduler.config.flow_shift == 7.0
        backend.generate(backend_job(seed=1), lambda s, n: None)
        assert backend.pipe.scheduler.config.flow_shift == own_shift  # the next job's own (the checkpoint's)
    finally:
        backend.close()


def test_a_refused_first_value_is_its_own_axis_problem_not_the_others(write_manifest, tmp_path):
    from .test_command_backend import STUB, fake_checkpoint
    model = {"backend": "command", "task": "t2v", "path": str(fake_checkpoint(tmp_path / "ckpt")),
             "options": {"script": str(STUB)}}
    generation = {"width": 832, "height": 480, "num_frames": 81, "fps": 16, "steps": 4}
    path = write_manifest(synthetic_manifest(model=model, generation=generation,
                                             axes={"steps": [4, 8], "negative_prompt": ["blurry", ""]}))
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    (found,) = caught.value.problems
    assert found.line == _line_of(path, "negative_prompt:")
    assert "axes (negative_prompt = 'blurry'): generate.py takes no negative prompt" in found.message


@pytest.mark.slow
def test_the_diffsynth_backend_takes_size_and_strength_per_job_and_keeps_latents_per_size(tmp_path, tiny_checkpoint):
    pytest.importorskip("diffsynth")
    import numpy as np

    from orchestrator.backends.diffsynth_wan import DiffSynthWanBackend
    from orchestrator.manifest import GenerationConfig, ModelConfig
    from orchestrator.outputs import write_mp4

    from .conftest import backend_job
    path = tiny_checkpoint("t2v")
    clip = write_mp4(np.random.RandomState(0).randint(0, 255, (7, 40, 48, 3)).astype(np.uint8),
                     tmp_path / "clip.mp4", fps=5, expected_frames=7)
    backend = DiffSynthWanBackend(
        ModelConfig(backend="diffsynth", task="v2v", path=str(path), dtype="float32"),
        GenerationConfig(width=32, height=32, num_frames=5, fps=5, steps=2, denoising_strength=0.7), ())
    backend.load()
    try:
        def job(**axes):  # with its settings, as expand resolves them
            return replace(backend_job(seed=1, reference=clip), axes=axes, model=backend.model,
                           generation=replace(backend.generation, **axes))
        assert backend.generate(job(), lambda s, n: None).shape == (5, 32, 32, 3)
        wide = backend.generate(job(width=48, denoising_strength=0.5), lambda s, n: None)
        assert wide.shape == (5, 32, 48, 3) and backend.job_info()["reference_encoding_reused"] is False
        backend.generate(job(width=48, denoising_strength=0.9), lambda s, n: None)
        assert backend.job_info()["reference_encoding_reused"] is True  # same size: the clip's latents kept
    finally:
        backend.close()


# ------------------------------------------------------------------------------------------- quantize

def test_a_quantize_axis_takes_speed_values_alone_or_in_a_zip_group(write_manifest):
    manifest = _load(write_manifest, axes={"quantize": ["none", "int8"], "steps": [4, 8]}, speed={"quantize": "fp8"})
    jobs = expand(manifest)
    assert len(jobs) == 6 * 2 * 2
    # the jobs of one quantize value before the next's (a worker reloads its model when it changes), and a
    # worker's group (the jobs it prefers to stay within) holds one value
    assert [j.axes["quantize"] for j in jobs] == ["none"] * 12 + ["int8"] * 12
    assert [j.ordinal for j in jobs] == list(range(24))
    assert {j.group for j in jobs if j.axes["quantize"] == "int8"} == {
        "alpha/#0 quantize=int8", "alpha/#1 quantize=int8", "beta/#0 quantize=int8"}
    # the manifest's own speed.quantize is not part of any job when swept: each job's axis value is
    assert "speed" not in settings_fingerprint(manifest) and len({j.id for j in jobs}) == 24
    plain = _load(write_manifest, axes={"quantize": ["none", "int8"], "steps": [4, 8]})
    assert [j.id for j in expand(plain)] == [j.id for j in jobs]
    zipped = _load(write_manifest, axes={"zip": [{"quantize": ["none", "int8", "none"], "steps": [4, 4, 8]}]})
    zipped_jobs = expand(zipped)
    assert [(j.axes["quantize"], j.axes["steps"]) for j in zipped_jobs][:3] == [("none", 4), ("none", 8), ("none", 4)]
    assert [j.axes["quantize"] for j in zipped_jobs] == ["none"] * 12 + ["int8"] * 6


def test_ids_without_a_quantize_axis_are_unchanged(write_manifest):
    # digest computed with the code before quantize could be swept (speed.quantize in the manifest's fingerprint)
    jobs = expand(_load(write_manifest, axes={"steps": [4, 8], "cfg_scale": [3.0, [4.0, 3.0]]},
                        speed={"quantize": "int8"}))
    assert len(jobs) == 24 and jobs[0].id == "ce3d3dc982c368d5"
    assert hashlib.sha1(" ".join(j.id for j in jobs).encode()).hexdigest() == "c0a09d6353aaa05a7b583d5f46327fc876473297"
    assert all("quantize" not in j.group for j in jobs)


def test_a_quantize_axis_on_the_command_backend_is_refused_at_the_axis(write_manifest, tmp_path):
    from .test_command_backend import STUB, fake_checkpoint
    model = {"backend": "command", "task": "t2v", "path": str(fake_checkpoint(tmp_path / "ckpt")),
             "options": {"script": str(STUB)}}
    generation = {"width": 832, "height": 480, "num_frames": 81, "fps": 16, "steps": 4}
    for values in (["none", "int8"], ["int8", "none"]):
        path = write_manifest(synthetic_manifest(model=model, generation=generation, axes={"quantize": values}))
        with pytest.raises(ManifestError) as caught:
            load_manifest(path)
        (problem,) = caught.value.problems
        assert problem.line == _line_of(path, "quantize:")
        assert "axes (quantize = 'int8'): the command backend runs Wan's generate.py" in problem.message


@pytest.mark.slow
def test_fp8_in_a_quantize_axis_needs_an_fp8_card(write_manifest, tmp_path, monkeypatch, random_wan):
    pytest.importorskip("diffusers")
    pytest.importorskip("torchao")
    checkpoint = random_wan("t2v")
    monkeypatch.setenv("ORCHESTRATOR_FAKE_GPUS", "NVIDIA A800-SXM4-80GB:80:0")
    data = synthetic_manifest(model={"backend": "diffusers", "task": "t2v", "path": str(checkpoint),
                                     "dtype": "float32"}, axes={"quantize": ["none", "fp8"]})
    path = write_manifest(data)
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    (problem,) = caught.value.problems
    assert problem.line == _line_of(path, "quantize:")
    assert "axes (quantize = 'fp8')" in problem.message and "A800-SXM4-80GB (compute capability 8.0) has none" in \
        problem.message and "use quantize: int8 or fp8_storage" in problem.fix
    monkeypatch.setenv("ORCHESTRATOR_FAKE_GPUS", "NVIDIA H100 80GB HBM3:80:0")
    assert [a.keys for a in load_manifest(path).axes] == [("quantize",)]


def test_the_job_loop_reloads_the_model_only_when_the_quantize_value_changes(tmp_path):
    import logging

    from orchestrator.job_loop import JobLoop, SlotBackend
    from orchestrator.jobs import Job

    from .conftest import ListJobSource
    from orchestrator.manifest import Execution, GenerationConfig, ModelConfig, SpeedConfig
    from orchestrator.planning import WorkerSpec

    values = ["none", "none", "int8", "int8", "none"]
    generation = GenerationConfig(num_frames=5, fps=5)
    jobs = [Job(f"j{n}", n, "c", None, None, 0, "p", n, str(tmp_path / "c" / f"{n}.mp4"), axes={"quantize": q},
                model=ModelConfig(backend="synthetic", task="t2v", speed=SpeedConfig(quantize=q)),
                generation=generation)
            for n, q in enumerate(values)]

    class Jobs(ListJobSource):  # the FAKE job source, keeping each job's sidecar record
        def fail(self, job_id, message, outcome="error"):
            raise AssertionError(message)

        def store_video(self, spec, job, result, record):
            self.sidecars = getattr(self, "sidecars", {})
            self.sidecars[job.id] = record
            return True

    events = []

    class Counted:  # a FAKE backend: records what it was loaded with and what ran on it
        name, attempt, load_info = "counted", 1, {}

        def __init__(self, model):
            self.model = model

        def generate(self, job, progress):
            events.append(("generate", job.id, self.model.speed.quantize))
            return "frames"

        def prepare(self, job):
            pass

        def peak_memory_bytes(self):
            return 0

        def job_info(self):
            return {}

        def close(self):
            events.append(("close", self.model.speed.quantize))

    def load(model):
        events.append(("load", model.speed.quantize))
        return Counted(model)

    model = ModelConfig(backend="synthetic", task="t2v")
    spec = WorkerSpec(sweep="s", worker="w0", devices=(), queue="cpu0", ledger="", output_dir=str(tmp_path),
                      log="", model=model, generation=generation, execution=Execution())
    source = Jobs(jobs)
    loop = JobLoop(source, spec, logging.getLogger("test"))
    backends = SlotBackend(load, model, loop.log)
    backends.open()
    assert loop.run(backends, []) == "finished"
    loop.close()
    backends.close()
    assert events == [("load", "none"), ("generate", "j0", "none"), ("generate", "j1", "none"),
                      ("close", "none"), ("load", "int8"), ("generate", "j2", "int8"), ("generate", "j3", "int8"),
                      ("close", "int8"), ("load", "none"), ("generate", "j4", "none"), ("close", "none")]
    assert source.done == [j.id for j in jobs]
    # each sidecar records the speed its job ran with
    assert [source.sidecars[j.id]["model"]["speed"]["quantize"] for j in jobs] == values


@pytest.mark.slow
def test_a_local_quantize_sweep_runs_each_job_with_its_value_and_reloads_once(write_manifest, tmp_path, random_wan):
    pytest.importorskip("diffusers")
    pytest.importorskip("torchao")
    checkpoint = random_wan("t2v")
    path = write_manifest(synthetic_manifest(
        model={"backend": "diffusers", "task": "t2v", "path": str(checkpoint), "dtype": "float32"},
        generation={"width": 32, "height": 32, "num_frames": 5, "fps": 5, "steps": 2},
        categories={"alpha": {"prompts": ["a cat"]}}, seeds=[1], resources={"cpu_slots": 1},
        axes={"quantize": ["none", "int8"]}))
    result = cli("run", str(path), "--executor", "local", "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = expand(load_manifest(path))
    assert [j.axes["quantize"] for j in jobs] == ["none", "int8"]
    for job in jobs:
        assert count_frames(job.output) == 5
        sidecar = read_sidecar(job.output)
        assert sidecar["job_id"] == job.id and sidecar["axes"] == {"quantize": job.axes["quantize"]}
        assert sidecar["model"]["speed"]["quantize"] == job.axes["quantize"]
    (log,) = (path.parent / "out").rglob("*worker*.log")
    text = log.read_text(encoding="utf-8")
    assert text.count("reloading the model") == 1 and "runs with quantize int8" in text


def test_plan_shows_the_quantize_axis_and_its_reloads_and_sizes_for_the_heaviest_value(write_manifest):
    path = write_manifest(synthetic_manifest(axes={"quantize": ["int8", "none"], "steps": [4, 8]},
                                             speed={"quantize": "int8"}))
    result = cli("plan", str(path))
    assert result.returncode == 0, result.stderr
    assert 'axis       quantize: "int8", "none"' in result.stdout
    assert "quantize per job (the axis)" in result.stdout
    assert "(int8 → none); sized for quantize none" in result.stdout
    assert "cpu0: each worker about 0 LoRA switch(es) in place and 1 reload(s) of the model" in result.stdout
    assert load_manifest(path).heaviest_model.speed.quantize == "none"  # 8-bit weights take less memory than none
    assert _load(write_manifest, axes={"quantize": ["int8", "fp8_storage"]}).heaviest_model.speed.quantize == "int8"
    assert _load(write_manifest, speed={"quantize": "int8"}).heaviest_model.speed.quantize == "int8"


# ------------------------------------------------------------------------------- settings resolved once

def test_a_jobs_settings_come_from_the_expansion_and_are_what_its_sidecar_records(write_manifest, tmp_path):
    """Issue 29, part 5: each job carries its settings, resolved once when the manifest is expanded; they
    travel with it (the ledger's JSON, a worker spec's typed settings), and the worker's loop, the video's
    check and the sidecar use them as they are."""
    import logging
    import pickle

    from orchestrator.harness import Harness
    from orchestrator.jobs import Job
    from orchestrator.manifest import GenerationConfig, ModelConfig
    from orchestrator.planning import WorkerSpec

    from .conftest import ListJobSource

    manifest = _load(write_manifest, categories={"alpha": {"prompts": ["a cat"]}}, seeds=[1, 2],
                     axes={"cfg_scale": [3.0, [4.0, 3.0]], "num_frames": [5, 9], "quantize": ["none", "int8"]})
    jobs = expand(manifest)
    assert len(jobs) == 2 * 8
    job = next(j for j in jobs if j.axes == {"cfg_scale": [4.0, 3.0], "num_frames": 9, "quantize": "int8"})
    assert isinstance(job.model, ModelConfig) and isinstance(job.generation, GenerationConfig)
    assert (job.generation.guidance, job.generation.num_frames, job.model.speed.quantize) == ((4.0, 3.0), 9, "int8")
    # what is not swept is the manifest's own
    assert (job.generation.width, job.generation.steps) == (manifest.generation.width, manifest.generation.steps)
    assert job.model.path == manifest.model.path and manifest.model.speed.quantize == "none"
    # resolved once per combination of axis values, shared by its jobs (a sweep of millions stays small)
    assert len({id(j.generation) for j in jobs}) == 8 and len({id(j.model) for j in jobs}) <= 8
    # a ledger row (JSON) gives the job back with its typed settings; old rows without them still read
    assert all(Job.from_dict(json.loads(json.dumps(j.to_dict()))) == j for j in jobs)
    old_row = {k: v for k, v in job.to_dict().items() if k not in ("model", "generation", "axes")}
    assert Job.from_dict(old_row).model is None
    with pytest.raises(ValueError, match="no resolved settings"):  # axis values without settings: refused
        Job.from_dict({k: v for k, v in job.to_dict().items() if k not in ("model", "generation")})

    # a worker spec: typed settings, one JSON pair (the spec file), and it pickles (a Ray actor's argument)
    spec = WorkerSpec(sweep="t", worker="cpu0_worker0", devices=(), queue="cpu0", ledger="", log="",
                      output_dir=str(manifest.output_dir), model=jobs[0].model, generation=manifest.generation,
                      execution=manifest.execution, settings=settings_fingerprint(manifest))
    assert WorkerSpec.read(spec.write(tmp_path / "spec.json")) == spec == pickle.loads(pickle.dumps(spec))

    # the workers' harness runs the jobs (the slot reloads for quantize int8) and writes their sidecars
    harness = Harness(WorkerSpec.read(tmp_path / "spec.json"), logging.getLogger("test"))
    harness.open()
    source = ListJobSource(jobs)
    try:
        assert harness.run(source, []) == "finished"
    finally:
        harness.close()
    assert source.done == [j.id for j in jobs] and not source.failed
    for made in jobs:
        sidecar = read_sidecar(made.output)
        assert sidecar["job_id"] == made.id and sidecar["axes"] == made.axes
        assert sidecar["model"] == json.loads(json.dumps(made.model.to_dict()))
        assert sidecar["generation"] == json.loads(json.dumps(made.generation.to_dict()))
        assert count_frames(made.output) == made.generation.num_frames
        # the sidecar's `job` is what it always was: the settings are recorded once, beside it
        assert "model" not in sidecar["job"] and "generation" not in sidecar["job"]
        assert sidecar["job"]["axes"] == made.axes and sidecar["settings"] == settings_fingerprint(manifest)


def test_no_module_works_out_a_jobs_settings_again():
    """A job's settings are resolved in one place, `jobs.job_settings` (what `expand` attaches to each job):
    no other module applies a job's axis values to the manifest's settings, rebuilds settings from a dict
    with `Config(**…)`, or guesses whether a job has axes."""
    import re
    package = ROOT / "orchestrator"
    # where the manifest's settings may meet axis values without being a job's: the functions themselves and
    # the heaviest settings sizing plans for (manifest/model.py), the checks of each value before anything is
    # expanded (validation.py), and the one resolution of each job's (jobs.py)
    allowed = {"jobs.py", "validation.py", "manifest/model.py"}
    applying = re.compile(r"\b(apply_axes|model_with_axes)\(")
    rebuilding = re.compile(r"\b(ModelConfig|GenerationConfig|Execution|WorkerSpec)\(\*\*")
    found: dict[str, list[str]] = {}
    for path in sorted(package.rglob("*.py")):
        name = path.relative_to(package).as_posix()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.lstrip().startswith("def "):
                continue
            if (applying.search(line) and name not in allowed) or rebuilding.search(line) \
                    or 'getattr(job, "axes", None) or {}' in line:
                found.setdefault(name, []).append(f"{number}: {line.strip()}")
    assert found == {}
    jobs_source = (package / "jobs.py").read_text(encoding="utf-8")
    assert len(applying.findall(jobs_source)) == 2  # once each, in `job_settings`


def test_an_attention_axis_runs_each_kernel_in_turn_and_a_kernel_that_cannot_run_is_located(write_manifest,
                                                                                             random_wan):
    """`attention` can be swept like `quantize` (issue 32): its jobs run one kernel after the other (another
    kernel is another load of the model), and a value this machine cannot run is refused at the axis's line."""
    manifest = _load(write_manifest, axes={"attention": ["auto", "math"], "steps": [4, 8]})
    jobs = expand(manifest)
    assert [j.axes["attention"] for j in jobs] == ["auto"] * 12 + ["math"] * 12
    assert {j.model.speed.attention for j in jobs[12:]} == {"math"}
    assert "attention=math" in jobs[-1].group
    pytest.importorskip("diffusers")
    path = write_manifest(synthetic_manifest(
        model={"backend": "diffusers", "task": "t2v", "path": str(random_wan("t2v")), "dtype": "float32"},
        generation={"width": 32, "height": 32, "num_frames": 5, "fps": 5, "steps": 2},
        axes={"attention": ["auto", "sage"]}))
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    (problem,) = caught.value.problems
    assert problem.line == _line_of(path, "attention:") and "`sage` cannot run here" in problem.message
