"""Measured sizing: how many workers per card, and how many cards per worker.

Calibration runs real jobs of the manifest's settings on one device group (one card, or k cards
for a model that needs them) in probe subprocesses, and measures:

  - the peak device memory one worker process needs, from NVML's per-process usage (which includes
    the CUDA context), sampled while it runs, and torch's peak reserved memory;
  - seconds per job at one worker, and jobs per hour at 1, 2, … concurrent workers on the group
    (up to as many as fit, at most MAX_PROBE_WORKERS).

The result is cached as JSON under `<output_dir>/.sweep/profiles/`, keyed by (backend, model, task,
resolution, frames, steps, guidance, dtype, memory options, GPU name, cards per worker), so the next
plan of the same settings is instant; `--recalibrate` measures again.

Decisions (`decide_workers`):
  - fit: the largest N with N × (peak + resources.memory_margin_gib) ≤ the card's free memory now
    (the most loaded card of a group);
  - `workers_per_gpu: auto` keeps N > 1 only where the measured jobs/hour beats one worker by
    CLEAR_GAIN (10%); of the counts that fit, it takes the smallest within 3% of the best;
  - an explicit integer is obeyed, with a warning when it does not fit;
  - `gpus_per_worker: auto` tries 1 card, then 2, … until one worker's calibration does not run out of
    memory; the cards are then grouped (4 cards → 2 workers × 2 cards);
  - each card (kind) gets its own count: a 16 GB and a 12 GB card are decided separately.

The synthetic backend and CPU slots are not sized (planning's defaults apply).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from .gpus import GIB, Gpu, nvml_module, process_memories
from .manifest import Manifest
from .planning import DeviceGroup, PlanError

PROFILE_VERSION = 1
MAX_PROBE_WORKERS = 3
CLEAR_GAIN = 0.10  # more workers must add at least this much throughput
NEAR_BEST = 0.97  # the fewest workers within this share of the best throughput win
EXIT_PROBE_OOM = 3
SAMPLE_S = 0.1


class DoesNotFit(RuntimeError):
    """One worker ran out of memory on this device group during calibration."""


@dataclass
class Profile:
    key: dict
    gpu_name: str
    gpu_total_bytes: int
    cards: int  # cards per worker when measured
    fits: bool = True  # False: one worker ran out of memory on this many cards
    peak_nvml_bytes: int | None = None  # per worker, on its most loaded card, CUDA context included
    peak_torch_reserved_bytes: int | None = None  # per worker (summed over its cards)
    loaded_nvml_bytes: int | None = None  # per worker after loading, before the first job
    nvml_source: str = "per-process"  # or "device-delta" where NVML cannot see the process
    load_seconds: float | None = None
    seconds_per_job: float | None = None  # one worker alone, mean of the timed jobs
    jobs_per_hour: dict[int, float] = field(default_factory=dict)  # concurrent workers -> measured
    free_bytes_at_calibration: int | None = None
    calibration_seconds: float | None = None
    created_at: str = ""
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        data = asdict(self)
        data["version"] = PROFILE_VERSION
        data["jobs_per_hour"] = {str(k): v for k, v in self.jobs_per_hour.items()}
        return json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Profile":
        data = json.loads(text)
        if data.pop("version", None) != PROFILE_VERSION:
            raise ValueError("old profile version")
        data["jobs_per_hour"] = {int(k): float(v) for k, v in data.get("jobs_per_hour", {}).items()}
        return cls(**data)

    def summary(self) -> str:
        if not self.fits:
            return f"{self.gpu_name} ×{self.cards}: one worker ran out of memory"
        tp = ", ".join(f"{n}: {v:.1f}" for n, v in sorted(self.jobs_per_hour.items()))
        torch_peak = (f", torch peak reserved {_gib(self.peak_torch_reserved_bytes)}"
                      if self.peak_torch_reserved_bytes else "")
        return (f"{self.gpu_name} ×{self.cards}: peak {_gib(self.peak_nvml_bytes)} per worker (NVML "
                f"{self.nvml_source}{torch_peak}), loaded {_gib(self.loaded_nvml_bytes)}, load "
                f"{self.load_seconds:.1f}s, {self.seconds_per_job:.1f}s/job; jobs/hour by workers {{{tp}}}")


def _gib(value: int | None) -> str:
    return "?" if value is None else f"{value / GIB:.1f} GiB"


def profile_key(manifest: Manifest, gpu_name: str, cards: int) -> dict:
    m, g = manifest.model, manifest.generation
    return {"backend": m.backend, "model": m.path, "task": m.task, "dtype": m.dtype,
            "width": g.width, "height": g.height, "frames": g.num_frames, "steps": g.steps,
            "guidance": g.uses_guidance, "options": {k: m.options[k] for k in sorted(m.options)},
            "gpu": gpu_name, "cards": cards,
            # measured with the manifest's speed settings (compile, fp8, … change time and memory);
            # left out when default, so profiles measured before `speed:` existed still match
            **({"speed": asdict(m.speed)} if not m.speed.is_default else {})}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:40] or "gpu"


class ProfileCache:
    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def path(self, key: dict) -> Path:
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        return self.folder / f"{_slug(key['backend'])}-{_slug(key['gpu'])}-x{key['cards']}-{digest}.json"

    def get(self, key: dict) -> Profile | None:
        try:
            profile = Profile.from_json(self.path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError):
            return None
        return profile if profile.key == key else None

    def put(self, profile: Profile) -> Path:
        path = self.path(profile.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=".partial-", dir=path.parent)
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(profile.to_json())
        os.replace(temp, path)
        return path


# --------------------------------------------------------------------------------------------------
# Decisions


@dataclass(frozen=True)
class Decision:
    workers: int
    fit: int
    reason: str
    warning: str | None = None


def fit_count(free_bytes: int, peak_bytes: int, margin_bytes: int) -> int:
    """How many workers of this peak fit in this free memory, each with its margin."""
    return max(0, int(free_bytes // (peak_bytes + margin_bytes)))


def decide_workers(profile: Profile, free_bytes: int, margin_gib: float, requested: int | str) -> Decision:
    """Workers for one device group from its profile and its free memory now."""
    margin = int(margin_gib * GIB)
    peak = profile.peak_nvml_bytes or 0
    fit = fit_count(free_bytes, peak, margin)
    memory = (f"peak {_gib(peak)}/worker + {margin_gib:g} GiB margin, {_gib(free_bytes)} free → {fit} fit")
    if isinstance(requested, int):
        if requested <= fit:
            return Decision(requested, fit, f"workers_per_gpu: {requested} (manifest); {memory}")
        warning = (f"workers_per_gpu: {requested} does not fit: {requested} × ({_gib(peak)} + {margin_gib:g} GiB) "
                   f"> {_gib(free_bytes)} free; expect out-of-memory (a worker that keeps running out of "
                   f"memory retires itself)")
        return Decision(requested, fit, f"workers_per_gpu: {requested} (manifest, obeyed); {memory}: "
                                        f"DOES NOT FIT", warning)
    if fit == 0:
        return Decision(0, 0, f"auto: {memory}: this card cannot hold one worker")
    tp = profile.jobs_per_hour
    measured = sorted(n for n in tp if n <= fit)
    figures = ", ".join(f"{tp[n]:.0f}/h at {n}" for n in sorted(tp))
    if 1 not in tp or len(measured) <= 1:
        why = "only 1 worker measured" if fit > 1 else "1 fits"
        return Decision(1, fit, f"auto: {memory}; {why} → 1 worker" + (f" ({figures})" if figures else ""))
    best = max(measured, key=lambda n: tp[n])
    chosen = min(n for n in measured if tp[n] >= NEAR_BEST * tp[best])
    if tp[chosen] < (1 + CLEAR_GAIN) * tp[1]:
        chosen = 1
        verdict = f"more workers add < {CLEAR_GAIN:.0%} throughput → 1 worker"
    else:
        verdict = f"{chosen} workers give {tp[chosen] / tp[1]:.2f}× one worker → {chosen} workers"
    return Decision(chosen, fit, f"auto: {memory}; measured {figures}; {verdict}")


# --------------------------------------------------------------------------------------------------
# The sizing hook for planning


Calibrator = Callable[..., Profile]


def cards_name(cards: list[Gpu]) -> str:
    """The name a profile is filed under: the cards' model names, each once ("A + B" when mixed)."""
    return " + ".join(dict.fromkeys(g.name for g in cards))


