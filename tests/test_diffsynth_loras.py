"""LoRAs on the diffsynth backend (issue 30), through its real `load`/`generate` on the TINY DiffSynth
checkpoint (`build_tiny_checkpoint`), on the CPU, with random LoRAs (`demo.random_loras`) in both layouts:
strength 0 is no LoRA, a LoRA changes the frames, a worker switching LoRA sets never leaks into the next
job (frames equal to a fresh worker's), the fused path (before quantizing), each LoRA into its Wan2.2
expert; and the cheap-steps facts: one DiT pass per step at cfg 1, where a job's time goes."""
from __future__ import annotations

import functools
import shutil
from dataclasses import replace

import numpy as np
import pytest

from orchestrator.manifest import GenerationConfig, LoraConfig, ModelConfig, SpeedConfig

from .conftest import backend_job as _job, skip_module_without

skip_module_without("torch", "diffsynth")
pytestmark = pytest.mark.slow  # real pipelines: each test loads one or more (a second or more each)

GEN = dict(width=32, height=32, num_frames=5, fps=5, steps=2)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return tiny_checkpoint("t2v")


@pytest.fixture(scope="module")
def lora_files(tiny, tmp_path_factory):
    """Two random LoRAs for the tiny DiT in the Wan layout (A, B), and A again in the diffusers layout."""
    from orchestrator.demo.random_loras import build_random_lora
    folder = tmp_path_factory.mktemp("loras")
    return {"A": build_random_lora(tiny, folder / "a.safetensors", layout="wan", seed=1),
            "B": build_random_lora(tiny, folder / "b.safetensors", layout="wan", seed=2, targets="ffn"),
            "A_diffusers": build_random_lora(tiny, folder / "a_diffusers.safetensors", layout="diffusers", seed=1)}


@pytest.fixture(scope="module")
def two_experts(tiny, tmp_path_factory):
    """The tiny folder with a second DiT file, loaded as Wan2.2 A14B's low-noise expert (`dit2`)."""
    folder = tmp_path_factory.mktemp("two") / "Wan-tiny-a14b"
    shutil.copytree(tiny, folder)
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", folder / "low_noise_model.safetensors")
    return folder, {"model_files": {"dit": ["diffusion_pytorch_model.safetensors", "low_noise_model.safetensors"]}}


def lora(files, name, strength=1.0, expert="both", file=None) -> LoraConfig:
    return LoraConfig(name=name, path=str(files[file or name]), strength=strength, expert=expert)


def _backend(path, loras=(), speed=SpeedConfig(), options=None, **generation):
    from orchestrator.backends.diffsynth_wan import DiffSynthWanBackend
    model = ModelConfig(backend="diffsynth", task="t2v", path=str(path), dtype="float32", options=options or {},
                        speed=speed, loras=tuple(loras))
    backend = DiffSynthWanBackend(model, GenerationConfig(**{**GEN, **generation}), ())
    backend.load()
    return backend


def _frames(backend, seed=1):
    return backend.generate(_job(seed=seed), lambda step, steps: None)


@functools.cache
def _fresh(path, loras=()) -> np.ndarray:
    """The frames of seed 1 in a fresh worker loaded with `loras` (kept: several tests compare with them)."""
    return _frames(_backend(path, loras))


def test_strength_zero_gives_the_frames_of_no_lora_and_strength_one_changes_them(tiny, lora_files):
    plain = _fresh(tiny)
    zero = _backend(tiny, [lora(lora_files, "A", 0.0)])
    assert zero.load_info["loras"][0]["layers"] == {}  # nothing loaded at 0
    assert np.array_equal(_frames(zero), plain)
    one = _backend(tiny, [lora(lora_files, "A", 1.0)])
    record = one.load_info["loras"][0]
    assert record["mode"] == "hot" and record["layers"] == {"dit": 20} and record["left_out"] == 0
    assert record["file"] == str(lora_files["A"]) and record["strength"] == 1.0 and record["seconds"] >= 0
    assert not np.array_equal(_frames(one), plain)


def test_a_diffusers_layout_lora_gives_the_frames_of_the_same_lora_in_the_wan_layout(tiny, lora_files):
    """random_loras draws both layouts of one seed from the same tensors: renamed by checkpoints.loras,
    the diffusers file is the Wan one, and the frames are equal to the last bit."""
    wan = _fresh(tiny, (lora(lora_files, "A"),))
    diffusers = _backend(tiny, [lora(lora_files, "A", file="A_diffusers")])
    assert diffusers.load_info["loras"][0]["layers"] == {"dit": 20}
    assert np.array_equal(_frames(diffusers), wan)
    assert not np.array_equal(wan, _fresh(tiny))


def test_one_worker_switching_lora_sets_gives_the_frames_of_a_fresh_worker_per_set(tiny, lora_files):
    """The leak test: no LoRA, strengths, another file, two at once, and back to none, switched in one
    worker with use_loras (as the slot does), each job's frames equal to a fresh worker's loaded with it."""
    sets = [(), (lora(lora_files, "A", 1.0),), (lora(lora_files, "A", 0.5),), (lora(lora_files, "B", 1.0),),
            (lora(lora_files, "A", 1.0), lora(lora_files, "B", 0.7)), ()]
    worker = _backend(tiny, sets[0])
    switched, switches = [], []
    for loras in sets:
        if loras != worker.model.loras:
            worker.use_loras(loras)
            worker.model = replace(worker.model, loras=loras)
        switched.append(_frames(worker))
        switches.append(worker.job_info().get("lora_switch"))
    fresh = [_fresh(tiny, loras) for loras in sets]
    for index, (mine, theirs) in enumerate(zip(switched, fresh)):
        assert np.array_equal(mine, theirs), f"job {index} ({sets[index]}) differs from a fresh worker's"
    assert np.array_equal(switched[0], switched[-1]) and not np.array_equal(switched[1], switched[2])
    assert switches[0] is None  # no switch before the first job
    assert switches[2]["files_read"] == 0  # a strength change reads no file: A's tensors are cached
    assert switches[3]["files_read"] == 1 and [r["name"] for r in switches[4]["loras"]] == ["A", "B"]
    assert switches[5]["loras"] == [] and switches[5]["seconds"] >= 0


