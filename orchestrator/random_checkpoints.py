"""Random-weight Wan checkpoints in the diffusers layout (and, `build_tiny_checkpoint`, a tiny one in
the original layout for the diffsynth backend): a FAKE of real weights, for tests, the demo
and benchmarks, where nothing can be downloaded. Their videos are noise; their shapes, files and
loading path are the real ones, so the product's loading code runs unchanged on them.

    python -m orchestrator.random_checkpoints FOLDER [--variant t2v|i2v|a14b|a14b-i2v|ti2v] [--size tiny|wan-1.3b]

Variants (the model families users run):
  t2v       Wan2.1 text-to-video (also the checkpoint video-to-video runs on)
  i2v       Wan2.1 image-to-video: a CLIP image encoder, 36 input channels
  a14b      Wan2.2 T2V-A14B: two experts (`transformer`, `transformer_2`) and a boundary ratio
  a14b-i2v  Wan2.2 I2V-A14B: two experts, 36 input channels, no image encoder
  ti2v      Wan2.2 TI2V-5B: the Wan2.2 VAE (48 latent channels, 16× spatial), expanded timesteps
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

VARIANTS = ("t2v", "i2v", "a14b", "a14b-i2v", "ti2v")
BOUNDARY = {"a14b": 0.875, "a14b-i2v": 0.9}  # Wan2.2's own boundaries (t2v, i2v)

SIZES = {
    # A few thousand parameters: the CI tests run it on the CPU in seconds.
    "tiny": dict(
        transformer=dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                         out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2,
                         cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
        vae=dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                 temperal_downsample=[False, True, True]),
        vae22=dict(base_dim=8, decoder_base_dim=8, z_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                   temperal_downsample=[False, True, True]),
        text=dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                  relative_attention_max_distance=16),
        clip=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8, projection_dim=16)),
    # Wan2.1-T2V-1.3B's transformer, the default Wan VAE, and a text encoder with umt5-xxl's width
    # (d_model 4096, so the embeddings have the real shape) but 2 layers instead of 24.
    "wan-1.3b": dict(
        transformer=dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                         out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                         cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
        vae=dict(),
        text=dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64,
                  relative_attention_num_buckets=32, relative_attention_max_distance=128)),
}
# Wan2.1-T2V-14B's transformer (40 layers, 40 heads × 128, ffn 13824; 28.6 GB in bf16), the rest as
# wan-1.3b: for GPU benchmarks of the 14B model's speed (build with --dtype bfloat16).
SIZES["wan-14b"] = dict(SIZES["wan-1.3b"], transformer=dict(SIZES["wan-1.3b"]["transformer"], num_attention_heads=40,
                                                            ffn_dim=13824, num_layers=40))
VOCAB = ["<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(997)]


def tokenizer():
    """A word-level tokenizer built offline (a 1000-entry vocabulary), saved where a checkpoint keeps
    its tokenizer, so a real and a random checkpoint load through the same code."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(VOCAB)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=512)


