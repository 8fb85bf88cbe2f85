"""The Python API: what the command line does, as functions that return data.

    from orchestrator import api
    manifest = api.from_dict({...}, base="experiments")   # or api.load("experiments/demo.yaml")
    jobs = api.expand(manifest)                            # [Job]: id, category, stem, prompt, seed, output, …
    planned = api.plan(manifest, executor="local")         # the dry run: its plan, workers, what is made
    result = api.run(manifest, executor="local", progress=False)
    report = api.report(manifest)                          # report.Report; .to_dict() is `report --json`

A manifest built from a dict is the same YAML read by the same reader, so its problems come with a
file and a line like a file's (`ManifestError`): the dict is written, as YAML, to a file the message
names (`.wan-sweep-<name>.yaml` in `base`, the folder its relative paths start from), which then also
works with the command line (`wan-sweep report .wan-sweep-<name>.yaml`). Every error a user can fix is
a `WanSweepError`. The command line (`cli`) is a thin layer over these functions.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import yaml

from .errors import WanSweepError
from .manifest import Manifest
from .outputs import TEMP_MARK
from .run import Preview, RunOptions, RunResult, check_folder, preview, run_sweep, stop_sweep
from .validation import load_manifest

__all__ = ["Manifest", "RunOptions", "RunResult", "WanSweepError", "dict_manifest_path", "expand", "from_dict",
           "load", "plan", "report", "run", "stop"]


def load(path: str | os.PathLike) -> Manifest:
    """Read and validate a manifest file (its backend's checks included); ManifestError lists every
    problem with its file and line."""
    return load_manifest(path)


def dict_manifest_path(data: dict, base: str | os.PathLike = ".") -> Path:
    """Where `from_dict` writes the YAML of `data`: `<base>/.wan-sweep-<name>.yaml`."""
    name = data.get("name", "experiment") if isinstance(data, dict) else "experiment"
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(name))[:100] or "experiment"
    return Path(base).resolve() / f".wan-sweep-{safe}.yaml"


def from_dict(data: dict, base: str | os.PathLike = ".") -> Manifest:
    """A manifest from a dict shaped like the YAML (the README's keys), its relative paths starting
    at `base`. The dict is written as YAML to `dict_manifest_path(data, base)` and read by the same
    reader as a file, so a problem names that file and its line."""
    plain = json.loads(json.dumps(data, default=str))  # tuples → lists, Paths → text: plain YAML values
    text = "# written by orchestrator.api.from_dict: the manifest given as a dict\n" + \
        yaml.safe_dump(plain, allow_unicode=True, sort_keys=False)
    path = dict_manifest_path(data, base)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=TEMP_MARK, suffix=".yaml", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        stream.write(text)
    os.replace(temp, path)  # whole: a second process reading it never sees half
    return load_manifest(path)


def expand(manifest: Manifest, say: Callable[[str], None] | None = None) -> list:
    """Every job of the manifest, in its fixed order, with stable ids and checked output paths. A long
    expansion (200,000 jobs or more) says so first, and how far it got, to `say` (else it is logged)."""
    from .jobs import expand as expand_jobs
    return expand_jobs(manifest, say=say)


def _options(executor: str | None, options: dict) -> RunOptions:
    from .planning import checked_cpu_slots
    checked_cpu_slots(options.get("cpu_slots"), "cpu_slots=")  # 0, 257, "2": refused, not ignored or hung on
    return RunOptions(executor=executor, **options)


def plan(manifest: Manifest, executor: str | None = None, **options) -> Preview:
    """The dry run (`plan`): the checks `run` makes, the plan over the executor's resources
    (`.plan.workers`, `.plan.queues`) and what is already made (`.scan`); starts nothing. `options`
    are `RunOptions` fields (cpu_slots, recalibrate, allow_non_empty)."""
    return preview(manifest, _options(executor, options))


def run(manifest: Manifest, executor: str | None = None, say: Callable[[str], None] | None = print,
        **options) -> RunResult:
    """Run the sweep (`run`) with any executor (`local`, `tmux`, `ray`; None: the manifest's, else
    tmux): `.exit_code` as the command's, `.report` the report at its end (None when a detaching
    executor left the workers running). `say` gets the lines the command prints (None: silent);
    `options` are `RunOptions` fields (progress, follow, redo_changed, add_workers, …)."""
    return run_sweep(manifest, _options(executor, options), say=say or (lambda line: None))


def report(manifest: Manifest):
    """The sweep's report (`report`): a `report.Report` dataclass (per category, per worker, failed
    jobs, throughput, time left); `.to_dict()` is exactly what `report --json` prints."""
    from .report import build_report
    from .sweep import Sweep
    sweep = Sweep(manifest)
    check_folder(sweep, owner_only=True)
    return build_report(sweep)


def stop(manifest: Manifest, now: bool = False, say: Callable[[str], None] | None = print) -> int | None:
    """Stop the sweep's workers (`stop`; `now`: kill them): how many processes were signalled, None
    when the sweep has no ledger (nothing to stop)."""
    from .sweep import Sweep
    sweep = Sweep(manifest)
    check_folder(sweep, owner_only=True)
    return stop_sweep(sweep, now=now, say=say or (lambda line: None))
