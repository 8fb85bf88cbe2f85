"""Wan's conditioned tasks (vace, control, animate, s2v) in the real model backends, on the CPU.

Each backend loads a tiny random-weight checkpoint of the task's release layout through its real loading
code (DiffSynth's loader and converters: the VACE blocks and the Animate adapter split out of the DiT's
own file, the S2V DiT class and its wav2vec2 audio-encoder folder), and the job's inputs (`Job.inputs`)
must reach the pipeline: the frames change when an input changes, and an input encoded once per worker
serves every job that uses it. `models status` names the part a checkpoint lacks for its task.
"""
from __future__ import annotations

import json
import shutil
import wave
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from orchestrator.manifest import GenerationConfig, ModelConfig
from orchestrator.outputs import write_mp4

from .conftest import header_only_safetensors

from .conftest import PATIENCE_S, LazyModule, backend_job, skip_module_without

skip_module_without("torch", "diffsynth")
torch = LazyModule("torch")  # imported by the first test that uses it, not at collection
pytestmark = pytest.mark.slow  # the real pipelines (even the quick tests here import the library: seconds)

GEN = dict(width=32, height=32, num_frames=5, fps=16, steps=2)


def _job(reference, seed=1, prompt="a cat on a mat", **inputs):
    return replace(backend_job(prompt, seed, reference), output=f"/out/a/s/seed_{seed}_prompt_0.mp4",
                   inputs={k: str(v) for k, v in inputs.items()})


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Two different clips, two images and two speech-like audio files (1 s of tones at 16 kHz)."""
    from PIL import Image
    folder = tmp_path_factory.mktemp("media")
    rng = np.random.RandomState(0)
    made = {}
    for name in ("a", "b"):
        made[f"clip_{name}"] = write_mp4(rng.randint(0, 255, (7, 32, 32, 3)).astype(np.uint8),
                                         folder / f"{name}.mp4", fps=16, expected_frames=7)
        image = folder / f"{name}.png"
        Image.fromarray(rng.randint(0, 255, (40, 48, 3)).astype(np.uint8)).save(image)
        made[f"image_{name}"] = image
        audio = folder / f"{name}.wav"
        t = np.arange(16000) / 16000
        tone = 0.5 * np.sin(2 * np.pi * (220 if name == "a" else 660) * t) * np.sign(np.sin(2 * np.pi * 3 * t))
        with wave.open(str(audio), "wb") as out:
            out.setnchannels(1), out.setsampwidth(2), out.setframerate(16000)
            out.writeframes((tone * 32767).astype("<i2").tobytes())
        made[f"audio_{name}"] = audio
    return made


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    """The tiny checkpoint of a task's release, built once per session (conftest)."""
    return tiny_checkpoint


def _diffsynth(path, task, **generation):
    from orchestrator.backends.diffsynth_wan import DiffSynthWanBackend
    backend = DiffSynthWanBackend(ModelConfig(backend="diffsynth", task=task, path=str(path), dtype="float32"),
                                  GenerationConfig(**{**GEN, **generation}), ())
    backend.load()
    return backend


def _run(backend, job, size=32):
    frames = backend.generate(job, lambda s, n: None)
    assert frames.shape == (5, size, size, 3) and frames.dtype == np.uint8
    return frames


def _spy(pipe):
    """The pipeline, its class given a `__call__` that records each call's keyword arguments: (pipe, calls)."""
    calls = []
    pipeline_class = type(pipe)

    def call(self, **kwargs):
        calls.append(kwargs)
        return pipeline_class.__call__(self, **kwargs)
    pipe.__class__ = type(f"Spied{pipeline_class.__name__}", (pipeline_class,), {"__call__": call})
    return pipe, calls


