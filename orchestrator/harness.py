"""Opening a backend, and running one worker slot on it: the one way the worker process, the Ray actor,
the calibration probe and the speed trial build and load a model.

`open_backend` builds the backend of a model and loads it, timing the load (`load_info`) and letting go
of what a half-loaded model holds when loading fails or is interrupted. `Harness` is one slot: its model
(loaded once; again for a job of another quantize, `job_loop.SlotBackend`), its job loop on a job
source, and its closing (the last video written before the slot ends).
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from . import attention_guard
from .backend import backend_class
from .job_loop import JobLoop, JobSource, Pulse, SlotBackend
from .manifest import GenerationConfig, ModelConfig
from .planning import WorkerSpec

log = logging.getLogger(__name__)


def open_backend(model: ModelConfig, generation: GenerationConfig, devices: tuple[int, ...], owner: str = "",
                 slot_log: logging.Logger | None = None, on_loading: Callable[[str], None] | None = None):
    """The backend of `model`, built for `devices` and loaded.

    `owner` (a worker id) names its temporary files; `on_loading(phase)` is told before the load starts
    (a worker shows it in `run`'s progress bar). The load's seconds go into `load_info`, and so does the
    attention guard's check of the kernel the worker will run (`load_info["attention_guard"]`).
    """
    slot_log = slot_log or log
    started = time.monotonic()
    backend = backend_class(model.backend)(model, generation, tuple(devices))
    backend.owner = owner
    if on_loading is not None:
        on_loading(f"loading the model ({model.backend})")
    try:
        backend.load()
        # the attention kernel this worker will run, checked on its card before the first job (stops the
        # worker when it computes wrong attention; `auto` falls back to one that passes)
        attention_guard.guard_backend(backend, slot_log)
    except BaseException:  # (a stop too) what a half-loaded model holds is let go before it goes on
        try:
            backend.close()
        except Exception:
            slot_log.warning("closing the half-loaded backend failed", exc_info=True)
        raise
    seconds = time.monotonic() - started
    backend.load_info.setdefault("load_seconds", round(seconds, 2))
    parts = backend.load_info.get("components") or {}
    slot_log.info("model loaded in %.1fs (%s)%s", seconds, model.backend,
                  "; " + ", ".join(f"{k} {v:.1f}s" for k, v in parts.items()) if parts else "")
    return backend


class Harness:
    """One worker slot: loads its model (`open`), runs the job loop on a source (`run`, as many times
    as the caller has batches of jobs), and closes (`close`: the last video is written, the model let
    go). Whoever ends a run early (a signal) gives the held job back with `release_claim`."""

    def __init__(self, spec: WorkerSpec, slot_log: logging.Logger, pulse: Pulse | None = None,
                 devices: tuple[int, ...] | None = None, on_loading: Callable[[str], None] | None = None):
        self.spec, self.log, self.pulse = spec, slot_log, pulse
        generation = spec.generation  # (the manifest's: each job brings its own, `Job.generation`)
        devices = spec.devices if devices is None else devices  # a Ray actor counts its cards from 0

        def load(model: ModelConfig):
            return open_backend(model, generation, devices, owner=spec.worker, slot_log=slot_log,
                                on_loading=on_loading)

        self.backends = SlotBackend(load, spec.model, slot_log)
        self.loop: JobLoop | None = None

    @property
    def backend(self):
        return self.backends.backend

    def open(self):
        """Load the slot's own model (before the first job); return the backend."""
        return self.backends.open()

    def run(self, source: JobSource, gpu_names: list[str], compile_cache: str | None = None) -> str:
        """Run the slot's jobs from `source` until none is left, a stop, or retirement (`job_loop`)."""
        if self.loop is not None:
            self.loop.close()  # the previous run's last video first
        self.loop = JobLoop(source, self.spec, self.log, pulse=self.pulse)
        return self.loop.run(self.backends, gpu_names, compile_cache)

    @property
    def storage_error(self) -> BaseException | None:
        """The write the output folder's disk refused (full or read-only), if one did."""
        return self.loop.writer.storage_error if self.loop is not None else None

    def release_claim(self, quietly: bool = False) -> None:
        if self.loop is not None:
            self.loop.release_claim(quietly=quietly)

    def finish_writes(self) -> None:
        """Wait until the videos made so far are written and recorded."""
        if self.loop is not None:
            self.loop.close()  # (again: closing a closed loop does nothing)

    def close(self) -> None:
        """Write the last video, then let the model go (each step runs even if the other fails)."""
        try:
            self.finish_writes()
        except Exception:
            self.log.warning("output writer failed", exc_info=True)
        finally:
            try:
                self.backends.close()
            except Exception:
                self.log.warning("backend close failed", exc_info=True)
