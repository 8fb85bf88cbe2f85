"""The job loop every worker runs, whichever executor started it, and the rules it shares.

claim → skip if done → generate → write mp4 (temp → check → rename, sidecar first) → record, with
out-of-memory retirement and heartbeats. Jobs come from a `JobSource`: the ledger (`LedgerJobSource`),
opened by a local or tmux worker itself, or, for a Ray actor, behind the ledger actor on the driver's
node (`executors.ray`). The loop (`JobLoop`) runs in the worker process and in
the Ray actor (each through `harness.Harness`); what one job does (`generate_job`, `write_video`,
`sidecar_record`) is shared with the calibration probe too. The rules of supervision (out-of-memory
retirement, how a failure is summarised) are `supervision`'s.

The GPU does not wait for the CPU between jobs: a finished video is encoded and recorded by the
`OutputWriter` thread while the next job generates, and the next job's reference is read ahead
(`Backend.prepare`) while the current one runs.

A slot's model (`SlotBackend`) is loaded again when a job's model (its quantize, an axis) differs from the
loaded one's.

Each job carries its own settings, resolved when the manifest was expanded (`Job.model`, `Job.generation`):
the loop, the sidecar, the video's check and the slot read those, never working them out again.
"""
from __future__ import annotations

import errno
import logging
import os
import platform
import socket
import sys
import time
import traceback
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

from . import outputs
from .backend import Backend, OutOfMemory, lora_change
from .ledger import Ledger
from .output_names import value_text
from .planning import WorkerSpec
from .speed import first_call_lock
from .supervision import Policy, summarise

IDLE_POLL_S = 1.0


# --------------------------------------------------------------------------------------------------
# Errors no retry can help


FULL, READ_ONLY = "full", "read-only"  # what `storage_problem` finds


def storage_problem(exc: BaseException | None, writing: bool = False, depth: int = 0) -> str | None:
    """`FULL` or `READ_ONLY` when the error means the output folder's disk takes no more writes, so no
    retry of any job can help (the sweep stops and a later `run` resumes); None for any other error.

    Full: no space or the quota used up. Read-only: a file system remounted read-only after a disk
    error (ext4's errors=remount-ro, NFS), SQLite's readonly database, and, with `writing` (the error
    came from writing an output, not from reading a job's input, which may be refused on its own), a
    permission refused.
    """
    if exc is None or depth > 5:
        return None
    code = getattr(exc, "errno", None)  # PyAV's errors carry one too
    if code in (errno.ENOSPC, errno.EDQUOT):
        return FULL
    if code == errno.EROFS or (writing and code in (errno.EACCES, errno.EPERM)):
        return READ_ONLY
    if type(exc).__name__ == "OperationalError":  # SQLite's SQLITE_FULL and SQLITE_READONLY
        if "disk is full" in str(exc):
            return FULL
        if "readonly database" in str(exc):
            return READ_ONLY
    # (an error of the Ray ledger actor arrives wrapped: Ray's RayTaskError holds it as `cause`)
    return storage_problem(exc.__cause__ or exc.__context__ or getattr(exc, "cause", None), writing, depth + 1)


# --------------------------------------------------------------------------------------------------
# Where jobs come from


class JobSource(ABC):
    """The queue one worker slot takes its jobs from and reports them to."""

    @abstractmethod
    def claim(self, prefer_group: str | None = None):
        """The next job for this slot (a ledger `Claim`: `.job`, `.attempt`), or None."""

    @abstractmethod
    def complete(self, job_id: str, seconds: float, skipped: bool = False) -> bool:
        """Record the job done; False when the claim is no longer this slot's (it expired and moved on:
        its holder records the job, finding the video made), and nothing was recorded."""

    @abstractmethod
    def fail(self, job_id: str, message: str, outcome: str = "error") -> str:
        """Record a failed attempt; return the job's state now (pending for a retry, or failed)."""

    @abstractmethod
    def release(self, job_id: str) -> None:
        """Give the job back without using an attempt (a stop, a full disk, a node gone)."""

    @abstractmethod
    def heartbeat(self, job_id: str | None) -> None: ...

    def stop_requested(self) -> bool:
        return False

    def unfinished(self) -> int:
        return 1

    def idle(self) -> None:
        """The slot has no job now (said once after work, not every poll)."""

    def peek(self, prefer_group: str | None = None):
        """The job this slot most likely claims next, or None (for reading ahead)."""
        return None

    def retire(self, ooms: int) -> int | None:
        """Leave the card after repeated out-of-memory if others share it: how many remain, or None."""
        return None

    def for_thread(self) -> "JobSource":
        """A source another thread of this slot may use (its own connection where that matters)."""
        return self

    def store_video(self, spec: WorkerSpec, job, result, record: dict) -> bool:
        """Put a finished job's video at its path (the atomic way); False when the job is no longer this
        slot's and nothing was written. Here: straight onto the disk the sweep's folder is on."""
        write_video(spec, result, job.output, record, owner=spec.worker, job=job)
        return True


