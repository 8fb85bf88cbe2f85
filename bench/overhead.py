"""Orchestration overhead: how many zero-work jobs per second the ledger and the workers sustain.

ledger  N forked processes each loop `Ledger.claim` → `Ledger.complete` (the real ledger, one
        SQLite file in WAL mode, atomic claims with BEGIN IMMEDIATE) over J zero-work jobs.
full    the whole orchestrator: `run_experiment.py run --executor local` with N CPU worker slots and
        the synthetic backend at `seconds_per_job: 0`; each job still claims, checks the disk, draws a
        16×16 one-frame picture, encodes a real mp4, re-opens it to count frames, writes the sidecar,
        renames it into place and records completion. Measured from the first claim to the last
        finished job (process start-up excluded).

Figures: jobs/s over all workers; per-job overhead = N × wall ÷ J (the time one worker spends per
job on orchestration, contention included); that overhead as a share of a 60 s job.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine, table, write_yaml  # noqa: E402

from orchestrator.jobs import Job  # noqa: E402
from orchestrator.ledger import Ledger  # noqa: E402

JOB_SECONDS = 60.0


def fake_jobs(n: int, folder: Path) -> list[Job]:
    """t2v-shaped jobs (no reference); 10 prompts × 2 seeds per group-free category."""
    return [Job(id=f"{k:016x}", ordinal=k, category=f"cat{k % 4}", stem=None, reference=None,
                prompt_index=k // 2, prompt=f"prompt {k // 2}", seed=42 + 100 * (k % 2),
                output=str(folder / f"cat{k % 4}" / f"seed_{42 + 100 * (k % 2)}_prompt_{k // 2}.mp4"))
            for k in range(n)]


def _ledger_worker(path: str, worker: str, queue: str, start, results) -> None:
    ledger = Ledger(path)
    ledger.register_worker(worker, (), state="idle")
    start.wait()
    done = 0
    group = None
    while True:
        claim = ledger.claim(worker, queue, prefer_group=group)
        if claim is None:
            if ledger.unfinished() == 0:
                break
            time.sleep(0.001)
            continue
        group = claim.job.group
        ledger.complete(claim.job.id, worker, 0.0)
        done += 1
    results.put((worker, done))


def bench_ledger(workers: int, jobs: int, folder: Path) -> dict:
    path = folder / f"ledger-{workers}.sqlite"
    ledger = Ledger(path)
    items = fake_jobs(jobs, folder / "out")
    queues = {j.id: f"cpu{j.ordinal % workers}" for j in items}
    ledger.sync(items, queues, set(), max_attempts=3, heartbeat_timeout_s=3600, fresh=True)
    ctx = mp.get_context("fork")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_ledger_worker, args=(str(path), f"cpu{w}_worker0", f"cpu{w}", start, results))
             for w in range(workers)]
    for p in procs:
        p.start()
    time.sleep(0.3 + workers * 0.02)
    t0 = time.perf_counter()
    start.set()
    per_worker = [results.get() for _ in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    counts = ledger.counts()
    ledger.close()
    assert counts["done"] == jobs, counts
    assert sum(d for _, d in per_worker) == jobs, per_worker  # every job claimed exactly once
    return {"wall": wall, "done": counts["done"]}


def bench_full(workers: int, jobs: int, folder: Path, timeout: float) -> dict:
    prompts = [f"prompt {k}" for k in range((jobs + 1) // 2)]
    manifest = write_yaml(folder / "m.yaml", {
        "name": f"overhead{workers}", "output_dir": "out",
        "model": {"backend": "synthetic", "task": "t2v", "options": {"seconds_per_job": 0}},
        "generation": {"width": 16, "height": 16, "num_frames": 1, "fps": 1, "steps": 1},
        "seeds": [42, 142], "categories": {"bench": {"prompts": prompts}},
        "resources": {"cpu_slots": workers},
        "execution": {"executor": "local", "retries": 2, "job_timeout_s": 600, "heartbeat_timeout_s": 60},
    })
    run = subprocess.run([sys.executable, str(ROOT / "run_experiment.py"), "run", str(manifest), "--executor",
                          "local", "--no-progress", "--cpu-slots", str(workers)], cwd=ROOT,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
                         timeout=timeout)
    ledger = Ledger(folder / "out" / ".sweep" / "ledger.sqlite", readonly=True)
    made = [a for a in ledger.attempts() if a["outcome"] == "done"]
    done = ledger.counts()["done"]
    ledger.close()
    if run.returncode != 0 or done != 2 * len(prompts):
        raise RuntimeError(f"full run: exit {run.returncode}, {done} done\n{run.stdout[-2000:]}{run.stderr[-2000:]}")
    first, last = min(a["started_at"] for a in made), max(a["finished_at"] for a in made)
    return {"wall": last - first, "done": done}


def row(kind: str, workers: int, result: dict) -> list:
    per_s = result["done"] / result["wall"]
    per_job_ms = workers * result["wall"] / result["done"] * 1000
    return [kind, workers, result["done"], f"{result['wall']:.2f}", f"{per_s:.0f}", f"{per_job_ms:.1f}",
            f"{per_job_ms / 1000 / JOB_SECONDS * 100:.3f}%"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,4,16,64", help="ledger-only worker counts")
    parser.add_argument("--jobs", type=int, default=4000, help="zero-work jobs per ledger-only run")
    parser.add_argument("--full-workers", default="1,4,16", help="worker counts of the full worker loop ('' skips)")
    parser.add_argument("--full-jobs", type=int, default=400, help="jobs per full-loop run")
    parser.add_argument("--full-timeout", type=float, default=300)
    parser.add_argument("--quick", action="store_true", help="tiny run for the smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.workers, args.jobs, args.full_workers, args.full_jobs = "1,4", 200, "", 20
    print(f"machine: {machine()}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        for n in [int(x) for x in args.workers.split(",") if x]:
            folder = Path(tmp) / f"ledger{n}"
            folder.mkdir()
            rows.append(row("ledger", n, bench_ledger(n, args.jobs, folder)))
            print("  " + "  ".join(map(str, rows[-1])), flush=True)
        for n in [int(x) for x in args.full_workers.split(",") if x]:
            folder = Path(tmp) / f"full{n}"
            folder.mkdir()
            rows.append(row("full loop", n, bench_full(n, args.full_jobs, folder, args.full_timeout)))
            print("  " + "  ".join(map(str, rows[-1])), flush=True)
    print()
    print(table(["path", "workers", "jobs", "wall s", "jobs/s", "ms/job/worker", "of a 60 s job"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
