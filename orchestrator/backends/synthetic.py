"""The synthetic backend: a test backend with no model.

It draws a deterministic picture per (prompt, seed, frame) and can take a set time per job and
inject failures (errors, out-of-memory, hangs, crashes), for tests, demos and benchmarks. It runs on
the CPU, so a sweep with it runs on any machine.

Options (`model.options`):
  seconds_per_job: float   time one job takes (spread over its steps); default 0
  load_seconds: float      time loading takes (a model being loaded); default 0
  load_error: str          loading fails with this error (a broken checkpoint, a missing library)
  jitter: float            ±fraction of seconds_per_job, deterministic per job (e.g. 0.5)
  fail_rate, oom_rate, hang_rate, crash_rate: float
                           chance per attempt of an error, an OutOfMemory, a hang (no progress
                           ever again) or a crash (the process dies), decided by a hash of
                           (job, attempt), so a run is reproducible
  fail_jobs: [glob]        job keys (category/stem/seed_S_prompt_I) that always fail
  crash_jobs: [glob]       job keys whose first attempt crashes the worker process
  fail_attempts: int       every job fails its first N attempts
  hang_jobs: [glob]        job keys whose first attempt hangs halfway (no progress ever again)
  hang_attempts: int       every job hangs halfway through its first N attempts

Every task is accepted. For Wan's conditioned tasks (s2v, vace, control, animate) it reads each input
by the media rules, as a real backend would, and lets it show in the picture: the audio's loudness sets
each frame's brightness, a control or driving pose video is blended in, a reference image tints the
clip, the face video fills a corner, a camera direction pans the picture. So the engine, the demo and
the tests cover these tasks (and their bad inputs) on the CPU.

`model.loras` tint the picture by file and strength (0: no change), switched in place between jobs as a
library backend's adapters are, so the engine's LoRA switching and its plan are tested on the CPU.

`speed:` is accepted and only recorded (there is no denoiser to compile or quantize), so the tests of
job identity, planning and the compile cache can run a whole sweep with it.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import time
from pathlib import Path

import numpy as np

from ..backend import Backend, BackendProblem, OutOfMemory
from ..manifest import CONDITIONED_TASKS, IMAGE_SUFFIXES
from ..manifest.model import is_lora_axis

OPTIONS = {"seconds_per_job": float, "load_seconds": float, "load_error": str, "jitter": float, "fail_rate": float, "oom_rate": float,
           "hang_rate": float, "crash_rate": float, "fail_jobs": list, "crash_jobs": list, "fail_attempts": int,
           "oom_marker": str, "hang_jobs": list, "hang_attempts": int}
# A negative or NaN time would crash time.sleep or skip it; jitter above 1 makes negative times.
# Job.inputs role -> how it is read (orchestrator/media.py)
INPUT_KINDS = {"audio": "audio", "reference_image": "image", "pose_video": "video", "face_video": "video"}
# camera direction -> pixels the picture moves per frame (x, y); zoom shows as a slow drift
CAMERA_PAN = {"left": (2, 0), "right": (-2, 0), "up": (0, 2), "down": (0, -2), "left_up": (2, 2),
              "left_down": (2, -2), "right_up": (-2, 2), "right_down": (-2, -2), "zoom_in": (1, 1),
              "zoom_out": (-1, -1)}
BOUNDS = {"seconds_per_job": (0, 86400), "load_seconds": (0, 86400), "jitter": (0, 1), "fail_attempts": (0, 1000),
          "hang_attempts": (0, 1000)}
GLOB_LISTS = ("fail_jobs", "crash_jobs", "hang_jobs")  # job keys, as fnmatch globs


def _unit(*parts) -> float:
    """A deterministic number in [0, 1) from the parts."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class SyntheticBackend(Backend):
    name = "synthetic"
    runs_on_cpu = True
    measured_sizing = False  # no model, no device memory: nothing to measure
    runtime_options = frozenset(OPTIONS)  # the picture depends only on prompt, seed and frame

    @classmethod
    def check(cls, manifest) -> list:
        problems = []
        for key, value in manifest.model.options.items():
            kind = OPTIONS.get(key)
            if kind is None:
                problems.append(f"unknown synthetic option `{key}` (use: {', '.join(OPTIONS)})")
            elif not isinstance(value, kind) and not (kind is float and isinstance(value, int)):
                problems.append(f"synthetic option `{key}` must be {kind.__name__}, got {value!r}")
            elif key.endswith("_rate") and not 0 <= value <= 1:
                problems.append(f"synthetic option `{key}` must be between 0 and 1, got {value}")
            elif key in BOUNDS and not BOUNDS[key][0] <= value <= BOUNDS[key][1]:  # NaN fails too
                low, high = BOUNDS[key]
                problems.append(BackendProblem(f"model.options.{key}", f"synthetic option `{key}` is {value}",
                                               f"use a value from {low} to {high}"))
            elif key in GLOB_LISTS and not all(isinstance(entry, str) and entry for entry in value):
                wrong = next(entry for entry in value if not (isinstance(entry, str) and entry))
                problems.append(BackendProblem(
                    f"model.options.{key}", f"synthetic option `{key}` holds {wrong!r}, not a glob of job keys",
                    f"write each entry as a quoted glob of category/stem/seed_S_prompt_I, e.g. \"alpha/seed_2_*\""))
        return problems

    switches_loras = True  # its "LoRAs" are a tint of the picture, set in place like adapters' weights

    def load(self) -> None:
        self.options = dict(self.model.options)
        self.active_loras = self.model.loras
        time.sleep(float(self.options.get("load_seconds", 0.0)))
        if self.options.get("load_error"):
            raise RuntimeError(self.options["load_error"])

    def use_loras(self, loras) -> None:
        self.active_loras = loras

    def _media(self, job):
        if self.model.task not in CONDITIONED_TASKS:
            return None  # t2v/i2v/v2v pictures depend on prompt and seed only, as they always have
        return self.reference_cache(self.generation_for(job))  # one per size its axes sweep

    def prepare(self, job) -> None:
        media = self._media(job)
        if media is None:
            return
        if job.reference:
            media.prefetch(job.reference)
        for role, value in job.inputs.items():
            if role != "camera":
                media.prefetch(value, kind=INPUT_KINDS[role])

    def close(self) -> None:
        self.close_reference_caches()

    def generate(self, job, progress) -> np.ndarray:
        o = self.options
        attempt = self.attempt  # from the ledger, so a restarted worker does not replay a crash
        seconds = float(o.get("seconds_per_job", 0.0))
        if o.get("jitter"):
            seconds *= 1 + o["jitter"] * (2 * _unit("jitter", job.id) - 1)
        steps = self.generation_for(job).steps
        roll = lambda kind: _unit(kind, job.id, attempt) < o.get(f"{kind}_rate", 0.0)  # noqa: E731
        hang = roll("hang") or attempt <= int(o.get("hang_attempts", 0)) or (attempt == 1 and any(
            fnmatch.fnmatch(job.key, pattern) for pattern in o.get("hang_jobs", [])))
        crash = roll("crash") or (attempt == 1 and any(
            fnmatch.fnmatch(job.key, pattern) for pattern in o.get("crash_jobs", [])))
        for step in range(steps):
            if hang and step == steps // 2:
                while True:  # a hung CUDA call: no progress, no return
                    time.sleep(3600)
            if crash and step == steps // 2:
                os._exit(137)
            if seconds:
                time.sleep(seconds / steps)
            progress(step + 1, steps)
        if roll("oom"):
            raise OutOfMemory(f"synthetic out of memory (job {job.key}, attempt {attempt})")
        if roll("fail") or attempt <= int(o.get("fail_attempts", 0)):
            raise RuntimeError(f"synthetic failure (job {job.key}, attempt {attempt})")
        if any(fnmatch.fnmatch(job.key, pattern) for pattern in o.get("fail_jobs", [])):
            raise RuntimeError(f"synthetic permanent failure of {job.key}")
        return self.conditioned(job, self.frames(job))

    def conditioned(self, job, video: np.ndarray) -> np.ndarray:
        """The picture changed by each of a conditioned job's inputs (module docstring)."""
        media = self._media(job)
        if media is None:
            return video
        out = video.astype(np.float32)
        g = self.generation_for(job)
        if job.reference:
            if Path(job.reference).suffix.lower() in IMAGE_SUFFIXES:
                out = 0.7 * out + 0.3 * media.image(job.reference)[None].astype(np.float32)
            else:  # the control video of vace/control
                out = 0.5 * out + 0.5 * media.video(job.reference).astype(np.float32)
        if "reference_image" in job.inputs:
            out = 0.8 * out + 0.2 * media.image(job.inputs["reference_image"])[None].astype(np.float32)
        if "pose_video" in job.inputs:
            out = 0.5 * out + 0.5 * media.video(job.inputs["pose_video"]).astype(np.float32)
        if "face_video" in job.inputs:
            h, w = max(1, g.height // 4), max(1, g.width // 4)
            out[:, :h, :w] = media.video(job.inputs["face_video"])[:, :h, :w]
        if "audio" in job.inputs:
            audio = media.audio(job.inputs["audio"])
            per_frame = np.array_split(audio, g.num_frames)
            loudness = np.array([np.sqrt(np.mean(np.square(chunk))) if chunk.size else 0.0 for chunk in per_frame])
            gain = 0.4 + 1.2 * loudness / max(float(loudness.max()), 1e-6)  # quiet frames dark, loud bright
            out *= gain[:, None, None, None]
        if "camera" in job.inputs:
            dx, dy = CAMERA_PAN[job.inputs["camera"]]
            for i in range(g.num_frames):
                out[i] = np.roll(out[i], (dy * i, dx * i), axis=(0, 1))
        return np.clip(out, 0, 255).astype(np.uint8)

    def frames(self, job) -> np.ndarray:
        g = self.generation_for(job)
        # Axis values (cfg, steps, …) change a real model's picture: here too, so the videos differ. The
        # LoRAs' show through the backend's own state (a tint per LoRA on, by its file and strength), not the
        # job's values: a switch that did not happen would show in the picture, as it would with a model.
        own = sorted((key, value) for key, value in job.axes.items() if not is_lora_axis(key))
        axes = (repr(own),) if own else ()
        rng = np.random.default_rng(int(_unit("picture", job.prompt, job.seed, *axes) * 2**63))
        base = rng.integers(40, 215, size=3).astype(np.float64)
        for lora in getattr(self, "active_loras", ()):
            tint = np.array([_unit("lora", lora.digest or lora.path, c) - 0.5 for c in range(3)])
            base = base + 80 * lora.strengths[0] * tint
        t = np.arange(g.num_frames)[:, None, None]
        y = np.arange(g.height)[None, :, None]
        x = np.arange(g.width)[None, None, :]
        phase = (x + 3 * t + (job.seed % 97)) / max(g.width, 1) * 2 * np.pi
        wave = (np.sin(phase) * 0.5 + 0.5) * (y / max(g.height - 1, 1))
        video = np.empty((g.num_frames, g.height, g.width, 3), dtype=np.uint8)
        for c in range(3):
            video[..., c] = np.clip(base[c] * 0.6 + wave * 100 * (c + 1) / 3, 0, 255)
        return video
