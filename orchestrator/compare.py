"""`report --compare AXIS=VALUE`: the quality cost of a setting, measured on the sweep's own videos.

This module owns the comparison: which video is scored against which (`baseline_of`: the done video of
the baseline value with the same category, reference, prompt, seed and other axis values), the scores
(PSNR and SSIM from scikit-image, frame by frame at the videos' own resolution, decoded with PyAV), their
cache under `.sweep/compare/<axis>=<value>.json` (each pair scored once, again only when either file
changes: keyed by path, size and mtime), and the figures per axis value (median and worst scores, beside
the value's median seconds per video from the sidecars' `generate_seconds`).

A video whose baseline is not done (not made yet, failed, made with other settings) is named and counted,
never scored. Two videos of other sizes or frame counts (an axis that changes width, height or
num_frames) are said to be not comparable. LPIPS is not computed: no package that ships all its weights
(the backbone's too) runs offline here, and the output says so.
"""
from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from .errors import UserError
from .manifest import Manifest
from .output_names import value_text
from .outputs import read_sidecar, save_cache_file

log = logging.getLogger(__name__)

CACHE_FOLDER = "compare"  # under .sweep/
CACHE_VERSION = 1
LPIPS_NOTE = "absent (no offline weights)"
PARALLEL_FROM = 4  # pairs to score before extra processes pay for their start
SAVE_EVERY_S = 30.0  # scores are written to the cache at least this often while many pairs are scored
EXAMPLES = 5  # missing baselines and incomparable pairs named in the text (the JSON names them all)


# ------------------------------------------------------------------------------------------ the baseline
@dataclass(frozen=True)
class Baseline:
    """The `--compare AXIS=VALUE` asked for: the axis key, its value, and the axis group it belongs to
    (a `zip` group's other keys change with it)."""
    axis: str
    value: Any
    label: str  # the value as the report and file names write it
    group: tuple[str, ...]  # the keys of the axis (or zip group) holding `axis`
    points: tuple[tuple, ...]  # that group's points
    values: tuple  # the axis's distinct values, in the manifest's order

    @property
    def cache_name(self) -> str:
        return f"{self.axis}={self.label}.json"


def parse_baseline(manifest: Manifest, text: str) -> Baseline:
    """`AXIS=VALUE` checked against the manifest's axes: an unknown axis, a value it does not have, or a
    manifest without axes is refused with what it has."""
    axes = {key: axis for axis in manifest.axes for key in axis.keys}
    if not axes:
        raise UserError(f"--compare {text}: the sweep `{manifest.name}` has no axes; --compare needs an axis "
                        "(`axes:` in the manifest, e.g. `cfg_scale: [3.0, 5.0]`) whose values it compares")
    name, sep, wanted = text.partition("=")
    name, wanted = name.strip(), wanted.strip()
    if not sep or not name or not wanted:
        raise UserError(f"--compare {text}: give AXIS=VALUE, e.g. --compare {_example(manifest)}")
    if name not in axes:
        raise UserError(f"--compare {text}: the sweep has no axis `{name}`; its axes are "
                        + ", ".join(f"{key} ({', '.join(_labels(axis, key))})" for key, axis in axes.items()))
    group = axes[name]
    column = group.keys.index(name)
    # (a [high, low] pair as a list, as jobs carry it: `jobs.axis_points`)
    values = tuple(_distinct(list(p[column]) if isinstance(p[column], tuple) else p[column] for p in group.points))
    try:
        parsed = yaml.safe_load(wanted)
    except yaml.YAMLError:
        parsed = wanted
    if name == "cache":
        parsed = _cache_spelling(parsed)
    for value in values:
        if _canonical(value) == _canonical(parsed) or value_text(value) in (wanted, value_text(parsed)):
            return Baseline(name, value, value_text(value), group.keys, group.points, values)
    raise UserError(f"--compare {text}: the axis `{name}` has no value {wanted}; its values are "
                    + ", ".join(_shown(v) for v in values))


