"""A sweep on disk: its folders, and the step that reconciles the ledger with the outputs.

`<output_dir>/.sweep/` holds the ledger, the worker spec files and caches; `<output_dir>/logs/` one
log per worker; the mp4s and sidecars live under `<output_dir>/<category>/<stem>/`.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .jobs import Job, expand, settings_fingerprint
from .ledger import LIVE_WORKER_STATES, Ledger
from .manifest import Manifest
from .outputs import ProbeCache, inspect_output, read_sidecar, sidecar_path
from .planning import Plan, WorkerSpec

PACKAGE_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class DiskScan:
    complete: set[str] = field(default_factory=set)  # job ids whose mp4 is valid (and theirs)
    stale: list[Job] = field(default_factory=list)  # a valid mp4 made with other settings


class Sweep:
    def __init__(self, manifest: Manifest, jobs: list[Job] | None = None):
        self.manifest = manifest
        self.jobs = jobs if jobs is not None else expand(manifest)
        self.root = manifest.output_dir
        self.state_dir = self.root / ".sweep"
        self.logs = self.root / "logs"
        self.ledger_path = self.state_dir / "ledger.sqlite"
        self.specs_dir = self.state_dir / "workers"

    def ledger(self) -> Ledger:
        return Ledger(self.ledger_path)

    def has_ledger(self) -> bool:
        return self.ledger_path.exists()

    def scan(self) -> DiskScan:
        """What the disk says: which jobs are done, which outputs came from other settings."""
        cache = ProbeCache(self.state_dir / "probe-cache.json") if self.root.exists() else None
        scan = DiskScan()
        frames = self.manifest.generation.num_frames
        present = _names_by_folder(job.output for job in self.jobs)
        for job in self.jobs:
            folder, _, name = job.output.rpartition(os.sep)
            names = present.get(folder)
            if names is not None and name not in names:
                continue  # no file by that name: not done, not stale (one listing, not a stat per job)
            state = inspect_output(job.output, frames, cache)
            if state.stale_for(job.id):
                scan.stale.append(job)
            elif state.complete:
                scan.complete.add(job.id)
        if cache is not None:
            cache.save()
        return scan

    def describe_stale(self, stale: list[Job], limit: int = 5) -> str:
        """Say what changed between the settings that made old outputs and the manifest's."""
        now = settings_fingerprint(self.manifest)
        lines = []
        for job in stale[:limit]:
            old = (read_sidecar(job.output) or {}).get("settings", {})
            diffs = _diff(old, now)
            lines.append(f"  {job.key}.mp4: " + (", ".join(diffs) if diffs else "made for another prompt/input"))
        if len(stale) > limit:
            lines.append(f"  … and {len(stale) - limit} more")
        return "\n".join(lines)

    def move_aside(self, stale: list[Job]) -> Path:
        """Move outputs of old settings (and their sidecars) to .sweep/superseded/<time>/, never delete."""
        target = self.state_dir / "superseded" / time.strftime("%Y%m%d-%H%M%S")
        for job in stale:
            for path in (Path(job.output), sidecar_path(job.output)):
                if path.exists():
                    destination = target / path.relative_to(self.root)
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(path), destination)
        return target

    def live_workers(self, ledger: Ledger) -> list[dict]:
        """Workers the ledger says are alive and whose processes exist on this host."""
        import socket

        import psutil
        alive = []
        for worker in ledger.workers():
            if worker["state"] not in LIVE_WORKER_STATES:
                continue
            pids = [p for p in (worker["supervisor_pid"], worker["pid"]) if p]
            if worker["host"] != socket.gethostname():
                alive.append(worker)  # another machine's (ray): trust its heartbeat
            elif any(is_sweep_process(p) for p in pids):
                alive.append(worker)
        return alive

    def write_specs(self, plan: Plan) -> list[tuple[WorkerSpec, Path]]:
        m = self.manifest
        specs = []
        for slot in plan.workers:
            spec = WorkerSpec(
                sweep=m.name, worker=slot.id, devices=slot.devices, queue=slot.queue,
                ledger=str(self.ledger_path), output_dir=str(self.root),
                log=str(self.logs / f"{slot.id}.log"), model=asdict(m.model),
                generation=asdict(m.generation), execution=asdict(m.execution),
                settings=settings_fingerprint(m))
            specs.append((spec, spec.write(self.specs_dir / f"{slot.id}.json")))
        return specs


def _names_by_folder(outputs) -> dict[str, set[str] | None]:
    """The file names in each folder that holds outputs: one directory listing per folder.

    None for a folder that exists but cannot be listed: its outputs are checked one by one.
    """
    names: dict[str, set[str]] = {}
    for output in outputs:
        folder = output.rpartition(os.sep)[0]
        if folder in names:
            continue
        try:
            with os.scandir(folder) as entries:
                names[folder] = {entry.name for entry in entries}
        except (FileNotFoundError, NotADirectoryError):  # no such folder (yet)
            names[folder] = set()
        except OSError:
            names[folder] = None
    return names


def processes_gone(worker: dict) -> bool:
    """Whether a worker row's processes are known to have ended (killed, crashed, machine rebooted).

    Only a worker of this host with a recorded pid can be judged so; any other (a Ray actor) is
    taken at the ledger's word.
    """
    import socket
    pids = [p for p in (worker["supervisor_pid"], worker["pid"]) if p]
    return bool(pids) and worker["host"] == socket.gethostname() and not any(map(is_sweep_process, pids))


def is_sweep_process(pid: int) -> bool:
    """A supervisor or worker of this product (a pid kept in the ledger may since have been reused)."""
    import psutil
    try:
        cmdline = " ".join(psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return "orchestrator.supervisor" in cmdline or "orchestrator.worker" in cmdline


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(_diff(a, b, f"{prefix}{key}."))
        elif a != b:
            diffs.append(f"{prefix}{key} {a!r} → {b!r}")
    return diffs


def python_env() -> dict[str, str]:
    """The environment for worker programs: the package importable even when not installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env
