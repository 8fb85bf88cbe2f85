"""The sweep's ledger: one SQLite file (WAL) with jobs, claims, attempts and workers.

The ledger decides what is in flight and keeps history; the disk decides what is done (see
`outputs`). Claims are atomic across processes (`BEGIN IMMEDIATE`), carry a heartbeat, and a claim
whose heartbeat stops goes back to the queue with its attempt used. Only the worker holding a claim
records its end.

A claim belongs to one process lifetime (`life`, from `register_worker`), never to a worker's name: a
restarted worker neither keeps nor records its predecessor's claims. When a worker dies, the job it was
generating is charged and the videos it was still writing go back unused (`_end_lost_claims`).

Every rule about the rows lives here and in the worker rows' half (`worker_rows`): no other module runs
SQL. Readers (`report`, the review page) open it read-only (`Ledger(path, readonly=True)`) and never take
the write lock. The schema carries a version (`ledger_schema`): a ledger of an older version is upgraded
step by step when opened, one of a newer version is refused.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from .errors import WanSweepError
from .jobs import Job
from .ledger_schema import MIGRATIONS, SCHEMA_VERSION
from .locks import request_stop, stop_requested_since
from .supervision import IDLE, LIVE_WORKER_STATES, RUNNING, STOPPED
from .worker_rows import WorkerRows

JOB_STATES = ("pending", "running", "done", "failed")
# Attempts whose end the worker recorded itself as it happened: their start and end times measure
# work. A `lost` attempt's end is when someone noticed (a sweep restarted hours later), a `released`
# one was cut short by a stop, a `skipped` one did nothing.
TIMED_OUTCOMES = ("done", "error", "oom", "timeout")


class LedgerError(WanSweepError, RuntimeError):
    """The ledger file cannot be used; the message says what is wrong and how to recover."""


class UnknownJob(LedgerError):
    """A job id the ledger does not hold (a claim or spec of another sweep, a mistyped id)."""


def ledger_problem(path: str | os.PathLike, error: BaseException) -> str:
    """What is wrong with the ledger at `path` (from the error SQLite or the OS gave), and the fix."""
    path = Path(path)
    text = str(error) or type(error).__name__
    if isinstance(error, sqlite3.DatabaseError) and not any(
            word in text for word in ("unable to open", "readonly", "read-only", "disk is full", "disk I/O")):
        return (f"the ledger {path} is damaged ({text}). The videos on disk are not affected. To recover, "
                f"set it aside and run again: the ledger is rebuilt from the disk (done videos count as done; "
                f"the history of attempts and failures is lost): mv {path} {path}.damaged")
    return (f"the ledger {path} cannot be opened for writing ({text}): is the output folder {path.parent.parent} "
            "read-only or its disk full? Make it writable (e.g. chmod -R u+w on it) or free some space, "
            "then run again; nothing made is lost")


@dataclass(frozen=True)
class Claim:
    job: Job
    attempt: int




class Ledger(WorkerRows):
    """One connection to the ledger at `path`, created (and upgraded to `SCHEMA_VERSION`) if needed.

    `readonly`: for readers (`report`, the review page): SQLite's `mode=ro`, no schema statement and no
    write lock, so a report never waits for a worker's transaction nor holds one up; any write raises
    `sqlite3.OperationalError`. The file must exist. One of an older version is upgraded first, once,
    as a write open would (in a read-only folder that fails: LedgerError, as any open did before).
    """

    def __init__(self, path: str | os.PathLike, timeout_s: float = 60.0, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self.db: sqlite3.Connection | None = None
        if self.path.is_dir():  # SQLite says "unable to open", which reads like a read-only folder
            raise LedgerError(f"the ledger {self.path} is a folder, not a ledger file (something other than "
                              f"wan-sweep made it). Move it aside and run again: the ledger is rebuilt from the "
                              f"disk (done videos count as done): mv {self.path} {self.path}.aside")
        try:
            if readonly:
                self.db = self._connect(timeout_s, readonly=True)
                if self._version() < SCHEMA_VERSION:
                    self.db.close()
                    Ledger(self.path, timeout_s).close()
                    self.db = self._connect(timeout_s, readonly=True)
                self._refuse_newer(self._version())
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.db = self._connect(timeout_s, readonly=False)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
                self._migrate()
        except LedgerError:
            self._close_quietly()
            raise
        except (sqlite3.DatabaseError, OSError) as exc:  # garbage in the file, a read-only folder, …
            self._close_quietly()
            raise LedgerError(ledger_problem(self.path, exc)) from None

    def _close_quietly(self) -> None:
        if self.db is not None:
            try:
                self.db.close()
            except sqlite3.Error:
                pass

    def _connect(self, timeout_s: float, readonly: bool) -> sqlite3.Connection:
        target, uri = (self.path.absolute().as_uri() + "?mode=ro", True) if readonly else (str(self.path), False)
        db = sqlite3.connect(target, uri=uri, timeout=timeout_s, isolation_level=None, check_same_thread=False)
        db.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
        return db

    def _version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def _refuse_newer(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise LedgerError(
                f"the ledger {self.path} was written by a newer version of wan-sweep (ledger schema version "
                f"{version}; this version knows up to {SCHEMA_VERSION}). Run this sweep with that newer version "
                "(pip install -U the package), or point output_dir at a new folder; nothing was changed")

    def _migrate(self) -> None:
        """Bring the ledger to `SCHEMA_VERSION`, one step of `MIGRATIONS` at a time, in one transaction."""
        if self._version() == SCHEMA_VERSION:
            return  # the usual case: no write lock taken
        self._refuse_newer(self._version())
        with self.transaction() as db:
            version = self._version()  # another process may have upgraded it meanwhile
            self._refuse_newer(version)
            for step in MIGRATIONS[version:]:
                step(db)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ---------------------------------------------------------------- meta
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str | None) -> None:
        if value is None:
            self.db.execute("DELETE FROM meta WHERE key = ?", (key,))
        else:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # A stop is kept in one place, `.sweep/stop-request` beside the ledger (`locks`), where a `run` that is
    # still starting sees it too; it applies to the sweep's session that began before it (`sync(fresh)`).
    def request_stop(self) -> None:
        request_stop(self.path.parent)

    def stop_requested(self) -> bool:
        return stop_requested_since(self.path.parent, float(self.get_meta("session_started", "0")))

    # ---------------------------------------------------------------- sweep set-up
    def sync(self, jobs: Iterable[Job], queues: dict[str, str], complete: set[str],
             max_attempts: int, heartbeat_timeout_s: float, fresh: bool) -> dict[str, int]:
        """Make the ledger hold exactly these jobs, with done-ness taken from the disk.

        `fresh` (no worker of this sweep alive): every unfinished job starts over with no attempt
        used, so a new `run` gives failed and interrupted jobs another chance. A job row in a state the
        ledger does not know (`JOB_STATES`; a damaged or hand-edited row) goes back to the queue; returns
        those states with how many rows each.
        """
        rows = [(j.id, j.ordinal, queues[j.id], j.group, j.category,
                 json.dumps(j.to_dict(), ensure_ascii=False)) for j in jobs]
        with self.transaction() as db:
            db.execute("UPDATE jobs SET active = 0")
            db.executemany(
                "INSERT INTO jobs (id, ordinal, queue, grp, category, payload) VALUES (?,?,?,?,?,?) "
                "ON CONFLICT(id) DO UPDATE SET ordinal=excluded.ordinal, queue=excluded.queue, "
                "grp=excluded.grp, category=excluded.category, payload=excluded.payload, active=1",
                rows)
            db.execute("CREATE TEMP TABLE IF NOT EXISTS complete_ids (id TEXT PRIMARY KEY)")
            db.execute("DELETE FROM complete_ids")
            db.executemany("INSERT OR IGNORE INTO complete_ids VALUES (?)", ((i,) for i in complete))
            now = time.time()
            db.execute("UPDATE jobs SET state='done', finished_at=COALESCE(finished_at, ?), last_error=NULL "
                       "WHERE active AND state != 'done' AND id IN (SELECT id FROM complete_ids)", (now,))
            db.execute("UPDATE jobs SET state='pending', attempts=0, worker=NULL, seconds=NULL, skipped=0 "
                       "WHERE active AND state = 'done' AND id NOT IN (SELECT id FROM complete_ids)")
            repaired = self.unknown_states()
            db.execute(f"UPDATE jobs SET state='pending', worker=NULL, life=NULL WHERE active AND state NOT IN "
                       f"({','.join('?' * len(JOB_STATES))})", JOB_STATES)
            if fresh:
                db.execute("UPDATE attempts SET finished_at=?, outcome='lost', error='sweep restarted' "
                           "WHERE finished_at IS NULL", (now,))
                db.execute("UPDATE jobs SET state='pending', attempts=0, worker=NULL "
                           "WHERE active AND state IN ('running', 'failed')")
                db.execute("UPDATE workers SET state='exited', job=NULL WHERE state IN "
                           f"({','.join('?' * len(LIVE_WORKER_STATES))})", LIVE_WORKER_STATES)
                db.execute("DELETE FROM meta WHERE key IN ('stop_requested', 'stop_reason')")  # (the first: older ledgers')
                db.execute("INSERT OR REPLACE INTO meta VALUES ('session_started', ?)", (str(now),))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('max_attempts', ?)", (str(max_attempts),))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('heartbeat_timeout_s', ?)",
                       (str(heartbeat_timeout_s),))
        return repaired

    # ---------------------------------------------------------------- claims
    def _limits(self) -> tuple[int, float]:
        return (int(self.get_meta("max_attempts", "3")),
                float(self.get_meta("heartbeat_timeout_s", "300")))

    def requeue_expired(self, db: sqlite3.Connection | None = None) -> int:
        """Claims whose heartbeat stopped go back to the queue: the process that held them is gone or
        hung, so all its claims go, by `_end_lost_claims`'s rule. Returns how many went back."""
        max_attempts, timeout = self._limits()
        cutoff = time.time() - timeout
        lives = (db or self.db).execute(
            "SELECT DISTINCT worker, life FROM jobs WHERE state='running' AND heartbeat_at < ?", (cutoff,)).fetchall()
        ended = 0
        for worker, life in lives:
            ended += self._end_lost_claims(worker, life, f"worker {worker} stopped beating for more than "
                                                         f"{timeout:.0f}s", max_attempts)
        return ended

    def _end_lost_claims(self, worker: str, life: str | None, reason: str, max_attempts: int,
                         any_life: bool = False) -> int:
        """The claims of one process lifetime of `worker` that died or hung (of every lifetime, with
        `any_life`): the newest, the job it was generating, is charged its attempt (`lost`); the older
        ones are finished videos its writer thread was still writing, not at fault:
        they go back without using an attempt."""
        where, params = "state='running' AND worker IS ?", [worker]
        if not any_life:
            where, params = where + " AND life IS ?", params + [life]
        claims = self.db.execute(f"SELECT id, life FROM jobs WHERE {where} ORDER BY claimed_at DESC, rowid DESC",
                                 params).fetchall()
        newest: dict[str | None, str] = {}
        for job_id, claim_life in claims:
            newest.setdefault(claim_life, job_id)
        for job_id, claim_life in claims:
            if newest[claim_life] == job_id:
                self._end_attempt(job_id, worker, "lost", reason, max_attempts)
            else:
                self._give_back(job_id, worker, "released", f"{reason}; its video was still being written, "
                                                            "so no attempt was used")
        return len(claims)

    def _give_back(self, job_id: str, worker: str | None, outcome: str, error: str | None) -> None:
        """Close the open attempt as `outcome` and put the job back without using an attempt."""
        self.db.execute("UPDATE attempts SET finished_at=?, outcome=?, error=? WHERE job_id=? AND worker IS ? "
                        "AND finished_at IS NULL", (time.time(), outcome, error, job_id, worker))
        self.db.execute("UPDATE jobs SET state='pending', worker=NULL, life=NULL, attempts=MAX(0, attempts-1) "
                        "WHERE id=? AND worker IS ? AND state='running'", (job_id, worker))
        self.db.execute("UPDATE workers SET job=NULL WHERE id=? AND job=?", (worker, job_id))

    def claim(self, worker: str, queue: str, prefer_group: str | None = None, life: str | None = None) -> Claim | None:
        """Atomically take the next job for `worker`, or None when nothing is pending.

        `life`: the process lifetime the claim belongs to (`register_worker` gave it); only that
        lifetime's heartbeats keep the claim alive. Order: the same reference as the last job (grouped
        work), then the worker's own queue in manifest order, then the back of the fullest other queue
        (stealing).
        """
        with self.transaction() as db:
            self.requeue_expired(db)
            row = self._next_pending(db, queue, prefer_group)
            if row is None:
                fullest = db.execute(
                    "SELECT queue FROM jobs WHERE state='pending' AND active GROUP BY queue "
                    "ORDER BY COUNT(*) DESC, queue LIMIT 1").fetchone()
                if fullest is not None:
                    row = db.execute(
                        "SELECT id, payload FROM jobs WHERE state='pending' AND active AND queue=? "
                        "ORDER BY ordinal DESC LIMIT 1", (fullest[0],)).fetchone()
            if row is None:
                return None
            now = time.time()
            db.execute("UPDATE jobs SET state='running', attempts=attempts+1, worker=?, life=?, claimed_at=?, "
                       "heartbeat_at=? WHERE id=?", (worker, life, now, now, row[0]))
            db.execute("INSERT INTO attempts (job_id, worker, started_at) VALUES (?,?,?)",
                       (row[0], worker, now))
            db.execute("UPDATE workers SET state=?, job=?, heartbeat_at=? WHERE id=?", (RUNNING, row[0], now, worker))
            attempt = db.execute("SELECT attempts FROM jobs WHERE id=?", (row[0],)).fetchone()[0]
        return Claim(Job.from_dict(json.loads(row[1])), attempt)

    def peek(self, queue: str, prefer_group: str | None = None) -> Job | None:
        """The job `claim` would most likely hand out next (same reference, then own queue); no claim.

        For reading ahead only: another worker may take it first, which costs a wasted read.
        """
        row = self._next_pending(self.db, queue, prefer_group)
        return Job.from_dict(json.loads(row[1])) if row else None

    @staticmethod
    def _next_pending(db: sqlite3.Connection, queue: str, prefer_group: str | None) -> tuple | None:
        """(id, payload) of the next pending job of the same reference, else of the worker's queue."""
        row = None
        if prefer_group is not None:
            row = db.execute("SELECT id, payload FROM jobs WHERE state='pending' AND active AND grp=? "
                             "ORDER BY queue != ?, ordinal LIMIT 1", (prefer_group, queue)).fetchone()
        if row is None:
            row = db.execute("SELECT id, payload FROM jobs WHERE state='pending' AND active AND queue=? "
                             "ORDER BY ordinal LIMIT 1", (queue,)).fetchone()
        return row

    def _end_attempt(self, job_id: str, worker: str | None, outcome: str, error: str | None,
                     max_attempts: int) -> str:
        """Close the open attempt and put the job back (or fail it for good); return its new state."""
        now = time.time()
        self.db.execute("UPDATE attempts SET finished_at=?, outcome=?, error=? WHERE job_id=? AND "
                        "worker IS ? AND finished_at IS NULL", (now, outcome, error, job_id, worker))
        attempts = self.db.execute("SELECT attempts FROM jobs WHERE id=?", (job_id,)).fetchone()[0]
        state = "failed" if attempts >= max_attempts else "pending"
        self.db.execute("UPDATE jobs SET state=?, worker=NULL, life=NULL, last_error=?, finished_at=? WHERE id=?",
                        (state, error, now if state == "failed" else None, job_id))
        self.db.execute("UPDATE workers SET job=NULL WHERE id=? AND job=?", (worker, job_id))
        return state

    def _holds(self, db: sqlite3.Connection, job_id: str, worker: str, life: str | None) -> bool:
        """Whether `worker` (in its lifetime `life`, where given) holds the claim on the job now;
        UnknownJob when the ledger has no such job."""
        row = db.execute("SELECT worker, state, life FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise UnknownJob(f"the ledger {self.path} has no job {job_id!r}: the worker or the claim belongs to "
                             "another sweep, or its spec file is out of date; run the sweep again")
        return row[:2] == (worker, "running") and (life is None or row[2] == life)

    def holds(self, job_id: str, worker: str, life: str | None = None) -> bool:
        """Whether `worker` holds the claim on the job now (its claim has not expired and moved on).

        Only the holder may record the job's end (`complete`, `fail`, `release`). UnknownJob for an id
        the ledger does not hold."""
        return self._holds(self.db, job_id, worker, life)

    def complete(self, job_id: str, worker: str, seconds: float, skipped: bool = False,
                 life: str | None = None) -> bool:
        """Record the job done by `worker` (its video is on disk); True when recorded.

        False, and nothing recorded, when the worker no longer holds the claim (it expired and went
        back to the queue, or another worker holds it now): the holder's own attempt stays the one
        that counts, so the caller must not count the job as its own. The video it wrote is not lost:
        the disk decides what is done, and the holder skips a job whose video is there.
        """
        now = time.time()
        with self.transaction() as db:
            if not self._holds(db, job_id, worker, life):
                return False
            db.execute("UPDATE jobs SET state='done', worker=?, life=NULL, finished_at=?, seconds=?, skipped=?, "
                       "last_error=NULL WHERE id=?", (worker, now, seconds, int(skipped), job_id))
            if skipped:
                db.execute("UPDATE jobs SET attempts=MAX(0, attempts-1) WHERE id=?", (job_id,))
            db.execute("UPDATE attempts SET finished_at=?, outcome=? WHERE job_id=? AND worker=? "
                       "AND finished_at IS NULL", (now, "skipped" if skipped else "done", job_id, worker))
            # A video is recorded while its worker may already run the next job: count it, and
            # show the worker idle only if it holds nothing else.
            db.execute("UPDATE workers SET jobs_done=jobs_done+?, busy_s=busy_s+? WHERE id=?",
                       (0 if skipped else 1, 0 if skipped else seconds, worker))
            db.execute("UPDATE workers SET job=NULL, state=? WHERE id=? AND job=?", (IDLE, worker, job_id))
        return True

    def fail(self, job_id: str, worker: str, error: str, outcome: str = "error", life: str | None = None) -> str:
        """Record a failed attempt; the job goes back to the queue until its attempts run out.

        Returns the job's new state, or "lost" (nothing recorded) when the worker no longer holds the
        claim: it had already expired and moved on."""
        max_attempts, _ = self._limits()
        with self.transaction() as db:
            if not self._holds(db, job_id, worker, life):
                return "lost"
            state = self._end_attempt(job_id, worker, outcome, error, max_attempts)
            if outcome == "oom":
                db.execute("UPDATE workers SET ooms=ooms+1 WHERE id=?", (worker,))
            db.execute("UPDATE workers SET state=? WHERE id=? AND job IS NULL AND state=?", (IDLE, worker, RUNNING))
        return state

    def release(self, job_id: str, worker: str, life: str | None = None, reason: str | None = None) -> None:
        """Give a job back without using an attempt (a graceful stop, a full or read-only disk); nothing
        changes unless `worker` holds the claim."""
        with self.transaction() as db:
            if self._holds(db, job_id, worker, life):  # UnknownJob for an id the ledger does not hold
                self._give_back(job_id, worker, "released", reason)

    def requeue_worker(self, worker: str, reason: str) -> int:
        """The worker's process died (every lifetime of it: its supervisor saw it go, or a new one
        registers): its claims go back to the queue at once, the job it was generating with its attempt
        used, the videos it was still writing without (`_end_lost_claims`)."""
        max_attempts, _ = self._limits()
        with self.transaction():
            return self._end_lost_claims(worker, None, reason, max_attempts, any_life=True)

    def release_worker(self, worker: str, reason: str) -> int:
        """The worker was stopped (`stop`, `stop --now`): its claims go back to the queue without using
        an attempt, and it is no longer alive. Returns how many jobs it held."""
        with self.transaction() as db:
            held = db.execute("SELECT COUNT(*) FROM jobs WHERE state='running' AND worker=?", (worker,)).fetchone()[0]
            db.execute("UPDATE attempts SET finished_at=?, outcome='released', error=? WHERE worker=? "
                       "AND finished_at IS NULL", (time.time(), reason, worker))
            db.execute("UPDATE jobs SET state='pending', worker=NULL, life=NULL, attempts=MAX(0, attempts-1) "
                       "WHERE worker=? AND state='running'", (worker,))
            db.execute(f"UPDATE workers SET state=?, job=NULL WHERE id=? AND state IN "
                       f"({','.join('?' * len(LIVE_WORKER_STATES))})", (STOPPED, worker, *LIVE_WORKER_STATES))
        return held

    def heartbeat(self, worker: str, job_id: str | None, life: str | None = None) -> None:
        """The worker (in its process lifetime `life`) is alive: its row and its claims are fresh."""
        now = time.time()
        with self.transaction() as db:
            db.execute("UPDATE workers SET heartbeat_at=? WHERE id=?", (now, worker))
            # Every claim of this lifetime (the one generating and the one whose video is being written),
            # never one an earlier process under the same name left behind.
            db.execute("UPDATE jobs SET heartbeat_at=? WHERE worker=? AND life IS ? AND state='running'",
                       (now, worker, life))

    # ---------------------------------------------------------------- queries
    def counts(self) -> dict[str, int]:
        rows = self.db.execute("SELECT state, COUNT(*) FROM jobs WHERE active GROUP BY state").fetchall()
        counts = {"pending": 0, "running": 0, "done": 0, "failed": 0}
        counts.update(dict(rows))
        return counts

    def unknown_states(self) -> dict[str, int]:
        """Job states the ledger does not know (`JOB_STATES`), with how many active rows hold each."""
        rows = self.db.execute(f"SELECT state, COUNT(*) FROM jobs WHERE active AND state NOT IN "
                               f"({','.join('?' * len(JOB_STATES))}) GROUP BY state", JOB_STATES).fetchall()
        return {str(state): count for state, count in rows}

    def verify(self) -> None:
        """LedgerError (with the fix) when SQLite finds the file damaged (`PRAGMA quick_check`)."""
        try:
            found = [row[0] for row in self.db.execute("PRAGMA quick_check")]
        except sqlite3.DatabaseError as exc:
            raise LedgerError(ledger_problem(self.path, exc)) from None
        if found != ["ok"]:
            raise LedgerError(ledger_problem(self.path, sqlite3.DatabaseError("; ".join(found[:3]))))

    def unfinished(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM jobs WHERE active AND state IN ('pending', 'running')"
                               ).fetchone()[0]

    def jobs(self, running_or_failed: bool = False) -> list[dict]:
        """Active jobs in manifest order; with `running_or_failed`, only those a report looks at."""
        where = "active" + (" AND state IN ('running', 'failed')" if running_or_failed else "")
        cur = self.db.execute("SELECT id, queue, state, attempts, worker, heartbeat_at, finished_at, "
                              f"seconds, skipped, last_error FROM jobs WHERE {where} ORDER BY ordinal")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    def output_folders(self) -> set[str]:
        """The folders the active jobs write into (where their temporary files are)."""
        rows = self.db.execute("SELECT DISTINCT json_extract(payload, '$.output') FROM jobs WHERE active")
        return {os.path.dirname(output) for (output,) in rows if output}

    def timed_attempts(self, worker: str | None = None) -> Iterator[tuple[float, float, bool]]:
        """(started_at, finished_at, made a video) of the attempts that measure work (`TIMED_OUTCOMES`),
        the newest end first, of one worker or of all; read lazily, so a caller stops when it has enough."""
        where = f"finished_at IS NOT NULL AND outcome IN ({','.join('?' * len(TIMED_OUTCOMES))})"
        params: tuple = TIMED_OUTCOMES
        if worker is not None:
            where += " AND worker = ?"
            params += (worker,)
        cur = self.db.execute(f"SELECT started_at, finished_at, outcome = 'done' FROM attempts WHERE {where} "
                              "ORDER BY finished_at DESC", params)
        return ((start, end, bool(made)) for start, end, made in cur)

    def attempts(self, job_id: str | None = None) -> list[dict]:
        query = "SELECT * FROM attempts" + (" WHERE job_id=?" if job_id else "") + " ORDER BY started_at"
        cur = self.db.execute(query, (job_id,) if job_id else ())
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]
