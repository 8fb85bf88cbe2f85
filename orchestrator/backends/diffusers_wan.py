"""The diffusers backend: Wan 2.1 / 2.2 text-, image- and video-to-video from a local checkpoint folder.

  task t2v  `WanPipeline`                Wan2.1 T2V, Wan2.2 T2V-A14B (two experts), TI2V-5B
  task i2v  `WanImageToVideoPipeline`    Wan2.1 I2V (CLIP image encoder), Wan2.2 I2V-A14B, TI2V-5B
  task v2v  `WanVideoToVideoPipeline`    motion transfer from a reference video, `denoising_strength`
  task vace `WanVACEPipeline`            Wan2.1-VACE: the control video (`video`), an optional reference
                                         image (`reference_images`)
  task animate `WanAnimatePipeline`      Wan2.2-Animate: the image driven by the pose and face videos
                                         (one segment of num_frames; the face video at the motion
                                         encoder's size, 512 in the release)
Tasks s2v and control have no diffusers pipeline: `check` names the backends that run them.

One worker loads the checkpoint once (its components in parallel threads, memory-mapped from
safetensors, timed one by one: `checkpoints.load_components`) and keeps it for every job. Wan 2.2's
two experts (`transformer_2`, `boundary_ratio`) and TI2V's expanded timesteps come from the
checkpoint's own `model_index.json`; `generation.cfg_scale: [high, low]` gives each expert its scale.

Per job: a `torch.Generator` on the CPU seeded with the job's seed (a seed gives the same initial
noise on any card), prompt embeddings cached per (prompt, negative prompt) (a prompt runs with every
seed), the reference read ahead in a thread and fitted by the rule in `media.py`, and in v2v the
VAE-encoded reference cached per video, so its jobs only draw their own noise; in i2v the CLIP image
embedding is cached per image. `callback_on_step_end` reports each step; CUDA out-of-memory becomes
`OutOfMemory`; the sidecar gets the load time per component, seconds per step and peak memory.

Options (`model.options`), mapped to diffusers' own memory switches:
  offload: none | model | sequential | group   `enable_model_cpu_offload()`, `enable_sequential_cpu_offload()`,
                                       or block-level `enable_group_offload()` of the transformers
  group_offload_blocks: int            blocks per group for `offload: group` (default 1)
  vae_tiling: bool                     `vae.enable_tiling()`
  vae_slicing: bool                    `vae.enable_slicing()`
  text_encoder: gpu | cpu              keep the text encoder on the CPU (frees its GPU memory)
  device_map: balanced                 spread the model over the worker's cards with accelerate;
                                       chosen by default when a worker has more than one card
  max_memory_gib: number               with device_map: the most each card may hold
  parallel_load: bool                  load the components in parallel threads (default true)
  max_sequence_length: int             prompt tokens (default 512, as Wan)
  prompt_cache: int                    prompts whose embeddings are kept (default 64)

Speed (`speed:`, orchestrator/speed.py), applied to the transformer (both of Wan 2.2's experts):
`compile: blocks` is `compile_repeated_blocks(fullgraph=True)`, `full` compiles the whole
transformer; `attention` is `set_attention_backend` (cudnn, flash, efficient, math: torch SDPA's
kernels; or any diffusers backend whose package is installed, e.g. `sage`); `quantize` is torchao on
the blocks' Linear layers (`int8` before the move to the card, so a model too large in bf16 still
loads; `fp8` on the card) or `enable_layerwise_casting` for `fp8_storage`.
"""
from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from .. import speed as speed_settings
from ..backend import Backend, BackendProblem, FirstDenoiserCall, NonFiniteFrames, run_to_first_denoiser_call
from ..checkpoints.releases import download_fix
from ..demo import materialize
from ..manifest import SpeedConfig
from .cuda import job_memory, release_memory
from .shared import model_files_identity, option_problems, speed_card_problems

PIPELINES = {"t2v": "WanPipeline", "i2v": "WanImageToVideoPipeline", "v2v": "WanVideoToVideoPipeline",
             "vace": "WanVACEPipeline", "animate": "WanAnimatePipeline"}
