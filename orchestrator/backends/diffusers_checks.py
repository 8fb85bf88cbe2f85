"""What the diffusers backend checks before a sweep starts (its `check` and `plan_notes`): the task
against diffusers' Wan pipelines, `model.options`, the `speed:` settings (attention backends included),
and the checkpoint's own configs (`read_checkpoint_config`, JSON files only) against the task, the
guidance and the frame size.
"""
from __future__ import annotations

import json
from pathlib import Path

from .. import speed as speed_settings
from ..backend import BackendProblem
from ..checkpoints.releases import download_fix
from ..demo import materialize
from .shared import model_files_identity, option_problems, speed_card_problems

PIPELINES = {"t2v": "WanPipeline", "i2v": "WanImageToVideoPipeline", "v2v": "WanVideoToVideoPipeline",
             "vace": "WanVACEPipeline", "animate": "WanAnimatePipeline"}
# The transformer class a conditioned task's checkpoint has (model_index.json), and the release it comes from
TASK_TRANSFORMERS = {"vace": ("WanVACETransformer3DModel", "Wan2.1-VACE-14B-diffusers"),
                     "animate": ("WanAnimateTransformer3DModel", "Wan2.2-Animate-14B-Diffusers")}
# The conditioned tasks diffusers 0.42 has no pipeline for, and the backends that run them
ELSEWHERE = {"s2v": "backend: diffsynth (or command, Wan's generate.py s2v-14B)",
             "control": "backend: diffsynth (Wan-Fun control and camera control)"}
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


def manifest_problems(manifest, checkpoint_layout: str) -> list:
    """The diffusers backend's `check`: the task against diffusers' pipelines, the options, the speed
    settings, and the checkpoint's configs against the task and the generation settings (a `model.path`
    named `random-tiny-wan-<variant>` is built first: `orchestrator.demo.materialize`)."""
    model, g = manifest.model, manifest.generation
    if model.task not in PIPELINES:
        return [BackendProblem("model.task", f"diffusers has no pipeline for task {model.task}; the diffusers "
                               f"backend runs {', '.join(PIPELINES)}",
                               f"use {ELSEWHERE.get(model.task, 'another backend')} (README's task table)")]
    problems, _ = option_problems("diffusers", model.options, OPTIONS, CHOICES)
    if model.options.get("device_map") and model.options.get("offload", "none") != "none":
        problems.append(BackendProblem("model.options.offload", "offload and device_map exclude each other",
                                       "keep one: device_map spreads the model over cards, offload over CPU memory"))
    problems.extend(_speed_problems(manifest))
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
            + download_fix(model.path, checkpoint_layout, model.task)))
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
        # SageAttention (`sage`: diffusers' backend of that name, `sageattn`, which picks the kernel for the card)
        problem = speed_settings.sage_manifest_problem(manifest) or _diffusers_attention_problem(speed.attention)
        if problem:
            problems.append(BackendProblem("speed.attention", *problem))
    problems.extend(_cache_problems(manifest))
    return problems


def _cache_problems(manifest) -> list[BackendProblem]:
    """`speed.cache` on this backend: a method it has, and not with what it was found not to work with."""
    speed, g = manifest.model.speed, manifest.generation
    method, _ = speed.cache_method
    if method == "none":
        return []
    why = speed_settings.cache_backend_problem(speed, "diffusers")
    if why:
        return [BackendProblem("speed.cache", why, "use one of: " + ", ".join(speed_settings.CACHES_BY_BACKEND["diffusers"]))]
    problems = []
    if speed.compile != "none":
        # tried (torch 2.14, diffusers 0.42.1): compiled blocks under the cache hooks fail to trace
        # (dynamo: "Unsupported hasattr call" in the hook registry)
        problems.append(BackendProblem("speed.cache", f"speed.cache {method} with compile: {speed.compile}: diffusers' "
                                       "cache hooks wrap the blocks' forward, which torch.compile cannot trace",
                                       "use compile: none with a step cache, or cache: none with compile"))
    if method in ("faster_cache", "pab") and g.uses_guidance:
        problems.append(BackendProblem(
            "speed.cache", f"speed.cache {method} with guidance (cfg_scale {g.cfg_scale}): diffusers keeps one "
            "attention cache per layer, and Wan's pipeline runs the conditional and unconditional passes as two "
            "calls, so one pass would get the other's attention (FasterCache's own guidance path expects both in "
            "one batch and fails)", "use it with cfg_scale 1 (a distilled model or LoRA), or first_block, "
            "taylorseer or magcache"))
    offload = manifest.model.options.get("offload", "none")
    if offload in ("sequential", "group"):
        problems.append(BackendProblem("speed.cache", f"speed.cache {method} with offload: {offload}: both are "
                                       "hooks on the same blocks and skipped blocks would leave the offload's "
                                       "prefetching out of step; this pairing is not verified",
                                       "use offload: none or model with a step cache"))
    return problems

def plan_notes(manifest) -> list[str]:
    """What `plan` says about the diffusers backend: one load per worker, what is encoded once."""
    weights = model_files_identity(manifest.model.path).get("weight_bytes") or 0
    size = f"{weights / 2**30:.1f} GiB" if weights >= 2**30 else f"{weights / 2**20:.1f} MiB"
    notes = [f"diffusers: each worker loads the checkpoint once ({size} of weights) and "
             "keeps it; prompt embeddings are cached per worker"]
    if manifest.model.task in ("v2v", "vace"):
        notes.append(f"diffusers: each {'control' if manifest.model.task == 'vace' else 'reference'} video is "
                     "VAE-encoded once per worker and reused for all its prompts × seeds")
    return notes
