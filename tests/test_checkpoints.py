"""Checkpoints: layouts, header-only verification, `models status/fit/download`, `run` refusing a broken
checkpoint, and `load_components`.

Checkpoints here are built in a temporary folder: a tiny random diffusers one (`build_random_wan`),
small original-Wan ones (safetensors shards + index, torch.save .pth files, a tokenizer folder), and
real-size ones as SPARSE files: each safetensors header is real (names, dtypes, shapes of a Wan 1.3B or
14B model, taken from the models built on the meta device) and the data is a hole, so a 28 GB file
costs no disk and reads as zeros. Nothing here downloads; the hub is unreachable on this machine, so
`download` is tested on its error paths only.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest

from orchestrator import checkpoints
from orchestrator.checkpoints import loading
from orchestrator.checkpoints import (CheckpointError, Settings, estimate, load_components, parse_gpu,
                                      parts, verify)

from .conftest import (PATIENCE_S, ROOT, LazyModule, cli, cli_into_closed_pipe, skip_module_without,
                       synthetic_manifest)

skip_module_without("torch", "diffusers")
torch = LazyModule("torch")  # imported by the first test that uses it, not at collection


def save_file(tensors, filename):
    from safetensors.torch import save_file as save  # imports torch
    return save(tensors, filename)

H100_PEAK = 12_631_146_496  # docs/benchmarks.md, "GPU sizing": Wan-1.3B-sized pipeline, 832×480×81, bf16


# --------------------------------------------------------------------------------------------------
# Builders


def write_sparse_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str = "BF16") -> None:
    """A safetensors file with a real header and a hole for its data (sparse: no disk, reads as zeros)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = checkpoints.ST_BYTES[dtype]
        for d in shape:
            size *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as stream:
        stream.write(struct.pack("<Q", len(raw)))
        stream.write(raw)
        stream.truncate(8 + len(raw) + offset)


def shapes_of(module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def sparse_diffusers(folder: Path, size: str) -> Path:
    """A diffusers checkpoint of real shapes (wan-1.3b: the H100 benchmark's; wan-14b: Wan2.1-14B's DiT
    and the full umt5-xxl), sparse."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from orchestrator.demo.random_checkpoints import SIZES, VOCAB
    spec = dict(SIZES["wan-1.3b"])
    text, vocab = dict(spec["text"]), len(VOCAB)
    if size == "wan-14b":
        spec["transformer"] = dict(spec["transformer"], num_attention_heads=40, ffn_dim=13824, num_layers=40)
        text.update(num_layers=24)
        vocab = 256384
    with torch.device("meta"):
        transformer = WanTransformer3DModel(**spec["transformer"])
        vae = AutoencoderKLWan(**spec["vae"])
        encoder = UMT5EncoderModel(UMT5Config(vocab_size=vocab, pad_token_id=0, eos_token_id=1,
                                              decoder_start_token_id=0, is_encoder_decoder=False, **text))
    write_sparse_safetensors(folder / "transformer" / "diffusion_pytorch_model.safetensors", shapes_of(transformer))
    write_sparse_safetensors(folder / "vae" / "diffusion_pytorch_model.safetensors", shapes_of(vae))
    tied = {k: v for k, v in shapes_of(encoder).items() if k != "encoder.embed_tokens.weight"}  # saved once
    write_sparse_safetensors(folder / "text_encoder" / "model.safetensors", tied)
    (folder / "transformer" / "config.json").write_text(json.dumps(dict(transformer.config)), encoding="utf-8")
    (folder / "vae" / "config.json").write_text(json.dumps(dict(vae.config)), encoding="utf-8")
    (folder / "text_encoder" / "config.json").write_text("{}", encoding="utf-8")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"], "text_encoder": ["transformers", "UMT5EncoderModel"],
        "transformer_2": [None, None]}), encoding="utf-8")
    return folder


def dit_tensors(hidden=32, ffn=48, layers=2, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    tensors = {"patch_embedding.weight": torch.randn(hidden, 16, 1, 2, 2, generator=g, dtype=torch.bfloat16),
               "head.head.weight": torch.randn(64, hidden, generator=g, dtype=torch.bfloat16)}
    for i in range(layers):
        tensors[f"blocks.{i}.self_attn.q.weight"] = torch.randn(hidden, hidden, generator=g, dtype=torch.bfloat16)
        tensors[f"blocks.{i}.ffn.0.weight"] = torch.randn(ffn, hidden, generator=g, dtype=torch.bfloat16)
        tensors[f"blocks.{i}.ffn.2.weight"] = torch.randn(hidden, ffn, generator=g, dtype=torch.bfloat16)
        tensors[f"blocks.{i}.norm3.weight"] = torch.ones(hidden, dtype=torch.float32)
    return tensors


def write_sharded(folder: Path, tensors: dict, shards: int = 2) -> None:
    """diffusion_pytorch_model-0000i-of-0000n.safetensors + the index, as Wan's releases have them."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[i::shards]}
        save_file(part, str(folder / file))
        weight_map.update({n: file for n in part})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}), encoding="utf-8")
    (folder / "config.json").write_text(json.dumps({"dim": 32, "ffn_dim": 48, "num_layers": 2}), encoding="utf-8")


