"""The diffusers backend: Wan text-to-video (`WanPipeline`) from a local checkpoint folder.

One worker loads the pipeline once (`from_pretrained(model.path, torch_dtype=model.dtype)`) and keeps
it for every job. Per job: a `torch.Generator` seeded with the job's seed (on the CPU, so a seed
gives the same video on any card), prompt embeddings cached per prompt (a prompt repeats across
seeds, so the text encoder runs once per prompt, not once per video), `callback_on_step_end` reports
each step, CUDA out-of-memory becomes `OutOfMemory` (the worker retries the job and, if it repeats,
retires a worker of the card), and the peak reserved memory is recorded in the sidecar.

Options (`model.options`), mapped to diffusers' own memory switches:
  offload: none | model | sequential   `enable_model_cpu_offload()` / `enable_sequential_cpu_offload()`
  vae_tiling: bool                     `vae.enable_tiling()`
  vae_slicing: bool                    `vae.enable_slicing()`
  text_encoder: gpu | cpu              keep the text encoder on the CPU (frees its GPU memory)
  device_map: balanced                 spread the model over the worker's cards (gpus_per_worker > 1);
                                       chosen by default when a worker has more than one card
  max_sequence_length: int             prompt tokens (default 512, as Wan)
  prompt_cache: int                    prompts whose embeddings are kept (default 64)

Only `task: t2v` for now; i2v/v2v need the image/video pipelines (another issue) and are rejected by
`check()` before anything starts. Without a GPU the pipeline runs on the CPU (slowly), which is what
the CI tests do with a tiny random-weight pipeline (`build_random_wan`).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .base import Backend, OutOfMemory

OPTIONS = {"offload": str, "vae_tiling": bool, "vae_slicing": bool, "text_encoder": str,
           "device_map": str, "max_sequence_length": int, "prompt_cache": int}
CHOICES = {"offload": ("none", "model", "sequential"), "text_encoder": ("gpu", "cpu"),
           "device_map": ("balanced",)}


def _is_oom(exc: BaseException) -> bool:
    import torch
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("CUDA out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text
                                              or "cudaErrorMemoryAllocation" in text)


class DiffusersWanBackend(Backend):
    name = "diffusers"
    runs_on_cpu = True  # it does run on the CPU, slowly: CI uses a tiny random-weight pipeline
    # Where and how memory-thriftily it runs, not what it draws: these stay out of job ids.
    runtime_options = frozenset({"offload", "device_map", "text_encoder", "prompt_cache", "vae_slicing"})

    @classmethod
    def check(cls, manifest) -> list[str]:
        model = manifest.model
        problems = []
        if model.task != "t2v":
            problems.append(f"the diffusers backend runs text-to-video (task: t2v) only for now; task "
                            f"`{model.task}` (image/video-conditioned Wan pipelines) is not supported yet")
        if not model.path:
            problems.append("the diffusers backend needs model.path: a local diffusers checkpoint folder "
                            "(with model_index.json)")
        elif not (Path(model.path) / "model_index.json").is_file():
            problems.append(f"model.path `{model.path}` is not a local diffusers checkpoint folder "
                            "(no model_index.json there); nothing is downloaded from the hub")
        for key, value in model.options.items():
            kind = OPTIONS.get(key)
            if kind is None:
                problems.append(f"unknown diffusers option `{key}` (use: {', '.join(OPTIONS)})")
            elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                problems.append(f"diffusers option `{key}` must be {kind.__name__}, got {value!r}")
            elif key in CHOICES and value not in CHOICES[key]:
                problems.append(f"diffusers option `{key}` is {value!r}; use one of: {', '.join(CHOICES[key])}")
        return problems

    # ------------------------------------------------------------------------------------------

    def load(self) -> None:
        import torch
        from diffusers import WanPipeline

        o = self.options = dict(self.model.options)
        self.torch = torch
        self.dtype = getattr(torch, self.model.dtype)
        self.cuda = torch.cuda.is_available() and bool(self.devices)
        self.device = torch.device("cuda:0" if self.cuda else "cpu")  # CUDA_VISIBLE_DEVICES = our cards
        kwargs = {"dtype": self.dtype}
        multi = self.cuda and torch.cuda.device_count() > 1
        if multi or o.get("device_map"):
            kwargs["device_map"] = o.get("device_map", "balanced")
        pipe = WanPipeline.from_pretrained(self.model.path, **kwargs)
        offload = o.get("offload", "none")
        if "device_map" in kwargs:
            pass  # accelerate placed the components over the cards
        elif self.cuda and offload == "model":
            pipe.enable_model_cpu_offload()
        elif self.cuda and offload == "sequential":
            pipe.enable_sequential_cpu_offload()
        else:
            for name in ("transformer", "transformer_2", "vae"):
                component = getattr(pipe, name, None)
                if component is not None:
                    component.to(self.device)
            if pipe.text_encoder is not None and o.get("text_encoder", "gpu") == "gpu":
                pipe.text_encoder.to(self.device)
        if o.get("vae_tiling"):
            pipe.vae.enable_tiling()
        if o.get("vae_slicing"):
            pipe.vae.enable_slicing()
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.embeddings: OrderedDict[tuple[str, str], tuple] = OrderedDict()
        self._peak: int | None = None

    def _embed(self, prompt: str, negative: str, guidance: bool):
        """Prompt embeddings, computed once per (prompt, negative prompt) and kept for the next seeds."""
        key = (prompt, negative if guidance else "")
        cached = self.embeddings.get(key)
        if cached is not None:
            self.embeddings.move_to_end(key)
            return cached
        torch = self.torch
        with torch.no_grad():
            positive, negative_embeds = self.pipe.encode_prompt(
                prompt=prompt, negative_prompt=negative, do_classifier_free_guidance=guidance,
                max_sequence_length=int(self.options.get("max_sequence_length", 512)),
                device=self.device, dtype=self.dtype)
        self.embeddings[key] = (positive, negative_embeds)
        while len(self.embeddings) > int(self.options.get("prompt_cache", 64)):
            self.embeddings.popitem(last=False)
        return positive, negative_embeds

    def generate(self, job, progress) -> np.ndarray:
        torch = self.torch
        g = self.generation
        steps = g.steps
        if self.cuda:
            for index in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(index)

        def on_step_end(pipe, step, timestep, callback_kwargs):
            progress(step + 1, steps)
            return {}

        try:
            guidance = g.cfg_scale > 1.0
            positive, negative = self._embed(job.prompt, g.negative_prompt, guidance)
            generator = torch.Generator(device="cpu").manual_seed(int(job.seed))
            result = self.pipe(
                prompt_embeds=positive, negative_prompt_embeds=negative, height=g.height, width=g.width,
                num_frames=g.num_frames, num_inference_steps=steps, guidance_scale=g.cfg_scale,
                generator=generator, output_type="np", callback_on_step_end=on_step_end, **g.extra)
            video = result.frames[0]
        except Exception as exc:
            if _is_oom(exc):
                self._release()
                raise OutOfMemory(f"CUDA out of memory at {g.width}x{g.height}x{g.num_frames}: "
                                  f"{str(exc).splitlines()[0][:300]}") from None
            raise
        finally:
            if self.cuda:
                self._peak = sum(torch.cuda.max_memory_reserved(i) for i in range(torch.cuda.device_count()))
        video = np.asarray(video)
        if video.dtype != np.uint8:
            video = (np.clip(video, 0.0, 1.0) * 255).round().astype(np.uint8)
        return video

    def _release(self) -> None:
        """After an out-of-memory: give the allocator's cache back so the card's other tenants fit."""
        import gc
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def peak_memory_bytes(self) -> int | None:
        return self._peak if self.cuda else None

    def close(self) -> None:
        self.pipe = None
        self.embeddings = OrderedDict()
        self._release()


# --------------------------------------------------------------------------------------------------
# Random-weight pipelines for tests and benchmarks (no weights can be downloaded there)

SIZES = {
    # A few thousand parameters: the CI tests run it on the CPU in seconds.
    "tiny": dict(
        transformer=dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                         out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2,
                         cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
        vae=dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                 temperal_downsample=[False, True, True]),
        text=dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                  relative_attention_max_distance=16)),
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
VOCAB = ["<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(997)]


def _tokenizer():
    """A word-level tokenizer built offline (hashing words into a 1000-entry vocabulary)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(VOCAB)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=512)


def build_random_wan(folder: str | os.PathLike, size: str = "tiny", dtype: str = "float32",
                     device: str = "cpu", seed: int = 0) -> Path:
    """Build a WanPipeline with random weights and `save_pretrained` it to `folder`; return the folder.

    For tests and benchmarks only: its videos are noise. `device="cuda"` runs the random
    initialisation on the GPU (seconds instead of minutes for the 1.3B size).
    """
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    spec = SIZES[size]
    torch.manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    with torch.device(device):
        transformer = WanTransformer3DModel(**spec["transformer"]).to(torch_dtype)
        vae = AutoencoderKLWan(**spec["vae"]).to(torch_dtype)
        text_config = UMT5Config(vocab_size=len(VOCAB), pad_token_id=0, eos_token_id=1,
                                 decoder_start_token_id=0, is_encoder_decoder=False, **spec["text"])
        text_encoder = UMT5EncoderModel(text_config).to(torch_dtype)
    pipe = WanPipeline(tokenizer=_tokenizer(), text_encoder=text_encoder, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer)
    folder = Path(folder)
    pipe.save_pretrained(folder)
    return folder
