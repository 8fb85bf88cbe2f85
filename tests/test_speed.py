"""The `speed:` section (orchestrator/speed.py): every bad value is refused at its manifest line before
anything starts; quantize is part of each job's identity, compile and attention are not; each switch
is really applied by the diffusers and diffsynth backends to TINY random-weight checkpoints on the CPU;
a sweep's workers share one compile cache behind a first-call lock; `plan`, `models fit` and
`models speed` show and choose speed settings.

torch.compile is lazy: loading only wraps the modules, which is checked directly. Where a compiled
module is run, torch.compile's default backend (inductor, most of a minute per graph on a shared
CPU) is swapped for one that only records the graph dynamo traced: the tracing (with the backends'
fullgraph=True, where any graph break is an error) is what the manifest's settings decide; inductor's
code generation from that graph is torch's own.
"""
from __future__ import annotations

import functools
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from orchestrator.jobs import expand, settings_fingerprint
from orchestrator.ledger import Ledger
from orchestrator.manifest import GenerationConfig, ManifestError, ModelConfig, SpeedConfig
from orchestrator.validation import load_manifest
from orchestrator.speed import compile_cache_dir, first_call_lock, use_compile_cache

from .conftest import PATIENCE_S, ROOT, backend_job as _job, cli, synthetic_manifest

GEN = dict(width=32, height=32, num_frames=5, fps=5, steps=2)
FAKE_GPUS = "ORCHESTRATOR_FAKE_GPUS"


# --------------------------------------------------------------------------------------------------
# helpers and fixtures


@pytest.fixture(scope="module")
def tiny_diffusers(random_wan) -> Path:
    """A tiny random-weight Wan2.1 T2V diffusers checkpoint, built once for the session (conftest)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("torchao")
    return random_wan("t2v")


@pytest.fixture(scope="module")
def tiny_diffsynth(tiny_checkpoint) -> Path:
    """DiffSynth's tiny random-weight Wan model in the original file layout, built once (conftest)."""
    pytest.importorskip("diffsynth")
    pytest.importorskip("torchao")
    return tiny_checkpoint("t2v")


def _diffusers(path, **speed):
    from orchestrator.backends.diffusers_wan import DiffusersWanBackend
    backend = DiffusersWanBackend(ModelConfig(backend="diffusers", task="t2v", path=str(path), dtype="float32",
                                              speed=SpeedConfig(**speed)), GenerationConfig(**GEN), ())
    backend.load()
    return backend


def _diffsynth(path, **speed):
    from orchestrator.backends.diffsynth_wan import DiffSynthWanBackend
    backend = DiffSynthWanBackend(ModelConfig(backend="diffsynth", task="t2v", path=str(path), dtype="float32",
                                              options={"vram_management": "text_encoder"},
                                              speed=SpeedConfig(**speed)), GenerationConfig(**GEN), ())
    backend.load()
    return backend


@pytest.fixture(scope="module")
def eager_diffusers(tiny_diffusers):
    """The tiny checkpoint without speed settings: what each setting is compared with."""
    return _diffusers(tiny_diffusers)


@pytest.fixture(scope="module")
def eager_diffsynth(tiny_diffsynth):
    return _diffsynth(tiny_diffsynth)


@pytest.fixture
def traced(monkeypatch):
    """torch.compile with a backend that records each graph dynamo traced and runs it as traced."""
    import torch
    graphs = []

    def record(graph, example_inputs):
        graphs.append(graph)
        return graph.forward
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=record))
    yield graphs
    torch._dynamo.reset()


@pytest.fixture
def sdpa_kernels(monkeypatch):
    """The torch SDPA kernels allowed at each call of scaled_dot_product_attention, recorded as
    (flash, efficient, cudnn, math) flags (torch's `sdpa_kernel` context sets them)."""
    import torch
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def sdpa(*args, **kwargs):
        b = torch.backends.cuda
        calls.append((b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.cudnn_sdp_enabled(),
                      b.math_sdp_enabled()))
        return original(*args, **kwargs)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    return calls


def _linears(modules):
    import torch
    return [m for module in modules for m in module.modules() if isinstance(m, torch.nn.Linear)]


def _is_torchao(weight) -> bool:
    from torchao.utils import TorchAOBaseTensor
    return isinstance(weight, TorchAOBaseTensor)


def _refused(path) -> ManifestError:
    with pytest.raises(ManifestError) as error:
        load_manifest(path)
    return error.value


def _line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if needle in line)


def _assert_at(error: ManifestError, path: Path, needle: str, *fragments: str) -> None:
    """A problem sits at the line holding `needle` (shown as file:line), and says each fragment."""
    line = _line_of(path, needle)
    here = [p for p in error.problems if p.line == line]
    assert here, f"nothing at line {line} ({needle}):\n{error}"
    said = " ".join(f"{p.message} (fix: {p.fix})" for p in here)
    for fragment in fragments:
        assert fragment in said, said
    assert f"{path}:{line}: " in str(error)


def _diffusers_manifest(checkpoint, speed: dict, **options) -> dict:
    return synthetic_manifest(model={"backend": "diffusers", "task": "t2v", "path": str(checkpoint),
                                     "dtype": "float32", "options": options},
                              generation=dict(GEN), speed=speed, resources={"cpu_slots": 1})


def _diffsynth_manifest(checkpoint, speed: dict, **options) -> dict:
    return synthetic_manifest(model={"backend": "diffsynth", "task": "t2v", "path": str(checkpoint),
                                     "dtype": "float32", "options": options},
                              generation=dict(GEN), speed=speed, resources={"cpu_slots": 1})


# --------------------------------------------------------------------------------------------------
# 1. bad values: located errors, nothing starts


