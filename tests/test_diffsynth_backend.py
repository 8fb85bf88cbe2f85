"""The diffsynth backend on a TINY random-weight Wan model, on the CPU.

The tiny model is built from DiffSynth's own component classes (WanModel, WanTextEncoder, the Wan VAE)
with tiny configurations and saved in the original Wan file layout. DiffSynth's loader recognises a
model file by a fingerprint of its tensor names and shapes, which tiny files cannot match, so the tiny
folder carries a marker naming the classes; the backend then loads each file through DiffSynth's same
loading code minus that recognition. What CI cannot exercise is the recognition of real files by
DiffSynth's loader (`bench/gpu_diffsynth.sh` does, with full-size random weights); the pre-start check's
fingerprint is compared here with DiffSynth's `hash_model_file` instead, on the tiny files and on a
header-only (sparse) file with the real Wan2.1-T2V-1.3B DiT's names and shapes.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from orchestrator.backend import OutOfMemory
from orchestrator.manifest import GenerationConfig, ManifestError, ModelConfig
from orchestrator.validation import load_manifest
from orchestrator.outputs import count_frames, write_mp4

from .conftest import header_only_safetensors

from .conftest import PATIENCE_S, LazyModule, backend_job as _job, cli, skip_module_without, synthetic_manifest

skip_module_without("torch", "diffsynth")
torch = LazyModule("torch")  # imported by the first test that uses it, not at collection
pytestmark = pytest.mark.slow  # the real pipelines (even the quick tests here import the library: seconds)

GEN = dict(width=32, height=32, num_frames=5, fps=5, steps=2)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return tiny_checkpoint("t2v")  # built once per session (conftest)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Two different 7-frame 48×40 reference videos (resized and cropped to 32×32, trimmed to 5)."""
    folder = tmp_path_factory.mktemp("clips")
    rng = np.random.RandomState(0)
    paths = []
    for name in ("a", "b"):
        frames = rng.randint(0, 255, (7, 40, 48, 3)).astype(np.uint8)
        paths.append(write_mp4(frames, folder / f"{name}.mp4", fps=5, expected_frames=7))
    return paths


def _backend(path, task="t2v", **options):
    from orchestrator.backends.diffsynth_wan import DiffSynthWanBackend
    generation = GenerationConfig(**GEN, denoising_strength=0.7 if task == "v2v" else 1.0)
    backend = DiffSynthWanBackend(ModelConfig(backend="diffsynth", task=task, path=str(path), dtype="float32",
                                              options=options), generation, ())
    backend.load()
    return backend


def test_t2v_frames_seeds_steps_prompt_cache_and_sidecar_facts(tiny):
    backend = _backend(tiny)
    assert backend.load_info["components"].keys() >= {"dit", "text_encoder", "vae"}
    assert backend.load_info["model_files"]["weights"]["models_t5_umt5-xxl-enc-bf16.pth"] > 0
    steps = []
    a = backend.generate(_job(seed=1), lambda s, n: steps.append((s, n)))
    assert a.shape == (5, 32, 32, 3) and a.dtype == np.uint8
    assert steps == [(1, 2), (2, 2)]
    info = backend.job_info()
    assert info["prompt_encodings"] == 2 and not info["prompt_cache_hit"]  # prompt and negative prompt
    assert info["steps"] == 2 and info["seconds_per_step"] > 0 and info["timeline"]["returned"] > 0
    b = backend.generate(_job(seed=1), lambda s, n: None)
    assert backend.job_info()["prompt_cache_hit"] and backend.job_info()["prompt_encodings"] == 0
    c = backend.generate(_job(seed=2), lambda s, n: None)
    d = backend.generate(_job("a dog", seed=1), lambda s, n: None)
    assert backend.job_info()["prompt_encodings"] == 1  # only the new prompt; the negative one is cached
    assert np.array_equal(a, b) and not np.array_equal(a, c) and not np.array_equal(a, d)
    backend.close()
    # a fresh worker (empty caches) makes the same frames for the same job
    assert np.array_equal(_backend(tiny).generate(_job(seed=1), lambda s, n: None), a)


