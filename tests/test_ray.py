"""The Ray executor on a real two-node Ray cluster on this machine (loopback only, logical GPUs).

Each cluster test starts `ray.cluster_utils.Cluster` with a head and one more node, each with one
logical GPU and no real one, runs sweeps of the synthetic backend through the real CLI, and shuts
the cluster down at its end. Ray advertises the machine's outward address unless told otherwise:
every node gets `node_ip_address=127.0.0.1` and `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` is set for
every Ray process (ray-project/ray#59110), so no test traffic leaves 127.0.0.1.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from orchestrator import cli as cli_module
from orchestrator.ledger import Ledger
from orchestrator.outputs import TEMP_MARK, count_frames, write_mp4

from .conftest import PATIENCE_S, ROOT, cli, synthetic_manifest

NODE = {"num_cpus": 1, "num_gpus": 1, "node_ip_address": "127.0.0.1",
        "object_store_memory": 80 * 1024 * 1024}


@pytest.fixture
def ray_cluster(monkeypatch):
    """(cluster, second node): a head and a second node, one logical GPU each; shut down after the test."""
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    try:
        second = cluster.add_node(**NODE)
        yield cluster, second
    finally:
        ray.shutdown()
        cluster.shutdown()


def ray_manifest(**overrides) -> dict:
    """Two workers per logical GPU: four actors, two on each node."""
    overrides["resources"] = {"workers_per_gpu": 2, **overrides.get("resources", {})}
    overrides["execution"] = {"executor": "ray", "heartbeat_timeout_s": 20, **overrides.get("execution", {})}
    return synthetic_manifest(**overrides)


def _mp4s(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*.mp4") if ".sweep" not in p.parts and not p.name.startswith(TEMP_MARK))


def _attempts(out: Path) -> list[dict]:
    ledger = Ledger(out / ".sweep" / "ledger.sqlite")
    try:
        return ledger.attempts()
    finally:
        ledger.close()


def _assert_every_output_once(out: Path, jobs: int, unrecorded: int = 0) -> None:
    """`jobs` checked videos with their sidecars, none made twice; `unrecorded`: at most this many were
    finished by actors of a killed driver that never recorded them (the disk says they are done)."""
    mp4s = _mp4s(out)
    assert len(mp4s) == jobs and all(count_frames(p) == 5 for p in mp4s)
    assert all(p.with_suffix(".json").exists() for p in mp4s)
    assert len(list(out.rglob("*.json"))) - len(list((out / ".sweep").rglob("*.json"))) == jobs
    assert not list(out.rglob(f"{TEMP_MARK}*"))
    done: dict[str, int] = {}
    for attempt in _attempts(out):
        if attempt["outcome"] == "done":
            done[attempt["job_id"]] = done.get(attempt["job_id"], 0) + 1
    assert jobs - unrecorded <= len(done) <= jobs and set(done.values()) <= {1}  # never made twice
    made_by = {json.loads(p.with_suffix(".json").read_text())["job_id"] for p in mp4s}
    assert len(made_by) == jobs and set(done) <= made_by


def _start_driver(path: Path, address: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "run_experiment.py"), "run", str(path), "--executor", "ray",
                             "--ray-address", address, "--no-progress"], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(condition, timeout: float, what: str, driver: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        if driver is not None and driver.poll() is not None:  # it will never come
            raise AssertionError(f"the driver ended (exit code {driver.returncode}) before {what}:\n"
                                 f"{driver.stdout.read()[-3000:]}")
        time.sleep(0.1)


def _running_on(out: Path, prefix: str) -> int:
    path = out / ".sweep" / "ledger.sqlite"
    if not path.exists():
        return 0
    ledger = Ledger(path)
    try:
        return sum(1 for job in ledger.jobs() if job["state"] == "running" and (job["worker"] or "").startswith(prefix))
    finally:
        ledger.close()


# ------------------------------------------------------------------------------------------------
# On the cluster


@pytest.mark.slow
def test_sweep_on_a_two_node_cluster_makes_every_output_once(ray_cluster, write_manifest, tmp_path, capsys):
    cluster, _ = ray_cluster
    # One job's first attempt kills its actor's process: the driver replaces the actor and retries it.
    path = write_manifest(ray_manifest(seeds=[1, 2, 3], model={"options": {
        "seconds_per_job": 0.4, "crash_jobs": ["beta/seed_2_prompt_0"]}}))
    rc = cli_module.main(["run", str(path), "--ray-address", cluster.address, "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "started 4 workers (ray)" in printed
    out = tmp_path / "out"
    _assert_every_output_once(out, 9)
    sidecar = json.loads((out / "alpha" / "seed_1_prompt_0.json").read_text())
    assert sidecar["worker"].startswith(("n0-gpu0_worker", "n1-gpu0_worker")) and sidecar["ray"]["ip"] == "127.0.0.1"
    assert sidecar["frames"] == 5 and "python" in sidecar["versions"]
    report = json.loads(cli("report", str(path), "--json").stdout)
    assert report["totals"]["done"] == 9 and report["totals"]["failed"] == 0
    workers = {w["id"]: w for w in report["workers"]}
    assert sorted(workers) == ["n0-gpu0_worker0", "n0-gpu0_worker1", "n1-gpu0_worker0", "n1-gpu0_worker1"]
    assert sum(w["jobs_done"] for w in workers.values()) == 9
    assert sum(w["restarts"] for w in workers.values()) == 1
    crashed = [a for a in _attempts(out) if a["outcome"] == "lost"]  # the ledger's dead-claims rule
    assert len(crashed) == 1 and "the Ray actor died" in crashed[0]["error"]
    assert all(w["state"] == "exited" for w in workers.values())
    # Both nodes worked: the actors really were spread over the cluster.
    assert sum(w["jobs_done"] for k, w in workers.items() if k.startswith("n1-")) > 0
    assert sum(w["jobs_done"] for k, w in workers.items() if k.startswith("n0-")) > 0
    assert (out / "logs" / "n1-gpu0_worker0.log").read_text().count("done ") >= 1
    # The same command again: everything is there, nothing is made twice.
    rc = cli_module.main(["run", str(path), "--ray-address", cluster.address, "--no-progress"])
    assert rc == 0 and "all 9 jobs" in capsys.readouterr().out
    _assert_every_output_once(out, 9)


@pytest.mark.slow
def test_a_node_removed_mid_sweep_loses_nothing_and_doubles_nothing(ray_cluster, write_manifest, tmp_path):
    cluster, second = ray_cluster
    prompts = [f"prompt {i}" for i in range(7)]
    # 4 s jobs: the second node's actors, however late a busy machine starts them, find work left
    path = write_manifest(ray_manifest(categories={"a": {"prompts": prompts}}, seeds=[1, 2],
                                       model={"options": {"seconds_per_job": 4.0}}, generation={"steps": 20}))
    out = tmp_path / "out"
    driver = _start_driver(path, cluster.address)
    try:
        # Both of the second node's actors hold a job and a few videos are done: take the node away.
        _wait_for(lambda: len(_mp4s(out)) >= 2 and _running_on(out, "n1-") == 2, PATIENCE_S,
                  "jobs on the second node", driver)
        cluster.remove_node(second)
        output, _ = driver.communicate(timeout=PATIENCE_S)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 0, output
    _assert_every_output_once(out, 14)
    # The jobs the node was running went back to the queue and were made elsewhere.
    lost = [a for a in _attempts(out) if a["worker"].startswith("n1-") and a["outcome"] != "done"]
    assert len(lost) >= 2 and all(a["outcome"] in ("released", "lost") for a in lost)
    report = json.loads(cli("report", str(path), "--json").stdout)
    assert report["totals"]["done"] == 14 and report["totals"]["failed"] == 0


@pytest.mark.slow
def test_a_killed_driver_is_resumed_by_running_the_command_again(ray_cluster, write_manifest, tmp_path):
    cluster, _ = ray_cluster
    prompts = [f"prompt {i}" for i in range(6)]
    path = write_manifest(ray_manifest(categories={"a": {"prompts": prompts}}, seeds=[1, 2],
                                       model={"options": {"seconds_per_job": 1.2}}, generation={"steps": 20}))
    out = tmp_path / "out"
    driver = _start_driver(path, cluster.address)
    try:
        _wait_for(lambda: len(_mp4s(out)) >= 2 and _running_on(out, "n") >= 2, PATIENCE_S, "a sweep under way", driver)
        # While the driver runs, a second `run` starts nothing.
        second = cli("run", str(path), "--executor", "ray", "--ray-address", cluster.address, "--no-progress")
        assert second.returncode == 0 and "already running" in second.stdout, second.stdout + second.stderr
        process = psutil.Process(driver.pid)
        os.killpg(driver.pid, signal.SIGKILL)
        psutil.wait_procs([process], timeout=PATIENCE_S)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.communicate(timeout=PATIENCE_S)
    done_before = len(_mp4s(out))
    assert 2 <= done_before < 12
    result = cli("run", str(path), "--executor", "ray", "--ray-address", cluster.address, "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "already running" not in result.stdout
    # The actors of the killed driver may finish what they had under way before Ray ends them.
    _assert_every_output_once(out, 12, unrecorded=4)
    outcomes = [a["outcome"] for a in _attempts(out)]
    assert "lost" in outcomes  # the attempts the killed driver had under way


@pytest.mark.slow
def test_stream_outputs_are_written_by_the_driver_atomically(ray_cluster, write_manifest, tmp_path, capsys):
    cluster, _ = ray_cluster
    # One job hangs halfway through its first attempt: its actor is replaced after heartbeat_timeout_s.
    path = write_manifest(ray_manifest(execution={"ray_stream_outputs": True, "heartbeat_timeout_s": 3},
                                       model={"options": {"hang_jobs": ["alpha/seed_1_prompt_0"]}}))
    rc = cli_module.main(["run", str(path), "--ray-address", cluster.address, "--no-progress"])
    assert rc == 0, capsys.readouterr()
    out = tmp_path / "out"
    _assert_every_output_once(out, 6)
    # The ledger actor on the driver's node wrote each one (the atomic way: the offline test below watches it).
    adopted = [Path(line.split(" stored ", 1)[1].removesuffix(" on the driver's node"))
               for log in (out / "logs").glob("*.log") for line in log.read_text().splitlines() if " stored " in line]
    assert sorted(adopted) == _mp4s(out)  # every video went through the driver, once
    assert not (out / ".sweep" / "ray-mount-check").exists()  # shared storage was never needed
    hung = [a for a in _attempts(out) if a["outcome"] == "lost"]
    assert len(hung) == 1 and "no progress for more than 3s" in hung[0]["error"]


@pytest.mark.slow
def test_stop_releases_the_running_jobs_and_ends_the_driver(ray_cluster, write_manifest, tmp_path):
    cluster, _ = ray_cluster
    path = write_manifest(ray_manifest(model={"options": {"seconds_per_job": 30}}, generation={"steps": 300}))
    out = tmp_path / "out"
    driver = _start_driver(path, cluster.address)
    try:
        _wait_for(lambda: _running_on(out, "n") == 4, PATIENCE_S, "four running jobs", driver)
        result = cli("stop", str(path))
        assert result.returncode == 0 and "stopped" in result.stdout, result.stdout + result.stderr
        output, _ = driver.communicate(timeout=PATIENCE_S)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 1, output  # jobs left
    ledger = Ledger(out / ".sweep" / "ledger.sqlite")
    assert ledger.counts()["running"] == 0
    assert all(job["attempts"] == 0 for job in ledger.jobs())  # stopping used no attempt
    assert {a["outcome"] for a in ledger.attempts()} == {"released"}
    assert all(w.state == "exited" for w in ledger.workers())


# ------------------------------------------------------------------------------------------------
# Without a cluster


def test_without_ray_the_executor_says_how_to_install_it_and_starts_nothing(write_manifest, tmp_path, monkeypatch,
                                                                            capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails, as where it is not installed
    path = write_manifest(ray_manifest())
    for command in ("run", "plan"):
        assert cli_module.main([command, str(path)]) == 2
        err = capsys.readouterr().err
        assert "executor `ray` cannot run here" in err and "pip install 'wan-sweep[ray]'" in err
    path = write_manifest(synthetic_manifest())
    assert cli_module.main(["run", str(path), "--executor", "ray", "--ray-address", "127.0.0.1:1"]) == 2
    assert "pip install 'wan-sweep[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture
def ledger_and_slots(write_manifest):
    """The ledger actor's object in this process (no cluster), and the job sources of two worker slots
    sharing one card of one node, each over it as its actor's is over the actor: for their bookkeeping."""
    from orchestrator.executors.ray import LedgerActor, RaySource
    from orchestrator.planning import DeviceGroup, Plan, WorkerSlot
    from orchestrator.sweep import Sweep
    from orchestrator.validation import load_manifest

    manifest = load_manifest(write_manifest(ray_manifest(execution={"ray_stream_outputs": True})))
    sweep = Sweep(manifest)
    ledger = LedgerActor(str(sweep.ledger_path))
    ledger.sync(sweep.jobs, {job.id: "n0-gpu0" for job in sweep.jobs}, set(), manifest.max_attempts, 20, fresh=True)
    group = DeviceGroup(queue="n0-gpu0", devices=(0,), workers=2, reason="test")
    slots = tuple(WorkerSlot(id=f"n0-gpu0_worker{k}", devices=(0,), queue="n0-gpu0") for k in range(2))
    sources = []
    for spec, _ in sweep.write_specs(Plan(groups=(group,), workers=slots, queues={})):
        life = ledger.register_worker(spec.worker, spec.devices, state="starting")
        ledger.worker_placed(spec.worker, "h/node", (0,))  # both actors on card 0 of one node
        sources.append(RaySource(ledger, spec, life, stream=True, placement={"node_id": "node", "gpu_ids": ["0"]}))
    yield ledger, sources
    ledger.close()


