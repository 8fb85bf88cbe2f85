"""The diffsynth backend: DiffSynth-Studio's `WanVideoPipeline` from model files in the original Wan layout.

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
image is the first frame; needs an image-to-video DiT).

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

Caches, each by replacing one of the pipeline's units (DiffSynth runs a list of `PipelineUnit`s
before denoising, each turning inputs into tensors) with a subclass that remembers its output:
  - prompt embeddings (`WanVideoUnit_PromptEmbedder`), per worker: each prompt runs with every seed,
    and the negative prompt with every job, so the text encoder runs once per prompt;
  - the VAE-encoded reference video (`WanVideoUnit_InputVideoEmbedder`), per reference: the encoding
    depends only on the clip and the tiling, so the jobs of one video (prompts × seeds) encode it once;
    the noise is still mixed in per job (`scheduler.add_noise` with the job's noise);
  - in i2v, likewise per image, the VAE encoding of the first frame followed by empty frames (as
    costly as encoding a clip) and its CLIP embedding (`WanVideoUnit_ImageEmbedderVAE`, `..CLIP`).
TI2V-5B's fused first-frame latents depend on the job's noise and are encoded per job (one frame).

Without a GPU the pipeline runs on the CPU: the CI tests build a tiny pipeline
(`random_checkpoints.build_tiny_checkpoint`)
from DiffSynth's component classes with tiny configurations. DiffSynth's loader only recognises
full-size files (by their fingerprint), so a tiny folder carries a marker, `wan_sweep_tiny_random.json`,
that names each file's class and configuration; only then does the loader skip the recognition and
load the file with those (through DiffSynth's same `load_model`, converters and VRAM wrappers). CI
therefore covers everything except the recognition itself; `bench/gpu_diffsynth.sh` proves that with
full-size random weights saved in the original layout.
"""
from __future__ import annotations

import importlib.util
import time
from collections import OrderedDict
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import speed as speed_settings
from ..checkpoints.releases import download_fix
from .base import (Backend, BackendProblem, NonFiniteFrames, model_files_identity, option_problems,
                   speed_card_problems)
from .cuda import job_memory, release_memory
from .diffsynth_files import COMPONENTS, IMAGE_ENCODER, MODEL_NAMES, dit_kind, identify, model_files, tiny_configs

TASKS_RUN = ("t2v", "i2v", "v2v")  # model.task values this backend runs
OPTIONS: dict[str, tuple] = {
    "vram_management": (bool, str), "vram_limit_gib": (int, float), "tiled": (bool,),
    "tile_size": (list,), "tile_stride": (list,), "tokenizer": (str,), "model_files": (dict,),
    "prompt_cache": (int,), "reference_cache": (int,),
}
EXTRA: dict[str, tuple] = {
    "cfg_merge": (bool,), "switch_DiT_boundary": (int, float),
    "tea_cache_l1_thresh": (int, float), "tea_cache_model_id": (str,), "sliding_window_size": (int,),
    "sliding_window_stride": (int,),
}
DEFAULT_TILE = ([30, 52], [15, 26])


def _pair(value) -> bool:
    return (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))


