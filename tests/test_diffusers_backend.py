"""The diffusers Wan backend on a TINY random-weight pipeline (built offline, run on the CPU)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from orchestrator.backends import OutOfMemory
from orchestrator.jobs import Job
from orchestrator.manifest import GenerationConfig, ManifestError, ModelConfig, load_manifest
from orchestrator.outputs import count_frames

from .conftest import cli, synthetic_manifest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from orchestrator.backends.diffusers_wan import build_random_wan
    return build_random_wan(tmp_path_factory.mktemp("wan") / "tiny-wan", size="tiny")


def _backend(path, **options):
    from orchestrator.backends.diffusers_wan import DiffusersWanBackend
    backend = DiffusersWanBackend(ModelConfig(backend="diffusers", task="t2v", path=str(path), dtype="float32",
                                              options=options),
                                  GenerationConfig(width=32, height=32, num_frames=5, fps=5, steps=2), ())
    backend.load()
    return backend


def _job(prompt="a cat on a mat", seed=1):
    return Job(id=f"{prompt}-{seed}", ordinal=0, category="a", stem=None, reference=None, prompt_index=0,
               prompt=prompt, seed=seed, output="/nonexistent/x.mp4")


def test_frames_seeds_progress_and_prompt_cache(tiny_checkpoint):
    backend = _backend(tiny_checkpoint, vae_tiling=True)
    assert backend.pipe.vae.use_tiling
    calls = []
    encode = backend.pipe.encode_prompt
    # the pipeline calls encode_prompt too, with our embeddings and prompt=None: count real encodings
    backend.pipe.encode_prompt = lambda **kw: (kw.get("prompt") and calls.append(kw["prompt"])) or encode(**kw)
    steps = []
    a = backend.generate(_job(seed=1), lambda s, n: steps.append((s, n)))
    assert a.shape == (5, 32, 32, 3) and a.dtype == np.uint8
    assert steps == [(1, 2), (2, 2)]
    b = backend.generate(_job(seed=1), lambda s, n: None)
    c = backend.generate(_job(seed=2), lambda s, n: None)
    assert np.array_equal(a, b) and not np.array_equal(a, c)  # the seed decides the video
    assert calls == ["a cat on a mat"]  # embeddings computed once for the prompt's seeds
    backend.generate(_job("a dog", 1), lambda s, n: None)
    assert calls == ["a cat on a mat", "a dog"]
    assert backend.peak_memory_bytes() is None  # no CUDA here


def test_cuda_out_of_memory_becomes_out_of_memory(tiny_checkpoint):
    backend = _backend(tiny_checkpoint)

    def boom(**kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    backend.pipe.__class__ = type("Boom", (backend.pipe.__class__,), {"__call__": lambda self, **kw: boom(**kw)})
    with pytest.raises(OutOfMemory, match="CUDA out of memory"):
        backend.generate(_job(), lambda s, n: None)


def test_check_rejects_other_tasks_options_and_missing_checkpoints(write_manifest, tmp_path, tiny_checkpoint, make_refs):
    make_refs("cam", ["a"])
    data = synthetic_manifest(model={"backend": "diffusers", "task": "v2v", "path": str(tmp_path / "nowhere"),
                                     "options": {"offload": "sometimes", "turbo": True}},
                              categories={"cam": {"videos": "refs/cam/*.mp4", "prompts": ["x"]}})
    with pytest.raises(ManifestError) as error:
        load_manifest(write_manifest(data))
    text = str(error.value)
    assert "text-to-video (task: t2v) only for now; task `v2v`" in text
    assert "is not a local diffusers checkpoint folder" in text
    assert "diffusers option `offload` is 'sometimes'" in text and "unknown diffusers option `turbo`" in text


def test_sweep_through_the_cli_writes_valid_mp4s(write_manifest, tmp_path, tiny_checkpoint):
    path = write_manifest(synthetic_manifest(
        model={"backend": "diffusers", "task": "t2v", "path": str(tiny_checkpoint), "dtype": "float32",
               "options": {"vae_tiling": True, "vae_slicing": True, "prompt_cache": 8}},
        generation={"width": 32, "height": 32, "num_frames": 5, "fps": 5, "steps": 2},
        seeds=[1, 2], categories={"alpha": {"prompts": ["a cat on a mat"]}, "beta": {"prompts": ["a dog"]}},
        resources={"cpu_slots": 1}))
    result = cli("run", str(path), "--executor", "local", "--no-progress", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / "out"
    mp4s = sorted(p for p in out.rglob("*.mp4"))
    assert [p.relative_to(out).as_posix() for p in mp4s] == [
        "alpha/seed_1_prompt_0.mp4", "alpha/seed_2_prompt_0.mp4", "beta/seed_1_prompt_0.mp4", "beta/seed_2_prompt_0.mp4"]
    assert all(count_frames(p) == 5 for p in mp4s)
    sidecar = json.loads((out / "alpha" / "seed_2_prompt_0.json").read_text(encoding="utf-8"))
    assert sidecar["model"]["backend"] == "diffusers" and "diffusers" in sidecar["versions"]
    assert sidecar["settings"]["options"] == {"vae_tiling": True}  # the others do not change pixels
