"""The Ray actor: one long-lived worker slot on a node. It reserves its share of one node's GPUs
(`num_gpus=1/N` for N workers per card, k for a worker spanning k cards; Ray sets
CUDA_VISIBLE_DEVICES), loads the backend once (again only for a job of another quantize) and runs the
job loop (`orchestrator.job_loop`), the same as a local worker's, on jobs from its driver
(`job_source`). It never touches the ledger.

Outputs go to storage every node sees at the same path (the loop writes the mp4 and sidecar,
atomically), or with `execution.ray_stream_outputs: true` back to the driver, which writes them into
its own output folder the same atomic way.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import replace
from pathlib import Path

from ...job_loop import SlotBackend
from ...planning import WorkerSpec
from .job_source import DriverJobSource, Mailbox, SignsOfLife, ToDriver

MOUNT_CHECK = "ray-mount-check"  # a token every node must read back when outputs go to shared storage


class RayWorker:
    """One worker slot on a Ray node: loads the backend once, then runs the job loop (`work`) on the
    jobs its driver serves.

    `exchange` answers while `work` runs (the actor has two threads): it carries the loop's calls to
    the driver and their answers back, and the signs of life a local worker's heartbeat would show.
    """

    def __init__(self, spec: dict, stream: bool, mount_token: str | None):
        spec = dict(spec, devices=tuple(spec["devices"]))
        self.spec = WorkerSpec(**spec)
        self.stream = stream
        self.mount_token = mount_token
        self.backends: SlotBackend | None = None  # loaded by `load`
        self.gpu_names: list[str] = []
        self.mailbox = Mailbox()
        self.log = _log(self.spec.worker, self.mailbox)
        self.pulse = SignsOfLife()  # the driver's evidence of progress
        self.placement: dict = {}

    def where(self) -> dict:
        import ray
        gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        self.placement = {"node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
                          "ip": ray.util.get_node_ip_address(), "pid": os.getpid(), "gpu_ids": gpu_ids,
                          "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
        return self.placement

    def load(self) -> dict:
        problem = self._output_dir_problem()
        if problem:
            return {"problem": problem}
        import ray
        from ...backend import backend_class
        from ...manifest import GenerationConfig, ModelConfig
        gpu_ids = list(ray.get_gpu_ids())
        if gpu_ids and all(str(g).isdigit() for g in gpu_ids):
            # The sidecar names the cards this actor really got on its node, not the plan's numbering.
            self.spec = replace(self.spec, devices=tuple(int(g) for g in gpu_ids))
        self.gpu_names = _gpu_names(gpu_ids)
        started = time.monotonic()
        # CUDA_VISIBLE_DEVICES holds Ray's choice, so the backend counts its cards from 0.
        devices = tuple(range(len(gpu_ids)))
        generation = GenerationConfig(**self.spec.generation)

        def load(model: ModelConfig):
            """This actor's way of loading a model: the first, and again for a job of another quantize."""
            began = time.monotonic()
            backend = backend_class(model.backend)(model, generation, devices)
            backend.load()
            info = getattr(backend, "load_info", None)
            if isinstance(info, dict):
                info.setdefault("load_seconds", round(time.monotonic() - began, 2))
            return backend

        self.backends = SlotBackend(load, ModelConfig(**self.spec.model), self.log)
        self.backends.open()
        return {"seconds": time.monotonic() - started, "gpu_names": self.gpu_names}

    def work(self) -> dict:
        """Run the job loop on the driver's jobs until no work is left, a stop, or retirement."""
        from ...job_loop import JobLoop, storage_problem
        log = self.log
        if not self.placement:  # `where` and `load` run side by side: the sidecars need the placement
            self.where()
        source = DriverJobSource(self.spec, self.mailbox.call, self.stream, self.placement)
        loop = JobLoop(source, self.spec, log, pulse=self.pulse)
        try:
            return {"ended": loop.run(self.backends, self.gpu_names)}
        except Exception as exc:
            error = loop.writer.storage_error or exc  # a refused write of an output, else the ledger's own
            problem = storage_problem(error, writing=error is loop.writer.storage_error)
            if problem is None:
                raise
            loop.release_claim(quietly=True)
            return {"ended": "unwritable", "problem": problem, "message": str(error)}
        finally:
            loop.close()

    def exchange(self, answers: dict, wait_s: float) -> dict:
        """The driver's answers in, the loop's waiting calls and signs of life out (see `job_source`)."""
        calls = self.mailbox.exchange(answers, wait_s)
        return {"calls": calls, **self.pulse.report()}

    def close(self) -> None:
        if self.backends is not None:
            self.backends.close()

    # ---------------------------------------------------------------- shared storage
    def _output_dir_problem(self) -> str | None:
        if self.stream:
            return None
        marker = Path(self.spec.output_dir) / ".sweep" / MOUNT_CHECK
        try:
            seen = marker.read_text(encoding="utf-8").strip()
        except OSError:
            seen = None
        if seen == self.mount_token:
            return None
        return (f"node {socket.gethostname()} does not see this sweep's output folder {self.spec.output_dir} "
                "(mount the shared folder at the same path on every node, or set "
                "execution.ray_stream_outputs: true to send the videos back to the driver)")


def _log(worker: str, mailbox: Mailbox):
    """The actor's log: its lines go to the driver, which writes them to the worker's log file."""
    import logging
    log = logging.getLogger(f"{__name__}.{worker}")
    log.setLevel(logging.INFO)
    log.propagate = False
    log.handlers = [ToDriver(mailbox)]  # this actor's mailbox (a logger outlives an actor of its name)
    return log


def _gpu_names(gpu_ids: list) -> list[str]:
    """Names of the actor's cards, for the sidecars; empty where NVML sees none (logical GPUs)."""
    if not gpu_ids:
        return []
    try:
        from ...gpus import discover
        wanted = {str(g) for g in gpu_ids}
        return [g.name for g in discover(visible=None) if str(g.index) in wanted or g.uuid in wanted]
    except Exception:
        return []


_REMOTE_CLASS = None


def remote_worker_class():
    """`RayWorker` as a Ray actor class (made once, when Ray runs)."""
    global _REMOTE_CLASS
    if _REMOTE_CLASS is None:
        import ray
        _REMOTE_CLASS = ray.remote(RayWorker)
    return _REMOTE_CLASS
