"""The Ray executor (`executor.RayExecutor`): `cluster` plans over the cluster's nodes, `ledger_actor` holds the
sweep's ledger on the driver's node, `actor` is one lifetime of a worker slot running the job loop over it, and
`driver` starts and supervises the actors. Ray is imported only when a sweep runs on it."""
from __future__ import annotations

from .actor import MOUNT_CHECK, RaySource, mount_problem  # noqa: F401
from .cluster import RayNode, plan_cluster  # noqa: F401
from .executor import RayExecutor  # noqa: F401
from .ledger_actor import LedgerActor  # noqa: F401
