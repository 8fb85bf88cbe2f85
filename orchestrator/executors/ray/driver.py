"""The Ray driver: a thread of `run` that owns the job list and the sweep's ledger, exactly as local
workers use it (through a `LedgerJobSource` per slot). Each actor runs the job loop itself; the
driver serves its calls (`serve`: claim, complete, fail, release, … and, with streamed outputs, the
videos), turns the signs of life each exchange carries into heartbeats, watches each actor's
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

from ...job_loop import LedgerJobSource
from ...supervision import Policy
from ...ledger import Ledger
from ...planning import WorkerSpec
from .actor import remote_worker_class
from .cluster import Placement
from .job_source import ERROR, OK

WORKERS_META = "ray_workers"  # ledger meta: the worker ids the last Ray driver registered
POLL_S = 0.2
BUSY_STATES = ("loading", "working")  # an actor that is placed on a node
ENDED_STATES = ("ended", "failed", "retired")


@dataclass
class _Slot:
    spec: WorkerSpec
    placement: Placement | None
    log: logging.Logger
    actor: object = None
    generation: int = 0  # which actor of this slot; answers from an earlier one are ignored
    state: str = "starting"  # starting | loading | working | waiting (to restart) | ended | failed | retired
    where: dict = field(default_factory=dict)
    claims: dict = field(default_factory=dict)  # job id -> Claim held now (the last one generates)
    job_id: str | None = None  # the job its loop generates now, as its last exchange said
    job_started: float = 0.0
    loading: bool = False  # a long silent call (a first, compiling call) is under way
    last_sign: float = 0.0
    signs: int = -1
    crashes: int = 0  # in a row without a finished job
    restarts: int = 0
    restart_at: float = 0.0
    life: str | None = None  # the ledger's token for this driver's claims of the slot

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
    """Serves its actors' job loops from the ledger and watches them, until no work is left or a stop."""

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
        self.policy = Policy.of(execution)
        self.beat_every = self.policy.beat_every_s
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
                slot.life = self.ledger.register_worker(slot.id, slot.spec.devices, state="starting")
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
            for claim in list(slot.claims.values()) if self.ledger is not None else ():
                try:
                    self._release_claims(slot, [claim])
                    slot.log.info("released %s (not finished)", claim.job.key)
                except Exception:
                    self.log.warning("could not release %s:\n%s", claim.job.key, traceback.format_exc())
            if slot.state not in ("failed", "retired"):
                slot.state = "ended"
                if self.ledger is not None:
                    try:
                        self.ledger.worker_exited(slot.id)
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
        options = {"num_gpus": share, "num_cpus": 0 if share else 1, "max_concurrency": 2,  # work and exchange
                   "max_restarts": 0, "max_task_retries": 0}
        if slot.placement is not None:
            # Its planned node first (sizing was decided for that node's GPU type); a replacement may
            # go elsewhere when that node is gone.
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(slot.placement.node, soft=replacement)
        slot.generation += 1
        slot.state, slot.where, slot.signs, slot.job_id, slot.loading = "starting", {}, -1, None, False
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
        refs = list(self.refs)
        ready, waiting = ray.wait(refs, num_returns=1, timeout=POLL_S)
        if ready and waiting:  # and whatever else has come meanwhile
            ready += ray.wait(waiting, num_returns=len(waiting), timeout=0)[0]
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
                elif kind == "work":
                    self._actor_failed(slot, f"the job loop failed: {short_error(exc)}")
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
            self.ledger.worker_loading(slot.id, None, host=where.get("host"))
        slot.log.info("placed on %s (%s), pid %s, GPU ids %s, CUDA_VISIBLE_DEVICES=%s", where.get("host"),
                      where.get("ip"), where.get("pid"), where.get("gpu_ids"), where.get("cuda_visible_devices"))

    def _on_load(self, slot: _Slot, info: dict) -> None:
        if info.get("problem"):
            slot.log.error(info["problem"])
            self._give_up(slot, info["problem"])
            return
        slot.state, slot.last_sign = "working", time.monotonic()
        self.ledger.worker_idle(slot.id)
        slot.log.info("model loaded in %.1fs%s", info.get("seconds", 0.0),
                      f" on {', '.join(info['gpu_names'])}" if info.get("gpu_names") else "")
        self._track(slot.actor.work.remote(), slot, "work")
        self._exchange(slot, {})

    def _exchange(self, slot: _Slot, answers: dict) -> None:
        self._track(slot.actor.exchange.remote(answers, self.beat_every), slot, "exchange")

    def _on_exchange(self, slot: _Slot, report: dict) -> None:
        """Serve the calls the actor's job loop made since the last exchange, and note its signs of life."""
        now = time.monotonic()
        if report["signs"] != slot.signs:
            slot.signs, slot.last_sign = report["signs"], now
        if report["job"] != slot.job_id:
            slot.job_id, slot.job_started = report["job"], now
        slot.loading = bool(report.get("loading"))
        generation = slot.generation
        answers = {}
        for seq, method, args in report["calls"]:
            answer = self.serve(slot.id, method, args)
            if slot.generation != generation:
                return  # the slot's actor was given up on while serving: it gets no more answers
            if seq is not None:
                answers[seq] = answer
        self._exchange(slot, answers)

    def _on_work(self, slot: _Slot, answer: dict) -> None:
        """The actor's job loop ended: no work left, a stop, retirement, or a full or read-only disk."""
        ended = answer.get("ended")
        self._drop(slot)
        if ended == "unwritable":
            from ...worker import stop_for_storage
            stop_for_storage(self.ledger, slot.spec, answer.get("problem"), answer.get("message") or "", slot.log)
        if slot.state != "retired":
            slot.state = "ended"
            self.ledger.worker_exited(slot.id)

    # ---------------------------------------------------------------- the actors' job source
    def serve(self, worker: str, method: str, args: dict) -> tuple[str, object]:
        """Answer one call of a worker's job loop (`job_source.DriverJobSource`) from the ledger.

        (`ok`, value), or (`error`, what went wrong): a call the ledger refuses fails the actor's loop,
        as it would fail a local worker's."""
        slot = next(s for s in self.slots if s.id == worker)
        serve = getattr(self, f"_serve_{method}", None)
        if serve is None:
            return ERROR, f"the driver serves no call {method!r}"
        try:
            return OK, serve(slot, LedgerJobSource(self.ledger, slot.spec, slot.life), **args)
        except Exception as exc:
            slot.log.error("could not serve %s:\n%s", method, traceback.format_exc())
            return ERROR, short_error(exc)

    def _serve_claim(self, slot: _Slot, source: LedgerJobSource, prefer_group=None):
        claim = source.claim(prefer_group)
        if claim is None:
            return None
        slot.claims[claim.job.id] = claim
        slot.last_sign = time.monotonic()
        return {"job": claim.job.to_dict(), "attempt": claim.attempt}

    def _serve_complete(self, slot: _Slot, source: LedgerJobSource, job_id, seconds, skipped=False):
        slot.claims.pop(job_id, None)
        recorded = source.complete(job_id, seconds, skipped)
        if recorded and not skipped:
            slot.crashes = 0
        return recorded

    def _serve_fail(self, slot: _Slot, source: LedgerJobSource, job_id, message, outcome="error"):
        slot.claims.pop(job_id, None)
        return source.fail(job_id, message, outcome)

    def _serve_release(self, slot: _Slot, source: LedgerJobSource, job_id):
        slot.claims.pop(job_id, None)
        source.release(job_id)

    def _serve_stop_requested(self, slot: _Slot, source: LedgerJobSource):
        return self.stop_event.is_set() or source.stop_requested()

    def _serve_unfinished(self, slot: _Slot, source: LedgerJobSource):
        return source.unfinished()

    def _serve_idle(self, slot: _Slot, source: LedgerJobSource):
        source.idle()

    def _serve_peek(self, slot: _Slot, source: LedgerJobSource, prefer_group=None):
        job = source.peek(prefer_group)
        return None if job is None else job.to_dict()

    def _serve_log(self, slot: _Slot, source: LedgerJobSource, level, message):
        slot.log.log(level, "%s", message)

    def _serve_retire(self, slot: _Slot, source: LedgerJobSource, ooms):
        """Out of memory again and again on a card it shares: the card runs one worker fewer. The
        card-mates are the actors Ray placed on the same node's cards (plan numbers repeat per node)."""
        node, cards = slot.where.get("node_id"), set(slot.where.get("gpu_ids") or ())
        mates = [s for s in self.slots if s is not slot and s.state not in ENDED_STATES
                 and s.where.get("node_id") == node and cards & set(s.where.get("gpu_ids") or ())]
        if not cards or not mates:
            return None
        message = (f"retired after {ooms} out-of-memory errors in a row; its card on {slot.where.get('host')} "
                   f"now runs {len(mates)} worker(s) for the rest of the sweep")
        slot.state = "retired"  # its loop ends now; the actor goes when it has written its last video
        self.ledger.worker_retired(slot.id, message)
        return len(mates)

    def _serve_store(self, slot: _Slot, source: LedgerJobSource, job_id, mp4: bytes, sidecar: dict):
        """A streamed video: written here if the slot still holds the job, else discarded."""
        claim = slot.claims.get(job_id)
        if claim is None or not self.ledger.holds(job_id, slot.id):
            # The claim expired and moved on meanwhile: whoever holds it now records the job.
            slot.log.warning("result of %s discarded: the job is no longer this worker's",
                             claim.job.key if claim else job_id)
            return False
        self._adopt(claim.job, mp4, sidecar)
        return True

    def _adopt(self, job, mp4: bytes, sidecar: dict) -> None:
        """Write a streamed mp4 into the driver's output folder: temp file beside it → check → rename."""
        from ...outputs import adopt_mp4, temp_path_beside
        temp = temp_path_beside(job.output)
        try:
            with open(temp, "wb") as stream:
                stream.write(mp4)
        except BaseException:
            os.unlink(temp)
            raise
        adopt_mp4(temp, job.output, expected_frames=job.generation(self.sweep.manifest.generation).num_frames,
                  sidecar=sidecar or {})

    # ---------------------------------------------------------------- failures
    def _blamed(self, slot: _Slot):
        """The claim a failure of the slot's actor is put on: the job it generates (else its last one).
        Its other claims, videos being written, go back without using an attempt."""
        if not slot.claims:
            return None, []
        blamed = slot.claims.get(slot.job_id) or list(slot.claims.values())[-1]
        return blamed, [c for c in slot.claims.values() if c is not blamed]

    def _release_claims(self, slot: _Slot, claims=None) -> None:
        for claim in list(slot.claims.values()) if claims is None else claims:
            self.ledger.release(claim.job.id, slot.id)
            slot.claims.pop(claim.job.id, None)

    def _actor_lost(self, slot: _Slot, exc: BaseException) -> None:
        reason = short_error(exc)
        node = slot.where.get("node_id") or (slot.placement.node if slot.placement else None)
        if node is not None and not _node_alive(node):
            reason = f"its node {slot.where.get('host') or node[:8]} left the cluster ({reason})"
            for claim in slot.claims.values():  # the node's fault, not the job's: no attempt used
                slot.log.warning("%s: %s goes back to the queue (no attempt used)", reason, claim.job.key)
            self._release_claims(slot)
        self._actor_failed(slot, f"the Ray actor died: {reason}")

    def _actor_failed(self, slot: _Slot, reason: str, outcome: str = "crash") -> None:
        blamed, others = self._blamed(slot)
        self._drop(slot)  # first the actor, so nothing it was writing can land after the release
        if not self.stream:  # what it was writing into the shared folder when it died, as a worker's restart does
            from ...outputs import remove_partials
            remove_partials(self.ledger.output_folders(), owner=slot.id)
        self._release_claims(slot, others)
        if blamed is not None:
            state = self.ledger.fail(blamed.job.id, slot.id, reason[:500], outcome=outcome)
            slot.claims.clear()
            slot.log.error("%s while running %s; the job is now %s", reason, blamed.job.key, state)
        else:
            slot.log.error(reason)
        self._restart_later(slot, reason)

    def _restart_later(self, slot: _Slot, reason: str) -> None:
        slot.crashes += 1
        if slot.crashes > self.max_restarts:
            self._give_up(slot, f"gave up after {slot.crashes} failures in a row without a finished job "
                                f"(execution.max_restarts: {self.max_restarts}); last: {reason}")
            return
        delay = self.policy.restart_delay(slot.crashes)
        slot.restarts += 1
        slot.state, slot.restart_at = "waiting", time.monotonic() + delay
        self.ledger.worker_restarting(slot.id, slot.restarts, reason[:500])
        slot.log.info("replacing the actor in %.0fs", delay)

    def _give_up(self, slot: _Slot, message: str) -> None:
        self._drop(slot)
        self._release_claims(slot)
        slot.state = "failed"
        self.ledger.worker_failed(slot.id, message[:500], restarts=slot.restarts)
        slot.log.error("worker failed for good: %s", message)

    def _restart_due(self, now: float) -> None:
        for slot in self.slots:
            if slot.state == "waiting" and now >= slot.restart_at:
                self._spawn(slot, replacement=True)

    # ---------------------------------------------------------------- liveness
    def _watch(self, now: float) -> None:
        """A hung or overlong job: fail its attempt, end the actor, start a fresh one (the rules a local
        worker's heartbeat thread and supervisor apply)."""
        for slot in self.slots:
            if slot.state != "working":
                continue
            claim = slot.claims.get(slot.job_id)
            where = f" on {claim.job.key}" if claim else ""
            if slot.job_id and now - slot.job_started > self.job_timeout:
                self._actor_failed(slot, f"timed out after {self.job_timeout:.0f}s", outcome="timeout")
            elif not slot.loading and now - slot.last_sign > self.heartbeat_timeout:
                self._actor_failed(slot, f"worker {slot.id} showed no progress for more than "
                                         f"{self.heartbeat_timeout:.0f}s{where}", outcome="lost")

    def _beat(self, now: float) -> None:
        for slot in self.slots:
            if slot.state == "loading" or (slot.state == "working" and (
                    slot.loading or now - slot.last_sign <= self.heartbeat_timeout)):
                self.ledger.heartbeat(slot.id, slot.job_id, life=slot.life)


def _node_alive(node_id: str) -> bool:
    import ray
    try:
        return any(n.get("NodeID") == node_id and n.get("Alive") for n in ray.nodes())
    except Exception:
        return True  # cannot tell: treat the actor's death as its own
