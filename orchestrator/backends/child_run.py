"""One run of a child program, supervised from a worker: started as an argument list (never through a
shell) in its own session, its output read line by line as the worker's sign of life (a tqdm bar's
steps parsed, an out-of-memory line noted, the tail kept), its process group ended when the worker
stops, and SIGTERM from the kernel if the worker dies (Linux `PR_SET_PDEATHSIG`)."""
from __future__ import annotations

import logging
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections import deque

from .cuda import OOM_MARKERS

log = logging.getLogger(__name__)

# A sampling bar of tqdm: "…| 12/40 [00:31<01:10,  2.61s/it]".
STEP_LINE = re.compile(r"(\d+)/(\d+) \[")
TAIL_LINES = 60
TAIL_CHARS = 4000
TERM_GRACE_S = 15.0  # torchrun needs a moment to pass SIGTERM to its ranks and reap them
PIPE_GRACE_S = 5.0  # the child has exited but something it started still holds the pipe open

# Run first in the child: ask the kernel for SIGTERM when the worker dies (even by SIGKILL), then
# become the real program. Python code as an argument, not a shell: the argv after it is untouched.
GUARD = """\
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass  # not Linux: the worker's own clean-up still applies
if os.getppid() != int(sys.argv[1]):
    sys.exit(143)  # the worker died before the request took effect
os.execvp(sys.argv[2], sys.argv[2:])
"""


class ChildRun:
    """One run of the program: its output read line by line, steps parsed, its group killed at the end."""

    def __init__(self, argv: list[str], steps: int, progress):
        self.argv, self.steps, self.progress = argv, steps, progress
        self.step = 0
        self.step_times: list[tuple[int, float]] = []  # (step, seconds since start) as steps increase
        self.lines: deque[str] = deque(maxlen=TAIL_LINES)
        self.last_was_bar = False
        self.oom_line: str | None = None
        self.reported = float("-inf")
        self.facts: dict = {"command": list(argv), "exit_code": None}

    def run(self, env: dict, cwd: str | None) -> int:
        started = time.monotonic()
        self.started = started
        proc = subprocess.Popen([sys.executable, "-c", GUARD, str(os.getpid()), *self.argv],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=env, cwd=cwd, start_new_session=True)
        try:
            self._read(proc)
            code = proc.wait()
        finally:
            if proc.poll() is None:
                end_group(proc)
            proc.stdout.close()
            self._record(proc.returncode, time.monotonic() - started)
        return code

    def _read(self, proc: subprocess.Popen) -> None:
        fd = proc.stdout.fileno()
        pending = b""
        exited_at = None
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while True:
                if selector.select(timeout=1.0):
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        break
                    pending += chunk
                    *lines, pending = re.split(rb"[\r\n]", pending)
                    for line in lines:
                        self._line(line.decode("utf-8", errors="replace"))
                elif proc.poll() is not None:
                    exited_at = exited_at or time.monotonic()
                    if time.monotonic() - exited_at > PIPE_GRACE_S:
                        log.warning("%s exited, but a process it started still holds its output open: not read "
                                    "further", self.argv[0])
                        break  # a grandchild holds the pipe open; the program itself is done
        if pending:
            self._line(pending.decode("utf-8", errors="replace"))

    def _line(self, line: str) -> None:
        if not line.strip():
            return
        if any(marker in line for marker in OOM_MARKERS):
            self.oom_line = line.strip()[:300]
        match = STEP_LINE.search(line)
        bar = match is not None and int(match.group(2)) == self.steps
        # tqdm redraws its bar with \r: keep the latest drawing only, as a terminal would show it
        if bar and self.last_was_bar and self.lines:
            self.lines[-1] = line.rstrip()
        else:
            self.lines.append(line.rstrip())
        self.last_was_bar = bar
        now = time.monotonic()
        if bar:
            step = int(match.group(1))
            if step > self.step or not self.step_times:  # ranks draw the same bar; count it once
                self.step = max(self.step, step)
                self.step_times.append((self.step, now - self.started))
                self.reported = now
                self.progress(self.step, self.steps)
                return
        # Any other line is a sign of life too (a model loading for minutes logs as it goes); once a
        # second is plenty, and keeps the worker from printing the same step again and again.
        if now - self.reported >= 1.0:
            self.reported = now
            self.progress(self.step, self.steps)

    def _record(self, code: int | None, wall: float) -> None:
        facts = self.facts
        facts["exit_code"] = code
        facts["wall_seconds"] = round(wall, 3)
        if self.step_times:
            first_step, first_at = self.step_times[0]
            last_step, last_at = self.step_times[-1]
            # The first drawing of the bar (0/N) comes once the model is loaded and the prompt encoded.
            facts["startup_seconds"] = round(first_at, 3)
            if last_step > first_step:
                facts["seconds_per_step"] = round((last_at - first_at) / (last_step - first_step), 4)
            facts["steps_seen"] = last_step
        facts["output_tail"] = self.tail()

    def tail(self) -> str:
        text = "\n".join(self.lines)
        return text[-TAIL_CHARS:]

    def summary(self) -> str:
        """The line that most likely says what went wrong."""
        for line in reversed(self.lines):
            if re.search(r"(Error|Exception|error:|Traceback|assert)", line) and not line.startswith(" " * 4):
                return line.strip()[:300]
        return next((line.strip()[:300] for line in reversed(self.lines)), "(no output)")


def end_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the child's process group (torchrun passes it to its ranks), then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            if sig == signal.SIGTERM:
                log.warning("process group %d did not end within %.0f s of SIGTERM: killed", proc.pid, grace)
            continue
