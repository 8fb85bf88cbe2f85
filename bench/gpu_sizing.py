"""GPU sizing (issue 5) on a real card: NVML readings, calibration through `plan --recalibrate`, and an
induced out-of-memory (a second process filling the card) with two workers on the card.

    python bench/gpu_sizing.py --model CKPT --work DIR [--steps 4] [--jobs 12]          # readings + calibration
    python bench/gpu_sizing.py --model CKPT --work DIR --oom [--steps 4] [--oom-jobs 4] # the out-of-memory run

The calibration's profile is cached under DIR/b/.sweep/profiles, where gpu_throughput.py's (b) finds it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

FILLER = r"""
import sys, time, torch
n = int(sys.argv[1])
block = torch.empty(n, dtype=torch.uint8, device="cuda")
block.fill_(1)
torch.cuda.synchronize()
print(f"filler holds {n / 2**30:.1f} GiB", flush=True)
open(sys.argv[2], "w").write("ok")
while True:
    time.sleep(1)
"""


def cli(*args: str, env: dict | None = None) -> int:
    command = [sys.executable, str(ROOT / "run_experiment.py"), *args]
    print("$ " + " ".join(command[1:]), flush=True)
    return subprocess.run(command, env={**os.environ, **(env or {})}).returncode


def readings() -> None:
    from orchestrator.gpus import discover
    for gpu in discover():
        print(f"NVML: {gpu.describe()} (total {gpu.total_bytes} B, free {gpu.free_bytes} B, uuid {gpu.uuid})",
              flush=True)


def main() -> int:
    from gpu_manifest import model_arguments
    parser = model_arguments()
    parser.add_argument("--oom", action="store_true")
    parser.add_argument("--oom-jobs", type=int, default=4)
    args = parser.parse_args()
    from gpu_manifest import write_manifest
    work = Path(args.work)
    common = dict(width=args.width, height=args.height, frames=args.frames, steps=args.steps, dtype=args.dtype)
    readings()
    if not args.oom:
        manifest = write_manifest(work / "b.yaml", args.model, work / "b", jobs=args.jobs, **common)
        started = time.monotonic()
        code = cli("plan", str(manifest), "--recalibrate")
        print(f"plan --recalibrate took {time.monotonic() - started:.1f}s (exit {code})", flush=True)
        started = time.monotonic()
        code = cli("plan", str(manifest))
        print(f"plan again (cached profile) took {time.monotonic() - started:.1f}s (exit {code})", flush=True)
        for path in sorted((work / "b" / ".sweep" / "profiles").glob("*.json")):
            print(f"profile {path.name}:\n{path.read_text(encoding='utf-8')}", flush=True)
        return code

    # The out-of-memory run: two workers on the card, a second tenant leaves room for one job at a time.
    profiles = sorted((work / "b" / ".sweep" / "profiles").glob("*.json"))
    if not profiles:
        raise SystemExit("run the calibration first (without --oom)")
    profile = json.loads(profiles[-1].read_text(encoding="utf-8"))
    out = work / "oom"
    shutil.rmtree(out, ignore_errors=True)
    (out / ".sweep").mkdir(parents=True)
    shutil.copytree(work / "b" / ".sweep" / "profiles", out / ".sweep" / "profiles")
    manifest = write_manifest(work / "oom.yaml", args.model, out, jobs=args.oom_jobs, workers_per_gpu=2,
                              retries=6, name="oomtest", **common)
    from orchestrator.gpus import discover
    gpu = discover()[0]
    loaded, peak = profile["loaded_nvml_bytes"], profile["peak_nvml_bytes"]
    keep = int(2 * loaded + 1.5 * (peak - loaded))  # two loaded workers, one job's activations
    fill = gpu.free_bytes - keep - int(0.6 * 2**30)  # the filler's own CUDA context
    print(f"profile: loaded {loaded / 2**30:.1f} GiB, peak {peak / 2**30:.1f} GiB per worker; leaving "
          f"{keep / 2**30:.1f} GiB of {gpu.free_bytes / 2**30:.1f} GiB free: room for two loaded workers "
          f"but one job at a time", flush=True)
    marker = work / "filler.ok"
    marker.unlink(missing_ok=True)
    filler = subprocess.Popen([sys.executable, "-c", FILLER, str(fill), str(marker)])
    try:
        while not marker.exists():
            if filler.poll() is not None:
                raise SystemExit("the filler process failed")
            time.sleep(0.2)
        readings()
        cli("plan", str(manifest))
        started = time.monotonic()
        code = cli("run", str(manifest), "--executor", "local", "--no-progress")
        print(f"run took {time.monotonic() - started:.1f}s (exit {code})", flush=True)
    finally:
        filler.kill()
        filler.wait()
    for log in sorted((out / "logs").glob("*.log")):
        lines = [line for line in log.read_text(encoding="utf-8").splitlines()
                 if "out of memory" in line or "retir" in line or "done " in line]
        print(f"--- {log.name} ({len(lines)} lines on OOM/retire/done):\n" + "\n".join(lines[:30]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
