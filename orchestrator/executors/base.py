"""The executor interface: start the supervised workers of a plan, and stop them.

Every executor runs the same program per worker (`python -m orchestrator.supervisor SPEC.json`), so
backends and workers behave the same everywhere; an executor only decides where that program runs.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

from ..planning import WorkerSpec
from ..sweep import Sweep, is_sweep_process


class ExecutorError(RuntimeError):
    """An executor cannot start or stop workers; the message says why and what to do."""


def supervisor_command(spec_file: Path) -> list[str]:
    return [sys.executable, "-m", "orchestrator.supervisor", str(spec_file)]


class Executor(ABC):
    name: ClassVar[str]
    detaches: ClassVar[bool] = False  # True: workers outlive the `run` command (tmux, ray)
    supervised: ClassVar[bool] = True  # each worker runs under `orchestrator.supervisor` (not on Ray)

    def __init__(self, sweep: Sweep):
        self.sweep = sweep

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this executor cannot run here (with how to fix it), or None."""
        return None

    @abstractmethod
    def start(self, specs: list[tuple[WorkerSpec, Path]]) -> list[str]:
        """Start one supervised worker per spec; return a name for each (session, pid, actor)."""

    def attach_hints(self, names: list[str]) -> list[str]:
        """Lines telling the user how to watch the workers this executor started."""
        return []

    def running(self) -> int:
        """How many of this sweep's workers are alive now."""
        return len(self.sweep.live_workers(self.sweep.ledger()))

    def wait(self, poll_s: float = 1.0) -> None:
        """Block until every worker this executor started has ended (local); others return at once."""

    def stop(self, now: bool = False, timeout_s: float = 30.0) -> int:
        """Stop the sweep's workers: ask them to finish cleanly, or kill them (`now`).

        Works from any process: it finds workers through the ledger and checks that each pid is
        really one of ours before signalling it. The jobs they held go back to the queue without
        using an attempt, killed or not. Returns how many processes were signalled.
        """
        ledger = self.sweep.ledger()
        ledger.request_stop()
        pids = set()
        for worker in ledger.workers():
            for pid in (worker["supervisor_pid"], worker["pid"]):
                if pid and is_sweep_process(pid):
                    pids.add(pid)
        sig = signal.SIGKILL if now else signal.SIGTERM
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(is_sweep_process(p) for p in pids):
            time.sleep(0.2)
        for pid in pids:  # whoever ignored SIGTERM for timeout_s
            if is_sweep_process(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for worker in ledger.workers():  # what a killed worker held: back without using an attempt
            ledger.release_worker(worker["id"], "sweep stopped")
        return len(pids)