def _shown(value) -> str:
    """A value as the report labels it, and as the manifest holds it where that differs (a step cache's text)."""
    label = value_text(value)
    return f"{label} ({value})" if isinstance(value, str) and value != label else label


def _cache_spelling(parsed):
    """A step cache as the manifest holds it (`model.cache_text`), so `cache={first_block: 0.05}` names the
    axis value `first_block:threshold=0.05`; anything else as given."""
    from .manifest.model import CACHE_METHODS, cache_text
    if isinstance(parsed, str) and parsed in CACHE_METHODS:
        return cache_text(parsed, {})
    if not (isinstance(parsed, dict) and len(parsed) == 1):
        return parsed
    (method, options), = parsed.items()
    if method not in CACHE_METHODS:
        return parsed
    main, table = CACHE_METHODS[method]
    if not isinstance(options, dict):
        options = {} if options is None else {main: options}
    try:
        return cache_text(method, {key: table[key][3](value) for key, value in options.items() if key in table})
    except (TypeError, ValueError):
        return parsed


def _distinct(values) -> list:
    seen: list = []
    for value in values:
        if value not in seen:
            seen.append(value)
    return seen


def _labels(axis, key: str) -> list[str]:
    column = axis.keys.index(key)
    return [value_text(v) for v in _distinct(point[column] for point in axis.points)]


def _example(manifest: Manifest) -> str:
    axis = manifest.axes[0]
    return f"{axis.keys[0]}={value_text(axis.points[0][0])}"


# ------------------------------------------------------------------------------------------ scoring
@dataclass
class PairScore:
    """One video against its baseline: PSNR in dB over all the video's pixels (inf: identical) and the mean
    of its frames' SSIM; or `problem` when they cannot be compared (sizes or frame counts differ)."""
    psnr: float | None = None
    ssim: float | None = None
    problem: str | None = None


def video_frames(path: str | os.PathLike) -> Iterator:
    """The video's frames as H×W×3 uint8 RGB arrays, one at a time."""
    import av
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            yield frame.to_ndarray(format="rgb24")


def score_frames(video, baseline) -> PairScore:
    """Scores of two equally long sequences of equally sized RGB frames (iterables of H×W×3 uint8)."""
    from skimage.metrics import mean_squared_error, structural_similarity
    errors, similarities = [], []
    ours, theirs = iter(video), iter(baseline)
    while True:
        a, b = next(ours, None), next(theirs, None)
        if a is None or b is None:
            if a is not None or b is not None:
                done = len(errors)
                ours_n = done + (1 + sum(1 for _ in ours) if a is not None else 0)
                theirs_n = done + (1 + sum(1 for _ in theirs) if b is not None else 0)
                return PairScore(problem=f"not comparable: {ours_n} vs {theirs_n} frames")
            break
        if a.shape != b.shape:
            return PairScore(problem=f"not comparable: {a.shape[1]}×{a.shape[0]} vs {b.shape[1]}×{b.shape[0]} pixels")
        errors.append(mean_squared_error(a, b))
        similarities.append(structural_similarity(a, b, channel_axis=-1, data_range=255))
    if not errors:
        return PairScore(problem="not comparable: no frames")
    # The video's PSNR over all its pixels: its mean squared error is the mean of its (equally sized) frames',
    # computed frame by frame so that two long videos never sit in memory as float64 at once.
    error = statistics.fmean(errors)
    psnr = math.inf if error == 0 else 10 * math.log10(255.0 ** 2 / error)
    return PairScore(psnr=psnr, ssim=float(statistics.fmean(similarities)))


def score_pair(video: str, baseline: str) -> PairScore:
    """Decode both videos and score the first against the second."""
    try:
        return score_frames(video_frames(video), video_frames(baseline))
    except (OSError, ValueError, IndexError) as exc:  # av's errors derive from OSError / ValueError
        return PairScore(problem=f"not readable: {exc}")


