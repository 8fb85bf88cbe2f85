"""The Ray driver: a thread of `run` that owns the job list and the sweep's ledger, exactly as local
workers use it (through a `LedgerJobSource` per slot). It claims jobs for idle actors (grouped by
reference), applies the same skip-if-done rule, records results and retries, watches each actor's
progress (heartbeat and job timeouts), replaces dead or hung actors (up to `execution.max_restarts`
in a row, with the job loop's `restart_delay`), and writes one log per worker under `logs/`.

The ledger stays on the driver's disk (SQLite does not belong on a network share); actors never
touch it. A killed driver takes its actors with it (Ray ends a driver's actors when it disconnects).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...job_loop import IDLE_POLL_S, heartbeat_interval, restart_delay, retires
from ...ledger import Ledger
from ...planning import WorkerSpec
from .actor import remote_worker_class
from .cluster import Placement

WORKERS_META = "ray_workers"  # ledger meta: the worker ids the last Ray driver registered
POLL_S = 0.2
BUSY_STATES = ("loading", "idle", "busy")  # an actor that is placed on a node
ENDED_STATES = ("ended", "failed", "retired")


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


def short_error(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def _logger(name: str, file: str) -> logging.Logger:
    from ...terminal import PrintableFormatter
    log = logging.getLogger(f"wan_sweep.ray.{file}")  # one per log file, even across runs in one process
    close_logger(log)
    log.setLevel(logging.INFO)
    log.propagate = False
    Path(file).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(file, encoding="utf-8")
    handler.setFormatter(PrintableFormatter("%(asctime)s %(levelname)s [" + name + "] %(message)s",
                                            "%Y-%m-%d %H:%M:%S"))
    log.addHandler(handler)
    return log


def close_logger(log: logging.Logger) -> None:
    for handler in list(log.handlers):
        handler.close()
        log.removeHandler(handler)


class Driver(threading.Thread):
    """Hands jobs to idle actors and records what they do, until no work is left or it is stopped."""

    def __init__(self, sweep, specs: list[WorkerSpec], placement: dict[str, Placement], stream: bool,
                 mount_token: str | None):
        super().__init__(name="ray-driver", daemon=True)
        self.sweep = sweep
        execution = sweep.manifest.execution
        self.stream = stream
        self.mount_token = mount_token
        self.heartbeat_timeout = float(execution.heartbeat_timeout_s)
        self.job_timeout = float(execution.job_timeout_s)
        self.max_restarts = int(execution.max_restarts)
        self.beat_every = heartbeat_interval(self.heartbeat_timeout)
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
            close_logger(slot.log)
        self.log.info("driver ended")
        close_logger(self.log)
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
        slot.actor = remote_worker_class().options(**options).remote(asdict(slot.spec), self.stream,
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
                    self._actor_failed(slot, f"loading the backend failed: {short_error(exc)}")
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
        if retires(slot.ooms, slot.spec.execution):
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
        from ...outputs import adopt_mp4, temp_path_beside
        temp = temp_path_beside(job.output)
        try:
            with open(temp, "wb") as stream:
                stream.write(answer["mp4"])
        except BaseException:
            os.unlink(temp)
            raise
        adopt_mp4(temp, job.output, expected_frames=job.generation(self.sweep.manifest.generation).num_frames,
                  sidecar=answer.get("sidecar") or {})

    def _owns(self, job_id: str, worker: str) -> bool:
        return self.ledger.holds(job_id, worker)

    def _actor_lost(self, slot: _Slot, exc: BaseException) -> None:
        reason = short_error(exc)
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
        delay = restart_delay(slot.crashes)
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
        from ...job_loop import LedgerJobSource, settle_if_made
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
                if settle_if_made(LedgerJobSource(self.ledger, slot.spec), job,
                                  job.generation(self.sweep.manifest.generation).num_frames, slot.log):
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
