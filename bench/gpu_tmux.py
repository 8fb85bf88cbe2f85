"""On the GPU machine: a real-model sweep through the default executor (tmux), watched from outside.

Starts `run MANIFEST` (no --executor: tmux is the default), captures a worker's pane while it
generates, waits for the sweep through `report --json`, and prints the report and one sidecar's GPU
fields. The planning profile measured by gpu_sizing.py is copied in, so no calibration runs here.

    python3 bench/gpu_tmux.py --model /tmp/wan13b --work /tmp/gpubench --profile PROFILE.json
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


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run_experiment.py"), *args], capture_output=True,
                          text=True, cwd=ROOT)


def main() -> int:
    from gpu_manifest import model_arguments, write_manifest
    parser = model_arguments()
    parser.add_argument("--profile", help="a cached calibration profile to plan from")
    args = parser.parse_args()
    out = Path(args.work) / "tmux"
    manifest = write_manifest(Path(args.work) / "tmux.yaml", args.model, out, width=args.width,
                              height=args.height, frames=args.frames, steps=args.steps, jobs=args.jobs,
                              name="gpu tmux", dtype=args.dtype)
    text = manifest.read_text(encoding="utf-8").replace("executor: local", "executor: tmux")
    manifest.write_text(text, encoding="utf-8")
    if args.profile:
        (out / ".sweep" / "profiles").mkdir(parents=True, exist_ok=True)
        shutil.copy(args.profile, out / ".sweep" / "profiles")
    started = time.monotonic()
    result = cli("run", str(manifest))
    print(f"$ run_experiment.py run {manifest.name}  (exit {result.returncode}, returned after "
          f"{time.monotonic() - started:.1f}s)\n{result.stdout}{result.stderr}", flush=True)
    if result.returncode:
        return result.returncode

    import libtmux
    server = libtmux.Server(socket_name=os.environ.get("ORCHESTRATOR_TMUX_SOCKET"))
    captured = False
    while True:
        report = json.loads(cli("report", str(manifest), "--json").stdout)
        totals = report["totals"]
        if not captured:
            for session in server.sessions:
                lines = session.active_window.active_pane.capture_pane()
                if any("step" in line for line in lines):
                    print(f"$ tmux capture-pane -t {session.session_name}  (at {time.monotonic() - started:.0f}s)")
                    print("\n".join(line for line in lines if line.strip())[-1500:], flush=True)
                    captured = True
                    break
        if totals["done"] + totals["failed"] >= totals["expected"]:
            break
        time.sleep(2)
    print(f"\nsweep ended after {time.monotonic() - started:.1f}s; sessions left: "
          f"{[s.session_name for s in server.sessions]}")
    print(cli("report", str(manifest)).stdout)
    sidecar = json.loads(sorted((out / "bench").glob("*.json"))[0].read_text(encoding="utf-8"))
    print("sidecar:", json.dumps({k: sidecar.get(k) for k in ("worker", "devices", "gpu", "versions",
                                                              "generate_seconds", "peak_memory_bytes",
                                                              "encode_seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