class Sizer:
    """`sizing` hook of `planning.device_groups`: calibrate (or read the cache) and decide."""

    def __init__(self, cache_dir: str | os.PathLike, recalibrate: bool = False,
                 calibrator: Calibrator | None = None, say: Callable[[str], None] | None = None):
        self.cache = ProfileCache(cache_dir)
        self.recalibrate = recalibrate
        self.calibrator = calibrator or calibrate
        self.say = say or (lambda text: print(text, file=sys.stderr, flush=True))
        self.profiles: dict[str, tuple[Profile, str]] = {}  # queue -> (profile, "cached"/"measured")
        self._done: set[str] = set()

    def profile(self, manifest: Manifest, cards: list[Gpu], probe_workers: int) -> tuple[Profile, str]:
        name = cards_name(cards)
        key = profile_key(manifest, name, len(cards))
        path = str(self.cache.path(key))
        if not (self.recalibrate and path not in self._done):
            cached = self.cache.get(key)
            if cached is not None and (not cached.fits or probe_workers <= 1
                                       or max(cached.jobs_per_hour, default=0) > 1
                                       or (cached.peak_nvml_bytes or 0) * 2 > min(g.free_bytes for g in cards)):
                return cached, "cached"
        self.say(f"calibrating {manifest.model.backend} on {', '.join(g.label for g in cards)} ({name}): "
                 f"one real job of these settings, then up to {probe_workers} workers at once…")
        started = time.monotonic()
        try:
            profile = self.calibrator(manifest, cards, probe_workers=probe_workers,
                                      margin_gib=manifest.resources.memory_margin_gib)
        except DoesNotFit as exc:
            profile = Profile(key=key, gpu_name=name, gpu_total_bytes=min(g.total_bytes for g in cards),
                              cards=len(cards), fits=False, notes=[str(exc)])
        profile.key = key
        profile.calibration_seconds = round(time.monotonic() - started, 1)
        profile.created_at = profile.created_at or time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.cache.put(profile)
        self._done.add(path)
        return profile, "measured"

    def __call__(self, manifest: Manifest, gpus: list[Gpu], notes: list[str]) -> list[DeviceGroup]:
        res = manifest.resources
        requested = res.workers_per_gpu
        probe = MAX_PROBE_WORKERS if requested == "auto" else 1
        if isinstance(res.gpus_per_worker, int):
            if res.gpus_per_worker > len(gpus):
                raise PlanError(f"resources.gpus_per_worker is {res.gpus_per_worker}, but only {len(gpus)} "
                                "GPUs are visible")
            per_worker = res.gpus_per_worker
        else:
            per_worker = None
            for k in range(1, len(gpus) + 1):
                profile, _ = self.profile(manifest, gpus[:k], probe)
                if profile.fits:
                    per_worker = k
                    break
            if per_worker is None:
                raise PlanError(f"one worker of this model runs out of memory even on all {len(gpus)} visible "
                                "GPUs together: use offload (model.options) or smaller settings")
            notes.append(f"gpus_per_worker: auto → {per_worker} card(s) per worker (one worker "
                         + ("fits on one card)" if per_worker == 1 else f"did not fit on {per_worker - 1})"))
        groups = []
        for start in range(0, len(gpus) - per_worker + 1, per_worker):
            cards = gpus[start:start + per_worker]
            queue = "gpu" + "+".join(str(g.index) for g in cards)
            if requested != "auto" and not self.recalibrate:
                # An explicit count is obeyed; it is checked against a profile measured before, but
                # never calibrated for (a real job of a 14B model costs minutes): --recalibrate does.
                cached = self.cache.get(profile_key(manifest, cards_name(cards), len(cards)))
                if cached is None:
                    groups.append(DeviceGroup(queue=queue, devices=tuple(g.index for g in cards), workers=requested,
                                              reason=f"workers_per_gpu: {requested} (from the manifest; not measured "
                                                     "here yet: `plan --recalibrate` checks that it fits)",
                                              gpus=tuple(cards)))
                    continue
                profile, source = cached, "cached"
            else:
                profile, source = self.profile(manifest, cards, probe)
            self.profiles[queue] = (profile, source)
            free = min(g.free_bytes for g in cards)
            if not profile.fits:
                groups.append(DeviceGroup(queue=queue, devices=tuple(g.index for g in cards), workers=0,
                                          reason=f"one worker ran out of memory on {len(cards)} such card(s) "
                                                 f"(calibration): no worker here", gpus=tuple(cards)))
                notes.append(f"{queue}: left idle: the model does not fit on it ({profile.gpu_name})")
                continue
            decision = decide_workers(profile, free, res.memory_margin_gib, requested)
            if decision.warning:
                notes.append(f"WARNING {queue}: {decision.warning}")
            groups.append(DeviceGroup(queue=queue, devices=tuple(g.index for g in cards),
                                      workers=decision.workers,
                                      reason=f"{decision.reason} [profile {source}]", gpus=tuple(cards)))
        left = len(gpus) % per_worker
        if left:
            notes.append(f"{left} GPU(s) left unused: {per_worker} cards per worker")
        seen = set()
        for queue, (profile, source) in self.profiles.items():
            path = self.cache.path(profile.key)
            if path in seen:
                continue
            seen.add(path)
            notes.append(f"profile ({source}) {profile.summary()}; {os.path.relpath(path)}")
        if not any(g.workers for g in groups):
            raise PlanError("no device group can hold a worker of this model: " +
                            "; ".join(f"{g.queue}: {g.reason}" for g in groups))
        return groups


