"""What the diffsynth backend checks before a sweep starts (its `check` and `plan_notes`): its options
and the `WanVideoPipeline` settings `generation.extra` may pass, the settings DiffSynth's pipeline cannot
honour, the `speed:` settings it can apply, and the model files: what DiffSynth's loader will take each
for (diffsynth_files.identify), and whether that model, with the parts beside its DiT, runs the task.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from .. import speed as speed_settings
from ..backend import BackendProblem
from ..checkpoints.releases import download_fix
from .diffsynth_files import (AUDIO_ENCODER_FOLDER, COMPONENTS, IMAGE_ENCODER, MODEL_NAMES, PART_NAMES, TASK_DITS,
                              TASK_PARTS, dit_kind, identify, model_files)
from .shared import option_problems, speed_card_problems

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
S2V_FPS = 16  # DiffSynth's S2V unit times the audio features at 16 video frames a second


def _pair(value) -> bool:
    return (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))


def manifest_problems(manifest, checkpoint_layout: str) -> list[str | BackendProblem]:
    """The diffsynth backend's `check`: its options and `generation.extra`, the settings DiffSynth's
    pipeline cannot honour, the speed settings, and the model files and what DiffSynth will take them for."""
    model, g = manifest.model, manifest.generation
    o = model.options
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
    if model.task == "s2v" and g.fps != S2V_FPS:
        problems.append(BackendProblem(
            "generation.fps", f"generation.fps is {g.fps}; Wan2.2-S2V makes {S2V_FPS} fps video and DiffSynth "
            f"times the audio features at {S2V_FPS} frames a second, so the speech would drift from the lips",
            f"use fps: {S2V_FPS}"))
    if isinstance(manifest.resources.gpus_per_worker, int) and manifest.resources.gpus_per_worker > 1:
        problems.append(BackendProblem(
            "resources.gpus_per_worker", "the diffsynth backend runs a worker on one card",
            "use gpus_per_worker: 1 (vram_management streams a model larger than the card)"))

    problems.extend(_speed_problems(manifest))
    if importlib.util.find_spec("diffsynth") is None:
        problems.append(BackendProblem("model.backend", "DiffSynth-Studio is not installed",
                                       "pip install 'wan-sweep[diffsynth]' (diffsynth>=2.1)"))
    if not model.path or not Path(model.path).is_dir():
        problems.append(BackendProblem("model.path", f"model.path `{model.path}` is not a folder: the "
                                       "diffsynth backend loads local files in the original Wan layout "
                                       "(nothing is downloaded unless you ask)",
                                       download_fix(model.path or "models/Wan2.1-T2V-14B", checkpoint_layout,
                                                    model.task)))
        return problems
    if any(p.key.startswith("model.options.model_files") for p in problems if isinstance(p, BackendProblem)):
        return problems
    files, missing = model_files(model.path, o)
    problems.extend(missing)
    if missing:
        return problems
    problems.extend(_check_models(model, g, files))
    if model.task == "control":
        problems.extend(_control_problems(manifest, files))
    return problems

def _speed_problems(manifest) -> list[BackendProblem]:
    speed = manifest.model.speed
    problems = speed_card_problems(manifest)
    if speed.compile == "full":
        problems.append(BackendProblem(
            "speed.compile", "speed.compile full: DiffSynth's pipeline calls the DiT's blocks one by one "
            "(model_fn_wan_video), never the DiT as a whole, so there is nothing whole to compile",
            "use compile: blocks (the same kernels, compiled per block)"))
    sage = speed_settings.sage_manifest_problem(manifest) if speed.attention == "sage" else None
    if sage:
        problems.append(BackendProblem("speed.attention", *sage))
    elif speed.attention not in speed_settings.SDPA_ATTENTION + ("sage",):
        problems.append(BackendProblem(
            "speed.attention", f"speed.attention `{speed.attention}` is a diffusers attention backend; the "
            "diffsynth backend chooses torch SDPA's kernel or `sage` (DiffSynth's own SageAttention call; "
            "DiffSynth itself uses flash-attn or SageAttention when they are installed: that is `auto`)",
            f"use one of: {', '.join(speed_settings.SDPA_ATTENTION + ('sage',))}"))
    problems.extend(_cache_problems(manifest))
    resident = manifest.model.options.get("vram_management", True) in (False, "text_encoder")
    changed = [k for k in ("compile", "quantize") if getattr(speed, k) != "none"]
    if changed and not resident:
        problems.append(BackendProblem(
            f"speed.{changed[0]}", f"speed.{changed[0]} {getattr(speed, changed[0])} needs the DiT resident on "
            "the card, but vram_management true streams its layers between CPU and GPU at every call",
            "set model.options.vram_management: text_encoder (the DiT and VAE stay on the card) or false"))
    return problems

# DiffSynth's TeaCache has rescaling coefficients for these models only (pipelines/wan_video.py, `TeaCache`)
TEACACHE_MODELS = ("Wan2.1-T2V-1.3B", "Wan2.1-T2V-14B", "Wan2.1-I2V-14B-480P", "Wan2.1-I2V-14B-720P")


def teacache_model_id(path: str | None) -> str | None:
    """The `tea_cache_model_id` of the checkpoint folder at `path`, from its release name (Wan2.1-T2V-14B,
    Wan2.1-I2V-14B-720P, …); a tiny test folder gets the 1.3B's (its random weights make any coefficients
    as arbitrary); None for any other model (Wan2.2, TI2V, a folder renamed past recognition)."""
    from ..demo import tiny_folder
    if not path:
        return None
    if tiny_folder(path):
        return TEACACHE_MODELS[0]
    name = Path(path).name.lower()
    return next((model for model in TEACACHE_MODELS if model.lower() in name), None)


def _cache_problems(manifest) -> list[BackendProblem]:
    speed = manifest.model.speed
    method, _ = speed.cache_method
    if method == "none":
        return []
    why = speed_settings.cache_backend_problem(speed, "diffsynth")
    if why:
        return [BackendProblem("speed.cache", why, "use `cache: {teacache: 0.05}` (DiffSynth's TeaCache)")]
    if teacache_model_id(manifest.model.path) is None:
        return [BackendProblem("speed.cache", f"speed.cache teacache: DiffSynth's TeaCache has coefficients for "
                               f"{', '.join(TEACACHE_MODELS)} only, and model.path `{manifest.model.path}` is "
                               "none of them by its folder name", "use a Wan2.1 model folder of its release name, "
                               "or backend diffusers (first_block, taylorseer, magcache)")]
    if "tea_cache_l1_thresh" in manifest.generation.extra or "tea_cache_model_id" in manifest.generation.extra:
        return [BackendProblem("speed.cache", "speed.cache teacache and generation.extra's tea_cache_* both set "
                               "DiffSynth's TeaCache", "keep speed.cache (it is part of each job's identity)")]
    return []


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
        needs = TASK_DITS.get(model.task, ())
        if kind not in needs:
            problems.append(BackendProblem(
                "model.task", f"the DiT in {where} is a {kind} model; task {model.task} needs "
                f"{' or '.join(needs)}", "use a matching Wan checkpoint or change model.task"))
        kwargs = config.get("extra_kwargs") or {}
        if (model.task in ("i2v", "animate") and kwargs.get("has_image_input") and kwargs.get("require_clip_embedding", True)
                and not files.get("image_encoder")):
            problems.append(BackendProblem(
                "model.path", f"this image-to-video DiT needs the image encoder `{IMAGE_ENCODER}.pth`, "
                f"missing in {where}", "complete the download"))
    problems.extend(_part_problems(model, files, found))
    vae = found.get("vae") or {}
    if vae.get("model_class", "").endswith("WanVideoVAE38"):
        for key in ("width", "height"):
            value = getattr(g, key)
            if value % 32:
                problems.append(BackendProblem(
                    f"generation.{key}", f"generation.{key} is {value}; the Wan2.2 VAE needs multiples of 32",
                    f"use {value // 32 * 32 or 32} or {value // 32 * 32 + 32}"))
    return problems

def plan_notes(manifest) -> list[str]:
    """What `plan` says about the diffsynth backend: one load per worker, what is encoded once."""
    o = manifest.model.options
    vm = o.get("vram_management", True)
    notes = [f"diffsynth: each worker loads the model once (vram_management: {vm}); prompt embeddings "
             f"are cached per worker (up to {o.get('prompt_cache', 64)} prompts)"]
    if manifest.model.task == "v2v":
        notes.append("diffsynth: a reference video is VAE-encoded once per worker and reused for all its "
                     "prompts × seeds")
    elif manifest.model.task in TASK_DITS and manifest.model.task not in ("t2v", "i2v"):
        what = {"vace": "control video (with its reference image)", "control": "control video",
                "animate": "pose video", "s2v": "audio file's wav2vec2 features"}[manifest.model.task]
        notes.append(f"diffsynth: each {what} is encoded once per worker and reused for all its prompts × seeds")
    return notes


def _part_problems(model, files, found) -> list[BackendProblem]:
    """The parts a conditioned task needs besides the DiT (diffsynth_files.TASK_PARTS), named when missing."""
    problems = []
    where = model.path
    if not found["dit"] or not all(found["dit"]):
        return problems  # the DiT itself is reported (or could not be fingerprinted here)
    for part in TASK_PARTS.get(model.task, ()):
        if part == "audio_encoder":
            folder = Path(model.path) / AUDIO_ENCODER_FOLDER
            if not files.get("audio_encoder"):
                problems.append(BackendProblem(
                    "model.path", f"task s2v needs {PART_NAMES[part]}: no `{AUDIO_ENCODER_FOLDER}/model.safetensors` "
                    f"in {where}", "complete the Wan2.2-S2V-14B download (the folder is part of the release)"))
            elif not any((folder / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")):
                problems.append(BackendProblem(
                    "model.path", f"`{AUDIO_ENCODER_FOLDER}/preprocessor_config.json` (the audio processor) is "
                    f"missing in {where}", "complete the Wan2.2-S2V-14B download"))
            elif found.get("audio_encoder") is None:
                problems.append(BackendProblem(
                    "model.path", f"`{AUDIO_ENCODER_FOLDER}/{Path(files['audio_encoder']).name}` in {where} is not "
                    "the wav2vec2 audio encoder DiffSynth recognises", "use the file as released"))
        elif part not in found.get("dit_parts", ()):
            problems.append(BackendProblem(
                "model.task", f"task {model.task} needs {PART_NAMES[part]}, which the DiT's file in {where} "
                "does not hold", "use the matching release (e.g. Wan2.1-VACE-14B for vace, Wan2.2-Animate-14B "
                "for animate) or change model.task"))
    return problems


def _control_problems(manifest, files) -> list[BackendProblem]:
    """Task control's two kinds of model take different inputs: a Fun control DiT a control video
    (`control:`), a Fun camera-control DiT a first frame and a direction (`images:` and `camera:`)."""
    found = identify(files, manifest.model.path)
    kinds = {dit_kind(config) for config in found["dit"] if config}
    if len(kinds) != 1:
        return []  # not recognised (reported already) or not fingerprinted here
    camera_model = kinds == {"camera"}
    problems = []
    for category in manifest.categories:
        has_camera = any("camera" in ref.inputs for ref in category.references)
        if camera_model and (category.kind != "images" or not has_camera):
            problems.append(BackendProblem(
                f"categories.{category.name}", f"category `{category.name}`: the DiT in {manifest.model.path} is a "
                "camera-control model (Wan-Fun Control-Camera): it moves a first frame by a camera direction",
                "give `images:` and `camera:` (README's task table), or use a Fun control model for control videos"))
        elif not camera_model and has_camera:
            problems.append(BackendProblem(
                f"categories.{category.name}.camera", f"category `{category.name}`: `camera:` needs a camera-control "
                f"DiT (Wan-Fun Control-Camera); the one in {manifest.model.path} takes control videos",
                "leave `camera:` out, or use a Control-Camera checkpoint"))
    return problems
