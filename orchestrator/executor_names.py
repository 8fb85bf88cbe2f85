"""The names of the executors: the manifest's `execution.executor` choices, the command line's
`--executor` choices and the order in which `stop` looks for a sweep's workers.

A leaf: it imports nothing, so the manifest and the command line read the names without the
executors (whose registry, `orchestrator.executors`, maps each name to its class).
"""
from __future__ import annotations

EXECUTOR_NAMES: tuple[str, ...] = ("tmux", "local", "ray")  # in the order `stop` looks for a sweep's workers
DEFAULT_EXECUTOR = "tmux"  # where tmux is missing, `unavailable()` says how to install it (no silent fallback)
