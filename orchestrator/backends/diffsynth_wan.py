"""The diffsynth backend: DiffSynth-Studio's `WanVideoPipeline` from model files in the original Wan layout.

This module owns the worker's side: loading the pipeline, the speed settings, one job, the denoiser probe.
Beside it: what is checked before the start (`diffsynth_checks`), each task's inputs as the pipeline
takes them (`diffsynth_inputs`), the model files and their fingerprints (`diffsynth_files`), the
encoding caches (`diffsynth_caches`).

This is the library the user's motion-transfer experiment runs in (Wan2.1-T2V-14B, video-to-video from
a reference clip with `denoising_strength`, VRAM management, tiled VAE). A worker loads the pipeline
once and keeps it for every job.

The model folder (`model.path`) is an original Wan release folder, e.g. `Wan2.1-T2V-14B/`
(diffsynth_files.py lists its files). Every file goes through DiffSynth's own loader, which recognises
a file by a fingerprint of its tensor names and shapes; `check()` computes the same fingerprint from
the files' headers (diffsynth_files.identify) before anything starts, so an unrecognised file, a
missing file or a model that cannot run the task is reported at the manifest's line rather than in
every worker after the start.

Tasks: `t2v`; `v2v` (the reference video, read by `orchestrator.media`'s rule, is the `input_video`
and `generation.denoising_strength` < 1 says how much of it is replaced by noise); `i2v` (the reference
image is the first frame; needs an image-to-video DiT). Wan's conditioned tasks (issue 23), their inputs
from `Job.inputs`, each read by media.py's rules and kept per worker:
  vace     Wan2.1-VACE: the control video as `vace_video`, an optional `vace_reference_image`
  control  Wan-Fun Control: `control_video` and an optional `reference_image`; Fun Control-Camera: the
           image as `input_image` and `camera_control_direction`
  animate  Wan2.2-Animate: the image as `input_image`, `animate_pose_video`, `animate_face_video` (at the
           adapter's face size); DiffSynth is asked for num_frames + 4 (it drops the reference's latent frame)
  s2v      Wan2.2-S2V: the image as `input_image`, `input_audio` at 16 kHz through the wav2vec2 encoder of
           `wav2vec2-large-xlsr-53-english/` (weights and processor); video at 16 fps
VACE blocks and the Animate adapter are in the DiT's own file: DiffSynth's table lists a second model
under its fingerprint and loads both; `check()` names the part a folder lacks for its task
(diffsynth_files.TASK_PARTS).

Options (`model.options`):
  vram_management: true | false | text_encoder
                       DiffSynth's VRAM management (what `pipe.enable_vram_management()` was in 1.x):
                       true (default, as in the user's experiment) manages every component: weights
                       wait in CPU memory, layers move to the GPU while there is room under
                       `vram_limit_gib` and the component not in use goes back to the CPU.
                       `text_encoder` manages only the 11 GB text encoder (needed only when a prompt
                       is not in the cache) and keeps the DiT and VAE resident: fastest when they fit.
                       false keeps everything on the GPU.
  vram_limit_gib: float      the GPU memory DiffSynth may fill before it streams layers instead
                             (default: the card's memory − 0.5 GiB, DiffSynth 1.x's default)
  tiled: bool                tiled VAE encode/decode (default true, DiffSynth's default)
  tile_size: [h, w]          tile size in latent pixels (default [30, 52])
  tile_stride: [h, w]        tile stride in latent pixels (default [15, 26])
  tokenizer: path            the tokenizer folder, relative to model.path or absolute
                             (default `<model.path>/google/umt5-xxl`)
  model_files: {dit: glob | [globs], text_encoder: file, vae: file, image_encoder: file}
                             files relative to model.path, instead of the layout above; each `dit`
                             entry is one DiT (a glob may match its shards)
  prompt_cache: int          prompts whose embeddings a worker keeps (default 64)
  reference_cache: int       reference videos whose VAE-encoded latents a worker keeps (default 4)
Options that do not change pixels (vram_management, vram_limit_gib, prompt_cache, reference_cache)
stay out of job ids.

`generation.shift` is DiffSynth's `sigma_shift` (left out: DiffSynth's 5.0). `generation.cfg_scale` is one
scale: DiffSynth's pipeline has one for both Wan2.2 experts, so a pair must repeat one value.
`generation.extra` passes these `WanVideoPipeline` arguments: cfg_merge, switch_DiT_boundary (Wan2.2
A14B), tea_cache_l1_thresh, tea_cache_model_id, sliding_window_size, sliding_window_stride.

Speed (`speed:`, orchestrator/speed.py), applied to the DiT (both of Wan 2.2 A14B's): `compile: blocks`
compiles each DiT block (DiffSynth's `model_fn_wan_video` calls the blocks itself, so `full` has nothing
to compile and is refused); `attention` cudnn | flash | efficient | math runs torch SDPA with that kernel
(DiffSynth's own choice, flash-attn or SageAttention when installed, is `auto`); `quantize` fp8 | int8 is
torchao on the blocks' Linear layers, `fp8_storage` keeps their weights in float8 and computes in the
model's dtype. All but `attention` need the DiT resident on the card: vram_management false or
text_encoder (streamed layers would lose the compiled graphs and quantized weights at each move).

Per job: DiffSynth's own seed argument with `rand_device="cpu"` (the initial noise comes from a CPU
`torch.Generator`, so a seed gives the same video on any card, and a rerun the same frames); the
pipeline's progress iterator reports each step; CUDA out-of-memory becomes `OutOfMemory`.

LoRAs (`model.loras`, `diffsynth_loras`): DiffSynth's `load_lora` puts each LoRA into `dit` (Wan2.2 A14B's
high-noise expert, or the only DiT) and `dit2` (the low-noise expert) at its strength for that expert.
They are hot-loaded (the base weights untouched), so `use_loras` switches sets, files and strengths
between jobs exactly: DiffSynth's `clear_lora()`, then the new set, from a cache of the last files read.
With `speed.quantize` (fp8, int8, fp8_storage) they are fused into the weights before the quantize step
instead, and any change of LoRAs reloads the model. `load_info["loras"]` records each (file, digest,
strength, expert, mode hot|fused, layers patched, seconds); a switch's record goes into the next job's
facts (`lora_switch`).

cfg 1: DiffSynth runs neither the negative prompt's encoding nor the DiT's unconditional pass when
`cfg_scale` is 1 (its unit runner and denoising loop test `cfg_scale != 1`). `cfg_merge` is dropped at
cfg 1: DiffSynth would still batch the conditional input twice.

Where a job's time goes (`job_info()["seconds"]`), from marks the backend already has:
  text_encoder  the text encoder's forward passes (hooks before and after it; 0 when every prompt was in the
                cache)
  inputs        the rest before the first step: reading and VAE-encoding references, the noise, moving
                managed models
  denoise       from the denoising loop's start (the step iterator's first call) to its last step's end
  vae_decode    from the last step's end to the pipeline's return (the VAE decode and its onloading)
  total         the whole `generate` call, frames converted to uint8 included
On a GPU each mark waits for the card first (`torch.cuda.synchronize`: a few per job), so the parts are
the card's time, not the queue's.

Caches (`diffsynth_caches`): the pipeline's units that encode prompts, reference videos and images,
control and pose videos and audio are replaced by ones that keep their output per worker, so the jobs
of one input (prompts × seeds) encode it once; the job's noise is still mixed in per job.
TI2V-5B's fused first-frame latents depend on the job's noise and are encoded per job (one frame).

Without a GPU the pipeline runs on the CPU: the CI tests build a tiny pipeline
(`orchestrator.demo.random_checkpoints.build_tiny_checkpoint`)
from DiffSynth's component classes with tiny configurations. DiffSynth's loader only recognises
full-size files (by their fingerprint), so a tiny folder carries a marker, `wan_sweep_tiny_random.json`,
that names each file's class and configuration; only then (`orchestrator.demo.tiny_folder`) does the
loader skip the recognition and load the file with those (through DiffSynth's same `load_model`,
converters and VRAM wrappers). CI
therefore covers everything except the recognition itself; `bench/gpu_diffsynth.sh` proves that with
full-size random weights saved in the original layout.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import speed as speed_settings
from ..backend import (Backend, BackendProblem, FirstDenoiserCall, NonFiniteFrames, fuses_loras,
                       run_to_first_denoiser_call)
from ..demo import tiny_folder
from ..manifest import CONDITIONED_TASKS
from . import diffsynth_checks as checks
from .cuda import job_memory, release_memory
from .diffsynth_caches import install_caches
from .diffsynth_checks import DEFAULT_TILE, teacache_model_id
from .diffsynth_files import COMPONENTS, MODEL_NAMES, PART_NAMES, TASK_PARTS, model_files
from .diffsynth_inputs import prefetch, task_inputs
from .diffsynth_loras import PipelineLoras
from .shared import lora_problems, model_files_identity

log = logging.getLogger(__name__)
# DiffSynth's Wan DiT calls flash-attn 3, flash-attn 2 or SageAttention when its module flag says importable
DIFFSYNTH_OWN_KERNELS = ("FLASH_ATTN_3_AVAILABLE", "FLASH_ATTN_2_AVAILABLE", "SAGE_ATTN_AVAILABLE")


class DiffSynthWanBackend(Backend):
    name = "diffsynth"
    runs_on_cpu = True  # slowly; the CI tests run a tiny pipeline on the CPU
    runtime_options = frozenset({"vram_management", "vram_limit_gib", "prompt_cache", "reference_cache"})
    path_options = frozenset({"tokenizer"})  # resolved by the manifest against its folder
    verify_checkpoint = True
    checkpoint_layout = "wan"
    switches_loras = True  # hot-loaded LoRAs (diffsynth_loras); fused ones, with speed.quantize, reload

    @classmethod
    def check(cls, manifest) -> list[str | BackendProblem]:
        return checks.manifest_problems(manifest, cls.checkpoint_layout)

    @classmethod
    def plan_notes(cls, manifest) -> list[str]:
        return checks.plan_notes(manifest)

    @classmethod
    def check_loras(cls, manifest, files) -> list:
        return lora_problems(manifest, cls.checkpoint_layout, files)

    # ------------------------------------------------------------------------------------------

    def load(self) -> None:
        started = time.perf_counter()
        import torch
        from diffsynth.pipelines.wan_video import WanVideoPipeline
        imported = time.perf_counter()

        o = self.options = dict(self.model.options)
        self.torch = torch
        self.dtype = getattr(torch, self.model.dtype)
        self.cuda = torch.cuda.is_available() and bool(self.devices)
        self.device = "cuda" if self.cuda else "cpu"  # CUDA_VISIBLE_DEVICES holds this worker's card
        files, problems = model_files(self.model.path, o)
        if problems:
            raise FileNotFoundError("; ".join(p.message for p in problems))
        self.files = files
        vram_config, vram_limit = self._vram_config()
        tiny = tiny_folder(self.model.path)  # a test folder, whose marker names each file's class

        pipe = WanVideoPipeline(device=self.device, torch_dtype=self.dtype)
        seconds: dict[str, float] = {}
        loaded: dict[str, Any] = {}
        parts = TASK_PARTS.get(self.model.task, ())
        for component in COMPONENTS + parts:
            if component == "image_encoder" and self.model.task not in ("i2v", "animate", "control"):
                continue  # only the tasks with a first frame or reference image use it
            if component in ("vace", "animate_adapter"):
                if tiny is None:
                    continue  # loaded with the DiT, from the same file
                entries = files["dit"]  # the part's own converter takes its tensors from the DiT's file
            else:
                entries = files["dit"] if component == "dit" else [files[component]] if files[component] else []
            for entry in entries:
                t0 = time.perf_counter()
                config = dict(vram_config) if self._managed(component) else self._plain_config()
                if tiny:
                    loaded.setdefault(component, []).append(tiny.load(component, entry, config, vram_limit))
                else:
                    models = self._load_recognised(component, entry, config, vram_limit)
                    for name, model in models.items():  # a DiT's file may hold VACE blocks or the Animate adapter
                        part = next((c for c, n in MODEL_NAMES.items() if n == name), None)
                        if part == component or (part in parts and component == "dit"):
                            loaded.setdefault(part, []).append(model)
                seconds[component] = round(seconds.get(component, 0.0) + time.perf_counter() - t0, 3)
        for part in parts:
            if not loaded.get(part):
                raise ValueError(f"task {self.model.task} needs {PART_NAMES[part]}, which {self.model.path} does "
                                 "not hold")
        self._assemble(pipe, loaded)
        if "audio_encoder" in parts:
            from transformers import Wav2Vec2Processor
            pipe.audio_processor = Wav2Vec2Processor.from_pretrained(Path(files["audio_encoder"]).parent)
        # (before the LoRAs: wrapping a DiT for hot-loading marks it managed, which changes nothing here)
        pipe.vram_management_enabled = pipe.check_vram_management_state()
        # LoRAs before the speed settings: fused ones go into the weights before they are quantized
        self.loras = PipelineLoras(pipe, fused=fuses_loras(self.model))
        lora_records = self.loras.apply(self.model.loras)
        speed_facts = self._apply_speed(pipe)
        t0 = time.perf_counter()
        from diffsynth.models.wan_video_text_encoder import HuggingfaceTokenizer
        pipe.tokenizer = HuggingfaceTokenizer(name=files["tokenizer"], seq_len=512, clean="whitespace")
        seconds["tokenizer"] = round(time.perf_counter() - t0, 3)
        self._time_text_encoder(pipe.text_encoder)
        install_caches(self, pipe)
        _quiet_vae_progress()
        self.pipe = pipe

        self.references = self.reference_cache(self.generation)
        # Animate's face video is read at the square size its motion encoder takes (512 in the release)
        self.face_size = _face_size(pipe.animate_adapter) if pipe.animate_adapter is not None else None
        self._job: dict = {}
        self._lora_switch: dict | None = None
        self.load_info = {
            "backend": self.name, "load_seconds": round(time.perf_counter() - started, 3),
            "import_seconds": round(imported - started, 3), "components": seconds,
            "loader": "components from wan_sweep_tiny_random.json (tests)" if tiny
                      else "diffsynth ModelPool.auto_load_model (files recognised by fingerprint)",
            "files": {k: v for k, v in files.items()},
            "model_files": model_files_identity(self.model.path),
            "vram_management": o.get("vram_management", True), "vram_limit_gib": vram_limit,
            "speed": {**self.model.to_dict()["speed"], **({"applied": speed_facts} if speed_facts else {})},
            **({"loras": lora_records} if lora_records else {}),
        }
        log.debug("loaded %s in %.1f s (%s; vram_management %s, limit %s GiB; seconds per component %s)",
                  self.model.path, self.load_info["load_seconds"], self.load_info["loader"],
                  self.load_info["vram_management"], vram_limit, seconds)

    def _apply_speed(self, pipe) -> dict:
        """The `speed:` settings on each DiT (two for Wan2.2 A14B); the attention kernel is chosen per
        call in `generate` instead (DiffSynth calls torch SDPA itself)."""
        speed = self.model.speed
        self.sdpa_attention = speed.attention  # SDPA's kernel in `generate`; the guard may change it under auto
        if speed.attention != "auto":
            # DiffSynth prefers flash-attn 3/2 and SageAttention whenever they are importable; a chosen
            # SDPA kernel means SDPA, so those module flags are turned off in this worker process, and
            # `sage` leaves SageAttention alone on (its `sageattn`, which picks the kernel for the card).
            from diffsynth.models import wan_video_dit
            for flag in DIFFSYNTH_OWN_KERNELS:
                setattr(wan_video_dit, flag, flag == "SAGE_ATTN_AVAILABLE" and speed.attention == "sage")
            log.info("speed.attention %s: DiffSynth's own flash-attn%s are off in this worker", speed.attention,
                     "" if speed.attention == "sage" else " and SageAttention")
        step = replace(speed, attention="auto")
        if step.is_default:
            return {}
        return {name: speed_settings.apply_to_denoiser(dit, list(dit.blocks), step, compute_dtype=self.dtype,
                                                       library="diffsynth")
                for name, dit in (("dit", pipe.dit), ("dit2", pipe.dit2)) if dit is not None}

    def attention_plan(self):
        """What the attention guard checks (`attention_guard`): DiffSynth's own attention function as the DiT
        calls it; under `auto`, then torch SDPA's kernels, any of which the worker falls back to by turning
        DiffSynth's own kernels off and restricting SDPA (`sdpa_attention`)."""
        from diffsynth.models import wan_video_dit
        from .. import attention_guard as guard
        attention = self.model.speed.attention
        attn = self.pipe.dit.blocks[0].self_attn
        heads, head_dim = attn.num_heads, attn.dim // attn.num_heads
        first = guard.diffsynth_kernel(self.sdpa_attention)

        def use(sdpa: str) -> None:
            for flag in DIFFSYNTH_OWN_KERNELS:
                setattr(wan_video_dit, flag, False)
            self.sdpa_attention = sdpa
        kernels = [first] if attention != "auto" else guard.sdpa_chain(
            guard.shape_for(heads, head_dim, self.device), self.dtype, self.device, use, first=first,
            first_is_sdpa=guard.diffsynth_pick() == "sdpa", label="diffsynth sdpa")
        return guard.Plan(kernels, auto=attention == "auto", heads=heads, head_dim=head_dim, dtype=self.dtype,
                          device=self.device)

    def _managed(self, component: str) -> bool:
        vm = self.options.get("vram_management", True)
        return self.cuda and (vm is True or (vm == "text_encoder" and component == "text_encoder"))

    def _plain_config(self) -> dict:
        keys = ("offload", "onload", "preparing", "computation")
        config = {f"{k}_{what}": None for k in keys for what in ("dtype", "device")}
        config.update(computation_dtype=self.dtype, computation_device=self.device)
        return config

    def _vram_config(self) -> tuple[dict, float | None]:
        """DiffSynth's dynamic VRAM management: weights wait on the CPU ("onload" there), layers move to
        the GPU ("preparing") while the card holds less than `vram_limit`, else are streamed per call."""
        torch = self.torch
        config = {"offload_dtype": self.dtype, "offload_device": "cpu", "onload_dtype": self.dtype,
                  "onload_device": "cpu", "preparing_dtype": self.dtype, "preparing_device": self.device,
                  "computation_dtype": self.dtype, "computation_device": self.device}
        limit = self.options.get("vram_limit_gib")
        if limit is None and self.cuda:
            limit = torch.cuda.mem_get_info(0)[1] / (1 << 30) - 0.5
        return config, (round(float(limit), 2) if limit is not None and self.cuda else None)

    def _load_recognised(self, component: str, entry, config: dict, vram_limit):
        """DiffSynth's own path: fingerprint the file, find it in the model table, load it (every model the
        table lists under that fingerprint: {model name: model})."""
        from diffsynth.models.model_loader import ModelPool
        pool = ModelPool()
        pool.auto_load_model(entry, vram_config=config, vram_limit=vram_limit)
        if MODEL_NAMES[component] not in pool.model_name:
            raise ValueError(f"{entry} loaded as {pool.model_name}, not as the {component}")
        return dict(zip(pool.model_name, pool.model))  # with what else the file holds (VACE, Animate)

    @staticmethod
    def _assemble(pipe, loaded: dict) -> None:
        """Put the components in their places, as `WanVideoPipeline.from_pretrained` does."""
        pipe.text_encoder = loaded["text_encoder"][0]
        dits = loaded["dit"]
        pipe.dit = dits[0]
        pipe.dit2 = dits[1] if len(dits) > 1 else None
        pipe.vae = loaded["vae"][0]
        pipe.image_encoder = loaded.get("image_encoder", [None])[0]
        vace = loaded.get("vace", [])
        pipe.vace = vace[0] if vace else None
        pipe.vace2 = vace[1] if len(vace) > 1 else None  # Wan2.2 VACE-Fun A14B: one per expert
        pipe.animate_adapter = loaded.get("animate_adapter", [None])[0]
        pipe.audio_encoder = loaded.get("audio_encoder", [None])[0]
        pipe.height_division_factor = pipe.width_division_factor = pipe.vae.upsampling_factor * 2

    def prepare(self, job) -> None:
        prefetch(self, job)

    def generate(self, job, progress) -> np.ndarray:
        torch = self.torch
        g = self.generation_for(job)
        o = self.options
        called = time.time()
        self._job = {"prompt_encodings": 0, "seconds": {"text_encoder": 0.0}}
        if self._lora_switch is not None:  # the switch made before this job (use_loras)
            self._job["lora_switch"], self._lora_switch = self._lora_switch, None
        step_times: list[float] = []
        marks: dict[str, float] = {}
        extra = dict(g.extra)
        if g.guidance[0] == 1:
            extra.pop("cfg_merge", None)  # DiffSynth would batch the conditional input twice at cfg 1
        kwargs: dict[str, Any] = dict(
            prompt=job.prompt, negative_prompt=g.negative_prompt, seed=int(job.seed), rand_device="cpu",
            height=g.height, width=g.width, num_frames=g.num_frames, cfg_scale=g.guidance[0],
            num_inference_steps=g.steps, tiled=bool(o.get("tiled", True)),
            tile_size=tuple(o.get("tile_size", DEFAULT_TILE[0])),
            tile_stride=tuple(o.get("tile_stride", DEFAULT_TILE[1])),
            progress_bar_cmd=self._steps(progress, step_times, marks), output_type="floatpoint", **extra)
        if g.shift is not None:
            kwargs["sigma_shift"] = float(g.shift)
        method, cache_options = (job.model or self.model).speed.cache_method
        if method == "teacache":  # DiffSynth's own (its other caches: none); the model id from the folder's name
            kwargs.update(tea_cache_l1_thresh=cache_options["threshold"],
                          tea_cache_model_id=teacache_model_id(self.model.path))
            self._job["cache"] = {"method": method, "model_id": kwargs["tea_cache_model_id"]}
        with job_memory(self.cuda, self._job, f"{g.width}x{g.height}x{g.num_frames}"):
            task_inputs(self, job, kwargs, g)
            self._job["reference_read_seconds"] = round(time.time() - called, 3)
            # (the counting hooks only with a cache: on a compiled block their counters would recompile it per call)
            with speed_settings.sdpa_kernel(self.sdpa_attention), \
                    (self._count_reuse() if "cache" in self._job else contextlib.nullcontext({})) as reuse:
                video = self.pipe(**kwargs)
            if "cache" in self._job:
                self._job["cache"].update(reuse)
            if self.cuda:
                torch.cuda.synchronize()
            decoded = time.time()
            if not bool(torch.isfinite(video[0]).all()):
                raise NonFiniteFrames(self.model.speed)
            frames = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            frames = frames.permute(1, 2, 3, 0).cpu().numpy()  # C T H W → T H W C
        returned = time.time()
        job_facts = self._job
        job_facts["prompt_cache_hit"] = job_facts["prompt_encodings"] == 0
        job_facts["steps"] = len(step_times)
        if len(step_times) > 1:  # steady state: the first step also pays for warm-up and onloading
            job_facts["seconds_per_step"] = round((step_times[-1] - step_times[0]) / (len(step_times) - 1), 4)
        elif step_times:
            job_facts["seconds_per_step"] = round(step_times[0] - called, 4)
        job_facts["timeline"] = {
            "called": round(called, 3), "first_step_done": round(step_times[0], 3) if step_times else None,
            "last_step_done": round(step_times[-1], 3) if step_times else None, "returned": round(returned, 3)}
        job_facts["seconds"] = self._time_split(job_facts["seconds"]["text_encoder"], called, marks, step_times,
                                                decoded, returned)
        return np.ascontiguousarray(frames)

    @staticmethod
    def _time_split(text_encoder: float, called: float, marks: dict, step_times: list[float], decoded: float,
                    returned: float) -> dict:
        """The job's seconds per part (module docstring), from the marks `generate` took."""
        started = marks.get("denoise_started", decoded)
        last_step = step_times[-1] if step_times else started
        return {"text_encoder": round(text_encoder, 4),
                "inputs": round(max(started - called - text_encoder, 0.0), 4),
                "denoise": round(last_step - started, 4), "vae_decode": round(decoded - last_step, 4),
                "total": round(returned - called, 4)}

    def _time_text_encoder(self, text_encoder) -> None:
        """Hooks around the text encoder's forward that add its seconds to the job's `seconds.text_encoder`."""
        entered: list[float] = []

        def before(module, args):
            if self.cuda:
                self.torch.cuda.synchronize()  # what was queued before is not the encoder's
            entered.append(time.perf_counter())

        def after(module, args, output):
            if self.cuda:
                self.torch.cuda.synchronize()
            seconds = self._job.setdefault("seconds", {"text_encoder": 0.0})
            seconds["text_encoder"] = seconds.get("text_encoder", 0.0) + time.perf_counter() - entered.pop()
        text_encoder.register_forward_pre_hook(before)
        text_encoder.register_forward_hook(after)

    @contextlib.contextmanager
    def _count_reuse(self):
        """Per DiT: its calls (the patch embedding runs in every one) and those whose blocks did not run
        (TeaCache reused the step): forward hooks on the patch embedding and the last block."""
        counts: dict = {}
        handles = []
        for name, dit in (("dit", self.pipe.dit), ("dit2", getattr(self.pipe, "dit2", None))):
            if dit is None:
                continue
            tally = counts[name] = {"calls": 0, "calls_computed": 0}
            handles.append(dit.patch_embedding.register_forward_hook(
                lambda *args, tally=tally: tally.__setitem__("calls", tally["calls"] + 1)))
            handles.append(dit.blocks[-1].register_forward_hook(
                lambda *args, tally=tally: tally.__setitem__("calls_computed", tally["calls_computed"] + 1)))
        try:
            yield counts
        finally:
            for handle in handles:
                handle.remove()
            for tally in counts.values():
                tally["calls_reused"] = tally["calls"] - tally.pop("calls_computed")
            for name in [name for name, tally in counts.items() if not tally["calls"]]:
                del counts[name]

    def use_loras(self, loras) -> None:
        """Hot-loaded LoRAs switched in place (diffsynth_loras: DiffSynth's clear_lora, then `loras` from the
        cache of files read); its record and seconds go into the next job's facts."""
        started, reads = time.perf_counter(), self.loras.file_reads
        records = self.loras.apply(tuple(loras))
        self._lora_switch = {"seconds": round(time.perf_counter() - started, 4), "loras": records,
                             "files_read": self.loras.file_reads - reads}  # 0: all from the cache

    def _steps(self, progress, step_times: list[float], marks: dict):
        """DiffSynth's `progress_bar_cmd` (it wraps the timesteps): reports and times each finished step, and
        marks when the denoising loop starts (`marks["denoise_started"]`)."""
        cuda = self.cuda

        def steps(timesteps):
            if cuda:
                self.torch.cuda.synchronize()
            marks["denoise_started"] = time.time()
            total = len(timesteps)
            for index, timestep in enumerate(timesteps):
                yield timestep
                if cuda:  # a step takes seconds; waiting for it makes its time the GPU's, not the queue's
                    self.torch.cuda.synchronize()
                step_times.append(time.time())
                progress(index + 1, total)
        return steps

    def prepare_denoise(self, job) -> None:
        """The conditioned tasks: the first step's arguments of DiffSynth's `model_fn` for `job` (the
        VACE hints, control and reference latents, audio features, pose and face, with the prompt's
        embedding), recorded by running the job up to that call."""
        self._denoise_inputs = None
        if self.model.task not in CONDITIONED_TASKS:
            return
        pipe = self.pipe
        model_fn = pipe.model_fn

        def stop(*args, **kwargs):
            raise FirstDenoiserCall(args, kwargs)
        pipe.model_fn = stop
        try:
            self._denoise_inputs = run_to_first_denoiser_call(self, job).kwargs
        finally:
            pipe.model_fn = model_fn

    def denoise_once(self, seed: int):
        from diffsynth.pipelines.wan_video import model_fn_wan_video
        torch, pipe, g, dit = self.torch, self.pipe, self.generation, self.pipe.dit
        if self.model.task in CONDITIONED_TASKS:
            recorded = getattr(self, "_denoise_inputs", None)
            if recorded is None:
                raise RuntimeError(f"task {self.model.task}: call prepare_denoise(job) first; this denoiser takes "
                                   "the job's own encoded inputs")
            latents = recorded["latents"]
            noise = torch.randn(latents.shape, generator=torch.Generator(device="cpu").manual_seed(seed))
            with torch.no_grad(), speed_settings.sdpa_kernel(self.sdpa_attention):
                return pipe.model_fn(**{**recorded, "latents": noise.to(latents.device, latents.dtype)})
        z = getattr(pipe.vae, "z_dim", 16)
        image = dit.has_image_input and dit.require_vae_embedding
        size = (1, z if image else dit.in_dim, (g.num_frames - 1) // 4 + 1, g.height // pipe.vae.upsampling_factor,
                g.width // pipe.vae.upsampling_factor)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        draw = lambda *shape: torch.randn(*shape, generator=generator).to(self.device, self.dtype)  # noqa: E731
        kwargs = {"latents": draw(*size), "context": draw(1, 512, dit.text_embedding[0].in_features),
                  "timestep": torch.tensor([500.0], device=self.device, dtype=self.dtype)}
        if image:
            kwargs["y"] = draw(1, dit.in_dim - z, *size[2:])
        if dit.has_image_input and dit.require_clip_embedding:
            kwargs["clip_feature"] = draw(1, 257, 1280)
        with torch.no_grad(), speed_settings.sdpa_kernel(self.sdpa_attention):
            return model_fn_wan_video(dit=dit, **kwargs)

    def job_info(self) -> dict:
        references = getattr(self, "references", None)
        facts = dict(getattr(self, "_job", {}))
        if references is not None:
            facts["reference_cache"] = {"hits": references.hits, "misses": references.misses}
        return facts

    def peak_memory_bytes(self) -> int | None:
        return getattr(self, "_job", {}).get("peak_memory_bytes") if getattr(self, "cuda", False) else None

    def close(self) -> None:
        self.close_reference_caches()
        self.pipe = None
        self.prompt_cache = OrderedDict()
        self.reference_latents = OrderedDict()
        self.input_encodings = OrderedDict()
        release_memory(getattr(self, "cuda", False))


def _face_size(adapter) -> int:
    """The side of the face crops Animate's motion encoder takes: its appearance encoder halves the
    picture once per layer down to 4×4 (diffsynth's EncoderApp), so the side is 2 ** its layer count."""
    return 2 ** len(adapter.motion_encoder.enc.net_app.convs)


def _quiet_vae_progress() -> None:
    """DiffSynth's tiled VAE prints a tqdm bar per call; in a worker's pane it would bury our step lines."""
    from functools import partial

    from diffsynth.models import wan_video_vae
    from tqdm import tqdm
    wan_video_vae.tqdm = partial(tqdm, disable=True)

