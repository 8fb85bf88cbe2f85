"""The backend interface: `load()` once, `generate(job, progress)` per job, `close()` at the end.

Around it, what every backend shares: how a backend reports a manifest problem (`BackendProblem`,
mapped to the manifest line of the key it concerns), and the identity of a checkpoint's files
(`model_files_identity`) that every sidecar records.
"""
from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar

import numpy as np

if TYPE_CHECKING:
    from ..jobs import Job
    from ..manifest import GenerationConfig, Manifest, ModelConfig

Progress = Callable[[int, int], None]  # (step done, steps in all): also the worker's sign of life


class OutOfMemory(RuntimeError):
    """The device ran out of memory during a job (a backend translates its library's error)."""


class NonFiniteFrames(RuntimeError):
    """The decoded video holds NaN or infinite values: written as an mp4 it would be a black clip that
    counts as done, so the job fails instead (a numerical problem, e.g. of a quantized denoiser)."""

    def __init__(self, speed):
        hint = (f" with speed settings (compile {speed.compile}, quantize {speed.quantize}); try them with "
                "`models speed` or leave them out" if not speed.is_default else "")
        super().__init__("the decoded video holds NaN or infinite values" + hint)


class FirstDenoiserCall(Exception):
    """Raised by a backend's hook at a job's first call of its denoiser, with that call's arguments:
    `prepare_denoise` stops the job there (see `run_to_first_denoiser_call`)."""

    def __init__(self, args: tuple, kwargs: dict):
        super().__init__("the job's first denoiser call")
        self.args, self.kwargs = args, kwargs


def run_to_first_denoiser_call(backend: "Backend", job: "Job") -> FirstDenoiserCall:
    """Run `job` on `backend`, whose denoiser has been made to raise `FirstDenoiserCall`, up to that call:
    the prompt and the job's inputs are encoded as for a real job, and nothing is denoised or written."""
    try:
        backend.generate(job, lambda step, steps: None)
    except FirstDenoiserCall as call:
        return call
    raise RuntimeError(f"{backend.name}: the pipeline finished job {job.id} without calling its denoiser")


@dataclass(frozen=True)
class BackendProblem:
    """A problem with one manifest key, e.g. `generation.num_frames` or `model.options.offload`.

    The manifest loader reports it at that key's line (or the nearest enclosing key that is there).
    """
    key: str
    message: str
    fix: str = ""


class Backend(ABC):
    name: ClassVar[str]
    runs_on_cpu: ClassVar[bool] = False  # may take CPU worker slots on a machine without GPUs
    measured_sizing: ClassVar[bool] = True  # workers per card come from calibration (orchestrator/sizing/)
    # `run` checks model.path file by file first (checkpoints.inspect): for backends that load the
    # weights themselves, not for one that hands the folder to another program.
    verify_checkpoint: ClassVar[bool] = False
    # The layout model.path holds (`diffusers`, or `wan`: the original release): which hub repository
    # a missing-checkpoint fix names (checkpoints.download_fix). None: no checkpoint.
    checkpoint_layout: ClassVar[str | None] = None
    # Options that change how fast or where a job runs, not its pixels: they stay out of job ids.
    runtime_options: ClassVar[frozenset[str]] = frozenset()
    # Options naming files or folders: the manifest resolves them against its own folder (workers
    # never see that folder), as it does model.path.
    path_options: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, model: "ModelConfig", generation: "GenerationConfig", devices: tuple[int, ...]):
        self.model = model
        self.generation = generation
        self.devices = devices
        self.attempt = 1  # which attempt of the current job this is; the worker sets it
        self.owner = ""  # the worker's id, for temporary files a restarted worker may clean up
        # What `load` found out, recorded in every sidecar: seconds in all and per component, the
        # model files' identity, library versions.
        self.load_info: dict = {}

    def generation_for(self, job: "Job") -> "GenerationConfig":
        """The generation settings of one job: the manifest's (`self.generation`) with the job's axis
        values (`axes:`) in place. Per-job settings are read from here, never from self.generation."""
        from ..manifest import apply_axes
        return apply_axes(self.generation, getattr(job, "axes", None) or {})

    def reference_cache(self, generation: "GenerationConfig", square: int | None = None):
        """This worker's references prepared at one job's size, length and rate (a `media.ReferenceCache`,
        read ahead in a thread): the manifest's, and one more per combination its axes sweep. `square`:
        frames of that side instead of the job's size (Animate's face crops, at its motion encoder's)."""
        from ..manifest.task_inputs import AUDIO_RATE
        from ..media import ReferenceCache
        caches = self.__dict__.setdefault("_reference_caches", {})
        width, height = (square, square) if square else (generation.width, generation.height)
        shape = (width, height, generation.num_frames, generation.fps)
        if shape not in caches:
            caches[shape] = ReferenceCache(*shape, keep=6, sample_rate=AUDIO_RATE)
        return caches[shape]

    def close_reference_caches(self) -> None:
        for cache in self.__dict__.pop("_reference_caches", {}).values():
            cache.close()

    @classmethod
    def check(cls, manifest: "Manifest") -> list["str | BackendProblem"]:
        """Problems with the manifest for this backend, before anything starts.

        A plain string is reported at the `model:` block; a `BackendProblem` at its key's line.
        """
        return []

    @classmethod
    def plan_notes(cls, manifest: "Manifest") -> list[str]:
        """Lines `plan` prints about how this backend will run the sweep (costs, caveats)."""
        return []

    def prepare(self, job: "Job") -> None:
        """Start reading what `job` (most likely the next one) needs, its reference video, and return
        at once: the read runs in the background (`media.ReferenceCache.prefetch`) while the current
        job generates, and must not touch the device."""

    @abstractmethod
    def load(self) -> None:
        """Load the model; called once per worker process."""

    @abstractmethod
    def generate(self, job: "Job", progress: Progress) -> "np.ndarray | Path":
        """Frames of one job: uint8 array of shape (num_frames, height, width, 3).

        A backend whose program writes the mp4 itself (the command backend) returns the Path of that
        file instead, a temporary name in the job's output folder; the worker checks and renames it.
        """

    def prepare_denoise(self, job: "Job") -> None:
        """Record what `denoise_once` feeds the denoiser besides its latents, from `job`'s first
        denoising step, before anything is timed. The conditioned tasks' denoisers take the job's own
        encoded inputs (VACE hints, control latents, audio features, pose and face), which random
        tensors cannot stand in for; the other tasks need nothing recorded (the default)."""

    def denoise_once(self, seed: int):
        """One forward pass of the (first) denoiser on seeded random latents of the manifest's shape
        (with what `prepare_denoise` recorded, for the conditioned tasks), returning its output tensor:
        how `models speed` measures first-call time and the drift of a speed setting from eager bf16.
        Backends without an in-process denoiser have none."""
        raise NotImplementedError(f"the {self.name} backend has no in-process denoiser to probe")

    def job_info(self) -> dict:
        """Facts about the last job for its sidecar (seconds per step, peak memory, cache hits)."""
        peak = self.peak_memory_bytes()
        return {} if peak is None else {"peak_memory_bytes": peak}

    def close(self) -> None:
        """Release what `load` took."""

    def peak_memory_bytes(self) -> int | None:
        """Peak device memory of the last job, where the library can tell."""
        return None


