"""The progress report: figures from the disk (what is done) and the ledger (what is in flight).

Done counts come from valid mp4s on disk, so the report is right even when the ledger is lost;
running jobs, failures, workers and speed come from the ledger when it exists. The counts are per
category and, for a manifest with `axes:`, per value of each axis too. With `--compare AXIS=VALUE` it also
holds each video's quality against the baseline value's (`compare`, which owns the scores and their cache).

Speed is measured from the attempts' own start and end times, over the last half hour of work: the
time between runs (a stopped sweep, a rerun that found nothing to do) is not work, so it neither
dilutes nor inflates the rate. Time left is the work left at the pace of the workers alive now.
"""
from __future__ import annotations

import json
import sqlite3
import time
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

from .compare import TABLE_HEADERS, Baseline, Comparison, compare_sweep, describe_gaps, table_rows
from .output_names import value_text
from .ledger import LedgerError, ledger_problem
from .worker_rows import WorkerRow
from .supervision import LOADING, STARTING
from .locks import alive_workers
from .sweep import DiskScan, Sweep
from .terminal import printable

WINDOW_S = 1800.0  # throughput is measured over the last half hour of work (or all of it, if less)
READ_BATCH = 256  # attempts read between two checks of whether the window is full


@dataclass
class CategoryRow:
    name: str
    expected: int = 0
    done: int = 0
    failed: int = 0
    running: int = 0
    stale: int = 0

    @property
    def left(self) -> int:
        return self.expected - self.done - self.failed

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.expected if self.expected else 100.0


@dataclass
class AxisRow(CategoryRow):
    """The jobs of one value of an axis; `name` is the value as file names and the review page show it
    (`output_names.value_text`: 5,3.5 for a [high, low] cfg pair), `value` the value itself."""
    value: Any = None


@dataclass
class Report:
    name: str
    output_dir: str
    generated_at: float
    categories: list[CategoryRow]
    workers: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    jobs_per_hour: float | None = None
    eta_s: float | None = None
    workers_alive: int = 0
    ledger: bool = True
    ledger_problem: str | None = None  # the ledger exists but cannot be read: counts are from the disk
    stop_reason: str | None = None  # why the workers stopped by themselves (a full disk)
    ledger_note: str | None = None  # what is odd in a ledger that reads (rows of an unknown state)
    # Per axis of the manifest (`axes:`), a row per value; {} without axes.
    axes: dict[str, list[AxisRow]] = field(default_factory=dict)
    # The LoRA files the jobs run (`model.loras`, a path axis's too): name, file, content digest, expert; their
    # strengths are per job (an axis's rows above). [] without LoRAs.
    loras: list[dict] = field(default_factory=list)
    # `report --compare AXIS=VALUE`: each done video scored against the baseline value's (None: not asked).
    compare: Comparison | None = None
    # The disk scan the counts came from (not in the JSON): the review page shows the same files.
    scan: DiskScan | None = field(default=None, repr=False, compare=False)

    @property
    def totals(self) -> CategoryRow:
        total = CategoryRow("total")
        for row in self.categories:
            for key in ("expected", "done", "failed", "running", "stale"):
                setattr(total, key, getattr(total, key) + getattr(row, key))
        return total

    def to_dict(self) -> dict:
        rows = [{**asdict(r), "left": r.left, "percent": round(r.percent, 2)} for r in self.categories]
        total = self.totals
        return {"name": self.name, "output_dir": self.output_dir, "generated_at": self.generated_at,
                "categories": rows,
                "totals": {**asdict(total), "left": total.left, "percent": round(total.percent, 2)},
                "workers": self.workers, "failed": self.failed, "jobs_per_hour": self.jobs_per_hour,
                "eta_s": self.eta_s, "workers_alive": self.workers_alive, "ledger": self.ledger,
                "ledger_problem": self.ledger_problem, "stop_reason": self.stop_reason,
                "ledger_note": self.ledger_note,
                "axes": {axis: [{"value": list(r.value) if isinstance(r.value, tuple) else r.value, "label": r.name,
                                 **{k: v for k, v in asdict(r).items() if k not in ("name", "value")},
                                 "left": r.left, "percent": round(r.percent, 2)} for r in values]
                         for axis, values in self.axes.items()},
                "loras": self.loras,
                **({"compare": self.compare.to_dict()} if self.compare is not None else {})}


