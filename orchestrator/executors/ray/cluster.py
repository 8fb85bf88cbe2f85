"""The Ray cluster and the plan over it: per live node, its GPUs (Ray's `GPU` resource) and their type
(`accelerator_type:*`); workers per card from a cached calibration profile of that GPU type (measured by a
local `plan` on such a card), else the manifest's integer, else 1. `Placement`: where a queue's actors go.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

from ...backend import backend_class
from ...planning import DeviceGroup, Plan, PlanError, WorkerSlot, assign_queues
from ...sizing import decide_workers, profile_key
from ...sizing.profiles import cached_profiles


@dataclass(frozen=True)
class RayNode:
    id: str
    host: str
    address: str
    gpus: int
    gpu_type: str | None  # Ray's accelerator type, e.g. "H100", "GeForce-RTX-3090"
    cpus: int
    head: bool = False


def cluster_nodes() -> list[RayNode]:
    """The live nodes of the connected cluster, head first, then by address (a stable order)."""
    import ray
    nodes = []
    for info in ray.nodes():
        if not info.get("Alive"):
            continue
        resources = info.get("Resources") or {}
        types = sorted(k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:"))
        nodes.append(RayNode(
            id=info["NodeID"], host=info.get("NodeManagerHostname") or info.get("NodeManagerAddress", "?"),
            address=info.get("NodeManagerAddress", ""), gpus=int(resources.get("GPU", 0)),
            gpu_type=types[0] if types else None, cpus=int(resources.get("CPU", 0)),
            head="node:__internal_head__" in resources))
    nodes.sort(key=lambda n: (not n.head, n.address, n.host, n.id))
    return nodes


def gpu_type_of(gpu_name: str) -> str:
    """The accelerator type Ray advertises for an NVML GPU name, so profiles match node resources."""
    with contextlib.suppress(Exception):  # a private helper of Ray's: else the same idea here
        from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager
        found = NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type(gpu_name)
        if found:
            return found
    return gpu_name.removeprefix("NVIDIA ").strip().replace(" ", "-")


def _profile_for(profiles: list, manifest, gpu_type: str | None, cards: int):
    """A profile of these settings measured on this GPU type with this many cards per worker."""
    if not gpu_type:
        return None
    wanted = profile_key(manifest, "", cards)
    wanted.pop("gpu")
    for profile in profiles:
        key = dict(profile.key)
        name = key.pop("gpu", "") or profile.gpu_name
        if key == wanted and gpu_type_of(name) == gpu_type:
            return profile
    return None


def _workers_per_group(manifest, node: RayNode, cards: int, profiles: list) -> tuple[int, str]:
    res = manifest.resources
    requested = res.workers_per_gpu
    sized = backend_class(manifest.model.backend).measured_sizing
    profile = _profile_for(profiles, manifest, node.gpu_type, cards) if sized else None
    if profile is None:
        if isinstance(requested, int):
            return requested, f"workers_per_gpu: {requested} (from the manifest)"
        return 1, ("workers_per_gpu: auto: 1 worker (this backend is not sized)" if not sized else
                   f"workers_per_gpu: auto without a calibration profile for {node.gpu_type or 'this GPU'} "
                   f"×{cards}: 1 worker (a local `plan` on such a card measures one)")
    if not profile.fits:
        return 0, f"one worker ran out of memory on {cards} {profile.gpu_name} (profile): no worker here"
    # The remote card's free memory is not known here: the profile's own measurement stands in for it.
    free = profile.free_bytes_at_calibration or profile.gpu_total_bytes
    decision = decide_workers(profile, free, res.memory_margin_gib, requested)
    return decision.workers, f"{decision.reason} [profile of {profile.gpu_name}]"


def _cards_per_worker(manifest, node: RayNode, profiles: list) -> tuple[int, str | None]:
    per_worker = manifest.resources.gpus_per_worker
    if isinstance(per_worker, int):
        return per_worker, None
    for cards in range(1, node.gpus + 1):
        profile = _profile_for(profiles, manifest, node.gpu_type, cards)
        if profile is not None and profile.fits:
            return cards, f"gpus_per_worker: auto → {cards} (profile of {profile.gpu_name})"
    return 1, "gpus_per_worker: auto without a calibration profile for this GPU type: 1 card per worker"


@dataclass(frozen=True)
class Placement:
    node: str  # Ray node id the slot's first actor is placed on
    num_gpus: float  # Ray's GPU resource per actor (0 for a CPU slot)
    host: str


def plan_cluster(manifest, jobs, nodes: list[RayNode], cpu_slots: int | None = None,
                 profiles: list | None = None) -> tuple[Plan, dict[str, Placement]]:
    """Device groups per node of the cluster (queues `n<i>-gpu<j>`), and where each queue's actors go."""
    res = manifest.resources
    profiles = cached_profiles(manifest) if profiles is None else profiles
    notes = [f"Ray cluster: {len(nodes)} node(s), {sum(n.gpus for n in nodes)} GPU(s): "
             + ", ".join(f"n{i} {n.host} {n.address} ({n.gpus} × {n.gpu_type or 'GPU'})" if n.gpus
                         else f"n{i} {n.host} {n.address} (no GPU)" for i, n in enumerate(nodes))]
    if res.gpus != "all":
        notes.append("resources.gpus names the cards of one machine: on Ray every GPU of every node is used")
    groups: list[DeviceGroup] = []
    placement: dict[str, Placement] = {}
    if not any(n.gpus for n in nodes):
        if not backend_class(manifest.model.backend).runs_on_cpu:
            raise PlanError(f"backend `{manifest.model.backend}` needs GPUs and the Ray cluster has none "
                            "(start each node with its GPUs: `ray start ... --num-gpus=N`)")
        slots = cpu_slots or res.cpu_slots
        for i, node in enumerate(nodes):
            for j in range(slots):
                queue = f"n{i}-cpu{j}"
                groups.append(DeviceGroup(queue=queue, devices=(), workers=1,
                                          reason=f"{node.host}: no GPU in the cluster: CPU slot"))
                placement[queue] = Placement(node.id, 0.0, node.host)
    for i, node in enumerate(nodes):
        if not node.gpus:
            continue
        cards, note = _cards_per_worker(manifest, node, profiles)
        if note:
            notes.append(f"n{i} {node.host}: {note}")
        if cards > node.gpus:
            notes.append(f"n{i} {node.host}: left idle: {cards} cards per worker, it has {node.gpus}")
            continue
        for start in range(0, node.gpus - cards + 1, cards):
            devices = tuple(range(start, start + cards))
            queue = f"n{i}-gpu" + "+".join(map(str, devices))
            workers, reason = _workers_per_group(manifest, node, cards, profiles)
            if cards > 1 and workers > 1:
                notes.append(f"{queue}: a worker spanning {cards} cards gets them to itself on Ray: 1 worker")
                workers = 1
            groups.append(DeviceGroup(queue=queue, devices=devices, workers=workers,
                                      reason=f"{node.host} ({node.gpu_type or 'GPU'}): {reason}"))
            # Ray packs fractional requests onto one card, so N actors of 1/N share a card.
            share = float(cards) if cards > 1 else (round(1.0 / workers, 4) if workers else 0.0)
            placement[queue] = Placement(node.id, share, node.host)
        if node.gpus % cards:
            notes.append(f"n{i} {node.host}: {node.gpus % cards} GPU(s) left unused: {cards} cards per worker")
    if not groups:
        raise PlanError("the Ray cluster has no node this plan can use")
    workers = tuple(WorkerSlot(id=f"{g.queue}_worker{k}", devices=g.devices, queue=g.queue)
                    for g in groups for k in range(g.workers))
    plan = Plan(groups=tuple(groups), workers=workers, queues=assign_queues(jobs, groups), notes=tuple(notes))
    return plan, placement