class LedgerJobSource(JobSource):
    """Jobs straight from the sweep's ledger: the local and tmux workers, and the Ray driver's slots.

    `life`: the process lifetime its claims belong to (`Ledger.register_worker` gave it)."""

    def __init__(self, ledger, spec: WorkerSpec, life: str | None = None):
        self.ledger, self.spec, self.worker, self.life = ledger, spec, spec.worker, life

    def claim(self, prefer_group=None):
        return self.ledger.claim(self.worker, self.spec.queue, prefer_group=prefer_group, life=self.life)

    def complete(self, job_id, seconds, skipped=False):
        return self.ledger.complete(job_id, self.worker, seconds, skipped=skipped, life=self.life)

    def fail(self, job_id, message, outcome="error"):
        return self.ledger.fail(job_id, self.worker, message, outcome=outcome, life=self.life)

    def release(self, job_id):
        self.ledger.release(job_id, self.worker, life=self.life)

    def heartbeat(self, job_id):
        self.ledger.heartbeat(self.worker, job_id, life=self.life)

    def stop_requested(self):
        return self.ledger.stop_requested()

    def unfinished(self):
        return self.ledger.unfinished()

    def idle(self):
        self.ledger.worker_idle(self.worker)

    def peek(self, prefer_group=None):
        return self.ledger.peek(self.spec.queue, prefer_group=prefer_group)

    def retire(self, ooms):
        return retire_worker(self.ledger, self.spec, ooms)

    def for_thread(self):
        return LedgerJobSource(Ledger(self.ledger.path), self.spec, self.life)


# --------------------------------------------------------------------------------------------------
# One job: generate, describe, write


@dataclass
class Generated:
    result: object  # frames, or the path of an mp4 the backend's program wrote
    record: dict  # the sidecar
    seconds: float  # generating, from the call to the last frame
    waited: float = 0.0  # for another worker's first (compiling) call


def generate_job(backend, spec: WorkerSpec, job, attempt: int, gpu_names: list[str], progress,
                 compile_cache: str | None = None) -> Generated:
    """Generate one job and describe it for its sidecar. With `compile_cache`, this is the worker's
    first call, which compiles: one worker of the machine at a time (`first_call_lock`)."""
    started = time.monotonic()
    backend.attempt = attempt
    with first_call_lock(compile_cache) as waited:
        result = backend.generate(job, progress)
    seconds = time.monotonic() - started
    record = sidecar_record(spec, job, attempt, backend, seconds, gpu_names)
    if compile_cache is not None:
        record["first_call"] = first_call_facts(record, waited, seconds)
    return Generated(result, record, seconds, waited)


def write_video(spec: WorkerSpec, result, target, record: dict | None, owner: str = "", job=None) -> None:
    """Write one job's video at `target` the atomic way (temp → check → rename, sidecar first): the
    frames a backend returned are encoded, an mp4 its program wrote is checked and moved in. Its frame
    count and rate are the job's own (`Job.generation`: its axes may set them), else the spec's."""
    generation = job_generation(spec, job)
    frames = generation.num_frames
    if isinstance(result, (str, os.PathLike)):
        outputs.adopt_mp4(result, target, expected_frames=frames, sidecar=record, owner=owner)
    else:
        outputs.write_mp4(result, target, generation.fps, expected_frames=frames, sidecar=record, owner=owner)


def job_model(spec: WorkerSpec, job=None):
    """The model settings one job of this worker runs with (its sidecar's `model`): the job's own, resolved
    at expansion; the spec's for none, or for a job made by hand without them (a test's)."""
    return spec.model if job is None or job.model is None else job.model


def job_generation(spec: WorkerSpec, job=None):
    """The generation settings one job of this worker runs with: the job's own, resolved at expansion; the
    spec's for none, or for a job made by hand without them."""
    return spec.generation if job is None or job.generation is None else job.generation


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "diffsynth", "transformers", "accelerate", "safetensors", "av", "numpy"):
        module = sys.modules.get(name)
        if module is not None:
            found[name] = getattr(module, "__version__", "?")
    return found


