"""The inputs of Wan's conditioned tasks in a category (README's task table, "The manifest"): which keys
each task takes, and each extra input matched to its reference by stem.

| task | the reference (its stem names the folder) | other inputs (`Job.inputs` role) |
| --- | --- | --- |
| s2v | `images:` | `audio:` (audio), required |
| vace, control | `control:` videos | `images:` (reference_image), optional |
| control, camera | `images:` | `camera:` (camera), a direction |
| animate | `images:` | `driving:` (pose_video, face_video): Wan2.2-Animate's preprocessing folder |

An extra input is a list or glob of files matched to the references by stem (`audio/alice.wav` goes with
`images/alice.png`), or a mapping from a reference's stem to its file (or folder, for `driving:`); `camera:`
is one direction for the category or a mapping from stem to direction. Whether each file fits the video asked for
(audio long enough and not silent, control videos long enough and of its aspect) is checked before the
start by `orchestrator.validation`, with the rules of `orchestrator.media`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import yaml

from .model import CAMERA_DIRECTIONS
from .reader import Reader

# The category keys of the conditioned tasks (beside `videos:`, `images:` and `prompts:`).
INPUT_KEYS = ("control", "audio", "driving", "camera")
EXTRA_FILE_KEYS = ("audio", "images")  # extra inputs given as files, matched by stem or mapped
# key -> the Job.inputs role it fills
ROLES = {"audio": "audio", "images": "reference_image", "camera": "camera"}
# Wan2.2-Animate's preprocessing (wan/modules/animate/preprocess) writes these into one folder per video.
DRIVING_FILES = {"pose_video": "src_pose.mp4", "face_video": "src_face.mp4"}
REQUIRED = {"audio", "driving"}
AUDIO_RATE = 16000  # Wan2.2-S2V's wav2vec2 audio encoder hears 16 kHz: the rate audio is read at

_TAKEN_BY = {"control": ("vace", "control"), "audio": ("s2v",), "driving": ("animate",), "camera": ("control",)}


def tasks_taking(key: str) -> tuple[str, ...]:
    return _TAKEN_BY[key]


def task_layout(reader: Reader, what: str, node, keys: dict, task: str) -> tuple[str, tuple[str, ...]] | None:
    """(the key of the references, the keys of the extra inputs) of a category of `task`, or None after
    reporting a key the task does not take or a missing reference key."""
    if task == "control" and "camera" in keys and "control" not in keys:
        main, extras = "images", ("camera",)  # camera control: a first frame moved by the camera
    elif task in ("vace", "control"):
        main, extras = "control", ("images", "camera") if task == "control" else ("images",)
    else:
        main, extras = "images", ("audio",) if task == "s2v" else ("driving",)
    wrong = [key for key in keys if key not in (main, "prompts", *extras)]
    for key in wrong:
        takes = ", ".join(f"`{k}:`" for k in (main, *extras))
        reader.problem(keys[key][0], f"{what}: model.task {task} takes no `{key}:`",
                       f"give {takes} (README's task table), or change model.task")
    if main not in keys:
        needs = {"images": "`images:` (the picture to animate)" if task != "control"
                 else "`images:` (the first frames the camera moves over)",
                 "control": "`control:` (the control videos: depth, pose, edges...)"}[main]
        reader.problem(node, f"{what}: model.task {task} needs {needs}", f"add {needs.split(' ')[0]} to the category")
        return None
    return (main, extras) if not wrong else None


def read_extra_inputs(reader: Reader, what: str, keys: dict, extras: tuple[str, ...], base: Path, main_key: str,
                      stems: dict[str, Path], lost: set[str] | None, read_files: Callable) -> dict[str, dict[str, str]]:
    """stem -> {role: absolute path or value} of the category's extra inputs; a required one missing for a
    reference is reported naming the stem and the role. `read_files(reader, what, node, base, key)` is the
    categories' reader of a list or glob of files (the same rules as `videos:` and `images:`)."""
    inputs: dict[str, dict[str, str]] = {stem: {} for stem in stems}
    nodes: dict[tuple[str, str], yaml.Node] = {}  # (stem, role) -> where the manifest gave it
    noun = "control video" if main_key == "control" else "image"
    for key in extras:
        if key not in keys:
            if key in REQUIRED:
                reader.problem(keys[main_key][0], f"{what}: model.task needs `{key}:` for each {noun}",
                               _how_to_give(key, next(iter(stems), "alice")))
            continue
        key_node, node = keys[key]
        reported: set[str] | None = set()  # stems whose input of this key was reported already (None: any)
        if key == "camera":
            _read_camera(reader, what, node, stems, inputs, nodes)
        elif key == "driving":
            _read_driving(reader, what, node, base, stems, inputs, nodes)
        else:
            reported = _read_files(reader, what, key, node, base, stems, noun, inputs, nodes, read_files)
        if key in REQUIRED and reported is not None:
            role = "pose_video" if key == "driving" else ROLES[key]
            for stem, file in stems.items():
                if role not in inputs[stem] and (lost is not None and stem not in lost) \
                        and stem not in reported and (stem, role) not in nodes:
                    reader.problem(key_node, f"{what}: {noun} `{file.name}` has no {key} (`{stem}` is missing under "
                                         f"`{key}:`)", _how_to_give(key, stem))
    return inputs


