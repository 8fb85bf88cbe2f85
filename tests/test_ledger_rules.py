"""The ledger's rules about its rows, tested directly: only the claim's holder records a job's end,
unknown job ids are named, readers open it read-only, and its schema carries a version."""
from __future__ import annotations

import json
import sqlite3

import pytest

from orchestrator.jobs import expand
from orchestrator.ledger import MIGRATIONS, SCHEMA_VERSION, Ledger, LedgerError, UnknownJob
from orchestrator.validation import load_manifest

from .conftest import synthetic_manifest


@pytest.fixture
def one_job_ledger(tmp_path, write_manifest):
    """A ledger holding one pending job in queue "q"; returns (ledger, job id)."""
    manifest = load_manifest(write_manifest(synthetic_manifest(categories={"a": {"prompts": ["p"]}}, seeds=[1])))
    (job,) = expand(manifest)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.sync([job], {job.id: "q"}, set(), max_attempts=3, heartbeat_timeout_s=300.0, fresh=True)
    yield ledger, job.id
    ledger.close()


def _lost_to_other(ledger: Ledger, job_id: str) -> None:
    """`stale` claims the job, is declared dead, and `owner` claims it again."""
    for worker in ("stale", "owner"):
        ledger.register_worker(worker, ())
    assert ledger.claim("stale", "q").job.id == job_id
    ledger.requeue_worker("stale", "its supervisor saw it die")
    assert ledger.claim("owner", "q").attempt == 2


def test_a_stale_worker_cannot_complete_a_job_another_worker_holds(one_job_ledger):
    ledger, job_id = one_job_ledger
    _lost_to_other(ledger, job_id)
    assert ledger.complete(job_id, "stale", 5.0) is False
    (row,) = ledger.jobs()
    assert row["state"] == "running" and row["worker"] == "owner"  # the owner's claim stands
    open_attempts = [a for a in ledger.attempts() if a["finished_at"] is None]
    assert [a["worker"] for a in open_attempts] == ["owner"]
    assert ledger.worker("stale").jobs_done == 0  # not counted for the stale worker
    assert ledger.complete(job_id, "owner", 5.0) is True
    assert ledger.jobs()[0]["state"] == "done" and ledger.worker("owner").jobs_done == 1
    assert [a["outcome"] for a in ledger.attempts()] == ["lost", "done"]


def test_a_job_back_in_the_queue_is_not_completed_by_its_old_worker(one_job_ledger):
    ledger, job_id = one_job_ledger
    ledger.claim("stale", "q")
    ledger.requeue_worker("stale", "gone")
    assert ledger.complete(job_id, "stale", 1.0) is False
    assert ledger.jobs()[0]["state"] == "pending"  # the next worker finds its video and skips it


def test_a_worker_cannot_fail_a_job_it_already_completed(one_job_ledger):
    ledger, job_id = one_job_ledger
    ledger.claim("w", "q")
    assert ledger.complete(job_id, "w", 1.0)
    assert ledger.fail(job_id, "w", "late error") == "lost"
    assert ledger.jobs()[0]["state"] == "done"


def test_a_stale_worker_cannot_release_the_new_owners_claim(one_job_ledger):
    ledger, job_id = one_job_ledger
    _lost_to_other(ledger, job_id)
    ledger.release(job_id, "stale")
    assert ledger.holds(job_id, "owner") and not ledger.holds(job_id, "stale")


def test_an_unknown_job_id_is_a_clear_error(one_job_ledger):
    ledger, _ = one_job_ledger
    for call in (lambda: ledger.fail("no-such-job", "w", "boom"), lambda: ledger.complete("no-such-job", "w", 1.0),
                 lambda: ledger.release("no-such-job", "w"), lambda: ledger.holds("no-such-job", "w")):
        with pytest.raises(UnknownJob, match="no job 'no-such-job'"):
            call()


