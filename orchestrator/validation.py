"""A manifest checked by its backend: `load_manifest` reads the YAML (`manifest`, which knows no
backend) and lets the chosen backend (`backends`) resolve its path options and check what it
supports, every problem reported together at its manifest line. The inputs of Wan's conditioned
tasks are checked here too, by the rules of `media` (audio as long as the video and not silent,
control and driving videos as long as the video and of its aspect): decoded once, before the start.

It sits above both, so that neither imports the other: backends read the manifest's plain types.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Callable

from .backends import BACKENDS, BackendProblem, backend_class
from .manifest import CONDITIONED_TASKS, Manifest, read_manifest


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read and validate a manifest, its backend's checks included; raise ManifestError listing
    every problem."""
    return read_manifest(path, check=_check_all)


def _check_all(manifest: Manifest, problem: Callable[..., None]) -> Manifest:
    _check_task_inputs(manifest, problem)
    return _check_backend(manifest, problem)


# Job.inputs role -> the category key that gives it (orchestrator/manifest/task_inputs.py)
_ROLE_KEYS = {"audio": "audio", "reference_image": "images", "pose_video": "driving", "face_video": "driving"}


def _check_task_inputs(manifest: Manifest, problem: Callable[..., None]) -> None:
    """Each conditioned input fits the video asked for, by the media rules; reported at its entry's line."""
    from .manifest.task_inputs import AUDIO_RATE
    from .media import UnreadableReference, control_video_problem, read_audio
    if manifest.model.task not in CONDITIONED_TASKS:
        return
    g = manifest.generation
    for category in manifest.categories:
        what = f"category `{category.name}`"
        for ref in category.references:
            def at(key: str) -> tuple[str, ...]:
                return (f"categories.{category.name}.{key}.{ref.stem}", f"categories.{category.name}.{key}",
                        f"categories.{category.name}")
            if category.kind == "videos":  # the control video of vace/control
                why = control_video_problem(ref.path, g.width, g.height, g.num_frames, g.fps)
                if why:
                    problem(at("control"), f"{what}: control video {why}",
                            "use a control video made for this size and length, or change generation's "
                            "width/height/num_frames/fps")
            for role, value in ref.inputs.items():
                if role == "audio":
                    try:
                        read_audio(value, AUDIO_RATE, g.num_frames, g.fps)
                    except UnreadableReference as exc:
                        problem(at("audio"), f"{what}: the audio of `{ref.stem}`: {exc}",
                                "use an audio file with speech over the whole video, or fewer generation.num_frames")
                elif role in ("pose_video", "face_video"):
                    # the face video holds Wan's 512x512 face crops: only its length has to fit
                    why = control_video_problem(value, g.width, g.height, g.num_frames, g.fps,
                                                check_aspect=role == "pose_video")
                    if why:
                        problem(at("driving"), f"{what}: the driving {role.replace('_', ' ')} of `{ref.stem}`: {why}",
                                "preprocess the driving video at this size and length, or change generation")


def _check_backend(manifest: Manifest, problem: Callable[..., None]) -> Manifest:
    """Let the chosen backend check the manifest (unknown backend → a problem here); its path
    options come back resolved against the manifest's folder."""
    if manifest.model.backend not in BACKENDS:
        problem(("model.backend", "model"), f"unknown model.backend `{manifest.model.backend}`",
                f"use one of: {', '.join(sorted(BACKENDS))}")
        return manifest
    options = _resolve_path_options(manifest.model.backend, manifest.model.options, manifest.path.parent)
    manifest = replace(manifest, model=replace(manifest.model, options=options))
    for found in backend_class(manifest.model.backend).check(manifest):
        if isinstance(found, BackendProblem):
            problem((found.key, "model"), found.message, found.fix)
        else:
            problem(("model",), found)
    return manifest


def _resolve_path_options(backend: str, options: dict, base: Path) -> dict:
    """The backend's path options made absolute from the manifest's folder: a value with a path
    separator, or one that exists there (`python3` alone stays a command looked up on PATH)."""
    resolved = dict(options)
    for key in backend_class(backend).path_options:
        value = options.get(key)
        if not isinstance(value, str) or not value:
            continue
        path = Path(os.path.expanduser(value))
        if not path.is_absolute() and (os.sep in value or os.path.exists(base / path)):
            resolved[key] = str((base / path).resolve())
        elif path.is_absolute():
            resolved[key] = str(path)
    return resolved
