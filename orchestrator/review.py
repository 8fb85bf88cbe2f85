"""The review page's data: what one self-contained HTML file shows of a sweep's videos and its progress.

This module owns gathering it (`build_page`: from `report.build_report`, the disk scan and the ledger's
job, attempt and worker rows), the poster thumbnails cached beside each mp4, the references linked (or
copied) into `.sweep/refs/`, and the layout of the per-worker activity plot. Rendering it with the
template and writing `<output_dir>/index.html` is `review_html`. Every link in the page is relative to
output_dir and URL-quoted, so the folder can be copied elsewhere and opened from disk; nothing is
fetched from the network.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import av

from .worker_rows import WorkerRow
from .output_names import value_text
from .outputs import TEMP_MARK, file_mode
from .compare import TABLE_HEADERS, Comparison, db_text, describe_gaps, ratio_text, score_text, table_rows
from .report import WINDOW_S, CategoryRow, Report, _duration, _union, build_report, describe_time_left
from .sweep import Sweep

log = logging.getLogger(__name__)

THUMB_SUFFIX = ".thumb.jpg"
THUMB_WIDTH = 320  # twice the tile width, so posters stay sharp on high-density screens
TILE_WIDTH = 160
MIN_RELOAD_S = 30.0  # reloading restarts every video; more often than this makes the page unwatchable
PLOT_WIDTH = 900.0
LANE_HEIGHT = 16.0
LABEL_WIDTH = 190.0
PARALLEL_FROM = 8  # posters to make per extra process; fewer are quicker made in this one


# ------------------------------------------------------------------------------------------ data
@dataclass
class Tile:
    """One job's place in the grid: one seed of one (reference, prompt) cell."""
    id: str
    key: str
    seed: int
    state: str  # done | running | failed | retrying | pending | stale
    prompt: str
    video: str | None = None  # URL relative to output_dir
    poster: str | None = None
    worker: str | None = None
    log: str | None = None
    attempts: int = 0
    error: str | None = None
    seconds: float | None = None
    axes: str = ""  # the job's axis values in words (`cfg_scale 3 · steps 30`); "" without axes
    score: str = ""  # `report --compare`: its PSNR and SSIM against its baseline, "baseline" for one; "" else

    @property
    def label(self) -> str:
        return {"done": "", "running": "running", "failed": "failed", "retrying": "retrying",
                "pending": "not made yet", "stale": "other settings"}[self.state]

    @property
    def hover(self) -> str:
        lines = [self.key, f"seed {self.seed}" + (f" · {self.axes}" if self.axes else ""), self.prompt]
        if self.seconds:
            lines.append(f"{self.seconds:.1f} s to make")
        if self.worker and self.state in ("running", "failed", "retrying"):
            lines.append(f"worker {self.worker}")
        if self.attempts and self.state != "done":
            lines.append(f"{self.attempts} attempt{'s' if self.attempts != 1 else ''}")
        if self.error and self.state != "done":
            lines.append(self.error)
        if self.state == "stale":
            lines.append("an mp4 made with other settings is at this path (run --redo-changed)")
        if self.score:
            lines.append(self.score)
        return "\n".join(lines)


@dataclass
class Cell:
    prompt_index: int
    prompt: str
    tiles: list[Tile]


@dataclass
class Media:
    """A row's reference input: a video (with a poster) or an image."""
    kind: str  # video | image
    url: str
    name: str
    source: Path
    poster: str | None = None


@dataclass
class Row:
    stem: str | None
    reference: Media | None
    cells: list[Cell | None]  # one per column; None where this reference has fewer prompts


@dataclass
class Column:
    index: int
    prompt: str | None  # the shared prompt, or None when each reference has its own


@dataclass
class ComparisonRow:
    """One (reference, prompt, seed): its jobs side by side, one per axis combination."""
    stem: str | None
    prompt_index: int
    prompt: str
    seed: int
    tiles: list[Tile | None]  # one per column of the comparison; None where no job has that combination


@dataclass
class Comparison:
    """A category's jobs that differ only in axis values, compared side by side."""
    columns: list[str]  # each axis combination in words, in the manifest's order
    rows: list[ComparisonRow]


