"""The tmux executor: one detached tmux session per worker, each running the supervisor.

A session is named `<experiment>-gpu<N>-w<K>` (`-gpu0+1-w0` for a worker spanning two cards,
`-cpu0-w0` for a CPU slot), so `tmux ls` reads like the plan and `tmux attach -t NAME` shows a worker
live: the job, its step progress, seconds per job, and the supervisor's restarts. A dropped SSH
connection kills nothing; a session ends by itself when its worker has no work left.

The only command tmux is given is `exec python -m orchestrator.supervisor SPEC.json`, with both paths
shell-quoted (tmux hands that string to a shell). Everything from the manifest stays in the spec file
the product wrote; the environment goes through tmux's own `-e` option (libtmux's `environment`), never
through a shell string. tmux also expands formats (`#{…}`, and `#(…)`, which runs a shell command) in
a new session's name (`-s`), window name (`-n`) and start directory (`-c`): session names never hold
a `#` (the manifest refuses one in `name`, and `session_name` replaces any other), and the window name
and start directory go through `tmux_literal`. The command and the `-e` values are not expanded. `ORCHESTRATOR_TMUX_SOCKET` (or `socket_name`) selects a private tmux server, as
`tmux -L NAME` does: the tests use one per test and never touch the user's server. Without it the
sessions live on tmux's default server, named explicitly (`-L default`): inside a pane of another server
a bare `tmux` command asks the server in `$TMUX`, while libtmux creates sessions without `$TMUX`, so an
unnamed server would put the sessions on one server and look for them on another.
"""
from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

from ..locks import is_sweep_process
from ..planning import WorkerSpec
from ..sweep import python_env
from .base import Executor, ExecutorError

SOCKET_ENV = "ORCHESTRATOR_TMUX_SOCKET"
DEFAULT_SOCKET = "default"  # tmux's own name for the server a plain `tmux` outside any pane uses
SWEEP_ENV = "ORCHESTRATOR_SWEEP"  # set in each session: the ledger path, to tell our sessions apart
# What a worker needs when a long-running tmux server's environment is too different to copy whole.
ESSENTIAL_ENV = re.compile(r"^(PATH|HOME|USER|LANG|LC_\w+|TMPDIR|VIRTUAL_ENV|CONDA_\w+|PYTHON\w*|LD_LIBRARY_PATH|"
                           r"CUDA_\w+|NVIDIA_\w+|NCCL_\w+|HF_\w+|HUGGINGFACE_\w+|TRANSFORMERS_\w+|TORCH\w*|"
                           r"PYTORCH_\w+|OMP_NUM_THREADS|MKL_\w+|ORCHESTRATOR_\w+)$")
MAX_ENV_BYTES = 12000  # tmux refuses a command message much over 16 KiB
log = logging.getLogger(__name__)


def session_name(experiment: str, worker: str) -> str:
    """`<experiment>-gpu0-w1` for worker `gpu0_worker1`, made safe as a tmux session name.

    tmux turns `.` and `:` into `_` (they separate window and pane in a target), and a leading `$`,
    `@`, `%` or `=` would make the name read as an id or an exact-match marker; whitespace and control
    characters make names awkward to type; `#` starts a tmux format (`#(cmd)` runs a command), so it
    becomes `_` too. Everything else, non-ASCII included, is kept.
    """
    match = re.fullmatch(r"(.+)_worker(\d+)", worker)
    slot = f"{match.group(1)}-w{match.group(2)}" if match else worker
    name = re.sub(r"[.:#\s\x00-\x1f\x7f]", "_", f"{experiment}-{slot}")
    if not name[:1].isalnum():
        name = "_" + name
    return name


def tmux_literal(text: str) -> str:
    """`text` as a tmux format that expands to itself: `##` is tmux's escape for a literal `#`."""
    return text.replace("#", "##")


