"""The Ray executor: the same manifest on a Ray cluster, with the `run` command as the scheduler.

What this file owns:
  - joining a cluster: `execution.ray_address` (or `--ray-address`) `auto` joins the cluster this
    machine belongs to, HOST:PORT joins that one, none starts a local Ray on this machine;
  - the plan from the cluster's nodes (`plan_cluster`): per node, its GPUs (Ray's `GPU` resource) and
    their type (`accelerator_type:*`); workers per card come from a cached calibration profile of that
    GPU type (`.sweep/profiles/`, measured by a local `plan` on such a card), else the manifest's
    integer, else 1. Nothing is calibrated on remote nodes;
  - one long-lived actor per worker slot (`RayWorker`): it reserves its share of one node's GPUs
    (`num_gpus=1/N` for N workers per card, k for a worker spanning k cards; Ray sets
    CUDA_VISIBLE_DEVICES), loads the backend once and serves many jobs;
  - the driver (`_Driver`, a thread of `run`): it owns the job list and the sweep's ledger, exactly as
    local workers use it: it claims jobs for idle actors (grouped by reference), applies the same
    skip-if-done rule, records results and retries, watches each actor's progress (heartbeat and job
    timeouts), replaces dead or hung actors (up to `execution.max_restarts` in a row), and writes one
    log per worker under `logs/`;
  - outputs: on storage every node sees at the same path (the actor writes the mp4 and sidecar,
    atomically), or with `execution.ray_stream_outputs: true` sent back to the driver, which writes them
    into its own output folder the same atomic way.

The ledger stays on the driver's disk (SQLite does not belong on a network share); actors never touch
it. While a driver runs it holds a lock on `.sweep/ray-driver.lock`: a second `run` sees the sweep as
running and `stop` finds the driver there. A killed driver takes its actors with it (Ray ends a
driver's actors when it disconnects), and running the same command again resumes, as locally.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..ledger import LIVE_WORKER_STATES, Ledger
from ..planning import DeviceGroup, Plan, PlanError, WorkerSlot, WorkerSpec, assign_queues
from .base import Executor, ExecutorError

INSTALL_HINT = ("Ray is not installed here. Install it with `pip install 'wan-sweep[ray]'` (or "
                "`pip install ray`) on this machine and on every machine of the cluster, then run again.")
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # orchestrator/: shipped to every node
LOCK_NAME = "ray-driver.lock"
MOUNT_CHECK = "ray-mount-check"  # a token every node must read back when outputs go to shared storage
WORKERS_META = "ray_workers"  # ledger meta: the worker ids the last Ray driver registered
POLL_S = 0.2
IDLE_POLL_S = 1.0
BUSY_STATES = ("loading", "idle", "busy")  # an actor that is placed on a node
ENDED_STATES = ("ended", "failed", "retired")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


# --------------------------------------------------------------------------------------------------
# The cluster and the plan


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
    try:
        from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager
        found = NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type(gpu_name)
        if found:
            return found
    except Exception:  # a private helper of Ray's: fall back to the same idea
        pass
    return gpu_name.removeprefix("NVIDIA ").strip().replace(" ", "-")


def cached_profiles(manifest) -> list:
    """Calibration profiles cached for this sweep (any GPU); unreadable or old ones are skipped."""
    from ..sizing import Profile
    folder = manifest.output_dir / ".sweep" / "profiles"
    profiles = []
    for file in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            profiles.append(Profile.from_json(file.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            continue
    return profiles


def _profile_for(profiles: list, manifest, gpu_type: str | None, cards: int):
    """A profile of these settings measured on this GPU type with this many cards per worker."""
    from ..sizing import profile_key
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
    from ..backends import backend_class
    from ..sizing import decide_workers
    res = manifest.resources
    requested = res.workers_per_gpu
    if not backend_class(manifest.model.backend).measured_sizing:
        workers = requested if isinstance(requested, int) else 1
        return workers, (f"workers_per_gpu: {workers} (from the manifest)" if isinstance(requested, int)
                         else "workers_per_gpu: auto: 1 worker (this backend is not sized)")
    profile = _profile_for(profiles, manifest, node.gpu_type, cards)
    if profile is None:
        if isinstance(requested, int):
            return requested, f"workers_per_gpu: {requested} (from the manifest)"
        return 1, (f"workers_per_gpu: auto without a calibration profile for {node.gpu_type or 'this GPU'} "
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
    from ..backends import backend_class
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


# --------------------------------------------------------------------------------------------------
# The driver lock


def driver_holding(sweep) -> dict | None:
    """Who drives this sweep on Ray now ({pid, host, address, started}), or None when nobody does."""
    import fcntl
    path = sweep.state_dir / LOCK_NAME
    if not path.exists():
        return None
    with open(path, "r+", encoding="utf-8") as stream:
        try:
            fcntl.flock(stream, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return json.loads(stream.read() or "{}")
            except ValueError:
                return {}
        fcntl.flock(stream, fcntl.LOCK_UN)
    return None


class _DriverLock:
    """Held for the lifetime of a driver; the kernel lets go of it when the driver dies, however."""

    def __init__(self, sweep, address: str | None):
        import fcntl
        path = sweep.state_dir / LOCK_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        self.stream = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(self.stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.stream.seek(0)
            holder = self.stream.read()
            self.stream.close()
            raise ExecutorError(f"another `run` already drives this sweep on Ray ({holder.strip() or '?'}); "
                                "adding workers to it is not supported: `stop` it and run again") from None
        self.stream.seek(0)
        self.stream.truncate()
        self.stream.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                      "address": address, "started": time.time()}))
        self.stream.flush()

    def release(self) -> None:
        import fcntl
        if not self.stream.closed:
            fcntl.flock(self.stream, fcntl.LOCK_UN)
            self.stream.close()


# --------------------------------------------------------------------------------------------------
# The actor


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
        from ..backends import backend_class
        from ..manifest import GenerationConfig, ModelConfig
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
        from ..backends import OutOfMemory
        from ..jobs import Job
        from ..worker import sidecar_record
        job = Job.from_dict(job_data)
        started = time.monotonic()
        try:
            self.backend.attempt = attempt
            result = self.backend.generate(job, self._progress)
            generate_s = time.monotonic() - started
            record = sidecar_record(self.spec, job, attempt, self.backend, generate_s, self.gpu_names)
            record["ray"] = {k: self.placement.get(k) for k in ("node_id", "ip", "gpu_ids")}
            answer = {"status": "done", "generate_seconds": generate_s}
            if self.stream:
                answer.update(self._encode_here(job, result, record))
            else:
                self._write_shared(job, result, record)
            answer["seconds"] = time.monotonic() - started
            return answer
        except OutOfMemory as exc:
            return {"status": "oom", "error": f"out of memory: {exc}"[:500]}
        except Exception as exc:
            last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            return {"status": "error", "error": f"{type(exc).__name__}: {last}"[:500],
                    "traceback": traceback.format_exc()}

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()

    # ---------------------------------------------------------------- outputs
    def _frames_expected(self) -> int:
        return int(self.spec.generation["num_frames"])

    def _write_shared(self, job, result, record: dict) -> None:
        from ..outputs import adopt_mp4, write_mp4
        if isinstance(result, (str, os.PathLike)):  # the backend's program wrote the mp4 itself
            adopt_mp4(result, job.output, expected_frames=self._frames_expected(), sidecar=record,
                      owner=self.spec.worker)
        else:
            write_mp4(result, job.output, int(self.spec.generation["fps"]),
                      expected_frames=self._frames_expected(), sidecar=record, owner=self.spec.worker)

    def _encode_here(self, job, result, record: dict) -> dict:
        """Encode and check the mp4 on this node; the driver gets its bytes and the sidecar."""
        from ..outputs import adopt_mp4, read_sidecar, write_mp4
        folder = Path(tempfile.mkdtemp(prefix="wan-sweep-"))
        try:
            target = folder / "video.mp4"
            if isinstance(result, (str, os.PathLike)):
                raw = folder / "raw.mp4"
                shutil.move(str(result), raw)
                adopt_mp4(raw, target, expected_frames=self._frames_expected(), sidecar=record)
            else:
                write_mp4(result, target, int(self.spec.generation["fps"]),
                          expected_frames=self._frames_expected(), sidecar=record)
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
        from ..gpus import discover
        wanted = {str(g) for g in gpu_ids}
        return [g.name for g in discover(visible=None) if str(g.index) in wanted or g.uuid in wanted]
    except Exception:
        return []


_REMOTE_CLASS = None


def _remote_worker_class():
    global _REMOTE_CLASS
    if _REMOTE_CLASS is None:
        import ray
        _REMOTE_CLASS = ray.remote(RayWorker)
    return _REMOTE_CLASS


# --------------------------------------------------------------------------------------------------
# The driver


@dataclass
class _Slot:
    spec: WorkerSpec
    placement: Placement | None
    log: logging.Logger
    actor: object = None
    generation: int = 0  # which actor of this slot; answers from an earlier one are ignored
    state: str = "starting"  # starting | loading | idle | busy | waiting (to restart) | ended | failed
    where: dict = field(default_factory=dict)
    claim: object = None
    group: str | None = None
    dispatched: float = 0.0
    last_sign: float = 0.0
    signs: int = -1
    probing: bool = False
    last_probe: float = 0.0
    next_claim: float = 0.0
    crashes: int = 0  # in a row without a finished job
    ooms: int = 0  # out-of-memory failures in a row
    restarts: int = 0
    restart_at: float = 0.0

    @property
    def id(self) -> str:
        return self.spec.worker


def _short(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def _logger(name: str, file: str) -> logging.Logger:
    from ..terminal import PrintableFormatter
    log = logging.getLogger(f"wan_sweep.ray.{file}")  # one per log file, even across runs in one process
    _close_logger(log)
    log.setLevel(logging.INFO)
    log.propagate = False
    Path(file).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(file, encoding="utf-8")
    handler.setFormatter(PrintableFormatter("%(asctime)s %(levelname)s [" + name + "] %(message)s",
                                            "%Y-%m-%d %H:%M:%S"))
    log.addHandler(handler)
    return log


def _close_logger(log: logging.Logger) -> None:
    for handler in list(log.handlers):
        handler.close()
        log.removeHandler(handler)


class _Driver(threading.Thread):
    """Hands jobs to idle actors and records what they do, until no work is left or it is stopped."""

    def __init__(self, sweep, specs: list[WorkerSpec], placement: dict[str, Placement], stream: bool,
                 mount_token: str | None):
        super().__init__(name="ray-driver", daemon=True)
        self.sweep = sweep
        execution = sweep.manifest.execution
        self.stream = stream
        self.mount_token = mount_token
        self.frames = sweep.manifest.generation.num_frames
        self.heartbeat_timeout = float(execution.heartbeat_timeout_s)
        self.job_timeout = float(execution.job_timeout_s)
        self.max_restarts = int(execution.max_restarts)
        self.beat_every = max(0.2, min(5.0, self.heartbeat_timeout / 5))
        # An actor nobody can place (no free GPU left after a node died) must not hold the sweep forever.
        self.placement_timeout = max(60.0, self.heartbeat_timeout)
        self.log = _logger("driver", str(sweep.logs / "ray_driver.log"))
        self.slots = [_Slot(spec, placement.get(spec.queue), _logger(spec.worker, spec.log)) for spec in specs]
        self.refs: dict = {}  # ObjectRef -> (slot, generation, kind)
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.ledger: Ledger | None = None

    # ---------------------------------------------------------------- thread
    def run(self) -> None:
        try:
            self.ledger = Ledger(self.sweep.ledger_path)
            self.ledger.set_meta(WORKERS_META, json.dumps([s.id for s in self.slots]))
            self.log.info("driving %d worker(s) (%s): %s", len(self.slots),
                          "outputs streamed back here" if self.stream else "outputs on shared storage",
                          ", ".join(f"{s.id} on {s.placement.host if s.placement else '?'}" for s in self.slots))
            for slot in self.slots:
                self.ledger.register_worker(slot.id, slot.spec.devices, state="starting")
                self._spawn(slot, replacement=False)
            self._loop()
        except BaseException as exc:  # recorded; `wait` reports it, `_finish` still cleans up
            self.error = exc
            self.log.error("driver failed:\n%s", traceback.format_exc())
        finally:
            self._finish()

    def alive_slots(self) -> int:
        return sum(s.state not in ENDED_STATES for s in self.slots)

    def _loop(self) -> None:
        last_beat = last_stop_check = 0.0
        placed_at = time.monotonic()
        while True:
            self._collect()
            now = time.monotonic()
            if self.stop_event.is_set():
                self.log.info("stopping: releasing running jobs")
                return
            if now - last_stop_check >= 1.0:
                last_stop_check = now
                if self.ledger.stop_requested():
                    self.log.info("stop requested (`stop`): releasing running jobs")
                    return
            self._watch(now)
            if now - last_beat >= self.beat_every:
                last_beat = now
                self._beat(now)
            self._restart_due(now)
            self._dispatch(now)
            if self.ledger.unfinished() == 0:
                self.log.info("no work left")
                return
            if not self.alive_slots():
                self.log.error("every worker failed: stopping with jobs left")
                return
            if any(s.state in BUSY_STATES or s.state == "waiting" for s in self.slots):
                placed_at = now
            elif now - placed_at > self.placement_timeout:
                self.log.error("no actor could be placed for %.0fs (no free GPU left in the cluster?): "
                               "stopping with jobs left", self.placement_timeout)
                for slot in self.slots:
                    if slot.state not in ENDED_STATES:
                        self._give_up(slot, f"could not be placed on the Ray cluster for "
                                            f"{self.placement_timeout:.0f}s")
                return

    def _finish(self) -> None:
        for slot in self.slots:
            self._drop(slot)  # first the actor, so nothing it was writing can land after the release
            if slot.claim is not None and self.ledger is not None:
                try:
                    self.ledger.release(slot.claim.job.id, slot.id)
                    slot.log.info("released %s (not finished)", slot.claim.job.key)
                except Exception:
                    self.log.warning("could not release %s:\n%s", slot.claim.job.key, traceback.format_exc())
                slot.claim = None
            if slot.state not in ("failed", "retired"):
                slot.state = "ended"
                if self.ledger is not None:
                    try:
                        self.ledger.set_worker(slot.id, state="exited", job=None)
                    except Exception:
                        pass
            _close_logger(slot.log)
        self.log.info("driver ended")
        _close_logger(self.log)
        if self.ledger is not None:
            self.ledger.close()

    # ---------------------------------------------------------------- actors
    def _spawn(self, slot: _Slot, replacement: bool) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        share = slot.placement.num_gpus if slot.placement else 0.0
        options = {"num_gpus": share, "num_cpus": 0 if share else 1, "max_concurrency": 2,
                   "max_restarts": 0, "max_task_retries": 0}
        if slot.placement is not None:
            # Its planned node first (sizing was decided for that node's GPU type); a replacement may
            # go elsewhere when that node is gone.
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(slot.placement.node, soft=replacement)
        slot.generation += 1
        slot.state, slot.where, slot.signs, slot.probing = "starting", {}, -1, False
        slot.actor = _remote_worker_class().options(**options).remote(asdict(slot.spec), self.stream,
                                                                       self.mount_token)
        self._track(slot.actor.where.remote(), slot, "where")
        self._track(slot.actor.load.remote(), slot, "load")
        slot.log.info("%s actor (%s GPU) for %s", "replacement" if replacement else "starting", share or 0,
                      slot.placement.host if slot.placement else "any node")

    def _track(self, ref, slot: _Slot, kind: str) -> None:
        self.refs[ref] = (slot, slot.generation, kind)

    def _drop(self, slot: _Slot) -> None:
        """Give up on the slot's actor: forget its pending answers and end it."""
        import ray
        slot.generation += 1
        for ref in [r for r, (s, _, _) in self.refs.items() if s is slot]:
            del self.refs[ref]
        if slot.actor is not None:
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:
                pass
            slot.actor = None

    def _collect(self) -> None:
        import ray
        from ray.exceptions import RayTaskError
        if not self.refs:
            time.sleep(POLL_S)
            return
        ready, _ = ray.wait(list(self.refs), num_returns=len(self.refs), timeout=POLL_S)
        for ref in ready:
            entry = self.refs.pop(ref, None)
            if entry is None:
                continue
            slot, generation, kind = entry
            if generation != slot.generation:
                continue  # an answer from an actor given up on: never recorded, never written
            try:
                value = ray.get(ref)
            except RayTaskError as exc:
                if kind == "load":
                    self._actor_failed(slot, f"loading the backend failed: {_short(exc)}")
                else:
                    self._actor_lost(slot, exc)
                continue
            except Exception as exc:  # the actor died, its node went away, it could not be placed
                self._actor_lost(slot, exc)
                continue
            getattr(self, f"_on_{kind}")(slot, value)

    def _on_where(self, slot: _Slot, where: dict) -> None:
        slot.where = where
        if slot.state == "starting":
            slot.state = "loading"
            self.ledger.set_worker(slot.id, host=where.get("host"), state="loading", message=None)
        slot.log.info("placed on %s (%s), pid %s, GPU ids %s, CUDA_VISIBLE_DEVICES=%s", where.get("host"),
                      where.get("ip"), where.get("pid"), where.get("gpu_ids"), where.get("cuda_visible_devices"))

    def _on_load(self, slot: _Slot, info: dict) -> None:
        if info.get("problem"):
            slot.log.error(info["problem"])
            self._give_up(slot, info["problem"])
            return
        slot.state, slot.next_claim, slot.group = "idle", 0.0, None
        self.ledger.set_worker(slot.id, state="idle", job=None)
        slot.log.info("model loaded in %.1fs%s", info.get("seconds", 0.0),
                      f" on {', '.join(info['gpu_names'])}" if info.get("gpu_names") else "")

    def _on_progress(self, slot: _Slot, signs: int) -> None:
        slot.probing = False
        if signs != slot.signs:
            slot.signs, slot.last_sign = signs, time.monotonic()

    def _on_run(self, slot: _Slot, answer: dict) -> None:
        claim, slot.claim = slot.claim, None
        slot.state, slot.next_claim = "idle", 0.0
        job = claim.job
        status = answer.get("status")
        if status == "done":
            if not self._owns(job.id, slot.id):
                # The claim expired and moved on meanwhile: whoever holds it now records the job.
                slot.log.warning("result of %s discarded: the job is no longer this worker's", job.key)
                return
            seconds = float(answer.get("seconds", 0.0))
            if self.stream:
                started = time.monotonic()
                try:
                    self._adopt(job, answer)
                except Exception as exc:
                    slot.log.error("could not write %s:\n%s", job.key, traceback.format_exc())
                    state = self.ledger.fail(job.id, slot.id, f"writing the video failed: {exc}"[:500])
                    slot.log.info("job %s is now %s", job.key, state)
                    return
                seconds += time.monotonic() - started
            self.ledger.complete(job.id, slot.id, seconds)
            slot.crashes = slot.ooms = 0
            slot.log.info("done %s in %.1fs (generate %.1fs)", job.key, seconds, answer.get("generate_seconds", 0.0))
            return
        outcome = "oom" if status == "oom" else "error"
        if answer.get("traceback"):
            slot.log.error("job %s failed:\n%s", job.key, answer["traceback"])
        state = self.ledger.fail(job.id, slot.id, answer.get("error") or "failed", outcome=outcome)
        slot.log.info("job %s: %s; it is now %s", job.key, answer.get("error"), state)
        slot.ooms = slot.ooms + 1 if outcome == "oom" else 0
        if slot.ooms >= int(slot.spec.execution.get("ooms_before_retire", 2)):
            self._retire_if_shared(slot)

    def _retire_if_shared(self, slot: _Slot) -> None:
        """Out of memory again and again on a card it shares: the card runs one worker fewer."""
        node, cards = slot.where.get("node_id"), set(slot.where.get("gpu_ids") or ())
        mates = [s for s in self.slots if s is not slot and s.state not in ENDED_STATES
                 and s.where.get("node_id") == node and cards & set(s.where.get("gpu_ids") or ())]
        if not cards or not mates:
            return
        message = (f"retired after {slot.ooms} out-of-memory errors in a row; its card on {slot.where.get('host')} "
                   f"now runs {len(mates)} worker(s) for the rest of the sweep")
        self._drop(slot)
        slot.state = "retired"
        self.ledger.set_worker(slot.id, state="retired", job=None, message=message)
        slot.log.error(message)

    def _adopt(self, job, answer: dict) -> None:
        """Write a streamed mp4 into the driver's output folder: temp file beside it → check → rename."""
        from ..outputs import adopt_mp4, temp_path_beside
        temp = temp_path_beside(job.output)
        try:
            with open(temp, "wb") as stream:
                stream.write(answer["mp4"])
        except BaseException:
            os.unlink(temp)
            raise
        adopt_mp4(temp, job.output, expected_frames=self.frames, sidecar=answer.get("sidecar") or {})

    def _owns(self, job_id: str, worker: str) -> bool:
        return self.ledger.holds(job_id, worker)

    def _actor_lost(self, slot: _Slot, exc: BaseException) -> None:
        reason = _short(exc)
        node = slot.where.get("node_id") or (slot.placement.node if slot.placement else None)
        if node is not None and not _node_alive(node):
            reason = f"its node {slot.where.get('host') or node[:8]} left the cluster ({reason})"
            if slot.claim is not None:
                # The node's fault, not the job's: it goes back without using an attempt.
                job = slot.claim.job
                self.ledger.release(job.id, slot.id)
                slot.log.warning("%s: %s goes back to the queue (no attempt used)", reason, job.key)
                slot.claim = None
        self._actor_failed(slot, f"the Ray actor died: {reason}")

    def _actor_failed(self, slot: _Slot, reason: str) -> None:
        if slot.claim is not None:
            job = slot.claim.job
            state = self.ledger.fail(job.id, slot.id, reason[:500], outcome="crash")
            slot.log.error("%s while running %s; the job is now %s", reason, job.key, state)
            slot.claim = None
        else:
            slot.log.error(reason)
        self._drop(slot)
        self._restart_later(slot, reason)

    def _restart_later(self, slot: _Slot, reason: str) -> None:
        slot.crashes += 1
        if slot.crashes > self.max_restarts:
            self._give_up(slot, f"gave up after {slot.crashes} failures in a row without a finished job "
                                f"(execution.max_restarts: {self.max_restarts}); last: {reason}")
            return
        delay = min(60.0, 2.0 ** (slot.crashes - 1))
        slot.restarts += 1
        slot.state, slot.restart_at = "waiting", time.monotonic() + delay
        self.ledger.set_worker(slot.id, state="starting", job=None, restarts=slot.restarts, message=reason[:500])
        slot.log.info("replacing the actor in %.0fs", delay)

    def _give_up(self, slot: _Slot, message: str) -> None:
        if slot.claim is not None:
            self.ledger.release(slot.claim.job.id, slot.id)
            slot.claim = None
        self._drop(slot)
        slot.state = "failed"
        self.ledger.set_worker(slot.id, state="failed", job=None, restarts=slot.restarts, message=message[:500])
        slot.log.error("worker failed for good: %s", message)

    def _restart_due(self, now: float) -> None:
        for slot in self.slots:
            if slot.state == "waiting" and now >= slot.restart_at:
                self._spawn(slot, replacement=True)

    # ---------------------------------------------------------------- liveness
    def _watch(self, now: float) -> None:
        for slot in self.slots:
            if slot.state != "busy":
                continue
            job = slot.claim.job
            if now - slot.dispatched > self.job_timeout:
                self._abandon(slot, "timeout", f"timed out after {self.job_timeout:.0f}s")
            elif now - slot.last_sign > self.heartbeat_timeout:
                self._abandon(slot, "lost", f"worker {slot.id} showed no progress for more than "
                                            f"{self.heartbeat_timeout:.0f}s on {job.key}")
            elif not slot.probing and now - slot.last_probe >= self.beat_every:
                slot.probing, slot.last_probe = True, now
                self._track(slot.actor.progress.remote(), slot, "progress")

    def _abandon(self, slot: _Slot, outcome: str, reason: str) -> None:
        """A hung or overlong job: fail its attempt, end the actor, start a fresh one."""
        job = slot.claim.job
        self._drop(slot)
        state = self.ledger.fail(job.id, slot.id, reason, outcome=outcome)
        slot.claim = None
        slot.log.error("%s: actor ended; job %s is now %s", reason, job.key, state)
        self._restart_later(slot, reason)

    def _beat(self, now: float) -> None:
        for slot in self.slots:
            if slot.state not in BUSY_STATES:
                continue
            job_id = None
            if slot.state == "busy" and now - slot.last_sign <= self.heartbeat_timeout:
                job_id = slot.claim.job.id
            self.ledger.heartbeat(slot.id, job_id)

    # ---------------------------------------------------------------- work
    def _dispatch(self, now: float) -> None:
        from ..worker import settle_if_made
        for slot in self.slots:
            if slot.state != "idle" or now < slot.next_claim:
                continue
            while True:
                claim = self.ledger.claim(slot.id, slot.spec.queue, prefer_group=slot.group)
                if claim is None:
                    if self.ledger.unfinished() == 0:
                        break
                    if slot.group is not None:  # first idle poll after work: say so once
                        self.ledger.set_worker(slot.id, state="idle", job=None)
                        slot.group = None
                    slot.next_claim = now + IDLE_POLL_S  # jobs in flight may come back for a retry
                    break
                job = claim.job
                slot.group = job.group
                if settle_if_made(self.ledger, job, slot.id, self.frames, slot.log):
                    continue
                slot.claim, slot.state = claim, "busy"
                slot.dispatched = slot.last_sign = now
                slot.last_probe = now
                self._track(slot.actor.run.remote(job.to_dict(), claim.attempt), slot, "run")
                slot.log.info("job %s (attempt %d): %s", job.key, claim.attempt, job.prompt[:80])
                break


