"""The ledger's worker rows: one per worker id, for its latest process lifetime, read as typed `WorkerRow`s
and changed only through intents (registering, loading, idle, exited, restarting, retired, failed), each
allowed from the states it names (`supervision`'s vocabulary). A mixin of `ledger.Ledger`, whose
connection, transactions and claim rules (`_end_lost_claims`) it uses; the jobs' rows are the ledger's.
"""
from __future__ import annotations

import socket
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from .supervision import (EXITED, FAILED, IDLE, LIVE_WORKER_STATES, LOADING, RETIRED, RUNNING, STARTING,
                          WORKER_STATES)


@dataclass(frozen=True)
class WorkerRow:
    """One worker as the ledger knows it (its latest process lifetime)."""
    id: str
    host: str | None
    pid: int | None
    supervisor_pid: int | None
    devices: str | None  # "0,1"; "" on CPU
    state: str  # supervision.WORKER_STATES
    started_at: float | None
    heartbeat_at: float | None
    job: str | None  # the job it generates now
    jobs_done: int
    busy_s: float
    ooms: int
    restarts: int
    message: str | None
    phase: str | None  # before its first job: what it is doing (importing, loading the model)
    life: str | None

    @property
    def alive(self) -> bool:
        """The ledger's word: a live state (whether its processes still exist: `liveness`)."""
        return self.state in LIVE_WORKER_STATES

    @property
    def device_ids(self) -> tuple[int, ...]:
        return tuple(int(d) for d in (self.devices or "").split(",") if d)


WORKER_COLUMNS = tuple(WorkerRow.__dataclass_fields__)



class WorkerRows:
    """The worker-row half of `Ledger` (see the module docstring)."""

    def register_worker(self, worker: str, devices: tuple[int, ...], pid: int | None = None,
                        supervisor_pid: int | None = None, state: str = "loading",
                        phase: str | None = None) -> str:
        """A new process lifetime of `worker` begins (its supervisor, or the worker process itself);
        return its `life` token, which its claims and heartbeats carry.

        Whatever an earlier lifetime under this name still holds goes back first (`requeue_worker`'s
        rule): the worker locks let only one lifetime of a name live at a time, so those claims are a
        dead process's, and a new process must never keep them alive.
        """
        now = time.time()
        life = uuid.uuid4().hex[:16]
        max_attempts, _ = self._limits()
        with self.transaction() as db:
            self._end_lost_claims(worker, None, f"worker {worker} was restarted while holding it (its earlier "
                                                "process died)", max_attempts, any_life=True)
            db.execute("INSERT INTO workers (id, host, pid, supervisor_pid, devices, state, started_at, "
                       "heartbeat_at, phase, life) VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET "
                       "host=excluded.host, pid=COALESCE(excluded.pid, pid), "
                       "supervisor_pid=COALESCE(excluded.supervisor_pid, supervisor_pid), "
                       "devices=excluded.devices, state=excluded.state, started_at=excluded.started_at, "
                       "heartbeat_at=excluded.heartbeat_at, job=NULL, message=NULL, phase=excluded.phase, "
                       "life=excluded.life",
                       (worker, socket.gethostname(), pid, supervisor_pid,
                        ",".join(map(str, devices)), state, now, now, phase, life))
        return life

    # A worker's row changes only through these intents, each allowed from the states named: a worker
    # retired, failed or stopped stays so until a new lifetime registers (`register_worker`).
    def _move(self, worker: str, to: str, allowed_from: tuple[str, ...], **columns) -> bool:
        """Set the worker's state (and these columns) if it is in one of `allowed_from`; True if it was."""
        assert to in WORKER_STATES
        names = "".join(f", {column}=?" for column in columns)
        with self.transaction() as db:
            moved = db.execute(f"UPDATE workers SET state=?{names} WHERE id=? AND state IN "
                               f"({','.join('?' * len(allowed_from))})",
                               (to, *columns.values(), worker, *allowed_from)).rowcount
        return bool(moved)

    def worker_loading(self, worker: str, phase: str | None) -> bool:
        """Before its first job: what it is doing (importing, loading the model)."""
        return self._move(worker, LOADING, (STARTING, LOADING, IDLE, RUNNING), phase=phase, message=None)

    def worker_placed(self, worker: str, host: str, devices: tuple[int, ...]) -> bool:
        """A cluster placed it (a Ray actor): on `host` (its node's own name, for `retire_if_shared`'s
        card-mates), on these cards of that node; it loads its model now."""
        return self._move(worker, LOADING, (STARTING, LOADING), host=host, devices=",".join(map(str, devices)),
                          phase=None, message=None)

    def worker_idle(self, worker: str) -> bool:
        """Loaded (or between jobs) and holding no job."""
        return self._move(worker, IDLE, (STARTING, LOADING, IDLE, RUNNING), phase=None, job=None)

    def worker_exited(self, worker: str, message: str | None = None) -> bool:
        """It ended by itself (no work left, a stop, a full disk) or died before saying so."""
        columns = {"message": message} if message is not None else {}
        return self._move(worker, EXITED, LIVE_WORKER_STATES, job=None, phase=None, **columns)

    def worker_restarting(self, worker: str, restarts: int, reason: str) -> bool:
        """It died and its supervisor starts it again (restart number `restarts`)."""
        return self._move(worker, STARTING, LIVE_WORKER_STATES + (EXITED,), job=None, restarts=restarts,
                          message=f"restart {restarts}: {reason}")

    def worker_retired(self, worker: str, message: str) -> bool:
        """It left its card for good (repeated out-of-memory where others share it: `retire_if_shared`)."""
        return self._move(worker, RETIRED, LIVE_WORKER_STATES, job=None, message=message)

    def worker_failed(self, worker: str, message: str, restarts: int | None = None) -> bool:
        """Given up on: `message` says why."""
        columns = {"restarts": restarts} if restarts is not None else {}
        return self._move(worker, FAILED, LIVE_WORKER_STATES + (EXITED,), job=None, message=message, **columns)

    def retire_if_shared(self, worker: str, devices: tuple[int, ...], message: Callable[[int], str]) -> int | None:
        """Mark the worker retired (`message(left)` says why) if another live worker shares one of its
        devices (on CPU: any other live worker); return how many remain, None (nothing changed) if none.

        One transaction, so two workers of a card that both keep running out of memory never both retire.
        """
        with self.transaction() as db:
            left = self._card_mates(worker, devices)
            if not left:
                return None
            db.execute("UPDATE workers SET state=?, job=NULL, message=? WHERE id=?", (RETIRED, message(left), worker))
        return left

    def _card_mates(self, worker: str, devices: tuple[int, ...]) -> int:
        """Live workers other than `worker` on its host that share one of its devices (on CPU: any other
        live worker of its host)."""
        me = self.worker(worker)
        mine = set(devices)
        mates = 0
        for other in self.workers():
            if other.id == worker or not other.alive or (me is not None and other.host != me.host):
                continue
            if set(other.device_ids) & mine or not mine:
                mates += 1
        return mates

    def workers(self) -> list["WorkerRow"]:
        cur = self.db.execute(f"SELECT {', '.join(WORKER_COLUMNS)} FROM workers ORDER BY id")
        return [WorkerRow(*row) for row in cur.fetchall()]

    def worker(self, worker: str) -> "WorkerRow | None":
        row = self.db.execute(f"SELECT {', '.join(WORKER_COLUMNS)} FROM workers WHERE id=?", (worker,)).fetchone()
        return WorkerRow(*row) if row else None
