"""The command backend, with a STUB standing in for Wan2.2's generate.py (tests/stubs/generate_stub.py).

The stub parses generate.py's own arguments (a wrong flag fails as it would there), records what it
got, draws a tqdm bar and writes an mp4. torchrun runs for real, on the CPU (the stub starts no
process group). FAKE GPUs (ORCHESTRATOR_FAKE_GPUS) stand in for cards where planning needs them.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.backend import OutOfMemory
from orchestrator.backends.command import CommandBackend
from orchestrator.jobs import Job
from orchestrator.manifest import GenerationConfig, ManifestError, ModelConfig
from orchestrator.validation import load_manifest
from orchestrator.outputs import TEMP_MARK, count_frames, read_sidecar

from .conftest import PATIENCE_S, ROOT, cli

STUB = ROOT / "tests" / "stubs" / "generate_stub.py"
SHIPPED = ROOT / "experiments" / "i2v_a14b_fsdp.yaml"
A14B_FILES = ("models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth", "high_noise_model/", "low_noise_model/")
TWO_FAKE_H100 = {"ORCHESTRATOR_FAKE_GPUS": "FAKE H100 80GB:80:0;FAKE H100 80GB:80:0"}


def fake_checkpoint(folder: Path, files=A14B_FILES) -> Path:
    """A FAKE checkpoint folder: the names generate.py's configs look for, no weights."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
        if name.endswith("/"):
            (folder / name).mkdir(exist_ok=True)
        else:
            (folder / name).write_bytes(b"")
    return folder


def backend(tmp_path, devices=(0,), task="t2v", steps=4, cfg_scale=3.5, shift=None, **options) -> CommandBackend:
    if "command" not in options:  # a template names its program itself
        options = {"script": str(STUB), **options}
    model = ModelConfig(backend="command", task=task, path=str(fake_checkpoint(tmp_path / "ckpt")),
                        options=options)
    generation = GenerationConfig(width=64, height=48, num_frames=5, fps=16, steps=steps, cfg_scale=cfg_scale,
                                  shift=shift)
    instance = CommandBackend(model, generation, devices)
    instance.load()
    return instance


def job(tmp_path, prompt="a cat on a mat", seed=7, reference=None) -> Job:
    return Job(id="j1", ordinal=0, category="cat", stem=None, reference=reference, prompt_index=0,
               prompt=prompt, seed=seed, output=str(tmp_path / "out" / "cat" / f"seed_{seed}_prompt_0.mp4"))


@pytest.fixture
def record(tmp_path, monkeypatch):
    """Where the stub writes what it was given; record(rank) reads it."""
    base = tmp_path / "stub_record"
    monkeypatch.setenv("GENERATE_STUB_RECORD", str(base))

    def read(rank: int = 0) -> dict:
        return json.loads(Path(f"{base}.rank{rank}").read_text(encoding="utf-8"))
    return read


def partials(tmp_path) -> list[str]:
    return [p.name for p in (tmp_path / "out").rglob(f"{TEMP_MARK}*")]


def test_one_card_exact_arguments_then_a_real_run(tmp_path, record):
    b = backend(tmp_path, shift=3.0, sample_solver="dpm++", offload_model=True, convert_model_dtype=True)
    j = job(tmp_path)
    ckpt = str(tmp_path / "ckpt")
    assert b.command_line(j, "/x/out.mp4") == [
        sys.executable, str(STUB), "--task", "t2v-A14B", "--size", "64*48", "--ckpt_dir", ckpt,
        "--frame_num", "5", "--sample_steps", "4", "--sample_shift", "3.0", "--sample_solver", "dpm++",
        "--sample_guide_scale", "3.5", "--base_seed", "7", "--prompt=a cat on a mat",
        "--offload_model", "True", "--convert_model_dtype", "--save_file", "/x/out.mp4"]

    calls = []
    video = b.generate(j, lambda step, steps: calls.append((step, steps)))
    assert video.parent == Path(j.output).parent and video.name.startswith(TEMP_MARK)
    assert count_frames(video) == 5
    got = record()
    assert got["argv"] == b.job_info()["command"][2:]  # what the program received is what we built
    assert got["argv"][-1] == str(video) and got["env"]["PYTHONUNBUFFERED"] == "1"
    assert got["cwd"] == str(STUB.parent)  # generate.py runs in its own folder, as Wan's README does
    assert [c for c in calls if c[0] > 0] == [(1, 4), (2, 4), (3, 4), (4, 4)]  # each step once, in order
    assert all(total == 4 for _, total in calls) and calls[0][0] == 0  # signs of life before step 1
    info = b.job_info()
    assert info["exit_code"] == 0 and info["steps_seen"] == 4 and info["wall_seconds"] > 0
    assert "seconds_per_step" in info and info["startup_seconds"] >= 0
    assert "Finished." in info["output_tail"] and "4/4 [" in info["output_tail"]
    assert b.load_info["model_loaded_per_job"] and b.load_info["script"]["sha256"]
    assert b.load_info["interpreter"]["python"] == ".".join(map(str, sys.version_info[:3]))