def needs_sizing(manifest: Manifest) -> bool:
    """Measured sizing applies to backends that declare it (model backends, not the synthetic one)."""
    from .backends import backend_class
    return backend_class(manifest.model.backend).measured_sizing


def expected_times(manifest: Manifest, gpus: list[Gpu]) -> list[str]:
    """Seconds per video and per denoising step on each kind of card, where a calibration profile of
    exactly these settings (speed settings included) was measured; `plan` prints them."""
    cache = ProfileCache(manifest.output_dir / ".sweep" / "profiles")
    g = manifest.generation
    steps = max(1, int(g.steps * g.denoising_strength)) if manifest.model.task == "v2v" else g.steps
    lines = []
    for name in dict.fromkeys(gpu.name for gpu in gpus):
        cards = manifest.resources.gpus_per_worker if isinstance(manifest.resources.gpus_per_worker, int) else 1
        profile = cache.get(profile_key(manifest, name, cards))
        if profile is None or not profile.seconds_per_job:
            continue
        lines.append(f"{name}: {profile.seconds_per_job:.1f} s per video, about {profile.seconds_per_job / steps:.2f} s "
                     f"per step ({steps} steps; decoding included), measured {profile.created_at[:16]}")
    return lines


def make_sizer(manifest: Manifest, recalibrate: bool = False, calibrator: Calibrator | None = None,
               say: Callable[[str], None] | None = None) -> Sizer | None:
    if not needs_sizing(manifest):
        return None
    from .gpus import FAKE_ENV
    if calibrator is None and os.environ.get(FAKE_ENV):
        return None  # FAKE cards cannot run a calibration job: plan from the manifest's counts
    return Sizer(manifest.output_dir / ".sweep" / "profiles", recalibrate=recalibrate, calibrator=calibrator,
                 say=say)