def test_a_worker_retires_only_while_another_live_worker_shares_its_card(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.register_worker("a", (0,), state="running")
    ledger.register_worker("b", (0,), state="running")
    ledger.register_worker("c", (1,), state="running")
    assert ledger.retire_if_shared("a", (0,), lambda left: f"{left} left") == 1
    assert ledger.worker("a").state == "retired" and ledger.worker("a").message == "1 left"
    assert ledger.retire_if_shared("b", (0,), lambda left: "never") is None  # the card's last worker stays
    assert ledger.worker("b").state == "running"


# ------------------------------------------------------------------------------ read-only readers
def test_a_reader_opens_read_only_and_takes_no_write_lock(one_job_ledger):
    ledger, job_id = one_job_ledger
    writer = sqlite3.connect(ledger.path, timeout=0, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # a worker in the middle of a claim
    writer.execute("UPDATE jobs SET state='running', worker='w'")
    try:
        reader = Ledger(ledger.path, timeout_s=0.05, readonly=True)  # a write lock would fail at once
        assert reader.counts()["pending"] == 1 and reader.jobs()[0]["id"] == job_id  # the last committed state
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader.set_meta("stop_requested", "now")
        reader.close()
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_a_read_only_open_takes_any_folder_name(tmp_path):
    path = tmp_path / "50% done? #2 é" / "ledger.sqlite"  # characters a URI would read otherwise
    writer = Ledger(path)
    writer.set_meta("stop_reason", "disk full")
    assert Ledger(path, readonly=True).get_meta("stop_reason") == "disk full"


def test_a_ledger_of_the_current_version_opens_for_writing_without_a_write_lock(one_job_ledger):
    ledger, _ = one_job_ledger
    writer = sqlite3.connect(ledger.path, timeout=0, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        Ledger(ledger.path, timeout_s=0.05).close()  # no schema statement on every open
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_report_and_review_page_never_open_a_write_transaction(write_manifest, monkeypatch):
    from orchestrator.report import build_report
    from orchestrator.review import build_page
    from orchestrator.sweep import Sweep
    sweep = Sweep(load_manifest(write_manifest(synthetic_manifest())))
    ledger = sweep.ledger()
    ledger.sync(sweep.jobs, {j.id: "q" for j in sweep.jobs}, set(), 3, 300.0, fresh=True)
    ledger.fail(ledger.claim("w0", "q").job.id, "w0", "boom")
    ledger.close()

    def no_writes(self):
        raise AssertionError("a reader began a write transaction")
    monkeypatch.setattr(Ledger, "transaction", no_writes)
    report = build_report(sweep)
    assert report.ledger and report.ledger_problem is None and report.totals.left == len(sweep.jobs)
    assert build_page(sweep, report).time_left


def test_a_report_of_a_sweep_without_a_ledger_creates_none(write_manifest):
    from orchestrator.report import build_report
    from orchestrator.sweep import Sweep
    sweep = Sweep(load_manifest(write_manifest(synthetic_manifest())))
    assert build_report(sweep).totals.left == len(sweep.jobs)
    with pytest.raises(LedgerError):
        Ledger(sweep.ledger_path, readonly=True)
    assert not sweep.ledger_path.exists()


# ------------------------------------------------------------------------------ schema versions
# The schema of the ledgers written before schema versions (version 0): no workers' phase, no
# attempts' end indexes.
SCHEMA_0 = """
CREATE TABLE jobs (id TEXT PRIMARY KEY, ordinal INTEGER NOT NULL, queue TEXT NOT NULL, grp TEXT NOT NULL,
    category TEXT NOT NULL, payload TEXT NOT NULL, active INTEGER NOT NULL DEFAULT 1,
    state TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0, worker TEXT, claimed_at REAL,
    heartbeat_at REAL, finished_at REAL, seconds REAL, skipped INTEGER NOT NULL DEFAULT 0, last_error TEXT);
CREATE INDEX jobs_queue ON jobs (state, queue, ordinal);
CREATE INDEX jobs_group ON jobs (state, grp, ordinal);
CREATE TABLE attempts (job_id TEXT NOT NULL, worker TEXT NOT NULL, started_at REAL NOT NULL, finished_at REAL,
    outcome TEXT, error TEXT);
CREATE INDEX attempts_job ON attempts (job_id);
CREATE TABLE workers (id TEXT PRIMARY KEY, host TEXT, pid INTEGER, supervisor_pid INTEGER, devices TEXT,
    state TEXT, started_at REAL, heartbeat_at REAL, job TEXT, jobs_done INTEGER NOT NULL DEFAULT 0,
    busy_s REAL NOT NULL DEFAULT 0, ooms INTEGER NOT NULL DEFAULT 0, restarts INTEGER NOT NULL DEFAULT 0,
    message TEXT);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
"""


@pytest.fixture
def version_0_ledger(tmp_path, write_manifest):
    """A ledger as the versions before schema versions left it: one job done, one failed, a worker."""
    manifest = load_manifest(write_manifest(synthetic_manifest(categories={"a": {"prompts": ["p"]}}, seeds=[1, 2])))
    done, failed = expand(manifest)
    path = tmp_path / "ledger.sqlite"
    old = sqlite3.connect(path)
    old.executescript(SCHEMA_0)
    for job, state in ((done, "done"), (failed, "failed")):
        old.execute("INSERT INTO jobs (id, ordinal, queue, grp, category, payload, state, attempts, worker) "
                    "VALUES (?,?,?,?,?,?,?,?,?)", (job.id, job.ordinal, "cpu0", job.group, job.category,
                                                   json.dumps(job.to_dict()), state, 1, "w0"))
        old.execute("INSERT INTO attempts VALUES (?, 'w0', 1.0, 2.0, ?, NULL)",
                    (job.id, "done" if state == "done" else "error"))
    old.execute("INSERT INTO workers (id, state, jobs_done) VALUES ('w0', 'exited', 1)")
    old.execute("INSERT INTO meta VALUES ('max_attempts', '1')")
    old.commit()
    old.close()
    return path


def _shape(path) -> tuple[int, set[str], set[str]]:
    db = sqlite3.connect(path)
    try:
        return (db.execute("PRAGMA user_version").fetchone()[0],
                {row[1] for row in db.execute("PRAGMA table_info(workers)")},
                {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='index'")})
    finally:
        db.close()


def test_a_new_ledger_has_the_current_schema_version(tmp_path):
    Ledger(tmp_path / "ledger.sqlite").close()
    version, columns, indexes = _shape(tmp_path / "ledger.sqlite")
    assert version == SCHEMA_VERSION == len(MIGRATIONS) and "phase" in columns and "attempts_end" in indexes


@pytest.mark.parametrize("readonly", [False, True], ids=["run", "report"])
def test_a_ledger_from_before_schema_versions_is_upgraded_keeping_its_rows(version_0_ledger, readonly):
    ledger = Ledger(version_0_ledger, readonly=readonly)
    assert ledger.counts() == {"pending": 0, "running": 0, "done": 1, "failed": 1}
    assert [(w.id, w.jobs_done, w.phase) for w in ledger.workers()] == [("w0", 1, None)]
    assert [a["outcome"] for a in ledger.attempts()] == ["done", "error"]
    ledger.close()
    version, columns, indexes = _shape(version_0_ledger)
    assert version == SCHEMA_VERSION and "phase" in columns
    assert {"attempts_end", "attempts_worker_end"} <= indexes
    writer = Ledger(version_0_ledger)
    writer.register_worker("w1", (), phase="importing synthetic")
    assert writer.worker("w1").phase == "importing synthetic"


def test_a_ledger_of_a_newer_version_is_refused_and_left_alone(one_job_ledger):
    ledger, _ = one_job_ledger
    ledger.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    ledger.close()
    before = ledger.path.read_bytes()
    for readonly in (False, True):
        with pytest.raises(LedgerError, match=rf"written by a newer version of wan-sweep \(ledger schema version "
                                              rf"{SCHEMA_VERSION + 1}; this version knows up to {SCHEMA_VERSION}\)"):
            Ledger(ledger.path, readonly=readonly)
    assert ledger.path.read_bytes() == before


# ------------------------------------------------------------------------------ claims of one process lifetime
@pytest.fixture
def three_job_ledger(tmp_path, write_manifest):
    """A ledger of three pending jobs in queue "q", each with one attempt (`retries: 0`)."""
    manifest = load_manifest(write_manifest(synthetic_manifest(
        categories={"a": {"prompts": ["p", "q", "r"]}}, seeds=[1], execution={"retries": 0})))
    jobs = expand(manifest)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.sync(jobs, {job.id: "q" for job in jobs}, set(), max_attempts=1, heartbeat_timeout_s=300.0, fresh=True)
    yield ledger, [job.id for job in jobs]
    ledger.close()


def test_a_restarted_worker_releases_what_its_dead_predecessor_held(three_job_ledger):
    # Issue 28: a supervisor and its worker killed with -9, then `run --add-workers` starts the same
    # worker id again: its registration ends the dead process's claim instead of beating for it.
    ledger, (first, *_) = three_job_ledger
    dead = ledger.register_worker("cpu1_worker0", ())
    assert ledger.claim("cpu1_worker0", "q", life=dead).job.id == first
    new = ledger.register_worker("cpu1_worker0", ())
    assert new != dead
    row = next(j for j in ledger.jobs() if j["id"] == first)
    assert row["state"] == "failed" and row["worker"] is None and "restarted" in row["last_error"]
    assert [a["outcome"] for a in ledger.attempts(first)] == ["lost"]


def test_heartbeats_of_one_process_lifetime_never_keep_another_ones_claim_alive(three_job_ledger):
    ledger, (first, second, _) = three_job_ledger
    old = ledger.register_worker("w", ())
    ledger.claim("w", "q", life=old)
    ledger.db.execute("UPDATE jobs SET heartbeat_at = 0 WHERE id = ?", (first,))  # its process stopped beating
    ledger.heartbeat("w", None, life="another-lifetime")  # another process beating under the same name
    assert next(j for j in ledger.jobs() if j["id"] == first)["heartbeat_at"] == 0
    assert ledger.claim("other", "q").job.id == second  # the claim expired meanwhile and went back
    assert next(j for j in ledger.jobs() if j["id"] == first)["state"] == "failed"
    assert not ledger.complete(first, "w", 1.0, life="another-lifetime")  # nor can it record the end


def test_a_crash_charges_only_the_job_being_generated_not_the_video_being_written(three_job_ledger):
    # The worker writes job N's mp4 in its writer thread while job N+1 generates; N+1 crashes the process.
    ledger, (written, generating, _) = three_job_ledger
    life = ledger.register_worker("w", ())
    ledger.claim("w", "q", life=life)
    ledger.claim("w", "q", life=life)
    assert ledger.requeue_worker("w", "worker exited with code 137") == 2
    rows = {j["id"]: j for j in ledger.jobs()}
    assert rows[written]["state"] == "pending" and rows[written]["attempts"] == 0  # no attempt used
    assert rows[generating]["state"] == "failed" and rows[generating]["attempts"] == 1
    assert [a["outcome"] for a in ledger.attempts(written)] == ["released"]
    assert "no attempt was used" in ledger.attempts(written)[0]["error"]


def test_a_hung_worker_whose_claims_expire_is_charged_for_the_job_it_generates_only(three_job_ledger):
    ledger, (written, generating, third) = three_job_ledger
    life = ledger.register_worker("w", ())
    ledger.claim("w", "q", life=life)
    ledger.claim("w", "q", life=life)
    # The process hung right after claiming the next job: the claim of the video being written, whose
    # last beat came before that, expires first, and takes the whole lifetime's claims with it.
    ledger.db.execute("UPDATE jobs SET heartbeat_at = 1 WHERE id = ?", (written,))
    assert ledger.requeue_expired() == 2
    rows = {j["id"]: j for j in ledger.jobs()}
    assert rows[written]["state"] == "pending" and rows[written]["attempts"] == 0
    assert rows[generating]["state"] == "failed" and rows[third]["state"] == "pending"
