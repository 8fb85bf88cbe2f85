"""The shipped example manifests plan as their comments say (FAKE cards; tiny random checkpoints of
the same family stand in for the real weights, which cannot be downloaded here)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from .conftest import ROOT, cli, skip_module_without

skip_module_without("diffusers")

TWO_24GB_CARDS = "RTX 3090:24:0.5;RTX 3090:24:0.5"


def _copy(tmp_path: Path, name: str, model_path: Path, checkpoint_line: str) -> Path:
    """The example, with its checkpoint path pointed at a stand-in, beside a copy of its refs/."""
    shutil.copytree(ROOT / "experiments" / "refs", tmp_path / "refs")
    text = (ROOT / "experiments" / name).read_text(encoding="utf-8")
    assert checkpoint_line in text
    target = tmp_path / name
    target.write_text(text.replace(checkpoint_line, f"path: {model_path}"), encoding="utf-8")
    return target


@pytest.fixture(scope="module")
def random_checkpoint(random_wan):
    return random_wan  # built once per session (conftest)


def test_a14b_over_two_24gb_cards_is_one_worker_holding_both(tmp_path, random_checkpoint):
    manifest = _copy(tmp_path, "t2v_a14b_2gpu.yaml", random_checkpoint("a14b"),
                     "path: ../models/Wan2.2-T2V-A14B-Diffusers")
    result = cli("plan", str(manifest), env={"ORCHESTRATOR_FAKE_GPUS": TWO_24GB_CARDS})
    assert result.returncode == 0, result.stderr
    assert "gpu0+1     1 worker(s)" in result.stdout
    assert "workers    1: gpu0+1_worker0" in result.stdout
    assert "jobs       4 " in result.stdout
    assert "note       diffusers: each worker loads the checkpoint once (" in result.stdout


def test_ti2v_5b_plans_one_worker_per_card_from_first_frames(tmp_path, random_checkpoint):
    manifest = _copy(tmp_path, "ti2v_5b.yaml", random_checkpoint("ti2v"), "path: ../models/Wan2.2-TI2V-5B-Diffusers")
    result = cli("plan", str(manifest), env={"ORCHESTRATOR_FAKE_GPUS": TWO_24GB_CARDS})
    assert result.returncode == 0, result.stderr
    assert "workers    2: gpu0_worker0, gpu1_worker0" in result.stdout
    assert "settings   1280x704, 121 frames @ 24 fps, 50 steps" in result.stdout
    images = len(list((ROOT / "experiments" / "refs" / "first_frames").glob("*.png")))
    assert f"jobs       {images * 2 * 2} " in result.stdout  # images × 2 prompts × 2 seeds


def test_the_examples_fail_clearly_before_their_checkpoints_are_downloaded():
    result = cli("plan", str(ROOT / "experiments" / "t2v_a14b_2gpu.yaml"))
    assert result.returncode == 2
    assert "t2v_a14b_2gpu.yaml:9: model.path" in result.stderr and "models download" in result.stderr


@pytest.mark.parametrize("command, example, fix", [
    ("plan", "t2v_a14b_2gpu.yaml", "models download Wan-AI/Wan2.2-T2V-A14B-Diffusers --to models/Wan2.2-T2V-A14B-Diffusers"),
    ("plan", "ti2v_5b.yaml", "models download Wan-AI/Wan2.2-TI2V-5B-Diffusers --to models/Wan2.2-TI2V-5B-Diffusers"),
    ("models fit", "ti2v_5b.yaml", "models download Wan-AI/Wan2.2-TI2V-5B-Diffusers --to models/Wan2.2-TI2V-5B-Diffusers"),
    # the diffsynth and the command backends read the original layout: the repository without -Diffusers
    ("plan", "motion_transfer.yaml", "models download Wan-AI/Wan2.1-T2V-14B --to models/Wan2.1-T2V-14B"),
    ("plan", "i2v_a14b_fsdp.yaml", "models download Wan-AI/Wan2.2-I2V-A14B --to "),
])
def test_the_missing_checkpoint_fix_names_the_manifests_own_model_and_path(command, example, fix):
    result = cli(*command.split(), str(ROOT / "experiments" / example))
    assert result.returncode == 2
    assert fix in result.stderr
    assert "1.3B" not in result.stderr and "huggingface-cli" not in result.stderr


def test_the_users_motion_transfer_experiment_plans_680_videos_over_four_cards(tmp_path, tiny_video):
    pytest.importorskip("diffsynth")
    import yaml

    from orchestrator.demo.random_checkpoints import build_tiny_checkpoint
    model = build_tiny_checkpoint(tmp_path / "Wan2.1-T2V-14B-stand-in")
    counts = {"camera_motion": 14, "single_object": 33, "multiple_objects": 13, "complex_human_motion": 8}
    for category, clips in counts.items():
        folder = tmp_path / "refs" / category
        folder.mkdir(parents=True)
        stems = [f"ref_镜头仰角旋转_{i}" if category == "camera_motion" else f"clip_{i:02d}" for i in range(clips)]
        for stem in stems:
            shutil.copy(tiny_video, folder / f"{stem}.mp4")
        prompts = {stem: [f"prompt {k} for {stem}: \"quoted\" $(not a shell)" for k in range(5)] for stem in stems}
        (folder / "prompts.yaml").write_text(yaml.safe_dump(prompts, allow_unicode=True), encoding="utf-8")
    text = (ROOT / "experiments" / "motion_transfer.yaml").read_text(encoding="utf-8")
    manifest = tmp_path / "motion_transfer.yaml"
    manifest.write_text(text.replace("path: ../models/Wan2.1-T2V-14B", f"path: {model}"), encoding="utf-8")
    result = cli("plan", str(manifest), env={"ORCHESTRATOR_FAKE_GPUS": ";".join(["A800 80GB PCIe:80:1"] * 4)})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "jobs       680 (0 already done, 680 to run)" in out
    for category, clips in counts.items():
        assert f"  {category:<28} {clips * 10:>6}" in out
    assert "workers    4: gpu0_worker0, gpu1_worker0, gpu2_worker0, gpu3_worker0" in out
    assert "settings   832x480, 81 frames @ 15 fps, 50 steps" in out


# ---- the conditioned tasks' examples (issue 23): their inputs are valid and fill every job ----

CONDITIONED_EXAMPLES = {"s2v_14b.yaml": ("s2v", 8, {"audio"}), "vace_14b.yaml": ("vace", 8, {"reference_image"}),
                        "control_14b.yaml": ("control", 8, set()),
                        "animate_14b.yaml": ("animate", 2, {"pose_video", "face_video"})}


def _example_copy(tmp_path: Path, name: str, model: dict | None = None) -> Path:
    import yaml
    folder = tmp_path / "experiments"
    shutil.copytree(ROOT / "experiments" / "refs", folder / "refs")
    manifest = yaml.safe_load((ROOT / "experiments" / name).read_text(encoding="utf-8"))
    if model is not None:
        manifest["model"] = model
    (folder / name).write_text(yaml.safe_dump(manifest, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return folder / name


@pytest.mark.parametrize("name", list(CONDITIONED_EXAMPLES))
def test_each_conditioned_example_has_valid_inputs_for_every_job(tmp_path, name):
    from orchestrator.jobs import expand
    from orchestrator.validation import load_manifest
    task, count, roles = CONDITIONED_EXAMPLES[name]
    jobs = expand(load_manifest(_example_copy(tmp_path, name, {"backend": "synthetic", "task": task})))
    assert len(jobs) == count
    assert set().union(*(job.inputs for job in jobs)) == roles
    assert all(Path(value).is_file() for job in jobs for value in job.inputs.values())


@pytest.mark.parametrize("name, flag", [("s2v_14b.yaml", "--audio"), ("animate_14b.yaml", "--src_root_path")])
def test_the_generate_py_examples_plan_with_its_stub(tmp_path, name, flag):
    from orchestrator.backends.wan_generate import WAN_TASKS
    task, count, _ = CONDITIONED_EXAMPLES[name]
    wan_task = {"s2v": "s2v-14B", "animate": "animate-14B"}[task]
    checkpoint = tmp_path / f"Wan2.2-{wan_task}"
    checkpoint.mkdir()
    for file in WAN_TASKS[wan_task].files:
        (checkpoint / file).write_bytes(b"")
    import yaml
    model = yaml.safe_load((ROOT / "experiments" / name).read_text(encoding="utf-8"))["model"]
    model["path"] = str(checkpoint)
    model["options"]["script"] = str(ROOT / "tests" / "stubs" / "generate_stub.py")
    result = cli("plan", str(_example_copy(tmp_path, name, model)),
                 env={"ORCHESTRATOR_FAKE_GPUS": "FAKE H100 80GB:80:0"})
    assert result.returncode == 0, result.stderr
    assert f"jobs       {count} " in result.stdout and flag in result.stdout


def test_the_axes_example_plans_every_combination_and_sizes_for_the_heaviest(tmp_path, random_checkpoint):
    manifest = _copy(tmp_path, "axes_sweep.yaml", random_checkpoint("t2v"), "path: ../models/random-tiny-wan-t2v")
    result = cli("plan", str(manifest))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "jobs       16 (0 already done, 16 to run)" in out  # 2 prompts × 1 seed × 2 cfg × 2 steps × 2 shapes
    assert "axis       cfg_scale: 3.0, 5.0" in out and "axis       steps: 4, 8" in out
    assert "axis       width+height: width=64 height=48, width=48 height=64" in out
    assert "sized for  the heaviest job: 64x48, 17 frames, 8 steps" in out


@pytest.mark.slow
@pytest.mark.parametrize("example, variant, stand_ins, changes", [
    ("distill_4step.yaml", "t2v", {"distill": "high"}, None),
    ("lightning_a14b.yaml", "a14b", {"high": "high", "low": "low"},
     "each worker about 1 LoRA switch(es) in place and 0 reload(s)"),
])
def test_the_lora_examples_plan_with_random_loras_of_their_layout(tmp_path, random_checkpoint, example, variant,
                                                                  stand_ins, changes):
    """The LoRA examples, their checkpoint and LoRA files replaced by tiny random ones of the same layout (the
    lightx2v/ComfyUI one): they load, each LoRA is checked against its expert, and plan counts the switches."""
    import re

    from orchestrator.demo.random_loras import build_random_lora
    checkpoint = random_checkpoint(variant)
    text = (ROOT / "experiments" / example).read_text(encoding="utf-8")
    text = re.sub(r"path: \.\./models/\S+", f"path: {checkpoint}", text)
    for name, expert in stand_ins.items():
        lora = build_random_lora(checkpoint, tmp_path / f"{name}.safetensors", expert=expert)
        text = re.sub(rf"(    {name}: {{path: )\S+?(,|}})", rf"\g<1>{lora}\g<2>", text)
    manifest = tmp_path / example
    manifest.write_text(text, encoding="utf-8")
    result = cli("plan", str(manifest), env={"ORCHESTRATOR_FAKE_GPUS": "RTX 3090:24:0.5"})
    assert result.returncode == 0, result.stderr
    assert "LoRA       " in result.stdout and "steps" in result.stdout
    if changes:
        assert changes in result.stdout
