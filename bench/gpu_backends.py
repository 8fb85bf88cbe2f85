"""A real-backend sweep on the GPU machine, and the figures docs/benchmarks.md records for it.

    python bench/gpu_backends.py --backend diffusers --model /tmp/wan13b --work /tmp/b --task v2v --steps 4 --jobs 4

Writes a manifest (reference videos made here: 832×480, 81 frames, 15 fps, moving gradients), runs
`run_experiment.py run --executor local` on it, then reads the sidecars and the ledger and prints:
load time (per component where the backend times them), seconds per step and per video, peak memory
per worker, and the gap between one job's end of `generate` and the next job's start (the time the
GPU waits for the CPU between jobs; mp4 encoding is off that path, in the background).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.ledger import Ledger  # noqa: E402
from orchestrator.outputs import write_mp4  # noqa: E402

PROMPTS = ["a red ball rolls across a wooden table", "a cat walks along a garden wall at dusk",
           "waves break on a rocky shore", "a paper boat drifts down a rain gutter"]


def reference_video(path: Path, width: int, height: int, frames: int, fps: int, seed: int) -> Path:
    if path.exists():
        return path
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    colour = np.random.default_rng(seed).random(3)[None, None, :]
    clip = [((np.sin(6 * x + t / 6) * 0.5 + 0.5) * y * colour * 255).astype(np.uint8) for t in range(frames)]
    return write_mp4(np.stack(clip), path, fps=fps, expected_frames=frames)


def run_local(manifest: Path, output_dir: Path, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    """`run MANIFEST --executor local` through the real CLI: the result and its wall seconds. Prints the
    end of its output, and on failure its errors and every worker's log (what a GPU run has to return)."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(ROOT / "run_experiment.py"), "run", str(manifest), "--executor",
                             "local", "--no-progress"], capture_output=True, text=True, timeout=timeout)
    wall = time.monotonic() - started
    print(result.stdout[-3000:])
    if result.returncode:
        print(result.stderr[-3000:])
        for log in sorted((output_dir / "logs").glob("*.log")):
            print(f"--- {log.name}\n" + log.read_text(encoding="utf-8", errors="replace")[-4000:])
    return result, wall


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--task", default="v2v")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=4, help="videos: 2 references × prompts × 1 seed")
    parser.add_argument("--options", default="{}", help="model.options as JSON")
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--timeout", type=int, default=480)
    args = parser.parse_args()

    work = Path(args.work)
    refs = work / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        reference_video(refs / f"clip{i}.mp4", args.width, args.height, args.frames, 15, i)
    prompts = PROMPTS[:max(1, args.jobs // 2)]
    category = {"prompts": prompts}
    if args.task == "v2v":
        category["videos"] = "refs/*.mp4"
    manifest = {
        "name": f"bench_{args.backend}", "output_dir": str(work / "out"),
        "model": {"backend": args.backend, "task": args.task, "path": args.model, "dtype": "bfloat16",
                  "options": json.loads(args.options)},
        "generation": {"width": args.width, "height": args.height, "num_frames": args.frames, "fps": 15,
                       "steps": args.steps, "cfg_scale": 5.0, "denoising_strength": 1.0 if args.task != "v2v" else 0.75},
        "seeds": [42], "categories": {"bench": category},
        "resources": {"workers_per_gpu": 1, "gpus_per_worker": 1},
        "execution": {"executor": "local", "retries": 1, "job_timeout_s": 1200, "heartbeat_timeout_s": 600},
    }
    path = work / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True), encoding="utf-8")
    result, wall = run_local(path, work / "out", args.timeout)
    if result.returncode:
        return result.returncode

    sidecars = sorted((json.loads(p.read_text(encoding="utf-8")) for p in (work / "out").rglob("seed_*.json")),
                      key=lambda s: s["finished_at"])
    attempts = {a["job_id"]: a for a in Ledger(work / "out" / ".sweep" / "ledger.sqlite").attempts()
                if a["outcome"] == "done"}
    load = sidecars[0].get("load", {})
    print(f"backend {args.backend}, task {args.task}, {args.width}x{args.height}x{args.frames}, {args.steps} steps, "
          f"{len(sidecars)} videos, whole command {wall:.1f} s")
    print(f"load: {load.get('load_seconds')} s; components: {load.get('components')}")
    weights = load.get("model_files", {}).get("weight_bytes")
    if weights:
        print(f"weights on disk: {weights / 2**30:.1f} GiB")
    per_step = [s["seconds_per_step"] for s in sidecars if s.get("seconds_per_step")]
    print(f"seconds per step: {statistics.median(per_step):.2f} (median over videos)" if per_step else "seconds per step: n/a")
    print("seconds per video (generate): " + ", ".join(f"{s['generate_seconds']:.1f}" for s in sidecars))
    print("encode seconds (background): " + ", ".join(f"{s.get('encode_seconds', 0):.2f}" for s in sidecars))
    peaks = [s.get("peak_memory_bytes") or 0 for s in sidecars]
    print(f"peak memory per worker: {max(peaks) / 2**30:.1f} GiB")
    # From the ledger: when each job was claimed; from the sidecar: how long generate ran.
    runs = sorted((attempts[s["job_id"]]["started_at"], s["generate_seconds"], s) for s in sidecars if s["job_id"] in attempts)
    gaps = [b[0] - (a[0] + a[1]) for a, b in zip(runs, runs[1:])]
    if gaps:
        print("gap between generate() calls (s): " + ", ".join(f"{g:.3f}" for g in gaps)
              + f"; max {max(gaps):.3f}")
    lead = [s["timeline"]["first_step_done"] - s["timeline"]["called"] - s["seconds_per_step"]
            for s in sidecars if s.get("timeline") and s.get("seconds_per_step") and s["timeline"].get("first_step_done")]
    if lead:
        print("before the first step, inside generate (prompt/reference encoding; s): "
              + ", ".join(f"{v:.2f}" for v in lead))
    hits = [(s.get("prompt_cache_hit"), s.get("reference_encoding_reused")) for s in sidecars]
    print(f"prompt cache hit / reference encoding reused per video: {hits}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