def test_unknown_keys_and_values_are_reported_at_their_lines(write_manifest):
    path = write_manifest(synthetic_manifest(speed={"compile": "fast", "quantize": "int4", "turbo": True}))
    error = _refused(path)
    _assert_at(error, path, "compile: fast", "speed.compile is 'fast'", "none, blocks, full")
    _assert_at(error, path, "quantize: int4", "speed.quantize is 'int4'", "none, fp8, int8, fp8_storage")
    _assert_at(error, path, "turbo:", "unknown key `turbo` in speed", "attention, cache, compile, quantize")
    assert len(error.problems) == 3, error
    # `null` (or an empty value) is off, like the bare word none
    path = write_manifest(synthetic_manifest(speed={"compile": None, "quantize": "none"}))
    assert load_manifest(path).model.speed == SpeedConfig()


def test_the_cli_refuses_before_anything_starts(write_manifest, tmp_path):
    path = write_manifest(synthetic_manifest(speed={"compile": "fast"}))
    for command, *flags in (("plan",), ("run", "--executor", "local", "--no-progress")):
        result = cli(command, str(path), *flags)
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"{path}:{_line_of(path, 'compile: fast')}: speed.compile is 'fast'" in result.stderr
    assert not (tmp_path / "out").exists()  # no ledger, no logs, no compile cache


@pytest.mark.parametrize("attention,fragments", [
    ("nonsense", ("`nonsense` is neither a torch SDPA kernel nor a diffusers attention backend",
                  "use one of: auto, cudnn, flash, efficient, math", "sage")),
    ("flash_hub", ("`flash_hub` downloads its kernel from the Hugging Face hub", "flash_varlen")),
    ("sage", ("`sage` cannot run here", "sageattention")),
])
def test_diffusers_refuses_an_attention_backend_it_cannot_run(write_manifest, tiny_diffusers, attention, fragments):
    import importlib.util
    if attention == "sage" and importlib.util.find_spec("sageattention") is not None:
        pytest.skip("sageattention is installed here")
    path = write_manifest(_diffusers_manifest(tiny_diffusers, {"attention": attention}))
    error = _refused(path)
    _assert_at(error, path, "attention:", *fragments)
    assert len(error.problems) == 1, error


def test_fp8_needs_cards_with_fp8_tensor_cores(write_manifest, tiny_diffusers, monkeypatch):
    from orchestrator.gpus import NoGpus, discover
    monkeypatch.delenv(FAKE_GPUS, raising=False)
    try:
        discover()
        pytest.skip("this machine has NVIDIA GPUs")
    except NoGpus:
        pass
    data = _diffusers_manifest(tiny_diffusers, {"quantize": "fp8"})
    path = write_manifest(data)
    _assert_at(_refused(path), path, "quantize: fp8", "fp8-capable NVIDIA card", "this machine has none")

    monkeypatch.setenv(FAKE_GPUS, "NVIDIA A800-SXM4-80GB:80:0")
    _assert_at(_refused(path), path, "quantize: fp8", "NVIDIA A800-SXM4-80GB (compute capability 8.0) has none",
               "use quantize: int8 or fp8_storage")

    monkeypatch.setenv(FAKE_GPUS, "NVIDIA H100 80GB HBM3:80:0")
    assert load_manifest(path).model.speed.quantize == "fp8"

    # only the cards resources.gpus selects count
    monkeypatch.setenv(FAKE_GPUS, "NVIDIA A800-SXM4-80GB:80:0;NVIDIA H100 80GB HBM3:80:0")
    assert "A800" in str(_refused(path))
    data["resources"] = {"gpus": [1]}
    assert load_manifest(write_manifest(data)).model.speed.quantize == "fp8"


def test_compile_with_fp8_storage_is_refused(write_manifest, tiny_diffusers, tiny_diffsynth):
    """fp8 storage's per-call casts cannot be traced (see the backend tests below): refused up front."""
    for data in (_diffusers_manifest(tiny_diffusers, {"compile": "blocks", "quantize": "fp8_storage"}),
                 _diffsynth_manifest(tiny_diffsynth, {"compile": "blocks", "quantize": "fp8_storage"},
                                     vram_management="text_encoder")):
        path = write_manifest(data)
        _assert_at(_refused(path), path, "quantize: fp8_storage", "fp8_storage with compile: blocks",
                   "quantize: int8")
    load_manifest(write_manifest(_diffusers_manifest(tiny_diffusers, {"quantize": "fp8_storage"})))


def test_command_backend_refuses_speed_and_names_generate_py_flags(write_manifest, tmp_path):
    checkpoint = tmp_path / "Wan2.2-T2V-A14B"  # FAKE: the names generate.py looks for, no weights
    for name in ("high_noise_model", "low_noise_model"):
        (checkpoint / name).mkdir(parents=True)
    for name in ("models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth"):
        (checkpoint / name).write_bytes(b"")
    path = write_manifest({
        "name": "cmd", "output_dir": "out",
        "model": {"backend": "command", "task": "t2v", "path": "Wan2.2-T2V-A14B",
                  "options": {"script": str(ROOT / "tests" / "stubs" / "generate_stub.py")}},
        "generation": {"width": 832, "height": 480, "num_frames": 5, "fps": 16, "steps": 3},
        "seeds": [1], "categories": {"c": {"prompts": ["a lighthouse"]}},
        "speed": {"compile": "blocks"}})
    error = _refused(path)
    _assert_at(error, path, "compile: blocks", "generate.py has no such switches", "--offload_model", "--t5_cpu",
               "--convert_model_dtype", "--ulysses_size", "backend diffusers or diffsynth")
    assert len(error.problems) == 1, error


def test_diffsynth_refuses_what_it_cannot_apply(write_manifest, tiny_diffsynth):
    path = write_manifest(_diffsynth_manifest(tiny_diffsynth, {"compile": "full", "attention": "sage"},
                                              vram_management="text_encoder"))
    error = _refused(path)
    _assert_at(error, path, "compile: full", "speed.compile full", "nothing whole to compile", "compile: blocks")
    _assert_at(error, path, "attention: sage", "`sage` cannot run here", "bench/build_sageattention.sh")
    assert len(error.problems) == 2, error

    for speed in ({"compile": "blocks"}, {"quantize": "int8"}):
        data = _diffsynth_manifest(tiny_diffsynth, speed)  # vram_management true, the default: streamed
        path = write_manifest(data)
        key = next(iter(speed))
        _assert_at(_refused(path), path, f"{key}:", f"speed.{key} {speed[key]} needs the DiT resident",
                   "vram_management: text_encoder")
        for resident in ("text_encoder", False):
            data["model"]["options"]["vram_management"] = resident
            assert load_manifest(write_manifest(data)).model.speed == SpeedConfig(**speed)


