"""Load balance: the user's 680-job experiment run three (four) ways, side by side.

Shape (shared/seeds/003): categories of 14, 33, 13 and 8 reference videos × 5 prompts × 2 seeds =
680 jobs on 4 "GPUs" × 2 processes = 8 workers. A job is a sleep: 3 minutes of real generation
become `--seconds-per-job` (default 0.05 s, a scale of 1 : 3600, so 1 s here ≙ 1 h there).

Methods
  seed    the seed's static plan: category g on GPU g; its jobs dealt alternately to the GPU's 2
          processes, fixed before the start.
  even    a static even split: the 680 jobs (manifest order) cut into 8 contiguous blocks of 85.
  pull    this orchestrator's scheduling: 8 processes claim through the real `Ledger.claim`
          (same reference first, own queue, then steal from the fullest queue) on queues from the
          real `assign_queues` (4 queues × 2 workers), and `Ledger.complete` each job.
  full    the whole orchestrator: `run_experiment.py run --executor local` with the synthetic
          backend (8 supervised worker processes, each writing a real tiny mp4 + sidecar per job).
          Its makespan runs from the first claim to the last finished job (model "load", i.e.
          process start-up, excluded as for the others); start-up is printed separately.

Scenarios
  uniform every job takes the same time.
  jitter  job times vary ±50%, deterministic per job (the synthetic backend's own formula).
  death   uniform times; worker 2 (GPU 1's first process, the busiest GPU in the seed plan) dies at
          half the ideal makespan. Static plans: the job it was running and its remaining list are
          not done in the first pass; the rule is that the user re-runs the script as soon as the
          other workers have finished (it skips finished outputs), so those jobs run afterwards on
          one process: makespan = survivors' end + the dead worker's leftover work. `pull`: the
          process is SIGKILLed and its claim goes back to the queue (`Ledger.requeue_worker`, what
          the supervisor does); the slot stays dead. `full`: the worker process is SIGKILLed; its
          supervisor puts the claim back and restarts it after a 1 s pause (which, at this scale,
          stands for an hour).

ideal = total work ÷ 8 workers (the same for every row of a scenario).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (ROOT, SEED_CATEGORIES, SEED_GPUS, SEED_PROCS_PER_GPU, machine,  # noqa: E402
                     seed_manifest, table)

from orchestrator.backends.synthetic import _unit  # noqa: E402
from orchestrator.jobs import expand  # noqa: E402
from orchestrator.ledger import Ledger, LedgerError  # noqa: E402
from orchestrator.validation import load_manifest  # noqa: E402
from orchestrator.planning import DeviceGroup, assign_queues  # noqa: E402

WORKERS = SEED_GPUS * SEED_PROCS_PER_GPU
DEAD_WORKER = 2  # gpu1, process 0
REAL_SECONDS_PER_JOB = 180.0


def job_times(jobs, base: float, jitter: float) -> dict[str, float]:
    """Seconds per job; with jitter the synthetic backend's formula: base·(1 + j·(2u − 1))."""
    return {j.id: base * (1 + jitter * (2 * _unit("jitter", j.id) - 1)) if jitter else base for j in jobs}


