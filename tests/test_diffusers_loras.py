"""LoRAs in the diffusers backend (issue 30), on TINY random-weight checkpoints and random LoRA files (fakes
of trained ones, `orchestrator/demo/random_loras.py`), through the backend's real `load()` and `generate()`
on the CPU: strength 0 is no LoRA, a switch never leaks, each Wan2.2 expert gets its own strength, a fused
LoRA goes in before int8; and at cfg 1 no unconditional pass runs; each job's time is split by part."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from orchestrator.backend import lora_change
from orchestrator.manifest import GenerationConfig, LoraConfig, ModelConfig, SpeedConfig

from .conftest import backend_job, skip_module_without

skip_module_without("torch", "diffusers", "peft")

SMALL = dict(width=32, height=32, num_frames=5, fps=5, steps=2)


@pytest.fixture(scope="module")
def loras(random_wan, tmp_path_factory):
    """name -> LoRA file: A (Wan/lightx2v layout) and B (diffusers/PEFT layout) for the Wan2.1 checkpoint,
    H for the Wan2.2 A14B checkpoint's high-noise expert (its shapes fit both experts)."""
    from orchestrator.demo.random_loras import build_random_lora
    root = tmp_path_factory.mktemp("loras")
    return {"A": build_random_lora(random_wan("t2v"), root / "a.safetensors", layout="wan", seed=1),
            "B": build_random_lora(random_wan("t2v"), root / "b.safetensors", layout="diffusers", seed=2),
            "H": build_random_lora(random_wan("a14b"), root / "h.safetensors", layout="wan", seed=3, expert="high")}


def _lora(loras, name, strength=1.0, expert="both") -> LoraConfig:
    return LoraConfig(name=name.lower(), path=str(loras[name]), strength=strength, expert=expert)


def _backend(path, loras=(), generation=None, quantize="none"):
    from orchestrator.backends.diffusers_wan import DiffusersWanBackend
    backend = DiffusersWanBackend(ModelConfig(backend="diffusers", task="t2v", path=str(path), dtype="float32",
                                              speed=SpeedConfig(quantize=quantize), loras=tuple(loras)),
                                  generation or GenerationConfig(**SMALL), ())
    backend.load()
    return backend


def _frames(backend, seed=1):
    return backend.generate(backend_job(seed=seed), lambda step, steps: None)


def _lora_layers(module) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer
    return sum(isinstance(m, BaseTunerLayer) for m in module.modules())


# --------------------------------------------------------------------------------------------------
# without a pipeline


def test_adapter_names_scales_and_the_switch_rule():
    from orchestrator.backends.diffusers_loras import LoraAdapters, adapter_name
    from orchestrator.backends.diffusers_wan import DiffusersWanBackend
    lora = LoraConfig(name="motion.v2", path="/loras/motion_e10.safetensors", strength=(3.0, 1.5))
    name = adapter_name(lora)
    assert name.startswith("motion_v2_") and name.replace("_", "").isalnum()
    # another file, or the same file retrained (another digest), under the same LoRA name: another adapter
    assert adapter_name(LoraConfig(name="motion.v2", path="/loras/motion_e5.safetensors")) != name
    assert adapter_name(LoraConfig(name="motion.v2", path=lora.path, digest="ab12")) != name
    assert adapter_name(LoraConfig(name="motion.v2", path=lora.path, strength=0.2)) == name  # strength: no file

    two_experts = LoraAdapters(SimpleNamespace(transformer=object(), transformer_2=object()))
    one = LoraAdapters(SimpleNamespace(transformer=object(), transformer_2=None))
    assert two_experts.scales(lora) == {"transformer": 3.0, "transformer_2": 1.5}
    assert one.scales(lora) == {"transformer": 3.0}  # one denoiser: the first scale only
    assert two_experts.scales(LoraConfig("h", "/h", 2.0, expert="high")) == {"transformer": 2.0, "transformer_2": 0.0}

    base = ModelConfig(backend="diffusers", task="t2v", path="/ckpt", loras=(lora,))
    other = ModelConfig(backend="diffusers", task="t2v", path="/ckpt", loras=(LoraConfig("m", "/m", 0.5),))
    assert DiffusersWanBackend.switches_loras
    assert lora_change(DiffusersWanBackend, base, other) == "switch"
    int8 = SpeedConfig(quantize="int8")
    assert lora_change(DiffusersWanBackend, ModelConfig(**{**vars(base), "speed": int8}),
                       ModelConfig(**{**vars(other), "speed": int8})) == "reload"


# --------------------------------------------------------------------------------------------------
# real tiny pipelines


@pytest.mark.slow
def test_strength_zero_is_no_lora_and_a_lora_changes_the_frames_in_both_layouts(random_wan, loras):
    plain = _frames(_backend(random_wan("t2v")))
    for name in ("A", "B"):
        at_zero = _backend(random_wan("t2v"), [_lora(loras, name, 0.0)])
        assert np.array_equal(_frames(at_zero), plain), name  # bit-identical
        assert _lora_layers(at_zero.pipe.transformer) == 0  # at 0 the file is not even read
        at_one = _backend(random_wan("t2v"), [_lora(loras, name, 1.0)])
        assert not np.array_equal(_frames(at_one), plain), name
        (applied,) = at_one.load_info["loras"]
        assert applied["name"] == name.lower() and applied["file"] == str(loras[name])
        assert applied["mode"] == "adapter" and applied["strength"] == 1.0 and applied["seconds"] >= 0