# --------------------------------------------------------------------------------------------------
# 2. identity


def _ids(write_manifest, **speed) -> list[str]:
    data = synthetic_manifest(**({"speed": speed} if speed else {}))
    return [job.id for job in expand(load_manifest(write_manifest(data)))]


def test_quantize_changes_job_ids_compile_and_attention_do_not(write_manifest):
    plain = _ids(write_manifest)
    assert len(set(plain)) == 6
    assert _ids(write_manifest, compile="blocks") == plain
    assert _ids(write_manifest, attention="math") == plain
    assert _ids(write_manifest, compile="full", attention="cudnn", quantize="none") == plain
    int8 = _ids(write_manifest, quantize="int8")
    fp8_storage = _ids(write_manifest, quantize="fp8_storage")
    assert not set(int8) & set(plain) and not set(fp8_storage) & set(plain) and not set(int8) & set(fp8_storage)
    assert _ids(write_manifest, quantize="int8", compile="blocks", attention="math") == int8


def test_a_manifest_without_speed_keeps_the_ids_it_had_before(write_manifest):
    import hashlib
    manifest = load_manifest(write_manifest(synthetic_manifest()))
    fingerprint = settings_fingerprint(manifest)
    # what settings_fingerprint held before `speed:` existed, and nothing else
    assert set(fingerprint) == {"backend", "task", "model", "dtype", "options", "generation"}
    job = expand(manifest)[0]
    identity = json.dumps([job.category, job.stem, job.prompt_index, job.prompt, job.seed, None], ensure_ascii=False)
    before = hashlib.sha1(f"{identity}|{json.dumps(fingerprint, sort_keys=True, ensure_ascii=False)}".encode())
    assert job.id == before.hexdigest()[:16]
    quantized = load_manifest(write_manifest(synthetic_manifest(speed={"quantize": "int8", "compile": "blocks"})))
    assert settings_fingerprint(quantized) == {**fingerprint, "speed": {"quantize": "int8"}}