def static_lists(jobs, method: str) -> list[list]:
    lists: list[list] = [[] for _ in range(WORKERS)]
    if method == "seed":
        categories = list(dict.fromkeys(j.category for j in jobs))
        for g, category in enumerate(categories):
            members = [j for j in jobs if j.category == category]
            for k, job in enumerate(members):
                lists[g * SEED_PROCS_PER_GPU + k % SEED_PROCS_PER_GPU].append(job)
    else:  # even: contiguous blocks
        n = len(jobs)
        for w in range(WORKERS):
            lists[w] = jobs[w * n // WORKERS:(w + 1) * n // WORKERS]
    return lists


# ------------------------------------------------------------------------------------------ static
def _static_worker(times: list[float], start, t0, death_at: float | None, results, index: int) -> None:
    start.wait()
    origin = t0.value
    done = 0
    for k, t in enumerate(times):
        if death_at is not None:
            remaining = death_at - (time.time() - origin)
            if t > remaining:
                time.sleep(max(0.0, remaining))
                results.put((index, done, time.time() - origin, sum(times[k:]), len(times) - k))
                return
        time.sleep(t)
        done += 1
    results.put((index, done, time.time() - origin, 0.0, 0))


def run_static(lists, times, death_at: float | None) -> dict:
    ctx = mp.get_context("fork")
    start, t0, results = ctx.Event(), ctx.Value("d", 0.0), ctx.Queue()
    procs = []
    for w, members in enumerate(lists):
        dies = death_at if (death_at is not None and w == DEAD_WORKER) else None
        p = ctx.Process(target=_static_worker, args=([times[j.id] for j in members], start, t0, dies, results, w))
        p.start()
        procs.append(p)
    time.sleep(0.2)
    t0.value = time.time()
    start.set()
    out = [results.get() for _ in procs]
    for p in procs:
        p.join()
    ends = [r[2] for r in out]
    leftover_work = sum(r[3] for r in out)
    leftover_jobs = sum(r[4] for r in out)
    done = sum(r[1] for r in out)
    if leftover_jobs:
        survivors_end = max(r[2] for r in out if r[4] == 0)
        return {"makespan": survivors_end + leftover_work, "first_pass": survivors_end, "done_first": done,
                "note": f"{leftover_jobs} jobs left at {survivors_end:.2f}s, re-run after"}
    return {"makespan": max(ends), "done_first": done, "note": ""}


# ------------------------------------------------------------------------------------------ pull
def _pull_worker(ledger_path: str, worker: str, queue: str, times: dict, start, t0, results) -> None:
    ledger = Ledger(ledger_path)
    start.wait()
    origin = t0.value
    group = None
    done = 0
    while True:
        claim = ledger.claim(worker, queue, prefer_group=group)
        if claim is None:
            if ledger.unfinished() == 0:
                break
            time.sleep(0.005)  # a claim in flight elsewhere may come back to the queue
            continue
        group = claim.job.group
        time.sleep(times[claim.job.id])
        ledger.complete(claim.job.id, worker, times[claim.job.id])
        done += 1
    results.put((worker, done, time.time() - origin))


def run_pull(jobs, times, folder: Path, death_at: float | None) -> dict:
    groups = [DeviceGroup(queue=f"gpu{g}", devices=(g,), workers=SEED_PROCS_PER_GPU, reason="bench")
              for g in range(SEED_GPUS)]
    queues = assign_queues(jobs, groups)
    path = folder / f"pull-{time.time_ns()}.sqlite"
    ledger = Ledger(path)
    ledger.sync(jobs, queues, set(), max_attempts=3, heartbeat_timeout_s=3600, fresh=True)
    slots = [(f"{g.queue}_worker{k}", g.queue) for g in groups for k in range(g.workers)]
    for worker, _queue in slots:
        ledger.register_worker(worker, (), state="idle")
    ctx = mp.get_context("fork")
    start, t0, results = ctx.Event(), ctx.Value("d", 0.0), ctx.Queue()
    procs = []
    for worker, queue in slots:
        p = ctx.Process(target=_pull_worker, args=(str(path), worker, queue, times, start, t0, results))
        p.start()
        procs.append(p)
    time.sleep(0.3)
    t0.value = time.time()
    start.set()
    lost = 0
    if death_at is not None:
        time.sleep(max(0.0, t0.value + death_at - time.time()))
        victim = procs[DEAD_WORKER]
        os.kill(victim.pid, signal.SIGKILL)
        victim.join()
        lost = ledger.requeue_worker(slots[DEAD_WORKER][0], "killed by the benchmark")
    out = [results.get() for _ in range(len(procs) - (death_at is not None))]
    for p in procs:
        p.join()
    makespan = max(r[2] for r in out)
    counts = ledger.counts()
    ledger.close()
    note = f"killed {slots[DEAD_WORKER][0]}; {lost} claim back to queue" if death_at is not None else ""
    return {"makespan": makespan, "done_first": counts["done"], "note": note}


# ------------------------------------------------------------------------------------------ full
def run_full(folder: Path, base: float, jitter: float, death_at: float | None, timeout: float) -> dict:
    options = {"seconds_per_job": base}
    if jitter:
        options["jitter"] = jitter
    manifest = seed_manifest(folder, options=options, cpu_slots=WORKERS)
    ledger_path = folder / "out" / ".sweep" / "ledger.sqlite"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    launched = time.time()
    child = subprocess.Popen([sys.executable, str(ROOT / "run_experiment.py"), "run", str(manifest),
                              "--executor", "local", "--no-progress", "--cpu-slots", str(WORKERS)],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed: list[str] = []

    def killer():
        # Wait for the first claim, then kill cpu2_worker0's worker process at death_at after it.
        first = None
        while child.poll() is None:
            time.sleep(0.02)
            try:
                ledger = Ledger(ledger_path, timeout_s=5, readonly=True)
                if first is None:
                    first = min((a["started_at"] for a in ledger.attempts()), default=None)
                pid = (ledger.worker("cpu2_worker0") or {}).get("pid")
                ledger.close()
            except (LedgerError, sqlite3.Error):  # not there yet
                continue
            if first is not None and time.time() >= first + death_at and pid:
                os.kill(pid, signal.SIGKILL)
                killed.append(f"cpu2_worker0 pid {pid}")
                return

    thread = None
    if death_at is not None:
        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
    try:
        output, _ = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        output, _ = child.communicate()
        raise RuntimeError(f"full run did not finish in {timeout:.0f}s:\n{output[-2000:]}")
    ledger = Ledger(ledger_path, readonly=True)
    attempts = ledger.attempts()
    done = ledger.counts()["done"]
    ledger.close()
    starts: dict[str, float] = {}  # each worker's first claim
    for attempt in attempts:
        starts[attempt["worker"]] = min(attempt["started_at"], starts.get(attempt["worker"], attempt["started_at"]))
    first, last_first = min(starts.values()), max(starts.values())
    end = max((a["finished_at"] for a in attempts if a["outcome"] == "done"), default=None)
    note = f"start-up {first - launched:.1f}s, first claims spread {last_first - first:.2f}s"
    if death_at is not None:
        note += "; killed " + (killed[0] if killed else "nothing (finished first)") + ", supervisor restarted it"
    if child.returncode != 0:
        note += f"; run exited {child.returncode}"
    return {"makespan": end - first, "done_first": done, "note": note}


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds-per-job", type=float, default=0.05,
                        help="seconds standing for one 3-minute job (default 0.05: 1 s ≙ 1 h)")
    parser.add_argument("--scale", type=int, default=1,
                        help="divide each category's reference count by this (≥1 videos each; for quick runs)")
    parser.add_argument("--methods", default="seed,even,pull,full")
    parser.add_argument("--scenarios", default="uniform,jitter,death")
    parser.add_argument("--quick", action="store_true",
                        help="tiny run for the smoke test: --scale 4 --seconds-per-job 0.005, no `full`")
    parser.add_argument("--full-timeout", type=float, default=300)
    args = parser.parse_args(argv)
    if args.quick:
        args.scale, args.seconds_per_job = 4, 0.005
        args.methods = ",".join(m for m in args.methods.split(",") if m != "full")
    methods = [m for m in args.methods.split(",") if m]
    scenarios = [s for s in args.scenarios.split(",") if s]
    base = args.seconds_per_job
    categories = {k: max(1, v // args.scale) for k, v in SEED_CATEGORIES.items()}

    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="bench-lb-") as tmp:
        tmp = Path(tmp)
        manifest = load_manifest(seed_manifest(tmp / "shape", categories=categories))
        jobs = expand(manifest)
        hours = REAL_SECONDS_PER_JOB / base / 3600  # real hours per benchmark second
        print(f"jobs: {len(jobs)} ({', '.join(f'{k} {v}' for k, v in categories.items())} references × 5 "
              f"prompts × 2 seeds); {WORKERS} workers ({SEED_GPUS} GPUs × {SEED_PROCS_PER_GPU})")
        print(f"scale: 1 job = {base * 1000:.0f} ms here ≙ {REAL_SECONDS_PER_JOB:.0f} s real; "
              f"1 s here ≙ {hours:.2f} h\n")
        rows = []
        for scenario in scenarios:
            jitter = 0.5 if scenario == "jitter" else 0.0
            times = job_times(jobs, base, jitter)
            ideal = sum(times.values()) / WORKERS
            death_at = ideal / 2 if scenario == "death" else None
            for method in methods:
                if method in ("seed", "even"):
                    result = run_static(static_lists(jobs, method), times, death_at)
                elif method == "pull":
                    result = run_pull(jobs, times, tmp, death_at)
                elif method == "full":
                    folder = tmp / f"full-{scenario}"
                    folder.mkdir()
                    result = run_full(folder, base, jitter, death_at, args.full_timeout)
                else:
                    parser.error(f"unknown method {method}")
                rows.append([scenario, method, f"{ideal:.2f}", f"{result['makespan']:.2f}",
                             f"{result['makespan'] / ideal:.3f}", f"{result['makespan'] * hours:.1f}",
                             f"{result['done_first']}/{len(jobs)}", result["note"]])
                print(f"  {scenario:<8} {method:<5} makespan {result['makespan']:.2f}s "
                      f"(÷ideal {result['makespan'] / ideal:.3f})", flush=True)
        print()
        print(table(["scenario", "method", "ideal s", "makespan s", "÷ ideal", "≙ hours",
                     "done (1st pass)", "note"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
