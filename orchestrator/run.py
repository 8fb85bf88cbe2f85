"""Running a sweep: the sequence behind `run`, `plan` and `stop`, for the command line and for Python.

    from orchestrator.run import RunOptions, run_sweep
    result = run_sweep(load_manifest("sweep.yaml"), RunOptions(executor="local", progress=False))

`run_sweep` checks the checkpoint and the output folder, expands the jobs, plans over the executor's
resources, scans what is already made, moves outputs of other settings aside (when asked), removes
partial files, syncs the ledger, writes the worker specs, starts the workers and follows them. What a
person should read goes to `say` (the command line passes `print`); errors are `WanSweepError`s.
"""
from __future__ import annotations

import os
import shlex
import time
from dataclasses import dataclass
from typing import Callable

from .backend import backend_class
from .checkpoints import CheckpointError, detect_layout, inspect
from .errors import UserError
from .executor_names import DEFAULT_EXECUTOR, EXECUTOR_NAMES
from .executors import executor_class
from .invocation import command_prefix
from .locks import alive_workers, request_stop, run_lock, stop_requested_since, wait_for_worker_locks
from .manifest import located_problem
from .outputs import remove_partials
from .report import build_report, format_report, workers_getting_ready
from .sweep import FolderProblem, Sweep

Say = Callable[[str], None]


@dataclass(frozen=True)
class RunOptions:
    """What `run` and `plan` take besides the manifest (the command line's options)."""
    executor: str | None = None  # None: the manifest's execution.executor, else the default (tmux)
    cpu_slots: int | None = None  # worker slots on a machine without GPUs (overrides resources.cpu_slots)
    recalibrate: bool = False  # measure memory and throughput again instead of using the cached profile
    allow_non_empty: bool = False  # use an output_dir that already holds other files
    follow: bool = False  # keep following a detached sweep (tmux), also one that is already running
    add_workers: bool = False  # the sweep is already running: start this plan's workers beside it
    redo_changed: bool = False  # move outputs made with other settings aside and make them again
    progress: bool = True  # show a progress bar while following


@dataclass
class RunResult:
    """How a `run_sweep` ended: the command's exit code, and the sweep's report when one was made."""
    exit_code: int
    report: object = None  # report.Report


@dataclass
class Preview:
    """What `plan` shows: the sweep, its plan, this machine's GPUs (None on a cluster or without
    GPUs), why no GPU is used, and the scan of what is already made."""
    sweep: object
    plan: object
    gpus: list | None
    why: str | None
    scan: object


def check_folder(sweep, allow_non_empty: bool = False, owner_only: bool = False, writable: bool = False,
                 setting_up: dict | None = None) -> None:
    """Refuse an output folder that is not this sweep's (or, with `writable`, that cannot take its
    files; or, with `setting_up`, the run lock's holder, that another manifest's `run` is taking), at
    the manifest's `output_dir` line."""
    try:
        sweep.check_owner() if owner_only else sweep.check_folder(allow_non_empty)
        if setting_up and isinstance(setting_up.get("sweep"), str):
            sweep.refuse_other_sweep(setting_up["sweep"], f"being set up by pid {setting_up.get('pid', '?')}")
        if writable:
            sweep.check_writable()
    except FolderProblem as exc:
        raise located_problem(sweep.manifest, "output_dir", exc.message, exc.fix, fallback="name") from None


def check_checkpoint(manifest) -> None:
    """Refuse to start on an incomplete or broken local checkpoint, with what `models status` says."""
    path = manifest.model.path
    if not path or not os.path.exists(path):
        return  # none, or a hub id: the backend's check says what to do
    if not backend_class(manifest.model.backend).verify_checkpoint:
        return
    if detect_layout(path) is None:
        return
    try:
        checkpoint = inspect(path)
    except CheckpointError as exc:
        raise UserError(str(exc)) from None
    if {"model_files", "tokenizer"} & set(manifest.model.options):
        # the backend is told which files to use: only named files that are missing or broken count
        checkpoint.problems = [p for p in checkpoint.problems if not p.layout]
    if checkpoint.problems:
        raise UserError(f"{checkpoint.error()}\nNothing was started.")