def _mp4s(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*.mp4") if ".sweep" not in p.parts)


@pytest.mark.slow
def test_a_changed_quantize_is_a_settings_change_a_changed_compile_is_not(write_manifest, tmp_path):
    data = synthetic_manifest()
    path = write_manifest(data)
    result = cli("run", str(path), "--executor", "local", "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / "out"
    before = {p: p.read_bytes() for p in _mp4s(out)}
    assert len(before) == 6
    assert not (out / ".sweep" / "compile_cache").exists()  # no compile, no cache and no lock
    assert not any("first_call" in json.loads(p.with_suffix(".json").read_text(encoding="utf-8")) for p in before)

    data["speed"] = {"quantize": "int8"}
    write_manifest(data)
    result = cli("run", str(path), "--executor", "local", "--no-progress")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "6 existing mp4s" in result.stderr and "speed None → {'quantize': 'int8'}" in result.stderr
    assert "Nothing was started" in result.stderr
    assert {p: p.read_bytes() for p in _mp4s(out)} == before  # untouched

    data["speed"] = {"compile": "blocks", "attention": "math"}
    write_manifest(data)
    result = cli("run", str(path), "--executor", "local", "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all 6 jobs" in result.stdout
    assert {p: p.read_bytes() for p in _mp4s(out)} == before


# --------------------------------------------------------------------------------------------------
# 3. each switch applied by the backends


def test_denoise_once_is_seeded(eager_diffusers, eager_diffsynth):
    import torch
    for backend in (eager_diffusers, eager_diffsynth):
        a, b, other = backend.denoise_once(0), backend.denoise_once(0), backend.denoise_once(1)
        assert a.shape == (1, 16, 2, 4, 4)  # the manifest's latent: 16 channels, 2 latent frames, 32/8 pixels
        assert torch.equal(a, b) and not torch.equal(a, other)
    assert eager_diffusers.load_info["speed"] == {"compile": "none", "attention": "auto", "quantize": "none"}


@pytest.mark.slow
def test_diffusers_compile_blocks_compiles_each_block_whole(tiny_diffusers, eager_diffusers, traced):
    import torch
    backend = _diffusers(tiny_diffusers, compile="blocks")
    transformer = backend.pipe.transformer
    assert len(transformer.blocks) == 2
    assert all(block._compiled_call_impl is not None for block in transformer.blocks)
    assert transformer._compiled_call_impl is None  # regional: the blocks, not the whole
    applied = backend.load_info["speed"]["applied"]["card"]["transformer"]
    assert applied["compile"] == "blocks" and applied["compiled_modules"] == 2
    assert not traced  # compile happens at the first call
    out = backend.denoise_once(0)  # fullgraph=True: a graph break in a block would raise here
    assert traced and all(any(n.op == "call_function" for n in g.graph.nodes) for g in traced)
    assert torch.allclose(out, eager_diffusers.denoise_once(0), rtol=1e-5, atol=1e-6)
    assert backend.generate(_job(seed=1), lambda s, n: None).shape == (5, 32, 32, 3)


def test_diffusers_compile_full_compiles_the_transformer(tiny_diffusers):
    backend = _diffusers(tiny_diffusers, compile="full")
    transformer = backend.pipe.transformer
    assert transformer._compiled_call_impl is not None
    assert not any(block._compiled_call_impl is not None for block in transformer.blocks)
    assert backend.load_info["speed"]["applied"]["card"]["transformer"]["compiled_modules"] == 1


def test_diffusers_attention_math_runs_sdpa_on_the_math_kernel(tiny_diffusers, sdpa_kernels, monkeypatch):
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
    # set_attention_backend also sets diffusers' process-wide default: restored after this test
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)
    backend = _diffusers(tiny_diffusers, attention="math")
    processors = [m.processor for m in backend.pipe.transformer.modules() if getattr(m, "processor", None)]
    assert processors and all(p._attention_backend == AttentionBackendName._NATIVE_MATH for p in processors)
    assert backend.load_info["speed"]["applied"]["card"]["transformer"]["attention"] == "math"
    sdpa_kernels.clear()
    backend.denoise_once(0)
    assert sdpa_kernels and set(sdpa_kernels) == {(False, False, False, True)}  # math only


def test_diffusers_int8_quantizes_the_blocks_and_the_text_encoder(tiny_diffusers, eager_diffusers):
    backend = _diffusers(tiny_diffusers, quantize="int8")
    pipe = backend.pipe
    blocks, text = _linears(pipe.transformer.blocks), _linears([pipe.text_encoder])
    assert blocks and all(_is_torchao(m.weight) and "Int8" in type(m.weight).__name__ for m in blocks)
    assert text and all(_is_torchao(m.weight) for m in text)
    assert not _is_torchao(pipe.transformer.proj_out.weight)  # outside the blocks: untouched
    applied = backend.load_info["speed"]["applied"]
    assert applied["cpu"]["transformer"]["quantized_layers"] == len(blocks)  # before the move to a card
    assert applied["cpu"]["text_encoder"]["quantized_layers"] == len(text)
    assert "card" not in applied  # nothing left to do after the move
    frames = backend.generate(_job(seed=1), lambda s, n: None)
    assert frames.shape == (5, 32, 32, 3) and frames.dtype == np.uint8
    out, eager = backend.denoise_once(0), eager_diffusers.denoise_once(0)
    drift = float((out - eager).norm() / eager.norm())
    assert 0 < drift < 0.05  # rounded weights: a little different, not another model


def test_diffusers_fp8_storage_keeps_block_weights_in_float8(tiny_diffusers, traced):
    import torch
    backend = _diffusers(tiny_diffusers, quantize="fp8_storage")
    blocks = _linears(backend.pipe.transformer.blocks)
    assert blocks and all(m.weight.dtype == torch.float8_e4m3fn for m in blocks)
    assert backend.load_info["speed"]["applied"]["cpu"]["transformer"]["quantized_layers"] >= len(blocks)
    frames = backend.generate(_job(seed=1), lambda s, n: None)
    assert frames.shape == (5, 32, 32, 3) and frames.dtype == np.uint8
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in blocks)  # computed in float32, stored in fp8
    # why compile with fp8_storage is refused: its casting hooks break dynamo's graph
    backend.pipe.transformer.blocks[0].compile(fullgraph=True)
    with pytest.raises(Exception, match="Parameter"):
        backend.denoise_once(0)


@pytest.mark.slow
def test_diffsynth_compile_blocks_compiles_each_block_whole(tiny_diffsynth, eager_diffsynth, traced):
    import torch
    eager = eager_diffsynth.denoise_once(0)
    backend = _diffsynth(tiny_diffsynth, compile="blocks")
    dit = backend.pipe.dit
    assert all(block._compiled_call_impl is not None for block in dit.blocks)
    assert dit._compiled_call_impl is None
    assert backend.load_info["speed"]["applied"]["dit"]["compiled_modules"] == len(dit.blocks) == 2
    out = backend.denoise_once(0)
    assert traced and torch.allclose(out, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("library", ["diffusers", "diffsynth"])
def test_compiled_blocks_are_compiled_once_for_every_job(tiny_diffusers, tiny_diffsynth, library):
    """Whole jobs through a compiled denoiser compile its blocks once, not per call: nothing the backend hooks
    onto a block may hold Python counters under compile (the step caches' counting hooks did, and a 14B on
    an H100 hit dynamo's recompile limit at its first forward)."""
    from torch._dynamo.utils import counters
    backend = _diffusers(tiny_diffusers, compile="blocks") if library == "diffusers" else \
        _diffsynth(tiny_diffsynth, compile="blocks")
    before = counters["stats"]["unique_graphs"]
    backend.generate(_job(seed=1), lambda s, n: None)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs - before == 1  # one graph for every block and call (the blocks are alike)
    backend.generate(_job(seed=2), lambda s, n: None)
    assert counters["stats"]["unique_graphs"] == graphs


def test_diffsynth_int8_and_fp8_storage_quantize_the_blocks(tiny_diffsynth, eager_diffsynth):
    """Cheap: the DiT's forward pass (what a denoising step runs) instead of whole jobs."""
    import torch
    eager = eager_diffsynth.denoise_once(0)

    def drift(backend) -> float:
        out = backend.denoise_once(0)
        assert out.shape == eager.shape and torch.isfinite(out).all()
        return float((out - eager).norm() / eager.norm())
    int8 = _diffsynth(tiny_diffsynth, quantize="int8")
    blocks = _linears(int8.pipe.dit.blocks)
    assert blocks and all(_is_torchao(m.weight) and "Int8" in type(m.weight).__name__ for m in blocks)
    assert not _is_torchao(int8.pipe.dit.head.head.weight)  # outside the blocks: untouched
    assert int8.load_info["speed"]["applied"]["dit"]["quantized_layers"] == len(blocks)
    assert 0 < drift(int8) < 0.05

    fp8 = _diffsynth(tiny_diffsynth, quantize="fp8_storage")
    blocks = _linears(fp8.pipe.dit.blocks)
    assert blocks and all(m.weight.dtype == torch.float8_e4m3fn for m in blocks)
    assert fp8.load_info["speed"]["applied"]["dit"]["quantized_layers"] == len(blocks)
    assert 0 < drift(fp8) < 0.05  # computed in float32 from fp8-rounded weights
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in blocks)  # back to fp8 after each call


def test_diffsynth_attention_math_runs_sdpa_on_the_math_kernel(tiny_diffsynth, sdpa_kernels, monkeypatch):
    from diffsynth.models import wan_video_dit
    # DiffSynth's own kernels, as where flash-attn or SageAttention is installed: a chosen kernel turns them off
    for flag in ("FLASH_ATTN_3_AVAILABLE", "FLASH_ATTN_2_AVAILABLE", "SAGE_ATTN_AVAILABLE"):
        monkeypatch.setattr(wan_video_dit, flag, True)
    backend = _diffsynth(tiny_diffsynth, attention="math")
    assert not (wan_video_dit.FLASH_ATTN_3_AVAILABLE or wan_video_dit.FLASH_ATTN_2_AVAILABLE
                or wan_video_dit.SAGE_ATTN_AVAILABLE)
    assert backend.load_info["speed"] == {"compile": "none", "attention": "math", "quantize": "none"}
    sdpa_kernels.clear()
    backend.denoise_once(0)
    assert sdpa_kernels and set(sdpa_kernels) == {(False, False, False, True)}
    sdpa_kernels.clear()
    backend.generate(_job(seed=1), lambda s, n: None)
    assert sdpa_kernels and set(sdpa_kernels) == {(False, False, False, True)}


# --------------------------------------------------------------------------------------------------
# 4. one compile cache per machine, one first call at a time


def test_use_compile_cache_sets_inductors_folder_over_an_inherited_one(tmp_path, monkeypatch):
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE"):
        monkeypatch.setenv(name, "")  # recorded, so that what the code sets is undone after the test
        monkeypatch.delenv(name)
    folder = compile_cache_dir(tmp_path / "out")
    assert folder == tmp_path / "out" / ".sweep" / "compile_cache" / socket.gethostname()
    assert use_compile_cache(folder) == folder and folder.is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder)
    assert os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] == os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] == "1"

    # an inherited value (importing diffusers' attention dispatch writes torch's per-user default into
    # the environment) is replaced: the sweep's workers share the sweep's cache
    inherited = tmp_path / "torchinductor_root"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(inherited))
    monkeypatch.setenv("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
    assert use_compile_cache(folder) == folder and not inherited.exists()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder)
    assert os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "0"  # a user's switch of the FX cache is kept