# The transformer class a conditioned task's checkpoint has (model_index.json), and the release it comes from
TASK_TRANSFORMERS = {"vace": ("WanVACETransformer3DModel", "Wan2.1-VACE-14B-diffusers"),
                     "animate": ("WanAnimateTransformer3DModel", "Wan2.2-Animate-14B-Diffusers")}
# The conditioned tasks diffusers 0.42 has no pipeline for, and the backends that run them
ELSEWHERE = {"s2v": "backend: diffsynth (or command, Wan's generate.py s2v-14B)",
             "control": "backend: diffsynth (Wan-Fun control and camera control)"}
# How a worker reads ahead each role of Job.inputs (the face video has its own cache, at its size)
INPUT_KINDS = {"reference_image": "image", "pose_video": "video"}
OPTIONS = {"offload": str, "group_offload_blocks": int, "vae_tiling": bool, "vae_slicing": bool,
           "text_encoder": str, "device_map": str, "max_memory_gib": (int, float), "parallel_load": bool,
           "max_sequence_length": int, "prompt_cache": int}
CHOICES = {"offload": ("none", "model", "sequential", "group"), "text_encoder": ("gpu", "cpu"),
           "device_map": ("balanced",)}


def read_checkpoint_config(path: str | Path) -> dict:
    """What `check` needs to know about a diffusers checkpoint, from its JSON files only."""
    root = Path(path)
    index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
    def config(name: str) -> dict:
        file = root / name / "config.json"
        return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    transformer, vae = config("transformer"), config("vae")
    patch = transformer.get("patch_size") or [1, 2, 2]
    return {
        "index": index,
        "two_experts": bool(index.get("transformer_2") and index["transformer_2"][0]),
        "expand_timesteps": bool(index.get("expand_timesteps")),
        "image_conditioned": transformer.get("in_channels", 16) != transformer.get("out_channels", 16),
        "image_encoder": bool(index.get("image_encoder") and index["image_encoder"][0]),
        "spatial": int(vae.get("scale_factor_spatial") or 8) * int(patch[-1]),
        "heads": transformer.get("num_attention_heads"),
        "transformer_class": (index.get("transformer") or [None, None])[1],
        "face_size": transformer.get("motion_encoder_size"),
    }


def _diffusers_attention_problem(name: str) -> tuple[str, str] | None:
    """(message, fix) when `name` is not a diffusers attention backend usable here, else None."""
    try:
        from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements
    except ImportError:
        return None  # diffusers itself missing is reported elsewhere
    names = [b.value for b in AttentionBackendName]
    if name not in names:
        return (f"speed.attention `{name}` is neither a torch SDPA kernel nor a diffusers attention backend",
                f"use one of: {', '.join(speed_settings.SDPA_ATTENTION)}, or a diffusers backend such as "
                f"{', '.join(n for n in names if not n.startswith('_') and not n.endswith('_hub'))}")
    if name.endswith("_hub"):
        return (f"speed.attention `{name}` downloads its kernel from the Hugging Face hub at the start; "
                "nothing is downloaded unless asked", "install the kernel's package and use its local "
                "backend (e.g. `flash_varlen` for flash-attn, `sage` for sageattention)")
    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except (RuntimeError, ImportError) as exc:
        return (f"speed.attention `{name}` cannot run here: {exc}", "install the package it names, or use "
                "attention: auto")
    return None