# ------------------------------------------------------------------------------------------ the cache
class ScoreCache:
    """Scores of one baseline's pairs, keyed by the video's path (relative to output_dir) with both files'
    (size, mtime_ns); and each video's `generate_seconds` from its sidecar, keyed the same way (a worker writes
    the sidecar before the mp4 takes its name, so a redone video has a new mtime and its new sidecar)."""

    def __init__(self, file: Path | None):
        self.file = file
        self.pairs: dict[str, list] = {}
        self.seconds: dict[str, list] = {}
        self.dirty = False
        if file is None:
            return
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if isinstance(data, dict) and data.get("version") == CACHE_VERSION:
            self.pairs, self.seconds = data.get("pairs") or {}, data.get("seconds") or {}

    def pair(self, video: str, stat, baseline: str, base_stat) -> PairScore | None:
        entry = self.pairs.get(video)
        if entry and entry[:5] == [stat[0], stat[1], baseline, base_stat[0], base_stat[1]]:
            return PairScore(*entry[5:8])
        return None

    def put_pair(self, video: str, stat, baseline: str, base_stat, score: PairScore) -> None:
        self.pairs[video] = [stat[0], stat[1], baseline, base_stat[0], base_stat[1], score.psnr, score.ssim,
                             score.problem]
        self.dirty = True

    def generate_seconds(self, video: str, stat, path: str) -> float | None:
        entry = self.seconds.get(video)
        if entry and entry[0] == stat[0] and entry[1] == stat[1]:
            return entry[2]
        seconds = (read_sidecar(path) or {}).get("generate_seconds")
        seconds = float(seconds) if isinstance(seconds, (int, float)) else None
        self.seconds[video] = [stat[0], stat[1], seconds]
        self.dirty = True
        return seconds

    def save(self) -> None:
        # (Infinity for identical videos: Python reads its own non-standard JSON back)
        if self.file and self.dirty and save_cache_file(
                self.file, {"version": CACHE_VERSION, "pairs": self.pairs, "seconds": self.seconds}):
            self.dirty = False


# ------------------------------------------------------------------------------------------ the figures
@dataclass
class ValueRow:
    """One value of the compared axis: its done videos, how many were scored, their median and worst
    scores, and its median seconds per video."""
    label: str
    value: Any
    baseline: bool = False
    done: int = 0
    scored: int = 0
    missing: int = 0  # done videos whose baseline is not done
    not_comparable: int = 0
    psnr_median: float | None = None
    psnr_worst: float | None = None
    ssim_median: float | None = None
    ssim_worst: float | None = None
    seconds_median: float | None = None


@dataclass
class VideoScore:
    """One done video against its baseline (the review page's per-video column)."""
    job: str  # the job's key
    id: str
    label: str  # its value of the axis
    baseline: str  # the baseline job's key
    psnr: float | None = None
    ssim: float | None = None
    seconds: float | None = None
    problem: str | None = None  # not comparable, or its baseline not done (`missing`)


