"""The Ray actor: one lifetime of a worker slot on a node (`life`, from `register_worker`), holding its
share of the node's GPUs (Ray sets CUDA_VISIBLE_DEVICES: it counts its cards from 0). It loads the model
and runs the job loop (`harness.Harness`) on a `RaySource`, a `LedgerJobSource` over the ledger actor: each
claim, record, heartbeat and log line is an ordinary Ray call to the driver's node. Videos go to storage
every node sees at the same path, or (`execution.ray_stream_outputs: true`) to the ledger actor.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

from ...gpus import discover
from ...harness import Harness
from ...job_loop import RETIRED, LedgerJobSource, Pulse, storage_problem, write_video
from ...outputs import read_sidecar
from ...planning import WorkerSpec
from ...supervision import EXITED, FAILED, Policy
from ...terminal import PrintableFormatter
from ...worker import EXIT_TIMEOUT, stop_for_storage
from .ledger_actor import Remote

MOUNT_CHECK = "ray-mount-check"  # a token every node must read back when outputs go to shared storage


class RaySource(LedgerJobSource):
    """A Ray worker slot's jobs: `LedgerJobSource` over the ledger actor; `placement` goes into its sidecars."""

    def __init__(self, ledger, spec: WorkerSpec, life: str, stream: bool = False, placement: dict | None = None):
        super().__init__(ledger, spec, life)
        self.stream, self.placement = stream, placement or {}

    def for_thread(self):
        return self  # no connection to open: the writer thread calls the same actor

    def store_video(self, spec, job, result, record):
        record = dict(record or {}, ray=self.placement)
        if not self.stream:  # shared storage: the driver's folder is mounted here at the same path
            return super().store_video(spec, job, result, record)
        with tempfile.TemporaryDirectory(prefix="wan-sweep-") as folder:  # encoded and checked on this node
            if isinstance(result, (str, os.PathLike)):
                result = shutil.move(str(result), os.path.join(folder, "raw.mp4"))
            target = Path(folder) / "video.mp4"
            write_video(spec, result, target, record, job=job)
            return self.ledger.store_streamed(spec, self.life, job, target.read_bytes(), read_sidecar(target))