def test_diffsynth_vace_control_video_and_reference_image_reach_the_pipeline(checkpoint, media):
    backend = _diffsynth(checkpoint("vace"), "vace")
    assert backend.pipe.vace is not None and "vace" in backend.load_info["components"]
    backend.pipe, calls = _spy(backend.pipe)
    backend.prepare(_job(media["clip_a"]))  # read ahead, as the worker does while another job runs
    first = _run(backend, _job(media["clip_a"]))
    assert len(calls[0]["vace_video"]) == 5 and calls[0]["vace_video"][0].shape == (32, 32, 3)
    assert "vace_reference_image" not in calls[0]
    assert backend.job_info()["input_encodings"] == {"WanVideoUnit_VACE": "encoded"}
    assert np.array_equal(_run(backend, _job(media["clip_a"])), first)
    assert backend.job_info()["input_encodings"] == {"WanVideoUnit_VACE": "reused"}  # once per control video
    assert not np.array_equal(_run(backend, _job(media["clip_b"])), first)
    with_reference = _run(backend, _job(media["clip_a"], reference_image=media["image_a"]))
    assert calls[-1]["vace_reference_image"].size == (32, 32)
    assert not np.array_equal(with_reference, first)
    backend.close()


def test_diffsynth_fun_control_video_and_reference_image(checkpoint, media):
    backend = _diffsynth(checkpoint("control"), "control")
    backend.pipe, calls = _spy(backend.pipe)
    first = _run(backend, _job(media["clip_a"]))
    assert len(calls[0]["control_video"]) == 5
    assert backend.job_info()["input_encodings"] == {"WanVideoUnit_FunControl": "encoded"}
    assert np.array_equal(_run(backend, _job(media["clip_a"])), first)
    assert backend.job_info()["input_encodings"] == {"WanVideoUnit_FunControl": "reused"}
    assert not np.array_equal(_run(backend, _job(media["clip_b"])), first)
    referenced = _run(backend, _job(media["clip_a"], reference_image=media["image_a"]))
    assert calls[-1]["reference_image"].size == (32, 32) and not np.array_equal(referenced, first)
    backend.close()


def test_diffsynth_camera_control_direction_from_a_first_frame(checkpoint, media):
    backend = _diffsynth(checkpoint("control-camera"), "control")
    backend.pipe, calls = _spy(backend.pipe)
    left = _run(backend, _job(media["image_a"], camera="Left"))
    assert calls[0]["camera_control_direction"] == "Left" and calls[0]["input_image"].size == (32, 32)
    assert not np.array_equal(_run(backend, _job(media["image_a"], camera="Up")), left)
    backend.close()


def test_diffsynth_animate_pose_and_face_videos_drive_the_reference_image(checkpoint, media):
    backend = _diffsynth(checkpoint("animate"), "animate")
    assert backend.pipe.animate_adapter is not None
    backend.pipe, calls = _spy(backend.pipe)
    job = _job(media["image_a"], pose_video=media["clip_a"], face_video=media["clip_b"])
    first = _run(backend, job)  # num_frames frames, though DiffSynth drops the reference's latent frame
    call = calls[0]
    assert call["num_frames"] == 9 and call["input_image"].size == (32, 32)
    assert len(call["animate_pose_video"]) == 5 and call["animate_pose_video"][0].shape == (32, 32, 3)
    assert len(call["animate_face_video"]) == 5 and call["animate_face_video"][0].shape == (4, 4, 3)  # tiny face size
    assert backend.job_info()["input_encodings"] == {"WanVideoUnit_AnimatePoseLatents": "encoded"}
    assert np.array_equal(_run(backend, job), first)
    assert backend.job_info()["input_encodings"] == {"WanVideoUnit_AnimatePoseLatents": "reused"}
    other_pose = _run(backend, _job(media["image_a"], pose_video=media["clip_b"], face_video=media["clip_b"]))
    other_face = _run(backend, _job(media["image_a"], pose_video=media["clip_a"], face_video=media["clip_a"]))
    assert not np.array_equal(other_pose, first) and not np.array_equal(other_face, first)
    with pytest.raises(ValueError, match="needs the job's `face_video` input"):
        backend.generate(_job(media["image_a"], pose_video=media["clip_a"]), lambda s, n: None)
    backend.close()