def write_wan_extras(root: Path) -> None:
    """The text encoder and VAE as torch.save files, and the tokenizer folder, as in a Wan release."""
    g = torch.Generator().manual_seed(1)

    def state_dict(**tensors):  # what `torch.save(module.state_dict())` pickles: an OrderedDict with _metadata
        out = OrderedDict(tensors)
        out._metadata = OrderedDict({"": {"version": 1}})
        return out
    torch.save(state_dict(**{"token_embedding.weight": torch.randn(100, 32, generator=g, dtype=torch.bfloat16),
                             "blocks.0.ffn.fc1.weight": torch.randn(64, 32, generator=g, dtype=torch.bfloat16)}),
               root / "models_t5_umt5-xxl-enc-bf16.pth")
    torch.save(state_dict(**{"decoder.head.2.weight": torch.randn(3, 8, 3, 3, 3, generator=g),
                             "decoder.head.2.bias": torch.zeros(3)}), root / "Wan2.1_VAE.pth")
    tokenizer = root / "google" / "umt5-xxl"
    tokenizer.mkdir(parents=True)
    (tokenizer / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    (tokenizer / "tokenizer.json").write_text("{}", encoding="utf-8")


@pytest.fixture(scope="module")
def tiny(random_wan) -> Path:
    return random_wan("t2v")  # built once per session (conftest); tiny_copy to change it


@pytest.fixture
def wan21(tmp_path) -> Path:
    root = tmp_path / "Wan2.1-T2V-tiny"
    write_sharded(root, dit_tensors())
    write_wan_extras(root)
    return root


@pytest.fixture
def wan22(tmp_path) -> Path:
    root = tmp_path / "Wan2.2-T2V-A14B-tiny"
    write_sharded(root / "high_noise_model", dit_tensors(seed=1))
    write_sharded(root / "low_noise_model", dit_tensors(seed=2))
    write_wan_extras(root)
    return root


@pytest.fixture
def tiny_copy(tiny, tmp_path) -> Path:
    return Path(shutil.copytree(tiny, tmp_path / "copy"))


# --------------------------------------------------------------------------------------------------
# Layouts and status


def test_every_layout_is_recognised_with_sizes_and_dtypes(tiny, wan21, wan22, tmp_path):
    single = tmp_path / "wan2.1_t2v_bf16.safetensors"
    save_file(dit_tensors(), str(single))
    seen = {}
    for path in (tiny, wan21, wan22, single):
        checkpoint = verify(path)
        seen[checkpoint.layout] = {c.name: c for c in checkpoint.components}
    assert set(seen) == {"diffusers", "wan", "single-file"}
    assert set(seen["diffusers"]) == {"scheduler", "text_encoder", "tokenizer", "transformer", "vae"}
    assert seen["diffusers"]["transformer"].params == 28328 and seen["diffusers"]["transformer"].dtypes.keys() == {"F32"}
    dit = verify(wan21).component("transformer")
    assert len(dit.files) == 2 and dit.params == sum(t.numel() for t in dit_tensors().values())
    assert checkpoints.dtype_summary(dit.dtypes).startswith("BF16 (+ F32")
    a14b = {c.name: c for c in verify(wan22).components}
    assert {"high_noise_model", "low_noise_model", "text_encoder", "vae", "tokenizer"} <= set(a14b)
    assert a14b["text_encoder"].dtypes.keys() == {"BF16"} and a14b["vae"].dtypes.keys() == {"F32"}  # from the .pth
    assert a14b["text_encoder"].params == 100 * 32 + 64 * 32

    result = cli("models", "status", str(wan22))
    assert result.returncode == 0, result.stderr
    assert "Wan 2.2 two experts" in result.stdout and "high_noise_model/" in result.stdout
    assert "complete: every file the indexes name is present" in result.stdout


@pytest.mark.parametrize("damage, named, says", [
    ("missing shard", "diffusion_pytorch_model-00002-of-00002.safetensors",
     "missing (named by diffusion_pytorch_model.safetensors.index.json)"),
    ("truncated shard", "diffusion_pytorch_model-00001-of-00002.safetensors", "truncated: "),
    ("index names an absent file", "diffusion_pytorch_model-00003-of-00003.safetensors", "missing (named by"),
    ("truncated pth", "Wan2.1_VAE.pth", "not a readable torch.save archive"),
    ("empty pth", "models_t5_umt5-xxl-enc-bf16.pth", "empty file"),
    ("corrupt header", "diffusion_pytorch_model-00001-of-00002.safetensors", "truncated or not a safetensors file"),
    ("no tokenizer", "google/umt5-xxl/", "missing or empty"),
])
def test_a_broken_wan_checkpoint_names_the_file(wan21, damage, named, says):
    shard1 = wan21 / "diffusion_pytorch_model-00001-of-00002.safetensors"
    if damage == "missing shard":
        (wan21 / named).unlink()
    elif damage == "truncated shard":
        os.truncate(shard1, shard1.stat().st_size - 100)
    elif damage == "index names an absent file":
        index = wan21 / "diffusion_pytorch_model.safetensors.index.json"
        data = json.loads(index.read_text())
        data["weight_map"]["blocks.0.extra.weight"] = named
        index.write_text(json.dumps(data))
    elif damage == "truncated pth":
        os.truncate(wan21 / named, (wan21 / named).stat().st_size // 2)
    elif damage == "empty pth":
        os.truncate(wan21 / named, 0)
    elif damage == "corrupt header":
        with open(shard1, "r+b") as stream:
            stream.write(struct.pack("<Q", 1 << 40))
    elif damage == "no tokenizer":
        shutil.rmtree(wan21 / "google")
    with pytest.raises(CheckpointError) as error:
        verify(wan21)
    text = str(error.value)
    assert f"{named}: {says}" in text and "fix: download it again" in text
    result = cli("models", "status", str(wan21))
    assert result.returncode == 2 and f"{named}: {says}" in result.stderr and "BROKEN" in result.stdout


def test_a_broken_diffusers_or_two_expert_checkpoint_names_the_file(tiny_copy, wan22):
    shutil.rmtree(tiny_copy / "transformer")
    with pytest.raises(CheckpointError, match=r"transformer/: missing: model_index.json names component `transformer`"):
        verify(tiny_copy)
    shutil.rmtree(wan22 / "low_noise_model")
    with pytest.raises(CheckpointError, match=r"low_noise_model/: missing: a Wan 2.2 A14B checkpoint has both experts"):
        verify(wan22)


def test_a_lacking_tensor_and_a_foreign_pickle_are_caught_and_nothing_runs(wan21, tmp_path):
    index = wan21 / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["blocks.9.ghost.weight"] = "diffusion_pytorch_model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor\(s\) that diffusion_pytorch_model.safetensors.index.json"):
        verify(wan21)

    class Boom:  # a pickle that would run a command if it were unpickled normally
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))
    evil = tmp_path / "evil.pth"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"w": Boom()}, protocol=2))
    assert verify(evil).layout == "single-file" and not (tmp_path / "ran").exists()


