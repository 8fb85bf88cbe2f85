"""GPU throughput (issue 7, item 3): the same jobs three ways, side by side on one machine.

  (a) bare loop: one Python process loads the pipeline once and calls it job after job (no orchestration)
  (b) this orchestrator: `run_experiment.py run MANIFEST --executor local` with workers_per_gpu: auto
  (c) one process per job that loads the model each time (a shell loop around a generate script)

Every way writes the same H.264 mp4s with PyAV. Times are taken from the command's start to each final
mp4's modification time: videos/hour = videos / (last video - start); time to first video.

    python bench/gpu_throughput.py --model CKPT --work DIR [--steps 4] [--jobs 12] [--modes a,b,c]

(b) plans from the calibration profile cached under DIR/b/.sweep/profiles (run bench/gpu_sizing.py first
with the same --work, or (b) calibrates first and that time is counted).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def _jobs(manifest_path: Path):
    from orchestrator.jobs import expand
    from orchestrator.validation import load_manifest
    manifest = load_manifest(manifest_path)
    return manifest, expand(manifest)


def _load_pipeline(manifest):
    import torch
    from diffusers import WanPipeline
    pipe = WanPipeline.from_pretrained(manifest.model.path, dtype=getattr(torch, manifest.model.dtype))
    pipe.to("cuda" if torch.cuda.is_available() else "cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, manifest, job, out: Path) -> None:
    import numpy as np
    import torch
    from orchestrator.outputs import write_mp4_file
    g = manifest.generation
    video = pipe(prompt=job.prompt, negative_prompt=g.negative_prompt, height=g.height, width=g.width,
                 num_frames=g.num_frames, num_inference_steps=g.steps, guidance_scale=g.cfg_scale,
                 generator=torch.Generator("cpu").manual_seed(job.seed), output_type="np").frames[0]
    video = (np.clip(video, 0, 1) * 255).round().astype(np.uint8)
    target = out / f"{job.category}_seed_{job.seed}_prompt_{job.prompt_index}.mp4"
    write_mp4_file(video, str(target) + ".tmp.mp4", manifest.generation.fps)
    os.replace(str(target) + ".tmp.mp4", target)


def bare_loop(manifest_path: str, out: str) -> int:
    manifest, jobs = _jobs(Path(manifest_path))
    pipe = _load_pipeline(manifest)
    for job in jobs:
        _generate(pipe, manifest, job, Path(out))
    return 0


def one_job(manifest_path: str, out: str, index: int) -> int:
    manifest, jobs = _jobs(Path(manifest_path))
    pipe = _load_pipeline(manifest)
    _generate(pipe, manifest, jobs[index], Path(out))
    return 0


def _figures(name: str, start: float, folder: Path, expected: int, wall: float) -> dict:
    times = sorted(p.stat().st_mtime - start for p in folder.rglob("*.mp4") if ".sweep" not in p.parts
                   and ".partial-" not in p.name and not p.name.endswith(".tmp.mp4"))
    result = {"way": name, "videos": len(times), "expected": expected, "command_seconds": round(wall, 1)}
    if times:
        result.update(first_video_s=round(times[0], 1), last_video_s=round(times[-1], 1),
                      videos_per_hour=round(len(times) / times[-1] * 3600, 1),
                      steady_videos_per_hour=round((len(times) - 1) / (times[-1] - times[0]) * 3600, 1)
                      if len(times) > 1 else None)
    return result


def main() -> int:
    from gpu_manifest import model_arguments
    parser = model_arguments()
    parser.add_argument("--modes", default="a,b,c")
    parser.add_argument("--json", help="append the figures to this JSON-lines file")
    args = parser.parse_args()
    from gpu_manifest import write_manifest

    work = Path(args.work)
    common = dict(width=args.width, height=args.height, frames=args.frames, steps=args.steps, jobs=args.jobs,
                  dtype=args.dtype)
    manifest = write_manifest(work / "b.yaml", args.model, work / "b", **common)
    results = []
    for mode in args.modes.split(","):
        out = work / mode
        out.mkdir(parents=True, exist_ok=True)
        for old in out.rglob("*.mp4"):
            old.unlink()
        print(f"--- ({mode}) {time.strftime('%H:%M:%S')}", flush=True)
        start = time.time()
        if mode == "a":
            subprocess.run([sys.executable, __file__, "--bare-loop", str(manifest), str(out)], check=True)
            name = "(a) bare loop, one process"
        elif mode == "b":
            subprocess.run([sys.executable, str(ROOT / "run_experiment.py"), "run", str(manifest), "--executor",
                            "local", "--no-progress"], check=True)
            name = "(b) orchestrator, workers_per_gpu: auto"
            plan_line = [line for line in (out / ".sweep" / "workers").glob("*.json")]
            print(f"workers: {sorted(p.stem for p in plan_line)}", flush=True)
        elif mode == "c":
            for index in range(args.jobs):
                subprocess.run([sys.executable, __file__, "--one-job", str(manifest), str(out), str(index)],
                               check=True)
            name = "(c) one process per job"
        else:
            raise SystemExit(f"unknown mode {mode}")
        figures = _figures(name, start, out, args.jobs, time.time() - start)
        results.append(figures)
        print(json.dumps(figures), flush=True)
        if args.json:
            with open(args.json, "a", encoding="utf-8") as stream:
                stream.write(json.dumps(figures) + "\n")
    summarize(results)
    return 0


def summarize(results: list[dict]) -> None:
    print()
    print(f"{'way':<42} {'videos':>6} {'videos/hour':>11} {'steady v/h':>10} {'first video':>11}")
    for r in results:
        print(f"{r['way']:<42} {r['videos']:>6} {r.get('videos_per_hour', 0):>11.1f} "
              f"{r.get('steady_videos_per_hour') or 0:>10.1f} {r.get('first_video_s', 0):>10.1f}s")
    bs = [r for r in results if r["way"].startswith("(b)") and r.get("videos_per_hour")]
    for other in ("(a)", "(c)"):
        for i, r in enumerate(x for x in results if x["way"].startswith(other) and x.get("videos_per_hour")):
            for b in bs:
                steady = (f"; steady state {b['steady_videos_per_hour'] / r['steady_videos_per_hour']:.3f}"
                          if b.get("steady_videos_per_hour") and r.get("steady_videos_per_hour") else "")
                print(f"(b)/{other} = {b['videos_per_hour'] / r['videos_per_hour']:.3f} "
                      f"(against {other} run {i + 1}{steady})")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--bare-loop":
        sys.exit(bare_loop(sys.argv[2], sys.argv[3]))
    if len(sys.argv) > 1 and sys.argv[1] == "--summary":  # figures of earlier runs (JSON lines)
        summarize([json.loads(line) for f in sys.argv[2:] for line in open(f, encoding="utf-8") if line.strip()])
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "--one-job":
        sys.exit(one_job(sys.argv[2], sys.argv[3], int(sys.argv[4])))
    sys.exit(main())