def _node_alive(node_id: str) -> bool:
    import ray
    try:
        return any(n.get("NodeID") == node_id and n.get("Alive") for n in ray.nodes())
    except Exception:
        return True  # cannot tell: treat the actor's death as its own


# --------------------------------------------------------------------------------------------------
# The executor


class RayExecutor(Executor):
    name = "ray"
    detaches = False  # the driver is this process: `run` stays, shows progress, Ctrl-C stops cleanly
    supervised = False  # actors, not supervisor processes: the driver lock shows the sweep running

    def __init__(self, sweep):
        super().__init__(sweep)
        execution = sweep.manifest.execution
        self.address = execution.ray_address
        self.stream = bool(execution.ray_stream_outputs)
        self.placement: dict[str, Placement] = {}
        self.nodes: list[RayNode] = []
        self._driver: _Driver | None = None
        self._lock: _DriverLock | None = None
        self._connected_here = False
        self._forget_dead_driver()

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            import ray  # noqa: F401
        except ImportError:
            return INSTALL_HINT
        return None

    @classmethod
    def drives(cls, sweep) -> bool:
        """Whether a Ray driver runs this sweep now (works without Ray installed)."""
        return driver_holding(sweep) is not None

    def _forget_dead_driver(self) -> None:
        """Workers of a driver that died (killed, machine rebooted) are not alive, wherever they ran.

        `run` counts live workers right after making its executor, and trusts the ledger for workers
        of other hosts: without this, a killed driver's remote workers would look alive forever.
        """
        if not self.sweep.has_ledger() or driver_holding(self.sweep) is not None:
            return
        ledger = self.sweep.ledger()
        try:
            ours = set(json.loads(ledger.get_meta(WORKERS_META) or "[]"))
            for worker in ledger.workers():
                if worker["id"] in ours and worker["state"] in LIVE_WORKER_STATES:
                    ledger.set_worker(worker["id"], state="exited", job=None, message="its Ray driver ended")
        finally:
            ledger.close()

    # ---------------------------------------------------------------- cluster
    def connect(self) -> None:
        import ray
        if ray.is_initialized():
            return
        address = self.address or "local"
        options = dict(namespace="wan-sweep", log_to_driver=False, logging_level=logging.WARNING,
                       runtime_env={"py_modules": [str(PACKAGE_DIR)], "excludes": ["__pycache__"]})
        host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
        if address == "local":
            options["include_dashboard"] = False
        elif host in LOOPBACK:
            # A cluster joined through loopback: this driver must say 127.0.0.1 too, not the machine's
            # outward address, or the nodes cannot reach it back.
            options["_node_ip_address"] = "127.0.0.1"
        _check_reachable(address)
        try:
            ray.init(address=address, **options)
        except ConnectionError as exc:
            raise ExecutorError(f"could not join the Ray cluster at {address!r}: {exc} (start it with "
                                "`ray start --head` on one machine and `ray start --address=HEAD:6379` on the "
                                "others, or leave ray_address out to start a local Ray)") from None
        except (RuntimeError, ValueError) as exc:
            raise ExecutorError(f"could not start or join Ray ({address}): {exc}") from None
        self._connected_here = True

    def make_plan(self, jobs, cpu_slots: int | None = None, recalibrate: bool = False) -> Plan:
        """The plan from the cluster's nodes and their GPU types (never this machine's NVML)."""
        self.connect()
        self.nodes = cluster_nodes()
        plan, self.placement = plan_cluster(self.sweep.manifest, jobs, self.nodes, cpu_slots)
        if recalibrate:
            plan = replace(plan, notes=plan.notes + ("--recalibrate does not apply on Ray: calibrate with a "
                                                     "local `plan --recalibrate` on a node of that GPU type",))
        if self.stream:
            plan = replace(plan, notes=plan.notes + ("ray_stream_outputs: every mp4 comes back to this "
                                                     f"machine's {self.sweep.root}",))
        else:
            plan = replace(plan, notes=plan.notes + (f"outputs go to {self.sweep.root} on every node: it must "
                                                     "be shared storage mounted at that path",))
        return plan

    # ---------------------------------------------------------------- Executor
    def start(self, specs: list[tuple[WorkerSpec, Path]]) -> list[str]:
        if not self.placement:
            raise ExecutorError("the Ray executor starts the workers of its own plan (make_plan) only")
        self._lock = _DriverLock(self.sweep, self.address)
        try:
            token = None
            if not self.stream:
                token = secrets.token_hex(8)
                marker = self.sweep.state_dir / MOUNT_CHECK
                marker.write_text(token, encoding="utf-8")
            self._driver = _Driver(self.sweep, [spec for spec, _ in specs], self.placement, self.stream, token)
            self._driver.start()
        except BaseException:
            self._lock.release()
            raise
        return [spec.worker for spec, _ in specs]

    def attach_hints(self, names: list[str]) -> list[str]:
        if not names:
            return []
        gpus = sum(n.gpus for n in self.nodes)
        return [f"ray: {len(names)} actors on {len(self.nodes)} node(s) ({gpus} GPUs); this command is the "
                f"driver: keep it running (Ctrl-C stops the actors, the same command resumes)",
                f"actor logs: {self.sweep.logs}/<worker>.log, driver log: {self.sweep.logs}/ray_driver.log"]

    def running(self) -> int:
        if self._driver is not None:
            return self._driver.alive_slots() if self._driver.is_alive() else 0
        if driver_holding(self.sweep) is None:
            return 0
        # Another process drives the sweep: its workers, at least one.
        ledger = self.sweep.ledger()
        try:
            return max(1, sum(w["state"] in LIVE_WORKER_STATES for w in ledger.workers()))
        finally:
            ledger.close()

    def wait(self, poll_s: float = 1.0) -> None:
        if self._driver is None:
            return
        while self._driver.is_alive():
            self._driver.join(poll_s)
        self._close()
        if self._driver.error is not None:
            print(f"error: the Ray driver stopped: {_short(self._driver.error)} "
                  f"(details in {self.sweep.logs / 'ray_driver.log'})", file=sys.stderr)

    def _close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._connected_here:
            import ray
            ray.shutdown()
            self._connected_here = False

    def stop(self, now: bool = False, timeout_s: float = 30.0) -> int:
        """Stop the sweep's actors: from the driver itself (Ctrl-C), or from `stop` in another process.

        Another process asks through the ledger (the driver releases the running jobs, ends its actors
        and exits); `now`, or a driver that does not finish within `timeout_s`, is killed, and its
        actors end with it.
        """
        if self._driver is not None:
            self._driver.stop_event.set()
            return len(self._driver.slots)
        ledger = self.sweep.ledger()
        try:
            ledger.request_stop()
            holder = driver_holding(self.sweep)
            pid = holder.get("pid") if holder and holder.get("host") == socket.gethostname() else None
            signalled = 0
            if pid and now:
                signalled += _kill(pid)
            deadline = time.monotonic() + timeout_s
            while driver_holding(self.sweep) is not None and time.monotonic() < deadline:
                time.sleep(0.2)
            if pid and driver_holding(self.sweep) is not None:
                signalled += _kill(pid)
            ours = set(json.loads(ledger.get_meta(WORKERS_META) or "[]"))
            for worker in ledger.workers():  # what a killed driver left running
                if worker["id"] in ours:  # back without using an attempt, as from any stopped worker
                    ledger.release_worker(worker["id"], "sweep stopped")
            return signalled
        finally:
            ledger.close()


def _check_reachable(address: str) -> None:
    """Fail at once where nothing listens at HOST:PORT: Ray itself keeps retrying for minutes."""
    if address in ("auto", "local") or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=10):
            pass
    except ValueError:
        raise ExecutorError(f"ray_address {address!r} is not HOST:PORT (e.g. 10.0.0.1:6379) or `auto`") from None
    except OSError as exc:
        raise ExecutorError(f"nothing answers at the Ray address {address} ({exc}): is `ray start --head` "
                            "running there, and is the port open?") from None


def _kill(pid: int) -> int:
    try:
        os.kill(pid, signal.SIGKILL)
        return 1
    except ProcessLookupError:
        return 0