@pytest.mark.slow
def test_a_switching_worker_gives_the_frames_of_a_fresh_worker_per_set(random_wan, loras):
    """The leak test: one backend through the sets, against one freshly loaded backend per set."""
    sets = [[], [_lora(loras, "A", 1.0)], [_lora(loras, "A", 0.5)], [_lora(loras, "B", 1.0)],
            [_lora(loras, "A", 1.0), _lora(loras, "B", 0.7)], []]
    worker = _backend(random_wan("t2v"))
    reads = []
    load = worker.pipe.load_lora_weights
    worker.pipe.load_lora_weights = lambda path, **kw: reads.append(path) or load(path, **kw)
    seen = []
    for index, loras_on in enumerate(sets):
        if index:
            worker.use_loras(tuple(loras_on))
        switched = _frames(worker)
        info = worker.job_info()
        if index:
            assert info["lora_switch"]["seconds"] >= 0
            assert [fact["name"] for fact in info["lora_switch"]["loras"]] == [lora.name for lora in loras_on]
        assert np.array_equal(switched, _frames(_backend(random_wan("t2v"), loras_on))), f"set {index} leaks"
        seen.append(switched)
    _frames(worker)
    assert "lora_switch" not in worker.job_info()  # only the job right after the switch carries it
    assert reads == [str(loras["A"]), str(loras["B"])]  # each file read once: strength and set changes read none
    assert np.array_equal(seen[0], seen[-1]) and not np.array_equal(seen[1], seen[2])


@pytest.mark.slow
def test_old_files_are_deleted_beyond_the_few_kept(random_wan, loras):
    from orchestrator.backends.diffusers_loras import LoraAdapters
    backend = _backend(random_wan("t2v"))
    adapters = LoraAdapters(backend.pipe, keep_unused_files=1)
    for name in ("x", "y", "z"):
        adapters.use((LoraConfig(name, str(loras["A"]), 1.0),))
    assert [n.split("_")[0] for n in adapters.loaded] == ["y", "z"]  # z in use, y the one unused kept
    assert set(backend.pipe.transformer.peft_config) == set(adapters.loaded)


@pytest.mark.slow
def test_each_wan22_expert_gets_its_own_strength(random_wan, loras):
    from orchestrator.backends.diffusers_loras import adapter_name
    generation = GenerationConfig(**{**SMALL, "steps": 4}, cfg_scale=(1.0, 1.0))
    plain = _backend(random_wan("a14b"), generation=generation)
    high_only = _backend(random_wan("a14b"), [_lora(loras, "H", 1.0, expert="high")], generation)
    name = adapter_name(_lora(loras, "H"))
    assert high_only.adapters.active() == {"transformer": {name: 1.0}, "transformer_2": {}}
    assert _lora_layers(high_only.pipe.transformer) and not _lora_layers(high_only.pipe.transformer_2)
    assert not np.array_equal(_frames(high_only), _frames(plain))

    high_only.use_loras((_lora(loras, "H", (3.0, 1.5)),))  # the community's 3.0 high / 1.5 low
    assert high_only.adapters.active() == {"transformer": {name: 3.0}, "transformer_2": {name: 1.5}}
    for denoiser, scale in (("transformer", 3.0), ("transformer_2", 1.5)):
        layer = getattr(high_only.pipe, denoiser).blocks[0].attn1.to_q
        assert layer.active_adapters == [name]
        assert layer.scaling[name] == pytest.approx(scale)  # alpha = rank in these files: scaling = strength
    fresh = _backend(random_wan("a14b"), [_lora(loras, "H", (3.0, 1.5))], generation)
    assert np.array_equal(_frames(high_only), _frames(fresh))


@pytest.mark.slow
def test_fused_lora_goes_in_before_int8(random_wan, loras):
    from torchao.utils import TorchAOBaseTensor
    lora = _lora(loras, "A", 1.0)
    quantized = _backend(random_wan("t2v"), quantize="int8")
    fused = _backend(random_wan("t2v"), [lora], quantize="int8")
    (applied,) = fused.load_info["loras"]
    assert applied["mode"] == "fused"
    assert _lora_layers(fused.pipe.transformer) == 0  # merged, then the adapters removed
    assert isinstance(fused.pipe.transformer.blocks[0].attn1.to_q.weight, TorchAOBaseTensor)
    assert not np.array_equal(_frames(fused), _frames(quantized))
    with pytest.raises(RuntimeError, match="fused"):
        fused.use_loras(())