def test_diffsynth_s2v_audio_features_once_per_audio_file(checkpoint, media):
    # 64 px: S2V's frame packer folds the motion latents 8×8 (DiffSynth's FramePackMotioner)
    backend = _diffsynth(checkpoint("s2v"), "s2v", width=64, height=64)
    assert backend.pipe.audio_encoder is not None and backend.pipe.audio_processor is not None
    backend.pipe, calls = _spy(backend.pipe)
    first = _run(backend, _job(media["image_a"], audio=media["audio_a"]), 64)
    audio = calls[0]["input_audio"]
    assert audio.dtype == np.float32 and audio.shape == (5 * 16000 // 16,)  # num_frames / fps seconds at 16 kHz
    assert calls[0]["audio_sample_rate"] == 16000
    assert backend.job_info()["input_encodings"] == {"audio_features": "encoded"}
    assert np.array_equal(_run(backend, _job(media["image_a"], audio=media["audio_a"]), 64), first)
    assert backend.job_info()["input_encodings"] == {"audio_features": "reused"}
    assert not np.array_equal(_run(backend, _job(media["image_a"], audio=media["audio_b"]), 64), first)
    backend.close()


def _task_manifest(path, task, category, **generation):
    from .conftest import synthetic_manifest
    return synthetic_manifest(
        model={"backend": "diffsynth", "task": task, "path": str(path), "dtype": "float32", "options": {}},
        generation={**GEN, **generation}, seeds=[1], categories={"talk": category}, resources={"cpu_slots": 1},
        execution={"job_timeout_s": PATIENCE_S, "heartbeat_timeout_s": 120})


@pytest.fixture
def refs(tmp_path, media):
    """The media under tmp_path/refs as a manifest finds them: images/, audio/, control/."""
    for folder, names in (("images", ("image_a", "image_b")), ("audio", ("audio_a", "audio_b")),
                          ("control", ("clip_a", "clip_b"))):
        (tmp_path / "refs" / folder).mkdir(parents=True)
        for name, stem in zip(names, ("alice", "bob")):
            shutil.copy(media[name], tmp_path / "refs" / folder / f"{stem}{Path(media[name]).suffix}")
    return tmp_path / "refs"


S2V = {"images": "refs/images/*.png", "audio": "refs/audio/*.wav", "prompts": ["a person speaks"]}
VACE = {"control": "refs/control/*.mp4", "prompts": ["a dancer"]}


def _problems(write_manifest, data) -> str:
    from orchestrator.manifest import ManifestError
    from orchestrator.validation import load_manifest
    with pytest.raises(ManifestError) as error:
        load_manifest(write_manifest(data))
    return str(error.value)


def test_diffsynth_check_names_the_part_a_checkpoint_lacks_for_its_task(write_manifest, refs, checkpoint, tmp_path):
    t2v = checkpoint("t2v")
    message = _problems(write_manifest, _task_manifest(t2v, "vace", VACE))
    assert "task vace needs the VACE blocks" in message and "Wan2.1-VACE-14B" in message
    message = _problems(write_manifest, _task_manifest(t2v, "control", VACE))
    assert "is a t2v model; task control needs control or camera" in message
    message = _problems(write_manifest, _task_manifest(checkpoint("vace"), "animate", {
        "images": "refs/images/*.png", "driving": {"alice": "refs/control", "bob": "refs/control"},
        "prompts": ["x"]}))
    assert "task animate needs" in message
    no_audio_encoder = tmp_path / "s2v-without-wav2vec2"
    shutil.copytree(checkpoint("s2v"), no_audio_encoder)
    shutil.rmtree(no_audio_encoder / "wav2vec2-large-xlsr-53-english")
    message = _problems(write_manifest, _task_manifest(no_audio_encoder, "s2v", S2V))
    assert "task s2v needs the S2V audio encoder `wav2vec2-large-xlsr-53-english/`" in message
    message = _problems(write_manifest, _task_manifest(checkpoint("s2v"), "s2v", S2V, fps=8, num_frames=5))
    assert "generation.fps is 8; Wan2.2-S2V makes 16 fps video" in message and "use fps: 16" in message


def test_diffsynth_vace_sweep_through_the_cli(write_manifest, refs, checkpoint, tmp_path):
    from orchestrator.outputs import count_frames

    from .conftest import cli
    data = _task_manifest(checkpoint("vace"), "vace", {**VACE, "images": {"alice": "refs/images/alice.png"}})
    result = cli("run", str(write_manifest(data)), "--executor", "local", "--no-progress")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.mp4")) == [
        "talk/alice/seed_1_prompt_0.mp4", "talk/bob/seed_1_prompt_0.mp4"]
    assert all(count_frames(p) == 5 for p in out.rglob("*.mp4"))
    sidecar = json.loads((out / "talk" / "alice" / "seed_1_prompt_0.json").read_text(encoding="utf-8"))
    assert json.dumps(sidecar).count("alice.png") >= 1  # the reference image is part of the job's record


