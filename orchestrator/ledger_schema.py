"""The ledger's schema and its versions: the tables, and the steps that upgrade a ledger written by an
older version (`MIGRATIONS[n]` takes version n to n + 1; `Ledger` applies them when it opens a file)."""
from __future__ import annotations

import sqlite3

# Version 1 of the schema, the first with a version number (older ledgers are version 0). Frozen:
# a later version changes it through a new step in `MIGRATIONS`, never by editing this text.
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    ordinal INTEGER NOT NULL,
    queue TEXT NOT NULL,
    grp TEXT NOT NULL,
    category TEXT NOT NULL,
    payload TEXT NOT NULL,
    active INTEGER NOT NULL DEFAULT 1,
    state TEXT NOT NULL DEFAULT 'pending',   -- pending | running | done | failed
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    claimed_at REAL,
    heartbeat_at REAL,
    finished_at REAL,
    seconds REAL,
    skipped INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (state, queue, ordinal);
CREATE INDEX IF NOT EXISTS jobs_group ON jobs (state, grp, ordinal);
CREATE TABLE IF NOT EXISTS attempts (
    job_id TEXT NOT NULL,
    worker TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    outcome TEXT,           -- done | error | oom | timeout | lost | released
    error TEXT
);
CREATE INDEX IF NOT EXISTS attempts_job ON attempts (job_id);
CREATE INDEX IF NOT EXISTS attempts_end ON attempts (finished_at);
CREATE INDEX IF NOT EXISTS attempts_worker_end ON attempts (worker, finished_at);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    host TEXT,
    pid INTEGER,
    supervisor_pid INTEGER,
    devices TEXT,
    state TEXT,             -- starting | loading | idle | running | exited | stopped | failed | retired
    started_at REAL,
    heartbeat_at REAL,
    job TEXT,
    jobs_done INTEGER NOT NULL DEFAULT 0,
    busy_s REAL NOT NULL DEFAULT 0,
    ooms INTEGER NOT NULL DEFAULT 0,
    restarts INTEGER NOT NULL DEFAULT 0,
    message TEXT,
    phase TEXT              -- before its first job: what it is doing (importing, loading the model)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


def _to_version_1(db: sqlite3.Connection) -> None:
    """A new ledger gets every table; one from before schema versions gets what it may lack: the
    workers' `phase` column and the attempts' end indexes."""
    for statement in SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)
    if "phase" not in {row[1] for row in db.execute("PRAGMA table_info(workers)")}:
        db.execute("ALTER TABLE workers ADD COLUMN phase TEXT")


def _to_version_2(db: sqlite3.Connection) -> None:
    """Claims belong to one process lifetime: the `life` of the worker process that holds a job (and the
    worker's current one), so a restarted worker under the same name never keeps its predecessor's
    claims alive."""
    db.execute("ALTER TABLE jobs ADD COLUMN life TEXT")
    db.execute("ALTER TABLE workers ADD COLUMN life TEXT")


# MIGRATIONS[n] takes a ledger from version n to n + 1, inside the opening transaction. A new version
# appends a step (and never edits an earlier one): every ledger, new or old, goes through the same steps.
MIGRATIONS = (_to_version_1, _to_version_2)
SCHEMA_VERSION = len(MIGRATIONS)
