"""The Ray executor: the same manifest on a Ray cluster, with the `run` command as the driver.

`execution.ray_address` (or `--ray-address`) `auto` joins the cluster this machine belongs to, HOST:PORT
joins that one, none starts a local Ray here. While a driver runs it holds `.sweep/ray-driver.lock` (a
`locks.RunLock`, let go by the kernel however the driver dies): a second `run` sees the sweep running,
`stop` finds the driver.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import time
from dataclasses import replace
from pathlib import Path

from ...locks import DRIVER_LOCK, RunLock
from ...planning import WorkerSpec
from ...supervision import summarise
from ..base import Executor, ExecutorError
from .actor import MOUNT_CHECK
from .cluster import Placement, RayNode, cluster_nodes, plan_cluster
from .driver import WORKERS_META, Driver

INSTALL_HINT = ("Ray is not installed here. Install it with `pip install 'wan-sweep[ray]'` (or "
                "`pip install ray`) on this machine and on every machine of the cluster, then run again.")
PACKAGE_DIR = Path(__file__).resolve().parents[2]  # orchestrator/: shipped to every node
LOOPBACK = ("127.0.0.1", "localhost", "::1")

log = logging.getLogger(__name__)


def driver_holding(sweep) -> dict | None:
    """Who drives this sweep on Ray now ({pid, host, address, since, …}), or None when nobody does."""
    return RunLock(sweep.state_dir / DRIVER_LOCK).held_by()


class RayExecutor(Executor):
    name = "ray"
    detaches = False  # the driver is this process: `run` stays, shows progress, Ctrl-C stops cleanly
    supervised = False  # actors, not supervisor processes: the driver lock shows the sweep running
    plans_here = False  # from the cluster's nodes and their GPU types, never this machine's NVML

    def __init__(self, sweep):
        super().__init__(sweep)
        execution = sweep.manifest.execution
        self.address = execution.ray_address
        self.stream = bool(execution.ray_stream_outputs)
        self.placement: dict[str, Placement] = {}
        self.nodes: list[RayNode] = []
        self._driver: Driver | None = None
        self._lock = RunLock(sweep.state_dir / DRIVER_LOCK)
        self._connected_here = False
        if sweep.has_ledger() and driver_holding(sweep) is None:  # a driver died (killed, machine rebooted):
            # its workers are not alive, wherever they ran (`run` trusts the ledger for another host's)
            self._for_ours(lambda ledger, worker: ledger.worker_exited(worker.id, "its Ray driver ended"))

    def _for_ours(self, act) -> None:
        """`act(ledger, worker)` for each worker the last Ray driver started."""
        with contextlib.closing(self.sweep.ledger()) as ledger:
            ours = set(json.loads(ledger.get_meta(WORKERS_META) or "[]"))
            for worker in [w for w in ledger.workers() if w.id in ours]:
                act(ledger, worker)

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
            options["_node_ip_address"] = "127.0.0.1"  # not the outward address: the nodes must reach it
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

    def make_plan(self, jobs, cpu_slots: int | None = None, recalibrate: bool = False):
        """The plan from the cluster's nodes and their GPU types (never this machine's NVML)."""
        self.connect()
        self.nodes = cluster_nodes()
        plan, self.placement = plan_cluster(self.sweep.manifest, jobs, self.nodes, cpu_slots)
        notes = ("--recalibrate does not apply on Ray: calibrate with a local `plan --recalibrate` on a node "
                 "of that GPU type",) if recalibrate else ()
        notes += (f"ray_stream_outputs: every mp4 comes back to this machine's {self.sweep.root}" if self.stream
                  else f"outputs go to {self.sweep.root} on every node: it must be shared storage mounted at "
                       "that path",)
        return replace(plan, notes=plan.notes + notes), None, None

    # ---------------------------------------------------------------- Executor
    def start(self, specs: list[tuple[WorkerSpec, Path]]) -> list[str]:
        if not self.placement:
            raise ExecutorError("the Ray executor starts the workers of its own plan (make_plan) only")
        if not self._lock.acquire("ray driver", host=socket.gethostname(), address=self.address):
            raise ExecutorError(f"another `run` already drives this sweep on Ray ({self._lock.holder() or '?'}); "
                                "adding workers to it is not supported: `stop` it and run again")
        try:
            token = None if self.stream else secrets.token_hex(8)
            if token:
                (self.sweep.state_dir / MOUNT_CHECK).write_text(token, encoding="utf-8")
            self._driver = Driver(self.sweep, [spec for spec, _ in specs], self.placement, self.stream, token)
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

    def wait(self, poll_s: float = 1.0) -> None:
        while self._driver is not None and self._driver.is_alive():
            self._driver.join(poll_s)
        self._lock.release()
        if self._connected_here:
            import ray
            ray.shutdown()
            self._connected_here = False
        if self._driver is not None and self._driver.error is not None:
            log.error("error: the Ray driver stopped: %s (details in %s)", summarise(self._driver.error),
                      self.sweep.logs / "ray_driver.log")

    def stop(self, now: bool = False, timeout_s: float = 30.0) -> int:
        """Stop the sweep's actors: from the driver itself (Ctrl-C), or from `stop` in another process,
        through the ledger (the driver releases the running jobs, ends its actors and exits); `now`, or a
        driver still there after `timeout_s`, is killed (its actors with it; their jobs go back unused)."""
        if self._driver is not None:
            self._driver.stop_event.set()
            return len(self._driver.slots)
        with contextlib.closing(self.sweep.ledger()) as ledger:
            ledger.request_stop()
        holder = driver_holding(self.sweep)
        pid = holder.get("pid") if holder and holder.get("host") == socket.gethostname() else None
        deadline = time.monotonic() + (0 if now else timeout_s)
        while driver_holding(self.sweep) is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        signalled = 0
        if pid and driver_holding(self.sweep) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                signalled = 1
        self._for_ours(lambda ledger, worker: ledger.release_worker(worker.id, "sweep stopped"))
        return signalled


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
