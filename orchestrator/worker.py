"""The worker: one process bound to its device(s) that loads the backend once and loops over jobs.

claim → skip if done → generate → write mp4 (temp → check → rename, sidecar first) → record.
The GPU does not wait for the CPU between jobs: a finished video is encoded and recorded by the
`OutputWriter` thread while the next job generates, and the next job's reference is read ahead
(`Backend.prepare`) while the current one runs.
A heartbeat thread writes to the ledger while the main loop makes progress; when progress stops
(a hung call) the heartbeat stops too and the supervisor replaces the worker. A job past
`job_timeout_s` is failed and the process exits so it can be restarted clean.

Run as `python -m orchestrator.worker SPEC.json` (the executors do this; see `supervisor`).
"""
from __future__ import annotations

import errno
import logging
import os
import platform
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

from .planning import WorkerSpec
from .speed import describe as describe_speed, first_call_lock

EXIT_DONE = 0  # no work left, or asked to stop
EXIT_TIMEOUT = 75  # a job ran past job_timeout_s; restart me
EXIT_RETIRED = 76  # repeated out-of-memory on this card: do not restart me
EXIT_DISK_FULL = 77  # the output folder's disk is full: do not restart me; the whole sweep stops


def disk_full(exc: BaseException | None, depth: int = 0) -> bool:
    """An error that means the disk is full (or the quota used up): no retry can help."""
    if exc is None or depth > 5:
        return False
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):  # PyAV's errors are OSErrors
        return True
    if type(exc).__name__ == "OperationalError" and "disk is full" in str(exc):  # SQLite's SQLITE_FULL
        return True
    return disk_full(exc.__cause__ or exc.__context__, depth + 1)


def stop_for_full_disk(ledger, spec: WorkerSpec, error: BaseException, log: logging.Logger) -> None:
    """Ask the whole sweep to stop (every worker finishes cleanly) and say why, once, where it shows:
    the ledger (`report`, `run`), the log and the pane. Each write may fail on the full disk."""
    message = (f"stopped: the disk of {spec.output_dir} is full ({getattr(error, 'strerror', None) or error}); "
               "the workers stopped cleanly and nothing made is lost: free some space and run the same command again")
    log.error("%s", message)
    for step in (lambda: ledger.set_meta("stop_reason", message), ledger.request_stop,
                 lambda: ledger.set_worker(spec.worker, state="exited", job=None, message=message)):
        try:
            step()
        except Exception:  # the ledger shares the full disk: the others stop when they hit it too
            pass
IDLE_POLL_S = 1.0


class Stop(BaseException):
    """SIGTERM/SIGINT: finish cleanly (remove the temporary file, release the claim)."""


def _on_signal(signum, frame):
    # One clean stop is enough: `stop` signals both the supervisor and the worker, and the supervisor
    # passes its signal on, so a second SIGTERM must not interrupt the clean-up of the first.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    if signum == signal.SIGHUP:
        _detach_from_terminal()
    raise Stop(signal.Signals(signum).name)


