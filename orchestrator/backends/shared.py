"""What the backends share besides their interface (`orchestrator.backend`): the checks every backend
makes of `model.options` (`option_problems`) and of the `speed:` settings against this machine's cards
(`speed_card_problems`), the checks of the manifest's LoRA files against the checkpoint (`lora_problems`),
and the identity of a checkpoint's files (`model_files_identity`) that every sidecar records.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .. import gpus as machine_gpus, speed as speed_settings
from ..backend import BackendProblem
from ..checkpoints import CheckpointError
from ..checkpoints.loras import LoraFileError, fit_problems, model_linears, read_lora

if TYPE_CHECKING:
    from ..manifest import Manifest

log = logging.getLogger(__name__)


def option_problems(backend: str, options: dict, kinds: dict, choices: dict | None = None
                    ) -> tuple[list[BackendProblem], set[str]]:
    """The checks every backend makes of `model.options`: unknown keys, wrong types (a bool is not a
    number) and values outside `choices`. Returns the problems and the keys that failed, so a
    backend's own checks can skip them."""
    problems: list[BackendProblem] = []
    failed: set[str] = set()
    for key, value in options.items():
        where, kind = f"model.options.{key}", kinds.get(key)
        if kind is None:
            fix = ("the flow shift is a generation setting: generation.shift" if "shift" in key
                   else f"use one of: {', '.join(kinds)}")
            problems.append(BackendProblem(where, f"unknown {backend} option `{key}`", fix))
        elif not isinstance(value, kind) or (isinstance(value, bool) and bool not in (
                kind if isinstance(kind, tuple) else (kind,))):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            problems.append(BackendProblem(where, f"{backend} option `{key}` must be {names}, got {value!r}"))
        elif choices and key in choices and value not in choices[key]:
            problems.append(BackendProblem(where, f"{backend} option `{key}` is {value!r}",
                                           f"use one of: {', '.join(map(str, choices[key]))}"))
        else:
            continue
        failed.add(key)
    return problems, failed


def speed_card_problems(manifest: "Manifest") -> list[BackendProblem]:
    """The `speed:` checks every backend that applies it shares: torchao for fp8/int8, fp8 only
    on cards that have fp8 tensor cores (this machine's cards, as `resources.gpus` selects them; a Ray
    cluster's cards are checked by each actor when it loads), and no compile with fp8_storage."""
    speed = manifest.model.speed
    problems = []
    missing = speed_settings.torchao_missing(speed)
    if missing:
        problems.append(BackendProblem("speed.quantize", missing, "pip install torchao (or 'wan-sweep[speed]')"))
    if speed.quantize == "fp8_storage" and speed.compile != "none":
        # Both backends' fp8 storage casts the weights in hooks around each layer's call (diffusers'
        # layerwise casting builds a Parameter there, ours assigns `.data` of another dtype): dynamo
        # cannot trace either, and with fullgraph=True the first job of every worker would fail.
        problems.append(BackendProblem(
            "speed.quantize", f"speed.quantize fp8_storage with compile: {speed.compile}: fp8 storage casts each "
            "layer's weights in hooks around every call, which torch.compile cannot trace into one graph, so "
            "every job would fail at its first step",
            "for memory with compile use quantize: int8 (torchao's 8-bit weights compile); or keep "
            "fp8_storage with compile: none"))
    if speed.quantize == "fp8" and manifest.execution.executor != "ray":
        try:
            gpus = machine_gpus.discover()
        except machine_gpus.NoGpus:
            gpus = []
        wanted = manifest.resources.gpus
        cards = [(g.name, g.compute_capability) for g in gpus if wanted == "all" or g.index in wanted]
        why = speed_settings.fp8_card_problem(cards)
        if why:
            problems.append(BackendProblem("speed.quantize", why, "use quantize: int8 or fp8_storage for memory, "
                                           "or none; fp8 pays on Ada, Hopper and newer cards"))
    return problems


IDENTITY_HASHED = (".json", ".txt", ".model", ".yaml")  # small files that say what the weights are
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".gguf")


def model_files_identity(path: str | os.PathLike | None, max_files: int = 400) -> dict:
    """What a checkpoint folder holds: every weight file's name and size, and a sha256 of each
    index/config file (cheap, yet it tells two checkpoints apart). Weights are never read."""
    if not path or not os.path.exists(path):
        return {"path": str(path) if path else None}
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    weights, configs = {}, {}
    for file in files[:max_files]:
        name = file.name if file == root else str(file.relative_to(root))
        if file.suffix in WEIGHT_SUFFIXES:
            weights[name] = file.stat().st_size
        elif file.suffix in IDENTITY_HASHED and file.stat().st_size < 64 << 20:
            configs[name] = hashlib.sha256(file.read_bytes()).hexdigest()[:16]
    return {"path": str(root), "weights": weights, "weight_bytes": sum(weights.values()),
            "configs_sha256": configs}


def lora_problems(manifest: "Manifest", layout: str, files: list[tuple[str, str, str]]) -> list[BackendProblem]:
    """The LoRA files a sweep may run (`files`: (manifest key, LoRA name, file), `Backend.check_loras`), each
    read from its header and checked against the checkpoint's own layers (`model.path`, in `layout`:
    diffusers or wan): a file that is not a LoRA in safetensors, layers the model lacks or has in other
    shapes (a 1.3B LoRA on a 14B names the first key and both shapes), a LoRA meant for the other Wan2.2
    expert (its name or metadata says so), an expert the model lacks. Each at its key's line."""
    if not files or not manifest.model.path:
        return []
    try:
        experts = model_linears(manifest.model.path, layout)
    except (OSError, ValueError, CheckpointError) as exc:
        # (the checkpoint's own checks say what is wrong with it; here the files are still read, their fit is not
        # checked, and a LoRA matching no layer is said in the worker's log when it loads)
        log.info("the LoRAs' fit is not checked: the checkpoint's layers cannot be read (%s)", exc)
        experts = {}
    problems: list[BackendProblem] = []
    expert_of = {lora.name: lora.expert for lora in manifest.model.loras}
    checked: set[tuple[str, str]] = set()
    for key, name, path in files:
        if (name, path) in checked:
            continue
        checked.add((name, path))
        try:
            lora = read_lora(path)
        except LoraFileError as exc:
            problems.append(BackendProblem(key, exc.message, exc.fix))
            continue
        expert = expert_of[name]
        if expert != "both" and len(experts) == 1:
            problems.append(BackendProblem(f"model.loras.{name}.expert", f"LoRA {name} is for the {expert}-noise "
                                           "expert, but this model has one denoiser (not Wan2.2 A14B)",
                                           "leave `expert` out (both)"))
            continue
        if expert != "both" and lora.expert_hint and lora.expert_hint != expert:
            problems.append(BackendProblem(
                key, f"LoRA {name}: {Path(path).name} is made for the {lora.expert_hint}-noise expert (its "
                f"{'name' if lora.expert_hint.lower() in Path(path).name.lower() else 'metadata'} says so), but "
                f"model.loras.{name}.expert is {expert}",
                f"set `expert: {lora.expert_hint}`, or use the {expert}-noise file of the pair"))
            continue
        # one problem per file: the first expert it does not fit names it
        found = next((problem for which in (("high", "low") if expert == "both" else (expert,)) if experts
                      for problem in fit_problems(lora, experts.get(which) or experts["high"])), None)
        if found:
            problems.append(BackendProblem(key, *found))
    return problems
