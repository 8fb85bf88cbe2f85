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

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Callable

import yaml

from .compare import parse_baseline
from .errors import WanSweepError
from .executor_names import EXECUTOR_NAMES
from .jobs import expand as expand_jobs
from .manifest import MAX_NESTING, Manifest
from .outputs import TEMP_MARK
from .report import build_report
from .run import Preview, RunOptions, RunResult, check_folder, preview, run_sweep, stop_sweep
from .sweep import Sweep
from .validation import load_manifest

__all__ = ["ArgumentError", "Manifest", "RunOptions", "RunResult", "WanSweepError", "dict_manifest_path", "expand",
           "from_dict", "load", "plan", "report", "run", "stop"]


class ArgumentError(WanSweepError, TypeError, ValueError):
    """A function of this API called with an argument of the wrong type or value: the message names the
    function, the argument and the value given (also a TypeError and a ValueError, as Python's own are)."""


def _shown(value) -> str:
    """A value as a message shows it: its type and a short repr."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 80 else text[:77] + '...'}"


def _refuse(function: str, message: str) -> ArgumentError:
    return ArgumentError(f"api.{function}: {message}")


def _check_manifest(function: str, manifest) -> Manifest:
    if isinstance(manifest, Manifest):
        return manifest
    if isinstance(manifest, (str, os.PathLike)):
        hint = f"load it first: api.load({os.fspath(manifest)!r})"
    elif isinstance(manifest, dict):
        hint = "build it with api.from_dict(data)"
    else:
        hint = "get one from api.load(path) or api.from_dict(data)"
    raise _refuse(function, f"`manifest` must be a Manifest, not {_shown(manifest)}; {hint}")


def _check_path(function: str, argument: str, value, what: str) -> str:
    """`value` as a path's text: a str, or an os.PathLike giving one; no NUL characters."""
    text = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(text, str):
        raise _refuse(function, f"`{argument}` must be {what} (a str or pathlib.Path), not {_shown(value)}")
    if "\x00" in text:
        raise _refuse(function, f"`{argument}` {text!r} contains a NUL character, which no path can hold")
    return text


def _check_say(function: str, say) -> Callable[[str], None]:
    if say is not None and not callable(say):
        raise _refuse(function, f"`say` must be a function taking each line (e.g. print), or None, not {_shown(say)}")
    return say or (lambda line: None)


def _check_flag(function: str, argument: str, value) -> bool:
    if not isinstance(value, bool):
        raise _refuse(function, f"`{argument}` must be True or False, not {_shown(value)}")
    return value


def load(path: str | os.PathLike) -> Manifest:
    """Read and validate a manifest file (its backend's checks included); ManifestError lists every
    problem with its file and line."""
    if isinstance(path, Manifest):
        raise _refuse("load", f"`path` is a Manifest already ({path.path}); pass it on as it is")
    return load_manifest(_check_path("load", "path", path, "the manifest file's path"))


def dict_manifest_path(data: dict, base: str | os.PathLike = ".") -> Path:
    """Where `from_dict` writes the YAML of `data`: `<base>/.wan-sweep-<name>.yaml`."""
    base = _check_path("dict_manifest_path", "base", base, "a folder")
    name = data.get("name", "experiment") if isinstance(data, dict) else "experiment"
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(name))[:100] or "experiment"
    return Path(base).resolve() / f".wan-sweep-{safe}.yaml"


# What from_dict takes as a key or a value of `data`, as YAML writes it (a tuple becomes a list, a
# pathlib.Path its text); anything else is refused, naming where it is, not written as its repr.
_SCALARS = (str, int, float, bool, type(None))
_MAX_INT_BITS = 10_000  # (Python refuses to write an int of more than 4,300 digits as text)


def _where(path: tuple) -> str:
    return "data" + "".join(f"[{key!r}]" for key in path)


def _text_problem(text: str) -> str | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "holds a lone surrogate (half of a UTF-16 pair, such as '\\ud800'), which no text file can"
    return None