@pytest.fixture(scope="module")
def diffusers_checkpoint(random_wan):
    return random_wan  # built once per session (conftest)


def _diffusers(path, task):
    from orchestrator.backends.diffusers_wan import DiffusersWanBackend
    backend = DiffusersWanBackend(ModelConfig(backend="diffusers", task=task, path=str(path), dtype="float32"),
                                  GenerationConfig(**GEN), ())
    backend.load()
    return backend


def test_diffusers_vace_control_video_and_reference_image_reach_the_pipeline(diffusers_checkpoint, media):
    backend = _diffusers(diffusers_checkpoint("vace"), "vace")
    assert backend.load_info["pipeline"] == "WanVACEPipeline"
    backend.pipe, calls = _spy(backend.pipe)
    # The tiny VACE blocks move the frames by less than a level of 8 bits: what the transformer is given
    # (the control video's VACE latents) shows that the inputs reach it.
    control = []
    backend.pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: control.append(kwargs["control_hidden_states"].clone()), with_kwargs=True)
    first = _run(backend, _job(media["clip_a"]))
    assert len(calls[0]["video"]) == 5 and calls[0]["video"][0].size == (32, 32) and calls[0]["num_frames"] == 5
    assert backend.job_info()["reference_encoding_reused"] is False
    assert np.array_equal(_run(backend, _job(media["clip_a"])), first)
    assert backend.job_info()["reference_encoding_reused"] is True  # the control video encoded once
    assert torch.equal(control[0], control[-1])
    _run(backend, _job(media["clip_b"]))
    assert not torch.equal(control[-1], control[0])
    _run(backend, _job(media["clip_a"], reference_image=media["image_a"]))
    assert calls[-1]["reference_images"][0].size == (32, 32)
    assert control[-1].shape[2] == control[0].shape[2] + 1  # the reference image's latent frame comes first
    backend.close()


def test_diffusers_animate_pose_and_face_videos_drive_the_image(diffusers_checkpoint, media):
    backend = _diffusers(diffusers_checkpoint("animate"), "animate")
    assert backend.load_info["pipeline"] == "WanAnimatePipeline"
    backend.pipe, calls = _spy(backend.pipe)
    first = _run(backend, _job(media["image_a"], pose_video=media["clip_a"], face_video=media["clip_b"]))
    call = calls[0]
    assert call["image"].size == (32, 32) and call["segment_frame_length"] == 5 and "num_frames" not in call
    assert len(call["pose_video"]) == 5 and call["pose_video"][0].size == (32, 32)
    assert len(call["face_video"]) == 5 and call["face_video"][0].size == (8, 8)  # the motion encoder's size
    assert backend.job_info()["reference_encoding_reused"] is False
    encodes = []
    vae_encode = backend.pipe.vae.encode
    backend.pipe.vae.encode = lambda *a, **k: encodes.append(1) or vae_encode(*a, **k)
    again = _run(backend, _job(media["image_a"], pose_video=media["clip_a"], face_video=media["clip_b"], seed=2))
    assert backend.job_info()["reference_encoding_reused"] is True and not np.array_equal(again, first)
    assert len(encodes) == 1  # the previous segment's conditioning only: the pose video and image were kept
    other_pose = _run(backend, _job(media["image_a"], pose_video=media["clip_b"], face_video=media["clip_b"]))
    assert not np.array_equal(other_pose, first)
    backend.close()


