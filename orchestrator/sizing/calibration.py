"""Calibration: measuring one device group with probe subprocesses (`calibrate`, in the planning
process, NVML sampled from here) and the probe itself (`probe`, `python -m orchestrator.sizing probe`).

Calibration runs real jobs of the manifest's settings, through the workers' own job loop
(`ProbeJobs` is the probe's job source), on one device group (one card, or k cards
for a model that needs them) in probe subprocesses, and measures:

  - the peak device memory one worker process needs, from NVML's per-process usage (which includes
    the CUDA context), sampled while it runs, and torch's peak reserved memory;
  - seconds per job at one worker, and jobs per hour at 1, 2, … concurrent workers on the group
    (up to as many as fit, at most MAX_PROBE_WORKERS).

The result is cached as JSON under `<output_dir>/.sweep/profiles/`, keyed by (backend, model, task,
resolution, frames, steps, guidance, dtype, memory options, GPU name, cards per worker), so the next
plan of the same settings is instant; `--recalibrate` measures again.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ..gpus import GIB, Gpu, nvml_module, process_memories
from ..harness import Harness
from ..job_loop import JobSource, write_video
from ..jobs import Job
from ..ledger import Claim
from ..manifest import Execution, GenerationConfig, Manifest, ModelConfig
from ..planning import PlanError, WorkerSpec
from ..speed import compile_cache_dir, use_compile_cache
from ..sweep import python_env
from .decisions import fit_count
from .profiles import Profile, cards_name, gib_text

MAX_PROBE_WORKERS = 3
EXIT_PROBE_OOM = 3
SAMPLE_S = 0.1
log = logging.getLogger(__name__)


class DoesNotFit(RuntimeError):
    """One worker ran out of memory on this device group during calibration."""


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
    say = say or log.info
    k = jobs_per_phase or int(os.environ.get("ORCHESTRATOR_CALIBRATION_JOBS", "2"))
    timeout = timeout or max(600.0, manifest.execution.job_timeout_s * 2)
    devices = tuple(g.index for g in cards)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="calibration-", dir=_scratch(manifest)))
    # A v2v or i2v model needs its reference: the probes use the manifest's first one.
    reference = next((str(r.path) for c in manifest.categories for r in c.references if r.path), None)
    config = {"model": manifest.heaviest_model.to_dict(), "generation": manifest.heaviest_generation.to_dict(),
              "devices": devices, "workdir": str(work), "reference": reference,
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
        probe_log = open(work / f"probe{index}.log", "w", encoding="utf-8")
        logs.append(probe_log)
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.sizing", "probe", str(work / "config.json"),
                                 str(index)], env=env, stdout=probe_log, stderr=subprocess.STDOUT)
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
        say(f"  one worker: loaded in {first['load_s']:.1f}s, peak {gib_text(peak)} "
            f"({'NVML per process' if per_process else 'NVML card delta'}), {fit} fit in {gib_text(free)} free")
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
        for probe_log in logs:
            probe_log.close()
        if not os.environ.get("ORCHESTRATOR_KEEP_CALIBRATION"):
            import shutil
            shutil.rmtree(work, ignore_errors=True)


def _scratch(manifest: Manifest) -> str:
    folder = manifest.output_dir / ".sweep" / "calibration"
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)


# --------------------------------------------------------------------------------------------------
# The probe: one calibration worker process


class ProbeFailed(RuntimeError):
    """A probe's job failed: the probe ends (out of memory: it says so with its exit code)."""

    def __init__(self, message: str, outcome: str):
        super().__init__(message)
        self.out_of_memory = outcome == "oom" or "out of memory" in message.lower()