def build_random_wan(folder: str | os.PathLike, size: str = "tiny", dtype: str = "float32",
                     device: str = "cpu", seed: int = 0, variant: str = "t2v") -> Path:
    """Build a Wan pipeline of `variant` with random weights, `save_pretrained` it to `folder`.

    `device="cuda"` runs the random initialisation on the GPU (seconds instead of minutes).
    """
    import torch
    from diffusers import (AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline,
                           WanTransformer3DModel)
    from transformers import UMT5Config, UMT5EncoderModel

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; use one of {', '.join(VARIANTS)}")
    spec = SIZES[size]
    if variant != "t2v" and size != "tiny":
        raise ValueError(f"variant {variant!r} is built in size tiny only")
    torch.manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    # Full-size weights are drawn in their own dtype: a 14B transformer in float32 would need 56 GB
    # on the device and on disk.
    default_dtype = torch.get_default_dtype()
    if size != "tiny":
        torch.set_default_dtype(torch_dtype)

    def cast(module):  # float32 is what they are built in; casting anyway makes diffusers warn
        return module if torch_dtype == torch.float32 else module
    extra: dict = {}
    with torch.device(device):
        vae_spec = dict(spec["vae"])
        transformer_spec = dict(spec["transformer"])
        if variant == "ti2v":
            z_dim = spec["vae22"]["z_dim"]
            vae_spec = dict(spec["vae22"], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
                            scale_factor_temporal=4, scale_factor_spatial=16,
                            latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim)
            transformer_spec.update(in_channels=z_dim, out_channels=z_dim)
            extra["expand_timesteps"] = True
        if variant in ("i2v", "a14b-i2v"):
            transformer_spec["in_channels"] = 2 * transformer_spec["out_channels"] + 4  # noise + mask + image
        if variant == "i2v":
            inner = transformer_spec["num_attention_heads"] * transformer_spec["attention_head_dim"]
            transformer_spec.update(image_dim=spec["clip"]["hidden_size"], added_kv_proj_dim=inner)
        vae = cast(AutoencoderKLWan(**vae_spec))
        transformer = cast(WanTransformer3DModel(**transformer_spec))
        if variant in BOUNDARY:
            extra["transformer_2"] = cast(WanTransformer3DModel(**transformer_spec))
            extra["boundary_ratio"] = BOUNDARY[variant]
        text_config = UMT5Config(vocab_size=len(VOCAB), pad_token_id=0, eos_token_id=1,
                                 decoder_start_token_id=0, is_encoder_decoder=False, **spec["text"])
        text_encoder = cast(UMT5EncoderModel(text_config))
        if variant == "i2v":
            from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
            clip = spec["clip"]
            extra["image_encoder"] = cast(CLIPVisionModel(CLIPVisionConfig(**clip)))
            extra["image_processor"] = CLIPImageProcessor(
                size={"shortest_edge": clip["image_size"]},
                crop_size={"height": clip["image_size"], "width": clip["image_size"]})
    # Wan's own scheduler setting: UniPC on flow sigmas with a shift (3.0 for 480p, 5.0 for 720p).
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=5.0 if variant == "ti2v" else 3.0)
    pipeline_class = WanImageToVideoPipeline if variant in ("i2v", "a14b-i2v") else WanPipeline
    torch.set_default_dtype(default_dtype)
    pipe = pipeline_class(tokenizer=tokenizer(), text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                          transformer=transformer, **extra)
    folder = Path(folder)
    pipe.save_pretrained(folder)
    return folder


FAKE_NAME = re.compile(r"^random-(?P<size>tiny)-wan-(?P<variant>t2v|i2v|a14b|a14b-i2v|ti2v)$")


def build_on_first_use(path: str | os.PathLike) -> bool:
    """A `model.path` named `random-tiny-wan-<variant>` (the demo's) is built there on first use.

    Only that name, which says it is a fake; any other missing checkpoint stays an error. Built
    beside and renamed into place, so an interrupted build, or two at once, never leave half a one.
    Returns True when the folder holds a checkpoint afterwards.
    """
    folder = Path(path)
    match = FAKE_NAME.match(folder.name)
    if (folder / "model_index.json").is_file():
        return True
    if match is None or folder.exists():
        return False
    import shutil
    building = folder.with_name(f".{folder.name}.building-{os.getpid()}")
    try:
        build_random_wan(building, size=match["size"], variant=match["variant"])
        try:
            os.rename(building, folder)
        except OSError:  # another process finished first: keep theirs
            pass
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return (folder / "model_index.json").is_file()


# --------------------------------------------------------------------------------------------------
# DiffSynth's layout: tiny random weights in the original Wan files, for the diffsynth backend's CI

