"""The attention kernel guard (orchestrator/attention_guard.py) on the CPU: the kernels that exist here pass,
a deliberately wrong kernel (a test double) stops the worker with the message, `auto` skips a kernel that
failed, SageAttention is refused at its manifest line, and the record reaches the sidecars. Every test name
contains `guard` (`pytest -k guard`)."""
from __future__ import annotations

import json
import logging

import pytest

from orchestrator import attention_guard as guard
from orchestrator import speed as speed_settings
from orchestrator.manifest import GenerationConfig, ManifestError, ModelConfig
from orchestrator.validation import load_manifest

from .conftest import LazyModule, cli, skip_module_without, synthetic_manifest

skip_module_without("torch")
torch = LazyModule("torch")
SMALL = dict(width=32, height=32, num_frames=5, fps=5, steps=2)


def _perturbed(scale: float = 0.5, tail: int | None = None):
    """A test double of a broken kernel: SDPA's answer plus noise (on the last `tail` query tokens only)."""
    def run(q, k, v):
        out = guard.sdpa_run("auto")(q, k, v)
        noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype) * out.std() * scale
        if tail:
            noise[:, :, :-tail] = 0
        return out + noise
    return run


def _plan(kernels, auto=False, dtype="bfloat16"):
    return guard.Plan(kernels, auto=auto, heads=2, head_dim=128, dtype=getattr(torch, dtype), device="cpu")


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("name", ["auto", "math", "flash"])
def test_guard_passes_the_sdpa_kernels_of_the_cpu(name, dtype):
    kernel = guard.Kernel(f"sdpa {name}", guard.torch_version(name), guard.sdpa_run(name))
    record = guard.measure(kernel, guard.shape_for(40, 128, "cpu"), getattr(torch, dtype), "cpu")
    assert record["passed"] and record["error"] < (3e-3 if dtype == "bfloat16" else 1e-5)
    assert record["shape"] == [1, 4, 520, 128] and record["seconds"] > 0  # (CPU: at most 4 heads, 520 tokens)


@pytest.mark.parametrize("backend", [None, "native", "_native_math"])
def test_guard_passes_diffusers_native_backends(backend):
    skip_module_without("diffusers")
    kernel = guard.diffusers_kernel(backend)
    record = guard.measure(kernel, (1, 2, 520, 64), torch.bfloat16, "cpu")
    assert record["passed"] and record["error"] < 3e-3
    assert kernel.name.startswith("diffusers ") and "diffusers" in kernel.version


def test_guard_error_is_the_worst_block_so_a_broken_tail_is_caught():
    q, k, v = guard.wan_like_inputs((1, 2, 3120, 64), torch.bfloat16, "cpu")
    reference = guard.math_reference(q, k, v)
    broken = _perturbed(4.0, tail=24)(q, k, v)
    worst, overall = guard.block_error(broken, reference)
    assert overall < 0.5 and worst > 1  # 24 rows of 3120: small overall, the last block plainly wrong
    healthy, _ = guard.block_error(guard.sdpa_run("auto")(q, k, v), reference)
    assert healthy < 3e-3


def test_guard_stops_a_wrong_kernel_with_kernel_version_error_and_fix():
    wrong = guard.Kernel("test broken", "brokenlib 2.2.0", _perturbed(), eight_bit=True, fix=guard.SAGE_FIX)
    with pytest.raises(guard.AttentionKernelFailed) as failed:
        guard.protect(_plan([wrong]))
    message = str(failed.value)
    assert "test broken" in message and "brokenlib 2.2.0" in message
    assert "relative L2 error" in message and "bound 0.1" in message
    assert "bench/build_sageattention.sh" in message and "cudnn" in message


def test_guard_stops_a_kernel_that_raises():
    def fails(q, k, v):
        raise RuntimeError("no kernel image is available for execution on the device")
    with pytest.raises(guard.AttentionKernelFailed, match="no kernel image"):
        guard.protect(_plan([guard.Kernel("test raising", "x 1", fails)]))


def test_guard_auto_skips_a_failed_kernel_and_uses_the_next(caplog):
    used = []
    bad = guard.Kernel("test broken", "brokenlib 1", _perturbed(), use=lambda: used.append("bad"))
    good = guard.Kernel("sdpa math", guard.torch_version(), guard.sdpa_run("math"), use=lambda: used.append("math"))
    with caplog.at_level(logging.INFO):
        record = guard.protect(_plan([bad, good], auto=True))
    assert record["kernel"] == "sdpa math" and used == ["math"]
    assert record["skipped"][0]["kernel"] == "test broken" and record["skipped"][0]["error"] > 0.1
    assert any("auto skips test broken" in r.getMessage() for r in caplog.records)