class DiffSynthWanBackend(Backend):
    name = "diffsynth"
    runs_on_cpu = True  # slowly; the CI tests run a tiny pipeline on the CPU
    runtime_options = frozenset({"vram_management", "vram_limit_gib", "prompt_cache", "reference_cache"})
    path_options = frozenset({"tokenizer"})  # resolved by the manifest against its folder
    verify_checkpoint = True
    checkpoint_layout = "wan"

    @classmethod
    def check(cls, manifest) -> list[str | BackendProblem]:
        model, g = manifest.model, manifest.generation
        o = model.options
        if model.task not in TASKS_RUN:  # the conditioned tasks (issue 23) are not wired here yet
            return [BackendProblem("model.task", f"the diffsynth backend cannot run model.task {model.task}: it "
                                   f"runs {', '.join(TASKS_RUN)}", "use model.backend: synthetic to try the sweep, "
                                   "or a backend that runs this task (README's task table)")]
        found, failed = option_problems("diffsynth", o, OPTIONS, {"vram_management": (True, False, "text_encoder")})
        problems: list[str | BackendProblem] = list(found)
        for key, value in o.items():
            if key in failed:
                continue
            if key in ("tile_size", "tile_stride") and not _pair(value):
                problems.append(BackendProblem(f"model.options.{key}", f"{key} must be [height, width] in latent "
                                               f"pixels (two positive integers), got {value!r}", "e.g. [30, 52]"))
            elif key in ("vram_limit_gib", "prompt_cache", "reference_cache") and value <= 0:
                problems.append(BackendProblem(f"model.options.{key}", f"{key} must be positive, got {value!r}"))
            elif key == "model_files" and set(value) - set(COMPONENTS):
                problems.append(BackendProblem("model.options.model_files", "unknown model_files entries: "
                                               f"{', '.join(sorted(set(value) - set(COMPONENTS)))}",
                                               f"use: {', '.join(COMPONENTS)}"))
            elif key == "model_files" and not all(
                    isinstance(v, str) or (c == "dit" and isinstance(v, list) and v
                                           and all(isinstance(x, str) for x in v)) for c, v in value.items()):
                problems.append(BackendProblem("model.options.model_files", "model_files entries are file names "
                                               "relative to model.path (dit: one glob or a list, one per DiT)"))
        size = o.get("tile_size", DEFAULT_TILE[0])
        stride = o.get("tile_stride", DEFAULT_TILE[1])
        if _pair(size) and _pair(stride) and (stride[0] > size[0] or stride[1] > size[1]):
            problems.append(BackendProblem("model.options.tile_stride", f"tile_stride {stride} is larger than "
                                           f"tile_size {size}: tiles would leave gaps", "use a stride ≤ the size"))

        for key, value in g.extra.items():
            kinds = EXTRA.get(key)
            if kinds is None:
                problems.append(BackendProblem(
                    f"generation.extra.{key}", f"generation.extra.{key} is not a WanVideoPipeline setting "
                    "this backend passes", "set the flow shift as generation.shift" if "shift" in key
                    else f"use: {', '.join(EXTRA)}"))
            elif not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                problems.append(BackendProblem(f"generation.extra.{key}", f"generation.extra.{key} must be "
                                               f"{' or '.join(k.__name__ for k in kinds)}, got {value!r}"))
            elif key == "switch_DiT_boundary" and not 0 < value < 1:
                problems.append(BackendProblem("generation.extra.switch_DiT_boundary",
                                               f"switch_DiT_boundary is {value}", "use a value in (0, 1), e.g. 0.875"))

        high, low = g.guidance
        if low is not None and low != high:
            problems.append(BackendProblem(
                "generation.cfg_scale", f"generation.cfg_scale is a pair {[high, low]}; DiffSynth's "
                "WanVideoPipeline applies one scale to both experts", f"use one number, e.g. {high}"))
        if model.task == "v2v" and g.denoising_strength >= 1.0:
            problems.append(BackendProblem(
                "generation.denoising_strength", "video-to-video with denoising_strength 1.0 replaces the "
                "reference video entirely with noise: the references would be ignored",
                "set generation.denoising_strength below 1, e.g. 0.7"))
        if model.task != "v2v" and g.denoising_strength < 1.0:
            problems.append(BackendProblem(
                "generation.denoising_strength", f"denoising_strength {g.denoising_strength} applies to "
                f"video-to-video only; task {model.task} starts from pure noise", "remove it (or set 1.0)"))
        if isinstance(manifest.resources.gpus_per_worker, int) and manifest.resources.gpus_per_worker > 1:
            problems.append(BackendProblem(
                "resources.gpus_per_worker", "the diffsynth backend runs a worker on one card",
                "use gpus_per_worker: 1 (vram_management streams a model larger than the card)"))

        problems.extend(cls._speed_problems(manifest))
        if importlib.util.find_spec("diffsynth") is None:
            problems.append(BackendProblem("model.backend", "DiffSynth-Studio is not installed",
                                           "pip install 'wan-sweep[diffsynth]' (diffsynth>=2.1)"))
        if not model.path or not Path(model.path).is_dir():
            problems.append(BackendProblem("model.path", f"model.path `{model.path}` is not a folder: the "
                                           "diffsynth backend loads local files in the original Wan layout "
                                           "(nothing is downloaded unless you ask)",
                                           download_fix(model.path or "models/Wan2.1-T2V-14B", cls.checkpoint_layout,
                                                        model.task)))
            return problems
        if any(p.key.startswith("model.options.model_files") for p in problems if isinstance(p, BackendProblem)):
            return problems
        files, missing = model_files(model.path, o)
        problems.extend(missing)
        if missing:
            return problems
        problems.extend(cls._check_models(model, g, files))
        return problems

    @staticmethod
    def _speed_problems(manifest) -> list[BackendProblem]:
        speed = manifest.model.speed
        problems = speed_card_problems(manifest)
        if speed.compile == "full":
            problems.append(BackendProblem(
                "speed.compile", "speed.compile full: DiffSynth's pipeline calls the DiT's blocks one by one "
                "(model_fn_wan_video), never the DiT as a whole, so there is nothing whole to compile",
                "use compile: blocks (the same kernels, compiled per block)"))
        if speed.attention not in speed_settings.SDPA_ATTENTION:
            problems.append(BackendProblem(
                "speed.attention", f"speed.attention `{speed.attention}` is a diffusers attention backend; the "
                "diffsynth backend chooses torch SDPA's kernel (DiffSynth itself uses flash-attn or "
                "SageAttention when they are installed: that is `auto`)",
                f"use one of: {', '.join(speed_settings.SDPA_ATTENTION)}"))
        resident = manifest.model.options.get("vram_management", True) in (False, "text_encoder")
        changed = [k for k in ("compile", "quantize") if getattr(speed, k) != "none"]
        if changed and not resident:
            problems.append(BackendProblem(
                f"speed.{changed[0]}", f"speed.{changed[0]} {getattr(speed, changed[0])} needs the DiT resident on "
                "the card, but vram_management true streams its layers between CPU and GPU at every call",
                "set model.options.vram_management: text_encoder (the DiT and VAE stay on the card) or false"))
        return problems

    @staticmethod
    def _check_models(model, g, files) -> list[BackendProblem]:
        """What DiffSynth will take each file for, and whether that model can run the task."""
        problems = []
        found = identify(files, model.path)
        where = model.path
        for component in ("text_encoder", "vae", "image_encoder"):
            config = found[component]
            if files.get(component) and config is None:
                problems.append(BackendProblem(
                    "model.path", f"`{Path(files[component]).name}` in {where} is not a model file DiffSynth "
                    "recognises (its tensor names and shapes match no model in DiffSynth's table)",
                    "use the file as released (not converted, pruned or from another library)"))
            elif config and config.get("model_name") != MODEL_NAMES[component]:
                problems.append(BackendProblem(
                    "model.path", f"`{Path(files[component]).name}` is a {config.get('model_name')} model, not "
                    f"the {component.replace('_', ' ')}", "put the right file in its place"))
        for shards, config in zip(files["dit"], found["dit"]):
            name = Path(shards[0]).name + (f" (+{len(shards) - 1} shards)" if len(shards) > 1 else "")
            if config is None:
                problems.append(BackendProblem(
                    "model.path", f"the DiT `{name}` in {where} is not one DiffSynth recognises (its tensor "
                    "names and shapes match no model in DiffSynth's table)",
                    "use the original Wan release files; a missing or extra shard changes the fingerprint"))
                continue
            if not config:
                continue  # could not be fingerprinted here; the worker's loader decides
            kind = dit_kind(config)
            needs = {"t2v": ("t2v", "ti2v"), "v2v": ("t2v", "ti2v"), "i2v": ("i2v", "ti2v")}[model.task]
            if kind not in needs:
                problems.append(BackendProblem(
                    "model.task", f"the DiT in {where} is a {kind} model; task {model.task} needs "
                    f"{' or '.join(needs)}", "use a matching Wan checkpoint or change model.task"))
            kwargs = config.get("extra_kwargs") or {}
            if (model.task == "i2v" and kwargs.get("has_image_input") and kwargs.get("require_clip_embedding", True)
                    and not files.get("image_encoder")):
                problems.append(BackendProblem(
                    "model.path", f"this image-to-video DiT needs the image encoder `{IMAGE_ENCODER}.pth`, "
                    f"missing in {where}", "complete the download"))
        vae = found.get("vae") or {}
        if vae.get("model_class", "").endswith("WanVideoVAE38"):
            for key in ("width", "height"):
                value = getattr(g, key)
                if value % 32:
                    problems.append(BackendProblem(
                        f"generation.{key}", f"generation.{key} is {value}; the Wan2.2 VAE needs multiples of 32",
                        f"use {value // 32 * 32 or 32} or {value // 32 * 32 + 32}"))
        return problems

    @classmethod
    def plan_notes(cls, manifest) -> list[str]:
        o = manifest.model.options
        vm = o.get("vram_management", True)
        notes = [f"diffsynth: each worker loads the model once (vram_management: {vm}); prompt embeddings "
                 f"are cached per worker (up to {o.get('prompt_cache', 64)} prompts)"]
        if manifest.model.task == "v2v":
            notes.append("diffsynth: a reference video is VAE-encoded once per worker and reused for all its "
                         "prompts × seeds")
        return notes

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
        tiny = tiny_configs(self.model.path)

        pipe = WanVideoPipeline(device=self.device, torch_dtype=self.dtype)
        seconds: dict[str, float] = {}
        loaded: dict[str, Any] = {}
        for component in COMPONENTS:
            if component == "image_encoder" and self.model.task != "i2v":
                continue  # only image-to-video uses it
            entries = files["dit"] if component == "dit" else [files[component]] if files[component] else []
            for entry in entries:
                t0 = time.perf_counter()
                config = dict(vram_config) if self._managed(component) else self._plain_config()
                model = (self._load_tiny(component, entry, tiny[component], config, vram_limit) if tiny
                         else self._load_recognised(component, entry, config, vram_limit))
                loaded.setdefault(component, []).append(model)
                seconds[component] = round(seconds.get(component, 0.0) + time.perf_counter() - t0, 3)
        self._assemble(pipe, loaded)
        speed_facts = self._apply_speed(pipe)
        t0 = time.perf_counter()
        from diffsynth.models.wan_video_text_encoder import HuggingfaceTokenizer
        pipe.tokenizer = HuggingfaceTokenizer(name=files["tokenizer"], seq_len=512, clean="whitespace")
        seconds["tokenizer"] = round(time.perf_counter() - t0, 3)
        pipe.vram_management_enabled = pipe.check_vram_management_state()
        self._install_caches(pipe)
        _quiet_vae_progress()
        self.pipe = pipe

        self.references = self.reference_cache(self.generation)
        self._job: dict = {}
        self.load_info = {
            "backend": self.name, "load_seconds": round(time.perf_counter() - started, 3),
            "import_seconds": round(imported - started, 3), "components": seconds,
            "loader": "components from wan_sweep_tiny_random.json (tests)" if tiny
                      else "diffsynth ModelPool.auto_load_model (files recognised by fingerprint)",
            "files": {k: v for k, v in files.items()},
            "model_files": model_files_identity(self.model.path),
            "vram_management": o.get("vram_management", True), "vram_limit_gib": vram_limit,
            "speed": {**asdict(self.model.speed), **({"applied": speed_facts} if speed_facts else {})},
        }

    def _apply_speed(self, pipe) -> dict:
        """The `speed:` settings on each DiT (two for Wan2.2 A14B); the attention kernel is chosen per
        call in `generate` instead (DiffSynth calls torch SDPA itself)."""
        speed = self.model.speed
        if speed.attention != "auto":
            # DiffSynth prefers flash-attn 3/2 and SageAttention whenever they are importable; a chosen
            # SDPA kernel means SDPA, so those module flags are turned off in this worker process.
            from diffsynth.models import wan_video_dit
            for flag in ("FLASH_ATTN_3_AVAILABLE", "FLASH_ATTN_2_AVAILABLE", "SAGE_ATTN_AVAILABLE"):
                setattr(wan_video_dit, flag, False)
        step = replace(speed, attention="auto")
        if step.is_default:
            return {}
        return {name: speed_settings.apply_to_denoiser(dit, list(dit.blocks), step, compute_dtype=self.dtype,
                                                       library="diffsynth")
                for name, dit in (("dit", pipe.dit), ("dit2", pipe.dit2)) if dit is not None}

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
        """DiffSynth's own path: fingerprint the file, find it in the model table, load it."""
        from diffsynth.models.model_loader import ModelPool
        pool = ModelPool()
        pool.auto_load_model(entry, vram_config=config, vram_limit=vram_limit)
        for model, name in zip(pool.model, pool.model_name):
            if name == MODEL_NAMES[component]:
                return model
        raise ValueError(f"{entry} loaded as {pool.model_name}, not as the {component}")

    def _load_tiny(self, component: str, entry, spec: dict, config: dict, vram_limit):
        """Test folders only: the class and configuration come from the folder's marker instead of the
        fingerprint; the loading itself is DiffSynth's (`load_model`: DiskMap, converter, VRAM wrappers)."""
        from diffsynth.core.loader import load_model
        from diffsynth.models.model_loader import ModelPool
        pool = ModelPool()
        model_class = _tiny_vae_class() if spec.get("tiny_vae") else pool.import_model_class(spec["model_class"])
        converter = pool.import_model_class(spec["state_dict_converter"]) if spec.get("state_dict_converter") else None
        return load_model(model_class, entry, spec.get("extra_kwargs", {}), config["computation_dtype"],
                          config["computation_device"], converter, use_disk_map=True, vram_config=config,
                          module_map=pool.fetch_module_map(spec["model_class"], config), vram_limit=vram_limit)

    @staticmethod
    def _assemble(pipe, loaded: dict) -> None:
        """Put the components in their places, as `WanVideoPipeline.from_pretrained` does."""
        pipe.text_encoder = loaded["text_encoder"][0]
        dits = loaded["dit"]
        pipe.dit = dits[0]
        pipe.dit2 = dits[1] if len(dits) > 1 else None
        pipe.vae = loaded["vae"][0]
        pipe.image_encoder = loaded.get("image_encoder", [None])[0]
        pipe.height_division_factor = pipe.width_division_factor = pipe.vae.upsampling_factor * 2

    def _install_caches(self, pipe) -> None:
        from diffsynth.pipelines import wan_video as wv
        backend = self
        prompt_limit = int(self.options.get("prompt_cache", 64))
        reference_limit = int(self.options.get("reference_cache", 4))
        self.prompt_cache: OrderedDict[str, Any] = OrderedDict()
        self.reference_latents: OrderedDict[tuple, Any] = OrderedDict()

        class CachedPromptEmbedder(wv.WanVideoUnit_PromptEmbedder):
            def process(self, pipe, **inputs) -> dict:
                prompt = inputs.get("prompt")
                cached = backend.prompt_cache.get(prompt) if isinstance(prompt, str) else None
                if cached is not None:
                    backend.prompt_cache.move_to_end(prompt)
                    return {"context": cached}
                out = super().process(pipe, **inputs)
                backend._job["prompt_encodings"] = backend._job.get("prompt_encodings", 0) + 1
                if isinstance(prompt, str):
                    backend.prompt_cache[prompt] = out["context"]
                    while len(backend.prompt_cache) > prompt_limit:
                        backend.prompt_cache.popitem(last=False)
                return out

        class CachedInputVideoEmbedder(wv.WanVideoUnit_InputVideoEmbedder):
            # The library encodes the clip, then mixes in the job's noise with `scheduler.add_noise`. The
            # encoding depends on the clip and the tiling only, so it is kept: a miss runs the library's
            # own code and keeps what it passes to add_noise; a hit only mixes in this job's noise.
            plain_only = ("vace_reference_image", "animate2_reference_image", "animate2_reference_video")

            def process(self, pipe, **inputs) -> dict:
                key = getattr(inputs.get("input_video"), "cache_key", None)
                if key is None or pipe.scheduler.training or any(inputs.get(k) is not None for k in self.plain_only):
                    return super().process(pipe, **inputs)
                key = (key, inputs.get("tiled"), tuple(inputs.get("tile_size") or ()),
                       tuple(inputs.get("tile_stride") or ()), inputs.get("framewise_decoding"))
                latents = backend.reference_latents.get(key)
                backend._job["reference_encoding_reused"] = latents is not None
                if latents is not None:
                    backend.reference_latents.move_to_end(key)
                    return {"latents": pipe.scheduler.add_noise(latents, inputs["noise"],
                                                                timestep=pipe.scheduler.timesteps[0])}
                kept = {}
                add_noise = pipe.scheduler.add_noise

                def keep(original_samples, noise, timestep):
                    kept["latents"] = original_samples
                    return add_noise(original_samples, noise, timestep)
                started = time.perf_counter()
                own = vars(pipe.scheduler).get("add_noise")
                pipe.scheduler.add_noise = keep
                try:
                    out = super().process(pipe, **inputs)
                finally:
                    if own is None:
                        del pipe.scheduler.add_noise  # the class's method again
                    else:
                        pipe.scheduler.add_noise = own
                backend._job["reference_encode_seconds"] = round(time.perf_counter() - started, 3)
                if "latents" in kept:
                    backend.reference_latents[key] = kept["latents"]
                    while len(backend.reference_latents) > reference_limit:
                        backend.reference_latents.popitem(last=False)
                return out

        def per_image(unit_class):
            """An i2v unit whose output depends on the first frame and the worker's fixed settings only
            (the VAE encoding of the frame followed by empty frames, its CLIP embedding): kept per image."""
            class CachedPerImage(unit_class):
                def process(self, pipe, **inputs) -> dict:
                    image = inputs.get("input_image")
                    key = getattr(image, "cache_key", None)
                    if key is None or inputs.get("end_image") is not None:
                        return super().process(pipe, **inputs)
                    key = (unit_class.__name__, key, repr(sorted((k, v) for k, v in inputs.items()
                                                                 if k not in ("input_image", "end_image"))))
                    out = backend.reference_latents.get(key)
                    if out is not None:
                        backend.reference_latents.move_to_end(key)
                        backend._job["reference_encoding_reused"] = True
                        return dict(out)
                    out = super().process(pipe, **inputs)
                    if out:  # {} where the model has no use for it (no CLIP encoder, say)
                        backend._job["reference_encoding_reused"] = False
                        backend.reference_latents[key] = dict(out)
                        while len(backend.reference_latents) > 2 * reference_limit:
                            backend.reference_latents.popitem(last=False)
                    return out
            return CachedPerImage

        replacements = {wv.WanVideoUnit_PromptEmbedder: CachedPromptEmbedder,
                        wv.WanVideoUnit_InputVideoEmbedder: CachedInputVideoEmbedder,
                        wv.WanVideoUnit_ImageEmbedderVAE: per_image(wv.WanVideoUnit_ImageEmbedderVAE),
                        wv.WanVideoUnit_ImageEmbedderCLIP: per_image(wv.WanVideoUnit_ImageEmbedderCLIP)}
        replaced = 0
        for index, unit in enumerate(pipe.units):
            if type(unit) in replacements:
                pipe.units[index] = replacements[type(unit)]()
                replaced += 1
        if replaced != len(replacements):
            raise RuntimeError("this diffsynth version's WanVideoPipeline lacks the units the caches replace")

    def prepare(self, job) -> None:
        if getattr(self, "references", None) is not None and job.reference:
            self.reference_cache(self.generation_for(job)).prefetch(job.reference)

    def generate(self, job, progress) -> np.ndarray:
        torch = self.torch
        g = self.generation_for(job)
        o = self.options
        called = time.time()
        self._job = {"prompt_encodings": 0}
        step_times: list[float] = []
        kwargs: dict[str, Any] = dict(
            prompt=job.prompt, negative_prompt=g.negative_prompt, seed=int(job.seed), rand_device="cpu",
            height=g.height, width=g.width, num_frames=g.num_frames, cfg_scale=g.guidance[0],
            num_inference_steps=g.steps, tiled=bool(o.get("tiled", True)),
            tile_size=tuple(o.get("tile_size", DEFAULT_TILE[0])),
            tile_stride=tuple(o.get("tile_stride", DEFAULT_TILE[1])),
            progress_bar_cmd=self._steps(progress, step_times), output_type="floatpoint", **g.extra)
        if g.shift is not None:
            kwargs["sigma_shift"] = float(g.shift)
        with job_memory(self.cuda, self._job, f"{g.width}x{g.height}x{g.num_frames}"):
            if self.model.task == "v2v":
                # (the clip's latents are kept per reference and per size, length and rate: axes change them)
                kwargs["input_video"] = _Clip(self.reference_cache(g).video(job.reference),
                                              f"{job.reference}:{g.width}x{g.height}x{g.num_frames}@{g.fps}")
                kwargs["denoising_strength"] = g.denoising_strength
            elif self.model.task == "i2v":
                from PIL import Image
                image = Image.fromarray(self.reference_cache(g).image(job.reference))
                image.cache_key = job.reference  # for the per-image caches
                kwargs["input_image"] = image
            self._job["reference_read_seconds"] = round(time.time() - called, 3)
            with speed_settings.sdpa_kernel(self.model.speed.attention):
                video = self.pipe(**kwargs)
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
        return np.ascontiguousarray(frames)

    def _steps(self, progress, step_times: list[float]):
        """DiffSynth's `progress_bar_cmd` (it wraps the timesteps): reports and times each finished step."""
        cuda = self.cuda

        def steps(timesteps):
            total = len(timesteps)
            for index, timestep in enumerate(timesteps):
                yield timestep
                if cuda:  # a step takes seconds; waiting for it makes its time the GPU's, not the queue's
                    self.torch.cuda.synchronize()
                step_times.append(time.time())
                progress(index + 1, total)
        return steps

    def denoise_once(self, seed: int):
        from diffsynth.pipelines.wan_video import model_fn_wan_video
        torch, pipe, g, dit = self.torch, self.pipe, self.generation, self.pipe.dit
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
        with torch.no_grad(), speed_settings.sdpa_kernel(self.model.speed.attention):
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
        release_memory(getattr(self, "cuda", False))


