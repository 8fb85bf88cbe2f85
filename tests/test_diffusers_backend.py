"""The diffusers Wan backend on TINY random-weight checkpoints of every Wan family (a fake of real
weights, built offline and saved to disk, then loaded through the backend's own code on the CPU)."""
from __future__ import annotations

import json

import av
import yaml
import numpy as np
import pytest

from orchestrator.backend import OutOfMemory
from orchestrator.manifest import GenerationConfig, ManifestError, ModelConfig
from orchestrator.validation import load_manifest
from orchestrator.outputs import count_frames, write_mp4

from .conftest import LazyModule, backend_job as _job, cli, skip_module_without, synthetic_manifest

skip_module_without("torch", "diffusers")
torch = LazyModule("torch")  # imported by the first test that uses it, not at collection
pytestmark = pytest.mark.slow  # the real pipelines (even the quick tests here import the library: seconds)

SMALL = dict(width=32, height=32, num_frames=5, fps=5, steps=2)


@pytest.fixture(scope="module")
def checkpoints(random_wan):
    """variant → folder, built once per session (conftest; a few seconds each)."""
    return random_wan


@pytest.fixture(scope="module")
def reference_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("refs")
    rng = np.random.default_rng(0)
    video = write_mp4(rng.integers(0, 255, (9, 48, 64, 3), dtype=np.uint8), root / "clip.mp4", fps=5,
                      expected_frames=9)
    image = root / "still.png"
    _write_png(image, rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    return {"video": video, "image": image}


def _write_png(path, pixels):
    frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
    with av.open(str(path), "w", format="image2") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = pixels.shape[1], pixels.shape[0], "rgb24"
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _backend(path, task="t2v", generation=None, **options):
    from orchestrator.backends.diffusers_wan import DiffusersWanBackend
    backend = DiffusersWanBackend(ModelConfig(backend="diffusers", task=task, path=str(path), dtype="float32",
                                              options=options), generation or GenerationConfig(**SMALL), ())
    backend.load()
    return backend


def test_frames_seeds_progress_and_prompt_cache(checkpoints):
    backend = _backend(checkpoints("t2v"), vae_tiling=True)
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
    assert backend.job_info()["prompt_cache_hit"] is True
    backend.generate(_job("a dog", 1), lambda s, n: None)
    assert calls == ["a cat on a mat", "a dog"]
    info = backend.job_info()
    assert info["steps"] == 2 and info["seconds_per_step"] > 0 and info["prompt_cache_hit"] is False
    assert backend.peak_memory_bytes() is None  # no CUDA here
    assert set(backend.load_info["components"]) >= {"transformer", "vae", "text_encoder", "tokenizer"}
    assert backend.load_info["model_files"]["configs_sha256"]["model_index.json"]


@pytest.mark.parametrize("variant,task,pipeline", [
    ("i2v", "i2v", "WanImageToVideoPipeline"),        # Wan2.1 I2V with its CLIP image encoder
    ("a14b", "t2v", "WanPipeline"),                   # Wan2.2 T2V-A14B: two experts
    ("a14b-i2v", "i2v", "WanImageToVideoPipeline"),   # Wan2.2 I2V-A14B
    ("ti2v", "t2v", "WanPipeline"),                   # Wan2.2 TI2V-5B, text only
    ("ti2v", "i2v", "WanImageToVideoPipeline"),       # TI2V-5B from a first frame
    ("t2v", "v2v", "WanVideoToVideoPipeline"),        # motion transfer on a Wan2.1 T2V checkpoint
])
def test_every_family_loads_and_a_rerun_gives_the_same_frames(checkpoints, reference_files, variant, task, pipeline):
    cfg = [4.0, 3.0] if variant.startswith("a14b") else 5.0
    generation = GenerationConfig(**SMALL, cfg_scale=cfg, denoising_strength=0.5 if task == "v2v" else 1.0,
                                  shift=5.0)
    backend = _backend(checkpoints(variant), task, generation)
    assert type(backend.pipe).__name__ == pipeline and backend.load_info["pipeline"] == pipeline
    assert backend.two_experts == variant.startswith("a14b")
    assert backend.pipe.scheduler.config.flow_shift == 5.0
    reference = {"i2v": reference_files["image"], "v2v": reference_files["video"]}.get(task)
    first = backend.generate(_job(reference=reference), lambda s, n: None)
    again = backend.generate(_job(reference=reference), lambda s, n: None)
    other = backend.generate(_job(reference=reference, seed=7), lambda s, n: None)
    assert first.shape == (5, 32, 32, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    if task == "v2v":
        assert backend.job_info()["steps"] == 1  # int(2 steps × strength 0.5)
        assert backend.job_info()["reference_encoding_reused"] is True


def test_v2v_reuses_the_encoded_reference_and_matches_the_pipelines_own_path(checkpoints, reference_files):
    from PIL import Image
    generation = GenerationConfig(**{**SMALL, "steps": 4}, denoising_strength=0.75)
    backend = _backend(checkpoints("t2v"), "v2v", generation)
    encodes = []
    vae_encode = backend.pipe.vae.encode
    backend.pipe.vae.encode = lambda *a, **k: encodes.append(1) or vae_encode(*a, **k)
    ours = backend.generate(_job(reference=reference_files["video"], seed=3), lambda s, n: None)
    backend.generate(_job("another prompt", reference=reference_files["video"], seed=4), lambda s, n: None)
    assert len(encodes) == 1  # one VAE encoding for every job of the video
    frames = [Image.fromarray(f) for f in backend.references.video(reference_files["video"])]
    positive, negative = backend._embed("a cat on a mat", "", True)
    theirs = backend.pipe(video=frames, prompt_embeds=positive, negative_prompt_embeds=negative, height=32, width=32,
                          num_inference_steps=4, strength=0.75, guidance_scale=5.0, output_type="np",
                          generator=torch.Generator().manual_seed(3)).frames[0]
    theirs = (np.clip(theirs, 0, 1) * 255).round().astype(np.uint8)
    assert np.array_equal(ours, theirs)


def test_i2v_caches_the_image_embedding(checkpoints, reference_files):
    backend = _backend(checkpoints("i2v"), "i2v")
    calls = []
    backend.pipe.image_encoder.register_forward_hook(lambda *args: calls.append(1))
    for seed in (1, 2, 3):
        backend.generate(_job(reference=reference_files["image"], seed=seed), lambda s, n: None)
    assert len(calls) == 1


def test_parallel_and_sequential_loading_give_the_same_model(checkpoints):
    parallel = _backend(checkpoints("t2v"))
    sequential = _backend(checkpoints("t2v"), parallel_load=False)
    assert parallel.load_info["parallel_load"] and not sequential.load_info["parallel_load"]
    assert np.array_equal(parallel.generate(_job(), lambda s, n: None), sequential.generate(_job(), lambda s, n: None))


def test_cuda_out_of_memory_becomes_out_of_memory(checkpoints):
    backend = _backend(checkpoints("t2v"))

    def boom(**kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    backend.pipe.__class__ = type("Boom", (backend.pipe.__class__,), {"__call__": lambda self, **kw: boom(**kw)})
    with pytest.raises(OutOfMemory, match="CUDA out of memory"):
        backend.generate(_job(), lambda s, n: None)


def _problems(write_manifest, data) -> dict[str, int]:
    with pytest.raises(ManifestError) as error:
        load_manifest(write_manifest(data))
    return {p.message: p.line for p in error.value.problems}


def test_check_reports_each_problem_at_its_manifest_line(write_manifest, checkpoints, make_refs):
    make_refs("cam", ["a"])
    text = f"""\
name: t
output_dir: out
model:
  backend: diffusers
  task: v2v
  path: {checkpoints("a14b")}
  options:
    offload: sometimes
    turbo: true
generation:
  width: 40
  height: 32
  num_frames: 5
  cfg_scale: [4.0, 3.0]
seeds: [1]
categories:
  cam: {{videos: refs/cam/*.mp4, prompts: [x]}}
"""
    problems = _problems(write_manifest, text)
    lines = {message.split(" ")[0] + "…": line for message, line in problems.items()}
    assert any("WanVideoToVideoPipeline runs single-expert" in m and line == 5 for m, line in problems.items())
    assert problems["diffusers option `offload` is 'sometimes'"] == 8
    assert problems["unknown diffusers option `turbo`"] == 9
    assert problems["generation.width is 40; this checkpoint needs a multiple of 16"] == 11
    assert lines


def test_check_knows_what_each_checkpoint_accepts(write_manifest, checkpoints, tmp_path, make_refs):
    make_refs("stills", ["a"], suffix=".png")  # content is irrelevant: the task mismatch is found first
    t2v_with_pair = synthetic_manifest(model={"backend": "diffusers", "task": "t2v", "path": str(checkpoints("t2v"))},
                                       generation={**SMALL, "cfg_scale": [4.0, 3.0]})
    assert "cfg_scale is a pair, but this checkpoint has one expert" in _problems(write_manifest, t2v_with_pair)
    ti2v_size = synthetic_manifest(model={"backend": "diffusers", "task": "t2v", "path": str(checkpoints("ti2v"))},
                                   generation={**SMALL, "width": 48})
    assert "generation.width is 48; this checkpoint needs a multiple of 32" in _problems(write_manifest, ti2v_size)
    missing = synthetic_manifest(model={"backend": "diffusers", "task": "t2v", "path": str(tmp_path / "nowhere")})
    assert any("is not a local diffusers checkpoint folder" in m for m in _problems(write_manifest, missing))
    i2v_on_t2v = synthetic_manifest(model={"backend": "diffusers", "task": "t2v", "path": str(checkpoints("i2v"))})
    assert any("is an image-to-video checkpoint" in m for m in _problems(write_manifest, i2v_on_t2v))


@pytest.mark.parametrize("task", ["t2v", "v2v", "i2v"])
def test_sweep_through_the_cli_writes_valid_mp4s(write_manifest, tmp_path, checkpoints, reference_files, task):
    import shutil
    refs = tmp_path / "refs"
    refs.mkdir()
    categories = {"alpha": {"prompts": ["a cat on a mat", "a dog"]}}
    if task == "v2v":
        for stem in ("one", "two"):
            shutil.copy(reference_files["video"], refs / f"{stem}.mp4")
        categories = {"alpha": {"videos": "refs/*.mp4", "prompts": ["a cat on a mat", "a dog"]}}
    if task == "i2v":
        shutil.copy(reference_files["image"], refs / "one.png")
        categories = {"alpha": {"images": "refs/*.png", "prompts": ["a cat on a mat", "a dog"]}}
    checkpoint = checkpoints({"t2v": "t2v", "v2v": "t2v", "i2v": "ti2v"}[task])
    path = write_manifest(synthetic_manifest(
        model={"backend": "diffusers", "task": task, "path": str(checkpoint), "dtype": "float32",
               "options": {"vae_tiling": True, "vae_slicing": True, "prompt_cache": 8}},
        generation={**SMALL, "steps": 4 if task == "v2v" else 2, "denoising_strength": 0.5}, seeds=[1, 2],
        categories=categories,
        resources={"cpu_slots": 1}))
    result = cli("run", str(path), "--executor", "local", "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / "out"
    mp4s = sorted(out.rglob("*.mp4"))
    assert len(mp4s) == {"t2v": 4, "v2v": 8, "i2v": 4}[task]
    assert all(count_frames(p) == 5 for p in mp4s)
    sidecar = json.loads(mp4s[-1].with_suffix(".json").read_text(encoding="utf-8"))
    assert sidecar["backend"] == "diffusers" and "diffusers" in sidecar["versions"]
    assert sidecar["settings"]["options"] == {"vae_tiling": True}  # the others do not change pixels
    assert sidecar["load"]["load_seconds"] > 0 and "transformer" in sidecar["load"]["components"]
    assert sidecar["load"]["model_files"]["weights"]  # names and sizes of the weight files
    assert sidecar["seconds_per_step"] > 0 and sidecar["steps"] == 2  # v2v: 4 steps × strength 0.5
    log = (out / "logs" / "cpu0_worker0.log").read_text(encoding="utf-8")
    assert "model loaded in" in log and "transformer" in log


def test_the_demo_checkpoint_is_built_beside_the_manifest_not_the_working_directory(tmp_path, monkeypatch):
    # `model.path: ../models/random-tiny-wan-t2v` (the demo's) names a folder relative to the manifest.
    (tmp_path / "experiments").mkdir()
    elsewhere = tmp_path / "elsewhere" / "cwd"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    manifest = tmp_path / "experiments" / "demo.yaml"
    manifest.write_text(yaml.safe_dump(synthetic_manifest(
        model={"backend": "diffusers", "task": "t2v", "path": "../models/random-tiny-wan-t2v", "dtype": "float32"})),
        encoding="utf-8")
    loaded = load_manifest(manifest)
    built = tmp_path / "models" / "random-tiny-wan-t2v"
    assert loaded.model.path == str(built) and (built / "model_index.json").is_file()
    assert not (tmp_path / "elsewhere" / "models").exists()