def sidecar_record(spec: WorkerSpec, job, attempt: int, backend, generate_seconds: float,
                   gpu_names: list[str]) -> dict:
    """What the sidecar of one finished job says: the job, its settings, where and how it was made.

    Every executor's workers (a process here, a Ray actor elsewhere) write the same record. Call it
    right after `generate`, before the backend starts another job (`job_info` is the last job's).
    """
    return {
        "job_id": job.id, "job": job.to_dict(settings=False), "settings": spec.settings, "backend": spec.model.backend,
        "model": job_model(spec, job).to_dict(), "generation": job_generation(spec, job).to_dict(), "axes": job.axes,
        "attempt": attempt,
        "worker": spec.worker, "host": socket.gethostname(), "devices": list(spec.devices),
        "gpu": gpu_names, "versions": versions(), "generate_seconds": round(generate_seconds, 3),
        "peak_memory_bytes": backend.peak_memory_bytes(), **backend.job_info(),
        "load": getattr(backend, "load_info", {}),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def first_call_facts(record: dict, waited: float, generate_s: float) -> dict:
    """What the first, compiling call of a worker cost: the seconds waited for another worker's
    compile, to the first finished step, and an estimate of the compile (that first step less a steady
    one), from the backend's own step timeline."""
    timeline = record.get("timeline") or {}
    facts = {"waited_for_other_worker_seconds": round(waited, 1), "generate_seconds": round(generate_s, 1)}
    if timeline.get("first_step_done") and timeline.get("called"):
        first = timeline["first_step_done"] - timeline["called"]  # `called` comes after the wait
        facts["first_step_seconds"] = round(first, 1)
        if record.get("seconds_per_step"):
            facts["compile_seconds_estimate"] = round(max(0.0, first - record["seconds_per_step"]), 1)
    return facts


def settle_if_made(source: "JobSource", job, frames: int, log: logging.Logger) -> bool:
    """The skip-if-done rule of every executor's workers, applied to a job just claimed.

    A complete mp4 of this job already there: recorded as done (skipped), True. One made with other
    settings in the way: the attempt fails, never overwriting it, True. Nothing there: False, run it.
    """
    state = outputs.inspect_output(job.output, frames)
    if not state.complete:
        return False
    if not state.stale_for(job.id):
        log.info("skip %s: already done", job.key)
        source.complete(job.id, 0.0, skipped=True)
    else:
        source.fail(job.id, "an mp4 made with other settings is in the way; "
                    "run again with --redo-changed to move it aside", outcome="error")
    return True


class OutputWriter:
    """Encodes and records finished videos in a thread, one at a time and in order.

    At most one video waits: `submit` first waits for the previous write, so frames never pile up
    in memory when encoding is slower than generating. A write that fails fails its job (retried
    like any other failure); the worker itself goes on.
    """

    def __init__(self, spec: WorkerSpec, log: logging.Logger, source: "JobSource"):
        from concurrent.futures import ThreadPoolExecutor
        self.spec, self.log = spec, log
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="output-writer")
        self.pending = None
        self._source = source
        self._own_source = None
        self.storage_error: BaseException | None = None  # the disk took no more writes: stop the worker

    def submit(self, job, result, record: dict, started: float) -> None:
        self.wait()
        self.pending = self.pool.submit(self._write, job, result, record, started)

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def close(self) -> None:
        self.wait()
        self.pool.shutdown(wait=True)

    def _write(self, job, result, record: dict, started: float) -> None:
        if self._own_source is None:  # its own connection: the main thread uses the other one meanwhile
            self._own_source = self._source.for_thread()
        source = self._own_source
        try:
            if not source.store_video(self.spec, job, result, record):
                self.log.warning("generated %s, but the job is no longer this worker's: not written", job.key)
                return
            seconds = time.monotonic() - started
            if source.complete(job.id, seconds):
                self.log.info("done %s in %.1fs", job.key, seconds)
            else:  # the claim expired and moved on: its holder records the job (it finds the video made)
                self.log.warning("wrote %s, but the job is no longer this worker's: not counted", job.key)
        except Exception as exc:
            if storage_problem(exc, writing=True):  # not the job's fault: back unused (its temp file is gone)
                self.storage_error = exc
                try:
                    source.release(job.id)
                except Exception:
                    pass
                return
            self.log.error("could not write %s:\n%s", job.key, traceback.format_exc())
            state = source.fail(job.id, f"writing the video failed: {exc}"[:500])
            self.log.info("job %s is now %s", job.key, state)


