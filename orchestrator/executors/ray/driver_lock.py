"""The driver lock: while a Ray driver runs it holds a lock on `.sweep/ray-driver.lock`, so a second
`run` sees the sweep as running and `stop` finds the driver there; the kernel lets go of it when the
driver dies, however it dies."""
from __future__ import annotations

import json
import os
import socket
import time

from ..base import ExecutorError

LOCK_NAME = "ray-driver.lock"


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


class DriverLock:
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