def test_wan_variants_a_safetensors_text_encoder_and_a_legacy_pth_are_accepted(wan21):
    t5 = wan21 / "models_t5_umt5-xxl-enc-bf16.pth"
    save_file({"token_embedding.weight": torch.zeros(100, 32, dtype=torch.bfloat16)}, str(t5.with_suffix(".safetensors")))
    t5.unlink()
    vae = wan21 / "Wan2.1_VAE.pth"
    torch.save({"decoder.head.2.weight": torch.zeros(3, 8, 3, 3, 3)}, vae, _use_new_zipfile_serialization=False)
    checkpoint = verify(wan21)
    assert checkpoint.component("text_encoder").where == "models_t5_umt5-xxl-enc-bf16.safetensors"
    assert any("legacy torch.save format" in note for note in checkpoint.notes)


def test_verification_reads_headers_not_weights(tmp_path):
    if not Path("/proc/self/io").exists():
        pytest.skip("needs /proc/self/io")
    folder = sparse_diffusers(tmp_path / "w13", "wan-1.3b")

    def read_chars() -> int:
        return int(next(line for line in open("/proc/self/io") if line.startswith("rchar")).split()[1])
    before = read_chars()
    checkpoint = verify(folder)
    read = read_chars() - before
    total = sum(c.disk_bytes for c in checkpoint.components)
    assert total > 3.8e9 and read < 2_000_000, (total, read)  # 3.9 GB checked by reading < 2 MB
    os.truncate(folder / "transformer" / "diffusion_pytorch_model.safetensors", 2_000_000_000)
    with pytest.raises(CheckpointError, match=r"transformer/diffusion_pytorch_model.safetensors: truncated: "
                                              r"2,000,000,000 bytes on disk, its header declares 2,838,"):
        verify(folder)


