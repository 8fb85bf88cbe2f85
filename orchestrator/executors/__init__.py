"""Executors start a plan's workers somewhere and stop them. One file per kind; this registry names them."""
from __future__ import annotations

import importlib
import shutil

from .base import Executor

EXECUTORS: dict[str, str] = {
    "local": "orchestrator.executors.local:LocalExecutor",
    "tmux": "orchestrator.executors.tmux:TmuxExecutor",
}


def executor_class(name: str) -> type[Executor]:
    module, _, attr = EXECUTORS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def default_executor() -> str:
    """tmux where tmux exists, else local."""
    return "tmux" if shutil.which("tmux") and "tmux" in EXECUTORS else "local"


__all__ = ["EXECUTORS", "Executor", "default_executor", "executor_class"]
