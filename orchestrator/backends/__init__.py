"""Backends turn one job into frames. One file per library; this registry names them.

Classes are imported on first use, so choosing the synthetic backend never imports torch.
"""
from __future__ import annotations

import importlib

from .base import Backend, BackendProblem, OutOfMemory

BACKENDS: dict[str, str] = {
    "synthetic": "orchestrator.backends.synthetic:SyntheticBackend",
    "diffusers": "orchestrator.backends.diffusers_wan:DiffusersWanBackend",
    "diffsynth": "orchestrator.backends.diffsynth_wan:DiffSynthWanBackend",
    "command": "orchestrator.backends.command:CommandBackend",
}


def backend_class(name: str) -> type[Backend]:
    module, _, attr = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


__all__ = ["BACKENDS", "Backend", "BackendProblem", "OutOfMemory", "backend_class"]
