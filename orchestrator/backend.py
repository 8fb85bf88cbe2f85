"""The backend interface and the registry of backends: what the job loop, the planner and the
checks know of a backend, without loading one.

`Backend`: `load()` once, `generate(job, progress)` per job, `close()` at the end; the errors a
backend raises that the rest of the package acts on (`OutOfMemory`, `NonFiniteFrames`,
`FirstDenoiserCall`); how it reports a manifest problem (`BackendProblem`, mapped to the manifest
line of the key it concerns); and `BACKENDS`, the one list of backends by name, whose classes
`backend_class` imports on first use (choosing the synthetic backend never imports torch).

The backends themselves, one file per library, are `orchestrator/backends/`; this module imports
none of them, nor anything above the manifest, so `job_loop`, `planning` and `sizing` import it at
their top.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, ClassVar

from .manifest.task_inputs import AUDIO_RATE
from .media import ReferenceCache

if TYPE_CHECKING:
    from pathlib import Path

    import numpy as np

    from .jobs import Job
    from .manifest import GenerationConfig, LoraConfig, Manifest, ModelConfig

BACKENDS: dict[str, str] = {
    "synthetic": "orchestrator.backends.synthetic:SyntheticBackend",
    "diffusers": "orchestrator.backends.diffusers_wan:DiffusersWanBackend",
    "diffsynth": "orchestrator.backends.diffsynth_wan:DiffSynthWanBackend",
    "command": "orchestrator.backends.command:CommandBackend",
}


def backend_class(name: str) -> type[Backend]:
    """The class of the backend `name` (a key of BACKENDS), its module imported now."""
    module, _, attr = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


# Quantized weights take a LoRA fused in before they are quantized (an 8-bit weight cannot take a bf16
# delta exactly): with these, any change of a model's LoRAs (a strength too) loads the model again.
FUSING_QUANTIZE = frozenset({"fp8", "int8", "fp8_storage"})


def lora_change(backend: "type[Backend] | str", before: "ModelConfig", after: "ModelConfig") -> str:
    """What a worker loaded with `before` does to run a job of `after`: "same" (nothing), "switch" (only
    the LoRAs differ and the backend swaps them in place, `Backend.use_loras`) or "reload" (the model is
    loaded again: another quantize, or LoRAs that are fused into quantized weights or that the backend
    cannot swap). The planner counts these per worker, and the slot acts on them: one rule."""
    if before == after:  # (every job asks: the usual answer without copying either)
        return "same"
    if _as_loaded(before) == _as_loaded(after):
        return "same"  # (a step cache is set up per job from the job's own settings: no reload)
    if _as_loaded(before, loras=False) != _as_loaded(after, loras=False):
        return "reload"
    cls = backend_class(backend) if isinstance(backend, str) else backend
    if not cls.switches_loras or fuses_loras(before) or fuses_loras(after):
        return "reload"
    return "switch"


def fuses_loras(model: "ModelConfig") -> bool:
    """Whether a backend loading `model` fuses its LoRAs into the weights (then any change of them is a reload)
    rather than running them as switchable adapters: under an 8-bit quantize (they go in before it), and when
    the sweep never changes them (`ModelConfig.fuse_loras`) unless compiled (fused + compiled is unmeasured in
    bf16, and failed under fp8: docs/benchmarks.md)."""
    if not model.loras:
        return False
    return model.speed.quantize in FUSING_QUANTIZE or (model.fuse_loras and model.speed.compile == "none")


def _as_loaded(model: "ModelConfig", loras: bool = True) -> "ModelConfig":
    """What of a model's settings a loaded model holds: all but its step cache (each job's own), and with
    `loras` False, its LoRAs left out too."""
    return replace(model, speed=replace(model.speed, cache="none"), loras=model.loras if loras else ())


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

    # Whether `use_loras` changes a loaded model's LoRAs (which are on, their files, their strengths) between
    # jobs without loading the base weights again; where it cannot, a job of other LoRAs reloads the model
    # (`lora_change`). A backend that runs no LoRAs at all refuses `model.loras` in `check`.
    switches_loras: ClassVar[bool] = False

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
        """The generation settings of one job: its own (`Job.generation`, the manifest's with its axis values
        in place, resolved at expansion); `self.generation` for a job made without them (a test's, a plan's
        sample). Per-job settings are read from here, never from self.generation."""
        return getattr(job, "generation", None) or self.generation

    def reference_cache(self, generation: "GenerationConfig", square: int | None = None):
        """This worker's references prepared at one job's size, length and rate (a `media.ReferenceCache`,
        read ahead in a thread): the manifest's, and one more per combination its axes sweep. `square`:
        frames of that side instead of the job's size (Animate's face crops, at its motion encoder's)."""
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
    def check_loras(cls, manifest: "Manifest", files: "list[tuple[str, str, str]]") -> list[BackendProblem]:
        """Problems with the LoRA files a sweep may run: `files` holds (manifest key, LoRA name, file) of
        each, model.loras's and every value of a `loras.NAME.path` axis (validation gathers them, so each
        is checked once whichever LoRAs the first job has on). A backend that reads no LoRA files (the
        synthetic one) takes them as they are; the library backends check them against the checkpoint."""
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

    def use_loras(self, loras: "tuple[LoraConfig, ...]") -> None:
        """Make `loras` the LoRAs of the next jobs, the base weights left as loaded: a job after the switch
        gives exactly the frames it gives in a fresh worker loaded with `loras` (`load` applies
        `self.model.loras`). Called between jobs by the slot (`job_loop.SlotBackend`) only where
        `switches_loras` and `lora_change` says "switch"; it then sets `self.model` to the job's."""
        raise NotImplementedError(f"the {self.name} backend cannot switch LoRAs without reloading")

    def job_info(self) -> dict:
        """Facts about the last job for its sidecar (seconds per step, peak memory, cache hits)."""
        peak = self.peak_memory_bytes()
        return {} if peak is None else {"peak_memory_bytes": peak}

    def close(self) -> None:
        """Release what `load` took."""

    def peak_memory_bytes(self) -> int | None:
        """Peak device memory of the last job, where the library can tell."""
        return None
