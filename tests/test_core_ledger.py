"""The ledger: atomic claims across processes, work stealing, grouping, retries, expired claims."""
from __future__ import annotations

import multiprocessing as mp
import time

import pytest

from orchestrator.jobs import expand
from orchestrator.ledger import Ledger
from orchestrator.manifest import load_manifest
from orchestrator.planning import assign_queues, make_plan

from .conftest import synthetic_manifest


@pytest.fixture
def sweep_jobs(write_manifest):
    def build(**overrides):
        manifest = load_manifest(write_manifest(synthetic_manifest(**overrides)))
        return manifest, expand(manifest)
    return build


def _fill(ledger: Ledger, jobs, queues, max_attempts=3, heartbeat_timeout_s=300.0):
    ledger.sync(jobs, queues, set(), max_attempts, heartbeat_timeout_s, fresh=True)


def _claim_all(path: str, worker: str, queue: str, out):
    ledger = Ledger(path)
    taken = []
    while True:
        claim = ledger.claim(worker, queue)
        if claim is None:
            break
        taken.append(claim.job.id)
        ledger.complete(claim.job.id, worker, 0.0)
    out.put((worker, taken))


def test_claims_are_atomic_under_many_processes(tmp_path, sweep_jobs):
    prompts = [f"prompt {i}" for i in range(100)]
    manifest, jobs = sweep_jobs(categories={"a": {"prompts": prompts}}, seeds=[1, 2, 3])
    assert len(jobs) == 300
    ledger = Ledger(tmp_path / "ledger.sqlite")
    _fill(ledger, jobs, {j.id: f"q{j.ordinal % 4}" for j in jobs})
    out = mp.get_context("spawn").Queue()
    procs = [mp.get_context("spawn").Process(target=_claim_all, args=(str(ledger.path), f"w{i}", f"q{i % 4}", out))
             for i in range(16)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    taken = [job for _, ids in results for job in ids]
    assert len(taken) == len(set(taken)) == 300
    assert sum(1 for _, ids in results if ids) > 1  # the work really was shared
    assert ledger.counts()["done"] == 300
    attempts = ledger.attempts()
    assert len(attempts) == 300 and {a["outcome"] for a in attempts} == {"done"}


def test_worker_steals_from_the_fullest_queue_and_keeps_a_reference_together(tmp_path, sweep_jobs):
    manifest, jobs = sweep_jobs(categories={"a": {"prompts": ["p0", "p1", "p2"]}}, seeds=[1, 2, 3])
    ledger = Ledger(tmp_path / "l.sqlite")
    queues = {j.id: "big" if j.prompt_index < 2 else "small" for j in jobs}
    _fill(ledger, jobs, queues)
    # the "idle" worker's own queue does not exist: it steals from the back of the fullest queue
    first = ledger.claim("thief", "idle")
    assert queues[first.job.id] == "big" and first.job.prompt_index == 1 and first.job.seed == 3
    second = ledger.claim("thief", "idle", prefer_group=first.job.group)
    assert second.job.group == first.job.group  # stays on the same reference
    own = ledger.claim("owner", "small")
    assert queues[own.job.id] == "small" and own.job.ordinal == min(j.ordinal for j in jobs if queues[j.id] == "small")


def test_failed_attempts_are_retried_then_failed_for_good(tmp_path, sweep_jobs):
    _, jobs = sweep_jobs(categories={"a": {"prompts": ["p"]}}, seeds=[1])
    ledger = Ledger(tmp_path / "l.sqlite")
    _fill(ledger, jobs, {jobs[0].id: "q"}, max_attempts=3)
    states = []
    for _ in range(3):
        claim = ledger.claim("w", "q")
        states.append(ledger.fail(claim.job.id, "w", f"boom {claim.attempt}"))
    assert states == ["pending", "pending", "failed"]
    assert ledger.claim("w", "q") is None
    (row,) = ledger.jobs()
    assert row["state"] == "failed" and row["attempts"] == 3 and row["last_error"] == "boom 3"
    # a new run (fresh sync) gives failed jobs another chance
    _fill(ledger, jobs, {jobs[0].id: "q"})
    assert ledger.claim("w", "q") is not None


def test_expired_claim_goes_back_with_its_attempt_used(tmp_path, sweep_jobs):
    _, jobs = sweep_jobs(categories={"a": {"prompts": ["p"]}}, seeds=[1])
    ledger = Ledger(tmp_path / "l.sqlite")
    _fill(ledger, jobs, {jobs[0].id: "q"}, heartbeat_timeout_s=0.2)
    first = ledger.claim("dead", "q")
    assert ledger.claim("other", "q") is None  # claimed, heartbeat fresh
    time.sleep(0.4)
    second = ledger.claim("other", "q")
    assert second.job.id == first.job.id and second.attempt == 2
    lost = [a for a in ledger.attempts() if a["worker"] == "dead"]
    assert lost[0]["outcome"] == "lost" and "stopped beating" in lost[0]["error"]
    assert ledger.fail(first.job.id, "dead", "late") == "lost"  # the old claim can no longer fail it


def test_release_gives_the_attempt_back(tmp_path, sweep_jobs):
    _, jobs = sweep_jobs(categories={"a": {"prompts": ["p"]}}, seeds=[1])
    ledger = Ledger(tmp_path / "l.sqlite")
    _fill(ledger, jobs, {jobs[0].id: "q"})
    claim = ledger.claim("w", "q")
    ledger.release(claim.job.id, "w")
    assert ledger.claim("w", "q").attempt == 1


def test_queues_balance_work_per_worker_and_keep_references_whole(write_manifest, make_refs):
    sizes = {"camera_motion": 14, "single_object": 33, "multiple_objects": 13, "complex_human_motion": 8}
    categories = {}
    for name, count in sizes.items():
        make_refs(name, [f"v{i}" for i in range(count)])
        categories[name] = {"videos": f"refs/{name}/*.mp4", "prompts": [f"p{k}" for k in range(5)]}
    manifest = load_manifest(write_manifest(synthetic_manifest(
        model={"task": "v2v"}, seeds=[42, 142], categories=categories)))
    jobs = expand(manifest)
    plan = make_plan(manifest, jobs, gpus=None, cpu_slots=4)
    sizes_per_queue = plan.queue_sizes()
    assert sum(sizes_per_queue.values()) == 680
    assert max(sizes_per_queue.values()) - min(sizes_per_queue.values()) <= 10  # one reference = 10 jobs
    for group in {j.group for j in jobs}:
        assert len({plan.queues[j.id] for j in jobs if j.group == group}) == 1
    assert assign_queues(jobs, list(plan.groups)) == plan.queues  # deterministic


def test_report_figures_from_disk_and_ledger(write_manifest, tmp_path):
    from orchestrator.outputs import write_mp4
    from orchestrator.report import build_report, format_report
    from orchestrator.sweep import Sweep
    import numpy as np

    manifest = load_manifest(write_manifest(synthetic_manifest(
        categories={"a": {"prompts": ["p0", "p1"]}, "b": {"prompts": ["q0"]}}, seeds=[1, 2])))
    sweep = Sweep(manifest)
    ledger = sweep.ledger()
    ledger.sync(sweep.jobs, {j.id: "q" for j in sweep.jobs}, set(), 2, 300.0, fresh=True)
    ledger.set_meta("started_at", str(time.time() - 3600))
    ledger.register_worker("w0", ())
    frames = np.zeros((5, 32, 32, 3), np.uint8)
    for _ in range(3):  # three videos done, each written for real
        claim = ledger.claim("w0", "q")
        write_mp4(frames, claim.job.output, fps=5, expected_frames=5, sidecar={"job_id": claim.job.id})
        ledger.complete(claim.job.id, "w0", 10.0)
    failing = ledger.claim("w0", "q")
    ledger.fail(failing.job.id, "w0", "first")
    failing = ledger.claim("w0", "q", prefer_group=failing.job.group)
    ledger.fail(failing.job.id, "w0", "CUDA error: out of memory")
    running = ledger.claim("w0", "q")
    report = build_report(sweep)
    totals = report.totals
    assert (totals.expected, totals.done, totals.failed, totals.running, totals.left) == (6, 3, 1, 1, 2)
    assert report.failed == [{"job": failing.job.key, "id": failing.job.id, "attempts": 2,
                              "error": "CUDA error: out of memory"}]
    (worker,) = report.workers
    assert worker["jobs_done"] == 3 and worker["mean_s"] == 10.0 and worker["current"] == running.job.key
    assert report.jobs_per_hour == 3 / 1800 * 3600  # three in the last half hour
    assert report.eta_s == 2 / report.jobs_per_hour * 3600
    text = format_report(report)
    assert "throughput 6.0 videos/hour" in text and "CUDA error: out of memory" in text
