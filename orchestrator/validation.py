"""A manifest checked by its backend: `load_manifest` reads the YAML (`manifest`, which knows no
backend) and lets the chosen backend (`backends`) resolve its path options, name its runtime options
(left out of the job ids) and check what it supports, each value of the `axes:` included, every
problem reported together at its manifest line. The inputs of Wan's conditioned tasks are checked
here too, by the rules of `media` (audio as long as the video and not silent, control and driving
videos as long as the video and of its aspect): decoded once, before the start.

It sits above both, so that neither imports the other: backends read the manifest's plain types.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Callable

from .backend import BACKENDS, BackendProblem, backend_class
from .jobs import axis_points
from .manifest import CONDITIONED_TASKS, Manifest, apply_axes, model_with_axes, read_manifest
from .manifest.model import SPEED_AXES
from .manifest.task_inputs import AUDIO_RATE
from .media import UnreadableReference, control_video_problem, read_audio


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
    if manifest.model.task not in CONDITIONED_TASKS:
        return
    # every size and length the axes sweep: the inputs must fit each (usually one), each problem said once
    shapes = {(g.width, g.height, g.num_frames, g.fps): g
              for g in (apply_axes(manifest.generation, point) for point in axis_points(manifest))}
    said: set = set()

    def once(at, message, fix=""):
        if (at, message) not in said:
            said.add((at, message))
            problem(at, message, fix)
    for g in shapes.values():
        _check_inputs_fit(manifest, g, once)


def _check_inputs_fit(manifest: Manifest, g, problem: Callable[..., None]) -> None:
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
    backend = backend_class(manifest.model.backend)
    options = _resolve_path_options(manifest.model.backend, manifest.model.options, manifest.path.parent)
    manifest = replace(manifest, model=replace(manifest.model, options=options),
                       runtime_options=frozenset(backend.runtime_options))
    # With axes, the settings checked are those jobs run: each axis at its first value (a swept key's
    # own value under `generation:` is never used); a problem of a swept key is its axis's, below.
    first = {key: value for axis in manifest.axes for key, value in axis.assignments()[0].items()}
    swept = {_setting(key) for key in first}
    found_before = set()
    for found in backend.check(_with_axis_values(manifest, first)):
        if isinstance(found, BackendProblem) and found.key in swept:
            continue
        found_before.add(str(found))
        if isinstance(found, BackendProblem):
            problem((found.key, "model"), found.message, found.fix)
        else:
            problem(("model",), found)
    _check_axes(manifest, backend, first, swept, found_before, problem)
    for found in backend.check_loras(manifest, lora_files(manifest)):
        problem((found.key, "model.loras", "model"), found.message, found.fix)
    return manifest


def lora_files(manifest: Manifest) -> list[tuple[str, str, str]]:
    """(manifest key, LoRA name, file) of every LoRA file a sweep may run: model.loras's, and each value of a
    `loras.NAME.path` axis (its key ends with the value's index, `axes.loras.NAME.path.1`; in a zip group,
    the group's `axes.zip`), each file once per LoRA."""
    found = [(f"model.loras.{lora.name}.path", lora.name, lora.path) for lora in manifest.model.loras]
    for axis in manifest.axes:
        for key in axis.keys:
            if key.startswith("loras.") and key.endswith(".path"):
                found += [(f"axes.{key}.{index}" if len(axis.keys) == 1 else "axes.zip", key.split(".")[1], point[key])
                          for index, point in enumerate(axis.assignments())]
    first = {}  # (name, file) -> its first place
    for entry in found:
        first.setdefault(entry[1:], entry)
    return list(first.values())


def _check_axes(manifest: Manifest, backend, first: dict, swept: set[str], found_before: set[str],
                problem: Callable[..., None]) -> None:
    """The backend's check of each axis value (each point of a zip group; the other axes at their
    first values), as if `generation:` (`speed:` for quantize) held it: what it finds there and not
    without it is that value's problem, reported at the axis's line (a setting this backend does not
    take, a size it cannot make, fp8 on a card without fp8)."""
    for axis in manifest.axes:
        where = tuple(f"axes.{key}" for key in axis.keys) + ("axes.zip", "axes")
        others = swept - {_setting(key) for key in axis.keys}  # another axis's problem, found there
        for values in axis.assignments():
            trial = _with_axis_values(manifest, {**first, **values})
            shown = ", ".join(f"{key} = {value!r}" for key, value in values.items())
            for found in backend.check(trial):
                if str(found) in found_before or getattr(found, "key", None) in others:
                    continue  # the manifest's own problem (reported above), or another axis's
                found_before.add(str(found))
                message = found.message if isinstance(found, BackendProblem) else found
                problem(where, f"axes ({shown}): {message}", getattr(found, "fix", "")
                        or f"remove this value from axes (the {manifest.model.backend} backend cannot run it)")


def _setting(key: str) -> str:
    """The manifest key a backend's problem with this axis names: `generation.steps`, `speed.quantize`."""
    return f"speed.{key}" if key in SPEED_AXES else f"generation.{key}"


def _with_axis_values(manifest: Manifest, values: dict) -> Manifest:
    """The manifest as one job of these axis values runs it (a quantize value in `model.speed`), for the
    backend's check: the checks of `generation:` and `speed:` apply to each value."""
    return replace(manifest, model=model_with_axes(manifest.model, values),
                   generation=apply_axes(manifest.generation, values), axes=())


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