@pytest.mark.slow
def test_two_cards_run_torchrun_with_fsdp_and_ulysses(tmp_path, record):
    b = backend(tmp_path, devices=(0, 1))
    j = job(tmp_path, seed=11)
    line = b.command_line(j, "/x/out.mp4")
    assert line == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(STUB),
        "--task", "t2v-A14B", "--size", "64*48", "--ckpt_dir", str(tmp_path / "ckpt"), "--frame_num", "5",
        "--sample_steps", "4", "--sample_guide_scale", "3.5", "--base_seed", "11", "--prompt=a cat on a mat",
        "--dit_fsdp", "--t5_fsdp", "--ulysses_size", "2", "--save_file", "/x/out.mp4"]
    # The stub makes generate.py's own checks: FSDP flags need torchrun, ulysses_size == world size.
    video = b.generate(j, lambda step, steps: None)
    assert count_frames(video) == 5
    ranks = [record(0), record(1)]
    assert [r["env"]["WORLD_SIZE"] for r in ranks] == ["2", "2"] and [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["argv"] == line[6:-1] + [str(video)]
    # t5 on the CPU is not sharded; `torchrun: always` on one card launches without FSDP flags
    assert "--t5_fsdp" not in backend(tmp_path, devices=(0, 1), t5_cpu=True).command_line(j, "o")
    single = backend(tmp_path, devices=(0,), torchrun="always").command_line(j, "o")
    assert single[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    assert "--dit_fsdp" not in single and "--ulysses_size" not in single
    # guidance: a pair of equal scales is one scale; t2v-A14B's own pair [high 4, low 3] is generate.py's
    # default, which it uses when the flag is left out (check() rejects any other pair)
    assert "3.5" in backend(tmp_path, cfg_scale=(3.5, 3.5)).command_line(j, "o")
    assert "--sample_guide_scale" not in backend(tmp_path, cfg_scale=(4.0, 3.0)).command_line(j, "o")


def test_prompt_and_paths_reach_the_program_literally_never_a_shell(tmp_path, record):
    prompt = '--task "x" $(touch PWNED) `touch PWNED2`; rm -rf ~ \n second line with \'quotes\' & | > <'
    image = tmp_path / "first frame $(x).png"
    image.write_bytes(b"\x89PNG")
    b = backend(tmp_path, task="i2v", wan_task="i2v-A14B")
    video = b.generate(job(tmp_path, prompt=prompt, reference=str(image)), lambda s, n: None)
    argv = record()["argv"]
    assert f"--prompt={prompt}" in argv  # one argument, byte for byte
    assert argv[argv.index("--image") + 1] == str(image)
    assert not list(STUB.parent.glob("PWNED*")) and not list(tmp_path.rglob("PWNED*"))
    assert count_frames(video) == 5


def test_a_template_fills_whole_arguments_and_parts_of_one(tmp_path, record):
    template = ["{python}", str(STUB), "--task", "t2v-A14B", "--size={width}*{height}", "--ckpt_dir", "{ckpt_dir}",
                "--frame_num", "{num_frames}", "--sample_steps", "{steps}", "--base_seed", "{seed}",
                "--prompt", "{prompt}", "--save_file", "{output}"]
    b = backend(tmp_path, command=template)
    video = b.generate(job(tmp_path, prompt="{seed} stays literal"), lambda s, n: None)
    assert record()["argv"] == ["--task", "t2v-A14B", "--size=64*48", "--ckpt_dir", str(tmp_path / "ckpt"),
                                "--frame_num", "5", "--sample_steps", "4", "--base_seed", "7",
                                "--prompt", "{seed} stays literal", "--save_file", str(video)]


def test_failure_exit_code_and_output_tail(tmp_path, record, monkeypatch):
    monkeypatch.setenv("GENERATE_STUB_FAIL", "1")
    b = backend(tmp_path)
    with pytest.raises(RuntimeError) as error:
        b.generate(job(tmp_path), lambda s, n: None)
    text = str(error.value)
    assert "exited with code 1" in text and "Traceback" in text
    # the worker records the last line in the ledger: it says what went wrong
    assert text.strip().splitlines()[-1] == "generate.py exited with code 1: RuntimeError: STUB failure as asked"
    assert b.job_info()["exit_code"] == 1 and "STUB failure" in b.job_info()["output_tail"]
    assert partials(tmp_path) == []

    monkeypatch.setenv("GENERATE_STUB_FAIL", "0")
    monkeypatch.setenv("GENERATE_STUB_NO_FILE", "1")
    with pytest.raises(RuntimeError, match="exited with code 0 but wrote no video"):
        b.generate(job(tmp_path), lambda s, n: None)
    assert partials(tmp_path) == []


def test_cuda_out_of_memory_text_becomes_out_of_memory(tmp_path, record, monkeypatch):
    monkeypatch.setenv("GENERATE_STUB_OOM", "1")
    with pytest.raises(OutOfMemory, match="CUDA out of memory"):
        backend(tmp_path).generate(job(tmp_path), lambda s, n: None)
    assert partials(tmp_path) == []


class Stopped(BaseException):
    """What the worker's SIGTERM handler raises in the main thread (`worker.Stop`)."""


def _gone(pid: int, within: float = PATIENCE_S) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("devices", [(0,), (0, 1)], ids=["python", "torchrun"])
@pytest.mark.slow
def test_a_stopped_worker_takes_its_program_down(tmp_path, record, monkeypatch, devices):
    monkeypatch.setenv("GENERATE_STUB_STEP_S", "0.5")

    stopped = []

    def progress(step, steps):
        if step >= 2:
            stopped.append(time.monotonic())
            raise Stopped("SIGTERM")
    b = backend(tmp_path, devices=devices, steps=1000)
    with pytest.raises(Stopped):
        b.generate(job(tmp_path), progress)
    # Counted from the stop, not the start (which a busy machine makes as slow as it likes): not the
    # 500 s the program would have gone on for.
    assert time.monotonic() - stopped[0] < 250
    for rank in range(len(devices)):  # torchrun passes the SIGTERM on to its ranks
        assert _gone(record(rank)["pid"]), f"rank {rank} still runs"
    assert partials(tmp_path) == []


@pytest.mark.slow
def test_a_killed_worker_takes_its_program_down(tmp_path, record, monkeypatch):
    """SIGKILL leaves the worker no `finally`: the kernel's parent-death signal ends the program."""
    monkeypatch.setenv("GENERATE_STUB_STEP_S", "0.5")
    fake_checkpoint(tmp_path / "ckpt")
    script = f"""
import sys; sys.path.insert(0, {str(ROOT)!r})
from orchestrator.backends.command import CommandBackend
from orchestrator.jobs import Job
from orchestrator.manifest import GenerationConfig, ModelConfig
b = CommandBackend(ModelConfig(backend="command", task="t2v", path={str(tmp_path / 'ckpt')!r},
                               options={{"script": {str(STUB)!r}}}),
                   GenerationConfig(width=64, height=48, num_frames=5, fps=16, steps=40), (0,))
b.load()
b.generate(Job("j", 0, "c", None, None, 0, "p", 1, {str(tmp_path / 'out' / 'c' / 'x.mp4')!r}), lambda s, n: None)
"""
    worker = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + PATIENCE_S
        while not Path(f"{tmp_path / 'stub_record'}.rank0").exists():
            assert time.monotonic() < deadline and worker.poll() is None, "the program never started"
            time.sleep(0.05)
        pid = record()["pid"]
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        assert _gone(pid), "the program outlived its worker"
    finally:
        if worker.poll() is None:
            worker.kill()


# --------------------------------------------------------------------------------------------------
# check() and plan


PROBLEMS = """\
name: bad
model:
  backend: command
  task: i2v
  path: no_such_checkpoint
  options:
    script: nowhere/generate.py
    sample_solver: euler
    turbo: true
generation:
  width: 1024
  height: 576
  num_frames: 5
  fps: 15
  steps: 4
  negative_prompt: blurry
  cfg_scale: [5.0, 2.0]
  extra: {boundary: 0.9}
seeds: [1]
categories:
  frames:
    images: refs/*.png
    prompts: ["a"]
resources:
  gpus_per_worker: 3
"""


def _lines(error: ManifestError) -> dict[int, str]:
    found: dict[int, str] = {}
    for problem in error.problems:
        found[problem.line] = found.get(problem.line, "") + problem.message
    return found


def test_check_reports_each_problem_at_its_manifest_line(tmp_path, write_manifest):
    (tmp_path / "refs").mkdir()
    shutil.copy(ROOT / "experiments" / "refs" / "first_frames" / "example_street.png", tmp_path / "refs")
    with pytest.raises(ManifestError) as error:
        load_manifest(write_manifest(PROBLEMS))
    lines = _lines(error.value)
    assert "checkpoint folder `no_such_checkpoint` does not exist" in lines[5]
    assert f"script `{tmp_path / 'nowhere' / 'generate.py'}` does not exist" in lines[7]
    assert "sample_solver is 'euler'" in lines[8]
    assert "unknown command option `turbo`" in lines[9]
    assert "1024x576 is not a size generate.py supports for i2v-A14B" in lines[11]
    assert "at 16 fps, not 15" in lines[14]
    assert "takes no negative prompt" in lines[16]
    assert "one guidance scale on its command line, not the pair [5, 2]" in lines[17]
    assert "generate.py has no setting `boundary`" in lines[18]
    assert "40 attention heads, which Ulysses cannot split over 3 cards" in lines[25]
    assert len(error.value.problems) == 10, error.value


def test_check_template_and_task_problems(tmp_path, write_manifest):
    fake_checkpoint(tmp_path / "Wan2.2-TI2V-5B", ("models_t5_umt5-xxl-enc-bf16.pth",))
    base = {"name": "t", "model": {"backend": "command", "task": "t2v", "path": "Wan2.2-TI2V-5B",
                                   "options": {"script": str(STUB)}},
            "generation": {"width": 1280, "height": 704, "num_frames": 5, "fps": 24, "steps": 4},
            "seeds": [1], "categories": {"c": {"prompts": ["a"]}}, "resources": {"gpus_per_worker": 2}}
    with pytest.raises(ManifestError) as error:  # the task comes from the folder's name
        load_manifest(write_manifest(base))
    assert "is not a ti2v-5B checkpoint: it lacks Wan2.2_VAE.pth" in str(error.value)
    (tmp_path / "Wan2.2-TI2V-5B" / "Wan2.2_VAE.pth").write_bytes(b"")
    load_manifest(write_manifest(base))  # 5B: 24 heads over 2 cards, 1280*704 at 24 fps: fine

    base["model"]["options"] = {"command": ["{python}", "gen.py", "--seed", "{seeed}"], "wan_task": "t2v-A14B"}
    with pytest.raises(ManifestError) as error:
        load_manifest(write_manifest(base))
    text = str(error.value)
    assert "unknown placeholder {seeed}" in text and "`wan_task` belongs to the generate.py preset" in text
    base["model"]["options"] = {"command": ["{python}", "gen.py", "{prompt}", "{reference}"]}
    with pytest.raises(ManifestError) as error:
        load_manifest(write_manifest(base))
    text = str(error.value)
    assert "never names {output}" in text and "task t2v has no reference files" in text


def test_plan_note_estimates_the_reload_from_the_weights(tmp_path, write_manifest):
    ckpt = fake_checkpoint(tmp_path / "Wan2.2-T2V-A14B")
    with open(ckpt / "high_noise_model" / "diffusion_pytorch_model.safetensors", "wb") as weights:
        weights.truncate(150 * 10**9)  # sparse: 150 GB by its size, nothing on disk
    manifest = load_manifest(write_manifest({
        "name": "t", "model": {"backend": "command", "task": "t2v", "path": "Wan2.2-T2V-A14B",
                               "options": {"script": str(STUB)}},
        "generation": {"width": 832, "height": 480, "num_frames": 5, "fps": 16, "steps": 3},
        "seeds": [1, 2, 3], "categories": {"c": {"prompts": ["a", "b"]}}}))
    note = CommandBackend.plan_notes(manifest)[0]
    assert "~3 min each for a 14B model (estimated from its 150 GB of weights at ~1 GB/s)" in note
    assert "~0.3 h of worker time over the 6 jobs" in note


def _shipped_layout(tmp_path) -> Path:
    """The shipped manifest, byte for byte, in the layout its comments describe: the repository
    beside a Wan2.2 clone (here a STUB generate.py) holding a FAKE I2V-A14B checkpoint."""
    repo = tmp_path / "wan-sweep"
    shutil.copytree(ROOT / "experiments" / "refs", repo / "experiments" / "refs")
    shutil.copy(SHIPPED, repo / "experiments" / SHIPPED.name)
    (tmp_path / "Wan2.2").mkdir()
    shutil.copy(STUB, tmp_path / "Wan2.2" / "generate.py")
    fake_checkpoint(tmp_path / "Wan2.2" / "Wan2.2-I2V-A14B")
    return repo / "experiments" / SHIPPED.name


def test_shipped_i2v_manifest_plans_one_worker_over_two_cards_with_the_reload_note(tmp_path):
    result = cli("plan", str(_shipped_layout(tmp_path)), env=TWO_FAKE_H100)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "jobs       8 " in out  # 2 example first frames × 2 prompts × 2 seeds
    assert "gpu0+1     1 worker(s)" in out and "workers    1: gpu0+1_worker0" in out
    assert ("note       the command backend starts generate.py per job: the model is loaded for every "
            "video, ~3 min each for a 14B model (estimated: no weights at model.path to size it by), "
            "~0.4 h of worker time over the 8 jobs") in out
    assert "a diffusers or diffsynth backend loads it once per worker" in out
    assert ("--standalone --nproc_per_node=2 " + str(tmp_path / "Wan2.2" / "generate.py") + " --task i2v-A14B "
            "--size '1280*720'") in out
    assert "--dit_fsdp --t5_fsdp --ulysses_size 2" in out


def test_shipped_manifest_in_place_lacks_only_what_the_user_supplies():
    manifest = yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))
    if (SHIPPED.parent / manifest["model"]["options"]["script"]).exists():
        pytest.skip("a Wan2.2 clone sits beside this repository: the shipped manifest is live here")
    with pytest.raises(ManifestError) as error:
        load_manifest(SHIPPED)
    messages = sorted(p.message for p in error.value.problems)
    assert len(messages) == 2, messages
    assert messages[0].startswith("checkpoint folder `../../Wan2.2/Wan2.2-I2V-A14B` does not exist")
    assert messages[1].startswith("script `") and messages[1].endswith("generate.py` does not exist")