HOLDER = """
import sys, time
from pathlib import Path
from orchestrator.speed import first_call_lock
folder = Path(sys.argv[1])
with first_call_lock(folder):
    print("holding", flush=True)
    time.sleep(1.0)
    (folder / "done").write_text("compiled")
"""


def test_first_call_lock_makes_the_next_worker_wait(tmp_path):
    with first_call_lock(None) as waited:  # no compile: no lock
        assert waited == 0.0
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with first_call_lock(tmp_path) as waited:
            assert (tmp_path / "done").read_text() == "compiled"  # the other one finished first
        assert waited > 0
        assert holder.wait(timeout=PATIENCE_S) == 0
    finally:
        holder.kill()
        holder.wait()
    with first_call_lock(tmp_path) as waited:  # free again
        assert (tmp_path / "first_call.lock").exists()


@pytest.mark.slow
def test_a_compiling_sweeps_workers_share_the_cache_and_record_their_first_call(write_manifest, tmp_path,
                                                                               monkeypatch):
    # importing diffusers' attention_dispatch (earlier tests, in this process) sets torch's default
    # TORCHINDUCTOR_CACHE_DIR in os.environ, which the workers inherit: the sweep's cache still wins
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inherited"))
    path = write_manifest(synthetic_manifest(speed={"compile": "blocks"}, resources={"cpu_slots": 2},
                                             seeds=[1, 2, 3]))
    result = cli("run", str(path), "--executor", "local", "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / "out"
    cache = out / ".sweep" / "compile_cache" / socket.gethostname()
    assert (cache / "first_call.lock").is_file()
    for log in ("cpu0_worker0.log", "cpu1_worker0.log"):
        text = (out / "logs" / log).read_text(encoding="utf-8")
        assert f"compiled kernels are cached in {cache} for this machine's workers" in text
        assert "speed: compile blocks, attention auto, quantize none" in text

    sidecars = {}
    for video in _mp4s(out):
        sidecar = json.loads(video.with_suffix(".json").read_text(encoding="utf-8"))
        sidecars[sidecar["job_id"]] = sidecar
        assert sidecar["model"]["speed"] == {"compile": "blocks", "attention": "auto", "quantize": "none"}
    assert len(sidecars) == 9
    jobs_by_worker: dict[str, list[str]] = {}
    for attempt in Ledger(out / ".sweep" / "ledger.sqlite").attempts():  # in the order they started
        assert attempt["outcome"] == "done"
        jobs_by_worker.setdefault(attempt["worker"], []).append(attempt["job_id"])
    assert jobs_by_worker
    for worker, jobs in jobs_by_worker.items():
        first = sidecars[jobs[0]]
        assert first["worker"] == worker
        assert set(first["first_call"]) >= {"waited_for_other_worker_seconds", "generate_seconds"}
        assert first["first_call"]["waited_for_other_worker_seconds"] >= 0
        assert not any("first_call" in sidecars[job] for job in jobs[1:])
    assert sum("first_call" in s for s in sidecars.values()) == len(jobs_by_worker)


# --------------------------------------------------------------------------------------------------
# 5-7. plan, models fit, models speed


def test_plan_prints_the_speed_line(write_manifest):
    path = write_manifest(synthetic_manifest(speed={"compile": "blocks", "quantize": "int8"}))
    result = cli("plan", str(path))
    assert result.returncode == 0, result.stderr
    assert ("\nspeed      compile blocks, attention auto, quantize int8  (quantize is part of each job's "
            "identity)\n") in result.stdout
    path = write_manifest(synthetic_manifest(speed={"compile": "full", "attention": "math"}))
    result = cli("plan", str(path))
    assert result.returncode == 0, result.stderr
    assert "\nspeed      compile full, attention math, quantize none\n" in result.stdout


def test_models_fit_offers_8_bit_weights_through_speed(tmp_path, write_manifest, tiny_diffusers, tiny_diffsynth):
    from orchestrator.checkpoints.fit import BACKEND_STRATEGIES, _backend_entry

    from .test_checkpoints import sparse_diffusers
    folder = sparse_diffusers(tmp_path / "w14", "wan-14b")  # Wan2.1-14B's shapes, sparse: no weights
    result = cli("models", "fit", str(folder), "--gpu", "24GB", "--gpu", "80GB")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"\n8-bit weights .* speed \{quantize: int8\}\n", out)  # the table's diffusers column
    assert re.search(r"\n8-bit \+ model offload .* model\.options \{offload: model\} \+ speed \{quantize: int8\}\n", out)
    small, _, large = out.partition("\n80 GB card ×1: use")
    small = small.partition("\n24 GB card ×1: use")[2]
    # a 14B model on a 24 GB card: the exact strategy first, the faster 8-bit one beside it
    assert small.startswith(" block offload")
    assert "also fits: 8-bit + model offload" in small and "with speed: {quantize: int8} and model.options " \
        "{offload: model}" in small
    assert large.startswith(" whole model on one card") and "speed:" not in large

    # every 8-bit strategy a backend is told to use passes that backend's own check
    assert _backend_entry("diffusers", "int8", 1)[2] == {"quantize": "int8"}
    assert _backend_entry("diffusers", "whole", 1)[2] == {}
    checkpoints = {"diffusers": tiny_diffusers, "diffsynth": tiny_diffsynth}
    for backend, checkpoint in checkpoints.items():
        for strategy in ("int8", "int8_offload"):
            if BACKEND_STRATEGIES[backend].get(strategy) is None:
                continue
            options, _, speed = _backend_entry(backend, strategy, 1)
            data = (_diffusers_manifest if backend == "diffusers" else _diffsynth_manifest)(checkpoint, speed, **options)
            assert load_manifest(write_manifest(data)).model.speed.quantize == "int8"