class ProbeJobs(JobSource):
    """The jobs of one probe phase, for the workers' own job loop: no ledger, each job timed from its
    start to its video written, every video written over the probe's one scratch file."""

    def __init__(self, jobs: list, video: Path):
        self.waiting, self.video = list(jobs), video
        self.running: set[str] = set()
        self.seconds: list[float] = []

    def claim(self, prefer_group=None):
        if not self.waiting:
            return None
        job = self.waiting.pop(0)
        self.running.add(job.id)
        return Claim(job, 1)

    def complete(self, job_id, seconds, skipped=False):
        self.running.discard(job_id)
        self.seconds.append(seconds)
        return True

    def fail(self, job_id, message, outcome="error"):
        raise ProbeFailed(message, outcome)  # a probe measures; it does not retry

    def release(self, job_id):
        self.running.discard(job_id)

    def heartbeat(self, job_id):
        pass

    def unfinished(self):
        return len(self.waiting) + len(self.running)

    def store_video(self, spec, job, result, record):
        write_video(spec, result, self.video, record=None, job=job)
        return True


def probe(config_path: str, index: int) -> int:

    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(message)s")
    config = json.loads(Path(config_path).read_text(encoding="utf-8"))
    work = Path(config["workdir"])
    model = ModelConfig.from_dict(config["model"])
    generation = GenerationConfig.from_dict(config["generation"])
    warmup_steps = min(2, generation.steps)
    warmup = replace(generation, steps=warmup_steps)  # the warm-up job's (it compiles, where speed.compile is on)

    def write(name: str, data: dict) -> None:
        temp = work / f".{name}.tmp"
        temp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(temp, work / name)

    def job(n: int, settings: GenerationConfig) -> Job:
        reference = config.get("reference")
        return Job(id=f"calibration-{index}-{n}", ordinal=n, category="calibration",
                   stem="calibration" if reference else None, reference=reference,
                   prompt_index=n, prompt=f"calibration prompt {n}: a red ball rolls across a wooden table",
                   seed=1000 * index + n, output=str(work / f"probe{index}-{n}.mp4"), model=model, generation=settings)

    # The workers' own harness and job loop, so the probe measures what a job costs them.
    spec = WorkerSpec(sweep="calibration", worker=f"probe{index}", devices=tuple(config["devices"]),
                      queue="calibration", ledger="", log="", output_dir=str(work), model=model,
                      generation=generation, execution=Execution())
    harness = Harness(spec, log)

    def run_jobs(numbers: range, compile_cache: str | None = None,
                 settings: GenerationConfig = generation) -> list[float]:
        source = ProbeJobs([job(n, settings) for n in numbers], work / f"probe{index}.mp4")
        try:
            harness.run(source, [], compile_cache)
        finally:
            harness.finish_writes()
        return source.seconds

    cache = config.get("compile_cache")
    if cache:
        use_compile_cache(cache)
    try:
        t0 = time.monotonic()
        backend = harness.open()  # (every job of the probe has its model: loaded once)
        load_s = time.monotonic() - t0
        write(f"probe{index}.loaded", {"load_s": load_s, "pid": os.getpid()})
        t0 = time.monotonic()
        run_jobs(range(1), compile_cache=cache, settings=warmup)  # compiles (speed.compile), one probe at a time
        warm_s = time.monotonic() - t0
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
            seconds = run_jobs(range(n_job, n_job + jobs))
            n_job += jobs
            write(f"probe{index}.phase{phase}.json", {"start": start, "end": time.time(), "seconds": seconds,
                                                     "peak_torch": backend.peak_memory_bytes()})
            phase += 1
        harness.close()
        return 0
    except ProbeFailed as exc:
        if not exc.out_of_memory:
            raise
        log.error("probe %d: %s", index, exc)
        return EXIT_PROBE_OOM
    except Exception as exc:  # out of memory while loading comes as the library's own error
        if "out of memory" in str(exc).lower():
            log.error("probe %d: out of memory: %s", index, str(exc).splitlines()[0])
            return EXIT_PROBE_OOM
        raise


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 3 and argv[0] == "probe":
        return probe(argv[1], int(argv[2]))
    print("usage: python -m orchestrator.sizing probe CONFIG.json INDEX", file=sys.stderr)
    return 2