def test_v2v_follows_the_reference_and_encodes_each_reference_once(tiny, clips):
    backend = _backend(tiny, task="v2v", tile_size=[3, 3], tile_stride=[2, 2])  # 4 overlapping tiles
    encodes = []
    vae_encode = backend.pipe.vae.encode
    backend.pipe.vae.encode = lambda *a, **k: encodes.append(1) or vae_encode(*a, **k)
    backend.prepare(_job(reference=clips[0]))  # read ahead, as the worker does while another job runs
    first = backend.generate(_job(seed=1, reference=clips[0]), lambda s, n: None)
    assert first.shape == (5, 32, 32, 3) and backend.job_info()["reference_encoding_reused"] is False
    again = backend.generate(_job(seed=1, reference=clips[0]), lambda s, n: None)
    other_seed = backend.generate(_job(seed=2, reference=clips[0]), lambda s, n: None)
    assert backend.job_info()["reference_encoding_reused"] is True
    other_clip = backend.generate(_job(seed=1, reference=clips[1]), lambda s, n: None)
    assert len(encodes) == 2  # one VAE encoding per reference video, not per job
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other_seed) and not np.array_equal(first, other_clip)
    backend.close()
    fresh = _backend(tiny, task="v2v", tile_size=[3, 3], tile_stride=[2, 2])
    assert np.array_equal(fresh.generate(_job(seed=1, reference=clips[0]), lambda s, n: None), first)


