"""The sweep's ledger behind a Ray actor pinned to the driver's node: one process there owns the SQLite
file, as on one machine (never SQLite over a network share), and the worker actors and the driver call
it with ordinary Ray calls. It is the `Ledger` itself, plus what a worker on another node cannot do
there: write a streamed video into the output folder, and append to its log file under `logs/`.
"""
from __future__ import annotations

import time
from pathlib import Path

from ...job_loop import write_video
from ...ledger import Ledger
from ...outputs import temp_path_beside


class LedgerActor(Ledger):
    """`Ledger(path)`, in its own process on the driver's node (`start`)."""

    def store_streamed(self, spec, life: str, job, mp4: bytes, sidecar: dict) -> bool:
        """A video made on another node: written at the job's place the atomic way (temporary file beside
        it → frame count → sidecar → rename) if the worker still holds the job in this lifetime; False,
        nothing written, if the claim moved on meanwhile (its holder makes the job)."""
        if not self.holds(job.id, spec.worker, life):
            return False
        temp = temp_path_beside(job.output, owner=spec.worker)
        try:
            temp.write_bytes(mp4)
            write_video(spec, temp, job.output, sidecar, owner=spec.worker, job=job)
        finally:
            temp.unlink(missing_ok=True)
        self.append_log(spec.log, f"{time.strftime('%Y-%m-%d %H:%M:%S')} INFO [{spec.worker}] stored {job.output} "
                                  "on the driver's node")
        return True

    @staticmethod
    def append_log(path: str, line: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as stream:
            stream.write(line.rstrip("\n") + "\n")


def start(path):
    """The sweep's ledger actor, on the node this process (the driver) runs on."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(LedgerActor).options(num_cpus=0, max_restarts=0, scheduling_strategy=here).remote(str(path))


class Remote:
    """The ledger actor as a `Ledger` (for a `LedgerJobSource`, for the driver): `remote.claim(...)` is
    `ray.get(actor.claim.remote(...))`."""

    def __init__(self, actor):
        self.actor = actor

    def __getattr__(self, name: str):
        import ray
        method = getattr(self.actor, name)
        return lambda *args, **kwargs: ray.get(method.remote(*args, **kwargs))