def executor_kind(manifest, options: RunOptions, need_available: bool = True):
    """The executor class the options or the manifest name (tmux unless told otherwise).

    Where tmux is missing, `unavailable()` says how to install it, and the local executor runs only
    when asked for (`--executor local`), never as a silent fallback. Planning on this machine's GPUs
    needs nothing of the executor (`need_available=False`: a `plan` for tmux works where tmux is
    missing); a cluster executor must always be able to reach its cluster."""
    name = options.executor or manifest.execution.executor or DEFAULT_EXECUTOR
    kind = executor_class(name)
    missing = kind.unavailable() if need_available or not kind.plans_here else None
    if missing:
        raise UserError(f"executor `{name}` cannot run here: {missing}")
    return kind


def plan_resources(manifest, sweep, executor, options: RunOptions):
    """The executor's plan over its resources: (plan, this machine's GPUs or None, why no GPU).
    Raises PlanError or ExecutorError."""
    return executor.make_plan(sweep.jobs, cpu_slots=options.cpu_slots, recalibrate=options.recalibrate)


def preview(manifest, options: RunOptions = RunOptions()) -> Preview:
    """The dry run of `plan`: the checks `run` makes, the plan and what is already made; starts nothing."""
    check_checkpoint(manifest)
    sweep = Sweep(manifest)
    check_folder(sweep, options.allow_non_empty)
    executor = executor_kind(manifest, options, need_available=False)(sweep)
    plan, gpus, why = plan_resources(manifest, sweep, executor, options)
    return Preview(sweep, plan, gpus, why, sweep.scan())


def run_sweep(manifest, options: RunOptions = RunOptions(), say: Say = print) -> RunResult:
    """Validate, plan, start the workers and follow them (see the module docstring), in named steps."""
    check_checkpoint(manifest)
    sweep = Sweep(manifest)
    check_folder(sweep, options.allow_non_empty, writable=True)
    executor_type = executor_kind(manifest, options)
    # Set-up is exclusive (a second `run` started at the same moment must not clean up, reset or
    # start anything), and held until the workers hold their own locks; see `locks`.
    lock = run_lock(sweep.state_dir)
    if not lock.acquire("run", sweep=manifest.name):
        return being_set_up_elsewhere(sweep, lock, options, say)
    check_folder(sweep, options.allow_non_empty)  # again, under the lock: another manifest's `run` may have taken it
    executor = executor_type(sweep)
    ledger = sweep.ledger()
    alive = alive_workers(sweep.state_dir, ledger)
    if alive and not options.add_workers:
        lock.release()
        return already_running(sweep, ledger, len(alive), options, say)
    # Planned only now: calibrating (auto sizing) on cards a running sweep already uses would mislead.
    plan, gpus, why = plan_resources(manifest, sweep, executor, options)
    reconcile(sweep, ledger, plan, fresh=not alive, redo_changed=options.redo_changed, say=say)
    if ledger.unfinished() == 0:
        say(f"all {len(sweep.jobs)} jobs of `{manifest.name}` are done.\n")
        return reported(sweep, say, 0)
    if why:
        say(f"no NVIDIA GPU ({why}): running {len(plan.workers)} CPU worker slot(s)")
    note = sweep.room_note(ledger.unfinished())
    if note:
        say(f"note: {note}")
    specs = [(spec, path) for spec, path in sweep.write_specs(plan) if spec.worker not in alive]
    if stop_requested_since(sweep.state_dir, process_started()):
        say("`stop` was issued while this `run` was starting: no worker started.\n")
        return reported(sweep, say, 0)
    names = start_workers(sweep, executor, specs, lock)
    say_started(sweep, ledger, executor, names, say)
    if executor.detaches and not options.follow:
        say_commands(manifest, say)
        return RunResult(0)
    return follow_to_the_end(sweep, ledger, executor, options, say)


def reported(sweep, say: Say, code: int | None = None) -> RunResult:
    """Say the sweep's report; the exit code is `code`, else 1 while jobs failed for good or are left."""
    report = build_report(sweep)
    say(format_report(report))
    if code is None:
        code = 1 if report.totals.failed or report.totals.left else 0
    return RunResult(code, report)


