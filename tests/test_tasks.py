"""Wan's conditioned tasks (issue 23): s2v, vace, control, animate. Their inputs in a manifest, in each
job's identity and sidecar, refused with a located error when they cannot work, and run end to end on
the CPU by the synthetic backend, which reads every input."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from orchestrator.jobs import Job, expand
from orchestrator.manifest import ManifestError
from orchestrator.outputs import write_mp4
from orchestrator.validation import load_manifest

from .conftest import synthetic_manifest
from .test_media import tone_file

# 5 frames at 5 fps: the audio and control videos must last one second.


def picture(path, width=32, height=32, level=128):
    import av
    frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), level, dtype=np.uint8), format="rgb24")
    with av.open(str(path), "w", format="image2") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = width, height, "rgb24"
        for packet in stream.encode(frame):
            container.mux(packet)
    return path


def clip(path, frames=5, fps=5, width=32, height=32):
    video = np.stack([np.full((height, width, 3), 20 * k % 256, dtype=np.uint8) for k in range(frames)])
    write_mp4(video, path, fps=fps, expected_frames=frames)
    return path


@pytest.fixture
def inputs(tmp_path):
    """Real media for two references, `alice` and `bob`, under tmp_path/refs."""
    refs = tmp_path / "refs"
    for folder in ("images", "audio", "control", "prep/alice", "prep/bob"):
        (refs / folder).mkdir(parents=True)
    for stem in ("alice", "bob"):
        picture(refs / "images" / f"{stem}.png")
        tone_file(refs / "audio" / f"{stem}.wav", seconds=1.5, rate=16000, channels=1)
        clip(refs / "control" / f"{stem}.mp4")
        clip(refs / "prep" / stem / "src_pose.mp4")
        clip(refs / "prep" / stem / "src_face.mp4", width=16, height=16)
    return refs


def task_manifest(task, category, seeds=(1,)):
    return synthetic_manifest(model={"task": task}, seeds=list(seeds), categories={"talk": category})


CATEGORIES = {
    "s2v": {"images": "refs/images/*.png", "audio": "refs/audio/*.wav", "prompts": ["a person speaks"]},
    "vace": {"control": "refs/control/*.mp4", "images": {"alice": "refs/images/alice.png"},
             "prompts": ["a dancer"]},
    "control": {"control": "refs/control/*.mp4", "prompts": ["a dancer"]},
    "animate": {"images": "refs/images/*.png", "driving": "refs/prep", "prompts": ["a dancer"]},
}


def test_each_task_fills_its_jobs_inputs_by_role(write_manifest, inputs):
    roles = {}
    for task, category in CATEGORIES.items():
        jobs = expand(load_manifest(write_manifest(task_manifest(task, category), name=f"{task}.yaml")))
        assert [job.stem for job in jobs] == ["alice", "bob"]
        roles[task] = [job.inputs for job in jobs]
        assert all(job.reference and job.reference.startswith(str(inputs)) for job in jobs)
    assert roles["s2v"][0] == {"audio": str(inputs / "audio/alice.wav")}
    assert roles["vace"] == [{"reference_image": str(inputs / "images/alice.png")}, {}]  # optional, per stem
    assert roles["control"] == [{}, {}]
    assert roles["animate"][1] == {"pose_video": str(inputs / "prep/bob/src_pose.mp4"),
                                   "face_video": str(inputs / "prep/bob/src_face.mp4")}
    camera = {"images": "refs/images/*.png", "camera": {"alice": "left", "bob": "zoom_in"}, "prompts": ["a street"]}
    jobs = expand(load_manifest(write_manifest(task_manifest("control", camera))))
    assert [(j.reference.endswith(".png"), j.inputs) for j in jobs] == [(True, {"camera": "left"}),
                                                                         (True, {"camera": "zoom_in"})]


def test_inputs_are_part_of_the_job_id_but_not_of_its_output_path(write_manifest, inputs):
    first = expand(load_manifest(write_manifest(task_manifest("s2v", CATEGORIES["s2v"]))))
    assert first[0].output.endswith("talk/alice/seed_1_prompt_0.mp4")
    # bob's audio, given to alice: same image, same output path, another job
    swapped = dict(CATEGORIES["s2v"], audio={"alice": "refs/audio/bob.wav", "bob": "refs/audio/bob.wav"})
    tone_file(inputs / "audio" / "bob.wav", seconds=2.0, rate=16000, channels=1)  # another size: another file
    second = expand(load_manifest(write_manifest(task_manifest("s2v", swapped))))
    assert second[0].output == first[0].output and second[0].id != first[0].id
    # a Job read back from an old ledger or spec (no inputs) still loads
    old = {k: v for k, v in first[0].to_dict().items() if k != "inputs"}
    assert Job.from_dict(old).inputs == {}


def test_old_tasks_keep_their_job_ids(write_manifest, tmp_path):
    """The ids of t2v jobs (no inputs) are what they were before the conditioned tasks came."""
    jobs = expand(load_manifest(write_manifest(synthetic_manifest())))
    assert all(job.inputs == {} for job in jobs)
    import hashlib
    from orchestrator.jobs import settings_fingerprint
    manifest = load_manifest(write_manifest(synthetic_manifest()))
    fingerprint = json.dumps(settings_fingerprint(manifest), sort_keys=True, ensure_ascii=False)
    identity = json.dumps(["alpha", None, 0, "a cat", 1, None], ensure_ascii=False)
    assert jobs[0].id == hashlib.sha1(f"{identity}|{fingerprint}".encode()).hexdigest()[:16]


def problems_of(write_manifest, manifest) -> str:
    with pytest.raises(ManifestError) as caught:
        load_manifest(write_manifest(manifest))
    return str(caught.value)


def test_an_input_missing_for_one_reference_names_the_stem_and_the_role(write_manifest, inputs):
    (inputs / "audio" / "bob.wav").unlink()
    text = problems_of(write_manifest, task_manifest("s2v", CATEGORIES["s2v"]))
    assert "manifest.yaml:" in text and "image `bob.png` has no audio (`bob` is missing under `audio:`)" in text
    assert "alice" not in text.split("has no audio")[0].rsplit("\n", 1)[-1]
    shutil.rmtree(inputs / "prep" / "bob")
    text = problems_of(write_manifest, task_manifest("animate", CATEGORIES["animate"]))
    assert "the driving folder of `bob`" in text and "src_pose.mp4" in text
    # s2v without any audio: said once, at the category
    text = problems_of(write_manifest, task_manifest("s2v", {"images": "refs/images/*.png", "prompts": ["x"]}))
    assert "needs `audio:` for each image" in text


def test_silent_short_or_unreadable_audio_is_refused_before_the_start(write_manifest, inputs, tmp_path):
    tone_file(inputs / "audio" / "alice.wav", seconds=1.5, rate=16000, channels=1, amplitude=0.0)
    tone_file(inputs / "audio" / "bob.wav", seconds=0.5, rate=16000, channels=1)
    text = problems_of(write_manifest, task_manifest("s2v", CATEGORIES["s2v"]))
    lines = text.splitlines()
    silent = next(line for line in lines if "alice.wav" in line)
    short = next(line for line in lines if "bob.wav" in line)
    assert "manifest.yaml:" in silent and "the audio is silent" in silent
    assert "0.50 s shorter than the video (5 frames at 5 fps = 1.00 s)" in short
    (inputs / "audio" / "bob.wav").write_bytes(b"not audio")
    text = problems_of(write_manifest, task_manifest("s2v", CATEGORIES["s2v"]))
    assert "bob.wav` cannot be read as an audio file" in text
    assert not (tmp_path / "out").exists()  # nothing was started


def test_a_control_video_of_another_length_or_aspect_is_refused(write_manifest, inputs):
    clip(inputs / "control" / "alice.mp4", frames=3)  # 0.6 s for a 1.0 s video
    clip(inputs / "control" / "bob.mp4", width=64, height=32)  # 2:1 for a 1:1 video
    text = problems_of(write_manifest, task_manifest("vace", CATEGORIES["vace"]))
    assert "alice.mp4: lasts 0.60 s, 0.40 s shorter than the video" in text
    assert "bob.mp4: is 64x32 (aspect 2.00), the video 32x32 (aspect 1.00)" in text and "5% allowed" in text
    # one frame short and a 4% wider picture are within the rule's tolerance
    clip(inputs / "control" / "alice.mp4", frames=4)
    clip(inputs / "control" / "bob.mp4", width=50, height=48)
    assert len(expand(load_manifest(write_manifest(task_manifest("vace", CATEGORIES["vace"]))))) == 2


def test_keys_and_values_a_task_does_not_take_are_located_errors(write_manifest, inputs):
    text = problems_of(write_manifest, task_manifest("v2v", {"videos": "refs/control/*.mp4", "audio": "refs/audio",
                                                             "prompts": ["x"]}))
    assert "`audio:` is an input of model.task s2v, not v2v" in text
    text = problems_of(write_manifest, task_manifest("s2v", dict(CATEGORIES["s2v"], control="refs/control/*.mp4")))
    assert "model.task s2v takes no `control:`" in text
    text = problems_of(write_manifest, task_manifest("control", dict(CATEGORIES["control"], camera="sideways")))
    assert "camera is 'sideways'" in text and "zoom_in" in text
    text = problems_of(write_manifest, task_manifest("vace", {"images": "refs/images/*.png", "prompts": ["x"]}))
    assert "model.task vace needs `control:`" in text
    text = problems_of(write_manifest, task_manifest("s2v", dict(CATEGORIES["s2v"], audio={"carol": "refs/audio/bob.wav"})))
    assert "`audio:` names `carol`, but there is no such image" in text


def test_backends_without_the_task_refuse_it_clearly(write_manifest, inputs):
    manifest = task_manifest("s2v", CATEGORIES["s2v"])
    manifest["model"] = {"backend": "diffusers", "task": "s2v", "path": "nowhere"}
    text = problems_of(write_manifest, manifest)
    assert "diffusers has no pipeline for task s2v" in text and "backend: diffsynth" in text


@pytest.mark.parametrize("task", list(CATEGORIES) + ["camera"])
@pytest.mark.slow
def test_each_task_runs_end_to_end_and_its_sidecar_records_the_inputs(write_manifest, inputs, tmp_path, task):
    from orchestrator.run import RunOptions, run_sweep
    category = CATEGORIES.get(task) or {"images": "refs/images/*.png", "camera": "right", "prompts": ["a street"]}
    manifest = load_manifest(write_manifest(task_manifest("control" if task == "camera" else task, category)))
    result = run_sweep(manifest, RunOptions(executor="local", progress=False), say=lambda line: None)
    assert result.exit_code == 0 and result.report.totals.done == 2
    sidecar = json.loads((tmp_path / "out" / "talk" / "alice" / "seed_1_prompt_0.json").read_text())
    assert sidecar["job"]["inputs"] == expand(manifest)[0].inputs


def test_the_synthetic_backend_shows_each_input_in_the_picture(write_manifest, inputs):
    from orchestrator.backends.synthetic import SyntheticBackend
    manifest = load_manifest(write_manifest(task_manifest("s2v", CATEGORIES["s2v"])))
    backend = SyntheticBackend(manifest.model, manifest.generation, ())
    backend.load()
    job = expand(manifest)[0]
    backend.prepare(job)
    loud = backend.generate(job, lambda *_: None)
    quiet_audio = tone_file(inputs / "audio" / "quiet.wav", seconds=1.5, rate=16000, channels=1)
    samples = np.linspace(0, 1, 24000, dtype=np.float32)  # louder as time goes: frames get brighter
    import av
    with av.open(str(quiet_audio), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=16000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray((samples * 0.5 * np.sin(np.arange(24000))).astype(np.float32)[None],
                                           format="flt", layout="mono")
        frame.sample_rate = 16000
        for resampled in av.AudioResampler(format="s16", layout="mono", rate=16000).resample(frame):
            for packet in stream.encode(resampled):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    rising = backend.generate(Job.from_dict({**job.to_dict(), "inputs": {"audio": str(quiet_audio)}}), lambda *_: None)
    brightness = rising.reshape(5, -1).mean(axis=1)
    assert list(brightness) == sorted(brightness) and brightness[-1] > 2 * brightness[0]
    assert not np.array_equal(loud, rising)
    backend.close()


# ---- the command backend: Wan2.2's generate.py (its stub) runs s2v-14B and animate-14B ----

from .test_command_backend import STUB, backend, fake_checkpoint, record  # noqa: E402,F401  (record: a fixture)


def conditioned_job(tmp_path, reference, **inputs) -> Job:
    return Job(id="j1", ordinal=0, category="talk", stem="alice", reference=str(reference), prompt_index=0,
               prompt="a person speaks", seed=7, output=str(tmp_path / "out" / "talk" / "alice" / "seed_7_prompt_0.mp4"),
               inputs={role: str(value) for role, value in inputs.items()})


def test_command_backend_runs_s2v_with_image_and_audio(tmp_path, inputs, record):
    b = backend(tmp_path, task="s2v")  # 64x48, 5 frames at 16 fps
    j = conditioned_job(tmp_path, inputs / "images/alice.png", audio=inputs / "audio/alice.wav")
    argv = b.command_line(j, "/x/out.mp4")
    assert argv[argv.index("--task") + 1] == "s2v-14B"
    assert argv[argv.index("--image") + 1] == j.reference and argv[argv.index("--audio") + 1] == j.inputs["audio"]
    # generate.py's s2v makes whole 4-frame groups: 8 for 5 frames, in one clip
    assert argv[argv.index("--infer_frames") + 1] == "8" and argv[argv.index("--num_clip") + 1] == "1"
    frames = b.generate(j, lambda *_: None)
    assert isinstance(frames, np.ndarray) and frames.shape == (5, 48, 64, 3)  # the first 5 of its 8
    assert record()["argv"] == b.job_info()["command"][2:]
    assert not list((tmp_path / "out").rglob("*.mp4"))  # its own file is gone: the worker writes the frames


def test_command_backend_runs_animate_from_a_src_folder_it_builds(tmp_path, inputs, record):
    clip(inputs / "prep/alice/src_pose.mp4", frames=12, fps=30, width=64, height=48)  # longer than the video
    b = backend(tmp_path, task="animate", refert_num=5)
    j = conditioned_job(tmp_path, inputs / "images/alice.png", pose_video=inputs / "prep/alice/src_pose.mp4",
                        face_video=inputs / "prep/alice/src_face.mp4")
    video = b.generate(j, lambda *_: None)
    from orchestrator.outputs import count_frames
    assert count_frames(video) == 5  # the pose video was cut to the 5 frames asked for
    import av
    with av.open(str(video)) as container:
        assert (container.streams.video[0].width, container.streams.video[0].height) == (64, 48)
    argv = record()["argv"]
    assert argv[argv.index("--task") + 1] == "animate-14B" and "--image" not in argv
    assert argv[argv.index("--refert_num") + 1] == "5"
    src = argv[argv.index("--src_root_path") + 1]
    assert not __import__("os").path.exists(src)  # the job's folder is removed after it ran


def test_command_backend_checks_the_conditioned_tasks(tmp_path, write_manifest, inputs):
    fake_checkpoint(tmp_path / "Wan2.2-S2V-14B", ("models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth"))
    manifest = task_manifest("s2v", CATEGORIES["s2v"])
    manifest["model"] = {"backend": "command", "task": "s2v", "path": "Wan2.2-S2V-14B",
                         "options": {"script": str(STUB)}}
    manifest["generation"] = {"width": 832, "height": 480, "num_frames": 5, "fps": 16, "steps": 4}
    text = problems_of(write_manifest, manifest)
    assert "is not a s2v-14B checkpoint: it lacks wav2vec2-large-xlsr-53-english" in text
    (tmp_path / "Wan2.2-S2V-14B" / "wav2vec2-large-xlsr-53-english").mkdir()
    assert len(expand(load_manifest(write_manifest(manifest)))) == 2
    manifest["model"]["task"], manifest["categories"] = "vace", {"talk": CATEGORIES["vace"]}
    clip(inputs / "control/alice.mp4", width=64, height=36)
    text = problems_of(write_manifest, manifest)
    assert "generate.py has no vace task" in text
    manifest["model"]["options"] = {"command": ["{python}", "x.py", "{reference}", "{output}", "{audio}"]}
    text = problems_of(write_manifest, manifest)
    assert "the command uses {audio}, but task vace has no audio" in text