def test_diffusers_check_refuses_tasks_without_a_pipeline_and_the_wrong_checkpoint(
        write_manifest, refs, diffusers_checkpoint):
    def diffusers_manifest(path, task, category):
        data = _task_manifest(path, task, category)
        data["model"] = {"backend": "diffusers", "task": task, "path": str(path), "dtype": "float32"}
        return data
    message = _problems(write_manifest, diffusers_manifest(diffusers_checkpoint("vace"), "s2v", S2V))
    assert "diffusers has no pipeline for task s2v" in message and "backend: diffsynth" in message
    message = _problems(write_manifest, diffusers_manifest(diffusers_checkpoint("vace"), "control", VACE))
    assert "diffusers has no pipeline for task control" in message and "backend: diffsynth" in message
    message = _problems(write_manifest, diffusers_manifest(diffusers_checkpoint("t2v"), "vace", VACE))
    assert "task vace needs a WanVACETransformer3DModel" in message and "has a WanTransformer3DModel" in message
    message = _problems(write_manifest, diffusers_manifest(diffusers_checkpoint("vace"), "t2v", {"prompts": ["x"]}))
    assert "is a vace checkpoint" in message and "use task: vace" in message


def test_models_status_names_each_releases_parts_and_what_a_task_lacks(checkpoint, write_manifest, refs, tmp_path):
    from orchestrator.checkpoints import format_status, inspect

    from .conftest import cli
    expected = {"vace": ("VACE blocks", "t2v, v2v, vace"), "animate": ("Animate adapter", "animate, i2v"),
                "s2v": ("S2V audio layers", "s2v"), "control": ("Fun control channels", "control"),
                "control-camera": ("camera adapter", "control")}
    for task, (part, tasks) in expected.items():
        found = inspect(checkpoint(task))
        text = format_status(found)
        assert not found.problems and part in found.parts and f"tasks      {tasks}" in text, text
    s2v = inspect(checkpoint("s2v"))
    assert s2v.component("audio_encoder").params > 0  # the wav2vec2 folder is a component of its own
    no_audio_encoder = tmp_path / "s2v-without-wav2vec2"
    shutil.copytree(checkpoint("s2v"), no_audio_encoder)
    shutil.rmtree(no_audio_encoder / "wav2vec2-large-xlsr-53-english")
    assert any("wav2vec2-large-xlsr-53-english/: missing: the S2V DiT needs its audio encoder" in str(p)
               for p in inspect(no_audio_encoder).problems)
    # a manifest's task needs a part the checkpoint lacks: named, exit 2
    result = cli("models", "status", str(write_manifest(_task_manifest(checkpoint("t2v"), "vace", VACE))))
    assert result.returncode == 2
    assert "task vace needs VACE blocks in the DiT's file" in result.stderr and "runs t2v, v2v" in result.stderr


def test_models_fit_counts_the_conditioned_parts(checkpoint):
    from dataclasses import replace as copy

    from orchestrator.checkpoints import inspect
    from orchestrator.checkpoints.fit import Settings, parts, working_sets
    settings = Settings(width=832, height=480, frames=81)
    vace = {p.name: p for p in parts(inspect(checkpoint("vace")))}
    dit = vace["transformer"]
    assert dit.vace_layers == 2
    with_hints = working_sets([dit], settings)[dit.name]
    assert with_hints > working_sets([copy(dit, vace_layers=0)], settings)[dit.name]
    s2v = {p.name: p for p in parts(inspect(checkpoint("s2v")))}
    audio = s2v["audio_encoder"]
    assert audio.role == "audio" and audio.hidden == 16 and audio.ffn == 32 and audio.params > 0
    assert working_sets([audio], settings)["audio_encoder"] > 0