@dataclass
class Comparison:
    axis: str
    baseline: str  # the baseline value's label
    baseline_value: Any
    values: list[ValueRow]
    videos: dict[str, VideoScore] = field(default_factory=dict)  # job id -> score, scored videos only
    missing: list[dict] = field(default_factory=list)  # {job, baseline, state}: a baseline not done
    not_comparable: list[dict] = field(default_factory=list)  # {job, baseline, problem}
    scored_now: int = 0  # pairs decoded by this report (the others came from the cache)
    lpips: str = LPIPS_NOTE

    def to_dict(self) -> dict:
        return {"axis": self.axis, "baseline": {"value": _plain(self.baseline_value), "label": self.baseline},
                "metrics": {"psnr": "dB over all pixels (RGB 0-255); \"inf\": identical",
                            "ssim": "mean over frames (RGB)", "lpips": self.lpips},
                "values": [{"value": _plain(r.value), "label": r.label, "baseline": r.baseline, "done": r.done,
                            "scored": r.scored, "missing_baseline": r.missing, "not_comparable": r.not_comparable,
                            "psnr_median": _number(r.psnr_median), "psnr_worst": _number(r.psnr_worst),
                            "ssim_median": r.ssim_median, "ssim_worst": r.ssim_worst,
                            "seconds_per_video": r.seconds_median} for r in self.values],
                "videos": [{"job": v.job, "id": v.id, "value": v.label, "baseline": v.baseline,
                            "psnr": _number(v.psnr), "ssim": v.ssim, "seconds": v.seconds}
                           for v in self.videos.values()],
                "missing_baselines": {"count": len(self.missing), "jobs": self.missing},
                "not_comparable": {"count": len(self.not_comparable), "jobs": self.not_comparable},
                "scored_now": self.scored_now}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _number(value: float | None):
    """A PSNR for standard JSON: identical videos' infinity as the string "inf"."""
    return "inf" if value is not None and math.isinf(value) else value


def _canonical(value) -> str:
    """A value as comparable text: the manifest's points hold a [high, low] pair as a tuple, jobs as a list."""
    return json.dumps(value, sort_keys=True, default=str)


def compare_sweep(sweep, complete: set[str], baseline: Baseline, failed: set[str] = frozenset(),
                  stale: set[str] = frozenset(), say: Callable[[str], None] | None = None) -> Comparison:
    """Score every done video of `sweep` against its baseline's (`complete`: the done job ids of the disk
    scan; `failed` and `stale`: job ids the report knows as failed or made with other settings, to say why
    a baseline is missing). Pairs not in the cache are decoded and scored, in several processes when
    many; `say` hears how many before they start."""
    root = sweep.root
    state_dir = sweep.state_dir
    cache = ScoreCache(state_dir / CACHE_FOLDER / baseline.cache_name if state_dir.is_dir() else None)
    rows = {value_text(v): ValueRow(value_text(v), v, baseline=value_text(v) == baseline.label)
            for v in baseline.values}
    comparison = Comparison(baseline.axis, baseline.label, baseline.value, list(rows.values()))
    places = _Places(sweep.jobs, baseline)
    prefix = os.path.join(str(root), "")

    seconds: dict[str, list[float]] = {label: [] for label in rows}
    scores: dict[str, list[PairScore]] = {label: [] for label in rows}
    todo: list[tuple] = []  # (job, base, video key, stat, base key, base stat)
    for job in sweep.jobs:
        if job.id not in complete or baseline.axis not in job.axes:
            continue
        label = places.label(job.axes[baseline.axis])
        row = rows.setdefault(label, ValueRow(label, job.axes[baseline.axis]))
        row.done += 1
        stat = _stat(job.output)
        if stat is None:
            continue  # gone since the scan
        rel = _relative(job.output, prefix)
        spent = cache.generate_seconds(rel, stat, job.output)
        if spent is not None:
            seconds.setdefault(label, []).append(spent)
        if row.baseline:
            continue
        base = places.baseline_of(job)
        if base is None or base.id not in complete or (base_stat := _stat(base.output)) is None:
            state = ("no such job" if base is None else "failed" if base.id in failed
                     else "made with other settings" if base.id in stale else "not made yet")
            row.missing += 1
            comparison.missing.append({"job": job.key, "id": job.id, "baseline": base.key if base else None,
                                       "state": state})
            continue
        mismatch = _shape_mismatch(job, base)
        if mismatch:
            row.not_comparable += 1
            comparison.not_comparable.append({"job": job.key, "id": job.id, "baseline": base.key, "problem": mismatch})
            continue
        base_rel = _relative(base.output, prefix)
        score = cache.pair(rel, stat, base_rel, base_stat)
        if score is None:
            todo.append((job, base, rel, stat, base_rel, base_stat))
            continue
        _count(comparison, row, job, base, label, score, spent, scores)
    if todo:
        if say:
            say(f"scoring {len(todo)} video pair{'s' if len(todo) != 1 else ''} against {baseline.axis}="
                f"{baseline.label} (once: the scores are kept in {cache.file or 'memory'})")
        for (job, base, rel, stat, base_rel, base_stat), score in _score_all(todo, cache):
            label = value_text(job.axes[baseline.axis])
            cache.put_pair(rel, stat, base_rel, base_stat, score)
            spent = cache.seconds.get(rel, [None, None, None])[2]
            _count(comparison, rows[label], job, base, label, score, spent, scores)
        comparison.scored_now = len(todo)
    cache.save()
    for label, row in rows.items():
        psnrs = [s.psnr for s in scores[label]]
        ssims = [s.ssim for s in scores[label]]
        if psnrs:
            row.psnr_median, row.psnr_worst = statistics.median(psnrs), min(psnrs)
            row.ssim_median, row.ssim_worst = statistics.median(ssims), min(ssims)
        if seconds.get(label):
            row.seconds_median = statistics.median(seconds[label])
    comparison.values = list(rows.values())
    return comparison