class DiffusersWanBackend(Backend):
    name = "diffusers"
    runs_on_cpu = True  # it does run on the CPU, slowly: CI uses tiny random-weight checkpoints
    verify_checkpoint = True
    checkpoint_layout = "diffusers"
    # Where and how memory-thriftily it runs, not what it draws: these stay out of job ids.
    runtime_options = frozenset({"offload", "group_offload_blocks", "device_map", "max_memory_gib", "text_encoder",
                                 "prompt_cache", "vae_slicing", "parallel_load"})

    @classmethod
    def check(cls, manifest) -> list:
        model, g = manifest.model, manifest.generation
        if model.task not in PIPELINES:
            return [BackendProblem("model.task", f"diffusers has no pipeline for task {model.task}; the diffusers "
                                   f"backend runs {', '.join(PIPELINES)}",
                                   f"use {ELSEWHERE.get(model.task, 'another backend')} (README's task table)")]
        problems, _ = option_problems("diffusers", model.options, OPTIONS, CHOICES)
        if model.options.get("device_map") and model.options.get("offload", "none") != "none":
            problems.append(BackendProblem("model.options.offload", "offload and device_map exclude each other",
                                           "keep one: device_map spreads the model over cards, offload over CPU memory"))
        problems.extend(cls._speed_problems(manifest))
        length = model.options.get("max_sequence_length", 512)
        if isinstance(length, int) and not 1 <= length <= 512:
            problems.append(BackendProblem("model.options.max_sequence_length",
                                           f"max_sequence_length is {length}", "use 1 to 512 (Wan's text length)"))
        if not model.path:
            problems.append(BackendProblem("model", "the diffusers backend needs model.path: a local diffusers "
                                           "checkpoint folder (with model_index.json)", "add `path:` to model"))
            return problems
        if not materialize(model.path):  # a path named random-tiny-wan-<variant> (the demo's) is built there
            problems.append(BackendProblem(
                "model.path", f"model.path `{model.path}` is not a local diffusers checkpoint folder (no "
                "model_index.json there); nothing is downloaded unless you ask",
                "point it at a downloaded checkpoint, or "
                + download_fix(model.path, cls.checkpoint_layout, model.task)))
            return problems
        try:
            info = read_checkpoint_config(model.path)
        except (OSError, ValueError) as exc:
            return problems + [BackendProblem("model.path", f"cannot read the checkpoint's configs: {exc}")]
        task, ti2v = model.task, info["expand_timesteps"]
        wanted = TASK_TRANSFORMERS.get(task)
        if wanted and info["transformer_class"] != wanted[0]:
            return problems + [BackendProblem(
                "model.task", f"task {task} needs a {wanted[0]} (as in {wanted[1]}); model.path `{model.path}` has a "
                f"{info['transformer_class']}", f"use a {task} checkpoint (e.g. Wan-AI/{wanted[1]}) or change model.task")]
        mine = next((t for t, (cls_name, _) in TASK_TRANSFORMERS.items() if cls_name == info["transformer_class"]), None)
        if mine and mine != task:
            return problems + [BackendProblem(
                "model.task", f"model.path `{model.path}` is a {mine} checkpoint ({info['transformer_class']}); task "
                f"{task} needs another", f"use task: {mine}")]
        if task == "i2v" and not (info["image_conditioned"] or ti2v):
            problems.append(BackendProblem("model.task", f"model.path `{model.path}` is a text-to-video "
                                           "checkpoint; task i2v needs an image-to-video one (I2V or TI2V-5B)"))
        if task in ("t2v", "v2v", "vace") and info["image_conditioned"]:
            problems.append(BackendProblem("model.task", f"model.path `{model.path}` is an image-to-video "
                                           f"checkpoint; task {task} needs a text-to-video one", "use task: i2v"))
        if task == "v2v" and (info["two_experts"] or ti2v):
            problems.append(BackendProblem(
                "model.task", "diffusers' WanVideoToVideoPipeline runs single-expert Wan 2.1 checkpoints only; "
                "this one is Wan 2.2 (" + ("two experts" if info["two_experts"] else "TI2V-5B") + ")",
                "use a Wan2.1 T2V checkpoint, or backend: diffsynth"))
        high, low = g.guidance
        if low is not None and not info["two_experts"]:
            problems.append(BackendProblem("generation.cfg_scale", "cfg_scale is a pair, but this checkpoint "
                                           "has one expert", "give one number"))
        step = info["spatial"]
        for key in ("width", "height"):
            value = getattr(g, key)
            if value % step:
                lower = max(step, value // step * step)
                problems.append(BackendProblem(f"generation.{key}", f"generation.{key} is {value}; this "
                                               f"checkpoint needs a multiple of {step}", f"use {lower} or {lower + step}"))
        if task == "v2v" and int(g.steps * g.denoising_strength) < 1:
            problems.append(BackendProblem("generation.denoising_strength",
                                           f"steps × denoising_strength = {g.steps} × {g.denoising_strength} "
                                           "leaves no denoising step", "raise steps or denoising_strength"))
        return problems

    @staticmethod
    def _speed_problems(manifest) -> list[BackendProblem]:
        speed, options = manifest.model.speed, manifest.model.options
        problems = speed_card_problems(manifest)
        offload = options.get("offload", "none")
        if offload in ("sequential", "group") and (speed.compile != "none" or speed.quantize in ("fp8", "int8")):
            key = "speed.compile" if speed.compile != "none" else "speed.quantize"
            problems.append(BackendProblem(key, f"{key} {getattr(speed, key.split('.')[1])} with offload: {offload}: "
                                           "the offload hooks move each layer's weights per call, which compiled "
                                           "graphs and torchao's weights do not survive",
                                           "use offload: none or model, or quantize: fp8_storage for memory"))
        if speed.attention not in speed_settings.SDPA_BACKENDS and speed.attention != "auto":
            problem = _diffusers_attention_problem(speed.attention)
            if problem:
                problems.append(BackendProblem("speed.attention", *problem))
        return problems

    @classmethod
    def plan_notes(cls, manifest) -> list[str]:
        weights = model_files_identity(manifest.model.path).get("weight_bytes") or 0
        size = f"{weights / 2**30:.1f} GiB" if weights >= 2**30 else f"{weights / 2**20:.1f} MiB"
        notes = [f"diffusers: each worker loads the checkpoint once ({size} of weights) and "
                 "keeps it; prompt embeddings are cached per worker"]
        if manifest.model.task in ("v2v", "vace"):
            notes.append(f"diffusers: each {'control' if manifest.model.task == 'vace' else 'reference'} video is "
                         "VAE-encoded once per worker and reused for all its prompts × seeds")
        return notes

    # ------------------------------------------------------------------------------------------

    def load(self) -> None:
        import diffusers
        import torch

        from ..checkpoints import load_components

        o = self.options = dict(self.model.options)
        self.torch = torch
        self.dtype = getattr(torch, self.model.dtype)
        self.cuda = torch.cuda.is_available() and bool(self.devices)
        self.device = torch.device("cuda:0" if self.cuda else "cpu")  # CUDA_VISIBLE_DEVICES = our cards
        self.cards = torch.cuda.device_count() if self.cuda else 0
        info = read_checkpoint_config(self.model.path)
        pipeline_class = getattr(diffusers, PIPELINES[self.model.task])
        started = time.monotonic()
        self.device_mapped = bool(self.cards > 1 or o.get("device_map"))
        early_speed: dict = {}
        if self.device_mapped:
            kwargs = {"torch_dtype": self.dtype, "device_map": o.get("device_map", "balanced")}
            if o.get("max_memory_gib"):
                kwargs["max_memory"] = {i: f"{o['max_memory_gib']}GiB" for i in range(max(1, self.cards))}
            pipe = pipeline_class.from_pretrained(self.model.path, **kwargs)
            seconds = {"pipeline (device_map)": time.monotonic() - started}
        else:
            import inspect
            accepted = inspect.signature(pipeline_class.__init__).parameters
            names = [n for n, spec in info["index"].items()
                     if n in accepted and isinstance(spec, list) and spec[0] is not None]
            components, seconds = load_components(self.model.path, self.dtype,
                                                  parallel=o.get("parallel_load", True), names=names)
            settings = {k: info["index"][k] for k in ("boundary_ratio", "expand_timesteps")
                        if k in accepted and info["index"].get(k) is not None}
            pipe = pipeline_class(**components, **settings)
            early_speed = self._apply_speed(pipe, "cpu")
            self._place(pipe)
        speed_facts = {stage: facts for stage, facts in (("cpu", early_speed), ("card", self._apply_speed(pipe, "card")))
                       if facts}  # what each stage did, for the sidecars
        self.checkpoint_scheduler = pipe.scheduler  # with the checkpoint's own shift
        self.scheduler_shift = None
        self._use_shift(pipe, self.generation.shift)
        if o.get("vae_tiling"):
            pipe.vae.enable_tiling()
        if o.get("vae_slicing"):
            pipe.vae.enable_slicing()
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.two_experts = info["two_experts"]
        self.text_on_cpu = o.get("text_encoder") == "cpu" and o.get("offload", "none") == "none"
        self.embeddings: OrderedDict[tuple[str, str], tuple] = OrderedDict()
        self.references = self.reference_cache(self.generation)
        self.face_size = info["face_size"] or 512  # Animate's face crops, at its motion encoder's size
        self.encoded: OrderedDict[str, object] = OrderedDict()  # v2v latents / i2v image embeddings
        self._job: dict = {}
        self.load_info = {
            "load_seconds": round(time.monotonic() - started, 2),
            "components": {k: round(v, 2) for k, v in seconds.items()},
            "pipeline": pipeline_class.__name__, "model_files": model_files_identity(self.model.path),
            "parallel_load": bool(o.get("parallel_load", True)) and not self.device_mapped,
            "speed": {**asdict(self.model.speed), **({"applied": speed_facts} if speed_facts else {})},
        }

    def _use_shift(self, pipe, shift: float | None) -> None:
        """The sampler's flow shift of the next job (None: the checkpoint's own): a shift axis changes it
        between jobs, each time from the checkpoint's scheduler config."""
        if shift == self.scheduler_shift:
            return
        scheduler = self.checkpoint_scheduler
        if shift is not None:
            config = dict(scheduler.config)
            key = "flow_shift" if "flow_shift" in config else "shift"
            scheduler = type(scheduler).from_config(config, **{key: float(shift)})
        pipe.scheduler, self.scheduler_shift = scheduler, shift

    def _apply_speed(self, pipe, stage: str) -> dict:
        """The `speed:` settings on each transformer, in two stages: "cpu", before the move to the card
        (int8 and fp8_storage shrink the weights while they are still in CPU memory, so a model too
        large for the card in bf16 still loads), and "card", after it (fp8, attention, compile). A
        device_map load, already on its cards, runs only the second, which then quantizes too."""
        speed = self.model.speed
        early = speed.quantize in ("int8", "fp8_storage") and not self.device_mapped
        if stage == "cpu":
            step = SpeedConfig(quantize=speed.quantize) if early else SpeedConfig()
        else:
            step = replace(speed, quantize="none") if early else speed
        applied = {}
        text_encoder = getattr(pipe, "text_encoder", None)
        if step.quantize == "int8" and text_encoder is not None:
            # 8-bit weights for the umT5 text encoder too (11 GB in bf16; it runs once per prompt), as
            # `models fit` counts them for its 8-bit strategies
            applied["text_encoder"] = {"quantized_layers": speed_settings.quantize(
                text_encoder, [text_encoder], "int8", self.dtype, "transformers")}
        for name in ("transformer", "transformer_2"):
            transformer = getattr(pipe, name, None)
            if transformer is not None and not step.is_default:
                applied[name] = speed_settings.apply_to_denoiser(
                    transformer, list(transformer.blocks), step, compute_dtype=self.dtype, library="diffusers")
        return applied

    def _place(self, pipe) -> None:
        """Put the components where the memory options say (one card, or offloaded to the CPU)."""
        o = self.options
        offload = o.get("offload", "none")
        if not self.cuda:
            return
        if offload == "model":
            pipe.enable_model_cpu_offload()
            return
        if offload == "sequential":
            pipe.enable_sequential_cpu_offload()
            return
        for name in ("transformer", "transformer_2"):
            component = getattr(pipe, name, None)
            if component is None:
                continue
            if offload == "group":
                component.enable_group_offload(onload_device=self.device, offload_device=self.torch.device("cpu"),
                                               offload_type="block_level",
                                               num_blocks_per_group=int(o.get("group_offload_blocks", 1)),
                                               use_stream=True)
            else:
                component.to(self.device)
        for name in ("vae", "image_encoder"):
            component = getattr(pipe, name, None)
            if component is not None:
                component.to(self.device)
        if pipe.text_encoder is not None and o.get("text_encoder", "gpu") == "gpu":
            pipe.text_encoder.to(self.device)

    def prepare(self, job) -> None:
        if job.reference:
            g = self.generation_for(job)
            self.reference_cache(g).prefetch(job.reference, kind="image" if self.model.task in ("i2v", "animate")
                                             else "video")
        for role, value in (getattr(job, "inputs", None) or {}).items():
            g = self.generation_for(job)
            if role == "face_video":
                self.reference_cache(g, square=self.face_size).prefetch(value, "video")
            elif role in INPUT_KINDS:
                self.reference_cache(g).prefetch(value, INPUT_KINDS[role])

    # ------------------------------------------------------------------------------------------

    def _embed(self, prompt: str, negative: str, guidance: bool):
        """Prompt embeddings, computed once per (prompt, negative prompt) and kept for the next seeds."""
        key = (prompt, negative if guidance else "")
        cached = self.embeddings.get(key)
        self._job["prompt_cache_hit"] = cached is not None
        if cached is not None:
            self.embeddings.move_to_end(key)
            return cached
        torch = self.torch
        device = torch.device("cpu") if self.text_on_cpu else self.device
        with torch.no_grad():
            positive, negative_embeds = self.pipe.encode_prompt(
                prompt=prompt, negative_prompt=negative, do_classifier_free_guidance=guidance,
                max_sequence_length=int(self.options.get("max_sequence_length", 512)),
                device=device, dtype=self.dtype)
        if self.text_on_cpu:
            positive = positive.to(self.device)
            negative_embeds = negative_embeds.to(self.device) if negative_embeds is not None else None
        self.embeddings[key] = (positive, negative_embeds)
        while len(self.embeddings) > int(self.options.get("prompt_cache", 64)):
            self.embeddings.popitem(last=False)
        return positive, negative_embeds

    def _remember(self, key: str, make):
        """Per-reference encodings (VAE latents, CLIP embeddings), a few kept: jobs come grouped."""
        cached = self.encoded.get(key)
        self._job["reference_encoding_reused"] = cached is not None
        if cached is None:
            cached = make()
            self.encoded[key] = cached
            while len(self.encoded) > 6:  # a few references' worth: animate keeps three encodings per job
                self.encoded.popitem(last=False)
        return cached

    def _video_latents(self, job, generator):
        """The v2v starting latents: the reference encoded once per video, noised per job.

        The same calls, in the same order, as `WanVideoToVideoPipeline` makes when given `video`
        (its timesteps, then `add_noise` at the first kept timestep), so the frames are identical;
        only the VAE encoding is not repeated for the next prompt or seed of the video.
        """
        from diffusers.pipelines.wan.pipeline_wan_video2video import retrieve_latents, retrieve_timesteps
        from diffusers.utils.torch_utils import randn_tensor
        torch, pipe, g = self.torch, self.pipe, self.generation_for(job)

        def encode():
            from PIL import Image
            frames = [Image.fromarray(f) for f in self.reference_cache(g).video(job.reference)]
            video = pipe.video_processor.preprocess_video(frames, height=g.height, width=g.width)
            video = video.to(self.device, dtype=torch.float32)
            with torch.no_grad():
                latents = retrieve_latents(pipe.vae.encode(video.to(pipe.vae.dtype)), sample_mode="argmax")
            z = pipe.vae.config.z_dim
            mean = torch.tensor(pipe.vae.config.latents_mean).view(1, z, 1, 1, 1).to(self.device, torch.float32)
            inverse_std = 1.0 / torch.tensor(pipe.vae.config.latents_std).view(1, z, 1, 1, 1).to(
                self.device, torch.float32)
            return (latents.to(torch.float32) - mean) * inverse_std

        start = self._remember(f"video:{job.reference}:{g.width}x{g.height}x{g.num_frames}@{g.fps}", encode)
        timesteps, steps = retrieve_timesteps(pipe.scheduler, g.steps, self.device, None)
        timesteps, steps = pipe.get_timesteps(steps, timesteps, g.denoising_strength, self.device)
        noise = randn_tensor(start.shape, generator=generator, device=self.device, dtype=torch.float32)
        if hasattr(pipe.scheduler, "add_noise"):
            return pipe.scheduler.add_noise(start, noise, timesteps[:1])
        return pipe.scheduler.scale_noise(start, timesteps[:1], noise)

    def generate(self, job, progress) -> np.ndarray:
        torch, g, pipe = self.torch, self.generation_for(job), self.pipe
        self._use_shift(pipe, g.shift)
        task = self.model.task
        steps = int(g.steps * g.denoising_strength) if task == "v2v" else g.steps
        self._job = {}
        step_times: list[float] = []

        def on_step_end(pipe, step, timestep, callback_kwargs):
            step_times.append(time.time())
            progress(step + 1, steps)
            return {}

        called = time.time()
        with job_memory(self.cuda, self._job, f"{g.width}x{g.height}x{g.num_frames}"):
            high, low = g.guidance
            guidance = high > 1.0 or (low is not None and low > 1.0)
            positive, negative = self._embed(job.prompt, g.negative_prompt, guidance)
            generator = torch.Generator(device="cpu").manual_seed(int(job.seed))
            kwargs = dict(prompt_embeds=positive, negative_prompt_embeds=negative, height=g.height, width=g.width,
                          num_inference_steps=g.steps, guidance_scale=high, generator=generator, output_type="np",
                          callback_on_step_end=on_step_end, **g.extra)
            if low is not None:
                kwargs["guidance_scale_2"] = low
            if task == "v2v":
                kwargs.update(latents=self._video_latents(job, generator), strength=g.denoising_strength)
            elif task == "animate":
                kwargs["segment_frame_length"] = g.num_frames  # one segment: num_frames of pose make the video
            else:
                kwargs["num_frames"] = g.num_frames
            if task in ("vace", "animate"):
                self._conditioned_inputs(job, kwargs, g)
            if task == "i2v":
                from PIL import Image
                image = Image.fromarray(self.reference_cache(g).image(job.reference))
                kwargs["image"] = image
                if getattr(pipe, "image_encoder", None) is not None:
                    # The pipeline takes `image_embeds` only without `image`, which it needs for the
                    # VAE condition, so the CLIP embedding is remembered at its own call instead.
                    original = type(pipe).encode_image
                    key = f"image:{job.reference}:{g.width}x{g.height}"
                    pipe.encode_image = lambda image, device=None: self._remember(
                        key, lambda: original(pipe, image, device))
            with torch.no_grad():
                video = pipe(**kwargs).frames[0]
        returned = time.time()
        if len(step_times) > 1:  # steady state: the first step also pays for warm-up
            self._job["seconds_per_step"] = round((step_times[-1] - step_times[0]) / (len(step_times) - 1), 4)
        self._job.update(steps=len(step_times), timeline={
            "called": round(called, 3), "first_step_done": round(step_times[0], 3) if step_times else None,
            "last_step_done": round(step_times[-1], 3) if step_times else None, "returned": round(returned, 3)})
        video = np.asarray(video)
        if video.dtype != np.uint8 and not np.isfinite(video).all():
            raise NonFiniteFrames(self.model.speed)
        if video.dtype != np.uint8:
            video = (np.clip(video, 0.0, 1.0) * 255).round().astype(np.uint8)
        return video

    def _conditioned_inputs(self, job, kwargs: dict, g) -> None:
        """VACE's and Animate's pipeline arguments, from the job's reference and `inputs` (read by
        orchestrator.media's rules through the worker's ReferenceCache at the job's size, length and
        rate `g`; what is kept per file is kept per that shape too)."""
        from PIL import Image
        inputs = dict(getattr(job, "inputs", None) or {})
        references, shape = self.reference_cache(g), f"{g.width}x{g.height}x{g.num_frames}@{g.fps}"

        def frames(path, cache=None):
            return [Image.fromarray(f) for f in (cache or references).video(path)]

        def needs(role):
            if not inputs.get(role):
                raise ValueError(f"task {self.model.task} needs the job's `{role}` input, which {job.key} lacks")
            return inputs[role]
        if self.model.task == "vace":
            kwargs["video"] = frames(job.reference)
            if inputs.get("reference_image"):
                kwargs["reference_images"] = [Image.fromarray(references.image(inputs["reference_image"]))]
            # The control video's VAE encoding (with its reference image) depends on those files only
            # (argmax latents, no noise): kept per (video, image), so their prompts × seeds encode it once.
            original = type(self.pipe).prepare_video_latents
            key = f"vace:{job.reference}:{inputs.get('reference_image')}:{shape}"
            self.pipe.prepare_video_latents = lambda *a, **k: self._remember(
                key, lambda: original(self.pipe, *a, **k))
        else:
            kwargs["image"] = Image.fromarray(references.image(job.reference))
            kwargs["pose_video"] = frames(needs("pose_video"))
            kwargs["face_video"] = frames(needs("face_video"), self.reference_cache(g, square=self.face_size))
            kwargs["mode"] = "animate"
            # The pose video's and the image's VAE latents (argmax, no noise) and the image's CLIP embedding
            # depend on those files only: kept per file, so their prompts × seeds encode each once. (The
            # face video runs through the transformer's own motion encoder at every step.)
            pipe, pipeline_class = self.pipe, type(self.pipe)
            for method, key in (("prepare_pose_latents", f"pose:{inputs['pose_video']}:{shape}"),
                                ("prepare_reference_image_latents", f"animate-image:{job.reference}:{shape}"),
                                ("encode_image", f"clip:{job.reference}:{shape}")):
                original = getattr(pipeline_class, method)
                setattr(pipe, method, lambda *a, _original=original, _key=key, **k: self._remember(
                    _key, lambda: _original(pipe, *a, **k)))

    def prepare_denoise(self, job) -> None:
        """vace and animate: the transformer's arguments at `job`'s first step (the control video's VACE
        latents; the pose, face and reference conditioning), recorded by running the job up to that call."""
        self._denoise_inputs = None
        if self.model.task not in ("vace", "animate"):
            return

        # The pipeline's transformer is swapped for a stand-in that stops at the call, not given a hook:
        # with `compile: full` a hook would be traced into the compiled graph. Set past the pipeline's
        # own __setattr__, which would register the stand-in as a component in its config.
        transformer = self.pipe.transformer
        object.__setattr__(self.pipe, "transformer", _StopAtCall(transformer))
        try:
            self._denoise_inputs = run_to_first_denoiser_call(self, job)
        finally:
            object.__setattr__(self.pipe, "transformer", transformer)

    def denoise_once(self, seed: int):
        torch, pipe, g = self.torch, self.pipe, self.generation
        recorded = getattr(self, "_denoise_inputs", None)
        if recorded is None and self.model.task in ("vace", "animate"):
            raise RuntimeError(f"task {self.model.task}: call prepare_denoise(job) first; this transformer takes "
                               "the job's own encoded inputs")
        if recorded is not None:
            latents = recorded.kwargs["hidden_states"]
            noise = torch.randn(latents.shape, generator=torch.Generator(device="cpu").manual_seed(seed))
            with torch.no_grad():
                return pipe.transformer(*recorded.args, **{**recorded.kwargs, "return_dict": False,
                                                           "hidden_states": noise.to(latents.device, latents.dtype)})[0]
        transformer, config = pipe.transformer, pipe.transformer.config
        frames = (g.num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        shape = (1, config.in_channels, frames, g.height // pipe.vae_scale_factor_spatial,
                 g.width // pipe.vae_scale_factor_spatial)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        draw = lambda *size: torch.randn(*size, generator=generator).to(self.device, self.dtype)  # noqa: E731
        kwargs = {"hidden_states": draw(*shape), "encoder_hidden_states": draw(1, 512, config.text_dim),
                  "timestep": torch.tensor([500.0], device=self.device), "return_dict": False}
        if config.get("image_dim"):  # Wan2.1 I2V: the CLIP image embedding's tokens
            kwargs["encoder_hidden_states_image"] = draw(1, 257, config.image_dim)
        with torch.no_grad():
            return transformer(**kwargs)[0]

    def job_info(self) -> dict:
        caches = self.__dict__.get("_reference_caches", {}).values()
        return {**self._job, "reference_cache": {"hits": sum(c.hits for c in caches),
                                                 "misses": sum(c.misses for c in caches)}}

    def peak_memory_bytes(self) -> int | None:
        return self._job.get("peak_memory_bytes") if getattr(self, "_job", None) else None

    def close(self) -> None:
        self.pipe = None
        self.embeddings = OrderedDict()
        self.encoded = OrderedDict()
        self.close_reference_caches()
        release_memory(getattr(self, "cuda", False))


class _StopAtCall:
    """A denoiser as a pipeline sees it (every attribute is the module's) whose call raises
    `FirstDenoiserCall` with its arguments instead of running."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)

    def __call__(self, *args, **kwargs):
        raise FirstDenoiserCall(args, kwargs)
