"""The backend interface: `load()` once, `generate(job, progress)` per job, `close()` at the end."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable, ClassVar

import numpy as np

if TYPE_CHECKING:
    from ..jobs import Job
    from ..manifest import GenerationConfig, Manifest, ModelConfig

Progress = Callable[[int, int], None]  # (step done, steps in all): also the worker's sign of life


class OutOfMemory(RuntimeError):
    """The device ran out of memory during a job (a backend translates its library's error)."""


class Backend(ABC):
    name: ClassVar[str]
    runs_on_cpu: ClassVar[bool] = False  # may take CPU worker slots on a machine without GPUs
    measured_sizing: ClassVar[bool] = True  # workers per card come from calibration (sizing.py)
    # Options that change how fast or where a job runs, not its pixels: they stay out of job ids.
    runtime_options: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, model: "ModelConfig", generation: "GenerationConfig", devices: tuple[int, ...]):
        self.model = model
        self.generation = generation
        self.devices = devices
        self.attempt = 1  # which attempt of the current job this is; the worker sets it

    @classmethod
    def check(cls, manifest: "Manifest") -> list[str]:
        """Problems with the manifest's model options for this backend, before anything starts."""
        return []

    @abstractmethod
    def load(self) -> None:
        """Load the model; called once per worker process."""

    @abstractmethod
    def generate(self, job: "Job", progress: Progress) -> np.ndarray:
        """Frames of one job: uint8 array of shape (num_frames, height, width, 3)."""

    def close(self) -> None:
        """Release what `load` took."""

    def peak_memory_bytes(self) -> int | None:
        """Peak device memory of the last job, where the library can tell."""
        return None
