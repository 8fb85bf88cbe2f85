"""Planning: which devices run how many workers, and which queue each job starts in.

Each device group (one card, or several cards for a model that needs them) gets a queue. Jobs are
dealt to queues a reference input at a time, largest first, to the queue with the least work per
worker; at run time a worker whose queue is empty takes work from the fullest other queue, so the
initial split only decides where work starts, never where a card idles.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .backend import backend_class, lora_change
from .errors import WanSweepError
from .gpus import FAKE_ENV, Gpu
from .jobs import Job
from .manifest import Execution, GenerationConfig, Manifest, ModelConfig
from .manifest.sections import MAX_CPU_SLOTS
from .outputs import TEMP_MARK


@dataclass(frozen=True)
class DeviceGroup:
    """Cards that together run one worker at a time, and how many workers they hold."""
    queue: str  # "gpu0", "gpu0+1", "cpu0"
    devices: tuple[int, ...]  # NVML indices; () for a CPU slot
    workers: int
    reason: str
    gpus: tuple[Gpu, ...] = ()


@dataclass(frozen=True)
class WorkerSlot:
    id: str  # gpu0_worker1, gpu0+1_worker0, cpu0_worker0
    devices: tuple[int, ...]
    queue: str

    @property
    def label(self) -> str:
        return self.queue


@dataclass(frozen=True)
class Plan:
    groups: tuple[DeviceGroup, ...]
    workers: tuple[WorkerSlot, ...]
    queues: dict[str, str]  # job id -> queue
    notes: tuple[str, ...] = ()

    def queue_sizes(self) -> dict[str, int]:
        sizes = {g.queue: 0 for g in self.groups}
        for queue in self.queues.values():
            sizes[queue] += 1
        return sizes


def device_groups(manifest: Manifest, gpus: list[Gpu] | None, cpu_slots: int | None = None,
                  sizing=None) -> tuple[list[DeviceGroup], list[str]]:
    """Device groups for this manifest on these GPUs (None: no GPU here)."""
    notes: list[str] = []
    res = manifest.resources
    if gpus is None:
        if not backend_class(manifest.model.backend).runs_on_cpu:
            raise PlanError(f"backend `{manifest.model.backend}` needs NVIDIA GPUs and none are visible here")
        slots = res.cpu_slots if cpu_slots is None else checked_cpu_slots(cpu_slots, "cpu_slots=")
        return [DeviceGroup(queue=f"cpu{i}", devices=(), workers=1,
                            reason="no NVIDIA GPU: CPU slot for a CPU-capable backend") for i in range(slots)], notes
    if res.gpus != "all":
        known = {g.index for g in gpus}
        missing = [i for i in res.gpus if i not in known]
        if missing:
            raise PlanError(f"resources.gpus lists {missing}, but the visible GPUs are {sorted(known)}")
        gpus = [g for g in gpus if g.index in res.gpus]
    if sizing is not None:
        return sizing(manifest, gpus, notes), notes
    if os.environ.get(FAKE_ENV) and backend_class(manifest.model.backend).measured_sizing:
        notes.append(f"the GPUs are FAKE ({FAKE_ENV}): nothing was measured; the manifest's counts are used")
    per_worker = res.gpus_per_worker if isinstance(res.gpus_per_worker, int) else 1
    if res.gpus_per_worker == "auto":
        notes.append("gpus_per_worker: auto needs a calibration profile; using 1 card per worker")
    if per_worker > len(gpus):
        raise PlanError(f"resources.gpus_per_worker is {per_worker}, but only {len(gpus)} GPUs are visible")
    workers = res.workers_per_gpu if isinstance(res.workers_per_gpu, int) else 1
    reason = (f"workers_per_gpu: {workers} (from the manifest)" if isinstance(res.workers_per_gpu, int)
              else "workers_per_gpu: auto without a calibration profile: 1 worker")
    groups = []
    for start in range(0, len(gpus) - per_worker + 1, per_worker):
        cards = tuple(gpus[start:start + per_worker])
        queue = "gpu" + "+".join(str(g.index) for g in cards)
        groups.append(DeviceGroup(queue=queue, devices=tuple(g.index for g in cards), workers=workers,
                                  reason=reason, gpus=cards))
    left = len(gpus) % per_worker
    if left:
        notes.append(f"{left} GPU(s) left unused: {per_worker} cards per worker")
    return groups, notes


class PlanError(WanSweepError, RuntimeError):
    pass


def checked_cpu_slots(value, what: str) -> int | None:
    """`value` as the worker slots of a machine without GPUs, by the rule of the manifest's
    `resources.cpu_slots` (a whole number from 1 to MAX_CPU_SLOTS), for what overrides it:
    `--cpu-slots` (what="--cpu-slots") and the API's `cpu_slots=` (what="cpu_slots="). None: not given."""
    if value is None:
        return None
    whole = isinstance(value, int) and not isinstance(value, bool)
    if not whole or not 1 <= value <= MAX_CPU_SLOTS:
        given = f"{what}{value!r}" if what.endswith("=") else f"{what} is {value!r}"
        raise PlanError(f"{given}: use a whole number from 1 to {MAX_CPU_SLOTS} (one worker process each"
                        + ("" if whole else f"; an int, not a {type(value).__name__}") + ")")
    return value