def _plain_scalar(value, path: tuple):
    """One value of `data` as YAML writes it, else an ArgumentError naming where it is."""
    if isinstance(value, os.PathLike) and isinstance(os.fspath(value), str):
        value = os.fspath(value)
    if isinstance(value, str) and _text_problem(value):
        raise _refuse("from_dict", f"{_where(path)} {_text_problem(value)}")
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > _MAX_INT_BITS:
        raise _refuse("from_dict", f"{_where(path)} is an integer of {value.bit_length():,} bits, too long to "
                                   "write (no setting takes one)")
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, (set, frozenset)):
        raise _refuse("from_dict", f"{_where(path)} is a set ({_shown(value)}), which has no order: give a list")
    if isinstance(value, (bytes, bytearray)):
        raise _refuse("from_dict", f"{_where(path)} is bytes {bytes(value)[:60]!r}; give text (decode it)")
    raise _refuse("from_dict", f"{_where(path)} is {_shown(value)}; give text, a number, True/False, None, "
                               "a list or a dict")


def _plain(data: dict) -> dict:
    """`data` as plain YAML values, checked in one walk without recursion (5,000 levels are refused, not a
    RecursionError): a structure that contains itself, nesting past the manifest's MAX_NESTING, keys and
    values of other types (bytes, sets, objects), lone surrogates, integers too long to write."""
    root: dict = {}
    # (the original container, its copy, its key path, {id: key path} of the containers holding it)
    stack: list[tuple] = [(data, root, (), {id(data): ()})]
    while stack:
        original, copy, path, above = stack.pop()
        if len(path) >= MAX_NESTING:
            raise _refuse("from_dict", f"{_where(path[:3])}… nests more than {MAX_NESTING} levels deep (a "
                                       "manifest needs about 6)")
        for key, value in original.items() if isinstance(original, dict) else enumerate(original):
            if isinstance(original, dict) and (not isinstance(key, _SCALARS) or isinstance(key, str)
                                               and _text_problem(key)):
                problem = _text_problem(key) if isinstance(key, str) else f"is {_shown(key)}; keys are text"
                raise _refuse("from_dict", f"a key of {_where(path)} {problem}")
            if isinstance(value, (dict, list, tuple)):
                if id(value) in above:
                    raise _refuse("from_dict", f"{_where(path + (key,))} refers back to {_where(above[id(value)])}, "
                                               "which holds it (a structure that contains itself)")
                child = {} if isinstance(value, dict) else []
                stack.append((value, child, path + (key,), {**above, id(value): path + (key,)}))
            else:
                child = _plain_scalar(value, path + (key,))
            if isinstance(copy, dict):
                copy[key] = child
            else:
                copy.append(child)
    return root


def from_dict(data: dict, base: str | os.PathLike = ".") -> Manifest:
    """A manifest from a dict shaped like the YAML (the README's keys), its relative paths starting
    at `base`. The dict is written as YAML to `dict_manifest_path(data, base)` and read by the same
    reader as a file, so a problem names that file and its line. Its values are what YAML holds (text,
    numbers, True/False, None, lists or tuples, dicts, and pathlib.Paths as their text): anything else
    is refused with an ArgumentError naming where it is (`data['name']`)."""
    if not isinstance(data, dict):
        raise _refuse("from_dict", f"`data` must be a dict shaped like the manifest's YAML, not {_shown(data)}"
                      + ("; to read a YAML file use api.load(path)" if isinstance(data, (str, os.PathLike)) else ""))
    plain = _plain(data)
    text = "# written by orchestrator.api.from_dict: the manifest given as a dict\n" + \
        yaml.safe_dump(plain, allow_unicode=True, sort_keys=False)
    path = dict_manifest_path(data, _check_path("from_dict", "base", base, "a folder"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=TEMP_MARK, suffix=".yaml", dir=path.parent)
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temp, path)  # whole: a second process reading it never sees half
    except OSError as exc:
        raise _refuse("from_dict", f"cannot write the manifest into `base` {str(path.parent)!r} "
                                   f"({exc.strerror or exc}); give a folder that can be written") from None
    return load_manifest(path)


