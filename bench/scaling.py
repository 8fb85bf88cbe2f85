"""Scaling with the sweep's size: manifest load, expansion, plan, ledger sync and `report`.

For each size a t2v manifest on the synthetic backend is written to a temporary folder: 10
categories, each with a .txt prompts file, × seeds 42 and 142. Then:

  load       `load_manifest` (YAML + prompts files + validation)
  expand     `jobs.expand` (ids, output paths)
  plan       `planning.make_plan` with 8 CPU worker slots (queue assignment by reference group)
  sync new   `Ledger.sync` into a new ledger (what the first `run` does); the ledger's file size
  sync again `Ledger.sync` into the existing ledger (what a later `run` does)
  report     `build_report` + `format_report` for a sweep in flight: `--done` of the jobs have a real
             mp4 + sidecar on disk, 8 workers hold claims, 20 jobs have failed. "cold" is the first
             report (every finished mp4 is opened once to count its frames), "warm" a later one
             (the probe cache answers); "CLI" is `run_experiment.py report` end to end in a new
             process (Python start-up, manifest load and expansion included).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine, table, tiny_mp4, write_yaml  # noqa: E402

from orchestrator.jobs import expand  # noqa: E402
from orchestrator.ledger import Ledger  # noqa: E402
from orchestrator.validation import load_manifest  # noqa: E402
from orchestrator.outputs import sidecar_path  # noqa: E402
from orchestrator.planning import make_plan  # noqa: E402
from orchestrator.report import build_report, format_report  # noqa: E402
from orchestrator.sweep import Sweep  # noqa: E402

CATEGORIES = 10
SEEDS = [42, 142]


def write_manifest(folder: Path, jobs: int) -> Path:
    per_category = max(1, jobs // (CATEGORIES * len(SEEDS)))
    cats = {}
    for c in range(CATEGORIES):
        prompts = folder / f"prompts_{c}.txt"
        prompts.write_text("\n".join(f"category {c} prompt {k}: a slow pan over a city at night"
                                     for k in range(per_category)) + "\n", encoding="utf-8")
        cats[f"category_{c}"] = {"prompts": prompts.name}
    return write_yaml(folder / "scale.yaml", {
        "name": "scale", "output_dir": "out",
        "model": {"backend": "synthetic", "task": "t2v", "options": {}},
        "generation": {"width": 16, "height": 16, "num_frames": 1, "fps": 1, "steps": 1},
        "seeds": SEEDS, "categories": cats, "resources": {"cpu_slots": 8},
        "execution": {"executor": "local", "retries": 2, "heartbeat_timeout_s": 3600}})


def timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


def ledger_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())


def bench_size(size: int, folder: Path, done_fraction: float, source_mp4: Path) -> dict:
    manifest_path = write_manifest(folder, size)
    manifest, t_load = timed(lambda: load_manifest(manifest_path))
    jobs, t_expand = timed(lambda: expand(manifest))
    plan, t_plan = timed(lambda: make_plan(manifest, jobs, None, cpu_slots=8))
    sweep = Sweep(manifest, jobs)
    sweep.state_dir.mkdir(parents=True, exist_ok=True)
    ledger = sweep.ledger()
    _, t_sync = timed(lambda: ledger.sync(jobs, plan.queues, set(), manifest.max_attempts, 3600, fresh=True))
    _, t_resync = timed(lambda: ledger.sync(jobs, plan.queues, set(), manifest.max_attempts, 3600, fresh=True))

    # A sweep in flight: some outputs on disk (and done in the ledger), 8 claims, 20 failures.
    step = max(1, round(1 / done_fraction)) if done_fraction > 0 else 0
    finished = jobs[::step] if step else []
    for job in finished:
        out = Path(job.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source_mp4, out)
        sidecar_path(out).write_text(json.dumps({"job_id": job.id}), encoding="utf-8")
    for job in finished:
        claim = ledger.claim("cpu0_worker0", "cpu0", prefer_group=job.group)  # noqa: F841
        ledger.db.execute("UPDATE jobs SET state='done', worker='cpu0_worker0', finished_at=?, seconds=1.0, "
                          "attempts=1 WHERE id=?", (time.time() - 60, job.id))
    ledger.db.execute("UPDATE jobs SET state='pending', worker=NULL WHERE state='running'")
    for w in range(8):
        ledger.register_worker(f"cpu{w}_worker0", (), pid=None, state="idle")
        ledger.claim(f"cpu{w}_worker0", f"cpu{w}")
    ledger.db.execute("UPDATE jobs SET state='failed', attempts=3, last_error='synthetic failure' WHERE id IN "
                      "(SELECT id FROM jobs WHERE state='pending' ORDER BY ordinal DESC LIMIT 20)")
    ledger.close()
    size_bytes = ledger_bytes(sweep.ledger_path)

    text, t_cold = timed(lambda: format_report(build_report(sweep)))
    report = build_report(sweep)
    _, t_warm = timed(lambda: format_report(build_report(sweep)))
    assert report.totals.done == len(finished), (report.totals.done, len(finished))
    assert report.totals.failed == 20 and report.totals.running == 8, report.totals
    t0 = time.perf_counter()
    cli = subprocess.run([sys.executable, str(ROOT / "run_experiment.py"), "report", str(manifest_path)],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    t_cli = time.perf_counter() - t0
    if cli.returncode != 1:  # 1: the 20 jobs failed for good, as `report` says to scripts
        raise RuntimeError(cli.stdout + cli.stderr)
    return {"jobs": len(jobs), "done": len(finished), "load": t_load, "expand": t_expand, "plan": t_plan,
            "sync": t_sync, "resync": t_resync, "bytes": size_bytes, "cold": t_cold, "warm": t_warm,
            "cli": t_cli, "lines": len(text.splitlines())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--done", type=float, default=0.01, help="share of jobs with a finished mp4 on disk")
    parser.add_argument("--quick", action="store_true", help="tiny run for the smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = "200"
    print(f"machine: {machine()}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        source = tiny_mp4(Path(tmp) / "tiny.mp4")
        for size in [int(s) for s in args.sizes.split(",") if s]:
            folder = Path(tmp) / f"n{size}"
            folder.mkdir()
            r = bench_size(size, folder, args.done, source)
            rows.append([r["jobs"], r["done"], f"{r['load']:.2f}", f"{r['expand']:.2f}", f"{r['plan']:.2f}",
                         f"{r['sync']:.2f}", f"{r['resync']:.2f}", f"{r['bytes'] / 2**20:.1f}",
                         f"{r['cold']:.2f}", f"{r['warm']:.2f}", f"{r['cli']:.2f}"])
            print("  " + "  ".join(map(str, rows[-1])), flush=True)
    print()
    print(table(["jobs", "mp4s on disk", "load s", "expand s", "plan s", "sync new s", "sync again s",
                 "ledger MiB", "report cold s", "report warm s", "CLI report s"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