def test_cuda_out_of_memory_becomes_out_of_memory(tiny):
    backend = _backend(tiny)

    def boom(**kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    backend.pipe = boom
    with pytest.raises(OutOfMemory, match="CUDA out of memory"):
        backend.generate(_job(), lambda s, n: None)


def test_check_fingerprint_matches_diffsynths_and_recognises_a_real_layout_dit(tiny, tmp_path):
    """The pre-start check's fingerprint equals DiffSynth's own hash, and finds a (header-only) real
    Wan2.1-T2V-1.3B DiT in DiffSynth's table; tiny files without their marker are not recognised."""
    from diffsynth.core.loader.file import hash_model_file
    from diffsynth.models.wan_video_dit import WanModel

    from orchestrator.backends.diffsynth_files import diffsynth_model_table, dit_kind, fingerprint, identify, model_files
    files, problems = model_files(tiny)
    assert not problems
    for file in (files["dit"][0], files["text_encoder"], files["vae"]):
        assert fingerprint(file) == hash_model_file(file)

    entry = next(c for c in diffsynth_model_table() if c.get("model_hash") == "9269f8db9040a9d860eaca435be61814")
    with torch.device("meta"):
        shapes = {k: list(v.shape) for k, v in WanModel(**entry["extra_kwargs"]).state_dict().items()}
    real = tmp_path / "real"
    shutil.copytree(tiny, real)
    (real / "wan_sweep_tiny_random.json").unlink()
    dit = header_only_safetensors(real / "diffusion_pytorch_model.safetensors", shapes)  # 2.8 GB on paper
    assert fingerprint(str(dit)) == hash_model_file(str(dit)) == entry["model_hash"]
    found = identify(model_files(real)[0], str(real))
    assert found["dit"][0]["extra_kwargs"]["dim"] == 1536 and dit_kind(found["dit"][0]) == "t2v"
    assert found["text_encoder"] is None and found["vae"] is None  # tiny files: not DiffSynth's models


def test_one_header_reader_gives_flat_names_to_the_checks_and_the_nesting_to_the_fingerprint(tmp_path):
    """checkpoints.files is the one reader of .pth headers: the checkpoint checks get dotted names, the
    fingerprint the state dict's nesting, and the fingerprint stays DiffSynth's own hash for nested and
    wrapped state dicts, parameters and tensors carrying Python state."""
    from diffsynth.core.loader.file import hash_model_file

    from orchestrator.backends.diffsynth_files import fingerprint
    from orchestrator.checkpoints.files import read_weight_file

    noted = torch.zeros(3)
    noted.note = "a tensor with Python state"  # pickled through torch._tensor._rebuild_from_type_v2
    nested = {"blocks": {"0": {"weight": torch.zeros(2, 3)}, "1": {"weight": torch.zeros(4)}},
              "head.bias": torch.nn.Parameter(torch.zeros(5)), "noted": noted}
    for name, state in (("nested", nested), ("wrapped", {"state_dict": nested}), ("flat", {"w": torch.zeros(1)})):
        torch.save(state, tmp_path / f"{name}.pth")
        assert fingerprint(str(tmp_path / f"{name}.pth")) == hash_model_file(str(tmp_path / f"{name}.pth"))
    weights = read_weight_file(tmp_path / "nested.pth")
    assert weights.tensors == {"blocks.0.weight": ("F32", (2, 3)), "blocks.1.weight": ("F32", (4,)),
                               "head.bias": ("F32", (5,)), "noted": ("F32", (3,))}
    assert weights.tree == {"blocks": {"0": {"weight": ("F32", (2, 3))}, "1": {"weight": ("F32", (4,))}},
                            "head.bias": ("F32", (5,)), "noted": ("F32", (3,))}


def _manifest(tiny, task="t2v", **overrides):
    data = synthetic_manifest(
        model={"backend": "diffsynth", "task": task, "path": str(tiny), "dtype": "float32",
               "options": {"tiled": True, "prompt_cache": 8}},
        generation={**GEN, "denoising_strength": 0.7} if task == "v2v" else dict(GEN),
        categories={"cam": {"videos": "refs/cam/*.mp4", "prompts": ["a cat on a mat"]}} if task == "v2v"
        else {"alpha": {"prompts": ["a cat on a mat"]}},
        resources={"cpu_slots": 1}, execution={"job_timeout_s": PATIENCE_S, "heartbeat_timeout_s": 120})
    for key, value in overrides.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    return data


def _lines(text: str, *needles: str) -> dict[str, int]:
    return {n: next(i for i, line in enumerate(text.splitlines(), 1) if n in line) for n in needles}


def test_problems_are_reported_at_their_manifest_line(write_manifest, tiny, tmp_path, make_refs):
    make_refs("cam", ["a"])
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    (broken / "models_t5_umt5-xxl-enc-bf16.pth").unlink()
    data = _manifest(broken, task="v2v", generation={"num_frames": 8, "denoising_strength": 1.0,
                                                     "cfg_scale": [3.0, 4.0], "extra": {"sigma_shift": 3}})
    data["model"]["options"].update(turbo=True, tile_size=[2, 2], tile_stride=[3, 3])
    path = write_manifest(data)
    with pytest.raises(ManifestError) as error:
        load_manifest(path)
    text = path.read_text(encoding="utf-8")
    at = {p.message: p.line for p in error.value.problems}
    lines = _lines(text, "num_frames:", "path:", "turbo:", "denoising_strength:", "sigma_shift:", "tile_stride:",
                   "cfg_scale:")

    def line_of(fragment):
        return next(line for message, line in at.items() if fragment in message)
    assert line_of("not of the form 4n+1") == lines["num_frames:"]
    assert line_of("models_t5_umt5-xxl-enc-bf16.pth") == lines["path:"]
    assert line_of("unknown diffsynth option `turbo`") == lines["turbo:"]
    assert line_of("replaces the reference video entirely") == lines["denoising_strength:"]
    assert line_of("generation.extra.sigma_shift is not") == lines["sigma_shift:"]
    assert line_of("applies one scale to both experts") in (lines["cfg_scale:"], lines["cfg_scale:"] + 1)
    # a block list's problem sits at its key's line or (as its value node) the line below
    assert line_of("larger than tile_size") in (lines["tile_stride:"], lines["tile_stride:"] + 1)


def test_check_refuses_a_model_that_cannot_run_the_task(write_manifest, tiny, tmp_path, make_refs):
    make_refs("cam", ["a"])
    data = _manifest(tiny, task="i2v")
    data["categories"] = {"cam": {"images": "refs/cam/*.png", "prompts": ["x"]}}
    from PIL import Image
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "refs" / "cam" / "a.png")
    unknown = tmp_path / "unknown"
    shutil.copytree(tiny, unknown)
    (unknown / "wan_sweep_tiny_random.json").unlink()
    with pytest.raises(ManifestError) as error:
        load_manifest(write_manifest(data))
    assert "the DiT in" in str(error.value) and "task i2v needs" in str(error.value)
    with pytest.raises(ManifestError) as error:
        load_manifest(write_manifest(_manifest(unknown)))
    assert "is not one DiffSynth recognises" in str(error.value)


