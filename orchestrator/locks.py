"""Who is alive in a sweep, and who may start it: the locks of `<output_dir>/.sweep/` and the processes
behind the ledger's workers.

Starting is exclusive, with locks the kernel lets go of when their holder dies, however it dies
(`fcntl.flock`; no check-then-start): `.sweep/run.lock` is held by the `run` that starts the sweep
(or the `stop` that ends it) until its workers are up (`RunLock`), and `.sweep/locks/<worker>.lock` by
each worker's supervisor and worker for their whole lives (`hold_worker_lock`, `locked_workers`). A
`run` that cannot take the first, or finds any of the others held, starts nothing. `stop` leaves
`.sweep/stop-request`, so a `run` that was still starting when it was issued starts no worker
(`stop_requested_since`).

"Which of the sweep's workers are alive now?" has one answer, `alive_workers`: on this machine, those
whose supervisor or worker holds its lock (registered in the ledger or not yet); on a Ray cluster, those
the ledger calls alive while a driver holds `.sweep/ray-driver.lock`, or whose heartbeat on another
host is fresh.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

RUN_LOCK = "run.lock"
DRIVER_LOCK = "ray-driver.lock"  # held by a Ray driver for its whole life
WORKER_LOCKS = "locks"
STOP_REQUEST = "stop-request"


class RunLock:
    """`.sweep/run.lock`: one `run` (or `stop`) at a time sets the sweep up; it says who holds it. (Also
    `.sweep/ray-driver.lock`, held by a Ray driver for its whole life.)"""

    def __init__(self, path: Path):
        self.path = path
        self.stream = None

    def acquire(self, what: str, wait: bool = False, sweep: str | None = None, **facts) -> bool:
        """Take the lock (waiting for it with `wait`); False when another process holds it. `sweep`: the
        name of the manifest's sweep it sets up, for a racing `run` of another manifest to see; `facts`,
        more of what the holder says about itself."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stream = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(stream, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            stream.close()
            return False
        stream.seek(0)
        stream.truncate()
        stream.write(json.dumps({"pid": os.getpid(), "command": what, "since": time.time(), "sweep": sweep,
                                 **facts}))
        stream.flush()
        self.stream = stream
        return True

    def holder(self) -> dict:
        """What the holder wrote: {pid, command, since, sweep}; {} when unknown."""
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def held_by(self) -> dict | None:
        """What the holder wrote while a process holds the lock (`holder`); None while none does."""
        try:
            with open(self.path, encoding="utf-8") as stream:
                fcntl.flock(stream, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return self.holder()
        except OSError:  # no such file: never held
            pass
        return None

    def release(self) -> None:
        if self.stream is not None and not self.stream.closed:
            fcntl.flock(self.stream, fcntl.LOCK_UN)
            self.stream.close()


def run_lock(state_dir: Path) -> RunLock:
    """The run lock of the sweep whose state folder (`.sweep/`) is `state_dir`."""
    return RunLock(state_dir / RUN_LOCK)


def hold_worker_lock(spec) -> object:
    """Hold `.sweep/locks/<worker>.lock` (shared: the supervisor and its worker) for this process's
    life; keep the returned file open. Waits only while a `run` checks the lock (an instant)."""
    folder = Path(spec.ledger).parent / WORKER_LOCKS
    folder.mkdir(parents=True, exist_ok=True)
    stream = open(folder / f"{spec.worker}.lock", "a+b")
    fcntl.flock(stream, fcntl.LOCK_SH)
    return stream


def locked_workers(state_dir: Path) -> list[str]:
    """Workers whose supervisor or worker process is alive now (it holds its lock)."""
    folder = state_dir / WORKER_LOCKS
    held = []
    for path in sorted(folder.glob("*.lock")) if folder.is_dir() else []:
        try:
            with open(path, "rb") as stream:
                try:
                    fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    held.append(path.stem)
        except OSError:
            continue
    return held


def wait_for_worker_locks(state_dir: Path, workers: list[str], still_starting: Callable[[], int],
                          timeout_s: float = 30.0) -> None:
    """Return once every worker just started holds its lock (or `still_starting()` says none is
    left to wait for, or `timeout_s` passed): from then on a second `run` sees the sweep running."""
    deadline = time.monotonic() + timeout_s
    next_check = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        if not set(workers) - set(locked_workers(state_dir)):
            return
        if time.monotonic() > next_check:
            if not still_starting():
                return
            next_check = time.monotonic() + 1.0
        time.sleep(0.05)
    log.info("workers %s hold no lock %.0f s after their start: until they do, a second `run` does not see them",
             ", ".join(sorted(set(workers) - set(locked_workers(state_dir)))), timeout_s)


def request_stop(state_dir: Path) -> None:
    """Leave the time of a `stop` where a `run` that is starting at this moment will see it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / STOP_REQUEST).write_text(repr(time.time()), encoding="utf-8")


def stop_requested_since(state_dir: Path, since: float) -> bool:
    """A `stop` was issued at or after `since` (the start of the `run` asking)."""
    try:
        return float((state_dir / STOP_REQUEST).read_text(encoding="utf-8")) >= since
    except (OSError, ValueError):
        return False


def alive_workers(state_dir: Path, ledger=None) -> set[str]:
    """Ids of the sweep's workers alive now: the one answer to "is this worker alive?" (module docstring).

    `ledger`: the sweep's (open, read-only will do), for the workers of a Ray cluster; None where there is
    none yet.
    """
    alive = set(locked_workers(state_dir))
    if ledger is None:
        return alive
    driven = RunLock(state_dir / DRIVER_LOCK).held_by() is not None
    fresh_after = time.time() - float(ledger.get_meta("heartbeat_timeout_s", "300"))
    here = socket.gethostname()
    for worker in ledger.workers():
        if not worker.alive:
            continue
        if worker.host == here and (worker.pid or worker.supervisor_pid):
            continue  # a process of this machine: alive only while it holds its lock (above)
        # a Ray driver's actor, another host's worker (alive while it beats), or a row no process of this
        # machine can be matched with (registered without a pid): the ledger's word
        if driven or worker.host == here or (worker.heartbeat_at or 0) >= fresh_after:
            alive.add(worker.id)
    return alive


def is_sweep_process(pid: int) -> bool:
    """A supervisor or worker of this product (a pid kept in the ledger may since have been reused)."""
    import psutil
    try:
        cmdline = " ".join(psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return "orchestrator.supervisor" in cmdline or "orchestrator.worker" in cmdline
