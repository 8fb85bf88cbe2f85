"""The supervisor: runs one worker process, restarts it when it dies, replaces it when it hangs.

Every executor starts this same program (`python -m orchestrator.supervisor SPEC.json`): as a child
process (local), inside a tmux session (tmux), or inside an actor (ray). The worker's output passes
through to the supervisor's stdout (the tmux pane); the worker also writes it to its log file.

Restarts pause 1, 2, 4 … 60 s; after `max_restarts` crashes in a row without a finished job the
worker is marked failed, with the reason in the ledger, the log and on screen.
"""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime

from .ledger import Ledger
from .locks import hold_worker_lock
from .planning import WorkerSpec
from .supervision import GiveUp, Policy, Restart
from .sweep import python_env
from .terminal import printable
from .worker import EXIT_DONE, EXIT_RETIRED, EXIT_UNWRITABLE, detach_from_terminal

POLL_S = 0.5


def _say(spec: WorkerSpec, message: str) -> None:
    line = printable(f"{datetime.now():%Y-%m-%d %H:%M:%S} SUPERVISOR [{spec.worker}] {message}")
    try:
        print(line, flush=True)
    except OSError:  # the terminal (tmux pane) is gone; the log still gets the line
        pass
    try:
        with open(spec.log, "a", encoding="utf-8") as log:
            log.write(line + "\n")
    except OSError:  # a full disk: the pane still has the line
        pass


def _keep_pane_open() -> None:
    """Inside a tmux pane: keep it open after this process exits, so the reason stays on screen."""
    pane_id = os.environ.get("TMUX_PANE")
    if not pane_id or not os.environ.get("TMUX"):
        return
    try:
        import libtmux
        pane = libtmux.Pane.from_pane_id(libtmux.Server.from_env(), pane_id)
        pane.set_option("remain-on-exit", "on")
    except Exception:  # no libtmux, an old tmux, a server gone: the log has the reason anyway
        pass


def worker_env(spec: WorkerSpec) -> dict[str, str]:
    env = python_env()
    env["ORCHESTRATOR_SUPERVISOR_PID"] = str(os.getpid())
    if spec.devices:
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # CUDA numbers cards as NVML does
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, spec.devices))
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def after_death(ledger, policy: Policy, worker: str, reason: str, crashes_in_row: int,
                finished_a_job: bool) -> tuple[Restart | GiveUp, int, int | None]:
    """A worker's process died (`reason`), under any executor (a process here, a Ray actor on a cluster):
    its claims go back by the ledger's dead-claims rule (`requeue_worker`: the job it generated is
    charged, a video it was still writing is not), and the policy decides. GiveUp: the worker is marked
    failed. Restart: it is marked restarting. Returns (the decision, how many jobs went back, the
    restart's number or None)."""
    lost = ledger.requeue_worker(worker, reason)
    decision = policy.after_crash(reason, crashes_in_row, finished_a_job)
    if isinstance(decision, GiveUp):
        ledger.worker_failed(worker, decision.message)
        return decision, lost, None
    row = ledger.worker(worker)
    restarts = (row.restarts if row else 0) + 1
    ledger.worker_restarting(worker, restarts, reason)
    return decision, lost, restarts


class Supervisor:
    def __init__(self, spec_path: str):
        self.spec_path = spec_path
        self.spec = spec = WorkerSpec.read(spec_path)
        self.lock = hold_worker_lock(spec)  # for its whole life: a second `run` sees the sweep running
        self.ledger = Ledger(spec.ledger)
        self.child: subprocess.Popen | None = None
        self.stopping = False
        self.policy = Policy.of(spec.execution)

    def _on_signal(self, signum, frame):
        if signum == signal.SIGHUP:
            detach_from_terminal()
        self.stopping = True
        if self.child and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_signal)
        spec = self.spec
        self.ledger.register_worker(spec.worker, spec.devices, supervisor_pid=os.getpid(), state="starting")
        crashes_in_row = 0
        while True:
            if self.ledger.stop_requested() or self.stopping:
                _say(spec, "stop requested: not starting the worker")
                return 0
            done_before = self._jobs_done()
            self.child = subprocess.Popen([sys.executable, "-m", "orchestrator.worker", self.spec_path],
                                          env=worker_env(spec))
            reason = self._watch()
            code = self.child.returncode
            if code == EXIT_UNWRITABLE and reason is None:
                _say(spec, "the output folder's disk is full or read-only: the worker stopped cleanly and is "
                           "not restarted (make room or make it writable, and run the sweep again)")
                return 0
            if code in (EXIT_DONE, EXIT_RETIRED) and reason is None:
                if code == EXIT_RETIRED:
                    _say(spec, "worker retired itself after repeated out-of-memory; not restarting")
                return 0
            if self.stopping:
                self.ledger.requeue_worker(spec.worker, "worker stopped")
                self.ledger.worker_exited(spec.worker)  # if it died before saying so
                return 0
            reason = reason or f"worker exited with code {code}"
            decision, lost, restarts = after_death(self.ledger, self.policy, spec.worker, reason, crashes_in_row,
                                                   finished_a_job=self._jobs_done() > done_before)
            crashes_in_row = decision.crashes_in_row
            if isinstance(decision, GiveUp):
                _say(spec, "FAILED: " + decision.message)
                _keep_pane_open()
                return 1
            _say(spec, f"{reason}; {lost} job(s) back to the queue; restarting in {decision.delay_s:.0f}s "
                       f"(restart {restarts}, {crashes_in_row} in a row)")
            deadline = time.monotonic() + decision.delay_s
            while time.monotonic() < deadline and not self.stopping:
                time.sleep(0.1)

    def _jobs_done(self) -> int:
        row = self.ledger.worker(self.spec.worker)
        return row.jobs_done if row else 0

    def _watch(self) -> str | None:
        """Wait for the child; kill it if its heartbeat stops. Return why it was killed, if it was."""
        child = self.child
        while child.poll() is None:
            time.sleep(POLL_S)
            if self.stopping:
                continue
            try:
                worker = self.ledger.worker(self.spec.worker)
            except sqlite3.Error:  # a ledger on a disk gone read-only: the worker says so and exits
                continue
            if worker is None or worker.pid != child.pid:
                continue  # not registered yet
            # The worker's heartbeat thread stops beating while its loop shows no progress (`Policy.hung`).
            age = time.time() - (worker.heartbeat_at or time.time())
            if self.policy.hung(age):
                child.kill()
                child.wait()
                return f"no heartbeat for {age:.0f}s (hung?): killed the worker"
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m orchestrator.supervisor SPEC.json", file=sys.stderr)
        return 2
    return Supervisor(argv[0]).run()


if __name__ == "__main__":
    sys.exit(main())