def test_fused_loras_go_into_the_weights_before_quantizing(tiny, lora_files):
    """With speed.quantize (int8 runs on the CPU) the LoRA is fused before the quantize step; the fuse
    itself, without quantizing, gives the hot-loaded frames up to float rounding; a second set is refused."""
    from orchestrator.backends.diffsynth_loras import PipelineLoras
    int8 = SpeedConfig(quantize="int8")
    with_lora = _backend(tiny, [lora(lora_files, "A")], speed=int8, options={"vram_management": False})
    assert with_lora.load_info["loras"][0]["mode"] == "fused"
    assert with_lora.load_info["speed"]["applied"]["dit"]["quantized_layers"] == 20
    plain_int8 = _backend(tiny, speed=int8, options={"vram_management": False})
    assert not np.array_equal(_frames(with_lora), _frames(plain_int8))

    hot = _fresh(tiny, (lora(lora_files, "A"),))
    backend = _backend(tiny)
    fused = PipelineLoras(backend.pipe, fused=True)
    assert fused.apply((lora(lora_files, "A"),))[0]["layers"] == {"dit": 20}
    frames = _frames(backend)
    assert np.abs(frames.astype(int) - hot).max() <= 2 and not np.array_equal(frames, _fresh(tiny))
    with pytest.raises(RuntimeError, match="loaded again"):
        fused.apply((lora(lora_files, "A", 0.5),))


def test_each_lora_goes_into_its_wan22_expert_at_its_strength(two_experts, lora_files):
    """dit is the high-noise expert (DiffSynth runs it first, above the boundary), dit2 the low-noise one:
    expert and (high, low) strengths pick which DiTs a LoRA patches; a switch to per-expert strengths gives
    a fresh worker's frames."""
    folder, options = two_experts
    low = _backend(folder, [lora(lora_files, "A", expert="low")], options=options)
    assert low.load_info["loras"][0]["layers"] == {"dit2": 20}
    assert not low.pipe.dit.blocks[0].self_attn.q.__dict__.get("lora_A_weights")  # the high expert: untouched
    pair = (lora(lora_files, "A", (1.0, 0.0)),)  # high only, by strength
    assert _backend(folder, pair, options=options).load_info["loras"][0]["layers"] == {"dit": 20}
    both = (lora(lora_files, "A", (1.0, 0.5)),)
    assert _backend(folder, both, options=options).load_info["loras"][0]["layers"] == {"dit": 20, "dit2": 20}

    low.use_loras(both)
    assert np.array_equal(_frames(low), _frames(_backend(folder, both, options=options)))
    frames = {name: _frames(_backend(folder, [lora(lora_files, "A", expert=name)], options=options))
              for name in ("high", "low")}
    assert not np.array_equal(frames["high"], frames["low"])


def _dit_batches(backend) -> list[int]:
    """The batch size of each DiT pass (DiffSynth's model_fn patchifies the latents once per pass)."""
    batches: list[int] = []
    backend.pipe.dit.patch_embedding.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    return batches


@pytest.mark.parametrize("cfg_merge", [False, True])
def test_cfg_1_runs_one_dit_pass_per_step_and_cfg_5_two(tiny, cfg_merge):
    """DiffSynth skips the unconditional pass (and the negative prompt's encoding) at cfg 1; with cfg_merge
    the two passes of cfg 5 are one of batch 2, and at cfg 1 the backend drops cfg_merge (DiffSynth would
    run the conditional input twice)."""
    extra = {"cfg_merge": True} if cfg_merge else {}
    guided = _backend(tiny, cfg_scale=5.0, extra=extra)
    batches = _dit_batches(guided)
    _frames(guided)
    assert batches == ([2, 2] if cfg_merge else [1, 1, 1, 1])  # 2 steps
    assert guided.job_info()["prompt_encodings"] == 2
    distilled = _backend(tiny, cfg_scale=1.0, extra=extra)
    batches = _dit_batches(distilled)
    frames = _frames(distilled)
    assert batches == [1, 1] and distilled.job_info()["prompt_encodings"] == 1  # the negative prompt: unused
    if cfg_merge:
        assert np.array_equal(frames, _frames(_backend(tiny, cfg_scale=1.0)))


def test_a_jobs_time_is_split_into_text_encoding_denoising_and_the_vae_decode(tiny):
    backend = _backend(tiny)
    _frames(backend)
    seconds = backend.job_info()["seconds"]
    assert set(seconds) == {"text_encoder", "inputs", "denoise", "vae_decode", "total"}
    assert all(value >= 0 for value in seconds.values())
    assert seconds["text_encoder"] > 0 and seconds["denoise"] > 0 and seconds["vae_decode"] > 0
    parts = seconds["text_encoder"] + seconds["inputs"] + seconds["denoise"] + seconds["vae_decode"]
    assert parts <= seconds["total"] + 1e-3 and parts >= 0.5 * seconds["total"]
    _frames(backend, seed=2)  # the prompts are cached now: no text encoding
    assert backend.job_info()["seconds"]["text_encoder"] == 0