@pytest.mark.slow
def test_models_speed_compares_int8_with_eager(write_manifest, tmp_path, tiny_diffusers):
    path = write_manifest(_diffusers_manifest(tiny_diffusers, {}))
    result = cli("models", "speed", str(path), "--try", "quantize=int8", "--steps", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["candidate", "s/step"])
    end = next((i for i in range(header + 1, len(lines)) if not lines[i].strip()), len(lines))
    rows = {line.split()[0]: line for line in lines[header + 1:end]}
    assert set(rows) == {"eager", "quantize=int8"}, result.stdout
    assert "failed" not in rows["eager"] + rows["quantize=int8"], result.stdout
    assert "0.00%" in rows["eager"] and rows["eager"].rstrip().endswith("identical")
    drift = float(re.search(r"(\d+\.\d+)%", rows["quantize=int8"]).group(1))
    assert drift > 0, rows["quantize=int8"]
    assert "  speed: {quantize: int8}" in result.stdout or "  (no speed: section; eager was fastest)" in result.stdout
    work = tmp_path / "out" / ".sweep" / "speed_trial"
    eager, int8 = np.load(work / "eager" / "denoiser_out.npy"), np.load(work / "quantize-int8" / "denoiser_out.npy")
    assert eager.shape == int8.shape == (1, 16, 2, 4, 4) and not np.array_equal(eager, int8)
    assert np.load(work / "quantize-int8" / "frames.npy").shape == (5, 32, 32, 3)
    # each candidate's own log, written as it ran, with the time of each phase
    trial_log = (work / "quantize-int8" / "trial.log").read_text()
    for phase in ("loading ", "loaded in ", "the short job (2 steps)"):
        assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO .*" + re.escape(phase), trial_log, re.M), trial_log


def test_a_failed_candidates_message_does_not_widen_the_table(write_manifest):
    """Seen on the H200: a failed candidate's long message set the s/step column's width, pushing every
    other column far to the right."""
    from orchestrator.speed_trial import format_trials
    from orchestrator.validation import load_manifest
    manifest = load_manifest(write_manifest(synthetic_manifest()))
    ok = {"label": "eager", "speed": {}, "seconds_per_step": 1.21, "seconds_per_video": 63.9}
    failed = {"label": "compile=blocks", "speed": {}, "error": "exit 1: " + "NonFiniteFrames " * 12}
    lines = format_trials([ok, failed], manifest).splitlines()
    header = next(line for line in lines if line.split()[:2] == ["candidate", "s/step"])
    eager = next(line for line in lines if line.split()[:1] == ["eager"])
    assert header.index("s/video") < 40 and eager.index("63.9") == header.index("s/video")
    assert any(line.split()[:2] == ["compile=blocks", "failed:"] for line in lines)


def test_models_speed_refuses_a_bad_candidate(write_manifest, tmp_path, tiny_diffusers):
    path = write_manifest(_diffusers_manifest(tiny_diffusers, {}))
    result = cli("models", "speed", str(path), "--try", "compile=fast")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "candidate `compile=fast`: compile 'fast' is not one of none, blocks, full" in result.stderr
    assert not (tmp_path / "out").exists()


def test_frames_that_are_not_finite_fail_the_job_instead_of_becoming_a_black_video(tiny_diffusers):
    """A numerical failure (seen with fp8 on the GPU) must not be written as a black mp4 that counts as
    done: the backend raises, the worker records a failed attempt."""
    from orchestrator.backend import NonFiniteFrames
    backend = _diffusers(tiny_diffusers, quantize="int8")
    backend.pipe.transformer.register_forward_hook(lambda module, args, output: (output[0] * float("nan"),))
    with pytest.raises(NonFiniteFrames, match="NaN or infinite values with speed settings .*quantize int8"):
        backend.generate(_job(), lambda step, steps: None)