@dataclass
class Grid:
    category: str
    anchor: str
    kind: str  # videos | images | none
    columns: list[Column]
    rows: list[Row]
    counts: CategoryRow
    comparison: Comparison | None = None  # when the jobs have axes

    @property
    def cell_count(self) -> int:
        return sum(1 for row in self.rows for cell in row.cells if cell is not None)


@dataclass
class Bar:
    x: float
    width: float
    outcome: str
    title: str
    count: int = 1


@dataclass
class Lane:
    worker: str
    device: str
    log: str | None
    busy_percent: float
    bars: list[Bar]


@dataclass
class Activity:
    """Per-worker attempts over time, laid out in SVG units (the template draws them)."""
    lanes: list[Lane]
    ticks: list[tuple[float, str]]
    width: float = PLOT_WIDTH
    label_width: float = LABEL_WIDTH
    lane_height: float = LANE_HEIGHT

    @property
    def height(self) -> float:
        return len(self.lanes) * self.lane_height + 22


@dataclass
class Failure:
    key: str
    id: str
    attempts: int
    error: str | None
    worker: str | None
    log: str | None


@dataclass
class Quality:
    """`report --compare`'s figures as the page shows them: a row per axis value, the scored videos worst
    first (a link to each one's tile), and what could not be scored."""
    axis: str
    baseline: str
    headers: list[str]
    rows: list[list[str]]
    videos: list[dict]  # {id, job, value, psnr, ssim, seconds, baseline}: the first MAX_QUALITY_ROWS, worst first
    video_count: int
    gaps: list[str]
    lpips: str


MAX_QUALITY_ROWS = 200


@dataclass
class Page:
    report: Report
    title: str
    manifest: str
    task: str
    settings: str
    generated: str
    grids: list[Grid]
    failures: list[Failure]
    workers: list[dict]
    activity: Activity | None
    throughput: str
    time_left: str
    tile_width: int = TILE_WIDTH
    tile_height: int = TILE_WIDTH
    seed_columns: int = 1
    reload_s: int | None = None
    notes: list[str] = field(default_factory=list)
    quality: Quality | None = None  # with `report --compare`

    @property
    def cell_count(self) -> int:
        return sum(grid.cell_count for grid in self.grids)


# ------------------------------------------------------------------------------------------ paths
def url(path: str | os.PathLike, root: Path) -> str:
    """A link from a page in `root` to `path`: relative, so the folder can move, and URL-quoted."""
    try:
        relative = os.path.relpath(path, root)
    except ValueError:  # another drive (Windows): only an absolute file URL can reach it
        return Path(path).resolve().as_uri()
    return quote(Path(relative).as_posix())


def anchor(category: str) -> str:
    return "cat-" + quote(category, safe="")


def thumb_path(mp4: str | os.PathLike) -> Path:
    mp4 = Path(mp4)
    return mp4.with_name(mp4.stem + THUMB_SUFFIX)


def keep_copy(source: Path, target: Path) -> bool:
    """Make `target` the same file as `source`: a hard link (no space used) where the file system
    allows, else a copy; made again only when `source` changed. False when neither can be made."""
    temp = target.with_name(f"{TEMP_MARK}{os.getpid()}-{target.name}")  # removed by the next `run` if left
    try:
        if target.exists():
            have, want = target.stat(), source.stat()
            if os.path.samestat(have, want) or (have.st_size, have.st_mtime_ns) == (want.st_size, want.st_mtime_ns):
                return True
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, temp)
        except OSError:  # another file system, or links not allowed here
            shutil.copy2(source, temp)  # keeps the mtime that the check above compares
        os.replace(temp, target)
        return True
    except OSError as exc:
        log.debug("%s: neither linked nor copied to %s (%s)", source, target, exc)
        return False
    finally:
        if os.path.lexists(temp):
            os.unlink(temp)


