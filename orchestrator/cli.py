"""The command line: run, plan, report, stop. Errors become one clear message and an exit code.
A thin layer over the Python API (`api`): parse the arguments, call it, print.

    python run_experiment.py MANIFEST            # same as `run MANIFEST`
    python run_experiment.py plan MANIFEST       # dry run
    python run_experiment.py report MANIFEST_OR_OUTPUT_DIR [--json] [--watch [S]] [--html] [--compare AXIS=VALUE]
    python run_experiment.py stop MANIFEST [--now]
    python run_experiment.py models status PATH_OR_MANIFEST     # is the checkpoint complete?
    python run_experiment.py models fit MANIFEST [--gpu 24GB x2]  # which memory strategy fits where
    python run_experiment.py models speed MANIFEST [--try compile=blocks,quantize=fp8 …]  # speed settings, measured
    python run_experiment.py models download REPO_ID --to DIR    # resumable, only when asked
    python run_experiment.py models download REPO_ID --file NAME --to loras/   # one file, e.g. a LoRA
"""
from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import time
from contextlib import contextmanager

from . import __version__, api, checkpoints
from .backend import BACKENDS, FUSING_QUANTIZE, backend_class
from .checkpoints import download_fix, loras
from .compare import parse_baseline
from .errors import UserError, WanSweepError
from .executor_names import EXECUTOR_NAMES
from .invocation import program_name
from .jobs import axis_value_text, count_by_category
from .ledger import LedgerError, ledger_problem
from .manifest import ManifestError, located_problem
from .planning import checked_cpu_slots, model_changes
from .report import build_report, format_report, pad, report_json, unknown_states_note
from .review_html import write_page
from .run import check_checkpoint, check_folder
from .sizing import expected_times
from .speed import describe as describe_speed, identity as speed_identity
from .speed_trial import (DEFAULT_CANDIDATES, TrialError, candidate_problems, format_trials, parse_candidate,
                          run_trials)
from .sweep import OWNER_FILE, FolderProblem, Sweep
from .validation import lora_files

COMMANDS = ("run", "plan", "report", "stop", "models")