def test_diffsynth_check_matches_control_inputs_to_the_control_model(write_manifest, refs, checkpoint):
    camera = {"images": "refs/images/*.png", "camera": "left", "prompts": ["a street"]}
    message = _problems(write_manifest, _task_manifest(checkpoint("control"), "control", camera))
    assert "`camera:` needs a camera-control DiT" in message
    message = _problems(write_manifest, _task_manifest(checkpoint("control-camera"), "control", VACE))
    assert "is a camera-control model" in message and "give `images:` and `camera:`" in message
    from orchestrator.validation import load_manifest
    load_manifest(write_manifest(_task_manifest(checkpoint("control-camera"), "control", camera)))  # fits


@pytest.mark.parametrize("release, dit_hash", [("vace", "a61453409b67cd3246cf0c3bebad47ba"),  # VACE-Wan2.1-1.3B
                                               ("animate", "31fa352acb8a1b1d33cd8764273d80a2")])  # Wan2.2-Animate-14B
def test_real_layout_dit_files_are_recognised_with_their_part(checkpoint, tmp_path, release, dit_hash):
    """A header-only DiT file with a release's tensor names and shapes (the DiT's and its VACE blocks' or
    Animate adapter's) has DiffSynth's fingerprint for that release: the check finds the part beside the
    DiT, `models status` names it, and another conditioned task on it is refused naming what it lacks."""
    from diffsynth.models.wan_video_animate_adapter import WanAnimateAdapter
    from diffsynth.models.wan_video_dit import WanModel
    from diffsynth.models.wan_video_vace import VaceWanModel

    from orchestrator.backends.diffsynth_files import diffsynth_model_table, fingerprint, identify, model_files
    from orchestrator.backends.diffsynth_checks import _part_problems
    from orchestrator.checkpoints import inspect
    entries = [c for c in diffsynth_model_table() if c.get("model_hash") == dit_hash]
    dit = next(c for c in entries if c["model_name"] == "wan_video_dit")
    part = next(c for c in entries if c["model_name"] != "wan_video_dit")
    with torch.device("meta"):
        shapes = {k: list(v.shape) for k, v in WanModel(**dit["extra_kwargs"]).state_dict().items()}
        part_class = VaceWanModel if release == "vace" else WanAnimateAdapter
        shapes.update({k: list(v.shape) for k, v in part_class(**part.get("extra_kwargs", {})).state_dict().items()})
    real = tmp_path / "real"
    shutil.copytree(checkpoint("t2v"), real)
    (real / "wan_sweep_tiny_random.json").unlink()
    file = header_only_safetensors(real / "diffusion_pytorch_model.safetensors", shapes)
    # our header fingerprint is DiffSynth's hash (test_diffsynth_backend), which mmaps the whole 34 GB file
    assert fingerprint(str(file)) == dit_hash
    files = model_files(real)[0]
    found = identify(files, str(real))
    other = "animate" if release == "vace" else "vace"
    part_name = "vace" if release == "vace" else "animate_adapter"
    assert found["dit_parts"] == [part_name]
    model = ModelConfig(backend="diffsynth", task=release, path=str(real))
    assert _part_problems(model, files, found) == []
    lacking = _part_problems(replace(model, task=other), files, found)
    assert len(lacking) == 1 and f"task {other} needs" in lacking[0].message
    status = inspect(real, task=other)
    assert ("VACE blocks" if release == "vace" else "Animate adapter") in status.parts
    assert any(f"task {other} needs" in str(p) for p in status.problems)


# `models speed` probes the denoiser alone (first-call time, s/forward, drift from eager). A conditioned
# task's denoiser takes the job's encoded inputs, which random tensors cannot stand in for: the probe
# records them from the manifest's first job (`prepare_denoise`) and draws only the latents.
PROBES = [  # library, task, the job's inputs A and B, the recorded argument that carries them, size
    ("diffsynth", "vace", ("clip_a", {}), ("clip_b", {}), "vace_context", 32),
    ("diffsynth", "control", ("clip_a", {}), ("clip_b", {}), "y", 32),
    ("diffsynth", "animate", ("image_a", {"pose_video": "clip_a", "face_video": "clip_b"}),
     ("image_a", {"pose_video": "clip_b", "face_video": "clip_b"}), "pose_latents", 32),
    ("diffsynth", "s2v", ("image_a", {"audio": "audio_a"}), ("image_a", {"audio": "audio_b"}), "audio_embeds", 64),
    ("diffusers", "vace", ("clip_a", {}), ("clip_b", {}), "control_hidden_states", 32),
    ("diffusers", "animate", ("image_a", {"pose_video": "clip_a", "face_video": "clip_b"}),
     ("image_a", {"pose_video": "clip_b", "face_video": "clip_b"}), "pose_hidden_states", 32),
]