@pytest.mark.slow
def test_cli_sweep_with_the_stub_writes_checked_videos_and_sidecars(tmp_path, write_manifest):
    fake_checkpoint(tmp_path / "Wan2.2-T2V-A14B")
    path = write_manifest({
        "name": "cmd", "output_dir": "out",
        "model": {"backend": "command", "task": "t2v", "path": "Wan2.2-T2V-A14B", "options": {"script": str(STUB)}},
        "generation": {"width": 832, "height": 480, "num_frames": 5, "fps": 16, "steps": 3},
        "seeds": [1, 2], "categories": {"c": {"prompts": ["a lighthouse at dawn"]}},
        "resources": {"gpus_per_worker": 2},
        "execution": {"retries": 0, "job_timeout_s": 60, "heartbeat_timeout_s": 20, "max_restarts": 1}})
    env = {**TWO_FAKE_H100, "GENERATE_STUB_RECORD": str(tmp_path / "rec")}
    result = cli("run", str(path), "--executor", "local", "--no-progress", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    for seed in (1, 2):
        video = tmp_path / "out" / "c" / f"seed_{seed}_prompt_0.mp4"
        assert count_frames(video) == 5
        sidecar = read_sidecar(video)
        assert sidecar["backend"] == "command" and sidecar["exit_code"] == 0
        assert sidecar["command"][sidecar["command"].index("--base_seed") + 1] == str(seed)
        assert "--nproc_per_node=2" in sidecar["command"] and sidecar["worker"] == "gpu0+1_worker0"
        assert sidecar["load"]["model_files"]["path"] == str(tmp_path / "Wan2.2-T2V-A14B")
    for rank in (0, 1):  # one worker over both cards; torchrun's ranks see them as its own
        got = json.loads((tmp_path / f"rec.rank{rank}").read_text())["env"]
        assert got["CUDA_VISIBLE_DEVICES"] == "0,1" and got["WORLD_SIZE"] == "2"
    assert not list((tmp_path / "out").rglob(f"{TEMP_MARK}*"))
    # the next plan reports the load time these jobs measured, not an estimate
    assert "(measured: median of 2 earlier jobs' start)" in CommandBackend.plan_notes(load_manifest(path))[0]
