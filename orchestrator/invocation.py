"""How the user started this program, so that every command line it prints (`progress: … report …`,
download fixes) can be pasted into a shell in any folder, and `--help` names the program as started.

Must not know: manifests, sweeps (it only looks at sys.argv, sys.executable and PATH).
"""
from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

CONSOLE_SCRIPT = "wan-sweep"  # pyproject.toml's [project.scripts]
ENTRY_SCRIPT = Path(__file__).resolve().parent.parent / "run_experiment.py"  # in a checkout, not a wheel


def _started() -> str:
    return sys.argv[0] if sys.argv and sys.argv[0] else ""


def _as_module() -> bool:
    return Path(_started()).name == "__main__.py"  # python -m orchestrator


def program_name() -> str:
    """What `--help` calls the program, as it was started: `wan-sweep`, `python -m orchestrator` or
    `run_experiment.py`."""
    name = Path(_started()).name
    if name == CONSOLE_SCRIPT:
        return CONSOLE_SCRIPT
    return "python -m orchestrator" if _as_module() else ENTRY_SCRIPT.name


def _python() -> str:
    """`python` where that is this interpreter (a venv is active), else this interpreter's path: a
    fresh shell's `python` may lack the packages (`No module named 'av'`)."""
    found = shutil.which("python")
    if found and os.path.abspath(found) == os.path.abspath(sys.executable):
        return "python"
    return shlex.quote(sys.executable)


def command_prefix() -> str:
    """The start of a command line that runs this program from any folder: `wan-sweep` when it was
    started so (its full path where another or none is on PATH), else this interpreter and the absolute
    path of run_experiment.py (`-m orchestrator` for an installed package without one)."""
    started = _started()
    if Path(started).name == CONSOLE_SCRIPT:
        found = shutil.which(CONSOLE_SCRIPT)
        script = shutil.which(started) or started  # a bare name was found on PATH to start it
        if found and os.path.abspath(found) == os.path.abspath(script):
            return CONSOLE_SCRIPT
        return shlex.quote(os.path.abspath(script))
    if ENTRY_SCRIPT.is_file():
        return f"{_python()} {shlex.quote(str(ENTRY_SCRIPT))}"
    return f"{_python()} -m orchestrator"


def shell_path(path: str | os.PathLike) -> str:
    """A path for a printed command: relative where it lies under the working folder (short, and what
    the user typed), absolute otherwise; quoted for a shell."""
    absolute = Path(os.path.abspath(path))
    try:
        shown = str(absolute.relative_to(Path.cwd()))
    except ValueError:
        shown = str(absolute)
    return shlex.quote(shown)