@pytest.mark.parametrize("library,task,job_a,job_b,argument,size", PROBES,
                         ids=[f"{p[0]}-{p[1]}" for p in PROBES])
def test_the_speed_probe_feeds_a_conditioned_denoiser_its_jobs_inputs(checkpoint, diffusers_checkpoint, media,
                                                                      library, task, job_a, job_b, argument, size):
    if library == "diffsynth":
        backend = _diffsynth(checkpoint(task), task, width=size, height=size)
    else:
        backend = _diffusers(diffusers_checkpoint(task), task)

    def job(spec):
        reference, inputs = spec
        return _job(media[reference], **{role: media[name] for role, name in inputs.items()})

    def recorded():
        inputs = backend._denoise_inputs
        return (inputs if library == "diffsynth" else inputs.kwargs)[argument].clone()

    with pytest.raises(RuntimeError, match="call prepare_denoise"):
        backend.denoise_once(0)
    backend.prepare_denoise(job(job_a))
    first, again, other_seed = backend.denoise_once(0), backend.denoise_once(0), backend.denoise_once(1)
    assert torch.isfinite(first).all() and torch.equal(first, again) and not torch.equal(first, other_seed)
    assert first.shape[:2] == (1, 16)
    from_a = recorded()
    backend.prepare_denoise(job(job_b))
    assert from_a.shape == recorded().shape and not torch.equal(from_a, recorded())  # the job's own inputs
    assert backend.denoise_once(0).shape == first.shape
    # the probe stopped each job at its first denoiser call: a real job still runs whole afterwards
    assert backend.generate(job(job_a), lambda s, n: None).shape == (5, size, size, 3)
    backend.close()


def test_models_speed_measures_an_s2v_model(write_manifest, refs, checkpoint, tmp_path):
    from .conftest import cli
    data = _task_manifest(checkpoint("s2v"), "s2v", S2V, width=64, height=64)
    result = cli("models", "speed", str(write_manifest(data)), "--try", "eager", "--steps", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["candidate", "s/step"])
    row = lines[header + 1]
    assert row.split()[0] == "eager" and "failed" not in row, result.stdout
    assert float(row.split()[3]) > 0  # s/forward: the S2V DiT's own forward pass, with the job's audio features


def test_the_speed_probe_stops_a_fully_compiled_transformer_at_its_call(diffusers_checkpoint, media):
    """With `compile: full` the transformer's whole forward is one graph (fullgraph=True): a hook on it
    would be traced and refused, so the probe stands in for the transformer at the pipeline's call."""
    from orchestrator.manifest import SpeedConfig
    from orchestrator.backends.diffusers_wan import DiffusersWanBackend
    model = ModelConfig(backend="diffusers", task="vace", path=str(diffusers_checkpoint("vace")), dtype="float32",
                        speed=SpeedConfig(compile="full"))
    backend = DiffusersWanBackend(model, GenerationConfig(**GEN), ())
    backend.load()
    transformer = backend.pipe.transformer
    backend.prepare_denoise(_job(media["clip_a"]))
    assert backend.pipe.transformer is transformer  # put back
    assert "transformer" in backend.pipe.config and backend.pipe.config["transformer"][1] == type(transformer).__name__
    out = backend.denoise_once(0)
    assert torch.isfinite(out).all() and torch.equal(out, backend.denoise_once(0))
    assert backend.generate(_job(media["clip_a"]), lambda s, n: None).shape == (5, 32, 32, 3)
    backend.close()
