"""The worker process: one process bound to its device(s) that loads the backend (once; again only for
a job of another quantize value) and runs the job loop (`orchestrator.job_loop`) on the ledger.

This module owns what is particular to a process: its lock, signals (a clean stop), its log file,
its heartbeat thread and exit codes. A heartbeat thread writes to the ledger while the loop makes
progress; when progress stops (a hung call) the heartbeat stops too and the supervisor replaces the
worker. A job past `job_timeout_s` is failed and the process exits so it can be restarted clean.

Run as `python -m orchestrator.worker SPEC.json` (the executors do this; see `supervisor`).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from .gpus import NoGpus, discover
from .harness import Harness
from .job_loop import FULL, RETIRED, LedgerJobSource, Pulse, storage_problem
from .ledger import Ledger
from .locks import hold_worker_lock
from .outputs import remove_partials
from .planning import WorkerSpec
from .speed import compile_cache_dir, describe as describe_speed, use_compile_cache
from .supervision import Policy
from .terminal import PrintableFormatter  # a prompt's escape sequences are printed, not obeyed

EXIT_DONE = 0  # no work left, or asked to stop
EXIT_TIMEOUT = 75  # a job ran past job_timeout_s; restart me
EXIT_RETIRED = 76  # repeated out-of-memory on this card: do not restart me
EXIT_UNWRITABLE = 77  # the output folder's disk is full or read-only: do not restart me; the whole sweep stops
EXIT_HUNG_ORPHAN = 78  # hung with no supervisor left to replace me: I end myself, so a new `run` can start


def stop_for_storage(ledger, spec: WorkerSpec, problem: str, error: BaseException | str,
                     log: logging.Logger) -> None:
    """The output folder's disk takes no more writes (`problem`: `job_loop.FULL` or `READ_ONLY`): ask the
    whole sweep to stop (every worker finishes cleanly) and say why, once, where it shows: the ledger
    (`report`, `run`), the log and the pane. Each write may fail on that same disk."""
    detail = getattr(error, "strerror", None) or error
    if problem == FULL:
        message = (f"stopped: the disk of {spec.output_dir} is full ({detail}); the workers stopped cleanly and "
                   "nothing made is lost: free some space and run the same command again")
    else:
        message = (f"stopped: the output folder {spec.output_dir} takes no more writes ({detail}): its disk was "
                   "remounted read-only (after a disk error?) or its permissions changed; the workers stopped "
                   "cleanly and nothing made is lost: make it writable and run the same command again")
    log.error("%s", message)
    for step in (lambda: ledger.set_meta("stop_reason", message), ledger.request_stop,
                 lambda: ledger.worker_exited(spec.worker, message)):
        try:
            step()
        except Exception:  # the ledger shares the full disk: the others stop when they hit it too
            pass


class Stop(BaseException):
    """SIGTERM/SIGINT: finish cleanly (remove the temporary file, release the claim)."""


def _on_signal(signum, frame):
    # One clean stop is enough: `stop` signals both the supervisor and the worker, and the supervisor
    # passes its signal on, so a second SIGTERM must not interrupt the clean-up of the first.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    if signum == signal.SIGHUP:
        detach_from_terminal()
    raise Stop(signal.Signals(signum).name)


def detach_from_terminal() -> None:
    """The terminal (tmux pane) is gone: send further output to /dev/null so writes cannot fail."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        os.close(null)
    except OSError:
        pass


# What the libraries print on every import of a worker (torch's note that torchao registers its enums the
# deprecated way; diffusers' note that some torchao tensor types are gone), and Python's warnings: the log
# file keeps them, the pane (which shows the worker's progress) does not.
LOG_FILE_ONLY = ("torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer", "py.warnings")


def setup_logging(spec: WorkerSpec) -> logging.Logger:
    logging.raiseExceptions = False  # a log line lost to a full disk must not print a traceback in the pane
    log = logging.getLogger(f"worker.{spec.worker}")
    log.setLevel(logging.INFO)
    log.propagate = False
    fmt = PrintableFormatter("%(asctime)s %(levelname)s [" + spec.worker + "] %(message)s", "%Y-%m-%d %H:%M:%S")
    Path(spec.log).parent.mkdir(parents=True, exist_ok=True)
    to_file, to_screen = logging.FileHandler(spec.log, encoding="utf-8"), logging.StreamHandler(sys.stdout)
    for handler in (to_file, to_screen):
        handler.setFormatter(fmt)
        log.addHandler(handler)
    # The package's own module loggers (the harness, the backends, the checkpoints) write where the
    # worker's lines go: its log file and its pane.
    package = logging.getLogger("orchestrator")
    package.setLevel(logging.INFO)
    package.propagate = False
    for handler in (to_file, to_screen):
        package.addHandler(handler)
    logging.captureWarnings(True)
    for name in LOG_FILE_ONLY:
        noisy = logging.getLogger(name)
        noisy.propagate = False
        noisy.addHandler(to_file)
    return log