def being_set_up_elsewhere(sweep, lock, options: RunOptions, say: Say) -> RunResult:
    """Another `run` (or `stop`) holds the set-up lock: refused if it is another manifest's, else the report."""
    holder = lock.holder()
    check_folder(sweep, options.allow_non_empty, setting_up=holder)  # another manifest racing for it
    say(f"sweep `{sweep.manifest.name}` is being set up by another `{holder.get('command', 'run')}` "
        f"(pid {holder.get('pid', '?')}) or is running; not starting another set.\n")
    return reported(sweep, say, 0)


def already_running(sweep, ledger, alive: int, options: RunOptions, say: Say) -> RunResult:
    """The sweep's workers are alive: start nothing, show the report (or follow it, with --follow)."""
    say(f"sweep `{sweep.manifest.name}` is already running ({alive} workers alive); not starting "
        "another set (use --add-workers to add this plan's workers, `stop` to end it).\n")
    if not options.follow:
        return reported(sweep, say, 0)
    # Follow the running sweep, whoever started it: its workers are found through the ledger.
    if follow(sweep, ledger, lambda: len(alive_workers(sweep.state_dir, ledger)), len(sweep.jobs),
              show=options.progress):
        say("\ndetached: the workers keep running (`report` shows progress, `stop` ends them)")
        return RunResult(0)
    say("")
    return reported(sweep, say)


def reconcile(sweep, ledger, plan, fresh: bool, redo_changed: bool, say: Say) -> None:
    """Make the ledger agree with the disk: refuse (or, with `redo_changed`, move aside) outputs made with
    other settings, claim the folder, remove partial files (`fresh`: no worker alive) and sync the jobs."""
    manifest = sweep.manifest
    scan = sweep.scan()
    if scan.stale and not redo_changed:
        raise UserError(
            f"{len(scan.stale)} existing mp4s under {sweep.root} were made with other settings than "
            f"this manifest's:\n{sweep.describe_stale(scan.stale)}\n"
            "Nothing was started. Either restore the old settings, point output_dir at a new folder, "
            "or run again with --redo-changed (the old files are moved to .sweep/superseded/, not deleted).")
    sweep.claim_folder()  # only now: a refused `run` must not name its manifest as the folder's
    if scan.stale:
        moved_to = sweep.move_aside(scan.stale)
        say(f"moved {len(scan.stale)} outputs of other settings to {moved_to}")
    if fresh:
        removed = remove_partials(sweep.own_folders())
        if removed:
            say(f"removed {removed} partial files left by interrupted workers")
    repaired = ledger.sync(sweep.jobs, plan.queues, scan.complete, manifest.max_attempts,
                           manifest.execution.heartbeat_timeout_s, fresh=fresh)
    if repaired:
        say(f"the ledger held {sum(repaired.values())} job row(s) in a state it does not know "
            f"({', '.join(map(repr, repaired))}): put back in the queue")


def start_workers(sweep, executor, specs, lock) -> list[str]:
    """Start the workers of these specs; the set-up lock is let go once they hold their own locks."""
    names = executor.start(specs)
    if executor.supervised:
        wait_for_worker_locks(sweep.state_dir, [spec.worker for spec, _ in specs], executor.running)
    lock.release()
    return names


def say_started(sweep, ledger, executor, names: list[str], say: Say) -> None:
    counts = ledger.counts()
    workers = f"{len(names)} worker{'' if len(names) == 1 else 's'}"
    say(f"started {workers} ({executor.name}) for {counts['pending'] + counts['running']} of {len(sweep.jobs)} "
        f"jobs ({counts['done']} already done); logs in {sweep.logs}")
    for line in executor.attach_hints(names):
        say(line)


def say_commands(manifest, say: Say) -> None:
    """The report and stop commands, which pasted into any shell in any folder run this same program on
    this same manifest."""
    program, manifest_path = command_prefix(), shlex.quote(str(manifest.path))
    say(f"progress: {program} report {manifest_path}")
    say(f"stop:     {program} stop {manifest_path}")