def test_guard_auto_with_no_passing_kernel_stops():
    kernels = [guard.Kernel(f"test broken {i}", "x", _perturbed()) for i in range(2)]
    with pytest.raises(guard.AttentionKernelFailed, match="auto found no attention kernel"):
        guard.protect(_plan(kernels, auto=True))


def test_guard_sdpa_chain_starts_with_sdpas_own_pick_and_falls_back_to_each_kernel():
    switched = []
    kernels = guard.sdpa_chain((1, 2, 520, 128), torch.bfloat16, "cpu", switched.append)
    chosen = guard.sdpa_choice((1, 2, 520, 128), torch.bfloat16, "cpu")
    assert kernels[0].name == f"sdpa auto (SDPA picks {chosen})"
    assert [k.name for k in kernels[1:]] == [f"sdpa {n}" for n in guard.SDPA_ORDER if n != chosen]
    kernels[0] = guard.Kernel("test broken", "x", _perturbed(), use=kernels[0].use)
    record = guard.protect(_plan(kernels, auto=True))
    # on the CPU cuDNN and efficient cannot run (skipped as raising): math is the first that passes
    assert record["kernel"] == "sdpa math" and switched == ["math"]
    assert [s["kernel"] for s in record["skipped"]] == ["test broken", "sdpa cudnn", "sdpa efficient"]
    assert "raised" in record["skipped"][1]


# ---------------------------------------------------------------------------------------------------
# The library backends: the kernel each worker runs, and auto's fallbacks


@pytest.mark.slow
def test_guard_diffusers_auto_falls_back_to_a_kernel_that_passes(random_wan, monkeypatch):
    skip_module_without("diffusers")
    from orchestrator.harness import open_backend
    real = guard.sdpa_run
    monkeypatch.setattr(guard, "sdpa_run", lambda name: _perturbed() if name == "auto" else real(name))
    backend = open_backend(ModelConfig(backend="diffusers", task="t2v", path=str(random_wan("t2v")),
                                       dtype="bfloat16"), GenerationConfig(**SMALL), ())
    record = backend.load_info["attention_guard"]
    assert record["skipped"][0]["kernel"].startswith("diffusers native auto")
    fallback = record["kernel"].split()[-1]
    assert record["kernel"] == f"diffusers native {fallback}" and fallback in guard.SDPA_ORDER
    backends = {getattr(p, "_attention_backend", None) for p in backend.pipe.transformer.attn_processors.values()}
    assert backends == {speed_settings.DIFFUSERS_SDPA[fallback]}  # the transformer now runs the fallback


@pytest.mark.slow
def test_guard_diffsynth_auto_skips_a_broken_sageattention(tiny_checkpoint, monkeypatch):
    """DiffSynth's `auto` picks SageAttention whenever it is importable: a broken one (a test double of
    `sageattn`) is skipped, DiffSynth's own kernels are turned off and the worker runs SDPA."""
    skip_module_without("diffsynth")
    from diffsynth.models import wan_video_dit
    from orchestrator.harness import open_backend
    for flag in ("FLASH_ATTN_3_AVAILABLE", "FLASH_ATTN_2_AVAILABLE"):
        monkeypatch.setattr(wan_video_dit, flag, False)
    monkeypatch.setattr(wan_video_dit, "SAGE_ATTN_AVAILABLE", True)
    monkeypatch.setattr(wan_video_dit, "sageattn", _perturbed(), raising=False)
    monkeypatch.setattr(guard, "package_version", lambda name: f"{name} 2.2.0")
    model = ModelConfig(backend="diffsynth", task="t2v", path=str(tiny_checkpoint("t2v")), dtype="bfloat16")
    backend = open_backend(model, GenerationConfig(**SMALL), ())
    record = backend.load_info["attention_guard"]
    assert record["skipped"][0]["kernel"] == "diffsynth sage" and "sageattention 2.2.0" in record["skipped"][0]["version"]
    assert record["kernel"].startswith("diffsynth sdpa auto") and not wan_video_dit.SAGE_ATTN_AVAILABLE

    # asked for by name, the same broken build stops the worker instead
    monkeypatch.setattr(wan_video_dit, "SAGE_ATTN_AVAILABLE", True)
    from dataclasses import replace
    with pytest.raises(guard.AttentionKernelFailed, match=r"diffsynth sage \(diffsynth .*sageattention 2.2.0\)"):
        open_backend(replace(model, speed=replace(model.speed, attention="sage")), GenerationConfig(**SMALL), ())


# ---------------------------------------------------------------------------------------------------
# Refusals of `speed.attention: sage`, at its line


