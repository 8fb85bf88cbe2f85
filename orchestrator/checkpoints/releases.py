"""Wan's official releases on the Hugging Face hub: which repository holds a model family in which
layout, and the one download command every backend's missing-checkpoint fix prints.

The family comes from what the user already wrote: a `model.path` folder named after its release
(`models/Wan2.2-T2V-A14B-Diffusers`), or generate.py's task for the command backend. Where neither
names one, the fix lists the releases that can run the manifest's task.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..invocation import command_prefix, shell_path

HUB_ORG = "Wan-AI"
# family → the tasks of this product it can run; the hub has each as `Wan-AI/<family>` (the original
# layout: Wan's generate.py, DiffSynth) and `Wan-AI/<family>-Diffusers` (diffusers)
FAMILIES: dict[str, tuple[str, ...]] = {
    "Wan2.1-T2V-1.3B": ("t2v", "v2v"),
    "Wan2.1-T2V-14B": ("t2v", "v2v"),
    "Wan2.1-I2V-14B-480P": ("i2v",),
    "Wan2.1-I2V-14B-720P": ("i2v",),
    "Wan2.2-T2V-A14B": ("t2v", "v2v"),
    "Wan2.2-I2V-A14B": ("i2v",),
    "Wan2.2-TI2V-5B": ("t2v", "i2v"),
}
LAYOUTS = ("diffusers", "wan")  # as checkpoints.detect_layout names them


def _key(text: str) -> str:
    return text.lower().replace("_", "-")


def family_of(name: str) -> str | None:
    """The release a folder name (or generate.py task, `t2v-A14B`) names: its full name
    (`Wan2.1-T2V-14B-Diffusers`) or, where the model size is unambiguous, the part after `WanX.Y-`."""
    key = _key(name)
    for family in sorted(FAMILIES, key=len, reverse=True):  # I2V-14B-480P before a shorter match
        if _key(family) in key:
            return family
    for family in sorted(FAMILIES, key=len, reverse=True):
        short = _key(family.split("-", 1)[1])  # t2v-a14b, ti2v-5b, t2v-1.3b …
        if re.search(rf"(^|[^a-z0-9.]){re.escape(short)}($|[^a-z0-9.])", key):
            return family
    return None


def repo_id(family: str, layout: str) -> str:
    return f"{HUB_ORG}/{family}" + ("-Diffusers" if layout == "diffusers" else "")


def candidates(task: str | None, layout: str) -> list[str]:
    return [repo_id(f, layout) for f, tasks in FAMILIES.items() if task is None or task in tasks]


def _command() -> str:
    return f"{command_prefix()} models download"


def download_fix(path: str | os.PathLike, layout: str | None, task: str | None = None,
                 family: str | None = None) -> str:
    """The fix for a checkpoint folder that is not there (or not a checkpoint of `layout`): the
    `models download` command that fills `path` with the release its name (or `family`) names, or,
    where nothing names one, the same command with the releases that can run `task` to choose from.
    `layout` None: the one the folder's name says (`…-Diffusers`), else both are offered."""
    folder = Path(path)
    if layout is None and "diffusers" in _key(folder.name):
        layout = "diffusers"
    family = family_of(family) if family else family_of(folder.name)
    if family and task and task not in FAMILIES[family]:
        family = None  # the folder's name says one release, the task needs another
    where = folder
    if folder.is_dir() and any(folder.iterdir()):
        # never pour a download into a folder holding something else: a new folder beside it
        name = repo_id(family, layout).split("/")[1] if family and layout else f"{folder.name}-{layout or 'download'}"
        where = folder.parent / name
    then = "" if where == folder else f", then set model.path to {shell_path(where)}"
    if family:
        other = "" if layout else (f" (for the diffusers backend; {repo_id(family, 'wan')}, the original layout, "
                                   "for diffsynth and generate.py)")
        repo = repo_id(family, layout or "diffusers")
        return f"download it: {_command()} {repo} --to {shell_path(where)}{then}{other}"
    what = {"diffusers": "the diffusers layout of ", "wan": "the original Wan layout of "}.get(layout or "", "")
    options = candidates(task, layout or "diffusers")
    return (f"download {what}your model: {_command()} REPO_ID --to {shell_path(where)}{then}; REPO_ID is one of "
            f"{', '.join(options)}" + (f" (the releases that run task {task})" if task else "")
            + ("" if layout else ", or the same without -Diffusers for diffsynth and generate.py")
            + f"; https://huggingface.co/{HUB_ORG} lists them all")


def repair_fix(root: str | os.PathLike, layout: str | None) -> str:
    """The fix for a checkpoint with missing or broken files: the same download into the same folder
    (it resumes and fetches only what is missing or broken)."""
    family = family_of(Path(root).name)
    repo = repo_id(family, layout) if family and layout in LAYOUTS else "REPO_ID"
    return (f"download it again into the same folder (`{_command()} {repo} --to {shell_path(root)}` resumes and "
            "fetches only what is missing or broken), or point model.path at a complete copy")
