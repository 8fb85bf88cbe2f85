"""Executors start a plan's workers somewhere and stop them. One file per kind; this registry names them."""
from __future__ import annotations

import importlib
from .base import Executor

EXECUTORS: dict[str, str] = {
    "local": "orchestrator.executors.local:LocalExecutor",
    "tmux": "orchestrator.executors.tmux:TmuxExecutor",
    "ray": "orchestrator.executors.ray:RayExecutor",  # Ray itself is imported only when it runs
}


def executor_class(name: str) -> type[Executor]:
    module, _, attr = EXECUTORS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


__all__ = ["EXECUTORS", "Executor", "executor_class"]
