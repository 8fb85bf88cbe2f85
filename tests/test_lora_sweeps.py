"""LoRAs in a sweep (issue 30), the backend-independent half: `model.loras` and the LoRA axes read and
checked at their lines, each LoRA's content and strength in the job id, names, the order of the jobs, the
slot's switch-or-reload rule as `plan` counts it and as the sidecars record it, and a switch that never
leaks (the synthetic backend's picture shows the LoRAs its worker has on, not the job's)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import av
import numpy as np
import pytest

from orchestrator.backend import lora_change
from orchestrator.backends.synthetic import SyntheticBackend
from orchestrator.jobs import expand
from orchestrator.manifest import LoraConfig, ManifestError
from orchestrator.outputs import read_sidecar
from orchestrator.planning import model_changes
from orchestrator.validation import load_manifest

from .conftest import cli, synthetic_manifest


@pytest.fixture
def lora_files(tmp_path) -> dict[str, Path]:
    """Two small files standing for LoRAs (the synthetic backend reads only their identity)."""
    folder = tmp_path / "loras"
    folder.mkdir()
    files = {}
    for name in ("motion_e5", "motion_e10", "distill"):
        files[name] = folder / f"{name}.safetensors"
        files[name].write_bytes(os.urandom(64))
    return files


def _manifest(write_manifest, loras=None, axes=None, **overrides):
    model = {"backend": "synthetic", "task": "t2v", "options": {},
             "loras": loras if loras is not None else {
                 "motion": {"path": "loras/motion_e10.safetensors", "strength": 0.8},
                 "distill": {"path": "loras/distill.safetensors", "strength": 1.0}}}
    fields = dict(model=model, categories={"alpha": {"prompts": ["a cat"]}}, seeds=[1])
    if axes is not None:
        fields["axes"] = axes
    return write_manifest(synthetic_manifest(**{**fields, **overrides}))


def _problems(path) -> list:
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    return caught.value.problems


def _line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if text in line)


# ------------------------------------------------------------------------------------ reading and checks

def test_model_loras_are_read_in_both_forms_with_a_strength_pair_per_expert(write_manifest, lora_files):
    path = _manifest(write_manifest, loras={"motion": "loras/motion_e10.safetensors",
                                            "distill": {"path": "loras/distill.safetensors", "strength": [3.0, 1.5],
                                                        "expert": "both"},
                                            "high": {"path": "loras/motion_e5.safetensors", "expert": "high"}})
    loras = load_manifest(path).model.loras
    assert [lora.name for lora in loras] == ["motion", "distill", "high"]
    assert loras[0] == LoraConfig("motion", str(lora_files["motion_e10"]), 1.0, "both")
    assert loras[1].strengths == (3.0, 1.5) and loras[2].strengths == (1.0, 0.0)


def test_each_lora_problem_is_reported_at_its_line_with_the_fix(write_manifest, lora_files):
    path = _manifest(write_manifest, loras={
        "motion": {"path": "loras/motion_e1.safetensors"},  # a typo
        "big": {"path": "loras/distill.safetensors", "strength": 1e9},
        "triple": {"path": "loras/distill.safetensors", "strength": [1, 2, 3]},
        "bad name": "loras/distill.safetensors",
        "expert": {"path": "loras/distill.safetensors", "expert": "middle"}})
    problems = {p.line: str(p) for p in _problems(path)}
    missing = problems[_line_of(path, "motion_e1")]
    assert "does not exist" in missing and "motion_e10.safetensors" in missing  # the files beside it are named
    assert any("model.loras.triple.strength is [1, 2, 3]" in text and "[high, low]" in text
               for text in problems.values())
    assert "not a finite number within ±100" in problems[_line_of(path, "1000000000")]
    assert "not a short plain name" in problems[_line_of(path, "bad name")]
    assert "both, high, low" in problems[_line_of(path, "middle")]
    # NaN (or infinity) anywhere in a manifest is refused at its line before the sections are read
    nan = _manifest(write_manifest, loras={"distill": {"path": "loras/distill.safetensors", "strength": float("nan")}})
    (problem,) = _problems(nan)
    assert problem.line == _line_of(nan, ".nan") and "not a finite number" in problem.message


def test_lora_axes_are_checked_at_their_values(write_manifest, lora_files):
    path = _manifest(write_manifest, axes={"loras.motion.strength": [0.5, 500.0],
                                           "loras.motion.path": ["loras/motion_e5.safetensors", "loras/nope.safetensors"],
                                           "loras.other.strength": [1.0],
                                           "loras": [[], ["motion", "styl"]]})
    problems = {p.line: str(p) for p in _problems(path)}
    assert "axes.loras.motion.strength is 500.0" in problems[_line_of(path, "500.0")]
    assert "does not exist" in problems[_line_of(path, "nope.safetensors")]
    assert "no LoRA named 'other'" in problems[_line_of(path, "loras.other.strength")]
    assert "'styl' is not a LoRA of model.loras" in problems[_line_of(path, "styl")]
    # a LoRA axis without model.loras says where to declare them
    plain = write_manifest(synthetic_manifest(axes={"loras.motion.strength": [0.5]}))
    (problem,) = _problems(plain)
    assert "model.loras lists no LoRA" in problem.message and "loras: {NAME: {path: FILE" in problem.fix


def test_the_command_backend_refuses_loras_at_their_line(write_manifest, lora_files, tmp_path):
    from .test_command_backend import STUB, fake_checkpoint
    path = write_manifest(synthetic_manifest(
        model={"backend": "command", "task": "t2v", "path": str(fake_checkpoint(tmp_path / "ckpt")),
               "options": {"script": str(STUB)}, "loras": {"motion": "loras/motion_e10.safetensors"}},
        generation={"width": 832, "height": 480, "num_frames": 81, "fps": 16, "steps": 4}))
    found = [p for p in _problems(path) if "LoRA" in p.message]
    assert len(found) == 1 and found[0].line == _line_of(path, "loras:")
    assert "generate.py" in found[0].message and "backend diffusers or diffsynth" in found[0].fix


# ------------------------------------------------------------------------------------------- identity

def test_a_jobs_id_holds_each_loras_content_and_strength_not_its_location(write_manifest, lora_files, tmp_path):
    jobs = expand(load_manifest(_manifest(write_manifest, axes={"loras.motion.strength": [0.5, 1.0]})))
    assert len({job.id for job in jobs}) == 2
    assert [lora.strength for lora in jobs[1].model.loras] == [1.0, 1.0]
    assert all(len(lora.digest) == 64 for job in jobs for lora in job.model.loras)  # sha256 of the content
    before = [job.id for job in jobs]
    # the same files moved to another folder: the same jobs
    moved = tmp_path / "moved"
    lora_files["motion_e10"].parent.rename(moved)
    again = _manifest(write_manifest, loras={"motion": {"path": "moved/motion_e10.safetensors", "strength": 0.8},
                                             "distill": {"path": "moved/distill.safetensors"}},
                      axes={"loras.motion.strength": [0.5, 1.0]})
    assert [job.id for job in expand(load_manifest(again))] == before
    # a retrained file under the same name: other jobs
    (moved / "motion_e10.safetensors").write_bytes(os.urandom(64))
    assert not set(job.id for job in expand(load_manifest(again))) & set(before)


def test_the_sidecar_model_round_trips_the_loras(write_manifest, lora_files):
    (job,) = expand(load_manifest(_manifest(write_manifest, loras={"pair": {"path": "loras/distill.safetensors",
                                                                            "strength": [3.0, 1.5]}})))
    data = json.loads(json.dumps(job.model.to_dict()))
    assert data["loras"][0]["strength"] == [3.0, 1.5] and data["loras"][0]["digest"] == job.model.loras[0].digest
    assert type(job.model).from_dict(data) == job.model
    plain = type(job.model).from_dict({k: v for k, v in data.items() if k != "loras"})
    assert "loras" not in plain.to_dict()  # a model without LoRAs writes what it always wrote


def test_lora_axes_name_outputs_readably_and_their_placeholders_work(write_manifest, lora_files):
    axes = {"loras.motion.path": ["loras/motion_e5.safetensors", "loras/motion_e10.safetensors"],
            "loras.motion.strength": [0.0, 0.5], "loras": [[], ["motion"], ["distill", "motion"]]}
    jobs = expand(load_manifest(_manifest(write_manifest, axes=axes)))
    assert len(jobs) == 12 and len({job.output for job in jobs}) == 12
    assert "alpha/seed_1_prompt_0_motion-motion_e5_motion-0.5_loras-distill,motion" in {job.key for job in jobs}
    named = _manifest(write_manifest, axes=axes,
                      output={"name": "{category}/{lora_motion_file}/{loras}_s{lora_motion}_{seed}"})
    assert {job.key for job in expand(load_manifest(named))} >= {"alpha/motion_e10/none_s0_1",
                                                                 "alpha/motion_e5/distill,motion_s0.5_1"}
    unknown = _manifest(write_manifest, axes=axes, output={"name": "{category}/{lora_style}_{seed}"})
    with pytest.raises(ManifestError) as caught:
        expand(load_manifest(unknown))
    (problem,) = caught.value.problems
    assert "unknown placeholder `{lora_style}`" in problem.message and "{lora_motion_file}" in problem.fix


# ------------------------------------------------------------------------------- order, switches, plan

def test_jobs_run_one_lora_setting_after_another_and_plan_counts_the_switches(write_manifest, lora_files):
    path = _manifest(write_manifest, axes={"loras.motion.strength": [0.5, 1.0]}, seeds=[1, 2, 3])
    jobs = expand(load_manifest(path))
    assert [job.axes["loras.motion.strength"] for job in jobs] == [0.5] * 3 + [1.0] * 3
    assert len({job.group for job in jobs}) == 2
    assert model_changes(jobs, "synthetic") == {"switch": 1, "reload": 0}
    # fused into 8-bit weights, a change of strength loads the model again
    fused = _manifest(write_manifest, axes={"loras.motion.strength": [0.5, 1.0]}, seeds=[1, 2, 3],
                      speed={"quantize": "int8"}, resources={"cpu_slots": 1})
    assert model_changes(expand(load_manifest(fused)), "synthetic") == {"switch": 0, "reload": 1}
    assert lora_change(SyntheticBackend, jobs[0].model, jobs[0].model) == "same"
    result = cli("plan", str(fused))
    assert result.returncode == 0, result.stderr
    assert "cpu0: each worker about 0 LoRA switch(es) in place and 1 reload(s) of the model" in result.stdout
    assert "fused into the weights before quantizing" in result.stdout


def _frames(output: str) -> np.ndarray:
    with av.open(output) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


@pytest.mark.slow
def test_one_worker_switching_loras_gives_the_frames_of_a_fresh_worker_per_job(write_manifest, lora_files, tmp_path):
    """The leak test, on the whole runtime: one worker runs every LoRA setting in turn (switching in place,
    as its sidecars say, as many times as plan said); each video equals the one a worker made alone."""
    axes = {"loras.motion.strength": [0.0, 1.0], "loras": [[], ["motion"], ["distill", "motion"]]}
    path = _manifest(write_manifest, axes=axes, resources={"cpu_slots": 1})
    result = cli("run", str(path), "--executor", "local", "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = expand(load_manifest(path))
    changes = [read_sidecar(job.output)["model_change"] for job in jobs]
    for job in jobs:  # each sidecar carries the job's LoRAs: file, content digest, strength
        recorded = read_sidecar(job.output)["model"].get("loras", [])
        assert [(lora["name"], lora["digest"], lora["strength"]) for lora in recorded] == [
            (lora.name, lora.digest, lora.strength) for lora in job.model.loras]
    assert changes[0] == "load" and "reload" not in changes
    # six settings, of which two leave no LoRA on (`[]` at either strength): one run, 4 switches
    assert changes.count("switch") == model_changes(jobs, "synthetic")["switch"] == 4
    for job in jobs:
        alone = tmp_path / f"alone-{job.ordinal}"
        single = write_manifest(synthetic_manifest(
            model={"backend": "synthetic", "task": "t2v", "options": {}, "loras": {
                lora.name: {"path": lora.path, "strength": lora.strength} for lora in job.model.loras}},
            categories={"alpha": {"prompts": ["a cat"]}}, seeds=[1], output_dir=str(alone)))
        result = cli("run", str(single), "--executor", "local", "--no-progress")
        assert result.returncode == 0, result.stdout + result.stderr
        (made,) = alone.rglob("*.mp4")
        assert np.array_equal(_frames(job.output), _frames(str(made))), job.key
    # strength 0 is no LoRA; a LoRA changes the picture
    by_axes = {json.dumps(job.axes, sort_keys=True): job for job in jobs}
    none = by_axes[json.dumps({"loras": [], "loras.motion.strength": 0.0}, sort_keys=True)]
    zero = by_axes[json.dumps({"loras": ["motion"], "loras.motion.strength": 0.0}, sort_keys=True)]
    one = by_axes[json.dumps({"loras": ["motion"], "loras.motion.strength": 1.0}, sort_keys=True)]
    assert np.array_equal(_frames(none.output), _frames(zero.output))
    assert not np.array_equal(_frames(none.output), _frames(one.output))


# ------------------------------------------------------------------ the backends' checks of the files

@pytest.mark.slow
@pytest.mark.parametrize("backend", ["diffusers", "diffsynth"])
def test_a_lora_that_does_not_fit_the_model_is_refused_at_its_line(write_manifest, tmp_path, random_wan,
                                                                    tiny_checkpoint, backend):
    from orchestrator.demo.random_loras import build_random_lora
    checkpoint = random_wan("a14b") if backend == "diffusers" else tiny_checkpoint("t2v")
    loras = tmp_path / "loras"
    loras.mkdir()
    build_random_lora(checkpoint, loras / "fits.safetensors")
    build_random_lora(checkpoint, loras / "wide.safetensors", width=1536)  # "a 1.3B LoRA on a 14B"
    build_random_lora(checkpoint, loras / "lightning_low_noise.safetensors", expert="high")
    (loras / "page.safetensors").write_text("<!DOCTYPE html><html>a download that went wrong</html>")
    declared = {"fits": "loras/fits.safetensors", "wide": "loras/wide.safetensors",
                "page": "loras/page.safetensors"}
    if backend == "diffusers":  # (two experts: a file named for the low-noise one, put on the high-noise one)
        declared["pair"] = {"path": "loras/lightning_low_noise.safetensors", "expert": "high"}
    path = write_manifest(synthetic_manifest(
        model={"backend": backend, "task": "t2v", "path": str(checkpoint), "dtype": "float32", "loras": declared},
        generation={"width": 32, "height": 32, "num_frames": 5, "fps": 5, "steps": 2},
        categories={"alpha": {"prompts": ["a cat"]}}, seeds=[1],
        axes={"loras.fits.path": ["loras/fits.safetensors", "loras/wide.safetensors"]}))
    problems = {p.line: p for p in _problems(path)}
    wide = problems[_line_of(path, "wide: loras/wide.safetensors")]
    assert "does not fit" in wide.message and "1536" in wide.message and "lora_down.weight" in wide.message
    assert "Wan 1.3B" in wide.message
    # the same file as an axis value: at that value's line
    assert problems[_line_of(path, "- loras/wide.safetensors")].message == wide.message
    page = problems[_line_of(path, "page: loras/page.safetensors")]
    assert "HTML" in page.message or "html" in page.message
    if backend == "diffusers":
        pair = problems[_line_of(path, "lightning_low_noise")]
        assert "made for the low-noise expert" in pair.message and "expert: low" in pair.fix
    assert _line_of(path, "fits: loras/fits.safetensors") not in problems


def test_report_json_names_each_lora_file_with_its_content_digest(write_manifest, lora_files):
    path = _manifest(write_manifest, axes={"loras.motion.path": ["loras/motion_e5.safetensors",
                                                                 "loras/motion_e10.safetensors"]})
    result = cli("report", str(path), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    digests = {(entry["name"], Path(entry["file"]).name): entry["digest"] for entry in report["loras"]}
    assert set(digests) == {("motion", "motion_e5.safetensors"), ("motion", "motion_e10.safetensors"),
                            ("distill", "distill.safetensors")}
    assert digests[("distill", "distill.safetensors")] == hashlib.sha256(lora_files["distill"].read_bytes()).hexdigest()
    assert [row["value"] for row in report["axes"]["loras.motion.path"]] == [
        str(lora_files["motion_e5"]), str(lora_files["motion_e10"])]


def test_a_step_cache_or_a_lora_change_is_no_reload_but_a_quantize_is():
    from dataclasses import replace

    from orchestrator.manifest import ModelConfig, SpeedConfig
    base = ModelConfig(backend="synthetic", task="t2v", loras=(LoraConfig("a", "/x.safetensors", 1.0),))
    cached = replace(base, speed=SpeedConfig(cache="first_block:threshold=0.05"))
    assert lora_change(SyntheticBackend, base, cached) == "same"  # the cache is set up per job
    other = replace(cached, loras=(LoraConfig("a", "/x.safetensors", 0.5),))
    assert lora_change(SyntheticBackend, base, other) == "switch"
    assert lora_change(SyntheticBackend, base, replace(base, speed=SpeedConfig(quantize="int8"))) == "reload"
    assert lora_change(SyntheticBackend, replace(base, speed=SpeedConfig(quantize="int8")),
                       replace(other, speed=SpeedConfig(quantize="int8"))) == "reload"  # fused: reload


@pytest.mark.slow
def test_a_changed_lora_is_a_changed_setting_said_in_its_words(write_manifest, lora_files, tmp_path):
    """Like any setting: the videos made with the old LoRA are never overwritten, and `run` says what changed
    (its strength, or the same file retrained)."""
    fields = dict(model={"backend": "synthetic", "task": "t2v", "options": {},
                         "loras": {"motion": {"path": "loras/motion_e10.safetensors", "strength": 0.8}}},
                  categories={"alpha": {"prompts": ["a cat"]}}, seeds=[1], resources={"cpu_slots": 1})
    path = write_manifest(synthetic_manifest(**fields))
    assert cli("run", str(path), "--executor", "local", "--no-progress").returncode == 0
    fields["model"]["loras"]["motion"]["strength"] = 0.5
    path = write_manifest(synthetic_manifest(**fields))
    result = cli("run", str(path), "--executor", "local", "--no-progress")
    assert result.returncode == 2 and "LoRA motion strength 0.8 → 0.5" in result.stderr
    fields["model"]["loras"]["motion"]["strength"] = 0.8
    path = write_manifest(synthetic_manifest(**fields))
    lora_files["motion_e10"].write_bytes(os.urandom(64))  # retrained under the same name
    result = cli("run", str(path), "--executor", "local", "--no-progress")
    assert result.returncode == 2 and "motion_e10.safetensors has other content" in result.stderr


def test_loras_no_axis_changes_are_fused_at_load_and_swept_ones_stay_adapters(write_manifest, lora_files):
    """An adapter costs 7.6% a step at 14B (docs/benchmarks.md): a sweep that never switches its LoRAs has them
    fused at load (not under compile, where fusing is unmeasured); a sweep that switches keeps adapters."""
    from dataclasses import replace

    from orchestrator.backend import fuses_loras
    fixed = expand(load_manifest(_manifest(write_manifest, axes={"steps": [4, 8]})))
    assert all(job.model.fuse_loras and fuses_loras(job.model) for job in fixed)
    assert not fuses_loras(replace(fixed[0].model, speed=replace(fixed[0].model.speed, compile="blocks")))
    swept = expand(load_manifest(_manifest(write_manifest, axes={"loras.motion.strength": [0.5, 1.0]})))
    assert not any(job.model.fuse_loras or fuses_loras(job.model) for job in swept)
    assert "fuse_loras" not in swept[0].model.to_dict()  # (written only where true)
    assert type(fixed[0].model).from_dict(fixed[0].model.to_dict()) == fixed[0].model


def test_the_slot_records_what_each_job_needed_of_the_model():
    """`model_change` as each sidecar records it: the first job's load, a LoRA switch, a reload for another
    quantize, and the jobs after each on the model as it is."""
    import logging
    from dataclasses import replace
    from types import SimpleNamespace

    from orchestrator.job_loop import SlotBackend
    from orchestrator.manifest import ModelConfig, SpeedConfig
    base = ModelConfig(backend="synthetic", task="t2v", loras=(LoraConfig("a", "/x.safetensors", 1.0),))
    half = replace(base, loras=(LoraConfig("a", "/x.safetensors", 0.5),))
    int8 = replace(half, speed=SpeedConfig(quantize="int8"))
    loads = []

    def load(model):
        loads.append(model)
        backend = SyntheticBackend(model, None, ())
        backend.load()
        return backend
    slot = SlotBackend(load, base, logging.getLogger("test"))
    slot.open()
    seen = []
    for model in (base, base, half, half, int8, int8):
        slot.for_job(SimpleNamespace(model=model, key="k"))
        seen.append(slot.last_change)
    assert seen == ["load", "same", "switch", "same", "reload", "same"]
    assert loads == [base, int8]
