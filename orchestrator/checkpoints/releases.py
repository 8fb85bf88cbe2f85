"""Wan's official releases on the Hugging Face hub: which repository holds a model family in which
layout, and the one download command every backend's missing-checkpoint fix prints.

The family comes from what the user already wrote: a `model.path` folder named after its release
(`models/Wan2.2-T2V-A14B-Diffusers`), or generate.py's task for the command backend. Where neither
names one, the fix lists the releases that can run the manifest's task.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..invocation import command_prefix, shell_path

HUB_ORG = "Wan-AI"


@dataclass(frozen=True)
class Release:
    """A model family on the hub: the tasks of this product it runs, its owner, and the name suffix of its
    diffusers-layout repository (None: the hub has the original layout only)."""
    tasks: tuple[str, ...]
    owner: str = HUB_ORG
    diffusers: str | None = "-Diffusers"


# family → its release; the hub has each as `<owner>/<family>` (the original layout: Wan's generate.py,
# DiffSynth) and, where it has one, `<owner>/<family><diffusers suffix>` (diffusers)
FAMILIES: dict[str, Release] = {
    "Wan2.1-T2V-1.3B": Release(("t2v", "v2v")),
    "Wan2.1-T2V-14B": Release(("t2v", "v2v")),
    "Wan2.1-I2V-14B-480P": Release(("i2v",)),
    "Wan2.1-I2V-14B-720P": Release(("i2v",)),
    "Wan2.2-T2V-A14B": Release(("t2v", "v2v")),
    "Wan2.2-I2V-A14B": Release(("i2v",)),
    "Wan2.2-TI2V-5B": Release(("t2v", "i2v")),
    # the conditioned tasks' releases (issue 23); VACE's diffusers repositories end in lower-case `-diffusers`
    "Wan2.2-S2V-14B": Release(("s2v",), diffusers=None),
    "Wan2.1-VACE-1.3B": Release(("vace",), diffusers="-diffusers"),
    "Wan2.1-VACE-14B": Release(("vace",), diffusers="-diffusers"),
    "Wan2.2-Animate-14B": Release(("animate",)),
    # Wan-Fun's control models are Alibaba PAI's (DiffSynth loads them; no diffusers layout)
    "Wan2.1-Fun-1.3B-Control": Release(("control",), owner="alibaba-pai", diffusers=None),
    "Wan2.1-Fun-14B-Control": Release(("control",), owner="alibaba-pai", diffusers=None),
    "Wan2.1-Fun-V1.1-1.3B-Control": Release(("control",), owner="alibaba-pai", diffusers=None),
    "Wan2.1-Fun-V1.1-14B-Control": Release(("control",), owner="alibaba-pai", diffusers=None),
    "Wan2.1-Fun-V1.1-1.3B-Control-Camera": Release(("control",), owner="alibaba-pai", diffusers=None),
    "Wan2.1-Fun-V1.1-14B-Control-Camera": Release(("control",), owner="alibaba-pai", diffusers=None),
    "Wan2.2-Fun-A14B-Control": Release(("control",), owner="alibaba-pai", diffusers=None),
    "Wan2.2-Fun-A14B-Control-Camera": Release(("control",), owner="alibaba-pai", diffusers=None),
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
    """The hub repository of `family` in `layout`; the original one where the hub has no diffusers layout."""
    release = FAMILIES[family]
    suffix = release.diffusers if layout == "diffusers" and release.diffusers else ""
    return f"{release.owner}/{family}{suffix}"


def candidates(task: str | None, layout: str) -> list[str]:
    """The repositories in `layout` of the releases that run `task` (all of them for None)."""
    return [repo_id(f, layout) for f, release in FAMILIES.items()
            if (task is None or task in release.tasks) and (layout != "diffusers" or release.diffusers)]


def _hub_pages(repos: list[str]) -> str:
    owners = sorted({repo.split("/")[0] for repo in repos} or {HUB_ORG})
    return " and ".join(f"https://huggingface.co/{owner}" for owner in owners) + (" list them" if len(owners) > 1
                                                                                   else " lists them")


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
    if family and task and task not in FAMILIES[family].tasks:
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
        if not FAMILIES[family].diffusers and layout != "wan":
            other = " (the original layout, for diffsynth and generate.py: the hub has no diffusers layout of it)"
        repo = repo_id(family, layout or "diffusers")
        return f"download it: {_command()} {repo} --to {shell_path(where)}{then}{other}"
    what = {"diffusers": "the diffusers layout of ", "wan": "the original Wan layout of "}.get(layout or "", "")
    options = candidates(task, layout or "diffusers")
    if not options and layout == "diffusers":
        originals = ", ".join(candidates(task, "wan"))
        return (f"the hub has no diffusers layout of a release that runs task {task}: use the diffsynth backend (or "
                f"generate.py) with the original layout, {_command()} REPO_ID --to {shell_path(where)}; REPO_ID is "
                f"one of {originals}")
    return (f"download {what}your model: {_command()} REPO_ID --to {shell_path(where)}{then}; REPO_ID is one of "
            f"{', '.join(options)}" + (f" (the releases that run task {task})" if task else "")
            + ("" if layout else ", or the same without -Diffusers for diffsynth and generate.py")
            + f"; {_hub_pages(options)} all")


def repair_fix(root: str | os.PathLike, layout: str | None) -> str:
    """The fix for a checkpoint with missing or broken files: the same download into the same folder
    (it resumes and fetches only what is missing or broken)."""
    family = family_of(Path(root).name)
    repo = repo_id(family, layout) if family and layout in LAYOUTS else "REPO_ID"
    return (f"download it again into the same folder (`{_command()} {repo} --to {shell_path(root)}` resumes and "
            "fetches only what is missing or broken), or point model.path at a complete copy")