def test_fp8_leaves_the_cross_attentions_text_projections_in_full_precision(tiny_diffusers, tiny_diffsynth):
    """The layers that read the text context (512 tokens: fp8 buys nothing there) keep the model's dtype;
    the rest are fp8."""
    import torch

    from orchestrator.speed import fp8_layers

    def split(block):
        linears = [(n, m) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
        return ({n for n, m in linears if fp8_layers(m, n)}, {n for n, m in linears if not fp8_layers(m, n)})

    fp8, kept = split(_diffusers(tiny_diffusers).pipe.transformer.blocks[0])
    assert kept == {"attn2.to_k", "attn2.to_v"}
    assert {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q", "ffn.net.2"} <= fp8
    fp8, kept = split(_diffsynth(tiny_diffsynth).pipe.dit.blocks[0])
    assert kept == {"cross_attn.k", "cross_attn.v"}
    assert {"self_attn.q", "self_attn.k", "cross_attn.q", "cross_attn.o", "ffn.0", "ffn.2"} <= fp8


def test_fp8_gives_zero_activation_rows_a_scale_above_zero():
    """torchao's per-row scale of a row of zeros is 0 and the row becomes 0/0 = NaN (DiffSynth's frames
    on the H200, bench/gpu_fp8_zero_rows.py): the config the product quantizes with floors it, per row and
    only for activations (the weights' scales are their own)."""
    from torchao.quantization import PerRow

    from orchestrator.speed import fp8_config
    config = fp8_config()
    assert config.activation_value_lb and config.activation_value_lb > 0
    assert config.granularity == PerRow() or all(g == PerRow() for g in config.granularity)


def test_a_failed_compiling_first_call_leaves_hang_detection_on(tmp_path):
    """While the first call compiles, heartbeats go on without steps (`pulse.loading`); a first call
    that fails must switch that off again, or a later hang would never be noticed."""
    import logging

    from orchestrator.job_loop import JobLoop, SlotBackend
    from orchestrator.planning import WorkerSpec

    from .conftest import ListJobSource

    class Failing:  # a backend whose every call fails (e.g. compiling ran out of memory)
        name, attempt = "failing", 1
        load_info: dict = {}

        def generate(self, job, progress):
            raise RuntimeError("compile failed")

        def prepare(self, job):
            pass

    from orchestrator.manifest import Execution
    spec = WorkerSpec(sweep="s", worker="w0", devices=(), queue="cpu0", ledger="", output_dir=str(tmp_path),
                      log="", model=ModelConfig(backend="synthetic", task="t2v"),
                      generation=GenerationConfig(num_frames=5, fps=5), execution=Execution())
    source = ListJobSource([_job(seed=1), _job(seed=2)])
    loop = JobLoop(source, spec, logging.getLogger("test"))
    backends = SlotBackend(lambda model: Failing(), None, loop.log)
    backends.open()
    assert loop.run(backends, [], compile_cache=str(tmp_path / "cache")) == "finished"
    assert len(source.failed) == 2 and loop.pulse.loading is False
    loop.close()


# --------------------------------------------------------------------------------------------------
# issue 28: `models speed` on a card without fp8, or without a GPU

A800 = "NVIDIA A800-SXM4-80GB:80:0"  # compute capability 8.0: no fp8 tensor cores


def test_models_speed_refuses_a_candidate_run_would_refuse_before_loading(write_manifest, tmp_path, tiny_diffusers):
    path = write_manifest(_diffusers_manifest(tiny_diffusers, {}))
    result = cli("models", "speed", str(path), "--try", "quantize=fp8", env={FAKE_GPUS: A800})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "candidate `quantize=fp8`: speed.quantize fp8 needs fp8 tensor cores" in result.stderr
    assert "A800" in result.stderr and "use quantize: int8 or fp8_storage" in result.stderr
    assert "trying" not in result.stdout and not (tmp_path / "out").exists()  # nothing was loaded


def test_models_speed_says_why_fp8_is_left_out_and_prints_figures_rounded(write_manifest, tiny_diffusers,
                                                                          monkeypatch, capsys):
    from orchestrator import cli as command_line, speed_trial
    monkeypatch.setenv(FAKE_GPUS, A800)
    path = write_manifest(_diffusers_manifest(tiny_diffusers, {}))
    tried = []

    def trial(manifest, speed, folder, steps, fresh_cache, timeout_s):  # what a candidate's process reports
        tried.append(speed_trial.label(speed))
        return {"load_seconds": 1.23456789, "first_call_seconds": 12.3456789, "seconds_per_forward": 0.0123456789,
                "denoiser_output_finite": True, "seconds_per_step": 0.987654321, "job_seconds": 3.14159265,
                "seconds_per_video": 50.1, "steps_per_video": 50, "peak_memory_bytes": None,
                "frames_mean_std": [127.5, 3.25], "device": None,
                "attention_guard": {"kernel": "cudnn", "version": "torch 2.14.1", "error": 0.00213, "bound": 0.02}}
    monkeypatch.setattr(speed_trial, "_trial_process", trial)
    assert command_line.main(["models", "speed", str(path)]) == 0
    out = capsys.readouterr().out
    assert tried == ["eager", "compile=blocks"]
    assert "compile=blocks,quantize=fp8 is left out of the defaults: speed.quantize fp8 needs fp8 tensor cores" in out
    # SageAttention 2 is a default candidate where it is installed; here it is not, and the line says so
    assert "attention=sage is left out of the defaults: speed.attention `sage` cannot run here" in out
    assert "eager: cudnn (torch 2.14.1): error 0.0021 ≤ 0.02" in out  # each candidate's kernel, as guarded
    assert not re.search(r"\.\d{5,}", out), out  # no raw floats
    assert "0.988 s/step" in out and "load 1.2s" in out
    assert "this machine's card" not in out and "on this machine's CPU (no GPU)" in out, out


# --------------------------------------------------------------------------------------------------
# issue 31: `models speed` tries step caches


def _cache_manifest(checkpoint) -> dict:
    """Six steps with guidance: enough for a cache to reuse some (each step is two denoiser calls)."""
    data = _diffusers_manifest(checkpoint, {})
    data["generation"] = {**GEN, "steps": 6, "cfg_scale": 5.0}
    return data


def test_cache_candidates_are_read_in_either_spelling():
    from orchestrator.speed_trial import TrialError, cache_manifest_text, label, parse_candidate
    short, canonical = parse_candidate("cache=first_block:0.05"), parse_candidate("cache=first_block:threshold=0.05")
    assert short == canonical == SpeedConfig(cache="first_block:threshold=0.05")
    assert label(short) == "cache=first_block:0.05" and parse_candidate(label(short)) == short
    taylor = parse_candidate("cache=taylorseer")
    assert taylor.cache == "taylorseer:interval=5,warmup=3,order=1" and label(taylor) == "cache=taylorseer"
    # a cache's further options follow it after commas, and another key after them
    mixed = parse_candidate("cache=taylorseer:interval=4,warmup=2,quantize=int8")
    assert mixed == SpeedConfig(quantize="int8", cache="taylorseer:interval=4,warmup=2,order=1")
    assert parse_candidate(label(mixed)) == mixed
    assert cache_manifest_text(mixed.cache) == "{taylorseer: {interval: 4, warmup: 2}}"
    assert cache_manifest_text(short.cache) == "{first_block: 0.05}" and cache_manifest_text(taylor.cache) == "taylorseer"
    for text, words in (("cache=first_block:2", "out of range: use a number from 0.0 to 1.0"),
                        ("cache=teacup", "'teacup' is not one of none, first_block"),
                        ("cache=taylorseer:interval=2.5", "interval '2.5' is out of range"),
                        ("cache=first_block:speed=1", "has no option 'speed'")):
        with pytest.raises(TrialError, match=re.escape(words)):
            parse_candidate(text)


@pytest.mark.parametrize("candidate, words", [
    ("compile=blocks,cache=taylorseer", "torch.compile cannot trace"),
    ("cache=teacache:0.05", "not a cache of the diffusers backend"),
    ("cache=faster_cache", "with guidance (cfg_scale 5.0)"),
])
def test_models_speed_refuses_a_cache_candidate_before_loading(write_manifest, tmp_path, tiny_diffusers,
                                                               candidate, words):
    path = write_manifest(_cache_manifest(tiny_diffusers))
    result = cli("models", "speed", str(path), "--try", candidate)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"candidate `{candidate}`: " in result.stderr and words in result.stderr, result.stderr
    assert "Nothing was measured" in result.stderr
    assert "trying" not in result.stdout and not (tmp_path / "out").exists()  # nothing was loaded


def test_the_cache_caveat_and_columns_are_printed_once(write_manifest):
    from orchestrator.speed_trial import CACHE_CAVEAT, format_trials
    manifest = load_manifest(write_manifest(synthetic_manifest()))
    eager = {"label": "eager", "speed": {"cache": "none"}, "seconds_per_step": 1.0, "seconds_per_video": 4.0,
             "whole_job_seconds": 4.0, "whole_job_steps": 4}
    cached = {"label": "cache=taylorseer", "speed": {"cache": "taylorseer:interval=5,warmup=3,order=1"},
              "seconds_per_step": 0.5, "seconds_per_video": 2.0, "whole_job_seconds": 2.0, "whole_job_steps": 4,
              "reuse": {"calls": 8, "calls_reused": 2}, "frames_psnr_db": 31.0}
    text = format_trials([eager, cached], manifest)
    assert text.count(CACHE_CAVEAT) == 1 and "random weights" in CACHE_CAVEAT
    lines = text.splitlines()
    header = next(line for line in lines if line.split()[:1] == ["candidate"])
    row = next(line for line in lines if line.startswith("  cache=taylorseer"))
    assert row[header.index("whole job"):].startswith("2.0s (2.00x)")
    assert row[header.index("calls reused"):].startswith("2/8")
    assert "  speed: {cache: taylorseer}" in text
    # without a cache candidate: neither the columns nor the caveat
    plain = format_trials([eager, {**cached, "label": "compile=blocks", "speed": {"compile": "blocks"}}], manifest)
    assert "calls reused" not in plain and CACHE_CAVEAT not in plain


@pytest.mark.slow
def test_models_speed_times_a_cache_over_a_whole_job(write_manifest, tmp_path, tiny_diffusers):
    path = write_manifest(_cache_manifest(tiny_diffusers))
    result = cli("models", "speed", str(path), "--try", "cache=first_block:1.0",
                 "--try", "cache=taylorseer:interval=2,warmup=1")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "eager and the cached ones run a whole job of 6 steps" in out
    assert out.count("on random weights the adaptive methods' skip decisions") == 1, out
    lines = out.splitlines()
    header = next(line for line in lines if line.split()[:1] == ["candidate"])
    start = lines.index(header) + 1
    rows = {line.split()[0]: line for line in lines[start:lines.index("", start)]}
    assert set(rows) == {"eager", "cache=first_block:1.0", "cache=taylorseer:interval=2,warmup=1"}, out
    reused = {name: row[header.index("calls reused"):].split()[0] for name, row in rows.items()}
    assert reused["eager"] == "-"
    # TaylorSeer's fixed schedule: 1 full step, then one in every 2 (6 steps × 2 guidance passes)
    assert reused["cache=taylorseer:interval=2,warmup=1"] == "6/12"
    done, calls = map(int, reused["cache=first_block:1.0"].split("/"))
    assert calls == 12 and done > 0
    for name in ("cache=first_block:1.0", "cache=taylorseer:interval=2,warmup=1"):
        assert re.search(r"\d+\.\ds \(\d+\.\d\dx\)", rows[name][header.index("whole job"):]), rows[name]
        assert "identical" not in rows[name]  # reused steps change the frames a little: a PSNR, not "identical"
    work = tmp_path / "out" / ".sweep" / "speed_trial"
    assert np.load(work / "eager" / "frames_whole.npy").shape == (5, 32, 32, 3)
    assert not (work / "cache-first_block:1.0" / "frames.npy").exists()  # no short job with a cache
    trial_log = (work / "cache-first_block:1.0" / "trial.log").read_text()
    assert "warm-up: the short job (4 steps) without the cache" in trial_log and "the whole job (6 steps" in trial_log