# --------------------------------------------------------------------------------------------------
# run and plan refuse an incomplete checkpoint


@pytest.mark.slow
def test_run_and_plan_refuse_a_broken_checkpoint_and_start_nothing(tiny_copy, write_manifest, tmp_path):
    broken = tiny_copy / "vae" / "diffusion_pytorch_model.safetensors"
    os.truncate(broken, broken.stat().st_size - 1000)
    path = write_manifest(synthetic_manifest(
        model={"backend": "diffusers", "task": "t2v", "path": str(tiny_copy), "dtype": "float32", "options": {}},
        resources={"cpu_slots": 1}))
    status = cli("models", "status", str(path))
    run = cli("run", str(path), "--executor", "local", "--no-progress")
    plan = cli("plan", str(path))
    for result in (status, run, plan):
        assert result.returncode == 2, result.stdout + result.stderr
        assert "vae/diffusion_pytorch_model.safetensors: truncated: " in result.stderr
    message = status.stderr.strip()
    assert message in run.stderr  # the same message
    assert "Nothing was started." in run.stderr
    assert not (tmp_path / "out").exists()  # no ledger, no logs, no workers


# --------------------------------------------------------------------------------------------------
# fit


CHILD = r"""
import json, sys, torch
from diffusers import WanPipeline
folder, width, height, frames = sys.argv[1], *map(int, sys.argv[2:5])
pipe = WanPipeline.from_pretrained(folder, torch_dtype=torch.float32)
pipe.set_progress_bar_config(disable=True)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
with torch.no_grad():
    before = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    pipe(prompt="a cat on a mat", height=height, width=width, num_frames=frames, num_inference_steps=2,
         guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="np")
    print(json.dumps({"peak_above": status("VmHWM") - before}))
"""
CPU_FACTOR = 1.5  # the estimate of the tiny pipeline's CPU working set must be within this factor