def test_a_late_result_of_a_given_up_worker_is_never_written(ledger_and_slots, tmp_path, monkeypatch):
    """The driver gave up on w0 (its claim went back and w1 took the job): w0's video writes nothing.
    The ledger actor writes the video it keeps the atomic way: a checked temp file beside its place."""
    import numpy

    import orchestrator.outputs as outputs
    ledger, (late, current) = ledger_and_slots
    adopted, real_adopt = [], outputs.adopt_mp4

    def watching_adopt(temp, target, *args, **kwargs):
        assert Path(temp).parent == Path(target).parent and Path(temp).name.startswith(TEMP_MARK)
        assert not Path(target).exists()
        adopted.append(Path(target))
        return real_adopt(temp, target, *args, **kwargs)

    monkeypatch.setattr(outputs, "adopt_mp4", watching_adopt)
    first = late.claim()
    ledger.requeue_worker("n0-gpu0_worker0", "no progress")  # given up on
    second = current.claim(prefer_group=first.job.group)
    assert second.job.id == first.job.id

    frames = numpy.zeros((5, 32, 32, 3), dtype="uint8")
    assert late.store_video(late.spec, first.job, frames, {"job_id": first.job.id}) is False
    assert not Path(first.job.output).exists()
    assert late.complete(first.job.id, 1.0) is False
    assert [j for j in ledger.jobs() if j["id"] == first.job.id][0]["state"] == "running"
    assert current.store_video(current.spec, second.job, frames, {"job_id": second.job.id}) is True
    assert current.complete(second.job.id, 1.0) is True
    assert count_frames(first.job.output) == 5
    assert json.loads(Path(first.job.output).with_suffix(".json").read_text())["ray"]["node_id"] == "node"
    assert [a["outcome"] for a in ledger.attempts(first.job.id)] == ["lost", "done"]
    assert [p for p in adopted if tmp_path / "out" in p.parents] == [Path(first.job.output)]