def _count(comparison: Comparison, row: ValueRow, job, base, label: str, score: PairScore, spent,
           scores: dict) -> None:
    if score.problem:
        row.not_comparable += 1
        comparison.not_comparable.append({"job": job.key, "id": job.id, "baseline": base.key,
                                          "problem": score.problem})
        return
    row.scored += 1
    scores[label].append(score)
    comparison.videos[job.id] = VideoScore(job.key, job.id, label, base.key, score.psnr, score.ssim, spent)


def _score_all(todo: list[tuple], cache: ScoreCache):
    """(item, score) for each pair to score, in order; the cache saved every SAVE_EVERY_S seconds, so an
    interrupted first comparison keeps what it scored."""
    pairs = [(item[0].output, item[1].output) for item in todo]
    workers = min(8, os.cpu_count() or 1, len(todo) // PARALLEL_FROM)
    saved = time.monotonic()
    if workers > 1:
        # Processes, not threads: decoding and SSIM hold the GIL for much of their time.
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = pool.map(score_pair, *zip(*pairs))
            for item, score in zip(todo, results):
                yield item, score
                if time.monotonic() - saved > SAVE_EVERY_S:
                    cache.save()
                    saved = time.monotonic()
        return
    for item, (video, base) in zip(todo, pairs):
        yield item, score_pair(video, base)
        if time.monotonic() - saved > SAVE_EVERY_S:
            cache.save()
            saved = time.monotonic()


class _Places:
    """The sweep's jobs by place: category, reference, prompt, seed, the values of the axes outside the compared
    one's group, and the group's point; so that each job finds its baseline by one look-up."""

    def __init__(self, jobs, baseline: Baseline):
        self.group = baseline.group
        self.column = baseline.group.index(baseline.axis)
        self.texts: dict[int, str] = {}  # id of a job's axis value -> its canonical text (the jobs keep them alive)
        self.labels: dict[int, str] = {}
        self.base_value = _canonical(baseline.value)
        self.base_points = [tuple(_canonical(v) for v in point) for point in baseline.points
                            if _canonical(point[self.column]) == self.base_value]
        self.jobs = {}  # the baseline value's jobs by place
        for job in jobs:
            point = self._point(job)
            if point[self.column] == self.base_value:
                self.jobs[self._key(job, point)] = job

    def text(self, value) -> str:
        text = self.texts.get(id(value))
        if text is None:
            text = self.texts[id(value)] = _canonical(value)
        return text

    def label(self, value) -> str:
        label = self.labels.get(id(value))
        if label is None:
            label = self.labels[id(value)] = value_text(value)
        return label

    def _point(self, job) -> tuple:
        return tuple(self.text(job.axes.get(key)) for key in self.group)

    def _key(self, job, point: tuple) -> tuple:
        outside = tuple((key, self.text(value)) for key, value in job.axes.items() if key not in self.group)
        return job.category, job.stem, job.prompt_index, job.seed, outside, point

    def baseline_of(self, job):
        """The job this one is compared with: the same place, the axis at the baseline value. In a `zip` group
        the group's other keys keep their values where the manifest has that point, else take the baseline
        point's (when it is the only one with that value); None when there is no such job."""
        own = self._point(job)
        wanted = own[:self.column] + (self.base_value,) + own[self.column + 1:]
        if wanted not in self.base_points:
            if len(self.base_points) != 1:
                return None
            wanted = self.base_points[0]
        return self.jobs.get(self._key(job, wanted))


def _shape_mismatch(job, base) -> str | None:
    """Why two jobs' videos differ in size or length (from their settings, before decoding), or None."""
    ours, theirs = job.generation, base.generation
    if ours is None or theirs is None:
        return None
    a = (ours.width, ours.height, ours.num_frames)
    b = (theirs.width, theirs.height, theirs.num_frames)
    return None if a == b else f"not comparable: {a[0]}×{a[1]}×{a[2]} vs {b[0]}×{b[1]}×{b[2]} (width×height×frames)"


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _relative(path: str, prefix: str) -> str:
    """A job's output under output_dir (`prefix`, with its trailing separator) as the cache names it."""
    return path[len(prefix):] if path.startswith(prefix) else path


# ------------------------------------------------------------------------------------------ text
def db_text(value: float | None) -> str:
    return "-" if value is None else "inf" if math.isinf(value) else f"{value:.2f}"


def ratio_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def table_rows(comparison: Comparison) -> list[list[str]]:
    """Per value: label, done, scored, PSNR median and worst (dB), SSIM median and worst, s/video."""
    return [[r.label + (" (baseline)" if r.baseline else ""), str(r.done), "-" if r.baseline else str(r.scored),
             db_text(r.psnr_median), db_text(r.psnr_worst), ratio_text(r.ssim_median), ratio_text(r.ssim_worst),
             "-" if r.seconds_median is None else f"{r.seconds_median:.1f}"] for r in comparison.values]


TABLE_HEADERS = ["done", "scored", "PSNR median", "PSNR worst", "SSIM median", "SSIM worst", "s/video"]


def describe_gaps(comparison: Comparison, limit: int = EXAMPLES) -> list[str]:
    """The lines that name missing baselines and pairs that could not be compared (a few examples each)."""
    lines = []
    if comparison.missing:
        states: dict[str, int] = {}
        for entry in comparison.missing:
            states[entry["state"]] = states.get(entry["state"], 0) + 1
        lines.append(f"{len(comparison.missing)} video(s) not scored: their baseline ({comparison.axis} "
                     f"{comparison.baseline}) is not done ("
                     + ", ".join(f"{n} {state}" for state, n in states.items()) + "):")
        lines += [f"  {e['job']}: baseline {e['baseline'] or '(none in the sweep)'} {e['state']}"
                  for e in comparison.missing[:limit]]
        if len(comparison.missing) > limit:
            lines.append(f"  … and {len(comparison.missing) - limit} more (see --json)")
    if comparison.not_comparable:
        lines.append(f"{len(comparison.not_comparable)} video(s) not comparable with their baseline:")
        lines += [f"  {e['job']} vs {e['baseline']}: {e['problem']}" for e in comparison.not_comparable[:limit]]
        if len(comparison.not_comparable) > limit:
            lines.append(f"  … and {len(comparison.not_comparable) - limit} more (see --json)")
    return lines


def score_text(video: VideoScore) -> str:
    """A video's scores in words, as its tile on the review page shows them."""
    return f"PSNR {db_text(video.psnr)} dB · SSIM {ratio_text(video.ssim)}"