def _how_to_give(key: str, stem: str) -> str:
    if key == "driving":
        return (f"add `driving: {{{stem}: prep/{stem}}}` (a folder holding {' and '.join(DRIVING_FILES.values())}, "
                "as Wan2.2-Animate's preprocessing writes them), or `driving: prep` holding a folder per image stem")
    return f"add `{key}/{stem}.wav` to `{key}:` or map `{stem}: path/to/file` under it"


def _read_files(reader, what, key, node, base, stems, noun, inputs, nodes, read_files) -> set[str] | None:
    """Fill `inputs` from a list, glob or mapping of files; return the stems of files reported missing or
    unreadable (None where a glob matched nothing)."""
    role = ROLES[key]
    if isinstance(node, yaml.MappingNode):
        for stem_node, file_node in node.value:
            stem = reader.value(stem_node)
            stem = str(stem)
            if stem not in stems:
                reader.problem(stem_node, f"{what}: `{key}:` names `{stem}`, but there is no such {noun}",
                               f"use one of: {', '.join(stems) or '(none)'}")
                continue
            files, _ = read_files(reader, what, file_node, base, key)
            if len(files) > 1:
                reader.problem(file_node, f"{what}: `{key}:` gives {len(files)} files for `{stem}`", "give one file")
            elif files:
                inputs[stem][role] = str(files[0])
                nodes[(stem, role)] = file_node
            else:
                nodes[(stem, role)] = file_node  # reported already
        return set()
    files, reported = read_files(reader, what, node, base, key)
    for file in files:
        if file.stem not in stems:
            reader.problem(node, f"{what}: {key} `{file.name}` goes with no {noun} (no `{file.stem}` among "
                                 f"{', '.join(sorted(stems)) or 'none'})",
                           f"name it after its {noun}'s stem, or map `stem: {file.name}` under `{key}:`")
        elif role in inputs[file.stem]:
            reader.problem(node, f"{what}: two {key} files for `{file.stem}` "
                                 f"({Path(inputs[file.stem][role]).name}, {file.name})", "keep one")
        else:
            inputs[file.stem][role] = str(file)
            nodes[(file.stem, role)] = node
    return reported


def _read_driving(reader, what, node, base, stems, inputs, nodes) -> None:
    def folder_of(value_node) -> Path | None:
        value = reader.value(value_node)
        if not isinstance(value, str) or not value.strip():
            reader.problem(value_node, f"{what}: driving must be a folder, or a mapping from image stem to folder",
                           _how_to_give("driving", next(iter(stems), "alice")))
            return None
        return Path(os.path.abspath(value if os.path.isabs(value) else base / value))

    if isinstance(node, yaml.MappingNode):
        given = []
        for stem_node, folder_node in node.value:
            stem = str(reader.value(stem_node))
            if stem not in stems:
                reader.problem(stem_node, f"{what}: `driving:` names `{stem}`, but there is no such image",
                               f"use one of: {', '.join(stems) or '(none)'}")
                continue
            folder = folder_of(folder_node)
            if folder is not None:
                given.append((stem, folder, folder_node))
            nodes[(stem, "pose_video")] = folder_node
    else:
        root = folder_of(node)
        if root is None:
            for stem in stems:
                nodes[(stem, "pose_video")] = node
            return
        if not root.is_dir():
            reader.problem(node, f"{what}: driving folder `{root}` does not exist",
                           "fix the path; relative paths start at the manifest's folder")
            for stem in stems:
                nodes[(stem, "pose_video")] = node
            return
        given = [(stem, root / stem, node) for stem in stems]
    for stem, folder, at in given:
        missing = [name for name in DRIVING_FILES.values() if not (folder / name).is_file()]
        if missing:
            reader.problem(at, f"{what}: the driving folder of `{stem}` ({folder}) has no {' and no '.join(missing)}",
                           "run Wan2.2-Animate's preprocessing for that video into this folder (it writes "
                           f"{', '.join(DRIVING_FILES.values())})")
            nodes[(stem, "pose_video")] = at
            continue
        for role, name in DRIVING_FILES.items():
            inputs[stem][role] = str(folder / name)
            nodes[(stem, role)] = at


def _read_camera(reader, what, node, stems, inputs, nodes) -> None:
    choices = ", ".join(CAMERA_DIRECTIONS)
    pairs = ([(str(reader.value(k)), v, k) for k, v in node.value] if isinstance(node, yaml.MappingNode)
             else [(stem, node, node) for stem in stems])
    for stem, value_node, at in pairs:
        if stem not in stems:
            reader.problem(at, f"{what}: `camera:` names `{stem}`, but there is no such reference",
                           f"use one of: {', '.join(stems) or '(none)'}")
            continue
        value = reader.value(value_node)
        if value not in CAMERA_DIRECTIONS:
            reader.problem(value_node, f"{what}: camera is {value!r}",
                           f"use one of: {choices}; or a mapping from stem to one of them")
            return
        inputs[stem]["camera"] = value
        nodes[(stem, "camera")] = value_node
