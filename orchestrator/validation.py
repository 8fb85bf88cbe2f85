"""A manifest checked by its backend: `load_manifest` reads the YAML (`manifest`, which knows no
backend) and lets the chosen backend (`backends`) resolve its path options and check what it
supports, each value of the `axes:` included, every problem reported together at its manifest line.

It sits above both, so that neither imports the other: backends read the manifest's plain types.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Callable

from .backends import BACKENDS, BackendProblem, backend_class
from .manifest import Manifest, apply_axes, read_manifest


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read and validate a manifest, its backend's checks included; raise ManifestError listing
    every problem."""
    return read_manifest(path, check=_check_backend)


def _check_backend(manifest: Manifest, problem: Callable[..., None]) -> Manifest:
    """Let the chosen backend check the manifest (unknown backend → a problem here); its path
    options come back resolved against the manifest's folder."""
    if manifest.model.backend not in BACKENDS:
        problem(("model.backend", "model"), f"unknown model.backend `{manifest.model.backend}`",
                f"use one of: {', '.join(sorted(BACKENDS))}")
        return manifest
    options = _resolve_path_options(manifest.model.backend, manifest.model.options, manifest.path.parent)
    manifest = replace(manifest, model=replace(manifest.model, options=options))
    backend = backend_class(manifest.model.backend)
    # With axes, the settings checked are those jobs run: each axis at its first value (a swept key's
    # own value under `generation:` is never used); a problem of a swept key is its axis's, below.
    first = {key: value for axis in manifest.axes for key, value in axis.assignments()[0].items()}
    swept = {f"generation.{key}" for key in first}
    found_before = set()
    for found in backend.check(replace(manifest, generation=apply_axes(manifest.generation, first), axes=())):
        if isinstance(found, BackendProblem) and found.key in swept:
            continue
        found_before.add(str(found))
        if isinstance(found, BackendProblem):
            problem((found.key, "model"), found.message, found.fix)
        else:
            problem(("model",), found)
    _check_axes(manifest, backend, first, swept, found_before, problem)
    return manifest


def _check_axes(manifest: Manifest, backend, first: dict, swept: set[str], found_before: set[str],
                problem: Callable[..., None]) -> None:
    """The backend's check of each axis value (each point of a zip group; the other axes at their
    first values), as if `generation:` held it: what it finds there and not without it is that value's
    problem, reported at the axis's line (a setting this backend does not take, a size it cannot make)."""
    for axis in manifest.axes:
        where = tuple(f"axes.{key}" for key in axis.keys) + ("axes.zip", "axes")
        others = swept - {f"generation.{key}" for key in axis.keys}  # another axis's problem, found there
        for values in axis.assignments():
            trial = replace(manifest, generation=apply_axes(manifest.generation, {**first, **values}), axes=())
            shown = ", ".join(f"{key} = {value!r}" for key, value in values.items())
            for found in backend.check(trial):
                if str(found) in found_before or getattr(found, "key", None) in others:
                    continue  # the manifest's own problem (reported above), or another axis's
                found_before.add(str(found))
                message = found.message if isinstance(found, BackendProblem) else found
                problem(where, f"axes ({shown}): {message}", getattr(found, "fix", "")
                        or f"remove this value from axes (the {manifest.model.backend} backend cannot run it)")


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