def _detach_from_terminal() -> None:
    """The terminal (tmux pane) is gone: send further output to /dev/null so writes cannot fail."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        os.close(null)
    except OSError:
        pass


def setup_logging(spec: WorkerSpec) -> logging.Logger:
    logging.raiseExceptions = False  # a log line lost to a full disk must not print a traceback in the pane
    log = logging.getLogger(f"worker.{spec.worker}")
    log.setLevel(logging.INFO)
    log.propagate = False
    from .terminal import PrintableFormatter  # a prompt's escape sequences are printed, not obeyed
    fmt = PrintableFormatter("%(asctime)s %(levelname)s [" + spec.worker + "] %(message)s", "%Y-%m-%d %H:%M:%S")
    Path(spec.log).parent.mkdir(parents=True, exist_ok=True)
    for handler in (logging.FileHandler(spec.log, encoding="utf-8"), logging.StreamHandler(sys.stdout)):
        handler.setFormatter(fmt)
        log.addHandler(handler)
    return log


class Heartbeat(threading.Thread):
    """Beats for the worker while its main loop shows signs of life; enforces job_timeout_s."""

    def __init__(self, ledger, spec: WorkerSpec, log: logging.Logger):
        super().__init__(daemon=True, name="heartbeat")
        self.ledger, self.spec, self.log = ledger, spec, log
        self.timeout = float(spec.execution["heartbeat_timeout_s"])
        self.job_timeout = float(spec.execution["job_timeout_s"])
        self.interval = max(0.2, min(5.0, self.timeout / 5))
        self.last_sign = time.monotonic()
        self.loading = True
        self.job_id: str | None = None
        self.job_started = 0.0
        self.temp_files: list[str] = []
        self.stopped = threading.Event()

    def sign_of_life(self) -> None:
        self.last_sign = time.monotonic()

    def run(self) -> None:
        # Its own connection: the main thread may be inside a transaction on the other one.
        from .ledger import Ledger
        self.ledger = Ledger(self.ledger.path)
        while not self.stopped.wait(self.interval):
            now = time.monotonic()
            if self.job_id and now - self.job_started > self.job_timeout:
                self.log.error("job %s ran past job_timeout_s=%.0fs: abandoning it and restarting",
                               self.job_id, self.job_timeout)
                try:
                    self.ledger.fail(self.job_id, self.spec.worker,
                                     f"timed out after {self.job_timeout:.0f}s", outcome="timeout")
                finally:
                    os._exit(EXIT_TIMEOUT)
            if self.loading or now - self.last_sign < self.timeout:
                try:
                    self.ledger.heartbeat(self.spec.worker, self.job_id)
                except Exception as exc:  # a locked or vanished ledger must not kill the thread
                    self.log.warning("heartbeat failed: %s", exc)


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
        "job_id": job.id, "job": job.to_dict(), "settings": spec.settings, "backend": spec.model.get("backend"),
        "model": spec.model, "generation": spec.generation, "attempt": attempt,
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


def settle_if_made(ledger, job, worker: str, frames: int, log: logging.Logger) -> bool:
    """The skip-if-done rule of every executor's workers, applied to a job just claimed.

    A complete mp4 of this job already there: recorded as done (skipped), True. One made with other
    settings in the way: the attempt fails, never overwriting it, True. Nothing there: False, run it.
    """
    from .outputs import inspect_output
    state = inspect_output(job.output, frames)
    if not state.complete:
        return False
    if not state.stale_for(job.id):
        log.info("skip %s: already done", job.key)
        ledger.complete(job.id, worker, 0.0, skipped=True)
    else:
        ledger.fail(job.id, worker, "an mp4 made with other settings is in the way; "
                    "run again with --redo-changed to move it aside", outcome="error")
    return True


class OutputWriter:
    """Encodes and records finished videos in a thread, one at a time and in order.

    At most one video waits: `submit` first waits for the previous write, so frames never pile up
    in memory when encoding is slower than generating. A write that fails fails its job (retried
    like any other failure); the worker itself goes on.
    """

    def __init__(self, spec: WorkerSpec, log: logging.Logger):
        from concurrent.futures import ThreadPoolExecutor
        self.spec, self.log = spec, log
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="output-writer")
        self.pending = None
        self._ledger = None
        self.disk_full: BaseException | None = None  # a write failed for want of space: stop the worker

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
        from .ledger import Ledger
        from .outputs import adopt_mp4, write_mp4
        if self._ledger is None:  # its own connection: the main thread uses the other one meanwhile
            self._ledger = Ledger(self.spec.ledger)
        frames = int(self.spec.generation["num_frames"])
        try:
            if isinstance(result, Path):
                adopt_mp4(result, job.output, expected_frames=frames, sidecar=record, owner=self.spec.worker)
            else:
                write_mp4(result, job.output, int(self.spec.generation["fps"]), expected_frames=frames,
                          sidecar=record, owner=self.spec.worker)
            seconds = time.monotonic() - started
            if self._ledger.complete(job.id, self.spec.worker, seconds):
                self.log.info("done %s in %.1fs", job.key, seconds)
            else:  # the claim expired and moved on: its holder records the job (it finds the video made)
                self.log.warning("wrote %s, but the job is no longer this worker's: not counted", job.key)
        except Exception as exc:
            if disk_full(exc):  # not the job's fault: give it back unused (its temporary file is gone)
                self.disk_full = exc
                try:
                    self._ledger.release(job.id, self.spec.worker)
                except Exception:
                    pass
                return
            self.log.error("could not write %s:\n%s", job.key, traceback.format_exc())
            state = self._ledger.fail(job.id, self.spec.worker, f"writing the video failed: {exc}"[:500])
            self.log.info("job %s is now %s", job.key, state)


class ReadAhead:
    """Tells the backend which job most likely comes next, so it can start reading its reference."""

    def __init__(self, backend, ledger, spec: WorkerSpec, log: logging.Logger):
        from .backends import Backend
        self.backend, self.ledger, self.spec, self.log = backend, ledger, spec, log
        self.enabled = type(backend).prepare is not Backend.prepare  # nothing to read ahead: no query

    def after(self, job) -> None:
        if not self.enabled:
            return
        upcoming = self.ledger.peek(self.spec.queue, prefer_group=job.group)
        if upcoming is None or not upcoming.reference or upcoming.reference == job.reference:
            return
        try:
            self.backend.prepare(upcoming)
        except Exception as exc:  # the job itself will read it again and report the error properly
            self.log.warning("reading ahead for %s failed: %s", upcoming.key, exc)


def run_worker(spec: WorkerSpec) -> int:
    from .backends import OutOfMemory, backend_class
    from .jobs import Job  # noqa: F401  (payloads are Jobs)
    from .ledger import Ledger
    from .manifest import GenerationConfig, ModelConfig

    from .sweep import hold_worker_lock
    lock = hold_worker_lock(spec)  # noqa: F841 (held until exit: alive even if its supervisor is killed)
    log = setup_logging(spec)
    ledger = Ledger(spec.ledger)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)  # its tmux pane or server went away: stop cleanly
    supervisor = int(os.environ.get("ORCHESTRATOR_SUPERVISOR_PID", "0")) or None
    # Until its first job the worker says what it is doing (`run`'s progress bar shows it): a first
    # run spends seconds to minutes importing the libraries and loading the model.
    ledger.register_worker(spec.worker, spec.devices, pid=os.getpid(), supervisor_pid=supervisor,
                           phase=f"importing {spec.model.get('backend')}")
    beat = Heartbeat(ledger, spec, log)
    beat.start()
    from .outputs import remove_partials
    if os.path.isdir(spec.output_dir):
        # What an earlier run of this worker was writing when it died (a crash mid-encode): only in
        # the folders of this sweep's jobs, never in a walk of the whole output folder.
        left = remove_partials(ledger.output_folders(), owner=spec.worker)
        if left:
            log.info("removed %d partial file(s) left by this worker's previous run", left)
    model = ModelConfig(**spec.model)
    generation = GenerationConfig(**spec.generation)
    gpu_names = _gpu_names(spec.devices)
    log.info("worker %s starting (pid %d, devices %s, CUDA_VISIBLE_DEVICES=%s)", spec.worker, os.getpid(),
             spec.devices or "cpu", os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    backend = None
    claim = None
    ooms_in_row = 0
    exit_code = EXIT_DONE
    writer = OutputWriter(spec, log)
    compile_cache = None
    if model.speed.compile != "none":
        from .speed import compile_cache_dir, use_compile_cache
        compile_cache = use_compile_cache(compile_cache_dir(spec.output_dir))
        log.info("speed: %s; compiled kernels are cached in %s for this machine's workers",
                 describe_speed(model.speed), compile_cache)
    try:
        started = time.monotonic()
        backend = backend_class(model.backend)(model, generation, spec.devices)
        backend.owner = spec.worker
        ledger.set_worker(spec.worker, phase=f"loading the model ({model.backend})")
        backend.load()
        beat.loading = False
        backend.load_info.setdefault("load_seconds", round(time.monotonic() - started, 2))
        parts = backend.load_info.get("components") or {}
        log.info("model loaded in %.1fs (%s)%s", time.monotonic() - started, model.backend,
                 "; " + ", ".join(f"{k} {v:.1f}s" for k, v in parts.items()) if parts else "")
        read_ahead = ReadAhead(backend, ledger, spec, log)
        ledger.set_worker(spec.worker, state="idle", phase=None)
        group = None
        while True:
            beat.sign_of_life()
            if writer.disk_full is not None:
                raise writer.disk_full
            if ledger.stop_requested():
                log.info("stop requested: exiting")
                break
            claim = ledger.claim(spec.worker, spec.queue, prefer_group=group)
            if claim is None:
                if writer.pending is not None:  # our last video may be all that is left
                    writer.wait()
                    continue
                if ledger.unfinished() == 0:
                    log.info("no work left: exiting")
                    break
                if group is not None:  # first idle poll after work: say so once, not every second
                    ledger.set_worker(spec.worker, state="idle", job=None)
                    group = None
                time.sleep(IDLE_POLL_S)  # jobs in flight elsewhere may come back for a retry
                continue
            job = claim.job
            group = job.group
            read_ahead.after(job)
            if settle_if_made(ledger, job, spec.worker, generation.num_frames, log):
                claim = None
                continue
            log.info("job %s (attempt %d): %s", job.key, claim.attempt, job.prompt[:80])
            beat.job_id, beat.job_started = job.id, time.monotonic()
            t0 = time.monotonic()
            last_report = [t0]

            def progress(step: int, steps: int) -> None:
                beat.sign_of_life()
                now = time.monotonic()
                if now - last_report[0] >= 5 or step == steps:
                    last_report[0] = now
                    print(f"  {job.key}: step {step}/{steps} ({now - t0:.1f}s)", flush=True)

            try:
                backend.attempt = claim.attempt
                # The first call compiles (minutes with fp8): one worker of the machine at a time, and
                # heartbeats go on as while loading, since no step finishes until it is done.
                first_call = compile_cache is not None
                beat.loading = first_call
                with first_call_lock(compile_cache if first_call else None) as waited:
                    result = backend.generate(job, progress)
                beat.loading = False
                generate_s = time.monotonic() - t0
                record = sidecar_record(spec, job, claim.attempt, backend, generate_s, gpu_names)
                if first_call:
                    compile_cache = None
                    record["first_call"] = first_call_facts(record, waited, generate_s)
                    log.info("first call (compiles the denoiser): %s", record["first_call"])
                log.info("generated %s in %.1fs; writing it while the next job starts", job.key, generate_s)
                writer.submit(job, result, record, t0)
                ooms_in_row = 0
            except OutOfMemory as exc:
                ooms_in_row += 1
                state = ledger.fail(job.id, spec.worker, f"out of memory: {exc}", outcome="oom")
                log.error("out of memory on %s (%d in a row); job is now %s", job.key, ooms_in_row, state)
                left = (_retire(ledger, spec, ooms_in_row)
                        if ooms_in_row >= int(spec.execution.get("ooms_before_retire", 2)) else None)
                if left:
                    log.error("repeated out-of-memory: retired this worker; %s now runs %d worker(s)",
                              spec.queue if spec.devices else "this machine", left)
                    exit_code = EXIT_RETIRED
                    claim = None
                    break
            except Exception as exc:
                if disk_full(exc):
                    raise
                log.error("job %s failed:\n%s", job.key, traceback.format_exc())
                last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
                state = ledger.fail(job.id, spec.worker, f"{type(exc).__name__}: {last}"[:500])
                log.info("job %s is now %s", job.key, state)
            beat.job_id = None
            claim = None
    except Stop as stop:
        log.info("received %s: stopping cleanly", stop)
        if claim is not None:
            ledger.release(claim.job.id, spec.worker)
    except Exception as exc:
        if not disk_full(exc):
            raise
        writer.disk_full = writer.disk_full or exc
        if claim is not None:
            try:
                ledger.release(claim.job.id, spec.worker)
            except Exception:
                pass
    finally:
        try:
            writer.close()  # the last video (or the one before a stop) is written before we exit
        except Exception:
            log.warning("output writer failed:\n%s", traceback.format_exc())
        beat.stopped.set()
        if backend is not None:
            try:
                backend.close()
            except Exception:
                log.warning("backend close failed:\n%s", traceback.format_exc())
    if writer.disk_full is not None:
        stop_for_full_disk(ledger, spec, writer.disk_full, log)
        return EXIT_DISK_FULL
    if exit_code != EXIT_RETIRED:
        ledger.set_worker(spec.worker, state="exited", job=None)
    return exit_code


def _gpu_names(devices: tuple[int, ...]) -> list[str]:
    """Names of this worker's cards, for the sidecars (empty on CPU)."""
    if not devices:
        return []
    from .gpus import NoGpus, discover
    try:
        return [g.name for g in discover(visible=None) if g.index in devices]
    except NoGpus:
        return []


def _retire(ledger, spec: WorkerSpec, ooms: int) -> int | None:
    """Mark this worker retired if another live worker shares its card; return how many remain."""
    where = spec.queue if spec.devices else "this machine"
    return ledger.retire_if_shared(
        spec.worker, spec.devices, lambda left: f"retired after {ooms} out-of-memory errors in a row; {where} "
                                                f"now runs {left} worker(s) for the rest of the sweep")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m orchestrator.worker SPEC.json", file=sys.stderr)
        return 2
    return run_worker(WorkerSpec.read(argv[0]))


if __name__ == "__main__":
    sys.exit(main())
