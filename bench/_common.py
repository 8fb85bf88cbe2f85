"""Shared helpers of the CPU benchmarks: the machine, tables, and the user's experiment shape.

The user's experiment (shared/seeds/003): four categories of 14, 33, 13 and 8 reference videos,
5 prompts each, seeds 42 and 142 = 680 jobs; 4 GPUs, one category per GPU, 2 processes per GPU.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SEED_CATEGORIES = {"camera_motion": 14, "single_object": 33, "multiple_objects": 13,
                   "complex_human_motion": 8}
SEED_PROMPTS = 5
SEED_SEEDS = (42, 142)
SEED_GPUS = 4
SEED_PROCS_PER_GPU = 2


def machine() -> str:
    """One line: CPU model, cores, Python version, date."""
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}")


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def fmt(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]])


def tiny_mp4(path: Path) -> Path:
    """One real 1-frame 16×16 mp4 (a reference video the manifest loader can open)."""
    import numpy as np

    from orchestrator.outputs import write_mp4
    frames = np.full((1, 16, 16, 3), 128, dtype=np.uint8)
    write_mp4(frames, path, fps=1, expected_frames=1)
    return path


def make_reference_tree(folder: Path, categories: dict[str, int]) -> dict[str, Path]:
    """refs/<category>/ref_<k>.mp4 for each category (copies of one tiny mp4); {category: folder}."""
    source = tiny_mp4(folder / "_tiny.mp4")
    out = {}
    for category, count in categories.items():
        sub = folder / "refs" / category
        sub.mkdir(parents=True, exist_ok=True)
        for k in range(count):
            shutil.copyfile(source, sub / f"ref_{k:03d}.mp4")
        out[category] = sub
    return out


def write_yaml(path: Path, data: dict) -> Path:
    import yaml
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def seed_manifest(folder: Path, options: dict | None = None, cpu_slots: int = 8,
                  categories: dict[str, int] | None = None, heartbeat_timeout_s: float = 30.0) -> Path:
    """The user's experiment as a v2v manifest on the synthetic backend (tiny 16×16 1-frame outputs)."""
    categories = categories or SEED_CATEGORIES
    refs = make_reference_tree(folder, categories)
    prompts = [f"prompt {i}: a motion like the reference" for i in range(SEED_PROMPTS)]
    data = {
        "name": "seed003",
        "output_dir": "out",
        "model": {"backend": "synthetic", "task": "v2v", "options": dict(options or {})},
        "generation": {"width": 16, "height": 16, "num_frames": 1, "fps": 1, "steps": 1},
        "seeds": list(SEED_SEEDS),
        "categories": {name: {"videos": f"refs/{name}/*.mp4", "prompts": prompts} for name in refs},
        "resources": {"cpu_slots": cpu_slots},
        "execution": {"executor": "local", "retries": 2, "job_timeout_s": 600,
                      "heartbeat_timeout_s": heartbeat_timeout_s, "max_restarts": 3},
    }
    return write_yaml(folder / "seed003.yaml", data)


class GpuRecord:
    """What a GPU bench script measures, one JSON line each: printed, and appended to `file` as it is made,
    so a device call cut off by its limit still brings back what was measured. `sync` waits for the card
    (nothing on the CPU) before a clock is read."""

    def __init__(self, file: Path, tiny: bool, **tags):
        import torch
        self.torch, self.tiny, self.tags = torch, tiny, tags
        self.cuda = torch.cuda.is_available() and not tiny
        file.parent.mkdir(parents=True, exist_ok=True)
        self.record_file = file

    def record(self, what: str, **facts) -> None:
        line = json.dumps({**self.tags, "what": what, **facts})
        print(line, flush=True)
        with open(self.record_file, "a", encoding="utf-8") as stream:
            stream.write(line + "\n")

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
