"""The executor interface: everything `run`, `plan` and `stop` need of an executor.

An executor plans over its resources (this machine's GPUs, or a cluster's nodes), starts one worker
per slot of that plan, says whether it drives the sweep from the `run` command itself, counts the
workers alive, waits for them and stops them. Every executor runs the same job loop per worker
(`orchestrator.job_loop`), so backends and workers behave the same everywhere; an executor only
decides where that loop runs.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

from ..errors import WanSweepError
from ..gpus import NoGpus, discover
from ..locks import is_sweep_process
from ..planning import Plan, PlanError, WorkerSpec, make_plan
from ..sizing import make_sizer
from ..sweep import Sweep


class ExecutorError(WanSweepError, RuntimeError):
    """An executor cannot start or stop workers; the message says why and what to do."""


def machine_gpus():
    """This machine's usable GPUs and, where there are none, why: (gpus, None) or (None, reason)."""
    try:
        return discover(), None
    except NoGpus as exc:
        return None, str(exc)


def plan_this_machine(manifest, jobs, cpu_slots: int | None = None, recalibrate: bool = False):
    """The plan over this machine's GPUs (sized by calibration where asked), or its CPU slots."""
    gpus, why = machine_gpus()
    sizer = make_sizer(manifest, recalibrate=recalibrate) if gpus else None
    try:
        plan = make_plan(manifest, jobs, gpus, cpu_slots=cpu_slots, sizing=sizer)
    except PlanError as exc:
        raise PlanError(f"{exc} ({why})" if why else str(exc)) from None
    return plan, gpus, why


def supervisor_command(spec_file: Path) -> list[str]:
    return [sys.executable, "-m", "orchestrator.supervisor", str(spec_file)]


class Executor(ABC):
    name: ClassVar[str]
    detaches: ClassVar[bool] = False  # True: workers outlive the `run` command (tmux); False: `run` stays
    supervised: ClassVar[bool] = True  # each worker runs under `orchestrator.supervisor` (not on Ray)
    plans_here: ClassVar[bool] = True  # plans over this machine's GPUs; False: over its own resources

    def __init__(self, sweep: Sweep):
        self.sweep = sweep

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this executor cannot run here (with how to fix it), or None."""
        return None

    @classmethod
    def drives(cls, sweep: Sweep) -> bool:
        """Whether a `run` of this executor drives `sweep` in the foreground now (then only this
        executor can stop it). Works where the executor's own libraries are missing."""
        return False

    def make_plan(self, jobs, cpu_slots: int | None = None,
                  recalibrate: bool = False) -> tuple[Plan, list | None, str | None]:
        """The plan over this executor's resources: (plan, this machine's GPUs it used or None, why
        this machine has no usable GPU or None). Raises PlanError or ExecutorError."""
        return plan_this_machine(self.sweep.manifest, jobs, cpu_slots, recalibrate)

    @abstractmethod
    def start(self, specs: list[tuple[WorkerSpec, Path]]) -> list[str]:
        """Start one supervised worker per spec; return a name for each (session, pid, actor)."""

    def attach_hints(self, names: list[str]) -> list[str]:
        """Lines telling the user how to watch the workers this executor started."""
        return []

    def running(self) -> int:
        """How many of the sweep's workers are alive now (`locks.alive_workers`; an executor that started
        processes of its own counts those it waits for, `wait`)."""
        return len(self.sweep.alive_workers())

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
            for pid in (worker.supervisor_pid, worker.pid):
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
            ledger.release_worker(worker.id, "sweep stopped")
        return len(pids)
