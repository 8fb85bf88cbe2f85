"""LoRA files before any model loads (checkpoints/loras.py): layouts, targets, fit against a checkpoint's
headers, content identity; and the random test LoRAs (demo/random_loras.py) through the real loaders of
diffusers and DiffSynth. The quick tests write LoRAs and models by hand (numpy, header-only files); the
ones that build tiny checkpoints and load libraries are slow."""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from orchestrator import file_digests
from orchestrator.checkpoints import CheckpointError
from orchestrator.checkpoints.loras import (LoraFileError, describe, fit_problems, likely_model,
                                            model_linears, read_lora, wan_state_dict)
from orchestrator.file_digests import content_digest

from .conftest import LazyModule, header_only_safetensors

torch = LazyModule("torch")

LAYERS = {"self_attn.q": "io", "self_attn.k": "io", "self_attn.v": "io", "self_attn.o": "io",
          "cross_attn.q": "io", "cross_attn.k": "io", "cross_attn.v": "io", "cross_attn.o": "io",
          "ffn.0": "fo", "ffn.2": "of"}  # which of (hidden, ffn) each side is: "fo" = [ffn out, hidden in]


def _shape(kind: str, width: int, ffn: int) -> tuple[int, int]:
    return tuple(ffn if c == "f" else width for c in kind)