def test_repeated_out_of_memory_retires_a_worker_that_shares_its_card(ledger_and_slots):
    """Each slot's own job loop (the actor's), over the ledger actor: the first worker of the card
    retires after two out-of-memory errors in a row; the last one of a card never does."""
    import logging

    from orchestrator.backend import OutOfMemory
    from orchestrator.job_loop import RETIRED, JobLoop, SlotBackend

    ledger, (first, second) = ledger_and_slots

    class OutOfMemoryEveryTime:  # a FAKE backend; it asks for a stop after `calls` calls
        name, attempt, load_info = "oom", 1, {}

        def __init__(self, calls):
            self.calls = calls

        def generate(self, job, progress):
            self.calls -= 1
            if not self.calls:
                ledger.request_stop()
            raise OutOfMemory("synthetic")

        def prepare(self, job):
            pass

    for source, calls in ((first, 99), (second, 2)):
        loop = JobLoop(source, source.spec, logging.getLogger("test"))
        model = getattr(source.peek(), "model", None)  # the jobs' own: no reload between them
        backends = SlotBackend(lambda model, calls=calls: OutOfMemoryEveryTime(calls), model, loop.log)
        backends.open()
        ended = loop.run(backends, [])
        loop.close()
        assert (ended == RETIRED) == (source is first)
    workers = {w.id: w for w in ledger.workers()}
    assert workers[first.worker].state == "retired" and "now runs 1 worker(s)" in workers[first.worker].message
    assert workers[second.worker].state != "retired" and workers[second.worker].alive  # the card's last one
    assert [a["outcome"] for a in ledger.attempts()] == ["oom"] * 4


