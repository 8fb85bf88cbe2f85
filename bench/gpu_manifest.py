"""The benchmark manifest and command-line flags shared by gpu_sizing.py and gpu_throughput.py."""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

PROMPTS = ["a red ball rolls across a wooden table", "a cat walks along a garden wall at dusk",
           "waves break on a rocky shore", "a paper boat drifts down a rain gutter",
           "a hot air balloon rises over green hills", "a train crosses a bridge in the snow",
           "a dog runs through tall grass", "city lights at night seen from a moving car"]


def write_manifest(path: Path, model: str, out: Path, *, width: int, height: int, frames: int, steps: int,
                   jobs: int, workers_per_gpu="auto", retries: int = 2, name: str = "gpubench",
                   dtype: str = "bfloat16") -> Path:
    seeds = [42, 142]
    prompts = [PROMPTS[i % len(PROMPTS)] + (f" ({i})" if i >= len(PROMPTS) else "") for i in range(jobs // 2)]
    data = {
        "name": name, "output_dir": str(out),
        "model": {"backend": "diffusers", "task": "t2v", "path": str(model), "dtype": dtype, "options": {}},
        "generation": {"width": width, "height": height, "num_frames": frames, "fps": 15, "steps": steps,
                       "cfg_scale": 5.0},
        "seeds": seeds, "categories": {"bench": {"prompts": prompts}},
        "resources": {"workers_per_gpu": workers_per_gpu, "gpus_per_worker": 1, "memory_margin_gib": 2.0,
                      "cpu_slots": 1},
        "execution": {"executor": "local", "retries": retries, "job_timeout_s": 900, "heartbeat_timeout_s": 300},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def model_arguments() -> argparse.ArgumentParser:
    """A parser with the flags both GPU scripts take: model folder, work folder, video settings."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--dtype", default="bfloat16")
    return parser