class TmuxExecutor(Executor):
    name = "tmux"
    detaches = True

    def __init__(self, sweep, socket_name: str | None = None):
        super().__init__(sweep)
        import libtmux
        self.socket_name = socket_name or os.environ.get(SOCKET_ENV) or None
        self.server = libtmux.Server(socket_name=self.socket_name or DEFAULT_SOCKET)

    @classmethod
    def unavailable(cls) -> str | None:
        if shutil.which("tmux") is None:
            return ("tmux is not installed. Install it (`sudo apt-get install tmux` on Debian/Ubuntu, "
                    "`brew install tmux` on macOS) to run each worker in its own tmux session, or run "
                    "the sweep without it: `--executor local` (workers then stop with this command).")
        try:
            import libtmux  # noqa: F401
        except ImportError:
            return ("the Python package libtmux is missing: `pip install libtmux`, or run with "
                    "`--executor local`.")
        return None

    # ------------------------------------------------------------------ sessions
    def session_name(self, worker: str) -> str:
        return session_name(self.sweep.manifest.name, worker)

    def sessions(self) -> list:
        """This sweep's tmux sessions (those whose environment names this sweep's ledger)."""
        from libtmux.exc import LibTmuxException
        if not self.server.is_alive():
            return []
        prefix = session_name(self.sweep.manifest.name, "x")[:-1]  # "<experiment>-"
        ours = []
        try:
            candidates = [s for s in self.server.sessions if (s.session_name or "").startswith(prefix)]
        except LibTmuxException:
            return []
        for session in candidates:
            try:
                if session.getenv(SWEEP_ENV) == str(self.sweep.ledger_path):
                    ours.append(session)
            except LibTmuxException:
                continue  # it ended meanwhile
        return ours

    @staticmethod
    def _alive(session) -> bool:
        """A session whose pane still runs its command (not a dead pane kept by remain-on-exit)."""
        from libtmux.exc import LibTmuxException
        try:
            return any(pane.pane_dead != "1" for pane in session.panes)
        except LibTmuxException:
            return False

    def _pane_pids(self, sessions) -> list[int]:
        from libtmux.exc import LibTmuxException
        pids = []
        for session in sessions:
            try:
                pids += [int(p.pane_pid) for p in session.panes if p.pane_pid and p.pane_dead != "1"]
            except LibTmuxException:
                continue
        return pids

    def _environment(self) -> dict[str, str]:
        """What the session's command needs on top of what the tmux server already has.

        A server started just now (by this call) inherits this process's environment, so only what
        `python_env()` adds is passed. A server that has been running for days may hold an old
        environment: every variable that differs is passed, so the workers see what `run` saw.
        """
        from libtmux.exc import LibTmuxException
        wanted = python_env()
        wanted[SWEEP_ENV] = str(self.sweep.ledger_path)
        for key in ("TMUX", "TMUX_PANE"):
            wanted.pop(key, None)
        base: dict = dict(os.environ)
        if self.server.is_alive():
            try:
                base = self.server.show_environment()
            except LibTmuxException:
                pass
        env = {k: v for k, v in wanted.items() if base.get(k) != v}
        if sum(len(k) + len(v) + 4 for k, v in env.items()) > MAX_ENV_BYTES:
            env = {k: v for k, v in env.items() if ESSENTIAL_ENV.match(k)}
        return env

    # ------------------------------------------------------------------ Executor
    def start(self, specs: list[tuple[WorkerSpec, Path]]) -> list[str]:
        from libtmux.exc import TmuxSessionExists
        existing = {s.session_name: s for s in self.sessions()}
        names = []
        for spec, path in specs:
            name = self.session_name(spec.worker)
            old = existing.get(name)
            if old is not None:
                if self._alive(old):
                    log.warning("tmux session %s is already running: left as it is", name)
                    continue
                old.kill()  # a dead pane kept open to show why the worker failed
            elif self.server.is_alive() and self.server.has_session(name):
                raise ExecutorError(f"a tmux session named {name} exists and belongs to something else "
                                   f"(another output folder?); rename the experiment or end that session")
            command = " ".join(["exec", shlex.quote(sys.executable), "-m", "orchestrator.supervisor",
                                shlex.quote(str(Path(path).resolve()))])
            try:
                session = self.server.new_session(
                    session_name=name, window_name=tmux_literal(spec.worker), window_command=command,
                    start_directory=tmux_literal(os.getcwd()), environment=self._environment(), attach=False)
            except TmuxSessionExists:  # made between the check above and now, by something else
                raise ExecutorError(f"a tmux session named {name} appeared while starting the workers and "
                                    "belongs to something else; rename the experiment or end that session") from None
            try:
                # A finished worker closes its session, whatever the user's tmux.conf says; a worker
                # that failed for good keeps its pane (the supervisor asks for that) to show why.
                session.active_window.set_option("remain-on-exit", "off")
            except Exception:
                pass
            names.append(name)
        return names

    def attach_hints(self, names: list[str]) -> list[str]:
        if not names:
            return []
        # Inside a pane of another tmux server a bare `tmux` asks that server: name the sweep's then.
        socket = self.socket_name or (DEFAULT_SOCKET if os.environ.get("TMUX") else None)
        tmux = "tmux" + (f" -L {shlex.quote(socket)}" if socket else "")
        return [f"watch a worker: {tmux} attach -t {shlex.quote(names[0])}   (detach again: Ctrl-b d)",
                f"sessions:       {', '.join(names)}   (list them: {tmux} ls)"]

    def running(self) -> int:
        """How many of this sweep's sessions still run their supervisor."""
        if not self.server.is_alive():
            return super().running()
        return sum(self._alive(s) for s in self.sessions())

    def stop(self, now: bool = False, timeout_s: float = 30.0) -> int:
        """Stop the workers (ledger + signals, as every executor does), then end the sessions."""
        sessions = self.sessions()
        pids = self._pane_pids(sessions)
        processes = _descendants(pids)
        signalled = super().stop(now=now, timeout_s=timeout_s)
        from libtmux.exc import LibTmuxException
        for session in self.sessions():
            try:
                session.kill()
            except LibTmuxException:
                pass
        # Whatever the sessions ran and outlived them (a supervisor that had not yet registered).
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(_running(p) for p in processes):
            time.sleep(0.1)
        for process in processes:
            if _running(process) and is_sweep_process(process.pid):
                try:
                    process.send_signal(signal.SIGKILL)
                    signalled += 1
                except Exception:
                    pass
        return signalled


def _descendants(pids: list[int]) -> list:
    import psutil
    found = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            found += [process, *process.children(recursive=True)]
        except psutil.Error:
            continue
    return found


def _running(process) -> bool:
    import psutil
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
