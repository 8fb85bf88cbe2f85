"""The model files of the diffsynth backend, and what DiffSynth will take them for.

The model folder (`model.path`) is an original Wan release folder, e.g. `Wan2.1-T2V-14B/`:
  diffusion_pytorch_model*.safetensors   the DiT (one file, or shards with their .index.json)
  high_noise_model/, low_noise_model/    instead, for Wan2.2 A14B (two DiTs, switched during denoising)
  models_t5_umt5-xxl-enc-bf16.pth        the umT5-XXL text encoder (a `.safetensors` of the same stem
                                         is preferred when present: DiffSynth reads a .pth twice)
  Wan2.1_VAE.pth | Wan2.2_VAE.pth        the VAE (Wan2.2's for TI2V-5B)
  models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth   the image encoder (Wan2.1 I2V only)
  google/umt5-xxl/                       the tokenizer (DiffSynth's default would download it)
DiffSynth's loader (`ModelPool.auto_load_model`) recognises a file by an md5 of its tensor names and
shapes (`fingerprint`, from the files' headers alone) in its table of known models
(`diffsynth_model_table`); `identify` says what each file will load as, so that the backend's
`check()` reports an unrecognised or missing file before anything starts. A tiny test folder
(`orchestrator.demo.tiny_folder`) names its classes in its marker instead.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

from ..backend import BackendProblem
from ..checkpoints.files import _Broken, read_weight_file
from ..checkpoints.layouts import (AUDIO_ENCODER_FOLDER, TEXT_ENCODER_STEM as TEXT_ENCODER,  # the release's names
                                   TOKENIZER_FOLDER as TOKENIZER)
from ..demo import tiny_folder

log = logging.getLogger(__name__)

COMPONENTS = ("dit", "text_encoder", "vae", "image_encoder")
DIT_GLOB = "diffusion_pytorch_model*.safetensors"
VAES = ("Wan2.2_VAE", "Wan2.1_VAE")
IMAGE_ENCODER = "models_clip_open-clip-xlm-roberta-large-vit-huge-14"
MODEL_NAMES = {"dit": "wan_video_dit", "text_encoder": "wan_video_text_encoder", "vae": "wan_video_vae",
               "image_encoder": "wan_video_image_encoder", "vace": "wan_video_vace",
               "animate_adapter": "wan_video_animate_adapter", "audio_encoder": "wans2v_audio_encoder"}
# The parts a conditioned task needs besides the DiT, text encoder and VAE. VACE's blocks and Animate's
# adapter are in the DiT's own file (DiffSynth's table lists a second model under the DiT's fingerprint);
# S2V's wav2vec2 audio encoder is its own folder.
TASK_PARTS = {"vace": ("vace",), "animate": ("animate_adapter",), "s2v": ("audio_encoder",)}
PART_NAMES = {"vace": "the VACE blocks (Wan2.1-VACE / Wan2.2-VACE-Fun)",
              "animate_adapter": "the Animate adapter (Wan2.2-Animate-14B)",
              "audio_encoder": f"the S2V audio encoder `{AUDIO_ENCODER_FOLDER}/` (Wan2.2-S2V-14B)"}
# The DiT kinds each task runs on (dit_kind)
TASK_DITS = {"t2v": ("t2v", "ti2v"), "v2v": ("t2v", "ti2v"), "i2v": ("i2v", "ti2v"), "vace": ("t2v",),
             "control": ("control", "camera"), "animate": ("i2v",), "s2v": ("s2v",)}



def _weight_file(folder: Path, stem: str) -> Path | None:
    for suffix in (".safetensors", ".pth"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def _dit_shards(folder: Path, pattern: str = DIT_GLOB) -> tuple[list[Path], str | None]:
    """The files of one DiT and, if its index names a shard that is not there, that shard."""
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if pattern == DIT_GLOB and index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError):
            return [], f"{index.name} (unreadable index)"
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            return [], missing[0]
        return [folder / n for n in names], None
    return sorted(Path(p) for p in glob.glob(str(folder / pattern)) if os.path.isfile(p)), None


def model_files(path: str | os.PathLike, options: dict | None = None) -> tuple[dict, list[BackendProblem]]:
    """The component files of a model folder: {dit: [[shards of DiT 1], ...], text_encoder, vae,
    image_encoder (or None), tokenizer}, and a problem for each one that is missing."""
    options = options or {}
    root = Path(path)
    problems: list[BackendProblem] = []
    files: dict[str, Any] = {"dit": [], "text_encoder": None, "vae": None, "image_encoder": None,
                             "audio_encoder": None}
    overrides = options.get("model_files") or {}
    if not isinstance(overrides, dict):
        overrides = {}

    dits = overrides.get("dit")
    if dits is not None:
        for pattern in ([dits] if isinstance(dits, str) else list(dits)):
            matched = sorted(Path(p) for p in glob.glob(str(root / pattern)) if os.path.isfile(p))
            if not matched:
                problems.append(BackendProblem("model.options.model_files.dit",
                                               f"model_files.dit `{pattern}` matches no file in {root}",
                                               "fix the pattern (relative to model.path)"))
            files["dit"].append([str(p) for p in matched])
    else:
        experts = [root / "high_noise_model", root / "low_noise_model"]  # Wan2.2 A14B: high noise first
        folders = experts if all(e.is_dir() for e in experts) else [root]
        for folder in folders:
            shards, missing = _dit_shards(folder)
            where = folder.relative_to(root).as_posix() + "/" if folder != root else ""
            if missing:
                problems.append(BackendProblem("model.path", f"DiT shard `{where}{missing}` is missing in "
                                               f"{root} (named by its index)", "complete the download"))
            elif not shards:
                problems.append(BackendProblem(
                    "model.path", f"no DiT `{where}{DIT_GLOB}` in {root}",
                    "point model.path at an original Wan release folder (e.g. Wan2.1-T2V-14B), or name "
                    "the files in model.options.model_files"))
            else:
                files["dit"].append([str(p) for p in shards])

    defaults = {"text_encoder": (TEXT_ENCODER,), "vae": VAES, "image_encoder": (IMAGE_ENCODER,)}
    for component in ("text_encoder", "vae", "image_encoder"):
        if component in overrides:
            file = root / str(overrides[component])
            if not file.is_file():
                problems.append(BackendProblem(f"model.options.model_files.{component}",
                                               f"model_files.{component} `{overrides[component]}` does not "
                                               f"exist in {root}", "fix the file name (relative to model.path)"))
            else:
                files[component] = str(file)
            continue
        found = next((f for f in (_weight_file(root, stem) for stem in defaults[component]) if f), None)
        if found is not None:
            files[component] = str(found)
        elif component != "image_encoder":  # only image-to-video DiTs need it; checked with the task
            problems.append(BackendProblem("model.path", f"`{defaults[component][-1]}.pth` (the "
                                           f"{component.replace('_', ' ')}) is missing in {root}",
                                           "complete the download, or name the file in model.options.model_files"))

    audio = root / AUDIO_ENCODER_FOLDER
    found_audio = _weight_file(audio, "model") or _weight_file(audio, "pytorch_model")
    if found_audio is not None:  # only speech-to-video needs it; checked with the task
        files["audio_encoder"] = str(found_audio)

    tokenizer = Path(options["tokenizer"]) if options.get("tokenizer") else root / TOKENIZER
    if not tokenizer.is_absolute():
        tokenizer = root / tokenizer
    files["tokenizer"] = str(tokenizer)
    if not (tokenizer.is_dir() and any((tokenizer / n).is_file() for n in ("tokenizer.json", "spiece.model"))):
        problems.append(BackendProblem("model.options.tokenizer" if options.get("tokenizer") else "model.path",
                                       f"no tokenizer at {tokenizer} (a folder with tokenizer.json or "
                                       "spiece.model); DiffSynth's default would download it",
                                       f"keep the release's `{TOKENIZER}/` folder, or set model.options.tokenizer"))
    return files, problems


def _keys_and_shapes(file: str) -> dict | None:
    """{name: shape, or a dict of the same} of one weight file, nested as its state dict is (DiffSynth
    hashes the nesting), from its header alone (checkpoints.files); None when it cannot be read so."""
    try:
        state = read_weight_file(Path(file)).tree
    except (_Broken, OSError, ValueError, TypeError) as exc:  # (a header too corrupt for the reader's own checks)
        log.debug("%s: header unreadable (%s): not fingerprinted here", file, exc)
        return None
    # DiffSynth unwraps a lone "state_dict" / "module" / "model_state" entry before hashing
    if isinstance(state, dict) and len(state) == 1:
        for wrapper in ("state_dict", "module", "model_state"):
            if wrapper in state:
                state = state[wrapper]

    def shapes(tree):
        return {k: (shapes(v) if isinstance(v, dict) else list(v[1])) for k, v in tree.items()}
    return shapes(state) if isinstance(state, dict) else None


def _fingerprint_string(keys: dict) -> str:
    parts = []
    for key, value in keys.items():
        if isinstance(value, dict):
            parts.append(f"{key}|{_fingerprint_string(value)}")
        else:
            parts.append(f"{key}:{'_'.join(map(str, value))}")
            parts.append(key)
    return ",".join(sorted(parts))


def fingerprint(files: str | list[str]) -> str | None:
    """The md5 DiffSynth recognises a model file (or a DiT's shards) by: tensor names and shapes."""
    keys: dict = {}
    for file in [files] if isinstance(files, str) else files:
        found = _keys_and_shapes(file)
        if found is None:
            return None
        keys.update(found)
    return hashlib.md5(_fingerprint_string(keys).encode("utf-8")).hexdigest()


_MODEL_TABLE: list[dict] | None = None
_TABLE_PROBLEM: str | None = None  # why DiffSynth's table could not be read (said once)


def diffsynth_model_table() -> list[dict] | None:
    """DiffSynth's table of known model files (hash → class, configuration), read without importing
    the package (its import takes seconds and torch): the table is a plain data module."""
    global _MODEL_TABLE, _TABLE_PROBLEM
    if _MODEL_TABLE is None:
        spec = importlib.util.find_spec("diffsynth")
        if spec is None or not spec.submodule_search_locations:
            return None
        source = Path(next(iter(spec.submodule_search_locations))) / "configs" / "model_configs.py"
        try:
            namespace: dict = {}
            exec(compile(source.read_text(encoding="utf-8"), str(source), "exec"), namespace)
            _MODEL_TABLE = list(namespace["MODEL_CONFIGS"])
        except Exception as exc:  # a reorganised package: the workers' own loader still checks
            if _TABLE_PROBLEM is None:
                _TABLE_PROBLEM = f"{type(exc).__name__}: {exc}"
                log.warning("cannot read DiffSynth's model table %s (%s): the model files are recognised by the "
                            "workers' loader only, not before the start", source, _TABLE_PROBLEM)
            return None
    return _MODEL_TABLE


def identify(files: dict, path: str) -> dict[str, list[dict] | dict | None]:
    """What DiffSynth will load each file as: {component: table entry (for `dit`, one per DiT)}, an entry
    being None where the file is not recognised and {} where it could not be fingerprinted."""
    tiny = tiny_folder(path)
    if tiny is not None:  # a test folder: its marker says what each file is
        tiny = tiny.components
        return {"dit": [tiny["dit"] for _ in files["dit"]],
                **{c: tiny.get(c) if files.get(c) else None for c in ("text_encoder", "vae", "image_encoder",
                                                                       "audio_encoder")},
                "dit_parts": sorted(p for p in ("vace", "animate_adapter") if p in tiny)}
    table = diffsynth_model_table() or []

    def lookup(entry_files, model_name):
        if not table:
            return {}
        digest = fingerprint(entry_files)
        if digest is None:
            return {}
        matches = [c for c in table if c.get("model_hash") == digest]
        return next((c for c in matches if c["model_name"] == model_name), matches[0] if matches else None)

    found: dict[str, Any] = {"dit": [lookup(shards, MODEL_NAMES["dit"]) for shards in files["dit"]]}
    for component in ("text_encoder", "vae", "image_encoder", "audio_encoder"):
        found[component] = lookup(files[component], MODEL_NAMES[component]) if files.get(component) else None
    # the other models DiffSynth loads from the (first) DiT's file: VACE blocks, the Animate adapter
    digest = (found["dit"][0] or {}).get("model_hash") if found["dit"] else None
    found["dit_parts"] = sorted(part for part in ("vace", "animate_adapter")
                                if any(c.get("model_hash") == digest and c["model_name"] == MODEL_NAMES[part]
                                       for c in table)) if digest else []
    return found


def dit_kind(config: dict) -> str:
    """t2v, i2v, ti2v (Wan2.2 TI2V-5B: both), control (Wan-Fun control: the control video's latents as
    extra input channels), camera (Wan-Fun camera control: a camera adapter), s2v (Wan2.2-S2V) or other.
    VACE and Animate checkpoints are a t2v and an i2v DiT with a part beside them (`identify`'s dit_parts)."""
    kwargs = config.get("extra_kwargs") or {}
    if config.get("model_class", "").endswith("wan_video_dit_s2v.WanS2VModel"):
        return "s2v"
    if not config.get("model_class", "").endswith("wan_video_dit.WanModel"):
        return "other"
    if kwargs.get("add_control_adapter"):
        return "camera"
    if kwargs.get("in_dim") in (48, 52) and not kwargs.get("fuse_vae_embedding_in_latents"):
        return "control"
    if kwargs.get("fuse_vae_embedding_in_latents"):
        return "ti2v"
    if kwargs.get("in_dim") == 16 and not kwargs.get("has_image_input"):
        return "t2v"
    if kwargs.get("in_dim") == 36 and not kwargs.get("add_control_adapter") and not kwargs.get("has_ref_conv"):
        return "i2v"
    return "other"
