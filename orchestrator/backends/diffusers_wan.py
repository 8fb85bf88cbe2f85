"""The diffusers backend: Wan 2.1 / 2.2 text-, image- and video-to-video from a local checkpoint folder.

This module owns the worker's side: loading the pipeline (placement, offload, the speed settings), one
job, the denoiser probe. Beside it: what is checked before the start (`diffusers_checks`), each task's
inputs as the pipeline takes them and the encodings kept per reference (`diffusers_inputs`).

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

LoRAs (`model.loras`) are PEFT adapters applied at load, before the speed settings and the offload
hooks, and switched in place between jobs (`use_loras`, `diffusers_loras`); under fp8, int8 or
fp8_storage they are fused into the weights before those are quantized. Each job's info splits its time
into text encoding, denoise and VAE decode (`seconds`). On Wan2.2 each expert's own cfg decides whether
its steps run the unconditional pass (diffusers alone decides both from the first scale).

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
kernels; `sage`: SageAttention 2's `sageattn`, which picks its kernel for the card; or any diffusers
backend whose package is installed); `quantize` is torchao on
the blocks' Linear layers (`int8` before the move to the card, so a model too large in bf16 still
loads; `fp8` on the card) or `enable_layerwise_casting` for `fp8_storage`; `cache` is one of diffusers'
step caches, set up per job on each expert with the steps it runs (`diffusers_caches`), its counts of
computed and reused steps in each job's info (`cache`).
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import numpy as np

from .. import speed as speed_settings
from ..backend import Backend, FirstDenoiserCall, NonFiniteFrames, fuses_loras, run_to_first_denoiser_call
from ..checkpoints import load_components
from ..manifest import SpeedConfig
from . import diffusers_checks as checks
from .cuda import job_memory, release_memory
from .diffusers_caches import StepCaches
from .diffusers_checks import PIPELINES, read_checkpoint_config
from .diffusers_inputs import prefetch, task_inputs
from .diffusers_loras import LoraAdapters
from .shared import lora_problems, model_files_identity

log = logging.getLogger(__name__)


class DiffusersWanBackend(Backend):
    name = "diffusers"
    runs_on_cpu = True  # it does run on the CPU, slowly: CI uses tiny random-weight checkpoints
    verify_checkpoint = True
    checkpoint_layout = "diffusers"
    # Where and how memory-thriftily it runs, not what it draws: these stay out of job ids.
    runtime_options = frozenset({"offload", "group_offload_blocks", "device_map", "max_memory_gib", "text_encoder",
                                 "prompt_cache", "vae_slicing", "parallel_load"})
    # LoRAs are PEFT adapters switched in place between jobs (`diffusers_loras`); fused into the weights, and
    # so loaded again on a change, where `backend.fuses_loras` says (8-bit weights, or LoRAs no axis changes).
    switches_loras = True

    @classmethod
    def check(cls, manifest) -> list:
        return checks.manifest_problems(manifest, cls.checkpoint_layout)

    @classmethod
    def check_loras(cls, manifest, files) -> list:
        return lora_problems(manifest, cls.checkpoint_layout, files)

    @classmethod
    def plan_notes(cls, manifest) -> list[str]:
        return checks.plan_notes(manifest)

    # ------------------------------------------------------------------------------------------

    def load(self) -> None:
        import diffusers
        import torch


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
            lora_facts = self._apply_loras(pipe)  # before `_apply_speed(pipe, "card")` quantizes
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
            # LoRAs before the speed settings (a fused LoRA goes into the weights before they are quantized)
            # and before `_place`'s offload hooks (the adapters' layers are then offloaded with their blocks)
            lora_facts = self._apply_loras(pipe)
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
        # the step cache (`speed.cache`) is set up per job: a cache axis switches it without a reload
        self.step_caches = StepCaches(pipe, model_files_identity(self.model.path))
        self.two_experts = info["two_experts"]
        self.text_on_cpu = o.get("text_encoder") == "cpu" and o.get("offload", "none") == "none"
        self.embeddings: OrderedDict[tuple[str, str], tuple] = OrderedDict()
        self.references = self.reference_cache(self.generation)
        self.face_size = info["face_size"] or 512  # Animate's face crops, at its motion encoder's size
        self.encoded: OrderedDict[str, object] = OrderedDict()  # v2v latents / i2v image embeddings
        self._job: dict = {}
        self._pending_switch: dict | None = None  # `use_loras`' facts, for the next job's info
        self.load_info = {
            "load_seconds": round(time.monotonic() - started, 2),
            "components": {k: round(v, 2) for k, v in seconds.items()},
            "pipeline": pipeline_class.__name__, "model_files": model_files_identity(self.model.path),
            "parallel_load": bool(o.get("parallel_load", True)) and not self.device_mapped,
            "speed": {**self.model.to_dict()["speed"], **({"applied": speed_facts} if speed_facts else {})},
        }
        if lora_facts:
            self.load_info["loras"] = lora_facts
        log.debug("loaded %s as %s in %.1f s (%s; speed applied: %s; seconds per component %s)", self.model.path,
                  pipeline_class.__name__, self.load_info["load_seconds"],
                  f"device_map {o.get('device_map', 'balanced')}" if self.device_mapped
                  else f"offload {o.get('offload', 'none')}", speed_facts or "none", self.load_info["components"])

    def _apply_loras(self, pipe) -> list[dict]:
        """`self.model.loras` on the freshly built pipeline: PEFT adapters, or merged into the weights (the adapters
        then removed) where `backend.fuses_loras` says so: before a quantize of FUSING_QUANTIZE, or because the
        sweep never changes them (an adapter costs 7.6% a step)."""
        self.adapters = LoraAdapters(pipe, scales_as_tensors=self.model.speed.compile != "none")
        if fuses_loras(self.model):
            return self.adapters.fuse(self.model.loras)
        return self.adapters.use(self.model.loras)

    def use_loras(self, loras) -> None:
        """Switch the active LoRAs in place (`LoraAdapters.use`): a new file is read once and kept, a
        strength or set change only sets the adapters' scales. Timed; the next job's info gets the time.

        With `speed.compile`, the compiled blocks contain the adapters' layers: a change of the active set
        changes the traced code and a change of a scale a constant the graph was specialised on, so the
        next job may recompile (and past dynamo's cache size limit run eager). Not measured on the CPU; a
        sweep of strengths under compile is measured on a card (`docs/benchmarks.md`)."""
        started = time.monotonic()
        facts = self.adapters.use(tuple(loras))
        self._pending_switch = {"seconds": round(time.monotonic() - started, 3), "loras": facts}
        log.debug("switched LoRAs in %.2f s: %s", self._pending_switch["seconds"], facts)

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

    def attention_plan(self):
        """What the attention guard checks (`attention_guard`): the transformers' attention backend through
        diffusers' dispatcher; under `auto` (diffusers' `native`: torch SDPA's own pick), then each SDPA
        kernel, any of which the worker falls back to with `set_attention_backend` on both experts."""
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry
        from .. import attention_guard as guard
        attention = self.model.speed.attention
        config = self.pipe.transformer.config
        heads, head_dim = config.num_attention_heads, config.attention_head_dim
        plan = dict(heads=heads, head_dim=head_dim, dtype=self.dtype, device=self.device)
        if attention != "auto":
            return guard.Plan([guard.diffusers_kernel(speed_settings.DIFFUSERS_SDPA.get(attention, attention))],
                              auto=False, **plan)

        def use(sdpa: str) -> None:
            for name in ("transformer", "transformer_2"):
                transformer = getattr(self.pipe, name, None)
                if transformer is not None:
                    transformer.set_attention_backend(speed_settings.DIFFUSERS_SDPA.get(sdpa, "native"))
        active = _AttentionBackendRegistry.get_active_backend()[0].value
        first = None if active == "native" else guard.diffusers_kernel(None)
        kernels = guard.sdpa_chain(guard.shape_for(heads, head_dim, self.device), self.dtype, self.device, use,
                                   first=first, first_is_sdpa=first is None, label="diffusers native")
        return guard.Plan(kernels, auto=True, **plan)

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
        prefetch(self, job)

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
        if self.cuda:
            torch.cuda.synchronize()  # once per new prompt: its encoding's time is counted as the text encoder's
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

    def generate(self, job, progress) -> np.ndarray:
        torch, g, pipe = self.torch, self.generation_for(job), self.pipe
        self._use_shift(pipe, g.shift)
        task = self.model.task
        steps = int(g.steps * g.denoising_strength) if task == "v2v" else g.steps
        self._job = {}
        if self._pending_switch:  # the LoRA switch made before this job
            self._job["lora_switch"], self._pending_switch = self._pending_switch, None
        step_times: list[float] = []
        denoised: list[float] = []  # monotonic time of the last step's end

        def on_step_end(pipe, step, timestep, callback_kwargs):
            if guidance_per_expert:
                guidance_per_expert(step)
            if step + 1 == pipe.num_timesteps:
                if self.cuda:  # one wait per job: the denoise's kernels are counted as the DiT's, not the VAE's
                    torch.cuda.synchronize()
                denoised.append(time.monotonic())
            step_times.append(time.time())
            progress(step + 1, steps)
            return {}

        called = time.time()
        with job_memory(self.cuda, self._job, f"{g.width}x{g.height}x{g.num_frames}"):
            high, low = g.guidance
            guidance = high > 1.0 or (low is not None and low > 1.0)
            guidance_per_expert = self._guidance_per_expert(pipe, high, low)
            encoding = time.monotonic()
            positive, negative = self._embed(job.prompt, g.negative_prompt, guidance)
            encoded = time.monotonic()
            generator = torch.Generator(device="cpu").manual_seed(int(job.seed))
            kwargs = dict(prompt_embeds=positive, negative_prompt_embeds=negative, height=g.height, width=g.width,
                          num_inference_steps=g.steps, guidance_scale=high, generator=generator, output_type="np",
                          callback_on_step_end=on_step_end, **g.extra)
            if low is not None:
                kwargs["guidance_scale_2"] = low
            task_inputs(self, job, kwargs, g, generator)
            self._use_cache(job, kwargs, g.steps, steps)
            with torch.no_grad():
                denoising = time.monotonic()
                video = pipe(**kwargs).frames[0]  # (frames as numpy: on a card, the copy waits for the decode)
                decoded = time.monotonic()
        returned = time.time()
        # The job's time by part, wall clock: the prompt's encoding (0 on a cached prompt); the denoising loop,
        # from the pipeline's call to the end of its last step (the latents' preparation, and in i2v the
        # first frame's VAE encoding inside the pipeline, included); the VAE decode and its conversion to
        # frames, the rest of the call. What lies between (the task's inputs, read ahead) is in none.
        if denoised:
            self._job["seconds"] = {"text_encoder": round(encoded - encoding, 4),
                                    "denoise": round(denoised[-1] - denoising, 4),
                                    "vae_decode": round(decoded - denoised[-1], 4)}
        if len(step_times) > 1:  # steady state: the first step also pays for warm-up
            self._job["seconds_per_step"] = round((step_times[-1] - step_times[0]) / (len(step_times) - 1), 4)
        if "cache" in self._job:
            self._job["cache"].update(self.step_caches.counts())
        self._job.update(steps=len(step_times), timeline={
            "called": round(called, 3), "first_step_done": round(step_times[0], 3) if step_times else None,
            "last_step_done": round(step_times[-1], 3) if step_times else None, "returned": round(returned, 3)})
        video = np.asarray(video)
        if video.dtype != np.uint8 and not np.isfinite(video).all():
            raise NonFiniteFrames(self.model.speed)
        if video.dtype != np.uint8:
            video = (np.clip(video, 0.0, 1.0) * 255).round().astype(np.uint8)
        return video

    def _use_cache(self, job, kwargs: dict, steps: int, steps_run: int) -> None:
        """Set up the job's step cache (its own `speed.cache`: an axis changes it between jobs). MagCache's
        first job of a step count calibrates it: the job's own settings run once more, uncached, to latents
        only; the ratios are kept under `.sweep/compile_cache/magcache/` for the sweep's other workers."""
        cache = (job.model or self.model).speed.cache
        torch, pipe = self.torch, self.pipe

        def run_uncached():
            with torch.no_grad():
                pipe(**{**kwargs, "generator": torch.Generator(device="cpu").manual_seed(int(job.seed)),
                        "callback_on_step_end": None, "output_type": "latent"})
        calibration = _calibration_dir(job) if cache.startswith("magcache") else None
        facts = self.step_caches.use(cache, steps, steps_run, calibration, run_uncached)
        if facts:
            self._job["cache"] = facts

    @staticmethod
    def _guidance_per_expert(pipe, high: float, low: float | None):
        """Wan2.2 with one expert's cfg at most 1 and the other's above: diffusers decides whether a step runs
        the unconditional pass from `guidance_scale` (the high expert's) alone, for both experts, so at
        cfg (1, 5) the low expert would run unguided and at (3.5, 1) run an unconditional pass for nothing.
        Returns the step callback's part that sets, after each step, the pipeline's guidance to the scale of
        the expert that runs the next one (its loop reads `do_classifier_free_guidance` at every step; the
        scale it multiplies by is its own per expert); None where there is nothing to mend. The first step
        is the high expert's (denoising from pure noise starts above the boundary)."""
        if low is None or (high > 1.0) == (low > 1.0) or getattr(pipe.config, "boundary_ratio", None) is None:
            return None
        boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps

        def before_next_step(step: int) -> None:
            timesteps = pipe.scheduler.timesteps
            if step + 1 < len(timesteps):
                pipe._guidance_scale = high if timesteps[step + 1] >= boundary else low
        return before_next_step

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
        if getattr(self, "step_caches", None) is not None:
            self.step_caches.close()
        self.step_caches = None
        self.pipe = None
        self.adapters = None  # (it holds the pipeline too)
        self.embeddings = OrderedDict()
        self.encoded = OrderedDict()
        self.close_reference_caches()
        release_memory(getattr(self, "cuda", False))


def _calibration_dir(job) -> Path | None:
    """Where MagCache's calibrations of this job's sweep are kept: beside its compile cache, under the
    sweep's output folder (the job's output path less its name under that folder); None for a job made by
    hand outside a sweep's layout (its calibration is then kept in memory only)."""
    output = Path(job.output)
    try:
        if job.name:
            root = output.parents[len(Path(job.name).parts) - 1]
        else:  # the fixed layout category/stem/seed_S_prompt_I
            root = output.parents[2 if job.stem else 1]
    except IndexError:
        return None
    return speed_settings.compile_cache_dir(root).parent / "magcache"


class _StopAtCall:
    """A denoiser as a pipeline sees it (every attribute is the module's) whose call raises
    `FirstDenoiserCall` with its arguments instead of running."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)

    def __call__(self, *args, **kwargs):
        raise FirstDenoiserCall(args, kwargs)