class SlotBackend:
    """The backend a slot's jobs run on, one model at a time. `load` (the worker process's, the Ray
    actor's, the calibration probe's own way of building and loading one) loads it; when a job's
    quantize (an axis, `Job.axes`) differs from the loaded model's, `for_job` closes it and loads the
    model again with that value: a card holds one model, never two. Jobs come in runs of one value
    (`Job.group`, the expansion's order), so this is rare. A job's model is its own (`Job.model`, resolved
    at expansion), the slot's for a job made by hand without one."""

    def __init__(self, load: Callable[[Any], Any], model, log: logging.Logger):
        self._load, self.model, self.log = load, model, log  # model: the slot's ModelConfig
        self.backend = None
        self.loaded = None  # the ModelConfig `backend` was loaded with (its LoRAs: as last switched)
        # What the last job needed of the model: "load" (none was loaded), "same", "switch" (its LoRAs were
        # switched in place) or "reload"; its sidecar says so (`model_change`), as `plan` counted.
        self.last_change = "load"
        self.opened = False  # `open` loaded the model and no job has run on it yet: the next one is its "load"

    def open(self):
        """Load the slot's own model (before the first job); return the backend."""
        self.opened = True
        return self._open(self.model)

    def for_job(self, job):
        """The backend loaded with this job's model: as it is, with its LoRAs switched in place, or loaded
        again (`backend.lora_change`, the rule the planner counts by)."""
        wanted = self.model if job.model is None else job.model
        if self.backend is None:
            self.last_change, self.opened = "load", False
            return self._open(wanted)
        change = lora_change(type(self.backend), self.loaded, wanted)
        self.last_change = "load" if self.opened and change == "same" else change
        self.opened = False
        if change == "same":
            return self.backend
        if change == "switch":
            self.log.info("job %s: LoRAs %s (were %s), switched in place", job.key, describe_loras(wanted.loras),
                          describe_loras(self.loaded.loras))
            self.backend.use_loras(wanted.loras)
            self.backend.model = self.loaded = wanted
            return self.backend
        self.log.info("job %s runs with %s: reloading the model (it was loaded with %s)", job.key,
                      _load_settings(wanted), _load_settings(self.loaded))
        self.close()
        return self._open(wanted)

    def _open(self, model):
        self.backend = self._load(model)
        self.loaded = model
        return self.backend

    def close(self) -> None:
        backend, self.backend, self.loaded = self.backend, None, None
        if backend is not None:
            backend.close()


def describe_loras(loras) -> str:
    """LoRAs in words for a log line: `motion 0.8, distill 3,1.5` (`none`)."""
    return ", ".join(f"{lora.name} {value_text(lora.strength)}" for lora in loras) or "none"


def _load_settings(model) -> str:
    return f"quantize {model.speed.quantize}" + (f", LoRAs {describe_loras(model.loras)}" if model.loras else "")


class ReadAhead:
    """Tells the backend which job most likely comes next, so it can start reading its reference."""

    def __init__(self, backends: SlotBackend, source: "JobSource", log: logging.Logger):
        self.backends, self.source, self.log = backends, source, log
        # nothing to read ahead: no query (a reload builds the same class)
        self.enabled = type(backends.backend).prepare is not Backend.prepare

    def after(self, job) -> None:
        if not self.enabled or self.backends.backend is None:
            return
        upcoming = self.source.peek(prefer_group=job.group)
        if upcoming is None or not upcoming.reference or upcoming.reference == job.reference:
            return
        try:
            self.backends.backend.prepare(upcoming)
        except Exception as exc:  # the job itself will read it again and report the error properly
            self.log.warning("reading ahead for %s failed: %s", upcoming.key, exc)


def retire_worker(ledger, spec: WorkerSpec, ooms: int) -> int | None:
    """Mark this worker retired if another live worker shares its card; return how many remain (the
    ledger's rule, in one transaction, so two workers of a card never both retire)."""
    where = spec.queue if spec.devices else "this machine"
    return ledger.retire_if_shared(
        spec.worker, spec.devices, lambda left: f"retired after {ooms} out-of-memory errors in a row; {where} "
                                                f"now runs {left} worker(s) for the rest of the sweep")


# --------------------------------------------------------------------------------------------------
# The loop


class Pulse:
    """What the loop tells the slot's liveness watch (the worker's heartbeat thread): signs of life,
    whether a long silent call is under way (loading, the first compiling call), the current job."""
    loading = False
    job_id: str | None = None
    job_started = 0.0

    def sign_of_life(self) -> None:
        pass


FINISHED = "finished"  # no work left, or a stop was asked for
RETIRED = "retired"  # repeated out-of-memory on a shared card: this slot leaves it


