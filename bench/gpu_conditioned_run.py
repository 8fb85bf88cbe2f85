"""One conditioned task (or the t2v baseline) through the real CLI, and its figures from the sidecars.

    python bench/gpu_conditioned_run.py --task vace --model ROOT/Wan2.1-VACE-1.3B --work /tmp/c/vace --steps 4

Writes the task's inputs (made here: a control video of the clip's length plus 8 frames, a reference
image, 2 s more speech-like audio than the clip for s2v, a driving folder for animate) and a manifest of
2 prompts × 1 seed on ONE input, so the second job shows the per-worker input cache. Runs
`run_experiment.py run MANIFEST --executor local` (one worker), then prints from the sidecars: load
time per component, seconds per step, seconds per video, the time inside generate() before the first
step of each job (prompt and input encoding, onloading) with what the caches did (`input_encodings`:
"encoded" or "reused" per DiffSynth unit; `prompt_encodings`), and peak memory. The last line,
`summary: {...}`, is the same as JSON.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gpu_backends import reference_video, run_local  # noqa: E402

PROMPTS = ["a dancer in a white dress turns across a stage", "a robot walks through a neon-lit corridor"]
TASKS = ("t2v", "vace", "control", "s2v", "animate")


def make_inputs(task: str, folder: Path, width: int, height: int, frames: int, fps: int) -> dict:
    """The category of the task's manifest, pointing at inputs written into `folder`."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    category: dict = {"prompts": PROMPTS}
    if task == "t2v":
        return category
    look = folder / "look.png"
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    Image.fromarray(np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2).astype(np.uint8)).save(look)
    if task in ("vace", "control"):
        reference_video(folder / "pose.mp4", width, height, frames + 8, fps, seed=0)
        category["control"] = [str(folder / "pose.mp4")]
        # (without the CLIP encoder, which is not built, DiffSynth's Fun reference unit gives the DiT the
        # image's VAE latents and zero CLIP features)
        category["images"] = {"pose": str(look)}
    elif task == "s2v":
        category["images"] = [str(look)]
        seconds = frames / fps + 2
        t = np.arange(int(16000 * seconds)) / 16000
        tone = 0.5 * np.sin(2 * np.pi * 220 * t) * np.sign(np.sin(2 * np.pi * 3 * t))
        with wave.open(str(folder / "speech.wav"), "wb") as out:
            out.setnchannels(1), out.setsampwidth(2), out.setframerate(16000)
            out.writeframes((tone * 32767).astype("<i2").tobytes())
        category["audio"] = {"look": str(folder / "speech.wav")}
    elif task == "animate":
        category["images"] = [str(look)]
        driving = folder / "driving" / "look"
        driving.mkdir(parents=True, exist_ok=True)
        reference_video(driving / "src_pose.mp4", width, height, frames + 8, fps, seed=1)
        reference_video(driving / "src_face.mp4", 512, 512, frames + 8, fps, seed=2)
        category["driving"] = str(folder / "driving")
    return category


def manifest(task: str, model: str, work: Path, args) -> Path:
    data = {
        "name": f"conditioned_{task}", "output_dir": str(work / "out"),
        "model": {"backend": "diffsynth", "task": task, "path": model, "dtype": args.dtype,
                  "options": json.loads(args.options)},
        "generation": {"width": args.width, "height": args.height, "num_frames": args.frames, "fps": args.fps,
                       "steps": args.steps, "cfg_scale": 5.0},
        "seeds": [42],
        "categories": {"bench": make_inputs(task, work / "inputs", args.width, args.height, args.frames, args.fps)},
        "resources": {"workers_per_gpu": 1, "gpus_per_worker": 1, "cpu_slots": 1},
        "execution": {"executor": "local", "retries": 0, "job_timeout_s": 900, "heartbeat_timeout_s": 600},
    }
    path = work / "manifest.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def figures(out: Path) -> dict:
    """The run's figures from its sidecars, in the order the jobs ran."""
    cars = sorted((json.loads(p.read_text(encoding="utf-8")) for p in out.rglob("seed_*.json")),
                  key=lambda c: c["timeline"]["called"])
    if not cars:
        raise SystemExit("no sidecars: the run made no video")
    load = cars[0].get("load", {})
    return {
        "videos": len(cars),
        "load_seconds": load.get("load_seconds"), "import_seconds": load.get("import_seconds"),
        "load_components": load.get("components"),
        "seconds_per_step": [c.get("seconds_per_step") for c in cars],
        "generate_seconds": [c.get("generate_seconds") for c in cars],
        # inside generate() before the first step ends, less one step: reading and encoding the prompt
        # and the inputs (and onloading). The second job has a new prompt but the same input.
        "before_first_step_seconds": [round(c["timeline"]["first_step_done"] - c["timeline"]["called"]
                                            - (c.get("seconds_per_step") or 0), 3) for c in cars],
        "input_read_seconds": [c.get("reference_read_seconds") for c in cars],
        "input_encodings": [c.get("input_encodings") for c in cars],
        "prompt_encodings": [c.get("prompt_encodings") for c in cars],
        "peak_memory_gib": max((c.get("peak_memory_bytes") or 0) for c in cars) / 2**30,
        "peak_allocated_gib": max((c.get("peak_memory_allocated_bytes") or 0) for c in cars) / 2**30,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=TASKS, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--fps", type=int, default=16)  # Wan2.2-S2V's rate; the others take it too
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--options", default='{"vram_management": "text_encoder"}', help="model.options as JSON")
    parser.add_argument("--timeout", type=int, default=540)
    parser.add_argument("--plan-only", action="store_true",
                        help="write the inputs and manifest and run `plan` (the pre-start checks), no videos")
    args = parser.parse_args()

    path = manifest(args.task, args.model, args.work, args)
    if args.plan_only:
        plan = subprocess.run([sys.executable, str(ROOT / "run_experiment.py"), "plan", str(path)],
                              capture_output=True, text=True, timeout=args.timeout)
        print(plan.stdout[-3000:] + plan.stderr[-3000:])
        return plan.returncode
    run, wall = run_local(path, args.work / "out", args.timeout)
    if run.returncode:
        return run.returncode
    f = figures(args.work / "out")
    print(f"== {args.task}: {Path(args.model).name}, {args.width}x{args.height}x{args.frames} at {args.fps} fps, "
          f"{args.steps} steps, {f['videos']} videos (2 prompts x 1 seed, one input), whole command {wall:.1f} s")
    print(f"load {f['load_seconds']} s (import {f['import_seconds']} s; components {f['load_components']})")
    print(f"seconds per step {f['seconds_per_step']}; seconds per video (generate) {f['generate_seconds']}")
    print(f"before the first step (prompt + input encoding), first vs second job: {f['before_first_step_seconds']} s; "
          f"input encodings {f['input_encodings']}; prompt encodings {f['prompt_encodings']}; "
          f"inputs read (prefetched) {f['input_read_seconds']} s")
    print(f"peak memory per worker: torch reserved {f['peak_memory_gib']:.1f} GiB, "
          f"allocated {f['peak_allocated_gib']:.1f} GiB")
    print("summary: " + json.dumps({"task": args.task, "model": Path(args.model).name, "wall_seconds": round(wall, 1),
                                    **f}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