def follow_to_the_end(sweep, ledger, executor, options: RunOptions, say: Say) -> RunResult:
    """The progress bar until the sweep ends (then the report), or Ctrl-C: detach (tmux) or stop (local)."""
    if follow(sweep, ledger, lambda: len(alive_workers(sweep.state_dir, ledger)), len(sweep.jobs),
              show=options.progress):
        if executor.detaches:
            say("\ndetached: the workers keep running (`report` shows progress, `stop` ends them)")
            return RunResult(0)
        say("\nstopping the workers cleanly (run the same command again to resume)…")
        executor.stop()
        executor.wait()
        return RunResult(130)
    executor.wait()
    deadline = time.monotonic() + 15
    while executor.detaches and executor.running() and time.monotonic() < deadline:
        time.sleep(0.5)  # let the sessions of finished workers end before the report lists them
    say("")
    return reported(sweep, say)


def stop_sweep(sweep, now: bool = False, say: Say = print) -> int | None:
    """Stop the sweep's workers, whichever executor started them; how many processes were signalled
    (None: the sweep has no ledger, so no worker to stop).

    A `run` still starting sees the request and starts no worker; one past that point holds the run
    lock until its workers are up: this waits for it, then stops them like any others."""
    try:
        sweep.check_folder()
    except FolderProblem:
        pass  # not a sweep's folder: nothing of ours runs there, and nothing is written there
    else:
        lock = run_lock(sweep.state_dir)
        try:
            request_stop(sweep.state_dir)
            if not lock.acquire("stop"):
                holder = lock.holder()
                say(f"waiting for `{holder.get('command', 'run')}` (pid {holder.get('pid', '?')}) to finish "
                    "setting the sweep up…")
                lock.acquire("stop", wait=True)
        except OSError:
            pass  # a read-only folder: no `run` can set up there either; the ledger says the rest
    if not sweep.has_ledger():
        return None
    kinds = []
    for name in EXECUTOR_NAMES:
        try:
            kinds.append(executor_class(name))
        except ImportError:
            continue
    # An executor that drives the sweep from its `run` releases the jobs and ends the workers itself;
    # otherwise the workers are supervised processes of this machine, found through the ledger.
    driving = [kind for kind in kinds if kind.drives(sweep)]
    for kind in driving or [kind for kind in kinds if kind.supervised]:
        if kind.unavailable() is None:
            return kind(sweep).stop(now=now)
    return 0


def process_started() -> float:
    """When this process started, on `time.time()`'s clock, to a clock tick (a `stop` issued since
    then was meant for this `run`). psutil's create_time counts from a boot time in whole seconds,
    which can put a `run` started just after a `stop` before it."""
    try:
        with open("/proc/self/stat", encoding="ascii") as stream:
            ticks = int(stream.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, since boot
        since_boot = ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - since_boot)
    except (OSError, ValueError, IndexError, AttributeError):  # no /proc (macOS)
        import psutil
        return psutil.Process().create_time()


def follow(sweep, ledger, alive, total: int, show: bool) -> bool:
    """Show a progress bar until no work is left or no worker is alive (`alive()` counts them);
    True on Ctrl-C."""
    from tqdm import tqdm

    counts = ledger.counts()
    bar = tqdm(total=total, initial=counts["done"], unit="video", dynamic_ncols=True, disable=not show,
               smoothing=0.05)
    getting_ready = ""
    try:
        while True:
            time.sleep(1.0)
            counts = ledger.counts()
            bar.set_postfix(running=counts["running"], failed=counts["failed"], refresh=False)
            bar.update(counts["done"] - bar.n)
            # Before their first job, say what the workers are doing (a first run loads for a while).
            now_ready = workers_getting_ready(ledger.workers())
            if now_ready != getting_ready:
                getting_ready = now_ready
                bar.set_description_str(getting_ready, refresh=False)
                bar.refresh()
            if counts["pending"] + counts["running"] == 0:
                break
            if not alive():
                break
    except KeyboardInterrupt:
        return True
    finally:
        bar.close()
    return False
