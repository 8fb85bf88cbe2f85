"""The Ray driver: a thread of `run` that starts the ledger actor and one actor per worker slot and
supervises them as `orchestrator.supervisor` does a worker process: the same policy (`supervision.Policy`)
and crash rule (`supervisor.after_death`). It serves no call: the actors use the ledger actor themselves.

It kills an actor whose heartbeat (in the ledger) stopped. An actor that died: its claims go back by the
ledger's dead-claims rule (those of a node that left the cluster without using an attempt), then a new
actor (a new lifetime) starts after a pause, or the worker is given up on. A killed driver takes its
actors with it (Ray ends a driver's actors when it disconnects).
"""
from __future__ import annotations

import contextlib
import json
import threading
import time
import traceback
from dataclasses import dataclass

from ...outputs import remove_partials
from ...planning import WorkerSpec
from ...supervision import FAILED, STARTING, GiveUp, Policy, summarise
from ...supervisor import after_death
from ...terminal import printable
from . import ledger_actor
from .actor import RayWorker
from .cluster import Placement

WORKERS_META = "ray_workers"  # ledger meta: the worker ids the last Ray driver registered
POLL_S = 0.25
KILL_WAIT_S = 10.0  # for a killed actor to be gone before its claims go back


@dataclass
class _Slot:
    spec: WorkerSpec
    placement: Placement | None
    actor: object = None
    run: object = None  # the actor's `run` call: ready when the actor ends, however it ends
    ended: str | None = None  # EXITED, FAILED or RETIRED: no actor again
    restart_at: float | None = None  # when its next actor starts
    crashes: int = 0  # in a row (`Policy.after_crash`)
    done_before: int = 0  # its jobs done when its actor started


