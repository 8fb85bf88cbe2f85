"""The ledger's rules about its rows, tested directly: only the claim's holder records a job's end,
unknown job ids are named, readers open it read-only, and its schema carries a version."""
from __future__ import annotations

import pytest

from orchestrator.jobs import expand
from orchestrator.ledger import Ledger, UnknownJob
from orchestrator.manifest import load_manifest

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
    assert ledger.worker("stale")["jobs_done"] == 0  # not counted for the stale worker
    assert ledger.complete(job_id, "owner", 5.0) is True
    assert ledger.jobs()[0]["state"] == "done" and ledger.worker("owner")["jobs_done"] == 1
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
    assert ledger.worker("a")["state"] == "retired" and ledger.worker("a")["message"] == "1 left"
    assert ledger.retire_if_shared("b", (0,), lambda left: "never") is None  # the card's last worker stays
    assert ledger.worker("b")["state"] == "running"