class Heartbeat(threading.Thread, Pulse):
    """Beats for the worker while its main loop shows signs of life; enforces job_timeout_s.

    A hung worker is its supervisor's to replace; one whose supervisor is gone (killed) ends itself once
    it has shown no progress for heartbeat_timeout_s, its claims back to the queue, so that it does not
    hold the sweep "running" until a `stop`."""

    def __init__(self, ledger, spec: WorkerSpec, log: logging.Logger, life: str, supervisor_pid: int | None = None):
        super().__init__(daemon=True, name="heartbeat")
        self.ledger, self.spec, self.log, self.life = ledger, spec, log, life
        self.policy = Policy.of(spec.execution)
        self.last_sign = time.monotonic()
        self.loading = True
        self.job_id: str | None = None
        self.job_started = 0.0
        self.temp_files: list[str] = []
        self.stopped = threading.Event()
        self.supervisor_pid = supervisor_pid

    def orphaned(self) -> bool:
        """Its supervisor died: the worker was handed to another parent (init, or a subreaper)."""
        return self.supervisor_pid is not None and os.getppid() != self.supervisor_pid

    def sign_of_life(self) -> None:
        self.last_sign = time.monotonic()

    def run(self) -> None:
        # Its own connection: the main thread may be inside a transaction on the other one.
        self.ledger = Ledger(self.ledger.path)
        policy = self.policy
        while not self.stopped.wait(policy.beat_every_s):
            now = time.monotonic()
            if self.job_id and policy.timed_out(now - self.job_started):
                self.log.error("job %s ran past job_timeout_s=%.0fs: abandoning it and restarting",
                               self.job_id, policy.job_timeout_s)
                try:
                    self.ledger.fail(self.job_id, self.spec.worker, f"timed out after {policy.job_timeout_s:.0f}s",
                                     outcome="timeout", life=self.life)
                finally:
                    os._exit(EXIT_TIMEOUT)
            if not policy.hung(now - self.last_sign, self.loading):
                try:
                    self.ledger.heartbeat(self.spec.worker, self.job_id, life=self.life)
                except Exception as exc:  # a locked or vanished ledger must not kill the thread
                    self.log.warning("heartbeat failed: %s", exc)
            elif self.orphaned():
                reason = (f"no progress for {now - self.last_sign:.0f}s (hung?) and its supervisor is gone: "
                          "the worker ended itself")
                self.log.error("%s", reason)
                try:
                    self.ledger.requeue_worker(self.spec.worker, reason)
                    self.ledger.worker_exited(self.spec.worker, reason)
                finally:
                    os._exit(EXIT_HUNG_ORPHAN)


def run_worker(spec: WorkerSpec) -> int:
    lock = hold_worker_lock(spec)  # noqa: F841 (held until exit: alive even if its supervisor is killed)
    log = setup_logging(spec)
    ledger = Ledger(spec.ledger)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)  # its tmux pane or server went away: stop cleanly
    supervisor = int(os.environ.get("ORCHESTRATOR_SUPERVISOR_PID", "0")) or None
    # Until its first job the worker says what it is doing (`run`'s progress bar shows it): a first
    # run spends seconds to minutes importing the libraries and loading the model.
    life = ledger.register_worker(spec.worker, spec.devices, pid=os.getpid(), supervisor_pid=supervisor,
                                  phase=f"importing {spec.model.backend}")
    beat = Heartbeat(ledger, spec, log, life, supervisor)
    beat.start()
    if os.path.isdir(spec.output_dir):
        # What an earlier run of this worker was writing when it died (a crash mid-encode): only in
        # the folders of this sweep's jobs, never in a walk of the whole output folder.
        left = remove_partials(ledger.output_folders(), owner=spec.worker)
        if left:
            log.info("removed %d partial file(s) left by this worker's previous run", left)
    model = spec.model
    gpu_names = _gpu_names(spec.devices)
    log.info("worker %s starting (pid %d, devices %s, CUDA_VISIBLE_DEVICES=%s)", spec.worker, os.getpid(),
             spec.devices or "cpu", os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    exit_code = EXIT_DONE
    compile_cache = None
    if model.speed.compile != "none":
        compile_cache = use_compile_cache(compile_cache_dir(spec.output_dir))
        log.info("speed: %s; compiled kernels are cached in %s for this machine's workers",
                 describe_speed(model.speed), compile_cache)
    harness = Harness(spec, log, pulse=beat, on_loading=lambda phase: ledger.worker_loading(spec.worker, phase))
    storage_error = None
    try:
        harness.open()
        beat.loading = False
        ledger.worker_idle(spec.worker)
        if harness.run(LedgerJobSource(ledger, spec, life), gpu_names, compile_cache) == RETIRED:
            exit_code = EXIT_RETIRED
    except Stop as stop:
        log.info("received %s: stopping cleanly", stop)
        harness.release_claim()
    except Exception as exc:
        if exc is not harness.storage_error and not storage_problem(exc):
            raise
        storage_error = exc
        harness.release_claim(quietly=True)
    finally:
        harness.close()  # the last video (or the one before a stop) is written before we exit
        beat.stopped.set()
    storage_error = harness.storage_error or storage_error
    if storage_error is not None:
        stop_for_storage(ledger, spec, storage_problem(storage_error, writing=storage_error is harness.storage_error),
                         storage_error, log)
        return EXIT_UNWRITABLE
    if exit_code != EXIT_RETIRED:
        ledger.worker_exited(spec.worker)
    return exit_code


def _gpu_names(devices: tuple[int, ...]) -> list[str]:
    """Names of this worker's cards, for the sidecars (empty on CPU)."""
    if not devices:
        return []
    try:
        return [g.name for g in discover(visible=None) if g.index in devices]
    except NoGpus:
        return []


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m orchestrator.worker SPEC.json", file=sys.stderr)
        return 2
    return run_worker(WorkerSpec.read(argv[0]))


if __name__ == "__main__":
    sys.exit(main())