def test_guard_sage_refusals_say_why_and_how_to_install(monkeypatch):
    import importlib.metadata
    real = importlib.metadata.version
    versions = {}

    def version(name):
        if name == "sageattention":
            if name not in versions:
                raise importlib.metadata.PackageNotFoundError(name)
            return versions[name]
        return real(name)
    monkeypatch.setattr(importlib.metadata, "version", version)
    message, fix = speed_settings.sage_problem([("NVIDIA H100", (9, 0))])
    assert "not installed" in message and "bench/build_sageattention.sh" in fix and "pip install" in fix
    versions["sageattention"] = "1.0.6"
    assert "1.0.6 is installed" in speed_settings.sage_problem([("NVIDIA H100", (9, 0))])[0]
    versions["sageattention"] = "2.2.0+d1a57a5"
    assert speed_settings.sage_problem([("NVIDIA A800", (8, 0)), ("RTX 3090", (8, 6))]) is None
    assert "compute capability ≥ 8.0" in speed_settings.sage_problem([("Tesla V100", (7, 0))])[0]
    assert "this machine has none" in speed_settings.sage_problem([])[0]
    assert speed_settings.sage_problem(None) is None  # a Ray cluster's cards: each worker's guard checks


@pytest.mark.parametrize("backend", ["diffusers", "diffsynth"])
def test_guard_sage_is_refused_at_its_manifest_line(backend, write_manifest, random_wan, tiny_checkpoint,
                                                   monkeypatch):
    skip_module_without("diffusers" if backend == "diffusers" else "diffsynth")
    monkeypatch.setattr(speed_settings, "sage_installed_problem",
                        lambda: "speed.attention `sage` cannot run here: it needs SageAttention 2 (`sageattention` ≥ 2), which is not installed")
    path = random_wan("t2v") if backend == "diffusers" else tiny_checkpoint("t2v")
    text = f"""\
name: t
output_dir: out
model:
  backend: {backend}
  task: t2v
  path: {path}
speed:
  compile: none
  attention: sage
generation: {{width: 32, height: 32, num_frames: 5, steps: 2}}
seeds: [1]
categories:
  a: {{prompts: [x]}}
"""
    with pytest.raises(ManifestError) as error:
        load_manifest(write_manifest(text))
    found = {p.message: (p.line, p.fix) for p in error.value.problems}
    line, fix = found["speed.attention `sage` cannot run here: it needs SageAttention 2 (`sageattention` ≥ 2), which is not installed"]
    assert line == 9 and "bench/build_sageattention.sh" in fix

    monkeypatch.setattr(speed_settings, "sage_installed_problem", lambda: None)
    monkeypatch.setenv("ORCHESTRATOR_FAKE_GPUS", "Tesla V100:32:0")
    with pytest.raises(ManifestError) as error:
        load_manifest(write_manifest(text))
    found = {p.message: p.line for p in error.value.problems}
    assert found["speed.attention `sage` cannot run here: it needs compute capability ≥ 8.0 (Ampere or newer); Tesla V100 (compute "
                 "capability 7.0) is older"] == 9


# ---------------------------------------------------------------------------------------------------
# The record in each sidecar


@pytest.mark.slow
def test_guard_record_reaches_every_sidecar(write_manifest, tmp_path, random_wan):
    skip_module_without("diffusers")
    path = write_manifest(synthetic_manifest(
        model={"backend": "diffusers", "task": "t2v", "path": str(random_wan("t2v")), "dtype": "float32"},
        generation=SMALL, seeds=[1], categories={"a": {"prompts": ["x", "y"]}}, resources={"cpu_slots": 1}))
    result = cli("run", str(path), "--executor", "local", "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    sidecars = [json.loads(p.read_text(encoding="utf-8")) for p in (tmp_path / "out").rglob("*.json")
                if not any(part.startswith(".") for part in p.relative_to(tmp_path / "out").parts)]
    records = [s["load"]["attention_guard"] for s in sidecars if "load" in s]
    assert len(records) == 2
    assert all(r["kernel"].startswith("diffusers native auto") and r["error"] <= r["bound"] == guard.EXACT_BOUND
               and r["version"].startswith("torch ") and r["seconds"] > 0 for r in records)


def test_guard_synthetic_backend_records_none(write_manifest, tmp_path):
    path = write_manifest(synthetic_manifest(seeds=[1], categories={"a": {"prompts": ["x"]}}))
    result = cli("run", str(path), "--executor", "local", "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    sidecars = [json.loads(p.read_text(encoding="utf-8")) for p in (tmp_path / "out").rglob("*.json")
                if "load" in p.read_text(encoding="utf-8")]
    assert sidecars and all(s["load"]["attention_guard"]["kernel"] == "none" for s in sidecars)
