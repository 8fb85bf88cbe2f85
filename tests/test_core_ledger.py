"""The ledger: atomic claims across processes, work stealing, grouping, retries, expired claims."""
from __future__ import annotations

import multiprocessing as mp
import time

import pytest

from orchestrator.jobs import expand
from orchestrator.ledger import Ledger
from orchestrator.validation import load_manifest
from orchestrator.planning import assign_queues, make_plan

from .conftest import PATIENCE_S, synthetic_manifest


@pytest.fixture
def sweep_jobs(write_manifest):
    def build(**overrides):
        manifest = load_manifest(write_manifest(synthetic_manifest(**overrides)))
        return manifest, expand(manifest)
    return build


def _fill(ledger: Ledger, jobs, queues, max_attempts=3, heartbeat_timeout_s=300.0):
    ledger.sync(jobs, queues, set(), max_attempts, heartbeat_timeout_s, fresh=True)


def _claim_all(path: str, worker: str, queue: str, out, ready):
    ledger = Ledger(path)
    ready.wait()  # every process has started: none takes all the work before the others exist
    taken = []
    while True:
        claim = ledger.claim(worker, queue)
        if claim is None:
            break
        taken.append(claim.job.id)
        ledger.complete(claim.job.id, worker, 0.0)
    out.put((worker, taken))


@pytest.mark.slow
def test_claims_are_atomic_under_many_processes(tmp_path, sweep_jobs):
    prompts = [f"prompt {i}" for i in range(100)]
    manifest, jobs = sweep_jobs(categories={"a": {"prompts": prompts}}, seeds=[1, 2, 3])
    assert len(jobs) == 300
    ledger = Ledger(tmp_path / "ledger.sqlite")
    _fill(ledger, jobs, {j.id: f"q{j.ordinal % 4}" for j in jobs})
    out = mp.get_context("spawn").Queue()
    ready = mp.get_context("spawn").Barrier(16)
    procs = [mp.get_context("spawn").Process(target=_claim_all,
                                             args=(str(ledger.path), f"w{i}", f"q{i % 4}", out, ready))
             for i in range(16)]
    for p in procs:
        p.start()
    results = [out.get(timeout=PATIENCE_S) for _ in procs]
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


class _Clock:
    """The ledger's `time`, its clock moved by hand: a busy machine cannot make a fresh heartbeat stale."""

    def __init__(self):
        self.now = time.time()

    def time(self) -> float:
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


def test_expired_claim_goes_back_with_its_attempt_used(tmp_path, sweep_jobs, monkeypatch):
    _, jobs = sweep_jobs(categories={"a": {"prompts": ["p"]}}, seeds=[1])
    clock = _Clock()
    monkeypatch.setattr("orchestrator.ledger.time", clock)
    ledger = Ledger(tmp_path / "l.sqlite")
    _fill(ledger, jobs, {jobs[0].id: "q"}, heartbeat_timeout_s=0.2)
    first = ledger.claim("dead", "q")
    assert ledger.claim("other", "q") is None  # claimed, heartbeat fresh
    clock.now += 0.4
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
    # The five finished attempts took 10 s each, one after the other, ending 60 s ago.
    now = time.time()
    for i, rowid in enumerate(r[0] for r in ledger.db.execute(
            "SELECT rowid FROM attempts WHERE finished_at IS NOT NULL ORDER BY rowid")):
        ledger.db.execute("UPDATE attempts SET started_at=?, finished_at=? WHERE rowid=?",
                          (now - 110 + 10 * i, now - 100 + 10 * i, rowid))
    report = build_report(sweep)
    totals = report.totals
    assert (totals.expected, totals.done, totals.failed, totals.running, totals.left) == (6, 3, 1, 1, 2)
    assert report.failed == [{"job": failing.job.key, "id": failing.job.id, "attempts": 2,
                              "error": "CUDA error: out of memory"}]
    (worker,) = report.workers
    assert worker["jobs_done"] == 3 and worker["mean_s"] == 10.0 and worker["current"] == running.job.key
    assert report.jobs_per_hour == pytest.approx(3 / 50 * 3600)  # three videos in 50 s of work
    assert report.eta_s == pytest.approx(2 / report.jobs_per_hour * 3600)  # w0 is the one worker alive
    text = format_report(report)
    assert "throughput 216.0 videos/hour" in text and "CUDA error: out of memory" in text