def option_problems(backend: str, options: dict, kinds: dict, choices: dict | None = None
                    ) -> tuple[list[BackendProblem], set[str]]:
    """The checks every backend makes of `model.options`: unknown keys, wrong types (a bool is not a
    number) and values outside `choices`. Returns the problems and the keys that failed, so a
    backend's own checks can skip them."""
    problems: list[BackendProblem] = []
    failed: set[str] = set()
    for key, value in options.items():
        where, kind = f"model.options.{key}", kinds.get(key)
        if kind is None:
            fix = ("the flow shift is a generation setting: generation.shift" if "shift" in key
                   else f"use one of: {', '.join(kinds)}")
            problems.append(BackendProblem(where, f"unknown {backend} option `{key}`", fix))
        elif not isinstance(value, kind) or (isinstance(value, bool) and bool not in (
                kind if isinstance(kind, tuple) else (kind,))):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            problems.append(BackendProblem(where, f"{backend} option `{key}` must be {names}, got {value!r}"))
        elif choices and key in choices and value not in choices[key]:
            problems.append(BackendProblem(where, f"{backend} option `{key}` is {value!r}",
                                           f"use one of: {', '.join(map(str, choices[key]))}"))
        else:
            continue
        failed.add(key)
    return problems, failed


def speed_card_problems(manifest: "Manifest") -> list[BackendProblem]:
    """The `speed:` checks every backend that applies it shares: torchao for fp8/int8, fp8 only
    on cards that have fp8 tensor cores (this machine's cards, as `resources.gpus` selects them; a Ray
    cluster's cards are checked by each actor when it loads), and no compile with fp8_storage."""
    from .. import speed as speed_settings
    from ..gpus import NoGpus, discover
    speed = manifest.model.speed
    problems = []
    missing = speed_settings.torchao_missing(speed)
    if missing:
        problems.append(BackendProblem("speed.quantize", missing, "pip install torchao (or 'wan-sweep[speed]')"))
    if speed.quantize == "fp8_storage" and speed.compile != "none":
        # Both backends' fp8 storage casts the weights in hooks around each layer's call (diffusers'
        # layerwise casting builds a Parameter there, ours assigns `.data` of another dtype): dynamo
        # cannot trace either, and with fullgraph=True the first job of every worker would fail.
        problems.append(BackendProblem(
            "speed.quantize", f"speed.quantize fp8_storage with compile: {speed.compile}: fp8 storage casts each "
            "layer's weights in hooks around every call, which torch.compile cannot trace into one graph, so "
            "every job would fail at its first step",
            "for memory with compile use quantize: int8 (torchao's 8-bit weights compile); or keep "
            "fp8_storage with compile: none"))
    if speed.quantize == "fp8" and manifest.execution.executor != "ray":
        try:
            gpus = discover()
        except NoGpus:
            gpus = []
        wanted = manifest.resources.gpus
        cards = [(g.name, g.compute_capability) for g in gpus if wanted == "all" or g.index in wanted]
        why = speed_settings.fp8_card_problem(cards)
        if why:
            problems.append(BackendProblem("speed.quantize", why, "use quantize: int8 or fp8_storage for memory, "
                                           "or none; fp8 pays on Ada, Hopper and newer cards"))
    return problems


IDENTITY_HASHED = (".json", ".txt", ".model", ".yaml")  # small files that say what the weights are
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".gguf")


def model_files_identity(path: str | os.PathLike | None, max_files: int = 400) -> dict:
    """What a checkpoint folder holds: every weight file's name and size, and a sha256 of each
    index/config file (cheap, yet it tells two checkpoints apart). Weights are never read."""
    if not path or not os.path.exists(path):
        return {"path": str(path) if path else None}
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    weights, configs = {}, {}
    for file in files[:max_files]:
        name = file.name if file == root else str(file.relative_to(root))
        if file.suffix in WEIGHT_SUFFIXES:
            weights[name] = file.stat().st_size
        elif file.suffix in IDENTITY_HASHED and file.stat().st_size < 64 << 20:
            configs[name] = hashlib.sha256(file.read_bytes()).hexdigest()[:16]
    return {"path": str(root), "weights": weights, "weight_bytes": sum(weights.values()),
            "configs_sha256": configs}
