"""The job source of a Ray actor: the job loop's calls (claim, complete, fail, …) asked of the driver.

The driver is the one process that opens the ledger, and a Ray driver cannot be called by its
actors. So the actor's `DriverJobSource` posts each call into a `Mailbox`, and the driver fetches
them with the actor's `exchange` method (a long poll: it returns as soon as calls are waiting),
serves them from its ledger (`Driver.serve`) and sends the answers back with its next `exchange`.
Each exchange also carries the loop's signs of life, which the driver turns into heartbeats.

With `execution.ray_stream_outputs: true` a finished video is encoded and checked here, and its
bytes go to the driver, which writes them into its own output folder the same atomic way.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

from ...job_loop import JobSource, Pulse, write_video
from ...planning import WorkerSpec

OK, ERROR = "ok", "error"


class DriverError(RuntimeError):
    """The driver could not serve a call (its ledger refused it): the actor's loop fails with it."""


def answered(answer: tuple[str, object]):
    """The value of one of the driver's answers (`Driver.serve`), or its error raised here."""
    status, value = answer
    if status != OK:
        raise DriverError(str(value))
    return value


class Mailbox:
    """Calls of one actor to its driver, waiting for answers; thread-safe (the loop and its writer)."""

    def __init__(self):
        self._ready = threading.Condition()
        self._outbox: list[tuple[int | None, str, dict]] = []
        self._answers: dict[int, tuple[str, object]] = {}
        self._next = 0

    def call(self, method: str, **args):
        """Ask the driver and wait for its answer."""
        with self._ready:
            self._next += 1
            seq = self._next
            self._outbox.append((seq, method, args))
            self._ready.notify_all()
            while seq not in self._answers:
                self._ready.wait()
            return answered(self._answers.pop(seq))

    def tell(self, method: str, **args) -> None:
        """Tell the driver something that needs no answer (a log line)."""
        with self._ready:
            self._outbox.append((None, method, args))
            self._ready.notify_all()

    def exchange(self, answers: dict[int, tuple[str, object]], wait_s: float) -> list[tuple[int | None, str, dict]]:
        """Hand over the driver's answers; return the calls waiting now, after at most `wait_s` seconds."""
        with self._ready:
            self._answers.update(answers)
            self._ready.notify_all()
            self._ready.wait_for(lambda: self._outbox, timeout=wait_s)
            calls, self._outbox = self._outbox, []
            return calls


class SignsOfLife(Pulse):
    """What the driver learns of the loop at each exchange: steps and polls seen, the job generating."""

    def __init__(self):
        self.signs = 0

    def sign_of_life(self) -> None:
        self.signs += 1

    def report(self) -> dict:
        return {"signs": self.signs, "job": self.job_id, "loading": self.loading}


class DriverJobSource(JobSource):
    """The jobs of one Ray worker slot, from the driver's ledger: every call is a question to the driver.

    `ask(method, **args)` asks and returns the answer: through the actor's `Mailbox` on a cluster, or a
    direct call of `Driver.serve` in the driver's own process.
    """

    def __init__(self, spec: WorkerSpec, ask, stream: bool = False, placement: dict | None = None):
        self.spec, self.ask, self.stream = spec, ask, stream
        self.placement = placement or {}

    def claim(self, prefer_group=None):
        from ...jobs import Job
        from ...ledger import Claim
        given = self.ask("claim", prefer_group=prefer_group)
        return None if given is None else Claim(Job.from_dict(given["job"]), given["attempt"])

    def complete(self, job_id, seconds, skipped=False):
        return self.ask("complete", job_id=job_id, seconds=seconds, skipped=skipped)

    def fail(self, job_id, message, outcome="error"):
        return self.ask("fail", job_id=job_id, message=message, outcome=outcome)

    def release(self, job_id):
        self.ask("release", job_id=job_id)

    def heartbeat(self, job_id):
        """Nothing to send: the driver beats for its slots from the signs of life each exchange carries."""

    def stop_requested(self):
        return self.ask("stop_requested")

    def unfinished(self):
        return self.ask("unfinished")

    def idle(self):
        self.ask("idle")

    def peek(self, prefer_group=None):
        from ...jobs import Job
        given = self.ask("peek", prefer_group=prefer_group)
        return None if given is None else Job.from_dict(given)

    def retire(self, ooms):
        return self.ask("retire", ooms=ooms)

    def store_video(self, spec, job, result, record):
        record = dict(record or {}, ray={k: self.placement.get(k) for k in ("node_id", "ip", "gpu_ids")})
        if not self.stream:  # shared storage: the driver's folder is mounted here at the same path
            return super().store_video(spec, job, result, record)
        folder = Path(tempfile.mkdtemp(prefix="wan-sweep-"))
        try:  # encode and check it on this node; the driver gets its bytes and the sidecar
            from ...outputs import read_sidecar
            target = folder / "video.mp4"
            if isinstance(result, (str, os.PathLike)):
                raw = folder / "raw.mp4"
                shutil.move(str(result), raw)
                result = raw
            write_video(spec, result, target, record, job=job)
            return self.ask("store", job_id=job.id, mp4=target.read_bytes(), sidecar=read_sidecar(target))
        finally:
            shutil.rmtree(folder, ignore_errors=True)


class ToDriver(logging.Handler):
    """The loop's log lines, sent to the driver, which writes them into the worker's log file."""

    def __init__(self, mailbox: Mailbox):
        super().__init__()
        self.mailbox = mailbox

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.mailbox.tell("log", level=record.levelno, message=record.getMessage())
        except Exception:
            self.handleError(record)
