"""The progress report: figures from the disk (what is done) and the ledger (what is in flight).

Done counts come from valid mp4s on disk, so the report is right even when the ledger is lost;
running jobs, failures, workers and speed come from the ledger when it exists.
"""
from __future__ import annotations

import json
import time
import unicodedata
from dataclasses import asdict, dataclass, field

from .sweep import DiskScan, Sweep

WINDOW_S = 1800.0  # throughput is measured over the last half hour (or since the sweep started)


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
class Report:
    name: str
    output_dir: str
    generated_at: float
    categories: list[CategoryRow]
    workers: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    jobs_per_hour: float | None = None
    eta_s: float | None = None
    ledger: bool = True
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
                "eta_s": self.eta_s, "ledger": self.ledger}


def build_report(sweep: Sweep) -> Report:
    now = time.time()
    scan = sweep.scan()
    rows: dict[str, CategoryRow] = {}
    by_id = {}
    for job in sweep.jobs:
        row = rows.setdefault(job.category, CategoryRow(job.category))
        row.expected += 1
        by_id[job.id] = job
        if job.id in scan.complete:
            row.done += 1
    for job in scan.stale:
        rows[job.category].stale += 1
    report = Report(sweep.manifest.name, str(sweep.root), now, list(rows.values()),
                    ledger=sweep.has_ledger(), scan=scan)
    if not report.ledger:
        return report
    ledger = sweep.ledger()
    try:
        recent: list[float] = []
        # Only what the loop below uses: running, failed, and done within the window.
        for entry in ledger.jobs(report_since=now - WINDOW_S):
            job = by_id.get(entry["id"])
            if job is None or job.id in scan.complete:
                if job is not None and entry["state"] == "done" and not entry["skipped"] \
                        and entry["finished_at"] and now - entry["finished_at"] < WINDOW_S:
                    recent.append(entry["finished_at"])
                continue
            row = rows[job.category]
            if entry["state"] == "running":
                row.running += 1
            elif entry["state"] == "failed":
                row.failed += 1
                report.failed.append({"job": job.key, "id": job.id, "attempts": entry["attempts"],
                                      "error": entry["last_error"]})
        started = float(ledger.get_meta("started_at", "0") or 0)
        span = min(WINDOW_S, now - started) if started else WINDOW_S
        if recent and span > 0:
            report.jobs_per_hour = len(recent) / span * 3600
            left = report.totals.left
            report.eta_s = left / report.jobs_per_hour * 3600 if report.jobs_per_hour else None
        for worker in ledger.workers():
            current = by_id.get(worker["job"]) if worker["job"] else None
            report.workers.append({
                "id": worker["id"], "state": worker["state"], "devices": worker["devices"],
                "host": worker["host"], "jobs_done": worker["jobs_done"],
                "mean_s": worker["busy_s"] / worker["jobs_done"] if worker["jobs_done"] else None,
                "current": current.key if current else None,
                "heartbeat_age_s": now - worker["heartbeat_at"] if worker["heartbeat_at"] else None,
                "restarts": worker["restarts"], "ooms": worker["ooms"], "message": worker["message"]})
    finally:
        ledger.close()
    return report


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


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
    lines = [f"sweep {report.name}  ({report.output_dir})", ""]
    rows = [[r.name, r.expected, r.done, r.failed, r.running, r.left, f"{r.percent:.1f}%"]
            for r in report.categories + [report.totals]]
    lines += _table(["category", "expected", "done", "failed", "running", "left", "percent"], rows)
    total = report.totals
    lines.append("")
    if report.jobs_per_hour:
        lines.append(f"throughput {report.jobs_per_hour:.1f} videos/hour (last {WINDOW_S / 60:.0f} min); "
                     f"time left {_duration(report.eta_s)}")
    elif total.left:
        lines.append("throughput: not measured yet" + ("" if report.ledger else " (no ledger: counts are from disk)"))
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
    if report.failed:
        lines.append("")
        lines.append(f"failed jobs ({len(report.failed)}):")
        for f in report.failed[:50]:
            lines.append(f"  {f['job']} ({f['attempts']} attempts): {f['error']}")
        if len(report.failed) > 50:
            lines.append(f"  … and {len(report.failed) - 50} more (see --json)")
    return "\n".join(lines)


def report_json(report: Report) -> str:
    return json.dumps(report.to_dict(), indent=2, ensure_ascii=False)
