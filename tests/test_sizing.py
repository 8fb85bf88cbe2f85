"""Measured sizing: the arithmetic and the decisions on FAKE NVML cards with a fake calibrator, the
profile cache, and a worker retiring after repeated out-of-memory (synthetic backend, real CLI)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.gpus import GIB, FakeNvml, discover
from orchestrator.jobs import expand
from orchestrator.ledger import Ledger
from orchestrator.validation import load_manifest
from orchestrator.planning import make_plan
from orchestrator.sizing import DoesNotFit, Profile, Sizer, decide_workers, fit_count

from .conftest import PATIENCE_S, cli, synthetic_manifest


class FakeCalibrator:
    """Stands in for GPU calibration: a profile per card name, DoesNotFit below `min_cards` cards."""

    def __init__(self, peaks_gib: dict[str, float], jobs_per_hour: dict[int, float], min_cards: int = 1):
        self.peaks = peaks_gib
        self.jobs_per_hour = jobs_per_hour
        self.min_cards = min_cards
        self.calls: list[tuple[str, int, int]] = []

    def __call__(self, manifest, cards, probe_workers, margin_gib):
        name = cards[0].name
        self.calls.append((name, len(cards), probe_workers))
        if len(cards) < self.min_cards:
            raise DoesNotFit(f"out of memory on {len(cards)} card(s)")
        peak = int(self.peaks[name] * GIB)
        free = min(g.free_bytes for g in cards)
        fit = fit_count(free, peak, int(margin_gib * GIB))
        measured = {n: v for n, v in self.jobs_per_hour.items() if n <= max(1, min(fit, probe_workers))}
        return Profile(key={}, gpu_name=name, gpu_total_bytes=cards[0].total_bytes, cards=len(cards),
                       peak_nvml_bytes=peak, peak_torch_reserved_bytes=peak - GIB // 2,
                       loaded_nvml_bytes=peak // 3, load_seconds=12.0, seconds_per_job=3600 / measured[1],
                       jobs_per_hour=measured, free_bytes_at_calibration=free)


@pytest.fixture
def diffusers_manifest(write_manifest, tmp_path):
    """A diffusers manifest whose checkpoint folder exists (the calibrator is fake: nothing loads it)."""
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "model_index.json").write_text("{}", encoding="utf-8")

    def make(**resources):
        data = synthetic_manifest(model={"backend": "diffusers", "task": "t2v", "path": str(checkpoint),
                                         "options": {}},
                                  resources={"workers_per_gpu": "auto", "gpus_per_worker": 1,
                                             "memory_margin_gib": 2.0, **resources})
        return load_manifest(write_manifest(data))
    return make


def plan_with(manifest, cards, calibrator, tmp_path, recalibrate=False):
    gpus = discover(FakeNvml(cards), visible=None)
    sizer = Sizer(tmp_path / "profiles", recalibrate=recalibrate, calibrator=calibrator, say=lambda s: None)
    return make_plan(manifest, expand(manifest), gpus, sizing=sizer), sizer


def test_fit_arithmetic():
    assert fit_count(80 * GIB, int(17.6 * GIB), 2 * GIB) == 4
    assert fit_count(16 * GIB, 5 * GIB, 2 * GIB) == 2
    assert fit_count(12 * GIB, 5 * GIB, 2 * GIB) == 1
    assert fit_count(6 * GIB, 5 * GIB, 2 * GIB) == 0


def test_heterogeneous_cards_each_get_their_own_count(diffusers_manifest, tmp_path):
    calibrator = FakeCalibrator({"FAKE RTX 5060 Ti 16GB": 5.0, "FAKE RTX 3060 12GB": 5.0},
                                {1: 100.0, 2: 180.0, 3: 200.0})
    plan, _ = plan_with(diffusers_manifest(), [("FAKE RTX 5060 Ti 16GB", 16, 0), ("FAKE RTX 3060 12GB", 12, 0)],
                        calibrator, tmp_path)
    by_queue = {g.queue: g for g in plan.groups}
    assert by_queue["gpu0"].workers == 2 and by_queue["gpu1"].workers == 1
    assert "2 fit" in by_queue["gpu0"].reason and "1.80× one worker" in by_queue["gpu0"].reason
    assert "1 fit" in by_queue["gpu1"].reason
    assert sorted(w.id for w in plan.workers) == ["gpu0_worker0", "gpu0_worker1", "gpu1_worker0"]
    assert {c[0] for c in calibrator.calls} == {"FAKE RTX 5060 Ti 16GB", "FAKE RTX 3060 12GB"}  # one per card kind


def test_auto_chooses_one_when_more_workers_add_no_throughput(diffusers_manifest, tmp_path):
    # The lent H100's measurement (shared/gpu/README.md): 248, 237, 240 videos/hour at 1, 2, 3 workers.
    calibrator = FakeCalibrator({"FAKE H100 80GB": 17.6}, {1: 248.0, 2: 237.0, 3: 240.0})
    plan, _ = plan_with(diffusers_manifest(), [("FAKE H100 80GB", 80, 0)], calibrator, tmp_path)
    (group,) = plan.groups
    assert group.workers == 1
    assert "4 fit" in group.reason and "add < 10% throughput" in group.reason
    assert "248/h at 1, 237/h at 2, 240/h at 3" in group.reason


def test_auto_keeps_more_workers_only_for_a_clear_gain():
    profile = Profile(key={}, gpu_name="FAKE", gpu_total_bytes=80 * GIB, cards=1, peak_nvml_bytes=10 * GIB,
                      jobs_per_hour={1: 100.0, 2: 105.0, 3: 108.0})
    assert decide_workers(profile, 80 * GIB, 2.0, "auto").workers == 1  # +8%: not clear
    profile.jobs_per_hour = {1: 100.0, 2: 150.0, 3: 152.0}
    assert decide_workers(profile, 80 * GIB, 2.0, "auto").workers == 2  # 3 is within 3% of 2: fewer wins
    assert decide_workers(profile, 20 * GIB, 2.0, "auto").workers == 1  # only 1 fits now
    assert decide_workers(profile, 8 * GIB, 2.0, "auto").workers == 0  # not even one


def test_model_that_needs_two_cards_groups_them(diffusers_manifest, tmp_path):
    # Wan2.2 A14B on 24 GB cards (shared seeds 000/001): one card runs out of memory, two hold it.
    calibrator = FakeCalibrator({"FAKE RTX 3090 24GB": 18.0}, {1: 20.0}, min_cards=2)
    plan, _ = plan_with(diffusers_manifest(gpus_per_worker="auto"), [("FAKE RTX 3090 24GB", 24, 0)] * 4,
                        calibrator, tmp_path)
    assert [(g.queue, g.devices, g.workers) for g in plan.groups] == [("gpu0+1", (0, 1), 1), ("gpu2+3", (2, 3), 1)]
    assert [w.id for w in plan.workers] == ["gpu0+1_worker0", "gpu2+3_worker0"]
    assert any("gpus_per_worker: auto → 2 card(s)" in n for n in plan.notes)
    assert calibrator.calls[0][1] == 1 and calibrator.calls[1][1] == 2  # tried 1 card, then 2


def test_explicit_count_that_does_not_fit_is_obeyed_with_a_warning(diffusers_manifest, tmp_path):
    calibrator = FakeCalibrator({"FAKE RTX 3060 12GB": 5.0}, {1: 100.0})
    manifest = diffusers_manifest(workers_per_gpu=3)
    plan, _ = plan_with(manifest, [("FAKE RTX 3060 12GB", 12, 0)], calibrator, tmp_path)
    (group,) = plan.groups
    assert group.workers == 3 and "not measured here yet" in group.reason
    assert calibrator.calls == []  # an explicit count costs no calibration job unless asked
    plan, _ = plan_with(manifest, [("FAKE RTX 3060 12GB", 12, 0)], calibrator, tmp_path, recalibrate=True)
    (group,) = plan.groups
    assert group.workers == 3 and "DOES NOT FIT" in group.reason
    warning = next(n for n in plan.notes if n.startswith("WARNING gpu0"))
    assert "workers_per_gpu: 3 does not fit" in warning and "12.0 GiB free" in warning
    assert calibrator.calls == [("FAKE RTX 3060 12GB", 1, 1)]  # memory only: no throughput phases


def test_memory_held_by_another_tenant_lowers_the_count(diffusers_manifest, tmp_path):
    calibrator = FakeCalibrator({"FAKE A100 80GB": 17.6}, {1: 100.0, 2: 190.0, 3: 270.0})
    plan, _ = plan_with(diffusers_manifest(), [("FAKE A100 80GB", 80, 0), ("FAKE A100 80GB", 80, 40)],
                        calibrator, tmp_path)
    assert [g.workers for g in plan.groups] == [3, 2]
    assert "40.0 GiB free → 2 fit" in plan.groups[1].reason


def test_profile_cache_hit_miss_and_recalibrate(diffusers_manifest, tmp_path):
    calibrator = FakeCalibrator({"FAKE H100 80GB": 17.6}, {1: 248.0, 2: 237.0, 3: 240.0})
    cards = [("FAKE H100 80GB", 80, 0)]
    manifest = diffusers_manifest()
    plan, sizer = plan_with(manifest, cards, calibrator, tmp_path)
    assert len(calibrator.calls) == 1 and sizer.profiles["gpu0"][1] == "measured"
    files = list((tmp_path / "profiles").glob("*.json"))
    assert len(files) == 1 and files[0].name.startswith("diffusers-FAKE-H100-80GB-x1-")
    saved = json.loads(files[0].read_text(encoding="utf-8"))
    assert saved["key"]["width"] == 32 and saved["key"]["gpu"] == "FAKE H100 80GB" and saved["jobs_per_hour"]["2"] == 237.0
    plan2, sizer2 = plan_with(manifest, cards, calibrator, tmp_path)  # hit: nothing measured
    assert len(calibrator.calls) == 1 and sizer2.profiles["gpu0"][1] == "cached"
    assert plan2.groups[0].reason == plan.groups[0].reason.replace("measured]", "cached]")
    plan_with(manifest, cards, calibrator, tmp_path, recalibrate=True)  # --recalibrate: measured again
    assert len(calibrator.calls) == 2
    other = diffusers_manifest()
    other = type(other)(**{**other.__dict__, "generation": type(other.generation)(
        **{**other.generation.__dict__, "width": 64})})
    plan_with(other, cards, calibrator, tmp_path)  # other settings: a miss
    assert len(calibrator.calls) == 3 and len(list((tmp_path / "profiles").glob("*.json"))) == 2
    plan_with(manifest, [("FAKE H200 141GB", 141, 0)], FakeCalibrator({"FAKE H200 141GB": 17.6}, {1: 300.0}),
              tmp_path)  # another GPU: a miss
    assert len(list((tmp_path / "profiles").glob("*.json"))) == 3


def test_one_reader_of_the_profiles_folder_serves_sizing_fit_and_the_ray_plan(diffusers_manifest):
    """Sizing's cache, `models fit`'s measured profiles and the Ray plan's profiles all read the sweep's
    profiles folder through sizing.profiles: the same files, unreadable and old ones skipped."""
    from orchestrator.checkpoints import measured_profiles
    from orchestrator.sizing.profiles import ProfileCache, cached_profiles, profile_key, profiles_folder

    manifest = diffusers_manifest()
    cache = ProfileCache(profiles_folder(manifest))
    ours = Profile(key=profile_key(manifest, "FAKE H100 80GB", 1), gpu_name="FAKE H100 80GB",
                   gpu_total_bytes=80 * GIB, cards=1, peak_nvml_bytes=17 * GIB, jobs_per_hour={1: 200.0})
    other = Profile(key={**profile_key(manifest, "FAKE H200 141GB", 2), "width": 64}, gpu_name="FAKE H200 141GB",
                    gpu_total_bytes=141 * GIB, cards=2, peak_nvml_bytes=9 * GIB, jobs_per_hour={1: 300.0})
    paths = [cache.put(ours), cache.put(other)]
    (cache.folder / "torn.json").write_text("{", encoding="utf-8")
    (cache.folder / "old.json").write_text(json.dumps({"version": 0}), encoding="utf-8")

    assert sorted(path for _, path in cache.all()) == sorted(paths)
    assert cache.get(ours.key) == ours
    assert sorted(p.gpu_name for p in cached_profiles(manifest)) == ["FAKE H100 80GB", "FAKE H200 141GB"]
    assert [profile for profile, _ in measured_profiles(manifest)] == [ours]  # this manifest's settings only


def test_synthetic_backend_is_not_sized(write_manifest, tmp_path):
    manifest = load_manifest(write_manifest(synthetic_manifest(resources={"workers_per_gpu": "auto"})))
    from orchestrator.sizing import make_sizer
    assert make_sizer(manifest) is None
    gpus = discover(FakeNvml([("FAKE H100 80GB", 80, 0)]), visible=None)
    plan = make_plan(manifest, expand(manifest), gpus, sizing=make_sizer(manifest))
    assert plan.groups[0].workers == 1 and "without a calibration profile" in plan.groups[0].reason


def test_plan_prints_per_gpu_figures_on_fake_cards(write_manifest, tmp_path):
    path = write_manifest(synthetic_manifest(resources={"workers_per_gpu": 2}))
    result = cli("plan", str(path), env={"ORCHESTRATOR_FAKE_GPUS": "FAKE RTX 5060 Ti 16GB:16:0;FAKE RTX 3060 12GB:12:1.5"})
    assert result.returncode == 0, result.stderr
    assert "gpu0 FAKE RTX 5060 Ti 16GB: 16.0 of 16.0 GiB free" in result.stdout
    assert "gpu1 FAKE RTX 3060 12GB: 10.5 of 12.0 GiB free, 1.5 GiB held by other processes" in result.stdout
    assert "why: workers_per_gpu: 2 (from the manifest)" in result.stdout


@pytest.mark.slow
def test_repeated_out_of_memory_retires_one_worker_of_the_card(write_manifest, tmp_path):
    # Two workers on one (FAKE) card, every attempt runs out of memory: one worker retires after two in
    # a row and is not restarted; the other stays (the last worker of a card never retires).
    path = write_manifest(synthetic_manifest(
        model={"options": {"oom_rate": 1.0, "seconds_per_job": 0.2}},
        resources={"workers_per_gpu": 2},
        execution={"retries": 3, "max_restarts": 3},
        categories={"alpha": {"prompts": ["a cat", "a dog", "a fox"]}}, seeds=[1]))
    env = {"ORCHESTRATOR_FAKE_GPUS": "FAKE RTX 3090 24GB:24:0"}
    result = cli("run", str(path), "--executor", "local", "--no-progress", env=env)
    assert result.returncode == 1, result.stdout + result.stderr  # every job failed for good
    out = tmp_path / "out"
    workers = {w.id: w for w in Ledger(out / ".sweep" / "ledger.sqlite").workers()}
    assert sorted(workers) == ["gpu0_worker0", "gpu0_worker1"]
    states = sorted(w.state for w in workers.values())
    assert states == ["exited", "retired"]
    retired = next(w for w in workers.values() if w.state == "retired")
    assert retired.restarts == 0 and retired.ooms >= 2
    assert "retired after 2 out-of-memory errors in a row; gpu0 now runs 1 worker(s)" in retired.message
    report = cli("report", str(path), env=env)
    assert f"{retired.id}: retired after 2 out-of-memory errors in a row; gpu0 now runs 1 worker(s)" in report.stdout
    assert "out of memory" in report.stdout  # the failed jobs' last error
    log = (out / "logs" / f"{retired.id}.log").read_text(encoding="utf-8")
    assert "worker retired itself after repeated out-of-memory; not restarting" in log


def test_the_calibration_probe_runs_as_python_m_orchestrator_sizing(tmp_path):
    """`calibrate` starts each probe as `python -m orchestrator.sizing probe CONFIG INDEX`: the entry
    point survives the package's split (synthetic backend: load, warm-up, one timed phase, stop)."""
    import os
    import subprocess
    import sys
    import time
    from dataclasses import asdict

    from orchestrator.manifest import GenerationConfig, ModelConfig

    config = {"model": asdict(ModelConfig(backend="synthetic", task="t2v")), "devices": [], "workdir": str(tmp_path),
              "generation": asdict(GenerationConfig(width=32, height=32, num_frames=5, fps=5, steps=2)),
              "reference": None, "compile_cache": None}
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    probe = subprocess.Popen([sys.executable, "-m", "orchestrator.sizing", "probe", str(tmp_path / "config.json"), "0"],
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        for name, then in (("probe0.ready", "go1-0"), ("probe0.phase1.json", "stop")):
            while not (tmp_path / name).exists() and probe.poll() is None:
                time.sleep(0.05)
            (tmp_path / then).write_text(json.dumps({"jobs": 1}), encoding="utf-8")
        assert probe.wait(timeout=PATIENCE_S) == 0
    finally:
        if probe.poll() is None:
            probe.kill()
    assert len(json.loads((tmp_path / "probe0.phase1.json").read_text(encoding="utf-8"))["seconds"]) == 1


def _probe_config(write_manifest, tmp_path, **model) -> Path:
    """A calibration probe's config for a synthetic manifest, and its first phase's order (two jobs)."""
    from dataclasses import asdict
    manifest = load_manifest(write_manifest(synthetic_manifest(model=model)))
    work = tmp_path / "calibration"
    work.mkdir()
    config = {"model": asdict(manifest.model), "generation": asdict(manifest.generation), "devices": [],
              "workdir": str(work), "reference": None, "compile_cache": None}
    (work / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (work / "go1-0").write_text(json.dumps({"jobs": 2}), encoding="utf-8")
    return work


def test_the_calibration_probe_runs_the_workers_job_loop(write_manifest, tmp_path, monkeypatch):
    """The probe measures jobs through the same `JobLoop` as a worker: the warm-up and each phase."""
    import threading
    import time

    from orchestrator import harness
    from orchestrator.sizing import calibration

    loops = []

    class CountedLoop(harness.JobLoop):  # the loop the probe's harness runs, as a worker's does
        def run(self, backend, gpu_names, compile_cache=None):
            loops.append(self.source)
            return super().run(backend, gpu_names, compile_cache)

    monkeypatch.setattr(harness, "JobLoop", CountedLoop)
    work = _probe_config(write_manifest, tmp_path, options={"seconds_per_job": 0.05})

    def stop_after_phase_one():
        deadline = time.monotonic() + PATIENCE_S
        while not (work / "probe0.phase1.json").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        (work / "stop").write_text("", encoding="utf-8")

    stopper = threading.Thread(target=stop_after_phase_one)
    stopper.start()
    try:
        assert calibration.probe(str(work / "config.json"), 0) == 0
    finally:
        stopper.join()
    phase = json.loads((work / "probe0.phase1.json").read_text())
    assert len(phase["seconds"]) == 2 and all(s > 0 for s in phase["seconds"])
    assert [len(source.seconds) for source in loops] == [1, 2]  # the warm-up job, then the phase's two
    assert json.loads((work / "probe0.ready").read_text())["warmup_steps"] == 2


def test_a_probe_out_of_memory_in_the_job_loop_says_so_with_its_exit_code(write_manifest, tmp_path):
    from orchestrator.sizing.calibration import EXIT_PROBE_OOM, probe
    work = _probe_config(write_manifest, tmp_path, options={"oom_rate": 1.0})
    assert probe(str(work / "config.json"), 0) == EXIT_PROBE_OOM
    assert not (work / "probe0.ready").exists()