@pytest.mark.slow
def test_fit_estimate_matches_the_tiny_models_measured_cpu_peak(tiny):
    """The whole pipeline (text encoder, 2 steps with guidance, VAE decode) on the CPU: peak resident
    memory above the loaded model, against the estimate's largest working set (CPU constants)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs /proc/self/clear_refs")
    settings = Settings(256, 256, 17, "float32")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(tiny), "256", "256", "17"], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=PATIENCE_S)
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])["peak_above"]
    estimated = max(checkpoints.working_sets(parts(verify(tiny)), settings, gpu=False).values())
    assert 1 / CPU_FACTOR < estimated / measured < CPU_FACTOR, (estimated, measured)


def test_fit_estimate_matches_the_h100_figure_and_sizes_a_14b_model(tmp_path):
    w13 = parts(verify(sparse_diffusers(tmp_path / "w13", "wan-1.3b")))
    whole = estimate(w13, Settings(832, 480, 81, "bfloat16"), "whole")
    assert abs(whole.per_card / H100_PEAK - 1) < 0.03  # the recorded H100 peak per worker
    assert whole.weights == 2 * 1_935_885_875
    # fewer frames and a smaller picture need less; float32 needs more
    assert estimate(w13, Settings(480, 272, 33, "bfloat16"), "whole").per_card < whole.per_card
    assert estimate(w13, Settings(832, 480, 81, "float32"), "whole").per_card > whole.per_card

    w14 = parts(verify(sparse_diffusers(tmp_path / "w14", "wan-14b")))
    s = Settings(832, 480, 81, "bfloat16")
    by = {name: estimate(w14, s, name, 2).per_card / checkpoints.GIB for name in checkpoints.PREFERENCE}
    assert 26 < sum(p.params for p in w14 if p.role == "denoiser") * 2 / checkpoints.GIB < 27  # 14.3 B params
    assert by["whole"] > 45 and by["text_encoder_cpu"] < by["whole"] - 10  # umt5-xxl is 10.6 GiB
    assert by["device_map"] > 26  # a pipeline's device_map keeps the DiT whole on one card
    assert by["fsdp"] < by["device_map"] and by["int8"] < by["whole"] - 15
    assert by["block_offload"] < by["int8_offload"] < by["model_offload"] < by["whole"]


@pytest.mark.slow
def test_fit_cli_says_what_fits_on_named_and_fake_gpus(tmp_path):
    folder = sparse_diffusers(tmp_path / "w14", "wan-14b")
    result = cli("models", "fit", str(folder), "--gpu", "24GB", "x2", "--gpu", "80GB")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "24 GB card ×2 (24.0 GiB)" in out and "80 GB card ×1 (80.0 GiB)" in out
    assert "80 GB card ×1: use whole model on one card" in out  # 14B fits whole on an 80 GB card
    assert "24 GB card ×2: use block offload" in out and "options: {offload: group}" in out
    assert "also fits: 8-bit + model offload" in out  # faster, with speed: {quantize: int8}, named second
    assert "speed: {quantize: int8}" in out
    fake = cli("models", "fit", str(folder), env={"ORCHESTRATOR_FAKE_GPUS": "FAKE RTX 3090:24:1;FAKE RTX 3090:24:0"})
    assert fake.returncode == 0 and "FAKE RTX 3090 ×2 (23.0 GiB)" in fake.stdout, fake.stderr
    before = cli("models", "fit", "--gpu", "24GB", "x2", str(folder))  # the path after the --gpu words
    assert before.returncode == 0 and "24 GB card ×2: use block offload" in before.stdout, before.stderr
    bad = cli("models", "fit", str(folder), "--gpu", "lots")
    assert bad.returncode == 2 and "cannot read GPU 'lots'" in bad.stderr
    piped = cli_into_closed_pipe("models", "fit", str(folder), "--gpu", "80GB")  # `models fit … | head`
    assert piped.returncode == 141 and "Traceback" not in piped.stderr and "BrokenPipe" not in piped.stderr


def test_gpu_specs_parse():
    gib = checkpoints.GIB
    assert parse_gpu("24GB x2") == parse_gpu("24GBx2") == parse_gpu("2x24GB") == parse_gpu("24 x 2")
    assert (parse_gpu("24GB x2").count, parse_gpu("24GB x2").total_bytes) == (2, 24 * gib)
    assert parse_gpu("80GB").count == 1 and parse_gpu("16GiB ×4").total_bytes == 16 * gib
    assert parse_gpu("24576MB").total_bytes == 24 * gib
    for bad in ("", "x2", "24GB x", "2x24GBx2", "big"):
        with pytest.raises(ValueError):
            parse_gpu(bad)


def test_fit_of_a_manifest_shows_the_measured_profile_beside_the_estimate(tmp_path, write_manifest):
    from orchestrator.validation import load_manifest
    from orchestrator.sizing.profiles import Profile, ProfileCache, profile_key
    folder = sparse_diffusers(tmp_path / "w13", "wan-1.3b")
    path = write_manifest(synthetic_manifest(
        model={"backend": "diffusers", "task": "t2v", "path": str(folder), "dtype": "bfloat16", "options": {}},
        generation={"width": 832, "height": 480, "num_frames": 81, "fps": 16, "steps": 4}))
    manifest = load_manifest(path)
    key = profile_key(manifest, "NVIDIA H100 80GB HBM3", 1)
    ProfileCache(manifest.output_dir / ".sweep" / "profiles").put(Profile(
        key=key, gpu_name="NVIDIA H100 80GB HBM3", gpu_total_bytes=85520809984, cards=1,
        peak_nvml_bytes=H100_PEAK, created_at="2026-11-23T15:03:04+0000"))
    result = cli("models", "fit", str(path), "--gpu", "80GB")
    assert result.returncode == 0, result.stderr
    assert "measured   NVIDIA H100 80GB HBM3 ×1: peak 11.8 GiB per worker" in result.stdout
    assert "estimate for these options (whole model on one card): 11.8 GiB (+0%)" in result.stdout
    assert "5 fit per card" in result.stdout  # what `plan` chose from the measurement: 5 fit on the H100


def test_two_experts_are_both_resident_whole_and_one_at_a_time_offloaded(wan22):
    model = parts(verify(wan22))
    s = Settings(832, 480, 81, "bfloat16")
    experts = [p for p in model if p.role == "denoiser"]
    assert [p.name for p in experts] == ["high_noise_model", "low_noise_model"]
    whole = estimate(model, s, "whole")
    assert whole.weights == sum(p.params for p in model) * 2
    assert estimate(model, s, "model_offload").weights < whole.weights


# --------------------------------------------------------------------------------------------------
# download (the error paths: the hub is unreachable from this machine)


def test_download_rejects_a_bad_repo_id_before_importing_anything(tmp_path):
    result = cli("models", "download", "not a repo", "--to", str(tmp_path / "x"))
    assert result.returncode == 2 and "is not a hub repository id" in result.stderr
    assert not (tmp_path / "x").exists()
    missing = cli("models", "download", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    assert missing.returncode == 2 and "--to" in missing.stderr


def test_download_error_path_when_the_hub_is_unreachable(tmp_path):
    result = cli("models", "download", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "--to", str(tmp_path / "wan"),
                 env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "download of Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in result.stderr
    assert "run the same command again to resume" in result.stderr


def test_download_first_removes_broken_files_so_they_are_fetched_again(wan21):
    shard = "diffusion_pytorch_model-00001-of-00002.safetensors"
    os.truncate(wan21 / shard, 100)
    record = wan21 / ".cache" / "huggingface" / "download" / f"{shard}.metadata"
    record.parent.mkdir(parents=True)
    record.write_text("commit\netag\n1.0\n")
    assert checkpoints.remove_broken(wan21) == [shard]
    assert not (wan21 / shard).exists() and not record.exists()
    assert (wan21 / "diffusion_pytorch_model-00002-of-00002.safetensors").exists()  # whole files stay


def test_the_download_fix_names_the_release_of_the_folder_in_the_backends_layout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fix = checkpoints.download_fix(tmp_path / "models" / "Wan2.2-T2V-A14B-Diffusers", "diffusers", "t2v")
    assert fix.endswith(" models download Wan-AI/Wan2.2-T2V-A14B-Diffusers --to models/Wan2.2-T2V-A14B-Diffusers")
    original = checkpoints.download_fix(tmp_path / "Wan2.1_I2V_14B_480P", "wan", "i2v")
    assert "models download Wan-AI/Wan2.1-I2V-14B-480P --to Wan2.1_I2V_14B_480P" in original
    # generate.py's task names the release when the folder does not
    assert "Wan-AI/Wan2.2-TI2V-5B --to ckpt" in checkpoints.download_fix(tmp_path / "ckpt", "wan", family="ti2v-5B")


def test_the_download_fix_lists_the_releases_of_the_task_where_nothing_names_one(tmp_path):
    fix = checkpoints.download_fix(tmp_path / "my-model", "diffusers", "i2v")
    assert "models download REPO_ID --to" in fix
    assert "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers" in fix and "Wan-AI/Wan2.2-TI2V-5B-Diffusers" in fix
    assert "T2V" not in fix  # no release that cannot run i2v
    # a folder named after a text-to-video release, in an i2v manifest: the name is not trusted
    assert "REPO_ID" in checkpoints.download_fix(tmp_path / "Wan2.1-T2V-14B-Diffusers", "diffusers", "i2v")


def test_the_download_fix_knows_the_conditioned_tasks_releases(tmp_path, monkeypatch):
    """Tried as a new user would: vace named no repository at all ("REPO_ID is one of  (…)") and s2v's
    generate.py task offered only the text and image releases."""
    monkeypatch.chdir(tmp_path)
    assert checkpoints.download_fix(tmp_path / "ckpt", "wan", family="s2v-14B").endswith(
        "models download Wan-AI/Wan2.2-S2V-14B --to ckpt")
    assert "Wan-AI/Wan2.2-Animate-14B --to" in checkpoints.download_fix(tmp_path / "ckpt", "wan", family="animate-14B")
    vace = checkpoints.download_fix(tmp_path / "models" / "Wan2.1-VACE-14B", "diffusers", "vace")
    assert "Wan-AI/Wan2.1-VACE-14B-diffusers --to" in vace  # the hub's own (lower-case) suffix
    listed = checkpoints.download_fix(tmp_path / "my-model", "wan", "control")
    assert "alibaba-pai/Wan2.1-Fun-V1.1-14B-Control," in listed and "Wan-AI" not in listed.split("REPO_ID is one of")[1]
    assert listed.endswith("https://huggingface.co/alibaba-pai lists them all")
    # the diffusers layout lists only releases the hub has in it
    assert "REPO_ID is one of ;" not in checkpoints.download_fix(tmp_path / "my-model", "diffusers", "vace")
    assert "no diffusers layout of a release that runs task s2v" in checkpoints.download_fix(
        tmp_path / "my-model", "diffusers", "s2v")
    s2v = checkpoints.download_fix(tmp_path / "Wan2.2-S2V-14B", None, "s2v")
    assert "Wan-AI/Wan2.2-S2V-14B --to" in s2v and "no diffusers layout" in s2v


def test_the_download_fix_never_fills_a_folder_holding_something_else(tmp_path):
    folder = tmp_path / "Wan2.1-T2V-14B"
    folder.mkdir()
    (folder / "Wan2.1_VAE.pth").write_bytes(b"")
    fix = checkpoints.download_fix(folder, "diffusers", "t2v")
    assert f"Wan-AI/Wan2.1-T2V-14B-Diffusers --to {tmp_path / 'Wan2.1-T2V-14B-Diffusers'}, then set model.path" in fix


def test_a_broken_checkpoints_fix_names_its_release(tmp_path):
    fix = checkpoints.repair_fix(tmp_path / "Wan2.1-T2V-1.3B-Diffusers", "diffusers")
    assert "models download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --to" in fix
    assert "models download REPO_ID --to" in checkpoints.repair_fix(tmp_path / "mine", "diffusers")


# --------------------------------------------------------------------------------------------------
# load_components


def _same(a, b) -> bool:
    if isinstance(a, torch.nn.Module):
        sa, sb = a.state_dict(), b.state_dict()
        return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)
    if hasattr(a, "config") and not hasattr(a, "encode"):  # a scheduler
        return dict(a.config) == dict(b.config)
    return a("a cat on a mat")["input_ids"] == b("a cat on a mat")["input_ids"]  # a tokenizer


def test_load_components_parallel_and_sequential_give_the_same_components(tiny):
    state = (torch.get_default_dtype(), torch.nn.Module.register_parameter)
    detail: dict = {}
    parallel, seconds = load_components(tiny, torch.bfloat16, parallel=True, prefetch=True, detail=detail)
    sequential, _ = load_components(tiny, "bfloat16", parallel=False)
    assert set(parallel) == set(sequential) == {"scheduler", "text_encoder", "tokenizer", "transformer", "vae"}
    assert all(_same(parallel[n], sequential[n]) for n in parallel)
    assert parallel["transformer"].dtype == torch.bfloat16
    assert set(seconds) == set(parallel) and all(s >= 0 for s in seconds.values())
    assert detail["transformer"]["bytes"] == (tiny / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert {"read_seconds", "build_seconds", "wait_seconds"} <= set(detail["vae"])
    # builds change process-wide torch state: nothing of it may be left behind
    assert (torch.get_default_dtype(), torch.nn.Module.register_parameter) == state


@pytest.mark.slow
def test_load_components_builds_the_same_pipeline_as_from_pretrained(tiny):
    from diffusers import WanPipeline
    components, _ = load_components(tiny, torch.float32, names=["transformer", "vae", "text_encoder", "tokenizer",
                                                               "scheduler"])
    _, settings = checkpoints.model_index(tiny)
    ours = WanPipeline(**components, **{k: v for k, v in settings.items() if v is not None})
    reference = WanPipeline.from_pretrained(tiny, dtype=torch.float32)

    def video(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(prompt="a red ball", height=32, width=32, num_frames=5, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(3), output_type="np").frames[0]
    assert (video(ours) == video(reference)).all()


def test_load_components_names_and_errors(tiny, tiny_copy):
    only, seconds = load_components(tiny, torch.float32, names=["vae", "scheduler"])
    assert set(only) == set(seconds) == {"vae", "scheduler"}
    with pytest.raises(CheckpointError, match="has no component 'transformer_2'"):
        load_components(tiny, torch.float32, names=["transformer_2"])
    shutil.rmtree(tiny_copy / "vae")
    with pytest.raises(CheckpointError, match=r"vae/: missing: model_index.json names component `vae`"):
        load_components(tiny_copy, torch.float32)


def test_read_ahead_leaves_the_file_in_the_page_cache(tiny):
    path = tiny / "text_encoder" / "model.safetensors"
    with open(path, "rb") as stream:
        os.posix_fadvise(stream.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    checkpoints.read_ahead(path)
    share = loading._resident_share(path)
    assert share is None or share >= 0.98
    assert checkpoints.read_ahead(path) == 0  # warm: nothing read again


def test_a_measured_profile_is_set_beside_the_estimate_of_its_own_quantize():
    """`models fit` puts a calibration profile beside the estimate of the strategy the manifest runs:
    with `speed: {quantize: int8}` that is the 8-bit one, not the bf16 weights' (which it showed before)."""
    from orchestrator.checkpoints.fit import strategy_for_options
    assert strategy_for_options("diffusers", {}, 1) == "whole"
    assert strategy_for_options("diffusers", {}, 1, "int8") == "int8"
    assert strategy_for_options("diffusers", {"offload": "model"}, 1, "int8") == "int8_offload"
    assert strategy_for_options("diffsynth", {"vram_management": "text_encoder"}, 1) == "text_encoder_swap"
    assert strategy_for_options("diffsynth", {"vram_management": "text_encoder"}, 1, "int8") == "int8"


