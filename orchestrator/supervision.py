"""The supervision policy: when a worker is hung, when a job ran too long, whether a crashed worker is
restarted (and after how long) or given up on, when repeated out-of-memory retires a worker from a shared
card, and how a failure is summarised. Also the one vocabulary of worker states.

A pure object, read from `execution:`: the supervisor applies it to a worker process (local, tmux), the
Ray driver to an actor, the worker's heartbeat thread to itself. A rule changed here changes under every
executor.
"""
from __future__ import annotations

from dataclasses import dataclass

# A worker's states, in the ledger and in every executor's view of it.
STARTING, LOADING, IDLE, RUNNING = "starting", "loading", "idle", "running"
EXITED, STOPPED, FAILED, RETIRED = "exited", "stopped", "failed", "retired"
LIVE_WORKER_STATES = (STARTING, LOADING, IDLE, RUNNING)
ENDED_WORKER_STATES = (EXITED, STOPPED, FAILED, RETIRED)
WORKER_STATES = LIVE_WORKER_STATES + ENDED_WORKER_STATES

OOMS_BEFORE_RETIRE = 2  # out-of-memory failures in a row before a worker leaves a card it shares
SUMMARY_CHARS = 500  # what the ledger keeps of an error


@dataclass(frozen=True)
class Restart:
    """Start the worker again after `delay_s`; it has now crashed `crashes_in_row` times in a row."""
    delay_s: float
    crashes_in_row: int


@dataclass(frozen=True)
class GiveUp:
    """The worker failed for good: `message` says why (the ledger, the log and the screen show it)."""
    message: str
    crashes_in_row: int


@dataclass(frozen=True)
class Policy:
    heartbeat_timeout_s: float = 300.0
    job_timeout_s: float = 3600.0
    max_restarts: int = 3

    @classmethod
    def of(cls, execution) -> "Policy":
        """The policy of a manifest's `execution:` (its typed settings, as a worker spec carries them too)."""
        return cls(float(execution.heartbeat_timeout_s), float(execution.job_timeout_s), int(execution.max_restarts))

    # ------------------------------------------------------------------ liveness
    @property
    def beat_every_s(self) -> float:
        """How often a live worker beats: five beats per timeout, between 0.2 and 5 seconds."""
        return max(0.2, min(5.0, self.heartbeat_timeout_s / 5))

    def hung(self, silent_s: float, loading: bool = False) -> bool:
        """A worker that has shown no progress for `silent_s` is hung, unless it is in a long silent call
        that is known to take minutes (loading the model, the first compiling call)."""
        return not loading and silent_s > self.heartbeat_timeout_s

    def timed_out(self, job_s: float) -> bool:
        """A job that has run this long is abandoned (its attempt used) and its worker replaced."""
        return job_s > self.job_timeout_s

    # ------------------------------------------------------------------ crashes
    def restart_delay(self, crashes_in_row: int) -> float:
        """The pause before restarting a worker that failed `crashes_in_row` times: 1, 2, 4 … 60 s."""
        return min(60.0, 2.0 ** (crashes_in_row - 1))

    def after_crash(self, reason: str, crashes_in_row: int, finished_a_job: bool) -> Restart | GiveUp:
        """What to do with a worker that died (`reason`) after `crashes_in_row` crashes in a row before
        this one; `finished_a_job`: it made a video since the last crash, which breaks the row."""
        crashes = 1 if finished_a_job else crashes_in_row + 1
        if crashes > self.max_restarts:
            return GiveUp(f"{reason}; gave up after {crashes - 1} restarts in a row without a finished job "
                          f"(execution.max_restarts={self.max_restarts})", crashes)
        return Restart(self.restart_delay(crashes), crashes)

    # ------------------------------------------------------------------ memory
    @staticmethod
    def retires(ooms_in_row: int) -> bool:
        """Whether a worker with this many out-of-memory failures in a row should leave its card (where
        another worker shares it: the ledger decides that, atomically)."""
        return ooms_in_row >= OOMS_BEFORE_RETIRE


def summarise(error: BaseException | str) -> str:
    """What the ledger and the screens keep of a failure: the error's type and its last line (a
    traceback's last line says what went wrong), at most `SUMMARY_CHARS` characters."""
    if isinstance(error, BaseException):
        last = (str(error).strip().splitlines() or [type(error).__name__])[-1]
        return f"{type(error).__name__}: {last}"[:SUMMARY_CHARS]
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "")[:SUMMARY_CHARS]
