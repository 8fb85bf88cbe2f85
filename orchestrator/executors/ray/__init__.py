"""The Ray executor: the same manifest on a Ray cluster, with the `run` command as the scheduler.

One module per idea:
  - `cluster`: the cluster's live nodes and the plan over them (`plan_cluster`, `Placement`);
  - `driver_lock`: the lock a driver holds on `.sweep/ray-driver.lock` while it runs;
  - `actor`: one long-lived actor per worker slot (`RayWorker`), running the job loop on its node;
  - `job_source`: the actor's job source, whose calls its driver answers (`DriverJobSource`);
  - `driver`: the thread of `run` that owns the ledger, serves the actors' job sources and watches
    them (`Driver`);
  - `executor`: joining the cluster, starting the driver and stopping it (`RayExecutor`).

Ray itself is imported only when a sweep runs on it: importing this package works without Ray.
"""
from __future__ import annotations

from .actor import MOUNT_CHECK, RayWorker
from .cluster import Placement, RayNode, cluster_nodes, gpu_type_of, plan_cluster
from .driver import WORKERS_META, Driver, close_logger
from .driver_lock import LOCK_NAME, DriverLock, driver_holding
from .executor import INSTALL_HINT, RayExecutor
from .job_source import DriverJobSource

__all__ = ["INSTALL_HINT", "LOCK_NAME", "MOUNT_CHECK", "WORKERS_META", "Driver", "DriverJobSource", "DriverLock", "Placement",
           "RayExecutor", "RayNode", "RayWorker", "close_logger", "cluster_nodes", "driver_holding",
           "gpu_type_of", "plan_cluster"]
