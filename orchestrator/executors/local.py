"""The local executor: supervised workers as plain child processes of the `run` command."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

from ..planning import WorkerSpec
from ..sweep import python_env
from .base import Executor, supervisor_command


class LocalExecutor(Executor):
    name = "local"
    detaches = False

    def __init__(self, sweep):
        super().__init__(sweep)
        self.children: list[subprocess.Popen] = []

    def start(self, specs: list[tuple[WorkerSpec, Path]]) -> list[str]:
        names = []
        for spec, path in specs:
            # The terminal keeps the progress bar. What the worker logs goes to its log file already; what
            # it prints to stderr (a traceback of a crash while importing or loading) is appended there too.
            Path(spec.log).parent.mkdir(parents=True, exist_ok=True)
            with open(spec.log, "ab") as log:
                child = subprocess.Popen(supervisor_command(path), env=python_env(),
                                         stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL)
            self.children.append(child)
            names.append(f"{spec.worker} (pid {child.pid})")
        return names

    def running(self) -> int:
        return sum(child.poll() is None for child in self.children)

    def wait(self, poll_s: float = 1.0) -> None:
        while self.running():
            time.sleep(poll_s)