@pytest.mark.slow
def test_fusing_gives_the_adapters_frames(random_wan, loras):
    from orchestrator.backends.diffusers_loras import LoraAdapters
    on = (_lora(loras, "A", 0.8), _lora(loras, "B", 0.5))
    adapters = _frames(_backend(random_wan("t2v"), on))
    backend = _backend(random_wan("t2v"))
    LoraAdapters(backend.pipe).fuse(on)
    assert _lora_layers(backend.pipe.transformer) == 0
    fused = _frames(backend)
    # the same sum in another order (W + s·BA once, against W·x + s·B(A·x) per call): float32 rounding
    assert np.abs(fused.astype(int) - adapters.astype(int)).max() <= 2
    assert not np.array_equal(fused, _frames(_backend(random_wan("t2v"))))
    # a sweep that never switches its LoRAs loads them fused (`ModelConfig.fuse_loras`): the same frames
    from dataclasses import replace

    from orchestrator.backends.diffusers_wan import DiffusersWanBackend
    model = replace(backend.model, loras=on, fuse_loras=True)
    loaded = DiffusersWanBackend(model, backend.generation, ())
    loaded.load()
    assert [fact["mode"] for fact in loaded.load_info["loras"]] == ["fused", "fused"]
    assert _lora_layers(loaded.pipe.transformer) == 0 and np.array_equal(_frames(loaded), fused)


@pytest.mark.slow
@pytest.mark.parametrize("variant,cfg,calls", [
    ("t2v", 1.0, {"transformer": 4}), ("t2v", 5.0, {"transformer": 8}),
    # Wan2.2, 4 steps: 2 of the high-noise expert, then 2 of the low-noise one (the tiny model's boundary)
    ("a14b", (1.0, 1.0), {"transformer": 2, "transformer_2": 2}),
    ("a14b", (5.0, 5.0), {"transformer": 4, "transformer_2": 4}),
    # one expert guided: diffusers alone would decide both from the first scale (see _guidance_per_expert)
    ("a14b", (1.0, 5.0), {"transformer": 2, "transformer_2": 4}),
    ("a14b", (3.5, 1.0), {"transformer": 4, "transformer_2": 2}),
])
def test_cfg_1_runs_no_unconditional_pass(random_wan, variant, cfg, calls):
    generation = GenerationConfig(**{**SMALL, "steps": 4}, cfg_scale=cfg)
    backend = _backend(random_wan(variant), generation=generation)
    counted = {}
    for denoiser in calls:
        counted[denoiser] = 0
        getattr(backend.pipe, denoiser).register_forward_hook(
            lambda *args, denoiser=denoiser: counted.__setitem__(denoiser, counted[denoiser] + 1))
    frames = _frames(backend)
    assert counted == calls
    if cfg == (1.0, 5.0):  # the low expert's guidance is applied: not the frames of (1, 1)
        unguided = GenerationConfig(**{**SMALL, "steps": 4}, cfg_scale=(1.0, 1.0))
        assert not np.array_equal(frames, _frames(_backend(random_wan(variant), generation=unguided)))


@pytest.mark.slow
def test_the_job_time_is_split_into_text_encoding_denoise_and_decode(random_wan):
    import time
    backend = _backend(random_wan("t2v"))
    for expect_encoding in (True, False):  # the second job's prompt is cached
        started = time.monotonic()
        _frames(backend)
        wall = time.monotonic() - started
        seconds = backend.job_info()["seconds"]
        assert set(seconds) == {"text_encoder", "denoise", "vae_decode"}
        assert all(part >= 0 for part in seconds.values())
        assert sum(seconds.values()) <= wall + 1e-3  # (each part rounded to 0.1 ms)
        assert seconds["denoise"] > 0 and seconds["vae_decode"] > 0
        assert (seconds["text_encoder"] > 0) if expect_encoding else seconds["text_encoder"] < seconds["denoise"]


@pytest.mark.slow
def test_under_compile_a_change_of_strength_recompiles_nothing_and_takes_effect(random_wan, loras):
    """`compile: blocks` with a LoRA as an adapter: its scales live in tensors (`scales_as_tensors`), so a
    strength sweep compiles the blocks once (a float scale compiled a graph per value), and the compiled
    forward follows the new strength (eager's output at that strength)."""
    from torch._dynamo.utils import counters
    from orchestrator.backends.diffusers_wan import DiffusersWanBackend
    generation = GenerationConfig(**SMALL)

    def load(strength, compile):
        backend = DiffusersWanBackend(ModelConfig(
            backend="diffusers", task="t2v", path=str(random_wan("t2v")), dtype="float32",
            speed=SpeedConfig(compile=compile), loras=(_lora(loras, "A", strength),)), generation, ())
        backend.load()
        return backend
    compiled = load(1.0, "blocks")
    full = compiled.denoise_once(0)
    graphs = counters["stats"]["unique_graphs"]
    compiled.use_loras((_lora(loras, "A", 0.5),))
    half = compiled.denoise_once(0)
    compiled.use_loras((_lora(loras, "A", 0.25),))
    compiled.denoise_once(0)
    assert counters["stats"]["unique_graphs"] == graphs  # no new graph for a new strength
    eager = load(0.5, "none")
    assert (half - eager.denoise_once(0)).abs().max().item() < 1e-4
    assert (half - full).abs().max().item() > 1e-2  # (the strength did change the output)