class _Clip(list):
    """The reference frames as DiffSynth's `input_video` (a list of H×W×3 arrays), carrying the key the
    reference-latent cache files them under."""

    def __init__(self, frames: np.ndarray, key: str):
        super().__init__(frames)
        self.cache_key = key


def _quiet_vae_progress() -> None:
    """DiffSynth's tiled VAE prints a tqdm bar per call; in a worker's pane it would bury our step lines."""
    from functools import partial

    from diffsynth.models import wan_video_vae
    from tqdm import tqdm
    wan_video_vae.tqdm = partial(tqdm, disable=True)


_TINY_VAE = None


def _tiny_vae_class():
    """WanVideoVAE (its scaling, tiling, encode/decode) around a VideoVAE_ of tiny width."""
    global _TINY_VAE
    if _TINY_VAE is None:
        from diffsynth.models.wan_video_vae import VideoVAE_, WanVideoVAE

        class TinyWanVideoVAE(WanVideoVAE):
            def __init__(self, z_dim=16, dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1):
                super().__init__(z_dim=z_dim)  # under DiffSynth's loader this builds on the meta device
                self.model = VideoVAE_(dim=dim, z_dim=z_dim, dim_mult=list(dim_mult),
                                       num_res_blocks=num_res_blocks).eval().requires_grad_(False)
        _TINY_VAE = TinyWanVideoVAE
    return _TINY_VAE