# ------------------------------------------------------------------------------------------ thumbnails
def make_poster(video: str | os.PathLike, target: str | os.PathLike, width: int = THUMB_WIDTH) -> bool:
    """Write a small JPEG of the video's first frame to `target`, unless it is already newer than
    the video. Return False when the video cannot be read."""
    video, target = Path(video), Path(target)
    try:
        if target.stat().st_mtime_ns >= video.stat().st_mtime_ns:
            return True
    except FileNotFoundError:
        pass
    try:
        with av.open(str(video)) as container:
            stream = container.streams.video[0]
            # Frame threading would decode several frames before handing out the first.
            stream.thread_type = "NONE"
            frame = next(container.decode(stream))
    except (av.error.FFmpegError, OSError, StopIteration, IndexError, ValueError) as exc:
        log.debug("%s: no poster, its first frame cannot be read (%s)", video, exc or type(exc).__name__)
        return False
    w = min(width, frame.width)
    h = max(2, round(frame.height * w / frame.width / 2) * 2)  # even: JPEG's 4:2:0 chroma
    temp_name = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(prefix=TEMP_MARK, suffix=".jpg", dir=target.parent)
        os.close(handle)
        _save_jpeg(frame.reformat(width=w, height=h), temp_name)
        os.chmod(temp_name, file_mode())  # mkstemp makes it private; posters are shared like the videos
        os.replace(temp_name, target)
    except (OSError, av.error.FFmpegError, ValueError) as exc:
        log.debug("%s: no poster, %s cannot be written (%s)", video, target, exc)
        return False  # a page without this poster is still a page (a read-only folder, a full disk)
    finally:
        if temp_name and os.path.exists(temp_name):
            os.unlink(temp_name)
    return True


def _save_jpeg(frame: av.VideoFrame, filename: str) -> None:
    try:
        import PIL  # noqa: F401  (not a dependency of the package: torchvision usually brings it)
    except ImportError:
        _save_jpeg_with_av(frame, filename)
        return
    frame.to_image().save(filename, format="JPEG", quality=82)


