"""A manifest checked by its backend: `load_manifest` reads the YAML (`manifest`, which knows no
backend) and lets the chosen backend (`backends`) resolve its path options, name its runtime options
(left out of the job ids) and check what it supports, every problem reported together at its
manifest line.

It sits above both, so that neither imports the other: backends read the manifest's plain types.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Callable

from .backends import BACKENDS, BackendProblem, backend_class
from .manifest import Manifest, read_manifest


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
    backend = backend_class(manifest.model.backend)
    options = _resolve_path_options(manifest.model.backend, manifest.model.options, manifest.path.parent)
    manifest = replace(manifest, model=replace(manifest.model, options=options),
                       runtime_options=frozenset(backend.runtime_options))
    for found in backend.check(manifest):
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