def test_a_node_that_cannot_see_the_shared_output_folder_says_so(tmp_path):
    from orchestrator.executors.ray import MOUNT_CHECK, mount_problem
    from orchestrator.planning import WorkerSpec
    spec = WorkerSpec(sweep="t", worker="n1-gpu0_worker0", devices=(0,), queue="n1-gpu0", ledger="x",
                      output_dir=str(tmp_path / "out"), log="x", model={}, generation={}, execution={})
    problem = mount_problem(spec, False, "token")
    assert "does not see this sweep's output folder" in problem and "ray_stream_outputs: true" in problem
    (tmp_path / "out" / ".sweep").mkdir(parents=True)
    (tmp_path / "out" / ".sweep" / MOUNT_CHECK).write_text("token")
    assert mount_problem(spec, False, "token") is None
    assert mount_problem(spec, True, None) is None  # streaming needs no mount


def test_plan_per_node_from_its_gpu_type_and_cached_profile(tmp_path):
    from orchestrator.executors.ray import RayNode, plan_cluster
    from orchestrator.manifest import Execution, GenerationConfig, Manifest, ModelConfig, Resources
    from orchestrator.sizing.profiles import Profile, profile_key

    gib = 1 << 30
    manifest = Manifest(path=tmp_path / "m.yaml", name="t", output_dir=tmp_path / "out",
                        model=ModelConfig(backend="diffusers", task="t2v", path="/models/wan"),
                        generation=GenerationConfig(), seeds=(1,), categories=(),
                        resources=Resources(workers_per_gpu="auto"), execution=Execution(executor="ray"))
    h100 = Profile(key=profile_key(manifest, "NVIDIA H100 80GB HBM3", 1), gpu_name="NVIDIA H100 80GB HBM3",
                   gpu_total_bytes=80 * gib, cards=1, peak_nvml_bytes=20 * gib, jobs_per_hour={1: 10.0, 2: 18.0},
                   free_bytes_at_calibration=79 * gib)
    nodes = [RayNode("a" * 8, "head", "10.0.0.1", 0, None, 8, head=True),
             RayNode("b" * 8, "big", "10.0.0.2", 2, "H100", 32),
             RayNode("c" * 8, "home", "10.0.0.3", 1, "GeForce-RTX-3090", 16)]
    plan, placement = plan_cluster(manifest, [], nodes, profiles=[h100])
    groups = {g.queue: g for g in plan.groups}
    assert sorted(groups) == ["n1-gpu0", "n1-gpu1", "n2-gpu0"]  # the head has no GPU: no worker there
    assert groups["n1-gpu0"].workers == 2 and "profile of NVIDIA H100" in groups["n1-gpu0"].reason
    assert groups["n2-gpu0"].workers == 1 and "without a calibration profile" in groups["n2-gpu0"].reason
    assert placement["n1-gpu1"].num_gpus == 0.5 and placement["n2-gpu0"].num_gpus == 1.0
    assert placement["n1-gpu0"].node == "b" * 8
    assert [w.id for w in plan.workers] == ["n1-gpu0_worker0", "n1-gpu0_worker1", "n1-gpu1_worker0",
                                            "n1-gpu1_worker1", "n2-gpu0_worker0"]
    two_cards = Manifest(**{**manifest.__dict__, "resources": Resources(workers_per_gpu=1, gpus_per_worker=2)})
    plan, placement = plan_cluster(two_cards, [], nodes, profiles=[])
    assert [g.queue for g in plan.groups] == ["n1-gpu0+1"] and placement["n1-gpu0+1"].num_gpus == 2.0
    assert any("n2 home: left idle" in note for note in plan.notes)


@pytest.mark.slow
def test_a_supervision_rule_changed_in_its_one_place_takes_effect_under_ray(ray_cluster, write_manifest, tmp_path,
                                                                             capsys, monkeypatch):
    # Issue 29: the restart back-off lives in supervision.Policy only; changed there, the driver (a thread of
    # this `run`) waits 7 s before a crashed actor's replacement, as the tmux supervisor does:
    # tests/test_tmux.py::test_a_supervision_rule_changed_in_its_one_place_takes_effect_under_tmux
    from orchestrator.supervision import Policy
    monkeypatch.setattr(Policy, "restart_delay", lambda self, crashes_in_row: 7.0)
    cluster, _ = ray_cluster
    path = write_manifest(ray_manifest(model={"options": {"crash_jobs": ["alpha/seed_1_prompt_0"]}}))
    rc = cli_module.main(["run", str(path), "--ray-address", cluster.address, "--no-progress"])
    assert rc == 0, capsys.readouterr().out
    out = tmp_path / "out"
    logs = "".join(p.read_text(encoding="utf-8") for p in (out / "logs").glob("*.log"))
    assert "job(s) back to the queue; a new actor in 7s (restart 1)" in logs, logs[-3000:]
    _assert_every_output_once(out, 6)