# docs/benchmarks.md, "Conditioned tasks on the GPU": torch's peak allocated bytes of one DiffSynth worker
# (`vram_management: text_encoder`, 832×480×81, bf16) on the H200, 2026-12-02
H200_DIFFSYNTH_T2V13_PEAK = 15_045_026_304  # Wan2.1-T2V-1.3B


def sparse_diffsynth(folder: Path, dit_config: dict) -> Path:
    """A DiffSynth (original Wan) layout of real shapes, sparse: the DiT, umT5-xxl's encoder and the
    Wan2.1 VAE from DiffSynth's own classes on the meta device."""
    from diffsynth.models.wan_video_dit import WanModel
    from diffsynth.models.wan_video_text_encoder import WanTextEncoder
    from diffsynth.models.wan_video_vae import VideoVAE_

    from orchestrator.backends.diffsynth_files import TEXT_ENCODER, TOKENIZER
    from orchestrator.demo.random_checkpoints import offline_tokenizer

    from .conftest import header_only_safetensors
    folder.mkdir(parents=True)
    with torch.device("meta"):
        for name, module in (("diffusion_pytorch_model", WanModel(**dit_config)), (TEXT_ENCODER, WanTextEncoder()),
                             ("Wan2.1_VAE", VideoVAE_())):
            header_only_safetensors(folder / f"{name}.safetensors",
                                    {k: list(v.shape) for k, v in module.state_dict().items()})
    offline_tokenizer(folder / TOKENIZER)
    return folder