def _loras(sweep: Sweep) -> list[dict]:
    """The manifest's LoRAs as the jobs run them (their files' digests filled in at expansion), each once."""
    seen: dict[tuple, dict] = {}
    for job in sweep.jobs:
        for lora in job.model.loras if job.model else ():
            seen.setdefault((lora.name, lora.path, lora.digest), {"name": lora.name, "file": lora.path,
                                                                  "digest": lora.digest, "expert": lora.expert})
    return list(seen.values())


def build_report(sweep: Sweep, compare: Baseline | None = None, say: Callable[[str], None] | None = None) -> Report:
    """The report; with `compare` (`compare.parse_baseline`), each done video scored against its baseline
    (`say` hears how many pairs are scored for the first time)."""
    now = time.time()
    scan = sweep.scan()
    rows: dict[str, CategoryRow] = {}
    axis_rows: dict[str, dict[str, AxisRow]] = {axis: {} for a in sweep.manifest.axes for axis in a.keys}
    by_id = {}
    tallies: dict[str, list[CategoryRow]] = {}  # job id -> the rows it counts in
    for job in sweep.jobs:
        counted = tallies[job.id] = [rows.setdefault(job.category, CategoryRow(job.category))]
        for key, value in job.axes.items():
            label = value_text(value)
            # (jobs carry their own axes: a job list built without the manifest's section still tallies)
            counted.append(axis_rows.setdefault(key, {}).setdefault(label, AxisRow(label, value=value)))
        by_id[job.id] = job
        for row in counted:
            row.expected += 1
            row.done += job.id in scan.complete
    for job in scan.stale:
        for row in tallies[job.id]:
            row.stale += 1
    report = Report(sweep.manifest.name, str(sweep.root), now, list(rows.values()),
                    ledger=sweep.has_ledger(), scan=scan,
                    axes={axis: list(values.values()) for axis, values in axis_rows.items()},
                    loras=_loras(sweep))
    if report.ledger:
        _read_ledger(report, sweep, by_id, tallies, scan, now)
    if report.stop_reason is None and report.totals.left and not report.workers_alive:
        # Why the workers stopped by themselves, where they could not say so (their ledger on that disk). Only
        # then: this tries a write into the folder, which a report following a running sweep need not do.
        report.stop_reason = sweep.storage_note()
    if compare is not None:
        report.compare = compare_sweep(sweep, scan.complete, compare, failed={f["id"] for f in report.failed},
                                       stale={job.id for job in scan.stale}, say=say)
    return report


def _read_ledger(report: Report, sweep: Sweep, by_id: dict, tallies: dict, scan: DiskScan, now: float) -> None:
    try:
        _add_ledger(report, sweep, by_id, tallies, scan, now)
    except (LedgerError, sqlite3.DatabaseError) as exc:  # damaged, or in a read-only folder
        problem = str(exc) if isinstance(exc, LedgerError) else ledger_problem(sweep.ledger_path, exc)
        for row in report.categories + [row for values in report.axes.values() for row in values]:
            row.running = row.failed = 0
        report.ledger, report.ledger_problem = False, problem
        report.workers, report.failed, report.jobs_per_hour, report.eta_s = [], [], None, None


def unknown_states_note(unknown: dict[str, int]) -> str | None:
    """What `report` and `plan` say of job rows in a state the ledger does not know (a damaged or
    hand-edited row): they count as not done, and the next `run` puts them back in the queue."""
    if not unknown:
        return None
    return (f"note: the ledger holds {sum(unknown.values())} job row(s) in a state it does not know "
            f"({', '.join(map(repr, unknown))}): they count as not done, and the next `run` puts them back "
            "in the queue")


