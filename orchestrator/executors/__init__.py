"""Executors start a plan's workers somewhere and stop them. One file per kind; this registry names them.

This is the one list of executors: the manifest's `execution.executor` choices, the command line's
`--executor` choices and `stop`'s search for a sweep's workers all read it. It imports nothing, so the
manifest can read the names without loading any executor (Ray is imported only when it runs).
"""
from __future__ import annotations

import importlib

EXECUTORS: dict[str, str] = {  # in the order `stop` looks for a sweep's workers
    "tmux": "orchestrator.executors.tmux:TmuxExecutor",
    "local": "orchestrator.executors.local:LocalExecutor",
    "ray": "orchestrator.executors.ray:RayExecutor",
}
EXECUTOR_NAMES: tuple[str, ...] = tuple(EXECUTORS)
DEFAULT_EXECUTOR = "tmux"  # where tmux is missing, `unavailable()` says how to install it (no silent fallback)


def executor_class(name: str):
    """The class of the executor `name` (a key of EXECUTORS), imported now."""
    module, _, attr = EXECUTORS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


# The interface itself is `executors.base.Executor`: importing it here would make the manifest (which
# reads EXECUTOR_NAMES) depend on the sweep and the planner.
__all__ = ["DEFAULT_EXECUTOR", "EXECUTORS", "EXECUTOR_NAMES", "executor_class"]