def assign_queues(jobs: list[Job], groups: list[DeviceGroup]) -> dict[str, str]:
    """Deal reference groups, largest first, to the queue with the least work per worker."""
    by_group: dict[str, list[Job]] = {}
    for job in jobs:
        by_group.setdefault(job.group, []).append(job)
    load = {g.queue: 0.0 for g in groups if g.workers > 0}
    capacity = {g.queue: g.workers for g in groups if g.workers > 0}
    if not load:
        raise PlanError("no device group has a worker")
    queues: dict[str, str] = {}
    # Sorting by size then first ordinal keeps the deal deterministic.
    for name, members in sorted(by_group.items(), key=lambda kv: (-len(kv[1]), kv[1][0].ordinal)):
        target = min(load, key=lambda q: ((load[q] + len(members)) / capacity[q], load[q], q))
        load[target] += len(members)
        for job in members:
            queues[job.id] = target
    return queues


def model_changes(jobs: list[Job], backend: str) -> dict[str, int]:
    """How often a worker running `jobs` (in their order) changes its model between them: LoRA switches in
    place (`"switch"`) and loads again (`"reload"`), by the slot's own rule (`backend.lora_change`). The
    workers of a queue take its jobs in order together, so each meets every setting of the queue once;
    this is the count per worker (a setting of fewer jobs than workers may skip some of them)."""
    counts = {"switch": 0, "reload": 0}
    previous = None
    for job in sorted(jobs, key=lambda job: job.ordinal):
        if job.model is None:
            continue
        if previous is not None and job.model != previous:
            change = lora_change(backend, previous, job.model)
            if change != "same":
                counts[change] += 1
        previous = job.model
    return counts


def make_plan(manifest: Manifest, jobs: list[Job], gpus: list[Gpu] | None,
              cpu_slots: int | None = None, sizing=None) -> Plan:
    groups, notes = device_groups(manifest, gpus, cpu_slots, sizing)
    workers = tuple(WorkerSlot(id=f"{g.queue}_worker{k}", devices=g.devices, queue=g.queue)
                    for g in groups for k in range(g.workers))
    return Plan(groups=tuple(groups), workers=workers, queues=assign_queues(jobs, groups),
                notes=tuple(notes))


@dataclass(frozen=True)
class WorkerSpec:
    """Everything one worker process needs, written to a JSON file the executor passes by path (the Ray
    executor passes the object itself to its actors: it pickles).

    No manifest string ever reaches a shell: the command line holds only this file's path. Its settings are
    typed, read from JSON once (`from_dict`); each job carries its own (`Job.model`, `Job.generation`): these
    are what the worker loads first and builds its backend with.
    """
    sweep: str  # experiment name
    worker: str
    devices: tuple[int, ...]
    queue: str
    ledger: str
    output_dir: str
    log: str
    model: ModelConfig  # the model the worker loads first (its first job's)
    generation: GenerationConfig  # the manifest's: what its backend is built with
    execution: Execution
    settings: dict = field(default_factory=dict)  # the fingerprint recorded in each sidecar

    def to_dict(self) -> dict:
        """Its JSON form (the spec file); `from_dict` reads it back."""
        return {**vars(self), "devices": list(self.devices), "model": self.model.to_dict(),
                "generation": self.generation.to_dict(), "execution": self.execution.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "WorkerSpec":
        return cls(**{**data, "devices": tuple(data["devices"]), "model": ModelConfig.from_dict(data["model"]),
                      "generation": GenerationConfig.from_dict(data["generation"]),
                      "execution": Execution.from_dict(data["execution"])})

    def write(self, path: str | Path) -> Path:
        """Write the spec atomically: a temporary file beside it, then a rename, so a worker starting
        (or restarting) at that moment reads the old spec or the new one, never half of one."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(prefix=TEMP_MARK, suffix=".json", dir=path.parent)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                json.dump(self.to_dict(), stream, indent=2, ensure_ascii=False)
            os.replace(temp_name, path)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def read(cls, path: str | Path) -> "WorkerSpec":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
