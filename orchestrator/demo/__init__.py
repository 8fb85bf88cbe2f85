"""FAKE checkpoints for the demo, the tests and benchmarks: random weights, real shapes and files (their
videos are noise). The product reaches this package through the two functions here only, and this
module imports nothing heavy: the builders (`random_checkpoints`) and DiffSynth's classes at tiny widths
(`diffsynth_tiny`) are imported when one is built or loaded.

  materialize(path)   a `model.path` named `random-tiny-wan-<variant>` (the demo's) is built there in the
                      diffusers layout on first use (the diffusers backend's check asks); any other path
                      is left as it is, so a missing real checkpoint stays an error
  tiny_folder(path)   an original-layout tiny test folder (it carries `TINY_MARKER`, naming each file's
                      class and configuration, since DiffSynth's loader recognises full-size files only):
                      what each file is and how to load it, for the diffsynth backend; None for any other
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

# The diffusers-layout families `random_checkpoints.build_random_wan` builds
VARIANTS = ("t2v", "i2v", "a14b", "a14b-i2v", "ti2v", "vace", "animate")
FAKE_NAME = re.compile(r"^random-(?P<size>tiny)-wan-(?P<variant>" + "|".join(map(re.escape, VARIANTS)) + r")$")
TINY_MARKER = "wan_sweep_tiny_random.json"  # in a tiny original-layout folder (random_checkpoints.build_tiny_checkpoint)


def materialize(path: str | os.PathLike) -> bool:
    """A `model.path` named `random-tiny-wan-<variant>` (the demo's) is built there on first use.

    Only that name, which says it is a fake; any other missing checkpoint stays an error. Built
    beside and renamed into place, so an interrupted build, or two at once, never leave half a one.
    Returns True when the folder holds a diffusers checkpoint afterwards (a real one included).
    """
    folder = Path(path)
    match = FAKE_NAME.match(folder.name)
    if (folder / "model_index.json").is_file():
        return True
    if match is None or folder.exists():
        return False
    from .random_checkpoints import build_random_wan
    building = folder.with_name(f".{folder.name}.building-{os.getpid()}")
    log.info("building the random-weight %s checkpoint %s (a fake: its videos are noise)", match["variant"], folder)
    try:
        build_random_wan(building, size=match["size"], variant=match["variant"])
        try:
            os.rename(building, folder)
        except OSError:  # another process finished first: keep theirs
            log.debug("%s was built by another process meanwhile: kept", folder)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return (folder / "model_index.json").is_file()


class TinyFolder:
    """A tiny original-layout test folder: `components` is what its marker says each file is (DiffSynth's
    model-table entries: class, configuration, converter), `load` loads one file as that, through
    DiffSynth's own `load_model` (converters and VRAM wrappers included), without the recognition."""

    def __init__(self, components: dict):
        self.components = components

    def load(self, component: str, entry, config: dict, vram_limit):
        from .diffsynth_tiny import load_component
        return load_component(self.components[component], entry, config, vram_limit)


def tiny_folder(path: str | os.PathLike) -> TinyFolder | None:
    """The folder at `path` as a tiny test folder (it carries TINY_MARKER), else None."""
    marker = Path(path) / TINY_MARKER
    if not marker.is_file():
        return None
    return TinyFolder(json.loads(marker.read_text(encoding="utf-8"))["components"])