def test_v2v_sweep_through_the_cli_writes_valid_mp4s(write_manifest, tmp_path, tiny, make_refs):
    make_refs("cam", ["a", "b"])
    data = _manifest(tiny, task="v2v")
    data["seeds"] = [1, 2]
    path = write_manifest(data)
    result = cli("run", str(path), "--executor", "local", "--no-progress")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "out"
    mp4s = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.mp4"))
    assert mp4s == [f"cam/{v}/seed_{s}_prompt_0.mp4" for v in "ab" for s in (1, 2)]
    assert all(count_frames(out / p) == 5 for p in mp4s)
    sidecar = json.loads((out / "cam" / "b" / "seed_2_prompt_0.json").read_text(encoding="utf-8"))
    assert sidecar["model"]["backend"] == "diffsynth" and "diffsynth" in sidecar["versions"]
    assert sidecar["settings"]["options"] == {"tiled": True}  # prompt_cache does not change pixels
    assert sidecar["load"]["backend"] == "diffsynth" and sidecar["load"]["components"]["dit"] >= 0
    assert "models_t5_umt5-xxl-enc-bf16.pth" in sidecar["load"]["model_files"]["weights"]
    assert sidecar["steps"] == 2 and sidecar["seconds_per_step"] > 0
    # one worker: each video is VAE-encoded once and the one prompt (and the negative) encoded once
    cars = [json.loads((out / p).with_suffix(".json").read_text(encoding="utf-8")) for p in mp4s]
    assert sum(bool(c["reference_encoding_reused"]) for c in cars) == 2
    assert sum(c["prompt_encodings"] for c in cars) == 2


def test_wan22_two_expert_layout_and_named_files(tiny, tmp_path):
    """high_noise_model/ + low_noise_model/ load as DiffSynth's dit and dit2 (high noise first);
    model_files names other files, and a missing one is named."""
    from orchestrator.backends.diffsynth_files import model_files
    a14b = tmp_path / "a14b"
    shutil.copytree(tiny, a14b)
    for expert in ("high_noise_model", "low_noise_model"):
        (a14b / expert).mkdir()
        shutil.copy(a14b / "diffusion_pytorch_model.safetensors", a14b / expert)
    (a14b / "diffusion_pytorch_model.safetensors").unlink()
    files, problems = model_files(a14b)
    assert not problems and [Path(d[0]).parent.name for d in files["dit"]] == ["high_noise_model", "low_noise_model"]
    backend = _backend(a14b)
    assert backend.pipe.dit is not None and backend.pipe.dit2 is not None and backend.pipe.dit is not backend.pipe.dit2
    assert backend.generate(_job(), lambda s, n: None).shape == (5, 32, 32, 3)

    files, problems = model_files(a14b, {"model_files": {"dit": "low_noise_model/*.safetensors", "vae": "nope.pth"}})
    assert len(files["dit"]) == 1 and files["dit"][0][0].endswith("low_noise_model/diffusion_pytorch_model.safetensors")
    assert [(p.key, "nope.pth" in p.message) for p in problems] == [("model.options.model_files.vae", True)]


def test_i2v_starts_from_the_image_and_encodes_each_image_once(tmp_path):
    """A tiny image-to-video DiT in the manner of Wan2.2 I2V-A14B (36 input channels, no CLIP)."""
    from PIL import Image

    from orchestrator.demo.random_checkpoints import build_tiny_checkpoint
    folder = build_tiny_checkpoint(tmp_path / "i2v", task="i2v")
    images = []
    for name, level in (("dark", 30), ("light", 220)):
        Image.fromarray(np.full((40, 48, 3), level, dtype=np.uint8)).save(tmp_path / f"{name}.png")
        images.append(tmp_path / f"{name}.png")
    backend = _backend(folder, task="i2v")
    encodes = []
    vae_encode = backend.pipe.vae.encode
    backend.pipe.vae.encode = lambda *a, **k: encodes.append(1) or vae_encode(*a, **k)
    first = backend.generate(_job(seed=1, reference=images[0]), lambda s, n: None)
    again = backend.generate(_job(seed=1, reference=images[0]), lambda s, n: None)
    assert backend.job_info()["reference_encoding_reused"] is True
    other = backend.generate(_job(seed=1, reference=images[1]), lambda s, n: None)
    assert len(encodes) == 2 and np.array_equal(first, again) and not np.array_equal(first, other)
    assert np.array_equal(_backend(folder, task="i2v").generate(_job(seed=1, reference=images[0]),
                                                                lambda s, n: None), first)