@pytest.mark.slow
def test_diffsynths_text_encoder_mode_counts_the_encoder_on_the_card_while_it_encodes(tmp_path):
    """DiffSynth's `vram_management: text_encoder` keeps umT5 on the CPU between prompts but moves its
    layers to the card to encode one (up to its vram_limit, the whole card by default): measured on the
    H200, a worker's peak is the DiT and the text encoder together. Estimated as the encoder on the CPU it
    was 21% short for the 1.3B; as swapped in per prompt it is within 2%."""
    pytest.importorskip("diffsynth")
    from orchestrator.checkpoints.fit import parts
    wan13 = dict(has_image_input=False, patch_size=[1, 2, 2], in_dim=16, dim=1536, ffn_dim=8960, freq_dim=256,
                 text_dim=4096, out_dim=16, num_heads=12, num_layers=30, eps=1e-6)
    model = parts(checkpoints.verify(sparse_diffsynth(tmp_path / "Wan2.1-T2V-1.3B", wan13)))
    settings = Settings(832, 480, 81, "bfloat16")
    swapped = estimate(model, settings, "text_encoder_swap")
    on_cpu = estimate(model, settings, "text_encoder_cpu")
    measured = H200_DIFFSYNTH_T2V13_PEAK
    assert abs(swapped.per_card / measured - 1) < 0.03, swapped
    assert on_cpu.per_card / measured < 0.8  # what `models fit` said for this mode before
    text = sum(p.params for p in model if p.role == "text") * 2
    assert swapped.weights == on_cpu.weights and swapped.host == text  # resident: all but the encoder
    assert swapped.per_card - on_cpu.per_card > text - on_cpu.working  # the encoder's weights come to the card


def test_models_status_of_a_diffsynth_manifest_offers_the_original_layout_first(tmp_path):
    """Issue 28: a diffsynth manifest's missing checkpoint was offered the diffusers release first."""
    import yaml
    manifest = tmp_path / "ds.yaml"
    data = synthetic_manifest(model={"backend": "diffsynth", "task": "t2v", "path": "models/Wan2.1-T2V-14B"})
    manifest.write_text(yaml.safe_dump(data), encoding="utf-8")
    result = cli("models", "status", str(manifest))
    assert result.returncode == 2
    assert "models download Wan-AI/Wan2.1-T2V-14B --to " in result.stderr, result.stderr
    assert "-Diffusers" not in result.stderr.split("models download", 1)[1].split(" --to ", 1)[0]