def _parser() -> argparse.ArgumentParser:
    prog = program_name()  # as it was started: wan-sweep, run_experiment.py, python -m orchestrator
    started_as = "python run_experiment.py" if prog == "run_experiment.py" else prog
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.replace("python run_experiment.py", started_as),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"wan-sweep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="validate, plan, start workers and show progress")
    plan = sub.add_parser("plan", help="dry run: jobs, queues, workers per device and why")
    for p in (run, plan):
        p.add_argument("manifest")
        p.add_argument("--executor", choices=EXECUTOR_NAMES, help="override execution.executor")
        p.add_argument("--ray-address", metavar="auto|HOST:PORT",
                       help="executor ray: the cluster to join (override execution.ray_address)")
        p.add_argument("--cpu-slots", type=int,
                       help="worker slots on a machine without GPUs (overrides resources.cpu_slots)")
        p.add_argument("--recalibrate", action="store_true",
                       help="measure memory and throughput again instead of using the cached profile")
        p.add_argument("--allow-non-empty", action="store_true",
                       help="use an output_dir that already holds other files (nothing in it is deleted)")
    run.add_argument("--follow", action="store_true",
                     help="keep the progress bar on screen (tmux), also of a sweep that is already running")
    run.add_argument("--add-workers", action="store_true",
                     help="the sweep is already running: start this plan's workers beside it")
    run.add_argument("--redo-changed", action="store_true",
                     help="move outputs made with other settings aside and make them again")
    run.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    report = sub.add_parser("report", help="progress: per category, per worker, failures, time left")
    report.add_argument("manifest", metavar="MANIFEST_OR_OUTPUT_DIR",
                        help="the manifest, or its output folder (the manifest its .sweep/sweep.json records)")
    report.add_argument("--json", action="store_true",
                        help="print the report as JSON (the same figures, for scripts) instead of tables")
    report.add_argument("--watch", nargs="?", const=5.0, type=float, metavar="SECONDS",
                        help="print the report again every SECONDS (default 5) until Ctrl-C; with --html, "
                             "rewrite the page each time")
    report.add_argument("--html", action="store_true",
                        help="write the review page <output_dir>/index.html and print its path")
    report.add_argument("--compare", metavar="AXIS=VALUE",
                        help="score every done video against the one of VALUE with the same reference, prompt, seed "
                             "and other axes (PSNR, SSIM; median and worst per value, beside its s/video), "
                             "e.g. --compare steps=50; scores are cached in .sweep/compare/")
    stop = sub.add_parser("stop", help="stop the sweep's workers (gracefully)")
    stop.add_argument("manifest")
    stop.add_argument("--now", action="store_true", help="kill at once")
    models = sub.add_parser("models", help="checkpoints: status, fit, speed, download")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    status = models_sub.add_parser("status", help="is the checkpoint complete? each component's size and dtype")
    status.add_argument("target", metavar="PATH_OR_MANIFEST")
    fit = models_sub.add_parser("fit", help="GPU memory per worker for each strategy, and what fits where")
    fit.add_argument("target", metavar="MANIFEST_OR_PATH", nargs="?")
    fit.add_argument("--gpu", nargs="+", action="append", metavar="SPEC",
                     help="a GPU to size for instead of this machine's, e.g. `--gpu 24GB x2` (repeatable)")
    fit.add_argument("--size", help="for a checkpoint path: WIDTHxHEIGHT (default 832x480)")
    fit.add_argument("--frames", type=int, help="for a checkpoint path: frames (default 81)")
    fit.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="for a checkpoint path (default bfloat16)")
    speed = models_sub.add_parser(
        "speed", help="try speed settings (compile, fp8, attention, step caches) on this machine's GPU (or CPU) with "
        "the manifest's model and shapes: seconds per step, first call, peak memory, drift from eager; prints the "
        "speed: block")
    speed.add_argument("target", metavar="MANIFEST")
    speed.add_argument("--try", dest="candidates", action="append", metavar="SETTINGS",
                       help="a candidate such as `compile=blocks,quantize=fp8` or `cache=first_block:0.05` "
                            "(`cache=taylorseer:interval=4,warmup=2`; repeatable; default: compile=blocks, "
                            "compile=blocks,quantize=fp8 and attention=sage, each where it can run; eager is always "
                            "measured)")
    speed.add_argument("--steps", type=int, default=None,
                       help="denoising steps of the short real job (default 4); with a cache candidate, also the "
                            "steps of the whole jobs it and eager run (default: the manifest's)")
    speed.add_argument("--warm", action="store_true",
                       help="also time each compiled candidate's first call with its compile cache filled")
    download = models_sub.add_parser("download", help="download a checkpoint from the Hugging Face hub (resumable)")
    download.add_argument("repo_id", metavar="REPO_ID")
    download.add_argument("--to", required=True, metavar="DIR", help="the folder to download into")
    download.add_argument("--revision", help="a branch, tag or commit")
    download.add_argument("--file", action="append", dest="files", metavar="NAME",
                          help="only this file of the repository (a glob; repeatable), e.g. one LoRA")
    return parser


EXIT_READER_GONE = 141  # what a shell reports for a program ended by SIGPIPE (`yes | head -1`)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "run")
    args = _parser().parse_args(argv)
    try:
        return _command(args)
    except BrokenPipeError:  # `plan … | head -1`: the reader has what it wanted; end quietly
        _discard(sys.stdout)
        return EXIT_READER_GONE


def _command(args) -> int:
    manifest = None
    try:
        if args.command == "models":  # their argument is a checkpoint or a manifest: no load_manifest here
            return cmd_models(args)
        manifest = api.load(_recorded_manifest(args.manifest) if args.command == "report" else args.manifest)
        if args.command == "report" and os.path.isdir(args.manifest):
            _check_recorded(manifest, args.manifest)
        if getattr(args, "ray_address", None):
            from dataclasses import replace
            manifest = replace(manifest, execution=replace(manifest.execution, ray_address=args.ray_address))
        if args.command == "run":
            # Its workers must not be left half-started or unwatched because `| head -1` stopped reading.
            with _output_may_close():
                return cmd_run(manifest, args)
        return {"plan": cmd_plan, "report": cmd_report, "stop": cmd_stop}[args.command](manifest, args)
    except sqlite3.DatabaseError as exc:  # damaged, or in a read-only or full folder
        if manifest is None:
            raise
        return _fail(args, LedgerError(ledger_problem(Sweep(manifest).ledger_path, exc)))
    except WanSweepError as exc:
        return _fail(args, exc)