# --------------------------------------------------------------------------------------------------
# Calibration on real GPUs: probe subprocesses, NVML sampled from here


class _Sampler(threading.Thread):
    """Samples NVML memory of the probe processes (or, where NVML cannot see them, of the cards)."""

    def __init__(self, devices: tuple[int, ...], nvml=None):
        super().__init__(daemon=True, name="nvml-sampler")
        self.devices = devices
        self.nvml = nvml
        self.pids: list[int] = []
        self.peaks: dict[int, int] = {}  # pid -> peak bytes on its most loaded card
        self.last: dict[int, int] = {}
        self.device_peak = 0  # the most loaded card's used memory, minus its use before the probes
        self.base = _device_used(devices, nvml)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(SAMPLE_S):
            self.sample()

    def sample(self) -> None:
        try:
            usage = process_memories(self.pids, nvml=self.nvml)
            used = _device_used(self.devices, self.nvml)
        except Exception:
            return
        for pid, per_card in usage.items():
            value = max((v for d, v in per_card.items() if d in self.devices), default=0)
            self.last[pid] = value
            self.peaks[pid] = max(self.peaks.get(pid, 0), value)
        delta = max((used.get(d, 0) - self.base.get(d, 0) for d in self.devices), default=0)
        self.device_peak = max(self.device_peak, delta)

    def reset_device_peak(self) -> None:
        self.device_peak = 0


