"""The inputs of a diffsynth job as DiffSynth's `WanVideoPipeline` takes them, task by task: the reference
and `Job.inputs` read ahead and fitted by media.py's rules (through the worker's ReferenceCache, at the
job's size, length and rate), each carrying the key under which the backend's encoding caches
(diffsynth_caches) keep what it encodes to.
"""
from __future__ import annotations

import numpy as np

from ..media import _kind_of as kind

AUDIO_SAMPLE_RATE = 16000  # Wan2.2-S2V's wav2vec2 encoder hears 16 kHz
# How a worker reads ahead each role of Job.inputs (the face video has its own cache, at its size)
INPUT_KINDS = {"audio": "audio", "reference_image": "image", "pose_video": "video"}


def prefetch(backend, job) -> None:
    """The backend's `prepare`: start reading `job`'s reference and inputs, each at the size its cache keeps."""
    if getattr(backend, "references", None) is None:
        return
    g = backend.generation_for(job)
    references = backend.reference_cache(g)
    if job.reference:
        references.prefetch(job.reference)
    for role, value in (getattr(job, "inputs", None) or {}).items():
        if role == "face_video":
            backend.reference_cache(g, square=backend.face_size or g.height).prefetch(value, "video")
        elif role in INPUT_KINDS:
            references.prefetch(value, INPUT_KINDS[role])


def task_inputs(backend, job, kwargs: dict, g) -> None:
    """The pipeline arguments of the job's task on `backend`, from its reference and its `inputs` (read by
    orchestrator.media's rules through the worker's ReferenceCache at the job's size, length and rate
    `g`, each carrying the key the encoding caches file it under: its path, and that shape)."""
    from PIL import Image
    task, inputs = backend.model.task, dict(getattr(job, "inputs", None) or {})
    references, shape = backend.reference_cache(g), f"{g.width}x{g.height}x{g.num_frames}@{g.fps}"

    def image(path):
        picture = Image.fromarray(references.image(path))
        picture.cache_key = f"{path}:{g.width}x{g.height}"
        return picture

    def clip(path, cache=None):
        return _Clip((cache or references).video(path), f"{path}:{shape}")

    def needs(role):
        if not inputs.get(role):
            raise ValueError(f"task {task} needs the job's `{role}` input, which {job.key} lacks")
        return inputs[role]
    if task == "v2v":
        # (the clip's latents are kept per reference and per size, length and rate: axes change them)
        kwargs["input_video"] = clip(job.reference)
        kwargs["denoising_strength"] = g.denoising_strength
    elif task == "i2v":
        kwargs["input_image"] = image(job.reference)  # also keys the per-image caches
    elif task == "vace":
        kwargs["vace_video"] = clip(job.reference)
        if inputs.get("reference_image"):
            kwargs["vace_reference_image"] = image(inputs["reference_image"])
    elif task == "control":
        if _kind_of(job.reference) == "image":  # camera control from a first frame (Wan-Fun Control-Camera)
            kwargs["input_image"] = image(job.reference)
        else:
            kwargs["control_video"] = clip(job.reference)
        if inputs.get("reference_image"):
            if not getattr(backend.pipe.dit, "has_ref_conv", False):
                raise ValueError(f"{job.key}: this control DiT takes no reference image (it has no reference "
                                 "conv: Wan2.1-Fun V1.0); leave reference_image out or use a V1.1 / Wan2.2 Fun model")
            kwargs["reference_image"] = image(inputs["reference_image"])
        if inputs.get("camera"):
            kwargs["camera_control_direction"] = inputs["camera"]
    elif task == "animate":
        kwargs["input_image"] = image(job.reference)
        kwargs["animate_pose_video"] = clip(needs("pose_video"))
        kwargs["animate_face_video"] = clip(needs("face_video"),
                                            backend.reference_cache(g, square=backend.face_size or g.height))
        # DiffSynth drops the first latent frame (the reference image's) after denoising: asked for 4
        # frames more, it returns num_frames frames driven by num_frames of pose and face.
        kwargs["num_frames"] = g.num_frames + 4
    elif task == "s2v":
        kwargs["input_image"] = image(job.reference)
        kwargs["input_audio"] = _Audio(references.audio(needs("audio")), f"{inputs['audio']}:{shape}")
        kwargs["audio_sample_rate"] = AUDIO_SAMPLE_RATE


class _Audio(np.ndarray):
    """A job's audio samples as DiffSynth's `input_audio`, carrying the key the audio-feature cache files
    them under."""

    def __new__(cls, samples: np.ndarray, key: str):
        audio = np.asarray(samples).view(cls)
        audio.cache_key = key
        return audio


class _Clip(list):
    """The reference frames as DiffSynth's `input_video` (a list of H×W×3 arrays), carrying the key the
    reference-latent cache files them under."""

    def __init__(self, frames: np.ndarray, key: str):
        super().__init__(frames)
        self.cache_key = key


def _kind_of(path: str) -> str:
    return kind(path)