def _recorded_manifest(target: str) -> str:
    """`report OUTPUT_DIR`: the manifest the folder's `.sweep/sweep.json` records (`run` writes it), said on
    stderr; a manifest file as given."""
    import json
    from pathlib import Path
    folder = Path(target)
    if not folder.is_dir():
        return target
    record = folder / ".sweep" / OWNER_FILE
    try:
        owner = json.loads(record.read_text(encoding="utf-8"))
        name, recorded = owner["name"], Path(owner["manifest"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{folder} is a folder that holds no sweep (no readable {record}): give the manifest's "
                        "YAML file, or the output folder that a `run` of it has set up") from None
    if not recorded.is_file():
        raise UserError(f"{folder} holds the sweep `{name}`, but the manifest it records, {recorded}, is not there "
                        "(moved or deleted): give the manifest's YAML file where it is now") from None
    print(f"report of {folder}: its manifest is {recorded} (recorded in .sweep/sweep.json)", file=sys.stderr)
    return str(recorded)


def _check_recorded(manifest, folder: str) -> None:
    """The manifest an output folder records must still write there (it may have been edited since)."""
    from pathlib import Path
    if manifest.output_dir != Path(folder).resolve():
        raise UserError(f"{folder} records the manifest {manifest.path}, whose output_dir is now {manifest.output_dir}: "
                        f"report that folder, or give the manifest that writes into {Path(folder).resolve()}")


def _fail(args, exc: WanSweepError) -> int:
    """The one place an error becomes a message on stderr and the command's exit code."""
    message = str(exc)
    if isinstance(exc, ManifestError) and args.command == "models":  # only `fit` needs the whole manifest
        message = exc.describe("nothing was sized (fix it, or give models fit the checkpoint folder)")
    elif isinstance(exc, LedgerError) and args.command == "run":
        message += "\nNothing was started."
    print(f"error: {message}", file=sys.stderr)
    return exc.exit_code


def _discard(stream) -> None:
    """Point a stream's descriptor at /dev/null: its reader has gone (`| head`), and nothing written
    later, the interpreter's last flush included, may raise BrokenPipeError."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, stream.fileno())
    finally:
        os.close(devnull)


class _Outliving:
    """A stdout or stderr that outlives its reader: the first write to a closed pipe discards the
    rest of the output, and the command goes on."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            _discard(self._stream)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            _discard(self._stream)

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextmanager
def _output_may_close():
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Outliving(sys.stdout), _Outliving(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


def _options(args) -> dict:
    """The api's run and plan options (`RunOptions` fields) from the arguments."""
    return dict(executor=args.executor, cpu_slots=checked_cpu_slots(args.cpu_slots, "--cpu-slots"),
                recalibrate=args.recalibrate,
                allow_non_empty=args.allow_non_empty, follow=getattr(args, "follow", False),
                add_workers=getattr(args, "add_workers", False),
                redo_changed=getattr(args, "redo_changed", False),
                progress=not getattr(args, "no_progress", False))


def _say(text: str) -> None:
    print(text, flush=True)


def lora_lines(manifest) -> list[str]:
    """`plan`'s lines about the manifest's LoRAs: each file with its strength and expert."""
    lines = []
    for lora in manifest.model.loras:
        expert = "" if lora.expert == "both" else f", {lora.expert}-noise expert only"
        lines.append(f"{'LoRA' if not lines else '':<10} {lora.name}: {lora.path} at {axis_value_text(lora.strength)}"
                     f"{expert}")
    return lines


def model_change_lines(manifest, jobs, plan, done) -> list[str]:
    """`plan`'s lines on how often each queue's workers change their model between the jobs left: LoRA
    switches in place and reloads (`planning.model_changes`, the slot's own rule), and why a reload."""
    if not any(key == "quantize" or key == "loras" or key.startswith("loras.") for axis in manifest.axes
               for key in axis.keys):
        return []
    by_queue: dict[str, list] = {}
    for job in jobs:
        if job.id not in done:
            by_queue.setdefault(plan.queues[job.id], []).append(job)
    lines = []
    for queue, members in by_queue.items():
        counts = model_changes(members, manifest.model.backend)
        lines.append(f"{'changes' if not lines else '':<10} {queue}: each worker about {counts['switch']} LoRA "
                     f"switch(es) in place and {counts['reload']} reload(s) of the model")
    if lines and manifest.model.loras and (manifest.model.speed.quantize in FUSING_QUANTIZE or any(
            value in FUSING_QUANTIZE for axis in manifest.axes if "quantize" in axis.keys
            for value in (point["quantize"] for point in axis.assignments()))):
        lines.append(" " * 11 + "with quantize fp8/int8 the LoRAs are fused into the weights before quantizing: "
                                "a change of LoRA or strength loads the model again")
    elif lines and manifest.model.loras and not backend_class(manifest.model.backend).switches_loras:
        lines.append(" " * 11 + f"the {manifest.model.backend} backend cannot switch LoRAs in place: a change loads "
                                "the model again")
    return lines


def cmd_plan(manifest, args) -> int:
    planned = api.plan(manifest, **_options(args))
    sweep, plan, gpus, why, scan = planned.sweep, planned.plan, planned.gpus, planned.why, planned.scan
    ledger_note = _check_ledger(sweep)  # `run` refuses a damaged one: so does its dry run
    print(f"manifest   {manifest.path}")
    print(f"output     {manifest.output_dir}")
    print(f"model      {manifest.model.backend} {manifest.model.task} {manifest.model.path or ''}")
    g = manifest.generation
    print(f"settings   {g.width}x{g.height}, {g.num_frames} frames @ {g.fps} fps, {g.steps} steps")
    for axis in manifest.axes:
        values = ", ".join(" ".join(f"{key}={axis_value_text(value)}" for key, value in point.items())
                           if len(axis.keys) > 1 else axis_value_text(point[axis.keys[0]])
                           for point in axis.assignments())
        print(f"axis       {'+'.join(axis.keys)}: {values}")
    if manifest.axes:
        h = manifest.heaviest_generation
        print(f"sized for  the heaviest job: {h.width}x{h.height}, {h.num_frames} frames, {h.steps} steps")
    quantize = list(dict.fromkeys(point["quantize"] for axis in manifest.axes if "quantize" in axis.keys
                                  for point in axis.assignments()))
    if quantize:
        from dataclasses import replace
        speed = replace(manifest.model.speed, quantize="per job (the axis)")
        print(f"speed      {describe_speed(speed)}  (quantize is part of each job's identity)")
        print(f"           the jobs run one quantize after another ({' → '.join(quantize)}); "
              f"sized for quantize {manifest.heaviest_model.speed.quantize} (the most memory)")
    else:
        print(f"speed      {describe_speed(manifest.model.speed)}"
              + ("  (quantize is part of each job's identity)" if speed_identity(manifest.model.speed) else ""))
    for line in lora_lines(manifest):
        print(line)
    if gpus:
        for line in expected_times(manifest, gpus):
            print(f"           expected on {line}")
    print(f"jobs       {len(sweep.jobs)} ({len(scan.complete)} already done, "
          f"{len(sweep.jobs) - len(scan.complete)} to run)")
    for category, count in count_by_category(sweep.jobs).items():
        print(f"  {pad(category, 28)} {count:>6}")
    print()
    if why:
        print(f"GPUs       none usable: {why}")
    for group in plan.groups:
        if group.gpus:
            print(f"{group.queue:<10} {group.workers} worker(s)")
            for gpu in group.gpus:
                print(f"           {gpu.describe()}")
            print(f"           why: {group.reason}")
        else:
            print(f"{group.queue:<10} {group.workers} worker(s): {group.reason}" + ("" if group.devices else "  [CPU]"))
    for line in model_change_lines(manifest, sweep.jobs, plan, scan.complete):
        print(line)
    sizes = {queue: 0 for queue in plan.queue_sizes()}  # the jobs left to run: a done one is skipped
    for job_id, queue in plan.queues.items():
        sizes[queue] += job_id not in scan.complete
    done = sum(1 for job_id in plan.queues if job_id in scan.complete)
    print("queues     " + ", ".join(f"{q}: {n}" for q, n in sizes.items()) + "  (jobs left"
          + (f"; {done} already done" if done else "") + "; idle workers take from the fullest queue)")
    print(f"workers    {len(plan.workers)}: " + ", ".join(w.id for w in plan.workers))
    for note in plan.notes:
        print(f"note       {note}")
    for note in backend_class(manifest.model.backend).plan_notes(manifest):
        print(f"note       {note}")
    if ledger_note:
        print(ledger_note)
    if scan.stale:
        print(f"\n{len(scan.stale)} existing mp4s were made with other settings:\n" + sweep.describe_stale(scan.stale))
    return 0


def _check_ledger(sweep) -> str | None:
    """LedgerError when the sweep's ledger is damaged (as `run` would find it); else a note on rows of
    an unknown state, or None."""
    if not sweep.has_ledger():
        return None
    ledger = sweep.ledger(readonly=True)
    try:
        ledger.verify()
        return unknown_states_note(ledger.unknown_states())
    finally:
        ledger.close()


def cmd_run(manifest, args) -> int:
    return api.run(manifest, say=_say, **_options(args)).exit_code


def cmd_report(manifest, args) -> int:
    """Exit 1 when jobs failed for good (as `run` does), so a script can tell; else 0."""
    sweep = Sweep(manifest)
    check_folder(sweep, owner_only=True)
    baseline = parse_baseline(manifest, args.compare) if args.compare else None
    report = None
    try:
        while True:
            report = build_report(sweep, compare=baseline, say=lambda line: print(line, file=sys.stderr, flush=True))
            text = report_json(report, one_line=bool(args.watch)) if args.json else format_report(report)
            if args.html:
                try:
                    page = write_page(sweep, report, reload_s=args.watch)  # atomic: never half a page
                except FolderProblem as exc:
                    raise located_problem(manifest, "output_dir", exc.message, exc.fix, fallback="name") from None
                except OSError as exc:  # a read-only output folder, a full disk
                    raise UserError(f"cannot write the review page into {sweep.root}: {exc.strerror or exc} "
                                    "(make the folder writable or free some space)") from None
                if not args.watch:
                    text = str(page)
                elif not args.json:
                    text = f"{text}\n\nreview page: {page}"
            if not args.watch:
                print(text)
                break
            if args.json:  # JSON Lines, for a program that follows the output: no screen control
                print(text, flush=True)
            elif sys.stdout.isatty():  # a terminal: each report replaces the last on the screen
                print("\033[2J\033[H" + time.strftime("%H:%M:%S ") + text, flush=True)
            else:  # a pipe or a file (`| tee`, `> log`): the reports one after another, no screen control
                print(time.strftime("%H:%M:%S ") + text + "\n", flush=True)
            time.sleep(args.watch)
    except KeyboardInterrupt:  # the usual way to leave --watch, wherever it lands
        pass
    return 1 if report is not None and report.totals.failed else 0


def cmd_stop(manifest, args) -> int:
    stopped = api.stop(manifest, now=args.now, say=_say)
    if stopped is None:
        print(f"sweep `{manifest.name}` has no workers to stop ({manifest.output_dir}); a `run` of it that is "
              "starting now will start none")
        return 0
    print(f"stopped sweep `{manifest.name}`" + (" (killed)" if args.now else "") + f": {stopped} processes signalled")
    return 0


def cmd_models(args) -> int:
    if args.models_command == "download":
        checkpoint = checkpoints.download(args.repo_id, args.to, revision=args.revision, files=args.files)
        if checkpoint is not None:
            print(checkpoints.format_status(checkpoint))
        return 0
    if args.models_command == "fit" and args.target is None:
        # `fit --gpu 24GB x2 MANIFEST`: the --gpu words took the manifest too
        if args.gpu and len(args.gpu[-1]) > 1 and os.path.exists(args.gpu[-1][-1]):
            args.target = args.gpu[-1].pop()
        else:
            raise UserError("models fit needs a manifest or a checkpoint path")
    if args.models_command == "speed":
        return _models_speed(args)
    path, manifest = _model_target(args.target, need_manifest=args.models_command == "fit")
    if args.models_command == "status":
        checkpoint = checkpoints.inspect(path, task=manifest.model.task if manifest else _raw_task(args.target),
                                         layout=_raw_layout(args.target))
        print(checkpoints.format_status(checkpoint))
        if manifest is not None and manifest.model.loras:
            print("\nLoRAs of the manifest:")
            print("\n".join(loras.status_lines(lora_files(manifest), manifest.model.path,
                                               backend_class(manifest.model.backend).checkpoint_layout,
                                               {lora.name: lora.expert for lora in manifest.model.loras})))
        if checkpoint.problems:
            print(f"error: {checkpoint.error()}", file=sys.stderr)
            return 2
        return 0
    return _models_fit(args, path, manifest)


def _models_speed(args) -> int:
    manifest = api.load(args.target)
    check_checkpoint(manifest)
    texts = args.candidates or list(DEFAULT_CANDIDATES)
    parsed = [parse_candidate(text) for text in texts]
    # What `run` would refuse is refused here too, before any candidate loads the model (minutes): a
    # candidate asked for is an error (named as it was written); a default one is left out, saying why.
    refused = {text: candidate_problems(manifest, c) for text, c in zip(texts, parsed)}
    if args.candidates is not None and any(refused.values()):
        raise TrialError("\n".join(f"candidate `{name}`: {problem}" for name, problems in refused.items()
                                   for problem in problems) + "\nNothing was measured.")
    for name, problems in refused.items():
        if problems:
            print(f"{name} is left out of the defaults: {'; '.join(problems)}")
    candidates = [c for text, c in zip(texts, parsed) if not refused[text]]
    work = manifest.output_dir / ".sweep" / "speed_trial"
    whole = (f"; with a step cache, eager and the cached ones run a whole job of {args.steps or manifest.generation.steps} "
             "steps" if any(c.cache != "none" for c in candidates) else "")
    print(f"trying {1 + len([c for c in candidates if not c.is_default])} settings, each in a fresh process "
          f"(files in {work}{whole}) …", flush=True)
    results = run_trials(manifest, candidates, work, steps=args.steps or 4, warm=args.warm,
                         whole_job_steps=args.steps)
    print(format_trials(results, manifest))
    return 1 if any(r.get("error") for r in results) else 0


def _raw_task(target: str) -> str | None:
    """model.task of a manifest that does not load (its checkpoint may be why), for `models status` to
    say what that task needs; None for a checkpoint path."""
    return _raw_model_key(target, "task")


def _raw_layout(target: str) -> str | None:
    """The checkpoint layout the manifest's backend loads (diffsynth: `wan`, diffusers: `diffusers`), for
    `models status` to offer that release first when the folder is missing; None for a checkpoint path."""
    backend = _raw_model_key(target, "backend")
    return backend_class(backend).checkpoint_layout if backend in BACKENDS else None


def _raw_model_key(target: str, key: str) -> str | None:
    """model.<key> read from a manifest's YAML alone (it may not load); None for a checkpoint path."""
    from pathlib import Path
    if Path(target).suffix not in (".yaml", ".yml"):
        return None
    import yaml
    try:
        value = yaml.safe_load(Path(target).read_text(encoding="utf-8"))["model"].get(key)
    except Exception:
        return None
    return value if isinstance(value, str) else None


def _model_target(target: str, need_manifest: bool):
    """(checkpoint path, manifest or None) from a checkpoint path or a manifest's model.path."""
    from pathlib import Path
    file = Path(target)
    if file.suffix not in (".yaml", ".yml") or not file.is_file():
        return target, None
    try:
        manifest = api.load(file)
    except ManifestError:
        if need_manifest:
            raise
        # status works on a manifest whose other parts are not ready yet: read model.path alone
        import yaml
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8"))
            path = data["model"]["path"]
        except Exception:
            raise UserError(f"{file}: no model.path in it (give the checkpoint folder instead)") from None
        path = Path(str(path)).expanduser()
        return str(path if path.is_absolute() else file.parent / path), None
    if not manifest.model.path:
        raise UserError(f"{file}: its model has no path (backend {manifest.model.backend})")
    if not os.path.exists(manifest.model.path):
        layout = backend_class(manifest.model.backend).checkpoint_layout
        raise UserError(f"{file}: model.path {manifest.model.path} is not a local folder; "
                        + download_fix(manifest.model.path, layout, manifest.model.task))
    return manifest.model.path, manifest


# LoRA files whose adapters may be on the card at once: the active ones and the few a worker keeps loaded
# for the next switch (backends/diffusers_loras.KEEP_UNUSED_FILES beside the one in use).
KEPT_LORA_FILES = 4


def _adapter_bytes(manifest, quantize: str, bytes_per_param: int) -> int:
    """What the manifest's LoRAs hold on the card as unfused adapters (0 when they are fused into the
    weights, under an 8-bit quantize): the largest few files, each in every expert it goes into."""
    if not manifest.model.loras or quantize in FUSING_QUANTIZE:
        return 0
    experts = {lora.name: lora.expert for lora in manifest.model.loras}
    two = len(loras.model_linears(manifest.model.path, backend_class(manifest.model.backend).checkpoint_layout)) > 1
    sizes = []
    for _, name, path in lora_files(manifest):
        try:
            params = loras.adapter_params(loras.read_lora(path))
        except checkpoints.CheckpointError:
            continue
        sizes.append(params * bytes_per_param * (2 if two and experts.get(name) == "both" else 1))
    return sum(sorted(sizes, reverse=True)[:KEPT_LORA_FILES])


def _models_fit(args, path: str, manifest) -> int:
    checkpoint = checkpoints.verify(path)
    if manifest is not None:
        g = manifest.heaviest_generation  # with axes, the largest job must fit
        settings = checkpoints.Settings(g.width, g.height, g.num_frames, manifest.model.dtype,
                                        int(manifest.model.options.get("max_sequence_length", checkpoints.TEXT_TOKENS)))
        backend, options, margin = manifest.model.backend, dict(manifest.model.options), manifest.resources.memory_margin_gib
        quantize = manifest.heaviest_model.speed.quantize  # what calibration measured (axes: the heaviest)
        measured = checkpoints.measured_profiles(manifest)
        adapters = _adapter_bytes(manifest, quantize, settings.b)
        if adapters:
            margin += adapters / checkpoints.GIB
            print(f"LoRAs      as unfused adapters they hold {adapters / checkpoints.GIB:.2f} GiB on the card (each "
                  f"file's rank × (in + out) per layer, per expert it goes into, the largest {KEPT_LORA_FILES} "
                  f"files counted): added to the margin below\n")
    else:
        width, height = 832, 480
        if args.size:
            try:
                width, height = (int(v) for v in args.size.lower().split("x"))
            except ValueError:
                raise UserError(f"--size {args.size!r}: write WIDTHxHEIGHT, e.g. 832x480") from None
        settings = checkpoints.Settings(width, height, args.frames or 81, args.dtype or "bfloat16")
        backend, options, margin, measured, quantize = "diffusers", {}, 2.0, [], "none"
    if args.gpu:
        try:
            gpus = [checkpoints.parse_gpu(" ".join(words)) for words in args.gpu]
        except ValueError as exc:
            raise UserError(str(exc)) from None
        note = "named on the command line: an empty card of that size"
    else:
        gpus, why = checkpoints.machine_gpus()
        note = "this machine, free memory now" if gpus else None
        if why:
            print(f"no GPU on this machine ({why}); name one to size for, e.g. --gpu 24GB x2\n")
    print(checkpoints.fit_report(checkpoint, settings, gpus, margin, backend, options, measured, note, quantize))
    return 0


if __name__ == "__main__":
    sys.exit(main())