def _add_ledger(report: Report, sweep: Sweep, by_id: dict, tallies: dict, scan: DiskScan, now: float) -> None:
    """What only the ledger knows: running and failed jobs, speed, workers."""
    ledger = sweep.ledger(readonly=True)
    try:
        workers = ledger.workers()
        # A worker the ledger calls alive that is not (`stop --now`, every process killed, a reboot) is
        # stopped: it holds no job and has no time left.
        gone = {w.id for w in workers if w.alive} - alive_workers(sweep.state_dir, ledger)
        live = {w.id for w in workers if w.alive} - gone
        # Only what the loop below uses: running and failed jobs.
        for entry in ledger.jobs(running_or_failed=True):
            job = by_id.get(entry["id"])
            if job is None or job.id in scan.complete:
                continue
            if entry["state"] == "running" and entry["worker"] not in gone:
                for row in tallies[job.id]:
                    row.running += 1
            elif entry["state"] == "failed":
                for row in tallies[job.id]:
                    row.failed += 1
                report.failed.append({"job": job.key, "id": job.id, "attempts": entry["attempts"],
                                      "error": entry["last_error"], **({"axes": job.axes} if job.axes else {})})
        videos, busy_s = work_rate(ledger.timed_attempts())
        if videos and busy_s > 0:
            report.jobs_per_hour = videos / busy_s * 3600
        rates: dict[str, float | None] = {}
        for worker in workers:
            videos, busy_s = work_rate(ledger.timed_attempts(worker.id))
            rates[worker.id] = videos / busy_s if busy_s > 0 else None
        report.workers_alive = len(live)
        report.eta_s = time_left(report.totals.left, [rates[w] for w in live])
        for worker in workers:
            stopped = worker.id in gone
            current = by_id.get(worker.job) if worker.job and not stopped else None
            rate = rates[worker.id]
            report.workers.append({
                "id": worker.id, "state": "stopped" if stopped else worker.state,
                "devices": worker.devices, "host": worker.host, "jobs_done": worker.jobs_done,
                "mean_s": worker.busy_s / worker.jobs_done if worker.jobs_done else None,
                "jobs_per_hour": rate * 3600 if rate is not None else None,
                "current": current.key if current else None,
                "heartbeat_age_s": now - worker.heartbeat_at if worker.heartbeat_at else None,
                "restarts": worker.restarts, "ooms": worker.ooms, "message": worker.message,
                "phase": worker.phase if worker.state in ("starting", "loading") and not stopped else None})
        report.stop_reason = ledger.get_meta("stop_reason")
        report.ledger_note = unknown_states_note(ledger.unknown_states())
    finally:
        ledger.close()


def work_rate(attempts: Iterable[tuple[float, float, bool]], window_s: float = WINDOW_S) -> tuple[float, float]:
    """(videos made, seconds of work) over the last `window_s` seconds in which any of `attempts` ran.

    `attempts` are (start, end, made a video), the newest end first (`Ledger.timed_attempts`); only
    as many are read as fill the window. Time in which no attempt ran is not counted, so a sweep
    that stood still between two runs has the speed it had while it ran. An attempt that began
    before the window counts for the share of its time inside it (a job longer than the window
    still gives the right rate).
    """
    taken: list[tuple[float, float, bool]] = []
    for attempt in attempts:
        taken.append(attempt)
        # Every attempt not read yet ends before this one, so the work after this end is final.
        if len(taken) % READ_BATCH == 0 and _covered(taken, since=attempt[1]) >= window_s:
            break
    if not taken:
        return 0.0, 0.0
    segments = _union([(start, end) for start, end, _ in taken])
    cutoff, busy = segments[0][0], 0.0
    for start, end in reversed(segments):  # back from the newest work until the window is full
        if busy + (end - start) >= window_s:
            cutoff, busy = end - (window_s - busy), window_s
            break
        busy += end - start
    videos = 0.0
    for start, end, made in taken:
        if made and end >= cutoff:
            videos += 1.0 if start >= cutoff or end <= start else (end - cutoff) / (end - start)
    return videos, busy


def time_left(jobs_left: int, rates: list[float | None]) -> float | None:
    """Seconds to make `jobs_left` videos at the pace of the workers alive (their rates in videos
    per second; None for a worker not measured yet, which is taken to go as fast as the others)."""
    if jobs_left <= 0:
        return 0.0
    measured = [r for r in rates if r is not None]
    if not measured:
        return None  # no worker alive, or none has finished anything yet
    pace = sum(measured) + (len(rates) - len(measured)) * sum(measured) / len(measured)
    return jobs_left / pace if pace > 0 else None


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Disjoint, ascending segments covering the intervals (a worker writes one video while it makes
    the next, and workers run side by side, so attempts overlap)."""
    segments: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if segments and start <= segments[-1][1]:
            if end > segments[-1][1]:
                segments[-1] = (segments[-1][0], end)
        else:
            segments.append((start, end))
    return segments


def _covered(attempts: list[tuple[float, float, bool]], since: float) -> float:
    return sum(end - start for start, end in _union([(max(s, since), e) for s, e, _ in attempts if e > since]))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def describe_time_left(report: Report) -> str:
    """Time left as the text report and the review page say it."""
    if report.totals.left <= 0:
        return "-"
    if report.eta_s is not None:
        return _duration(report.eta_s)
    if not report.workers_alive:
        return "stopped (no worker is running; `run` resumes the sweep)"
    return "not known yet"


def workers_getting_ready(workers: list[WorkerRow]) -> str:
    """What the workers that have no job yet are doing, e.g. "2 workers loading the model (diffusers)":
    the progress bar's description while a first run imports and loads for seconds to minutes."""
    counts: dict[str, int] = {}
    for worker in workers:
        if worker.state in (STARTING, LOADING):
            phase = worker.phase or ("starting" if worker.state == STARTING else "loading the model")
            counts[phase] = counts.get(phase, 0) + 1
    return ", ".join(f"{n} worker{'s' if n != 1 else ''} {phase}" for phase, n in counts.items())

