"""Step caches (`speed.cache`, issue 31): the manifest's form and its refusals at their lines, the cache in
the job ids and as an axis, and on the tiny random checkpoints: threshold 0 gives the uncached frames, a
permissive one reuses steps and the job's info counts them; MagCache calibrates once and stores it."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from orchestrator.jobs import expand, settings_fingerprint
from orchestrator.manifest import GenerationConfig, ManifestError, ModelConfig
from orchestrator.manifest.model import SpeedConfig, cache_text, parse_cache
from orchestrator.manifest.sections import read_manifest
from orchestrator.validation import load_manifest

from .conftest import backend_job, skip_module_without, synthetic_manifest


def _read(write_manifest, speed=None, axes=None, **overrides):
    data = synthetic_manifest(**overrides)
    if speed is not None:
        data["speed"] = speed
    if axes is not None:
        data["axes"] = axes
    return read_manifest(write_manifest(data))


def _line_of(path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_cache_forms_have_one_canonical_text(write_manifest):
    short = _read(write_manifest, speed={"cache": {"first_block": 0.05}}).model.speed.cache
    long = _read(write_manifest, speed={"cache": {"first_block": {"threshold": 0.05}}}).model.speed.cache
    assert short == long == "first_block:threshold=0.05"
    assert _read(write_manifest, speed={"cache": "none"}).model.speed.cache == "none"
    taylor = _read(write_manifest, speed={"cache": {"taylorseer": {"interval": 4}}}).model.speed.cache
    assert parse_cache(taylor) == ("taylorseer", {"interval": 4, "warmup": 3, "order": 1})
    assert cache_text(*parse_cache(taylor)) == taylor


@pytest.mark.parametrize("cache, words", [
    ({"first_block": 1.5}, "out of range"),
    ({"first_block": -0.1}, "out of range"),
    ({"taylorseer": {"interval": 2.5}}, "out of range"),
    ({"taylorseer": {"speed": 3}}, "has no option 'speed'"),
    ({"teacup": 0.1}, "unknown method 'teacup'"),
    ({"first_block": 0.05, "pab": 2}, "one method"),
])
def test_cache_refusals_are_at_their_line(write_manifest, cache, words):
    path = write_manifest(dict(synthetic_manifest(), speed={"cache": cache}))
    with pytest.raises(ManifestError) as caught:
        read_manifest(path)
    problem, = caught.value.problems
    at = _line_of(path, "cache:")
    assert words in problem.message and at <= problem.line <= at + 1  # `cache:`, or its value's line below


def test_cache_is_part_of_the_identity(write_manifest):
    plain = _read(write_manifest)
    cached = _read(write_manifest, speed={"cache": {"first_block": 0.05}})
    other = _read(write_manifest, speed={"cache": {"first_block": 0.1}})
    ids = [{job.id for job in expand(m)} for m in (plain, cached, other)]
    assert not ids[0] & ids[1] and not ids[1] & ids[2] and not ids[0] & ids[2]
    assert settings_fingerprint(cached)["speed"] == {"cache": "first_block:threshold=0.05"}
    assert "speed" not in settings_fingerprint(plain)  # a manifest without a cache keeps its ids
    job = expand(cached)[0]
    assert job.model is None or job.model.speed.cache == "first_block:threshold=0.05"


def test_cache_axis(write_manifest):
    manifest = _read(write_manifest, axes={"cache": ["none", {"first_block": 0.05}, {"first_block": 0.1}]})
    axis, = manifest.axes
    assert [point["cache"] for point in axis.assignments()] == [
        "none", "first_block:threshold=0.05", "first_block:threshold=0.1"]
    jobs = expand(manifest)
    assert len(jobs) == 3 * len(expand(_read(write_manifest)))
    assert {job.model.speed.cache for job in jobs} == {"none", "first_block:threshold=0.05",
                                                       "first_block:threshold=0.1"}
    round_trip = ModelConfig.from_dict(json.loads(json.dumps(jobs[-1].model.to_dict())))
    assert round_trip == jobs[-1].model


def test_cache_axis_value_refused_at_its_line(write_manifest):
    text = "\n".join(["axes:", "  cache:", "    - none", "    - {first_block: 2}"])
    import yaml
    path = write_manifest(yaml.safe_dump(synthetic_manifest(), sort_keys=False) + text + "\n")
    with pytest.raises(ManifestError) as caught:
        read_manifest(path)
    problem, = caught.value.problems
    assert "axes.cache" in problem.message and problem.line == _line_of(path, "first_block: 2")


def test_command_backend_refuses_a_cache(write_manifest, tmp_path):
    data = synthetic_manifest(model={"backend": "command", "task": "t2v",
                                     "options": {"command": ["python3", "-c", "pass"]}})
    data["speed"] = {"cache": {"first_block": 0.05}}
    path = write_manifest(data)
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    found = [p for p in caught.value.problems if "step cache" in p.message]
    assert found and _line_of(path, "cache:") <= found[0].line <= _line_of(path, "cache:") + 1


# ------------------------------------------------------------------------------------------------
# On the tiny checkpoints

SMALL = dict(width=32, height=32, num_frames=5, fps=5, steps=8)


def _diffusers(path, cfg=5.0):
    from orchestrator.backends.diffusers_wan import DiffusersWanBackend
    backend = DiffusersWanBackend(ModelConfig(backend="diffusers", task="t2v", path=str(path), dtype="float32"),
                                  GenerationConfig(**SMALL, cfg_scale=cfg), ())
    backend.load()
    return backend


def _cached_job(backend, tmp_path, cache: str):
    job = dataclasses.replace(backend_job(), output=str(tmp_path / "out" / "a" / "seed_1_prompt_0.mp4"),
                              name="a/seed_1_prompt_0")
    model = dataclasses.replace(backend.model, speed=SpeedConfig(cache=cache))
    return dataclasses.replace(job, model=model, generation=backend.generation, axes={"cache": cache})


@pytest.mark.slow
def test_diffusers_caches_on_the_tiny_model(random_wan, tmp_path):
    skip_module_without("torch", "diffusers")
    backend = _diffusers(random_wan("t2v"))
    try:
        uncached = backend.generate(_cached_job(backend, tmp_path, "none"), lambda *a: None)
        assert "cache" not in backend.job_info()
        # threshold 0 reuses nothing: the uncached frames exactly
        exact = backend.generate(_cached_job(backend, tmp_path, cache_text("first_block", {"threshold": 0.0})),
                                 lambda *a: None)
        assert np.array_equal(exact, uncached)
        counts = backend.job_info()["cache"]["transformer"]
        assert counts["calls"] == 16 and counts["calls_reused"] == 0
        # a permissive threshold reuses steps, and the job's info counts them
        backend.generate(_cached_job(backend, tmp_path, cache_text("first_block", {"threshold": 1.0})),
                         lambda *a: None)
        counts = backend.job_info()["cache"]["transformer"]
        assert counts["calls"] == 16 and counts["calls_reused"] >= 10
        assert counts["blocks_computed"] < counts["blocks_total"]
        # TaylorSeer's fixed schedule: 3 warm-up steps, then one full step in every 2
        backend.generate(_cached_job(backend, tmp_path, cache_text("taylorseer", {"interval": 2})), lambda *a: None)
        assert backend.job_info()["cache"]["transformer"]["calls_reused"] > 0
        # MagCache: calibrated at its first job, stored beside the compile cache, then read back
        magcache = cache_text("magcache", {"threshold": 0.5})
        backend.generate(_cached_job(backend, tmp_path, magcache), lambda *a: None)
        info = backend.job_info()["cache"]
        assert info["calibration"] == "calibrated" and info["transformer"]["calls"] == 16
        stored = list((tmp_path / "out" / ".sweep" / "compile_cache" / "magcache").glob("*.json"))
        assert len(stored) == 1 and len(json.loads(stored[0].read_text())["mag_ratios"]) == 8
        # back to none: no hooks left, the uncached frames again
        again = backend.generate(_cached_job(backend, tmp_path, "none"), lambda *a: None)
        assert np.array_equal(again, uncached)
    finally:
        backend.close()


@pytest.mark.slow
def test_diffusers_cache_on_both_experts(random_wan, tmp_path):
    skip_module_without("torch", "diffusers")
    backend = _diffusers(random_wan("a14b"))
    try:
        backend.generate(_cached_job(backend, tmp_path, cache_text("first_block", {"threshold": 1.0})),
                         lambda *a: None)
        info = backend.job_info()["cache"]
        high, low = info["steps_per_expert"]["transformer"], info["steps_per_expert"]["transformer_2"]
        assert high + low == 8 and high > 0 and low > 0
        assert info["transformer"]["calls"] == 2 * high and info["transformer_2"]["calls"] == 2 * low
    finally:
        backend.close()


@pytest.mark.slow
@pytest.mark.parametrize("speed, generation, words", [
    ({"cache": {"first_block": 0.05}, "compile": "blocks"}, {}, "torch.compile cannot trace"),
    ({"cache": {"pab": 2}}, {"cfg_scale": 5.0}, "two calls"),
    ({"cache": {"teacache": 0.05}}, {}, "not a cache of the diffusers backend"),
])
def test_diffusers_refusals_are_located(random_wan, write_manifest, speed, generation, words):
    skip_module_without("torch", "diffusers")
    data = synthetic_manifest(model={"backend": "diffusers", "task": "t2v", "path": str(random_wan("t2v")),
                                     "dtype": "float32"}, generation={**SMALL, **generation})
    data["speed"] = speed
    path = write_manifest(data)
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    found = [p for p in caught.value.problems if words in p.message]
    assert found and _line_of(path, "cache:") <= found[0].line <= _line_of(path, "cache:") + 1


@pytest.mark.slow
def test_diffusers_cache_axis_checked_per_value(random_wan, write_manifest):
    skip_module_without("torch", "diffusers")
    data = synthetic_manifest(model={"backend": "diffusers", "task": "t2v", "path": str(random_wan("t2v")),
                                     "dtype": "float32"}, generation=dict(SMALL))
    data["axes"] = {"cache": ["none", {"first_block": 0.05}, {"pab": 2}]}
    path = write_manifest(data)
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    problem, = caught.value.problems
    assert "pab" in problem.message and "axes" in problem.message


@pytest.mark.slow
def test_diffsynth_teacache_on_the_tiny_model(tiny_checkpoint, tmp_path):
    skip_module_without("torch", "diffsynth")
    from orchestrator.backends.diffsynth_wan import DiffSynthWanBackend
    backend = DiffSynthWanBackend(ModelConfig(backend="diffsynth", task="t2v", path=str(tiny_checkpoint("t2v")),
                                              dtype="float32"), GenerationConfig(**SMALL, cfg_scale=1.0), ())
    backend.load()
    try:
        # (threshold 0 is not "nothing reused" here: DiffSynth rescales each change by a fitted polynomial,
        # which is negative for small changes, so its accumulated distance can stay below 0)
        backend.generate(_cached_job(backend, tmp_path, "none"), lambda *a: None)
        assert "cache" not in backend.job_info()
        backend.generate(_cached_job(backend, tmp_path, cache_text("teacache", {"threshold": 1.0})), lambda *a: None)
        info = backend.job_info()["cache"]
        assert info["model_id"] == "Wan2.1-T2V-1.3B" and info["dit"]["calls_reused"] > 0
    finally:
        backend.close()
