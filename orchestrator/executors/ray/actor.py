"""The Ray actor: one long-lived worker slot on a node. It reserves its share of one node's GPUs
(`num_gpus=1/N` for N workers per card, k for a worker spanning k cards; Ray sets
CUDA_VISIBLE_DEVICES), loads the backend once and runs the jobs the driver sends it, through the job
loop's own generate and write path (`orchestrator.job_loop`). It never touches the ledger.

Outputs go to storage every node sees at the same path (the actor writes the mp4 and sidecar,
atomically), or with `execution.ray_stream_outputs: true` back to the driver, which writes them into
its own output folder the same atomic way.
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

from ...planning import WorkerSpec

MOUNT_CHECK = "ray-mount-check"  # a token every node must read back when outputs go to shared storage


class RayWorker:
    """One worker slot on a Ray node: loads the backend once, then runs the jobs the driver sends.

    `progress` answers while `run` works (the actor has two threads), so the driver sees steps go by
    as a local worker's heartbeat would show them.
    """

    def __init__(self, spec: dict, stream: bool, mount_token: str | None):
        spec = dict(spec, devices=tuple(spec["devices"]))
        self.spec = WorkerSpec(**spec)
        self.stream = stream
        self.mount_token = mount_token
        self.backend = None
        self.gpu_names: list[str] = []
        self.signs = 0  # steps done so far, over all jobs: the driver's evidence of progress
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
        from ...backends import backend_class
        from ...manifest import GenerationConfig, ModelConfig
        gpu_ids = list(ray.get_gpu_ids())
        if gpu_ids and all(str(g).isdigit() for g in gpu_ids):
            # The sidecar names the cards this actor really got on its node, not the plan's numbering.
            self.spec = replace(self.spec, devices=tuple(int(g) for g in gpu_ids))
        self.gpu_names = _gpu_names(gpu_ids)
        started = time.monotonic()
        model = ModelConfig(**self.spec.model)
        # CUDA_VISIBLE_DEVICES holds Ray's choice, so the backend counts its cards from 0.
        devices = tuple(range(len(gpu_ids)))
        self.backend = backend_class(model.backend)(model, GenerationConfig(**self.spec.generation), devices)
        self.backend.load()
        seconds = time.monotonic() - started
        info = getattr(self.backend, "load_info", None)
        if isinstance(info, dict):
            info.setdefault("load_seconds", round(seconds, 2))
        return {"seconds": seconds, "gpu_names": self.gpu_names}

    def progress(self) -> int:
        return self.signs

    def _progress(self, step: int, steps: int) -> None:
        self.signs += 1

    def run(self, job_data: dict, attempt: int) -> dict:
        from ...backends import OutOfMemory
        from ...jobs import Job
        from ...job_loop import failure_message, generate_job
        job = Job.from_dict(job_data)
        started = time.monotonic()
        try:
            made = generate_job(self.backend, self.spec, job, attempt, self.gpu_names, self._progress)
            record = made.record
            record["ray"] = {k: self.placement.get(k) for k in ("node_id", "ip", "gpu_ids")}
            answer = {"status": "done", "generate_seconds": made.seconds}
            if self.stream:
                answer.update(self._encode_here(job, made.result, record))
            else:
                self._write_shared(job, made.result, record)
            answer["seconds"] = time.monotonic() - started
            return answer
        except OutOfMemory as exc:
            return {"status": "oom", "error": f"out of memory: {exc}"[:500]}
        except Exception as exc:
            return {"status": "error", "error": failure_message(exc), "traceback": traceback.format_exc()}

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()

    # ---------------------------------------------------------------- outputs
    def _write_shared(self, job, result, record: dict) -> None:
        from ...job_loop import write_video
        write_video(self.spec, result, job.output, record, owner=self.spec.worker, job=job)

    def _encode_here(self, job, result, record: dict) -> dict:
        """Encode and check the mp4 on this node; the driver gets its bytes and the sidecar."""
        from ...job_loop import write_video
        from ...outputs import read_sidecar
        folder = Path(tempfile.mkdtemp(prefix="wan-sweep-"))
        try:
            target = folder / "video.mp4"
            if isinstance(result, (str, os.PathLike)):
                raw = folder / "raw.mp4"
                shutil.move(str(result), raw)
                result = raw
            write_video(self.spec, result, target, record, job=job)
            return {"mp4": target.read_bytes(), "sidecar": read_sidecar(target)}
        finally:
            shutil.rmtree(folder, ignore_errors=True)

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