def expand(manifest: Manifest, say: Callable[[str], None] | None = None) -> list:
    """Every job of the manifest, in its fixed order, with stable ids and checked output paths. A long
    expansion (200,000 jobs or more) says so first, and how far it got, to `say` (else it is logged)."""
    manifest = _check_manifest("expand", manifest)
    return expand_jobs(manifest, say=_check_say("expand", say) if say is not None else None)


def _options(function: str, executor: str | None, options: dict) -> RunOptions:
    """The RunOptions of `executor` and `options`, each checked: a known executor, known option names,
    flags True or False (cpu_slots is checked where it is used)."""
    if executor is not None and (not isinstance(executor, str) or executor not in EXECUTOR_NAMES):
        raise _refuse(function, f"`executor` is {executor!r}; use one of: {', '.join(EXECUTOR_NAMES)}, or None "
                                "(the manifest's execution.executor, else tmux)")
    fields = {field.name: field.default for field in dataclasses.fields(RunOptions) if field.name != "executor"}
    unknown = [name for name in options if name not in fields]
    if unknown:
        raise _refuse(function, f"unknown option{'s' if len(unknown) > 1 else ''} "
                                f"{', '.join(f'`{name}`' for name in unknown)}; the options are: {', '.join(fields)}")
    for name, value in options.items():
        if isinstance(fields[name], bool):
            _check_flag(function, name, value)
    return RunOptions(executor=executor, **options)


def plan(manifest: Manifest, executor: str | None = None, **options) -> Preview:
    """The dry run (`plan`): the checks `run` makes, the plan over the executor's resources
    (`.plan.workers`, `.plan.queues`) and what is already made (`.scan`); starts nothing. `options`
    are `RunOptions` fields (cpu_slots, recalibrate, allow_non_empty)."""
    manifest = _check_manifest("plan", manifest)
    return preview(manifest, _options("plan", executor, options))


def run(manifest: Manifest, executor: str | None = None, say: Callable[[str], None] | None = print,
        **options) -> RunResult:
    """Run the sweep (`run`) with any executor (`local`, `tmux`, `ray`; None: the manifest's, else
    tmux): `.exit_code` as the command's, `.report` the report at its end (None when a detaching
    executor left the workers running). `say` gets the lines the command prints (None: silent);
    `options` are `RunOptions` fields (progress, follow, redo_changed, add_workers, …)."""
    manifest = _check_manifest("run", manifest)
    say = _check_say("run", say)
    return run_sweep(manifest, _options("run", executor, options), say=say)


def report(manifest: Manifest, compare: str | None = None):
    """The sweep's report (`report`): a `report.Report` dataclass (per category, per worker, failed
    jobs, throughput, time left); `.to_dict()` is exactly what `report --json` prints. `compare`:
    `"AXIS=VALUE"` as `report --compare` takes it (`.compare`: each done video scored against that value's)."""
    manifest = _check_manifest("report", manifest)
    if compare is not None and not isinstance(compare, str):
        raise _refuse("report", f"`compare` must be \"AXIS=VALUE\" as text (e.g. \"steps=50\"), or None, "
                                f"not {_shown(compare)}")
    sweep = Sweep(manifest)
    check_folder(sweep, owner_only=True)
    return build_report(sweep, compare=parse_baseline(manifest, compare) if compare else None)


def stop(manifest: Manifest, now: bool = False, say: Callable[[str], None] | None = print) -> int | None:
    """Stop the sweep's workers (`stop`; `now`: kill them): how many processes were signalled, None
    when the sweep has no ledger (nothing to stop)."""
    manifest = _check_manifest("stop", manifest)
    now, say = _check_flag("stop", "now", now), _check_say("stop", say)
    sweep = Sweep(manifest)
    check_folder(sweep, owner_only=True)
    return stop_sweep(sweep, now=now, say=say)