def _device_used(devices: tuple[int, ...], nvml=None) -> dict[int, int]:
    if nvml is None:
        nvml = nvml_module()
    nvml.nvmlInit()
    try:
        return {d: int(nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(d)).used) for d in devices}
    finally:
        nvml.nvmlShutdown()


def _wait_for(path: Path, procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        for proc in procs:
            code = proc.poll()
            if code is not None:
                if code == EXIT_PROBE_OOM:
                    raise DoesNotFit(f"calibration probe ran out of memory ({path.name})")
                raise PlanError(f"calibration probe exited with code {code} before {path.name} "
                                f"(see {path.parent}/probe*.log)")
        if time.monotonic() > deadline:
            raise PlanError(f"calibration probe did not reach {path.name} within {timeout:.0f}s")
        time.sleep(0.05)


def calibrate(manifest: Manifest, cards: list[Gpu], probe_workers: int = MAX_PROBE_WORKERS,
              margin_gib: float = 2.0, jobs_per_phase: int | None = None, timeout: float | None = None,
              say: Callable[[str], None] | None = None) -> Profile:
    """Measure memory and throughput of this manifest's jobs on `cards` with probe subprocesses."""
    from .sweep import python_env
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    k = jobs_per_phase or int(os.environ.get("ORCHESTRATOR_CALIBRATION_JOBS", "2"))
    timeout = timeout or max(600.0, manifest.execution.job_timeout_s * 2)
    devices = tuple(g.index for g in cards)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="calibration-", dir=_scratch(manifest)))
    # A v2v or i2v model needs its reference: the probes use the manifest's first one.
    reference = next((str(r.path) for c in manifest.categories for r in c.references if r.path), None)
    from .speed import compile_cache_dir
    config = {"model": asdict(manifest.model), "generation": asdict(manifest.generation), "devices": devices,
              "workdir": str(work), "reference": reference,
              # the probes compile as the workers will, into the same cache (the workers then start warm)
              "compile_cache": str(compile_cache_dir(manifest.output_dir)) if manifest.model.speed.compile != "none"
              else None}
    (work / "config.json").write_text(json.dumps(config), encoding="utf-8")
    env = python_env()
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
    sampler = _Sampler(devices)
    sampler.start()
    procs: list[subprocess.Popen] = []
    logs = []

    def start_probe(index: int) -> subprocess.Popen:
        log = open(work / f"probe{index}.log", "w", encoding="utf-8")
        logs.append(log)
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.sizing", "probe", str(work / "config.json"),
                                 str(index)], env=env, stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)
        sampler.pids.append(proc.pid)
        return proc

    def read(name: str) -> dict:
        return json.loads((work / name).read_text(encoding="utf-8"))

    try:
        start_probe(0)
        _wait_for(work / "probe0.loaded", procs, timeout)
        sampler.sample()
        loaded = sampler.last.get(procs[0].pid) or sampler.device_peak
        _wait_for(work / "probe0.ready", procs, timeout)
        sampler.sample()
        first = read("probe0.ready")
        per_process = procs[0].pid in sampler.peaks and sampler.peaks[procs[0].pid] > 0
        peak = sampler.peaks[procs[0].pid] if per_process else sampler.device_peak
        free = min(g.free_bytes for g in cards)
        fit = fit_count(free, peak, int(margin_gib * GIB))
        say(f"  one worker: loaded in {first['load_s']:.1f}s, peak {_gib(peak)} "
            f"({'NVML per process' if per_process else 'NVML card delta'}), {fit} fit in {_gib(free)} free")
        n_max = max(1, min(probe_workers, fit))
        for index in range(1, n_max):
            start_probe(index)
        ready = 1
        for index in range(1, n_max):
            try:
                _wait_for(work / f"probe{index}.ready", procs, timeout)
                ready += 1
            except DoesNotFit:
                say(f"  probe {index} ran out of memory while warming up: measuring up to {ready} workers")
                break
        jobs_per_hour: dict[int, float] = {}
        seconds_one = None
        torch_peak = first.get("peak_torch")
        for n in range(1, ready + 1):
            for index in range(n):
                (work / f"go{n}-{index}").write_text(json.dumps({"jobs": k}), encoding="utf-8")
            try:
                for index in range(n):
                    _wait_for(work / f"probe{index}.phase{n}.json", procs[:ready], timeout)
            except DoesNotFit:
                say(f"  {n} workers at once ran out of memory: measured up to {n - 1}")
                break
            results = [read(f"probe{index}.phase{n}.json") for index in range(n)]
            span = max(r["end"] for r in results) - min(r["start"] for r in results)
            jobs_per_hour[n] = round(n * k / span * 3600, 1)
            if n == 1:
                seconds_one = sum(results[0]["seconds"]) / len(results[0]["seconds"])
            torch_peak = max([torch_peak or 0] + [r.get("peak_torch") or 0 for r in results]) or None
            say(f"  {n} worker(s) at once: {jobs_per_hour[n]:.1f} jobs/hour "
                f"({', '.join(f'{s:.1f}s' for r in results for s in r['seconds'])} per job)")
        (work / "stop").write_text("", encoding="utf-8")
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        sampler.sample()
        if per_process:
            peak = max(sampler.peaks.get(p.pid, 0) for p in procs)
        notes = [f"{k} timed job(s) per worker per phase; warm-up job of {first['warmup_steps']} step(s) not timed"]
        return Profile(key={}, gpu_name=cards_name(cards),
                       gpu_total_bytes=min(g.total_bytes for g in cards), cards=len(cards), fits=True,
                       peak_nvml_bytes=int(peak), peak_torch_reserved_bytes=torch_peak,
                       loaded_nvml_bytes=int(loaded) if loaded else None,
                       nvml_source="per-process" if per_process else "device-delta",
                       load_seconds=round(first["load_s"], 2),
                       seconds_per_job=round(seconds_one, 2) if seconds_one else None,
                       jobs_per_hour=jobs_per_hour, free_bytes_at_calibration=free,
                       calibration_seconds=round(time.monotonic() - started, 1),
                       created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), notes=notes)
    finally:
        sampler.stopped.set()
        (work / "stop").write_text("", encoding="utf-8")
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
        if not os.environ.get("ORCHESTRATOR_KEEP_CALIBRATION"):
            import shutil
            shutil.rmtree(work, ignore_errors=True)


