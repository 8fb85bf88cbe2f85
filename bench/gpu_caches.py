"""Issue 31 on the GPU machine: what each step cache (`speed.cache`) saves per video, measured through the
product's own diffusers backend (`harness.open_backend`, `generate`, `job_info`) on a Wan2.1-14B-sized
random-weight checkpoint at 832x480x81.

    python bench/gpu_caches.py CHECKPOINT [--steps 12] [--only none,taylorseer,...] [--tiny]

Step count, chosen to fit one 10-minute device call on an H100 (the issue asks 38 steps with CFG; these
are fewer, and every figure is recorded with its step count): a 14B eager step with CFG is about 6.5 s, a
cfg-1 step about 3.3 s, the build about 50 s, the load about 40 s, each video's text encoding, VAE decode
and frames about 5 s. At 12 steps, even if no cache skipped anything: a 2-step warm-up (15 s), 4 CFG
videos (4 × (12 × 6.5 + 5) = 332 s) and 2 cfg-1 videos (2 × (12 × 3.3 + 5) = 89 s) are about 436 s, 530 s
with the build and load. 16 steps would be about 570 s of videos alone: over.

Runs, one video each, seed 0, one prompt (its embedding cached by the warm-up, so no video pays for it):
  CFG 5   none, taylorseer (interval 5, warm-up 3: at 12 steps 5 of 12 computed), then first_block 0.05
          and 0.1 (adaptive: last, as their figures say least)
  cfg 1   none, faster_cache (skip 2): FasterCache runs only without guidance on Wan (diffusers keeps one
          attention cache per layer, and Wan's pipeline runs the cond and uncond passes as two calls;
          the backend refuses it with CFG), so it is timed against a cfg-1 baseline of its own
Per run: seconds of `generate` (the video, decode included), the job info's s/step and time split, its
cache counts per expert (denoiser calls, calls that reused the step, blocks and self-attentions computed
of all: FasterCache skips attentions, not whole steps), the peak
memory, and the PSNR of its frames against the uncached video at the same cfg. Each measurement is
printed and appended to $OUT/caches.jsonl as it is made, so a run cut off by the device call's limit
still says what it measured.

What these figures say, honestly:
  - taylorseer and faster_cache have a fixed schedule (a step count, not a measured change): which steps
    they skip is the same on any weights, so their speed here is their real speed at this size and step
    count (their PSNR is not: it depends on what the real model computes).
  - first_block is adaptive: it skips while the first block's residual changes by less than the
    threshold, and on random weights that change is nothing like a trained model's. Its reused counts and
    s/video here do NOT predict real ones (it may skip almost everything or nothing); they show only that
    the hooks run at 14B size and what a skipped step costs.
  - the text encoder of these checkpoints has umT5-xxl's width with 2 layers instead of 24
    (bench/gpu_build_model.py): it is out of the timed videos anyway (its embedding is cached).

`--tiny`: the same on the CPU with the tiny random checkpoint (built if missing) and a 32x32x5 video of 6
steps: a dry run of the script, not a measurement.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import GpuRecord  # noqa: E402
from orchestrator.harness import open_backend  # noqa: E402
from orchestrator.jobs import Job  # noqa: E402
from orchestrator.manifest import GenerationConfig, ModelConfig, SpeedConfig  # noqa: E402
from orchestrator.manifest.model import cache_text  # noqa: E402

PROMPT = "a red ball rolls across a wooden table, then falls to the floor"
OUT = Path(os.environ.get("OUT", "/tmp/out"))
STEPS = 12  # see the module docstring: what fits one 10-minute device call at 14B
# (name, cfg, cache text): in the order run; the uncached run of each cfg is the baseline of the others
RUNS = (("none", 5.0, "none"),
        ("taylorseer", 5.0, cache_text("taylorseer", {})),
        ("none_cfg1", 1.0, "none"),
        ("faster_cache_cfg1", 1.0, cache_text("faster_cache", {"skip": 2})),
        ("first_block_0.05", 5.0, cache_text("first_block", {"threshold": 0.05})),
        ("first_block_0.1", 5.0, cache_text("first_block", {"threshold": 0.1})))


class Bench(GpuRecord):
    def __init__(self, tiny: bool):
        super().__init__(OUT / "caches.jsonl", tiny)
        self.baselines: dict[tuple, tuple] = {}  # (cfg, steps) -> the uncached video's (frames, seconds)

    def video(self, backend, name: str, generation: GenerationConfig, cache: str) -> dict:
        """One job through the backend as a worker runs it, its own `speed.cache` set up per job."""
        import numpy as np
        model = dataclasses.replace(backend.model, speed=SpeedConfig(cache=cache))
        output = Path(tempfile.mkdtemp()) / f"{name}.mp4"  # (never written: where MagCache would calibrate)
        job = Job(id=name, ordinal=0, category="bench", stem=None, reference=None, prompt_index=0, prompt=PROMPT,
                  seed=0, output=str(output), model=model, generation=generation)
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        self.sync()
        started = time.perf_counter()
        frames = np.asarray(backend.generate(job, lambda step, steps: None))
        self.sync()
        seconds = time.perf_counter() - started
        info = backend.job_info()
        facts = {"steps": generation.steps, "cfg": generation.cfg_scale, "cache": cache,
                 "video_s": round(seconds, 2), "seconds_per_step": info.get("seconds_per_step"),
                 "split": {key: round(value, 2) for key, value in (info.get("seconds") or {}).items()},
                 "peak_gib": round((info.get("peak_memory_bytes") or 0) / 2**30, 1)}
        counts = {expert: c for expert, c in (info.get("cache") or {}).items() if isinstance(c, dict) and "calls" in c}
        if counts:
            facts["cache_counts"] = counts
            facts["calls_reused"] = f"{sum(c['calls_reused'] for c in counts.values())}/" \
                                    f"{sum(c['calls'] for c in counts.values())}"
            facts["blocks_computed"] = f"{sum(c['blocks_computed'] for c in counts.values())}/" \
                                       f"{sum(c['blocks_total'] for c in counts.values())}"
            # (FasterCache reuses no whole step: it skips self-attentions inside the blocks)
            facts["attention_computed"] = f"{sum(c['attention_computed'] for c in counts.values())}/" \
                                          f"{sum(c['blocks_total'] for c in counts.values())}"
        key = (generation.cfg_scale, generation.steps)
        if cache == "none":
            self.baselines[key] = (frames, seconds)
        elif key in self.baselines:
            reference, reference_seconds = self.baselines[key]
            mse = float(np.mean((frames.astype(np.float64) - reference.astype(np.float64)) ** 2))
            facts["psnr_db_vs_uncached"] = "inf" if mse == 0 else round(10 * math.log10(255.0 ** 2 / mse), 1)
            facts["speedup_vs_uncached"] = round(reference_seconds / seconds, 2)
        self.record(f"video {name}", **facts)
        return facts


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--steps", type=int, default=None, help=f"denoising steps per video (default {STEPS}; "
                        "tiny: 6)")
    parser.add_argument("--only", help="comma-separated run names, of: " + ", ".join(name for name, *_ in RUNS))
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    bench = Bench(args.tiny)
    torch = bench.torch
    checkpoint = Path(args.checkpoint)
    if args.tiny and not (checkpoint / "model_index.json").exists():
        from orchestrator.demo.random_checkpoints import build_random_wan
        build_random_wan(checkpoint, "tiny", variant="t2v")
    size = dict(width=32, height=32, num_frames=5) if args.tiny else dict(width=832, height=480, num_frames=81)
    steps = args.steps or (6 if args.tiny else STEPS)
    wanted = args.only.split(",") if args.only else [name for name, *_ in RUNS]
    unknown = set(wanted) - {name for name, *_ in RUNS}
    if unknown:
        parser.error(f"unknown runs: {', '.join(sorted(unknown))}")
    model = ModelConfig(backend="diffusers", task="t2v", path=str(checkpoint),
                        dtype="float32" if args.tiny else "bfloat16", speed=SpeedConfig())
    started = time.perf_counter()
    backend = open_backend(model, GenerationConfig(**size, fps=16, steps=steps, cfg_scale=5.0),
                           (0,) if bench.cuda else ())
    bench.record("load", seconds=round(time.perf_counter() - started, 1), steps=steps, size=size,
                 device=torch.cuda.get_device_name(0) if bench.cuda else "cpu", torch=torch.__version__)
    try:
        # warm-up: the prompt's embeddings (cached for every later video), cuDNN's and the allocator's first
        # calls; 2 steps with CFG, so both passes have run once
        bench.video(backend, "warm-up", GenerationConfig(**size, fps=16, steps=2, cfg_scale=5.0), "none")
        for name, cfg, cache in RUNS:
            if name in wanted:
                bench.video(backend, name, GenerationConfig(**size, fps=16, steps=steps, cfg_scale=cfg), cache)
    finally:
        backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