def _save_jpeg_with_av(frame: av.VideoFrame, filename: str) -> None:
    # A one-frame raw MJPEG stream is a plain JPEG file.
    with av.open(filename, mode="w", format="mjpeg") as out:
        stream = out.add_stream("mjpeg", rate=1)
        stream.width, stream.height = frame.width, frame.height
        stream.pix_fmt = "yuvj420p"
        for packet in stream.encode(frame.reformat(format="yuvj420p")):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def make_posters(pairs: list[tuple[Path, Path]]) -> dict[Path, bool]:
    """Posters for many videos, keyed by poster path; only missing or outdated ones are decoded."""
    result: dict[Path, bool] = {}
    todo = []
    for video, target in pairs:
        try:
            fresh = target.stat().st_mtime_ns >= video.stat().st_mtime_ns
        except FileNotFoundError:
            fresh = False
        if fresh:
            result[target] = True
        else:
            todo.append((video, target))
    workers = min(8, os.cpu_count() or 1, len(todo) // PARALLEL_FROM)
    if workers > 1:
        # Processes, not threads: PyAV holds the GIL while it opens and decodes.
        with ProcessPoolExecutor(max_workers=workers) as pool:
            made = list(pool.map(make_poster, *zip(*todo), chunksize=max(1, len(todo) // (workers * 4))))
    else:
        made = [make_poster(video, target) for video, target in todo]
    result.update((target, ok) for (_, target), ok in zip(todo, made))
    return result


# ------------------------------------------------------------------------------------------ building
def build_page(sweep: Sweep, report: Report | None = None, reload_s: float | None = None) -> Page:
    """Everything the template shows. `reload_s`: the open page reloads itself this often while
    work is left (for `report --watch --html`)."""
    report = report or build_report(sweep)
    root = sweep.root
    now = time.time()
    scan = report.scan if report.scan is not None else sweep.scan()
    rows_by_id: dict[str, dict] = {}
    attempts: list[dict] = []
    worker_rows: list[WorkerRow] = []
    if report.ledger and sweep.has_ledger():  # not when the report found it unreadable
        ledger = sweep.ledger(readonly=True)
        try:
            rows_by_id = {row["id"]: row for row in ledger.jobs()}
            attempts = ledger.attempts()
            worker_rows = ledger.workers()
        finally:
            ledger.close()
    last_worker: dict[str, str] = {}
    for attempt in attempts:  # ordered by start: the last one wins
        last_worker[attempt["job_id"]] = attempt["worker"]
    logs = {p.stem for p in sweep.logs.glob("*.log")} if sweep.logs.is_dir() else set()
    log_url = lambda worker: url(sweep.logs / f"{worker}.log", root) if worker in logs else None  # noqa: E731

    stale = {job.id for job in scan.stale}
    posters = make_posters([(Path(job.output), thumb_path(job.output)) for job in sweep.jobs
                            if job.id in scan.complete])

    tiles: dict[str, Tile] = {}
    for job in sweep.jobs:
        entry = rows_by_id.get(job.id, {})
        if job.id in scan.complete:
            state = "done"
        elif job.id in stale:
            state = "stale"
        elif entry.get("state") in ("running", "failed"):
            state = entry["state"]
        elif entry.get("last_error"):
            state = "retrying"
        else:
            state = "pending"
        worker = entry.get("worker") or last_worker.get(job.id)
        tile = Tile(id=job.id, key=job.key, seed=job.seed, state=state, prompt=job.prompt, worker=worker,
                    log=log_url(worker) if worker else None, attempts=entry.get("attempts") or 0,
                    error=entry.get("last_error"), seconds=entry.get("seconds"), axes=axes_label(job))
        if state == "done":
            tile.video = url(job.output, root)
            thumb = thumb_path(job.output)
            tile.poster = url(thumb, root) if posters.get(thumb) else None
        tiles[job.id] = tile

    if report.compare is not None:
        _mark_scores(tiles, report.compare, sweep)
    counts = {row.name: row for row in report.categories}
    grids = [_grid(category, sweep, tiles, counts.get(category.name)) for category in sweep.manifest.categories]
    outside = _reference_copies(grids, sweep)
    _reference_posters(grids, sweep)

    failures = [Failure(key=f["job"], id=f["id"], attempts=f["attempts"], error=f["error"],
                        worker=last_worker.get(f["id"]), log=log_url(last_worker.get(f["id"])))
                for f in report.failed]
    workers = [{**w, "log": log_url(w["id"]), "mean": f"{w['mean_s']:.1f} s" if w["mean_s"] else "-",
                "heartbeat": f"{_duration(w['heartbeat_age_s'])} ago" if w["heartbeat_age_s"] is not None else "-"}
               for w in report.workers]
    m = sweep.manifest
    g = m.generation
    total = report.totals
    notes = []
    if report.ledger_problem:
        notes.append(f"Ledger unreadable: counts come from the disk only. {report.ledger_problem}")
    elif not report.ledger:
        notes.append("No ledger: counts come from the disk only (nothing has run here, or .sweep/ was removed).")
    if total.stale:
        notes.append(f"{total.stale} mp4s were made with other settings and are not counted "
                     "(`run --redo-changed` moves them aside and makes them again).")
    if outside:
        notes.append(f"{outside} reference file(s) could not be linked or copied into .sweep/refs/ and are shown "
                     "from where they are: a copy of this folder will not show them.")
    if report.jobs_per_hour:
        throughput = f"{report.jobs_per_hour:.1f} videos/hour (last {WINDOW_S / 60:.0f} min of work)"
    else:
        throughput = "not measured yet" if total.left else "-"
    return Page(
        report=report, title=m.name, manifest=str(m.path), task=f"{m.model.backend} · {m.model.task}",
        settings=f"{g.width}×{g.height}, {g.num_frames} frames @ {g.fps} fps, {g.steps} steps, "
                 f"seeds {', '.join(map(str, m.seeds))}",
        generated=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)), grids=grids, failures=failures,
        workers=workers, activity=_activity(attempts, {w.id: w.devices for w in worker_rows}, now, log_url), throughput=throughput,
        time_left=describe_time_left(report),
        tile_width=TILE_WIDTH, tile_height=max(1, round(TILE_WIDTH * g.height / g.width)),
        seed_columns=len(m.seeds) if len(m.seeds) <= 3 else -(-len(m.seeds) // 2),  # 4 seeds: 2×2
        reload_s=int(max(reload_s, MIN_RELOAD_S)) if reload_s and total.left > 0 else None, notes=notes,
        quality=_quality(report.compare) if report.compare is not None else None)


def _mark_scores(tiles: dict[str, Tile], comparison: Comparison, sweep: Sweep) -> None:
    """Each scored tile gets its PSNR and SSIM against its baseline; the baseline value's done tiles say so, and
    a tile that could not be scored says why."""
    unscored = {e["id"]: f"not scored: baseline {e['state']}" for e in comparison.missing}
    unscored.update((e["id"], e["problem"]) for e in comparison.not_comparable)
    for job in sweep.jobs:
        tile = tiles[job.id]
        if job.id in comparison.videos:
            tile.score = score_text(comparison.videos[job.id])
        elif job.id in unscored:
            tile.score = unscored[job.id]
        elif (tile.state == "done" and comparison.axis in job.axes
              and value_text(job.axes[comparison.axis]) == comparison.baseline):
            tile.score = "baseline"


def _quality(comparison: Comparison) -> Quality:
    worst_first = sorted(comparison.videos.values(), key=lambda v: (v.psnr, v.ssim))
    videos = [{"id": v.id, "job": v.job, "value": v.label, "baseline": v.baseline, "psnr": db_text(v.psnr), "ssim": ratio_text(v.ssim),
               "seconds": "-" if v.seconds is None else f"{v.seconds:.1f}"} for v in worst_first[:MAX_QUALITY_ROWS]]
    return Quality(comparison.axis, comparison.baseline, [comparison.axis] + TABLE_HEADERS, table_rows(comparison),
                   videos, len(comparison.videos), describe_gaps(comparison, limit=20), comparison.lpips)


def _grid(category, sweep: Sweep, tiles: dict[str, Tile], counts) -> Grid:
    by_cell: dict[tuple, list[Tile]] = {}
    for job in sweep.jobs:
        if job.category == category.name:
            by_cell.setdefault((job.stem, job.prompt_index), []).append(tiles[job.id])
    width = max((len(ref.prompts) for ref in category.references), default=0)
    shared = len({ref.prompts for ref in category.references}) == 1
    columns = [Column(i, category.references[0].prompts[i] if shared else None) for i in range(width)]
    rows = []
    for ref in category.references:  # text-to-video: one reference without a file
        media = None
        if ref.path is not None:
            media = Media("video" if category.kind == "videos" else "image", url(ref.path, sweep.root),
                          ref.path.name, source=ref.path)
        cells: list[Cell | None] = [Cell(i, p, by_cell.get((ref.stem, i), [])) for i, p in enumerate(ref.prompts)]
        rows.append(Row(ref.stem, media, cells + [None] * (width - len(cells))))
    return Grid(category=category.name, anchor=anchor(category.name), kind=category.kind,
                columns=columns, rows=rows, counts=counts or CategoryRow(category.name),
                comparison=_comparison(category.name, sweep.jobs, tiles))


def axes_label(job) -> str:
    """A job's axis values in words, as its default name writes them: `cfg_scale 3 · steps 30`."""
    return " · ".join(f"{name} {value_text(value)}" for name, value in (job.axes or {}).items())


def _comparison(category: str, jobs, tiles: dict[str, Tile]) -> Comparison | None:
    """The jobs of one category that share reference, prompt and seed, side by side: a row per
    (reference, prompt, seed), a column per axis combination. None when the jobs have no axes."""
    columns: dict[str, int] = {}
    rows: dict[tuple, ComparisonRow] = {}
    for job in jobs:
        if job.category != category or not job.axes:
            continue
        label = axes_label(job)
        column = columns.setdefault(label, len(columns))
        row = rows.setdefault((job.stem, job.prompt_index, job.seed),
                              ComparisonRow(job.stem, job.prompt_index, job.prompt, job.seed, []))
        row.tiles.extend([None] * (column + 1 - len(row.tiles)))
        row.tiles[column] = tiles[job.id]
    if not columns:
        return None
    for row in rows.values():
        row.tiles.extend([None] * (len(columns) - len(row.tiles)))
    return Comparison(columns=list(columns), rows=list(rows.values()))


def _reference_copies(grids: list[Grid], sweep: Sweep) -> int:
    """Point each reference that lies outside output_dir at its hard link (or copy) in
    .sweep/refs/<category>/, so that the page still shows it when the folder is copied elsewhere.
    Returns how many could be neither (they stay linked where they are)."""
    left_outside = 0
    for grid in grids:
        for row in grid.rows:
            media = row.reference
            if media is None or media.source.resolve().is_relative_to(sweep.root.resolve()):
                continue
            target = sweep.state_dir / "refs" / grid.category / media.source.name
            if keep_copy(media.source, target):
                media.url = url(target, sweep.root)
            else:
                left_outside += 1
    return left_outside


def _reference_posters(grids: list[Grid], sweep: Sweep) -> None:
    # Reference videos usually live outside output_dir, in folders that are not ours to write in:
    # their posters go to .sweep/thumbs/.
    pairs = [(row.reference, sweep.state_dir / "thumbs" / grid.category / f"{row.stem}{THUMB_SUFFIX}")
             for grid in grids for row in grid.rows if row.reference and row.reference.kind == "video"]
    made = make_posters([(media.source, target) for media, target in pairs])
    for media, target in pairs:
        if made.get(target):
            media.poster = url(target, sweep.root)


def _device_label(devices: str | None, worker: str) -> str:
    cards = [d for d in (devices or "").split(",") if d]
    if cards:
        return "GPU " + "+".join(cards)
    return worker.split("_", 1)[0].upper() if worker.startswith("cpu") else "CPU"


def _covered(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by the union of the intervals: a worker writes one video while it makes the
    next, so its attempts overlap."""
    return sum(end - start for start, end in _union(intervals))


_TICK_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)


def _activity(attempts: list[dict], devices: dict[str, str | None], now: float, log_url) -> Activity | None:
    """Each worker's attempts as bars on one time axis (a lane per worker, named by its `devices`), from the
    first start to now (or the last end when nothing runs). Bars closer than half a unit merge, so a long
    sweep stays a small SVG."""
    if not attempts:
        return None
    start = min(a["started_at"] for a in attempts)
    running = any(a["finished_at"] is None for a in attempts)
    end = now if running else max(a["finished_at"] for a in attempts)
    span = max(end - start, 1e-6)
    scale = PLOT_WIDTH / span
    lanes: dict[str, Lane] = {}
    spans: dict[str, list[tuple[float, float]]] = {}
    for a in attempts:
        worker = a["worker"]
        lane = lanes.get(worker)
        if lane is None:
            lane = lanes[worker] = Lane(worker, _device_label(devices.get(worker), worker), log_url(worker), 0.0, [])
        finished = a["finished_at"] if a["finished_at"] is not None else now
        outcome = a["outcome"] or "running"
        spans.setdefault(worker, []).append((a["started_at"], finished))
        x = (a["started_at"] - start) * scale
        width = max((finished - a["started_at"]) * scale, 1.0)
        last = lane.bars[-1] if lane.bars else None
        if last and last.outcome == outcome and x - (last.x + last.width) < 0.5:
            last.count += 1
            last.width = max(last.width, x + width - last.x)
            last.title = f"{last.count} attempts: {outcome}"
            continue
        lane.bars.append(Bar(x, width, outcome, f"{outcome}, {finished - a['started_at']:.1f} s"
                                                + (f": {a['error']}" if a["error"] else "")))
    for worker, lane in lanes.items():
        lane.busy_percent = 100.0 * _covered(spans[worker]) / span
    ordered = sorted(lanes.values(), key=lambda lane: (lane.device, lane.worker))
    step = next((s for s in _TICK_STEPS if span / s <= 8), _TICK_STEPS[-1])
    fmt = "%H:%M:%S" if step < 60 else "%H:%M"
    first = (int(start // step) + 1) * step
    ticks = [((t - start) * scale, time.strftime(fmt, time.localtime(t)))
             for t in range(int(first), int(end) + 1, step)]
    return Activity(ordered, ticks)