def _scratch(manifest: Manifest) -> str:
    folder = manifest.output_dir / ".sweep" / "calibration"
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)


# --------------------------------------------------------------------------------------------------
# The probe: one calibration worker process


def probe(config_path: str, index: int) -> int:
    from .backends import OutOfMemory, backend_class
    from .jobs import Job
    from .job_loop import generate_job, write_video
    from .manifest import GenerationConfig, ModelConfig
    from .planning import WorkerSpec

    config = json.loads(Path(config_path).read_text(encoding="utf-8"))
    work = Path(config["workdir"])
    model = ModelConfig(**config["model"])
    generation = GenerationConfig(**config["generation"])
    warmup_steps = min(2, generation.steps)

    def write(name: str, data: dict) -> None:
        temp = work / f".{name}.tmp"
        temp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(temp, work / name)

    def job(n: int) -> Job:
        reference = config.get("reference")
        return Job(id=f"calibration-{index}-{n}", ordinal=n, category="calibration",
                   stem="calibration" if reference else None, reference=reference,
                   prompt_index=n, prompt=f"calibration prompt {n}: a red ball rolls across a wooden table",
                   seed=1000 * index + n, output=str(work / f"probe{index}-{n}.mp4"))

    def run_job(backend, n: int) -> float:
        # The workers' own generate and write path, so the probe measures what a job costs them.
        t0 = time.monotonic()
        spec = WorkerSpec(sweep="calibration", worker=f"probe{index}", devices=tuple(config["devices"]),
                          queue="calibration", ledger="", log="", output_dir=str(work), model=config["model"],
                          generation=asdict(backend.generation), execution={})
        made = generate_job(backend, spec, job(n), 1, [], lambda step, steps: None)
        write_video(spec, made.result, work / f"probe{index}.mp4", record=None)
        return time.monotonic() - t0

    from .speed import first_call_lock, use_compile_cache
    cache = config.get("compile_cache")
    if cache:
        use_compile_cache(cache)
    try:
        t0 = time.monotonic()
        backend = backend_class(model.backend)(model, generation, tuple(config["devices"]))
        backend.load()
        load_s = time.monotonic() - t0
        write(f"probe{index}.loaded", {"load_s": load_s, "pid": os.getpid()})
        backend.generation = replace(generation, steps=warmup_steps)
        with first_call_lock(cache):  # the warm-up compiles (speed.compile), one probe at a time
            warm_s = run_job(backend, 0)
        backend.generation = generation
        write(f"probe{index}.ready", {"load_s": load_s, "warmup_s": warm_s, "warmup_steps": warmup_steps,
                                      "peak_torch": backend.peak_memory_bytes()})
        n_job = 1
        phase = 1
        while not (work / "stop").exists():
            go = work / f"go{phase}-{index}"
            if not go.exists():
                if any((work / f"go{p}-{index}").exists() for p in range(phase + 1, MAX_PROBE_WORKERS + 2)):
                    phase += 1
                    continue
                time.sleep(0.02)
                continue
            jobs = json.loads(go.read_text(encoding="utf-8"))["jobs"]
            start = time.time()
            seconds = []
            for _ in range(jobs):
                seconds.append(run_job(backend, n_job))
                n_job += 1
            write(f"probe{index}.phase{phase}.json", {"start": start, "end": time.time(), "seconds": seconds,
                                                     "peak_torch": backend.peak_memory_bytes()})
            phase += 1
        backend.close()
        return 0
    except OutOfMemory as exc:
        print(f"probe {index}: out of memory: {exc}", flush=True)
        return EXIT_PROBE_OOM
    except Exception as exc:  # out of memory while loading comes as the library's own error
        if "out of memory" in str(exc).lower():
            print(f"probe {index}: out of memory: {str(exc).splitlines()[0]}", flush=True)
            return EXIT_PROBE_OOM
        raise


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 3 and argv[0] == "probe":
        return probe(argv[1], int(argv[2]))
    print("usage: python -m orchestrator.sizing probe CONFIG.json INDEX", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