class Driver(threading.Thread):
    """Starts the actors and watches them until every one has ended, a stop, or none can be placed."""

    def __init__(self, sweep, specs: list[WorkerSpec], placement: dict[str, Placement], stream: bool,
                 mount_token: str | None):
        super().__init__(name="ray-driver", daemon=True)
        self.sweep, self.stream, self.mount_token = sweep, stream, mount_token
        self.policy = Policy.of(sweep.manifest.execution)
        # An actor nobody can place (no free GPU left after a node died) must not hold the sweep forever.
        self.placement_timeout = max(60.0, self.policy.heartbeat_timeout_s)
        self.log_path = sweep.logs / "ray_driver.log"
        self.slots = [_Slot(spec, placement.get(spec.queue)) for spec in specs]
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.ledger_actor = self.ledger = None

    def say(self, slot: _Slot | None, level: str, message: str) -> None:
        """A line in the driver's log, and in the worker's own log when it is about one."""
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {level} [{slot.spec.worker if slot else 'driver'}] {message}"
        for path in [self.log_path] + ([slot.spec.log] if slot else []):
            ledger_actor.LedgerActor.append_log(path, printable(line))

    def run(self) -> None:
        import ray
        try:
            self.worker_class = ray.remote(RayWorker)
            self.ledger_actor = ledger_actor.start(self.sweep.ledger_path)
            self.ledger = ledger_actor.Remote(self.ledger_actor)
            self.ledger.set_meta(WORKERS_META, json.dumps([s.spec.worker for s in self.slots]))
            self.say(None, "INFO", f"driving {len(self.slots)} worker(s), outputs "
                                   f"{'streamed back here' if self.stream else 'on shared storage'}")
            for slot in self.slots:
                self._spawn(slot)
            self._loop()
        except BaseException as exc:  # recorded; `wait` reports it, `_finish` still cleans up
            self.error = exc
            self.say(None, "ERROR", f"driver failed:\n{traceback.format_exc()}")
        finally:
            self._finish()

    def alive_slots(self) -> int:
        return sum(s.ended is None for s in self.slots)

    def _loop(self) -> None:
        import ray
        placed_at = time.monotonic()
        while self.alive_slots():
            runs = {s.run: s for s in self.slots if s.run is not None}
            for ref in ray.wait(list(runs), num_returns=len(runs), timeout=POLL_S)[0] if runs else ():
                self._ended(runs[ref])
            time.sleep(0 if runs else POLL_S)  # (`ray.wait` waited already)
            if self.stop_event.is_set() or self.ledger.stop_requested():
                return self.say(None, "INFO", "stop requested: releasing the running jobs")
            rows, left, now = {w.id: w for w in self.ledger.workers()}, self.ledger.unfinished(), time.monotonic()
            placed = [s for s in self.slots if s.run is not None and (row := rows.get(s.spec.worker))
                      and row.alive and row.state != STARTING]  # on a node and beating (loading, idle, running)
            for slot in placed:  # a hung actor: its heartbeat thread stopped beating (`Policy.hung`)
                age = time.time() - (rows[slot.spec.worker].heartbeat_at or time.time())
                if self.policy.hung(age):
                    self._crashed(slot, f"no progress for more than {self.policy.heartbeat_timeout_s:.0f}s "
                                        f"(no heartbeat for {age:.0f}s, hung?): killed the actor")
            for slot in self.slots:
                if slot.restart_at is not None and now >= slot.restart_at and left:
                    self._spawn(slot)
            if not left and not placed:
                return self.say(None, "INFO", "no work left")
            if placed or any(s.restart_at is not None for s in self.slots):
                placed_at = now
            elif now - placed_at > self.placement_timeout:
                why = f"could not be placed on the Ray cluster for {self.placement_timeout:.0f}s"
                self.say(None, "ERROR", f"no actor {why} (no free GPU left?): stopping with jobs left")
                for slot in [s for s in self.slots if s.ended is None]:
                    self._failed(slot, why)

    def _spawn(self, slot: _Slot) -> None:
        """A new actor, a new lifetime of the worker: on its planned node first (its sizing was decided for
        that node's GPU type); a replacement may go elsewhere when that node is gone."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        replacement, slot.restart_at = slot.restart_at is not None, None
        life = self.ledger.register_worker(slot.spec.worker, slot.spec.devices, state=STARTING)
        slot.done_before = self.ledger.worker(slot.spec.worker).jobs_done
        share = slot.placement.num_gpus if slot.placement else 0.0
        options = {"num_gpus": share, "num_cpus": 0 if share else 1, "max_restarts": 0, "max_task_retries": 0}
        if slot.placement is not None:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(slot.placement.node, soft=replacement)
        slot.actor = self.worker_class.options(**options).remote(slot.spec, life, self.ledger_actor, self.stream,
                                                                  self.mount_token)
        slot.run = slot.actor.run.remote()
        self.say(slot, "INFO", f"{'replacement' if replacement else 'starting'} actor ({share or 0} GPU) for "
                               f"{slot.placement.host if slot.placement else 'any node'}")

    def _ended(self, slot: _Slot) -> None:
        """Its actor ended: `run` returned (saying how the worker ended), raised, or the actor died."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError
        try:
            ended, message = ray.get(slot.run)
        except RayTaskError as exc:  # loading the model or the job loop failed
            return self._crashed(slot, f"the worker failed: {summarise(exc.cause or exc)}")
        except RayActorError as exc:  # a crash, its own end (a hung or overlong job), its node gone
            row = self.ledger.worker(slot.spec.worker)
            node = row.host.partition("/")[2] if row and row.host else ""  # its host: `hostname/node id`
            gone = bool(node) and not any(n["NodeID"].startswith(node) and n["Alive"] for n in ray.nodes())
            return self._crashed(slot, f"the Ray actor died: {summarise(exc)}", node_gone=gone)
        self._kill(slot)
        slot.ended = ended
        self.say(slot, "INFO", f"worker {ended}" + (f": {message}" if message else ""))

    def _crashed(self, slot: _Slot, reason: str, node_gone: bool = False) -> None:
        self._kill(slot)  # first the actor, so nothing it was writing can land after its claims went back
        if node_gone:  # the node's fault, not the jobs': back without using an attempt
            reason = f"its node left the cluster ({reason})"
            self.ledger.worker_exited(slot.spec.worker, reason)
            self.ledger.release_worker(slot.spec.worker, f"{reason}; no attempt used")
        if not self.stream:  # what it was writing into the shared folder, as a restarted worker removes it
            remove_partials(self.ledger.output_folders(), owner=slot.spec.worker)
        row = self.ledger.worker(slot.spec.worker)
        decision, lost, restarts = after_death(self.ledger, self.policy, slot.spec.worker, reason, slot.crashes,
                                               finished_a_job=(row.jobs_done if row else 0) > slot.done_before)
        slot.crashes = decision.crashes_in_row
        if isinstance(decision, GiveUp):
            return self._failed(slot, decision.message)
        slot.restart_at = time.monotonic() + decision.delay_s
        self.say(slot, "ERROR", f"{reason}; {lost} job(s) back to the queue; a new actor in "
                                f"{decision.delay_s:.0f}s (restart {restarts})")

    def _failed(self, slot: _Slot, message: str) -> None:
        self._kill(slot)
        slot.ended, slot.restart_at = FAILED, None
        self.ledger.worker_failed(slot.spec.worker, message[:500])  # (given up on: it already is)
        self.say(slot, "ERROR", f"worker failed for good: {message}")

    def _kill(self, slot: _Slot) -> None:
        import ray
        if slot.actor is not None:
            with contextlib.suppress(Exception):  # (one that is gone already)
                ray.kill(slot.actor, no_restart=True)
                ray.wait([slot.run], timeout=KILL_WAIT_S)  # gone (its `run` failed) before its claims go back
        slot.actor = slot.run = None

    def _finish(self) -> None:
        """Every actor ended (the ledger actor last); what they held goes back without using an attempt."""
        import ray
        for slot in self.slots:
            self._kill(slot)
        try:
            for slot in self.slots if self.ledger is not None else ():
                self.ledger.worker_exited(slot.spec.worker)  # (a failed or retired one stays so)
                self.ledger.release_worker(slot.spec.worker, "sweep stopped")
        except Exception:
            self.say(None, "WARNING", f"could not release the jobs left:\n{traceback.format_exc()}")
        finally:
            if self.ledger_actor is not None:
                ray.kill(self.ledger_actor)
            self.say(None, "INFO", "driver ended")