TINY = {
    "dit": {"model_name": "wan_video_dit", "model_class": "diffsynth.models.wan_video_dit.WanModel",
            "extra_kwargs": {"has_image_input": False, "patch_size": [1, 2, 2], "in_dim": 16, "dim": 24,
                             "ffn_dim": 32, "freq_dim": 32, "text_dim": 32, "out_dim": 16, "num_heads": 2,
                             "num_layers": 2, "eps": 1e-6}},
    "text_encoder": {"model_name": "wan_video_text_encoder",
                     "model_class": "diffsynth.models.wan_video_text_encoder.WanTextEncoder",
                     "extra_kwargs": {"vocab": 260, "dim": 32, "dim_attn": 32, "dim_ffn": 64, "num_heads": 4,
                                      "num_layers": 2, "num_buckets": 8}},
    "vae": {"model_name": "wan_video_vae", "model_class": "diffsynth.models.wan_video_vae.WanVideoVAE",
            "tiny_vae": True,
            "state_dict_converter": "diffsynth.utils.state_dict_converters.wan_video_vae.WanVideoVAEStateDictConverter",
            "extra_kwargs": {"z_dim": 16, "dim": 8, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1}},
}

def offline_tokenizer(folder: str | os.PathLike) -> Path:
    """A byte-level tokenizer saved where the umT5 one would be (no download): every text tokenizes,
    different prompts give different ids. Its 259 ids fit any text encoder's vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{ch: i + 3 for i, ch in enumerate(sorted(alphabet))}}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", model_max_length=512)
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_checkpoint(folder: str | os.PathLike, seed: int = 0, task: str = "t2v") -> Path:
    """A tiny random-weight Wan model in the original file layout, for tests: its videos are noise.

    DiffSynth's file loader only recognises full-size files, so the folder carries `TINY_MARKER`,
    naming each file's class and configuration; the backend loads a folder with that marker without
    the recognition (see orchestrator/backends/diffsynth_wan.py's docstring). `task="i2v"` makes the DiT an image-to-video one in the
    manner of Wan2.2 I2V-A14B (36 input channels: the first frame's VAE encoding; no CLIP encoder).
    Returns the folder.
    """
    import torch
    from diffsynth.models.wan_video_dit import WanModel
    from diffsynth.models.wan_video_text_encoder import WanTextEncoder
    from diffsynth.models.wan_video_vae import VideoVAE_
    from safetensors.torch import save_file

    from .backends.diffsynth_files import TEXT_ENCODER, TINY_MARKER, TOKENIZER

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    components = json.loads(json.dumps(TINY))
    if task == "i2v":
        components["dit"]["extra_kwargs"].update(in_dim=36, require_clip_embedding=False)
    dit = WanModel(**components["dit"]["extra_kwargs"])
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, folder / "diffusion_pytorch_model.safetensors")
    text_encoder = WanTextEncoder(**TINY["text_encoder"]["extra_kwargs"])
    torch.save(text_encoder.state_dict(), folder / f"{TEXT_ENCODER}.pth")
    vae = TINY["vae"]["extra_kwargs"]
    # the original VAE file holds VideoVAE_'s tensors; DiffSynth's converter adds the "model." prefix
    torch.save(VideoVAE_(dim=vae["dim"], z_dim=vae["z_dim"], dim_mult=vae["dim_mult"],
                         num_res_blocks=vae["num_res_blocks"]).state_dict(), folder / "Wan2.1_VAE.pth")
    offline_tokenizer(folder / TOKENIZER)
    (folder / "config.json").write_text(json.dumps({"model_type": task, **components["dit"]["extra_kwargs"]}),
                                        encoding="utf-8")
    (folder / TINY_MARKER).write_text(json.dumps({
        "note": "tiny random weights for tests; wan-sweep's diffsynth backend loads this folder with these "
                "classes because DiffSynth's loader only recognises full-size files",
        "components": components}, indent=1), encoding="utf-8")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Save a random-weight Wan checkpoint (a fake, for tests and demos)")
    parser.add_argument("folder")
    parser.add_argument("--variant", choices=VARIANTS, default="t2v")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    if (folder / "model_index.json").is_file():
        print(f"{folder} already holds a checkpoint; kept")
        return 0
    if not FAKE_NAME.match(folder.name):
        build_random_wan(folder, args.size, args.dtype, args.device, variant=args.variant)
    elif not build_on_first_use(folder):
        return 1
    print(f"saved a random-weight {args.variant} checkpoint ({args.size}) to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
