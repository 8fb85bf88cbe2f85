"""Executors start a plan's workers somewhere and stop them. One file per kind; this registry names them.

The names themselves, which the manifest's `execution.executor` choices, the command line's `--executor`
choices and `stop`'s search for a sweep's workers read, are `orchestrator.executor_names` (a leaf: the
manifest reads them without this package); here each name maps to its class, imported when it is asked
for (Ray is imported only when it runs).
"""
from __future__ import annotations

import importlib

EXECUTORS: dict[str, str] = {  # one per name of executor_names.EXECUTOR_NAMES, in its order
    "tmux": "orchestrator.executors.tmux:TmuxExecutor",
    "local": "orchestrator.executors.local:LocalExecutor",
    "ray": "orchestrator.executors.ray:RayExecutor",
}


def executor_class(name: str):
    """The class of the executor `name` (a key of EXECUTORS), imported now."""
    module, _, attr = EXECUTORS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


# The interface itself is `executors.base.Executor`: importing it here would make whoever asks for a class
# by name depend on the sweep and the planner.
__all__ = ["EXECUTORS", "executor_class"]
