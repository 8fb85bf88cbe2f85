"""Random-weight Wan checkpoints in the diffusers layout (and, `build_tiny_checkpoint`, a tiny one in
the original layout for the diffsynth backend): a FAKE of real weights, for tests, the demo
and benchmarks, where nothing can be downloaded. Their videos are noise; their shapes, files and
loading path are the real ones, so the product's loading code runs unchanged on them. The product
builds one only through `orchestrator.demo.materialize` (a `model.path` named `random-tiny-wan-<variant>`).

    python -m orchestrator.demo.random_checkpoints FOLDER [--variant t2v|i2v|a14b|a14b-i2v|ti2v] [--size tiny|wan-1.3b]

Variants (the model families users run):
  t2v       Wan2.1 text-to-video (also the checkpoint video-to-video runs on)
  i2v       Wan2.1 image-to-video: a CLIP image encoder, 36 input channels
  a14b      Wan2.2 T2V-A14B: two experts (`transformer`, `transformer_2`) and a boundary ratio
  a14b-i2v  Wan2.2 I2V-A14B: two experts, 36 input channels, no image encoder
  ti2v      Wan2.2 TI2V-5B: the Wan2.2 VAE (48 latent channels, 16× spatial), expanded timesteps
  vace      Wan2.1-VACE: `WanVACETransformer3DModel` (VACE blocks beside the DiT's), `WanVACEPipeline`
  animate   Wan2.2-Animate: `WanAnimateTransformer3DModel` (pose embedding, face motion encoder and
            adapters), a CLIP image encoder, `WanAnimatePipeline`
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..checkpoints.layouts import AUDIO_ENCODER_FOLDER, TEXT_ENCODER_STEM, TOKENIZER_FOLDER
from . import FAKE_NAME, TINY_MARKER, VARIANTS, materialize
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
        if variant == "animate":
            inner = transformer_spec["num_attention_heads"] * transformer_spec["attention_head_dim"]
            transformer_spec.update(in_channels=2 * transformer_spec["out_channels"] + 4,
                                    image_dim=spec["clip"]["hidden_size"], added_kv_proj_dim=inner)
        vae = cast(AutoencoderKLWan(**vae_spec))
        if variant == "vace":
            from diffusers import WanVACETransformer3DModel
            transformer = cast(WanVACETransformer3DModel(**transformer_spec, vace_layers=[0, 1],
                                                         vace_in_channels=96))
        elif variant == "animate":
            from diffusers import WanAnimateTransformer3DModel
            # the face motion encoder at an 8×8 face (released: 512×512; diffusers resizes the face video to
            # a multiple of the VAE's 8) and narrow widths
            transformer = cast(WanAnimateTransformer3DModel(
                **transformer_spec, motion_encoder_size=8, motion_encoder_channel_sizes={"8": 8, "4": 8},
                motion_style_dim=8,
                motion_dim=4, motion_encoder_dim=8, face_encoder_hidden_dim=16, face_encoder_num_heads=1,
                inject_face_latents_blocks=1))
        else:
            transformer = cast(WanTransformer3DModel(**transformer_spec))
        if variant in BOUNDARY:
            extra["transformer_2"] = cast(WanTransformer3DModel(**transformer_spec))
            extra["boundary_ratio"] = BOUNDARY[variant]
        text_config = UMT5Config(vocab_size=len(VOCAB), pad_token_id=0, eos_token_id=1,
                                 decoder_start_token_id=0, is_encoder_decoder=False, **spec["text"])
        text_encoder = cast(UMT5EncoderModel(text_config))
        if variant in ("i2v", "animate"):
            from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
            clip = spec["clip"]
            extra["image_encoder"] = cast(CLIPVisionModel(CLIPVisionConfig(**clip)))
            extra["image_processor"] = CLIPImageProcessor(
                size={"shortest_edge": clip["image_size"]},
                crop_size={"height": clip["image_size"], "width": clip["image_size"]})
    # Wan's own scheduler setting: UniPC on flow sigmas with a shift (3.0 for 480p, 5.0 for 720p).
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=5.0 if variant == "ti2v" else 3.0)
    import diffusers
    pipeline_class = (WanImageToVideoPipeline if variant in ("i2v", "a14b-i2v") else
                      getattr(diffusers, {"vace": "WanVACEPipeline", "animate": "WanAnimatePipeline"}.get(variant, "WanPipeline")))
    torch.set_default_dtype(default_dtype)
    pipe = pipeline_class(tokenizer=tokenizer(), text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                          transformer=transformer, **extra)
    folder = Path(folder)
    pipe.save_pretrained(folder)
    return folder


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


# The extra parts of Wan's conditioned models at tiny sizes (their released configurations are in
# DiffSynth's model table, diffsynth/configs/model_configs.py): the VACE blocks and the Animate adapter
# live in the DiT's own file (DiffSynth splits it with a converter per part), the S2V DiT is its own class
# and its wav2vec2 audio encoder a separate folder.
DIT_CONVERTER = "diffsynth.utils.state_dict_converters.wan_video_dit.WanVideoDiTStateDictConverter"
TINY_EXTRA = {
    "vace": {"model_name": "wan_video_vace", "model_class": "diffsynth.models.wan_video_vace.VaceWanModel",
             "state_dict_converter": "diffsynth.utils.state_dict_converters.wan_video_vace.VaceWanModelDictConverter",
             "extra_kwargs": {"vace_layers": [0, 1], "vace_in_dim": 96, "patch_size": [1, 2, 2],
                              "has_image_input": False, "dim": 24, "num_heads": 2, "ffn_dim": 32, "eps": 1e-6}},
    "animate_adapter": {
        "model_name": "wan_video_animate_adapter", "tiny_class": "animate_adapter",
        "model_class": "diffsynth.models.wan_video_animate_adapter.WanAnimateAdapter",
        "state_dict_converter": "diffsynth.utils.state_dict_converters.wan_video_animate_adapter."
                                "WanAnimateAdapterStateDictConverter",
        "extra_kwargs": {"dim": 24, "num_heads": 2, "num_adapter_layers": 1, "face_size": 4}},
    "audio_encoder": {
        "model_name": "wans2v_audio_encoder", "tiny_class": "audio_encoder",
        "model_class": "diffsynth.models.wav2vec.WanS2VAudioEncoder",
        "state_dict_converter": "diffsynth.utils.state_dict_converters.wans2v_audio_encoder."
                                "WanS2VAudioEncoderStateDictConverter",
        "extra_kwargs": {"hidden_size": 16, "conv_dim": 8, "num_hidden_layers": 24}},
}
TINY_S2V_DIT = {"model_name": "wan_video_dit", "model_class": "diffsynth.models.wan_video_dit_s2v.WanS2VModel",
                "extra_kwargs": {"dim": 24, "in_dim": 16, "ffn_dim": 32, "out_dim": 16, "text_dim": 32,
                                 "freq_dim": 32, "eps": 1e-6, "patch_size": [1, 2, 2], "num_heads": 2,
                                 "num_layers": 2, "cond_dim": 16, "audio_dim": 16, "num_audio_token": 4,
                                 "audio_inject_layers": [0, 1]}}
TINY_TASKS = ("t2v", "i2v", "vace", "control", "control-camera", "animate", "s2v")


def build_tiny_checkpoint(folder: str | os.PathLike, seed: int = 0, task: str = "t2v") -> Path:
    """A tiny random-weight Wan model in the original file layout, for tests: its videos are noise.

    DiffSynth's file loader only recognises full-size files, so the folder carries `TINY_MARKER`,
    naming each file's class and configuration; the backend loads a folder with that marker without
    the recognition (`orchestrator.demo.tiny_folder`; orchestrator/backends/diffsynth_wan.py's docstring). `task="i2v"` makes the DiT an image-to-video one in the
    manner of Wan2.2 I2V-A14B (36 input channels: the first frame's VAE encoding; no CLIP encoder).
    The conditioned tasks, each in the manner of its release: `vace` (Wan2.1-VACE: VACE blocks in the DiT's
    file), `control` (Wan2.2-Fun-A14B-Control: 52 input channels, a reference-image conv),
    `control-camera` (Wan2.2-Fun-Control-Camera: 36 channels and a camera adapter), `animate`
    (Wan2.2-Animate: an image-to-video DiT with the Animate adapter in its file), `s2v` (Wan2.2-S2V:
    the S2V DiT and the wav2vec2 audio encoder folder with its processor files).
    Returns the folder.
    """
    import torch
    from diffsynth.models.wan_video_dit import WanModel
    from diffsynth.models.wan_video_text_encoder import WanTextEncoder
    from diffsynth.models.wan_video_vae import VideoVAE_
    from safetensors.torch import save_file

    from .diffsynth_tiny import tiny_model_class

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if task not in TINY_TASKS:
        raise ValueError(f"unknown tiny task {task!r}; use one of {', '.join(TINY_TASKS)}")
    components = json.loads(json.dumps(TINY))
    dit_kwargs = components["dit"]["extra_kwargs"]
    if task in ("i2v", "animate"):
        dit_kwargs.update(in_dim=36, require_clip_embedding=False)
    elif task == "control":
        dit_kwargs.update(in_dim=52, has_ref_conv=True, require_clip_embedding=False)
    elif task == "control-camera":
        dit_kwargs.update(in_dim=36, has_ref_conv=False, add_control_adapter=True, in_dim_control_adapter=24,
                          require_clip_embedding=False)
    if task == "s2v":
        from diffsynth.models.wan_video_dit_s2v import WanS2VModel
        components["dit"] = json.loads(json.dumps(TINY_S2V_DIT))
        dit = WanS2VModel(**components["dit"]["extra_kwargs"])
    else:
        dit = WanModel(**dit_kwargs)
    weights = dict(dit.state_dict())
    extra = {"vace": "vace", "animate": "animate_adapter"}.get(task)
    if extra:  # the released file holds the DiT and this part; each loads through its converter
        from diffsynth.models.wan_video_vace import VaceWanModel
        spec = components[extra] = json.loads(json.dumps(TINY_EXTRA[extra]))
        part = (VaceWanModel(**spec["extra_kwargs"]) if extra == "vace"
                else tiny_model_class(extra)(**spec["extra_kwargs"]))
        weights.update(part.state_dict())
        components["dit"]["state_dict_converter"] = DIT_CONVERTER
    save_file({k: v.contiguous() for k, v in weights.items()}, folder / "diffusion_pytorch_model.safetensors")
    if task == "s2v":
        _save_tiny_audio_encoder(folder / AUDIO_ENCODER_FOLDER)
        components["audio_encoder"] = json.loads(json.dumps(TINY_EXTRA["audio_encoder"]))
    text_encoder = WanTextEncoder(**TINY["text_encoder"]["extra_kwargs"])
    torch.save(text_encoder.state_dict(), folder / f"{TEXT_ENCODER_STEM}.pth")
    vae = TINY["vae"]["extra_kwargs"]
    # the original VAE file holds VideoVAE_'s tensors; DiffSynth's converter adds the "model." prefix
    torch.save(VideoVAE_(dim=vae["dim"], z_dim=vae["z_dim"], dim_mult=vae["dim_mult"],
                         num_res_blocks=vae["num_res_blocks"]).state_dict(), folder / "Wan2.1_VAE.pth")
    offline_tokenizer(folder / TOKENIZER_FOLDER)
    (folder / "config.json").write_text(json.dumps({"model_type": task, **components["dit"]["extra_kwargs"]}),
                                        encoding="utf-8")
    (folder / TINY_MARKER).write_text(json.dumps({
        "note": "tiny random weights for tests; wan-sweep's diffsynth backend loads this folder with these "
                "classes because DiffSynth's loader only recognises full-size files",
        "components": components}, indent=1), encoding="utf-8")
    return folder


def _save_tiny_audio_encoder(folder: Path) -> None:
    """Wan2.2-S2V's `wav2vec2-large-xlsr-53-english/` at a tiny width: the weights as released (the
    Wav2Vec2ForCTC state dict), and the processor files DiffSynth's pipeline reads the audio with."""
    from safetensors.torch import save_file
    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2Processor

    from .diffsynth_tiny import tiny_model_class
    folder.mkdir(parents=True, exist_ok=True)
    encoder = tiny_model_class("audio_encoder")(**TINY_EXTRA["audio_encoder"]["extra_kwargs"])
    save_file({k: v.contiguous() for k, v in encoder.model.state_dict().items()}, folder / "model.safetensors")
    letters = ["<pad>", "<s>", "</s>", "<unk>", "|"] + [chr(c) for c in range(ord("A"), ord("Z") + 1)] + ["'"]
    (folder / "vocab.json").write_text(json.dumps({ch: i for i, ch in enumerate(letters)}), encoding="utf-8")
    tokenizer = Wav2Vec2CTCTokenizer(str(folder / "vocab.json"))
    features = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                        do_normalize=True, return_attention_mask=True)
    Wav2Vec2Processor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(folder)
    features.save_pretrained(folder)  # preprocessor_config.json, as in the release
    (folder / "config.json").write_text(encoder.model.config.to_json_string(), encoding="utf-8")


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
    elif not materialize(folder):
        return 1
    print(f"saved a random-weight {args.variant} checkpoint ({args.size}) to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