def display_width(text: str) -> int:
    """Columns `text` takes on a terminal: CJK (East Asian wide and full-width) characters take two,
    combining marks none, so tables of names like `镜头仰角旋转` line up."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def pad(text: str, width: int, right: bool = False) -> str:
    """`text` padded with spaces to `width` terminal columns (on the left when `right`)."""
    fill = " " * max(0, width - display_width(text))
    return fill + text if right else text + fill


def _table(headers: list[str], rows: list[list]) -> list[str]:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(display_width(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "  ".join(pad(c, w, right=i > 0) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return [fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]]


def format_report(report: Report) -> str:
    """The report as text for a terminal (names and errors with their control characters escaped)."""
    lines = [f"sweep {report.name}  ({report.output_dir})", ""]
    if report.ledger_problem:
        lines += [f"ledger unreadable: done counts are from the disk, nothing else is known. "
                  f"{report.ledger_problem}", ""]
    if report.stop_reason:
        lines += [report.stop_reason, ""]
    if report.ledger_note:
        lines += [report.ledger_note, ""]
    rows = [[r.name, r.expected, r.done, r.failed, r.running, r.left, f"{r.percent:.1f}%"]
            for r in report.categories + [report.totals]]
    lines += _table(["category", "expected", "done", "failed", "running", "left", "percent"], rows)
    for axis, values in report.axes.items():
        lines.append("")
        lines += _table([axis, "expected", "done", "failed", "running", "left", "percent"],
                        [[r.name, r.expected, r.done, r.failed, r.running, r.left, f"{r.percent:.1f}%"] for r in values])
    total = report.totals
    lines.append("")
    if report.jobs_per_hour:
        line = f"throughput {report.jobs_per_hour:.1f} videos/hour (last {WINDOW_S / 60:.0f} min of work)"
        lines.append(line + (f"; time left {describe_time_left(report)}" if total.left else ""))
    elif total.left:
        lines.append("throughput: not measured yet" + (f"; time left {describe_time_left(report)}" if report.ledger
                                                       else " (no ledger: counts are from disk)"))
    if total.stale:
        lines.append(f"{total.stale} mp4s were made with other settings and are not counted "
                     "(`run --redo-changed` moves them aside and makes them again)")
    if report.workers:
        lines.append("")
        wrows = [[w["id"], w["state"], w["jobs_done"], f"{w['mean_s']:.1f}s" if w["mean_s"] else "-",
                  w["current"] or "-", f"{_duration(w['heartbeat_age_s'])} ago" if w["heartbeat_age_s"] is not None else "-",
                  w["restarts"]] for w in report.workers]
        lines += _table(["worker", "state", "done", "s/job", "current job", "heartbeat", "restarts"], wrows)
        for w in report.workers:
            if w["state"] in ("failed", "retired") and w["message"]:
                lines.append(f"  {w['id']}: {w['message']}")
    if report.compare is not None:
        lines.append("")
        lines += format_comparison(report.compare)
    if report.failed:
        lines.append("")
        lines.append(f"failed jobs ({len(report.failed)}):")
        for f in report.failed[:50]:
            lines.append(f"  {f['job']} ({f['attempts']} attempts): {f['error']}")
        if len(report.failed) > 50:
            lines.append(f"  … and {len(report.failed) - 50} more (see --json)")
    return printable("\n".join(lines))


def format_comparison(comparison: Comparison) -> list[str]:
    """`--compare`'s lines: per value of the axis its scores against the baseline value and its speed, then
    the videos that could not be scored and why."""
    lines = [f"quality against {comparison.axis} = {comparison.baseline} (each done video against the one of "
             f"the same reference, prompt, seed and other axes at {comparison.axis} {comparison.baseline}; "
             "PSNR in dB over all pixels, SSIM the mean over frames)"]
    lines += _table([comparison.axis] + TABLE_HEADERS, table_rows(comparison))
    lines.append(f"LPIPS: {comparison.lpips}")
    lines += describe_gaps(comparison)
    return lines


def report_json(report: Report, one_line: bool = False) -> str:
    """The report as JSON; `one_line` for JSON Lines (`report --json --watch`: one object a line)."""
    return json.dumps(report.to_dict(), indent=None if one_line else 2, ensure_ascii=False)