def _wan_model(folder, width=24, ffn=32, blocks=2, prefix=""):
    """An original-layout DiT's header (sparse file): only the Linear weights and a norm."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = {f"{prefix}blocks.{b}.{m}.weight": list(_shape(k, width, ffn)) for b in range(blocks)
              for m, k in LAYERS.items()}
    shapes[f"{prefix}blocks.0.norm3.weight"] = [width]
    shapes[f"{prefix}head.head.weight"] = [64, width]
    header_only_safetensors(folder / "diffusion_pytorch_model.safetensors", shapes)
    return folder


def _wan_lora(path, width=24, ffn=32, blocks=2, rank=4, prefix="diffusion_model.", metadata=None):
    """A Wan-layout LoRA written by hand: lora_down/lora_up/alpha for every layer of `blocks` blocks."""
    rng = np.random.default_rng(0)
    tensors = {}
    for b in range(blocks):
        for m, kind in LAYERS.items():
            out, inp = _shape(kind, width, ffn)
            tensors[f"{prefix}blocks.{b}.{m}.lora_down.weight"] = rng.standard_normal((rank, inp), dtype=np.float32)
            tensors[f"{prefix}blocks.{b}.{m}.lora_up.weight"] = rng.standard_normal((out, rank), dtype=np.float32)
            tensors[f"{prefix}blocks.{b}.{m}.alpha"] = np.array(float(rank), dtype=np.float32)
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_a_wan_layout_file_reads_back_with_its_targets(tmp_path):
    lora = read_lora(_wan_lora(tmp_path / "motion.safetensors", rank=8))
    assert lora.layout == "wan"
    assert lora.targets["blocks.0.self_attn.q"] == (24, 24, 8)
    assert lora.targets["blocks.1.ffn.0"] == (32, 24, 8) and lora.targets["blocks.1.ffn.2"] == (24, 32, 8)
    assert len(lora.targets) == 20 and lora.rank == 8 and lora.width == 24 and lora.blocks == 2
    assert lora.first_key["blocks.0.self_attn.q"] == "diffusion_model.blocks.0.self_attn.q.lora_down.weight"
    assert lora.bytes == sum(4 * (8 * i + o * 8 + 1) for o, i in [(24, 24)] * 16 + [(32, 24), (24, 32)] * 2)
    assert lora.expert_hint is None
    # without the prefix (as some trainers save it) the same modules
    assert read_lora(_wan_lora(tmp_path / "bare.safetensors", prefix="")).targets.keys() == lora.targets.keys()


def test_a_diffusers_layout_file_maps_to_wan_names(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {}
    for diffusers, (out, inp) in {"attn1.to_q": (24, 24), "attn1.to_out.0": (24, 24), "attn2.add_k_proj": (24, 24),
                                  "ffn.net.0.proj": (32, 24), "ffn.net.2": (24, 32)}.items():
        tensors[f"transformer.blocks.3.{diffusers}.lora_A.weight"] = rng.standard_normal((2, inp), dtype=np.float32)
        tensors[f"transformer.blocks.3.{diffusers}.lora_B.weight"] = rng.standard_normal((out, 2), dtype=np.float32)
    tensors["transformer.proj_out.lora_A.weight"] = rng.standard_normal((2, 24), dtype=np.float32)
    tensors["transformer.proj_out.lora_B.weight"] = rng.standard_normal((64, 2), dtype=np.float32)
    save_file(tensors, str(tmp_path / "style.safetensors"))
    lora = read_lora(tmp_path / "style.safetensors")
    assert lora.layout == "diffusers"
    assert set(lora.targets) == {"blocks.3.self_attn.q", "blocks.3.self_attn.o", "blocks.3.cross_attn.k_img",
                                 "blocks.3.ffn.0", "blocks.3.ffn.2", "head.head"}
    assert lora.blocks == 4 and lora.width == 24 and lora.rank == 2
    assert lora.first_key["head.head"] == "transformer.proj_out.lora_A.weight"


def test_a_lora_fits_its_own_model_and_a_wider_one_names_the_first_key_and_both_shapes(tmp_path):
    linears = model_linears(_wan_model(tmp_path / "model"), "wan")
    assert list(linears) == ["high"] and linears["high"]["blocks.1.ffn.0"] == (32, 24)
    assert linears["high"]["head.head"] == (64, 24) and "blocks.0.norm3" not in linears["high"]
    assert fit_problems(read_lora(_wan_lora(tmp_path / "own.safetensors")), linears["high"]) == []

    wide = read_lora(_wan_lora(tmp_path / "wan14b.safetensors", width=5120, ffn=13824, blocks=1))
    [(message, fix)] = fit_problems(wide, linears["high"])
    assert "diffusion_model.blocks.0.self_attn.q.lora_down.weight" in message
    assert "[5120 out, 5120 in]" in message and "[24 out, 24 in]" in message
    assert "Wan 14B / A14B" in message and "Wan 14B / A14B" in fix


def test_a_lora_for_a_deeper_model_names_the_missing_layer(tmp_path):
    linears = model_linears(_wan_model(tmp_path / "model", blocks=2), "wan")["high"]
    [(message, fix)] = fit_problems(read_lora(_wan_lora(tmp_path / "deep.safetensors", blocks=3)), linears)
    assert "diffusion_model.blocks.2.self_attn.q.lora_down.weight" in message
    assert "10 layers" in message and "2 blocks" in message and "3 blocks" in message
    assert fix


def test_a_lora_of_no_layer_of_the_model_says_so(tmp_path):
    linears = {"blocks.0.self_attn.q": (24, 24)}
    save_file({"diffusion_model.vace_blocks.0.self_attn.q.lora_down.weight": np.zeros((2, 24), np.float32),
               "diffusion_model.vace_blocks.0.self_attn.q.lora_up.weight": np.zeros((24, 2), np.float32)},
              str(tmp_path / "vace.safetensors"))
    [(message, _)] = fit_problems(read_lora(tmp_path / "vace.safetensors"), linears)
    assert "matches no layer" in message and "vace_blocks.0.self_attn.q" in message


def test_two_expert_original_layout_and_prefixed_names(tmp_path):
    root = tmp_path / "Wan2.2-T2V-A14B"
    _wan_model(root / "high_noise_model", prefix="model.")
    _wan_model(root / "low_noise_model", width=48)
    linears = model_linears(root, "wan")
    assert linears["high"]["blocks.0.self_attn.q"] == (24, 24)
    assert linears["low"]["blocks.0.self_attn.q"] == (48, 48)


@pytest.mark.parametrize("write, looks_like", [
    (lambda p: p.write_text("<!DOCTYPE html><html>Sign in</html>"), "HTML page"),
    (lambda p: zipfile.ZipFile(p, "w").writestr("archive/data.pkl", b"x"), "torch.save"),
    (lambda p: p.write_bytes(b""), "empty file"),
])
def test_a_file_that_is_not_safetensors_says_what_it_looks_like(tmp_path, write, looks_like):
    path = tmp_path / "lora.safetensors"
    write(path)
    with pytest.raises(LoraFileError) as caught:
        read_lora(path)
    assert looks_like in caught.value.message and str(path) in caught.value.message and caught.value.fix


def test_a_missing_file_and_one_without_lora_keys(tmp_path):
    with pytest.raises(LoraFileError) as caught:
        read_lora(tmp_path / "nowhere.safetensors")
    assert "does not exist" in caught.value.message and "model.loras" in caught.value.fix
    save_file({"blocks.0.self_attn.q.weight": np.zeros((4, 4), np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(LoraFileError) as caught:
        read_lora(tmp_path / "model.safetensors")
    assert "no LoRA weights" in caught.value.message and "blocks.0.self_attn.q.weight" in caught.value.message


@pytest.mark.parametrize("name, metadata, hint", [
    ("Wan2.2-Lightning_T2V-A14B-4steps-lora_HIGH_fp16", None, "high"),
    ("wan22_HighNoise_motion", None, "high"),
    ("lightx2v_low_noise_model_rank64", None, "low"),
    ("style_low_e10", None, "low"),
    ("motion_e10", {"ss_base_model": "wan2.2_t2v_low_noise_14B"}, "low"),
    ("highlights_and_lowlights", None, None),
    ("lightx2v_4step", None, None),
])
def test_the_expert_hint(tmp_path, name, metadata, hint):
    assert read_lora(_wan_lora(tmp_path / f"{name}.safetensors", blocks=1, metadata=metadata)).expert_hint == hint


def test_lightx2v_extras_and_musubi_names(tmp_path):
    """Full deltas (`.diff` of a Linear), bias and norm deltas, modulation: only Linear layers are targets."""
    tensors = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": np.zeros((2, 24), np.float32),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": np.zeros((24, 2), np.float32),
               "diffusion_model.blocks.0.self_attn.q.diff_b": np.zeros(24, np.float32),
               "diffusion_model.blocks.0.norm3.diff": np.zeros(24, np.float32),
               "diffusion_model.blocks.0.modulation.diff": np.zeros((1, 6, 24), np.float32),
               "diffusion_model.head.head.diff": np.zeros((64, 24), np.float32)}
    save_file(tensors, str(tmp_path / "lightx2v.safetensors"))
    lora = read_lora(tmp_path / "lightx2v.safetensors")
    assert lora.targets == {"blocks.0.self_attn.q": (24, 24, 2), "head.head": (64, 24, 0)}
    linears = model_linears(_wan_model(tmp_path / "model"), "wan")["high"]
    assert fit_problems(lora, linears) == []
    save_file({"lora_unet_blocks_1_cross_attn_k_img.lora_down.weight": np.zeros((2, 24), np.float32),
               "lora_unet_blocks_1_cross_attn_k_img.lora_up.weight": np.zeros((24, 2), np.float32)},
              str(tmp_path / "musubi.safetensors"))
    assert read_lora(tmp_path / "musubi.safetensors").targets == {"blocks.1.cross_attn.k_img": (24, 24, 2)}


@pytest.mark.slow
def test_a_peft_alpha_from_diffusers_metadata(tmp_path):
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": np.ones((2, 24), np.float32),
               "transformer.blocks.0.attn1.to_q.lora_B.weight": np.ones((24, 2), np.float32)},
              str(tmp_path / "peft.safetensors"),
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps({"transformer.r": 2,
                                                                             "transformer.lora_alpha": 8})})
    state = wan_state_dict(tmp_path / "peft.safetensors")
    assert sorted(state) == ["blocks.0.self_attn.q.alpha", "blocks.0.self_attn.q.lora_down.weight",
                             "blocks.0.self_attn.q.lora_up.weight"]
    assert state["blocks.0.self_attn.q.alpha"].item() == 8.0


def test_describe_and_likely_model(tmp_path):
    line = describe(read_lora(_wan_lora(tmp_path / "a.safetensors", width=1536, ffn=8960, blocks=1, rank=16)))
    assert line.startswith("Wan/ComfyUI layout, 10 layers in 1 block, width 1536 (Wan 1.3B") and "rank 16" in line
    assert "MiB" in line or "KiB" in line
    assert likely_model(3072).startswith("Wan2.2 TI2V-5B") and "5120" not in likely_model(1536)


def test_content_digest_is_the_sha256_hashed_once_until_the_content_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(file_digests, "_DIGESTS", {})
    path = _wan_lora(tmp_path / "a.safetensors", blocks=1)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    hashed = []
    real = hashlib.sha256
    monkeypatch.setattr(file_digests.hashlib, "sha256", lambda *a, **k: hashed.append(1) or real(*a, **k))
    first = content_digest(path)
    assert first == expected
    assert content_digest(path) == first and len(hashed) == 1  # memoized in the process
    file_digests._DIGESTS.clear()  # another process: the cache file answers
    assert content_digest(path) == first and len(hashed) == 1
    assert json.loads((tmp_path / "cache" / "wan-sweep" / file_digests.CACHE_NAME).read_text())
    _wan_lora(path, blocks=1, rank=2)  # new content (and mtime)
    os.utime(path, ns=(1, 1))  # even with an old mtime: the size differs
    assert content_digest(path) != first and len(hashed) == 2


def test_content_digest_without_a_writable_cache(tmp_path, monkeypatch):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    monkeypatch.setattr(file_digests, "_DIGESTS", {})
    path = _wan_lora(tmp_path / "a.safetensors", blocks=1)
    assert content_digest(path) == hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Random LoRAs on the tiny checkpoints, through the real loaders (slow: they build checkpoints, import torch)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["wan", "diffusers"])
def test_random_loras_read_back_and_fit_their_model(tmp_path, random_wan, tiny_checkpoint, layout):
    from orchestrator.demo.random_loras import build_random_lora
    for checkpoint, experts in ((random_wan("a14b"), ("high", "low")), (tiny_checkpoint("t2v"), ("high",))):
        linears = model_linears(checkpoint, "diffusers" if (checkpoint / "model_index.json").exists() else "wan")
        assert set(linears) == set(experts)
        for expert in experts:
            path = build_random_lora(checkpoint, tmp_path / f"{expert}.safetensors", layout=layout, rank=3,
                                     expert=expert)
            lora = read_lora(path)
            assert (lora.layout, lora.rank, lora.width, lora.blocks, len(lora.targets)) == (layout, 3, 24, 2, 20)
            assert fit_problems(lora, linears[expert]) == []
        ffn_only = read_lora(build_random_lora(checkpoint, tmp_path / "ffn.safetensors", layout=layout,
                                               targets="ffn"))
        assert set(ffn_only.targets) == {f"blocks.{b}.ffn.{i}" for b in (0, 1) for i in (0, 2)}


@pytest.mark.slow
def test_a_random_lora_of_another_width_is_refused_with_both_shapes(tmp_path, tiny_checkpoint):
    from orchestrator.demo.random_loras import build_random_lora
    checkpoint = tiny_checkpoint("t2v")
    lora = read_lora(build_random_lora(checkpoint, tmp_path / "wide.safetensors", width=1536))
    assert lora.width == 1536 and lora.targets["blocks.0.ffn.0"] == (32, 1536, 4)
    [(message, fix)] = fit_problems(lora, model_linears(checkpoint, "wan")["high"])
    assert "diffusion_model.blocks.0.self_attn.q.lora_down.weight" in message
    assert "[1536 out, 1536 in]" in message and "[24 out, 24 in]" in message and "Wan 1.3B" in message


@pytest.mark.slow
def test_both_layouts_of_one_seed_give_the_same_wan_tensors(tmp_path, tiny_checkpoint):
    from orchestrator.demo.random_loras import build_random_lora
    checkpoint = tiny_checkpoint("t2v")
    wan = wan_state_dict(build_random_lora(checkpoint, tmp_path / "w.safetensors", layout="wan", seed=3))
    peft = wan_state_dict(build_random_lora(checkpoint, tmp_path / "d.safetensors", layout="diffusers", seed=3))
    assert sorted(wan) == sorted(peft)
    assert "blocks.0.self_attn.q.lora_down.weight" in wan and "blocks.1.ffn.2.alpha" in wan
    assert all(torch.equal(wan[k], peft[k]) for k in wan)
    other = wan_state_dict(build_random_lora(checkpoint, tmp_path / "o.safetensors", seed=4))
    assert not torch.equal(other["blocks.0.self_attn.q.lora_up.weight"], wan["blocks.0.self_attn.q.lora_up.weight"])
    half = wan_state_dict(tmp_path / "w.safetensors", dtype=torch.float16)
    assert half["blocks.0.ffn.0.lora_up.weight"].dtype == torch.float16


@pytest.mark.slow
def test_diffsynth_names_the_wan_state_dict_as_its_dit_modules_and_fuses_every_layer(tmp_path, tiny_checkpoint):
    from diffsynth.models.wan_video_dit import WanModel
    from diffsynth.utils.lora.general import GeneralLoRALoader
    from safetensors.torch import load_file

    from orchestrator.demo.random_checkpoints import TINY
    from orchestrator.demo.random_loras import build_random_lora
    checkpoint = tiny_checkpoint("t2v")
    dit = WanModel(**TINY["dit"]["extra_kwargs"])
    dit.load_state_dict(load_file(checkpoint / "diffusion_pytorch_model.safetensors"))
    modules = dict(dit.named_modules())
    for layout in ("wan", "diffusers"):
        state = wan_state_dict(build_random_lora(checkpoint, tmp_path / f"{layout}.safetensors", layout=layout))
        converted = GeneralLoRALoader().convert_state_dict(state)
        targets = {k.removesuffix(".lora_A.weight") for k in converted if k.endswith(".lora_A.weight")}
        assert len(targets) == 20 and targets <= set(modules), targets - set(modules)
    before = {name: modules[name].weight.detach().clone() for name in targets}
    GeneralLoRALoader().fuse_lora_to_base_model(dit, state, alpha=1.0)
    assert all(not torch.equal(before[name], modules[name].weight) for name in targets)


def _bytes(frames):
    return (frames * 255).round().astype(np.uint8)


@pytest.mark.slow
def test_both_layouts_load_into_a_tiny_diffusers_pipeline_and_change_its_frames(tmp_path, random_wan):
    from diffusers import WanPipeline

    from orchestrator.demo.random_loras import build_random_lora
    checkpoint = random_wan("a14b")
    pipe = WanPipeline.from_pretrained(checkpoint)
    settings = dict(prompt="a cat", height=32, width=32, num_frames=5, num_inference_steps=2, guidance_scale=1.0,
                    output_type="np")

    def frames():
        return pipe(**settings, generator=torch.Generator().manual_seed(0)).frames[0]
    plain = frames()
    for layout in ("wan", "diffusers"):
        high = build_random_lora(checkpoint, tmp_path / f"{layout}_high.safetensors", layout=layout, seed=1)
        low = build_random_lora(checkpoint, tmp_path / f"{layout}_low.safetensors", layout=layout, seed=2,
                                expert="low")
        pipe.load_lora_weights(str(high), adapter_name=f"{layout}_high")
        pipe.load_lora_weights(str(low), adapter_name=f"{layout}_low", load_into_transformer_2=True)
    assert pipe.get_list_adapters() == {"transformer": ["wan_high", "diffusers_high"],
                                        "transformer_2": ["wan_low", "diffusers_low"]}
    for layout in ("wan", "diffusers"):
        pipe.set_adapters([f"{layout}_high", f"{layout}_low"], [1.0, 1.0])
        with_lora = frames()
        assert np.isfinite(with_lora).all()
        # visibly different at strength 1: the tiny random VAE makes every video nearly alike (another seed
        # changes 43% of the 8-bit values), the LoRA changes about 20% of them
        assert np.mean(_bytes(with_lora) != _bytes(plain)) > 0.05
        if layout == "wan":
            wan_frames = with_lora
    assert np.allclose(with_lora, wan_frames, atol=1e-5)  # the two layouts of one seed are the same LoRA
    pipe.set_adapters(["wan_high", "wan_low"], [0.0, 0.0])
    assert np.allclose(frames(), plain, atol=1e-6)  # strength 0: no LoRA


def test_models_download_fetches_one_lora_file_and_says_what_it_is(tmp_path, monkeypatch):
    """`models download REPO --file NAME --to loras/`: only that file is asked of the hub (allow_patterns), and
    the line `models status` gives a LoRA is printed for it; a name the repository lacks is said."""
    import huggingface_hub
    from orchestrator.checkpoints.download import download
    asked = {}

    def fake_snapshot(repo_id, local_dir, revision=None, allow_patterns=None):
        asked.update(repo=repo_id, patterns=allow_patterns)
        if allow_patterns == ["loras/distill_rank4.safetensors"]:
            (Path(local_dir) / "loras").mkdir(parents=True, exist_ok=True)
            _wan_lora(Path(local_dir) / "loras" / "distill_rank4.safetensors", blocks=1)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    said = []
    assert download("someone/loras", tmp_path / "got", files=["loras/distill_rank4.safetensors"], say=said.append) is None
    assert asked == {"repo": "someone/loras", "patterns": ["loras/distill_rank4.safetensors"]}
    assert any("distill_rank4.safetensors: Wan/ComfyUI layout" in line for line in said)
    with pytest.raises(CheckpointError, match="has no file matching loras/nope.safetensors"):
        download("someone/loras", tmp_path / "got", files=["loras/nope.safetensors"], say=said.append)