def _timed_sweep(write_manifest, prompts: int = 6):
    """A sweep of `prompts` × 2 seeds with a ledger; jobs are given attempts at chosen times."""
    from orchestrator.sweep import Sweep
    manifest = load_manifest(write_manifest(synthetic_manifest(
        categories={"a": {"prompts": [f"p{i}" for i in range(prompts)]}}, seeds=[1, 2])))
    sweep = Sweep(manifest)
    ledger = sweep.ledger()
    ledger.sync(sweep.jobs, {j.id: "q" for j in sweep.jobs}, set(), 3, 300.0, fresh=True)
    return sweep, ledger


def _attempt(ledger, job, worker: str, start: float, end: float | None, outcome: str = "done") -> None:
    """Record one attempt of `job` by `worker` from `start` to `end` (None: still running); a done one
    also leaves its mp4 on disk, as a worker would."""
    import numpy as np
    from orchestrator.outputs import write_mp4
    ledger.db.execute("INSERT INTO attempts (job_id, worker, started_at, finished_at, outcome) VALUES (?,?,?,?,?)",
                      (job.id, worker, start, end, None if end is None else outcome))
    state = {"done": "done", "released": "pending"}.get(outcome, "pending") if end is not None else "running"
    ledger.db.execute("UPDATE jobs SET state=?, worker=?, finished_at=?, heartbeat_at=? WHERE id=?",
                      (state, worker, end, start, job.id))
    if state == "done":
        write_mp4(np.zeros((5, 32, 32, 3), np.uint8), job.output, fps=5, expected_frames=5,
                  sidecar={"job_id": job.id})


def test_speed_and_time_left_survive_a_stop_and_a_resume(write_manifest):
    # The case: 12 jobs of 4 s on 2 workers; 4 made, stopped, resumed 90 s later, 2 more made.
    from orchestrator.report import build_report, format_report
    from orchestrator.review import build_page
    sweep, ledger = _timed_sweep(write_manifest)
    jobs = sweep.jobs
    t0 = time.time() - 105
    for worker, (a, b, c, d) in (("w0", (0, 1, 4, 6)), ("w1", (2, 3, 5, 7))):
        ledger.register_worker(worker, (), state="running")
        _attempt(ledger, jobs[a], worker, t0, t0 + 4)
        _attempt(ledger, jobs[b], worker, t0 + 4, t0 + 8)
        _attempt(ledger, jobs[c], worker, t0 + 8, t0 + 10, "released")  # the stop
        _attempt(ledger, jobs[c], worker, t0 + 100, t0 + 104)  # the resumed run
        _attempt(ledger, jobs[d], worker, t0 + 104, None)
    ledger.set_meta("started_at", str(t0 + 100))  # what `run` wrote when it resumed
    ledger.close()
    report = build_report(sweep)
    assert (report.totals.done, report.totals.running, report.totals.left) == (6, 2, 6)
    assert report.jobs_per_hour == pytest.approx(2 * 900)  # two workers, 4 s a video each
    assert report.workers_alive == 2 and report.eta_s == pytest.approx(12)  # 6 left at 2 × 0.25/s
    assert [w["jobs_per_hour"] for w in report.workers] == [pytest.approx(900), pytest.approx(900)]
    assert "throughput 1800.0 videos/hour" in format_report(report) and "time left 12s" in format_report(report)
    page = build_page(sweep, report)  # the review page says the same
    assert page.throughput.startswith("1800.0 videos/hour") and page.time_left == "12s"