class JobLoop:
    """Runs one slot's jobs from its source on its backend (a `SlotBackend`, loaded: each job gets it
    with the job's model) until no work is left or a stop.

    `claim` is the job held right now: whoever ends the loop early (a signal) releases it with
    `release_claim`. `close` writes the last video before the slot exits.
    """

    def __init__(self, source: JobSource, spec: WorkerSpec, log: logging.Logger, pulse: Pulse | None = None):
        self.source, self.spec, self.log = source, spec, log
        self.pulse = pulse or Pulse()
        self.writer = OutputWriter(spec, log, source)
        self.claim = None

    def run(self, backends: SlotBackend, gpu_names: list[str], compile_cache: str | None = None) -> str:
        source, spec, log, pulse, writer = self.source, self.spec, self.log, self.pulse, self.writer
        read_ahead = ReadAhead(backends, source, log)
        first_call_cache = compile_cache  # a model loaded again compiles again at its first call
        ooms_in_row = 0
        group = None
        while True:
            pulse.sign_of_life()
            if writer.storage_error is not None:
                raise writer.storage_error
            if source.stop_requested():
                log.info("stop requested: exiting")
                return FINISHED
            self.claim = claim = source.claim(prefer_group=group)
            if claim is None:
                if writer.pending is not None:  # our last video may be all that is left
                    writer.wait()
                    continue
                if source.unfinished() == 0:
                    log.info("no work left: exiting")
                    return FINISHED
                if group is not None:  # first idle poll after work: say so once, not every second
                    source.idle()
                    group = None
                time.sleep(IDLE_POLL_S)  # jobs in flight elsewhere may come back for a retry
                continue
            job = claim.job
            group = job.group
            read_ahead.after(job)
            if settle_if_made(source, job, job_generation(spec, job).num_frames, log):
                self.claim = None
                continue
            log.info("job %s (attempt %d): %s", job.key, claim.attempt, job.prompt[:80])
            pulse.job_id, pulse.job_started = job.id, time.monotonic()
            t0 = time.monotonic()
            last_report = [t0]

            def progress(step: int, steps: int) -> None:
                pulse.sign_of_life()
                now = time.monotonic()
                if now - last_report[0] >= 5 or step == steps:
                    last_report[0] = now
                    log.info("  %s: step %d/%d (%.1fs)", job.key, step, steps, now - t0)

            try:
                loaded = backends.backend
                pulse.loading = True  # a reload takes minutes without a step: heartbeats go on
                try:
                    backend = backends.for_job(job)
                finally:
                    pulse.loading = False
                if backend is not loaded:  # the job's own time starts after the reload
                    compile_cache = first_call_cache
                    pulse.job_started = t0 = last_report[0] = time.monotonic()
                # The first call compiles (minutes with fp8): one worker of the machine at a time, and
                # heartbeats go on as while loading, since no step finishes until it is done.
                pulse.loading = compile_cache is not None
                try:
                    made = generate_job(backend, spec, job, claim.attempt, gpu_names, progress, compile_cache)
                finally:  # a failed first call must not leave hang detection off for the jobs after it
                    pulse.loading = False
                made.record["model_change"] = backends.last_change
                if compile_cache is not None:
                    compile_cache = None
                    log.info("first call (compiles the denoiser): %s", made.record["first_call"])
                log.info("generated %s in %.1fs; writing it while the next job starts", job.key, made.seconds)
                writer.submit(job, made.result, made.record, t0)
                ooms_in_row = 0
            except OutOfMemory as exc:
                ooms_in_row += 1
                state = source.fail(job.id, f"out of memory: {exc}", outcome="oom")
                log.error("out of memory on %s (%d in a row); job is now %s", job.key, ooms_in_row, state)
                left = source.retire(ooms_in_row) if Policy.retires(ooms_in_row) else None
                if left:
                    log.error("repeated out-of-memory: retired this worker; %s now runs %d worker(s)",
                              spec.queue if spec.devices else "this machine", left)
                    self.claim = None
                    return RETIRED
            except Exception as exc:
                if storage_problem(exc):
                    raise
                log.error("job %s failed:\n%s", job.key, traceback.format_exc())
                state = source.fail(job.id, summarise(exc))
                log.info("job %s is now %s", job.key, state)
            pulse.job_id = None
            self.claim = None

    def release_claim(self, quietly: bool = False) -> None:
        """Give the held job back without using an attempt (a stop, a full disk)."""
        if self.claim is None:
            return
        try:
            self.source.release(self.claim.job.id)
        except Exception:
            if not quietly:
                raise
        self.claim = None

    def close(self) -> None:
        self.writer.close()  # the last video (or the one before a stop) is written before we exit