class RayWorker(Pulse):
    """One lifetime of a worker slot on a node, and its job loop's pulse (signs of life, for `beat`)."""
    loading = True  # until the model is loaded

    def __init__(self, spec: WorkerSpec, life: str, ledger, stream: bool, mount_token: str | None):
        self.spec, self.life, self.ledger = spec, life, Remote(ledger)
        self.stream, self.mount_token = stream, mount_token
        self.last_sign, self.done = time.monotonic(), threading.Event()

    def sign_of_life(self) -> None:
        self.last_sign = time.monotonic()

    def run(self) -> tuple[str, str | None]:
        """Place, load, run the job loop; return the worker's end (EXITED, RETIRED, or FAILED where it cannot
        see the output folder) and why. An actor that dies returns nothing: the driver sees it gone."""
        import ray
        ledger, node, gpu_ids = self.ledger, ray.get_runtime_context().get_node_id(), ray.get_gpu_ids()
        spec, host = self.spec, f"{socket.gethostname()}/{node[:16]}"  # nodes of one machine share a hostname
        if gpu_ids and all(str(g).isdigit() for g in gpu_ids):  # the cards it got: sidecars, card-mates
            spec = replace(spec, devices=tuple(int(g) for g in gpu_ids))
        log = logging.getLogger(f"{__name__}.{spec.worker}")
        log.setLevel(logging.INFO)
        log.propagate, log.handlers = False, [ToLedger(ledger, spec)]
        where = {"node_id": node, "ip": ray.util.get_node_ip_address(), "gpu_ids": [str(g) for g in gpu_ids]}
        source = RaySource(ledger, spec, self.life, self.stream, where)
        source.heartbeat(None)  # alive from now on: the driver watches its heartbeats once it is placed
        ledger.worker_placed(spec.worker, host, spec.devices)  # `retire_if_shared` counts card-mates by these
        log.info("placed on %s, pid %d, GPU ids %s, CUDA_VISIBLE_DEVICES=%s", host, os.getpid(), gpu_ids,
                 os.environ.get("CUDA_VISIBLE_DEVICES"))
        problem = mount_problem(spec, self.stream, self.mount_token)
        if problem:  # a new actor would not see it either
            log.error("%s", problem)
            ledger.worker_failed(spec.worker, problem)
            return FAILED, problem
        harness = Harness(spec, log, pulse=self, devices=tuple(range(len(gpu_ids))),
                          on_loading=lambda phase: ledger.worker_loading(spec.worker, phase))
        threading.Thread(target=self.beat, args=(source, log), name="heartbeat", daemon=True).start()
        failure = ended = None
        try:
            harness.open()
            self.loading = False
            source.idle()
            ended = harness.run(source, _gpu_names(gpu_ids))
        except Exception as exc:  # a disk that takes no more writes ends the sweep; anything else, this actor
            failure = exc
            if not storage_problem(harness.storage_error or exc):
                raise
            harness.release_claim(quietly=True)
        finally:
            harness.close()
            self.done.set()
        failure = harness.storage_error or failure
        if failure is not None:
            stop_for_storage(ledger, spec, storage_problem(failure, writing=failure is harness.storage_error),
                             failure, log)  # the whole sweep stops
            return EXITED, str(failure)
        if ended == RETIRED:
            return RETIRED, None
        ledger.worker_exited(spec.worker)
        return EXITED, None

    def beat(self, source: RaySource, log: logging.Logger) -> None:
        """The heartbeat thread: beats while the loop shows signs of life. A job past its time, or one with
        no progress for `heartbeat_timeout_s`, is failed and the actor process ends (the driver replaces it)."""
        policy = Policy.of(source.spec.execution)
        while not self.done.wait(policy.beat_every_s):
            silent, job = time.monotonic() - self.last_sign, self.job_id
            if job and policy.timed_out(time.monotonic() - self.job_started):
                outcome, why = "timeout", f"timed out after {policy.job_timeout_s:.0f}s"
            elif job and policy.hung(silent, self.loading):
                outcome, why = "lost", f"no progress for more than {policy.heartbeat_timeout_s:.0f}s (hung?)"
            else:
                try:
                    if not policy.hung(silent, self.loading):
                        source.heartbeat(job)
                except Exception as exc:  # the ledger actor busy or gone: the driver decides
                    log.warning("heartbeat failed: %s", exc)
                continue
            log.error("job %s %s: ending this actor (the driver starts a new one)", job, why)
            try:
                source.fail(job, why, outcome=outcome)
            finally:
                os._exit(EXIT_TIMEOUT)


def mount_problem(spec: WorkerSpec, stream: bool, token: str | None) -> str | None:
    """Why this node cannot write the sweep's outputs (it does not see the driver's folder), or None."""
    try:
        seen = (Path(spec.output_dir) / ".sweep" / MOUNT_CHECK).read_text(encoding="utf-8").strip()
    except OSError:
        seen = None
    if stream or seen == token:
        return None
    return (f"node {socket.gethostname()} does not see this sweep's output folder {spec.output_dir} "
            "(mount the shared folder at the same path on every node, or set "
            "execution.ray_stream_outputs: true to send the videos back to the driver)")


class ToLedger(logging.Handler):
    """A worker's log lines, appended by the ledger actor to its log file on the driver's node."""

    def __init__(self, ledger, spec: WorkerSpec):
        super().__init__()
        self.ledger, self.path = ledger, spec.log
        self.setFormatter(PrintableFormatter(f"%(asctime)s %(levelname)s [{spec.worker}] %(message)s",
                                             "%Y-%m-%d %H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.ledger.append_log(self.path, self.format(record))
        except Exception:
            self.handleError(record)


def _gpu_names(gpu_ids: list) -> list[str]:
    """Names of the actor's cards, for the sidecars; empty where NVML sees none (logical GPUs)."""
    try:
        return [g.name for g in discover(visible=None) if {str(g.index), g.uuid} & {str(i) for i in gpu_ids}]
    except Exception:
        return []