def test_speed_of_a_finished_sweep_run_again_is_the_speed_it_had(write_manifest):
    # `./demo.sh; ./demo.sh`: the second run finds everything done a minute later.
    from orchestrator.report import build_report
    sweep, ledger = _timed_sweep(write_manifest, prompts=2)
    t0 = time.time() - 60
    ledger.register_worker("w0", (), state="exited")
    for i, job in enumerate(sweep.jobs):
        _attempt(ledger, job, "w0", t0 + 2 * i, t0 + 2 * i + 2)
    ledger.set_meta("started_at", str(time.time()))
    ledger.close()
    report = build_report(sweep)
    assert report.totals.left == 0 and report.jobs_per_hour == pytest.approx(1800)
    assert report.eta_s == 0


def test_rate_counts_the_last_half_hour_of_work_and_a_long_job_in_part():
    from orchestrator.report import WINDOW_S, work_rate
    # one worker, 1 h per video: the window holds half a video
    assert work_rate([(0.0, 3600.0, True), (-3600.0, 0.0, True)]) == (pytest.approx(0.5), WINDOW_S)
    # 1000 videos of 10 s, one after the other, with a day's pause in the middle: 180 in the window
    attempts = [(t, t + 10.0, True) for t in (10.0 * i + (86400 if i >= 500 else 0) for i in range(1000))]
    videos, busy = work_rate(reversed(attempts))
    assert (videos, busy) == (pytest.approx(180), WINDOW_S)
    # failed attempts take time and make nothing; nothing at all measures nothing
    assert work_rate([(10.0, 20.0, False), (0.0, 10.0, True)]) == (1.0, 20.0)
    assert work_rate([]) == (0.0, 0.0)


def test_workers_whose_processes_are_gone_are_shown_stopped(write_manifest):
    # Every process of the sweep was killed (kill -9, a reboot): the ledger still says `running`.
    import subprocess
    import sys
    from orchestrator.report import build_report, format_report
    from orchestrator.review import build_page
    sweep, ledger = _timed_sweep(write_manifest, prompts=2)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    ledger.register_worker("cpu0_worker0", (), pid=gone.pid, supervisor_pid=gone.pid)
    t0 = time.time() - 600
    _attempt(ledger, sweep.jobs[0], "cpu0_worker0", t0, t0 + 4)
    ledger.claim("cpu0_worker0", "q")
    ledger.close()
    report = build_report(sweep)
    (worker,) = report.workers
    assert worker["state"] == "stopped" and worker["current"] is None
    assert report.totals.running == 0 and report.workers_alive == 0
    assert report.jobs_per_hour == pytest.approx(900) and report.eta_s is None  # measured, but nobody works
    assert "time left stopped (no worker is running" in format_report(report)
    page = build_page(sweep, report)
    assert page.workers[0]["state"] == "stopped" and page.time_left.startswith("stopped")


def test_a_ledger_from_before_worker_phases_gains_the_column(tmp_path):
    import sqlite3
    old = sqlite3.connect(tmp_path / "l.sqlite")
    old.execute("CREATE TABLE workers (id TEXT PRIMARY KEY, host TEXT, pid INTEGER, supervisor_pid INTEGER, "
                "devices TEXT, state TEXT, started_at REAL, heartbeat_at REAL, job TEXT, jobs_done INTEGER NOT "
                "NULL DEFAULT 0, busy_s REAL NOT NULL DEFAULT 0, ooms INTEGER NOT NULL DEFAULT 0, restarts "
                "INTEGER NOT NULL DEFAULT 0, message TEXT)")
    old.execute("INSERT INTO workers (id, state) VALUES ('w0', 'exited')")
    old.commit()
    old.close()
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.register_worker("w1", (), phase="importing synthetic")
    assert {w.id: w.phase for w in ledger.workers()} == {"w0": None, "w1": "importing synthetic"}
    from orchestrator.report import workers_getting_ready
    assert workers_getting_ready(ledger.workers()) == "1 worker importing synthetic"
