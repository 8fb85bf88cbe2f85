"""Validating a manifest's sections into its dataclasses: `read_manifest` reads the file (reader),
each top-level key (name, output_dir, output, model, speed, generation, axes, seeds, resources, execution)
here,
the categories in `categories`, and lets a check made above this package (the backend's) add its own."""
from __future__ import annotations

import math
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Callable

import yaml

from .categories import check_output_paths, read_categories
from ..invocation import command_prefix
from .model import (AXIS_KEYS, CACHE_METHODS, COMPILE_MODES, SPEED_AXES, cache_text, EXECUTORS, LORA_AXIS_FIELDS, LORA_EXPERTS, MAX_JOBS, MAX_JOBS_UNCONFIRMED,
                    QUANTIZE_MODES, SDPA_ATTENTION, TASKS, Axis, Execution, GenerationConfig, LoraConfig, Manifest,
                    ManifestError, ModelConfig, Problem, Resources, SpeedConfig)
from .names import path_length_problem, safe_component_problem
from .reader import Reader, compose, node_at, yaml_problem

# Bounds of the numbers: above what Wan (480p/720p, 81 frames at 16-24 fps, ~50 steps) and one
# machine need, low enough that nothing downstream allocates, sleeps or spawns without end.
MAX_SIDE = 4096  # generation.width and height, pixels
MAX_FRAMES = 1025  # generation.num_frames
MAX_FPS = 240
MAX_STEPS = 1000  # the flow-matching schedulers have 1000 training timesteps
MAX_CPU_SLOTS = 256
MAX_WORKERS_PER_GPU = 64
MAX_GPUS_PER_WORKER = 64
MAX_RETRIES = 100
MAX_RESTARTS = 1000
MAX_TIMEOUT_S = 7 * 24 * 3600  # job_timeout_s and heartbeat_timeout_s: a week
MAX_MARGIN_GIB = 1024
MAX_SEEDS = 10_000  # seeds of one sweep: days of GPU time per prompt already
MAX_LORA_STRENGTH = 100.0  # community recipes go to 3-4; beyond this a typo, not a setting
LORA_NAME_CHARS = 32
LORA_NAME = re.compile(rf"[A-Za-z0-9_-]{{1,{LORA_NAME_CHARS}}}")


# A check made above this package (validation.load_manifest: the backend's): it gets the manifest read
# so far and `problem(at, message, fix)`, which reports at the line of the first of the dotted keys
# `at` that the file has (or its nearest enclosing key), and returns the manifest, refined or not.
ManifestCheck = Callable[[Manifest, Callable[..., None]], Manifest]


def read_manifest(path: str | os.PathLike, check: ManifestCheck | None = None) -> Manifest:
    """Read and validate a manifest's YAML; raise ManifestError listing every problem, those of
    `check` included. It knows no backend: `validation.load_manifest` is what callers use."""
    path = Path(path).resolve()
    reader = Reader(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
        example = f", e.g. {path / inside[0]}" if inside else ""
        raise ManifestError([Problem(path, 0, "this is a folder, not a manifest file",
                                     f"give the manifest's YAML file{example}")])
    if not path.is_file():
        raise ManifestError([Problem(path, 0, "manifest file does not exist", "check the path")])
    try:
        root = compose(path)
    except yaml.YAMLError as exc:
        raise ManifestError([yaml_problem(path, exc, "the manifest")]) from None
    except UnicodeDecodeError:
        raise ManifestError([Problem(path, 0, "manifest is not UTF-8 text", "save it as UTF-8")]) from None
    if root is None:
        raise ManifestError([Problem(path, 0, "manifest is empty", "see experiments/demo.yaml")])
    if not reader.check_tree(root):
        raise ManifestError(reader.problems)  # its values cannot be read safely: stop here

    base = path.parent
    top = reader.mapping(root, "the manifest", {
        "name": True, "output_dir": False, "model": True, "generation": False, "seeds": True,
        "categories": True, "resources": False, "execution": False, "speed": False, "axes": False,
        "output": False})

    name_node = top.get("name", (None, None))[1]
    name = reader.scalar(name_node, "name", str, default="experiment")
    if name_node is not None and isinstance(name, str) and safe_component_problem(name):
        reader.problem(name_node, f"name {name!r} {safe_component_problem(name)}", "use a plain name")
    elif name_node is not None and isinstance(name, str) and "#" in name:
        # The name goes into tmux session names, where `#{…}` and `#(…)` are formats tmux expands
        # (`#(cmd)` runs a shell command): a session would come up under another name, or worse.
        reader.problem(name_node, f"name {name!r} contains `#`, which tmux reads as the start of a "
                                  "format in session names", f"remove the `#`, e.g. {name.replace('#', '')!r}")

    out_node = top.get("output_dir", (None, None))[1]
    output_dir = _read_output_dir(reader, out_node, base, name)

    model = _read_model(reader, top.get("model", (None, None))[1])
    if model is not None:
        model = replace(model, speed=_read_speed(reader, top.get("speed", (None, None))[1]))
    generation = _read_generation(reader, top.get("generation", (None, None))[1])
    seeds = _read_seeds(reader, top.get("seeds", (None, None))[1])
    resources = _read_resources(reader, top.get("resources", (None, None))[1])
    execution = _read_execution(reader, top.get("execution", (None, None))[1])
    categories = read_categories(reader, top.get("categories", (None, None))[1], base,
                                  model.task if model else None, output_dir)
    output_name = _read_output(reader, top.get("output", (None, None))[1])
    if output_name is None:  # a template's names are checked once the jobs are expanded (output_names)
        check_output_paths(reader, top.get("categories", (None, None))[1], output_dir, categories, seeds)
    axes_node = top.get("axes", (None, None))[1]
    axes, confirmed = _read_axes(reader, axes_node, _declared_lora_names(top.get("model", (None, None))[1]))
    _check_job_count(reader, axes_node, categories, seeds, axes, confirmed, top.get("seeds", (None, None))[1])

    manifest = Manifest(path=path, name=name, output_dir=output_dir, model=model,
                        generation=generation, seeds=seeds, categories=categories,
                        resources=resources, execution=execution, axes=axes, output_name=output_name,
                        notes=tuple(reader.notes))
    if check is not None and model is not None:
        def problem(at: tuple[str, ...], message: str, fix: str = "") -> None:
            node = next((found for key in at if (found := node_at(root, key)) is not None), None)
            reader.problem(node, message, fix)
        manifest = check(manifest, problem)
    if reader.problems:
        raise ManifestError(reader.problems)
    return manifest


def _read_output_dir(reader: Reader, node, base: Path, name: str) -> Path:
    value = reader.scalar(node, "output_dir", str, default=f"results/{name}")
    if not value.strip():
        reader.problem(node, "output_dir is empty (it would be the manifest's own folder)",
                       f"name a folder for the videos, e.g. `output_dir: results/{name}`")
        return base
    output_dir = (base / value).resolve()
    too_long = path_length_problem(output_dir)
    if too_long:
        reader.problem(node, f"output_dir {too_long}", "use a shorter path")
    elif os.path.exists(output_dir) and not os.path.isdir(output_dir):
        reader.problem(node, f"output_dir `{output_dir}` exists and is not a folder",
                       "name a folder (new or one of this sweep's), not a file or a device")
    else:  # a folder to be made under a file (`/etc/passwd/x`) cannot be
        above = next((parent for parent in output_dir.parents if os.path.exists(parent)), None)
        if above is not None and not os.path.isdir(above):
            reader.problem(node, f"output_dir `{output_dir}` cannot be made: `{above}` is a file, not a folder",
                           "name a folder that is not inside a file")
    return output_dir


def _read_output(reader: Reader, node) -> str | None:
    """`output: {name: TEMPLATE}`: the template, without a trailing `.mp4` (the product adds it);
    its placeholders and the names it makes are checked with the jobs (orchestrator/output_names.py)."""
    if node is None:
        return None
    keys = reader.mapping(node, "output", {"name": False})
    name_node = keys.get("name", (None, None))[1]
    template = reader.scalar(name_node, "output.name", str)
    if template is None:
        return None
    if template.lower().endswith(".mp4"):
        template = template[:-len(".mp4")]
    if not template.strip():
        reader.problem(name_node, "output.name is empty",
                       "write a template such as `{category}/{stem}/seed_{seed}_{prompt_id}`, or leave it out")
        return None
    return template


def _read_model(reader: Reader, node) -> ModelConfig | None:
    if node is None:
        return None
    keys = reader.mapping(node, "model", {"backend": True, "task": True, "path": False,
                                          "dtype": False, "options": False, "loras": False})
    get = lambda k: keys.get(k, (None, None))[1]  # noqa: E731
    backend = reader.scalar(get("backend"), "model.backend", str, default="synthetic")
    task = reader.scalar(get("task"), "model.task", str, default="t2v", choices=TASKS)
    model_path = reader.scalar(get("path"), "model.path", str)
    dtype = reader.scalar(get("dtype"), "model.dtype", str, default="bfloat16",
                          choices=("bfloat16", "float16", "float32"))
    options = {}
    if get("options") is not None:
        reader.mapping(get("options"), "model.options")
        if isinstance(get("options"), yaml.MappingNode):  # anything else was reported just now
            options = reader.value(get("options")) or {}
    if model_path is not None:
        # A local path, like every path here (nothing is downloaded unless `models download` is run):
        # relative to the manifest's folder, also before it exists (the demo builds its checkpoint there).
        path = Path(os.path.expanduser(model_path))
        model_path = str(path if path.is_absolute() else (reader.file.parent / path).resolve())
    loras = _read_loras(reader, get("loras"))
    return ModelConfig(backend=backend, task=task, path=model_path, dtype=dtype, options=options, loras=loras)


def _read_loras(reader: Reader, node) -> tuple[LoraConfig, ...]:
    """`model.loras`: NAME -> {path, strength, expert}, or NAME -> path (strength 1, both experts). A name is
    what output names and axes (`loras.NAME.strength`) call it; every LoRA listed is on unless the `loras`
    axis says otherwise."""
    if node is None:
        return ()
    example = "`motion: {path: loras/motion.safetensors, strength: 0.8}`"
    if isinstance(node, yaml.MappingNode) and not node.value:
        return ()
    loras = []
    for name, (name_node, value_node) in reader.mapping(node, "model.loras").items():
        what = f"model.loras.{name}"
        if not LORA_NAME.fullmatch(name):
            reader.problem(name_node, f"LoRA name {name!r} is not a short plain name",
                           "use letters, digits, `_` and `-` (it goes into output names and axis keys), e.g. "
                           f"{re.sub('[^A-Za-z0-9_-]+', '_', name)[:LORA_NAME_CHARS] or 'motion'!r}")
            continue
        if isinstance(value_node, yaml.ScalarNode):  # the short form: just the file
            path = _read_lora_path(reader, value_node, what)
            if path is not None:
                loras.append(LoraConfig(name=name, path=path))
            continue
        keys = reader.mapping(value_node, what, {"path": True, "strength": False, "expert": False})
        if not keys:
            continue
        get = lambda k: keys.get(k, (None, None))[1]  # noqa: E731
        path = _read_lora_path(reader, get("path"), f"{what}.path") if get("path") is not None else None
        strength = read_lora_strength(reader, get("strength"), f"{what}.strength")
        expert = reader.scalar(get("expert"), f"{what}.expert", str, "both", choices=LORA_EXPERTS)
        if path is not None and strength is not None:
            loras.append(LoraConfig(name=name, path=path, strength=strength, expert=expert))
    if not loras and not reader.problems:
        reader.problem(node, "model.loras lists no LoRA", f"write one per line, e.g. {example}, or leave it out")
    return tuple(loras)


def _declared_lora_names(model_node) -> tuple[str, ...]:
    """The LoRA names model.loras declares, a LoRA whose file has a problem too: the axes that sweep it are
    then read as they are meant (its own problem is reported at its line)."""
    pairs = model_node.value if isinstance(model_node, yaml.MappingNode) else []
    value = next((value for key, value in pairs if isinstance(key, yaml.ScalarNode) and key.value == "loras"), None)
    if not isinstance(value, yaml.MappingNode):
        return ()
    return tuple(key.value for key, _ in value.value
                 if isinstance(key, yaml.ScalarNode) and LORA_NAME.fullmatch(str(key.value)))


def _read_lora_path(reader: Reader, node, what: str) -> str | None:
    """A LoRA file's absolute path (relative to the manifest's folder), checked to be a readable file; what
    it holds (safetensors, layers that fit the model) the backend checks."""
    text = reader.scalar(node, what, str)
    if not isinstance(text, str) or not text.strip():
        if text is not None:
            reader.problem(node, f"{what} is empty", "give the LoRA's .safetensors file")
        return None
    path = Path(os.path.expanduser(text))
    path = path if path.is_absolute() else (reader.file.parent / path).resolve()
    if not path.exists():
        near = sorted(p.name for p in path.parent.glob("*.safetensors"))[:5] if path.parent.is_dir() else []
        reader.problem(node, f"{what}: the LoRA file {path} does not exist",
                       f"check the path (in {path.parent}: {', '.join(near)})" if near else
                       f"check the path; `{command_prefix()} models download REPO --file NAME --to FOLDER` "
                       "fetches one LoRA file from the hub")
        return None
    if not path.is_file():
        reader.problem(node, f"{what}: {path} is not a file", "give the LoRA's .safetensors file")
        return None
    if not os.access(path, os.R_OK):
        reader.problem(node, f"{what}: the LoRA file {path} is not readable by this user",
                       f"make it readable (chmod a+r {path})")
        return None
    return str(path)


def read_lora_strength(reader: Reader, node, what: str) -> float | tuple[float, float] | None:
    """A LoRA's strength: one finite number, or a pair [high-noise expert, low-noise expert]; None after a
    problem (reported)."""
    if node is None:
        return 1.0
    value = reader.value(node)
    fix = ("use a finite number such as 1.0 (0 turns it off), or a pair [high, low] for Wan2.2's experts, "
           "e.g. [3.0, 1.5]")
    values = value if isinstance(value, list) else [value]
    if (len(values) not in (1, 2) or isinstance(value, list) and len(values) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
        reader.problem(node, f"{what} is {value!r}", fix)
        return None
    if not all(math.isfinite(v) and abs(v) <= MAX_LORA_STRENGTH for v in values):
        reader.problem(node, f"{what} is {value!r}, not a finite number within ±{MAX_LORA_STRENGTH:g}", fix)
        return None
    return (float(values[0]), float(values[1])) if isinstance(value, list) else float(value)


def _read_generation(reader: Reader, node) -> GenerationConfig:
    if node is None:
        return GenerationConfig()
    keys = reader.mapping(node, "generation", {
        "width": False, "height": False, "num_frames": False, "fps": False, "steps": False,
        "cfg_scale": False, "shift": False, "denoising_strength": False, "negative_prompt": False,
        "extra": False})
    get = lambda k: keys.get(k, (None, None))[1]  # noqa: E731
    d = GenerationConfig()
    width = reader.scalar(get("width"), "generation.width", int, d.width)
    height = reader.scalar(get("height"), "generation.height", int, d.height)
    frames = reader.scalar(get("num_frames"), "generation.num_frames", int, d.num_frames)
    for key, value in (("width", width), ("height", height)):
        if value > MAX_SIDE:
            reader.problem(get(key), f"generation.{key} is {value}, more than {MAX_SIDE} pixels",
                           f"use a multiple of 16 up to {MAX_SIDE} (Wan makes 832x480 and 1280x720)")
        elif value <= 0 or value % 16:
            lower = max(16, value // 16 * 16)
            reader.problem(get(key), f"generation.{key} is {value}, not a positive multiple of 16",
                           f"use {lower} or {lower + 16}")
    if frames > MAX_FRAMES:
        reader.problem(get("num_frames"), f"generation.num_frames is {frames}, more than {MAX_FRAMES}",
                       f"use 4n+1 frames up to {MAX_FRAMES} (Wan makes 81)")
    elif frames < 1 or (frames - 1) % 4:
        lower = max(1, (frames - 1) // 4 * 4 + 1)
        reader.problem(get("num_frames"), f"generation.num_frames is {frames}, not of the form 4n+1",
                       f"use {lower} or {lower + 4}")
    fps = reader.scalar(get("fps"), "generation.fps", int, d.fps)
    steps = reader.scalar(get("steps"), "generation.steps", int, d.steps)
    if not 0 < fps <= MAX_FPS:
        reader.problem(get("fps"), f"generation.fps is {fps}", f"use a frame rate from 1 to {MAX_FPS}, e.g. 16")
    if not 0 < steps <= MAX_STEPS:
        reader.problem(get("steps"), f"generation.steps is {steps}",
                       f"use 1 to {MAX_STEPS} denoising steps (Wan uses 50)")
    strength = reader.scalar(get("denoising_strength"), "generation.denoising_strength", float,
                             d.denoising_strength)
    if not 0.0 < strength <= 1.0:
        reader.problem(get("denoising_strength"), f"generation.denoising_strength is {strength}",
                       "use a value in (0, 1]")
    extra = {}
    if get("extra") is not None:
        reader.mapping(get("extra"), "generation.extra")
        if isinstance(get("extra"), yaml.MappingNode):  # anything else was reported just now
            extra = reader.value(get("extra")) or {}
    cfg_scale = _read_cfg_scale(reader, get("cfg_scale"), d.cfg_scale)
    shift = reader.scalar(get("shift"), "generation.shift", float, None)
    if shift is not None and not 0.0 < shift <= 100.0:
        reader.problem(get("shift"), f"generation.shift is {shift}",
                       "use a positive shift (Wan uses 3.0 for 480p, 5.0 for 720p) or leave it out")
        shift = None
    return GenerationConfig(
        width=width, height=height, num_frames=frames, fps=fps, steps=steps,
        cfg_scale=cfg_scale, shift=shift,
        denoising_strength=strength,
        negative_prompt=reader.scalar(get("negative_prompt"), "generation.negative_prompt", str, ""),
        extra=extra)


def _read_speed(reader: Reader, node) -> SpeedConfig:
    if node is None:
        return SpeedConfig()
    keys = reader.mapping(node, "speed", {"compile": False, "attention": False, "quantize": False, "cache": False})
    get = lambda k: keys.get(k, (None, None))[1]  # noqa: E731
    d = SpeedConfig()
    # YAML reads a bare `none` as the text "none", but `null`/`~`/an empty value as None: both mean off.
    def text(key, choices=None):
        value_node = get(key)
        if value_node is not None and reader.value(value_node) is None:
            return getattr(d, key)
        return reader.scalar(value_node, f"speed.{key}", str, getattr(d, key), choices=choices)
    attention = text("attention")
    if not attention.strip():
        reader.problem(get("attention"), "speed.attention is empty",
                       f"use one of: {', '.join(SDPA_ATTENTION)}, or a diffusers attention backend name")
        attention = d.attention
    return SpeedConfig(compile=text("compile", COMPILE_MODES), attention=attention,
                       quantize=text("quantize", QUANTIZE_MODES), cache=_read_cache(reader, get("cache")))


CACHE_EXAMPLE = "`cache: none`, `cache: {first_block: 0.05}` or `cache: {taylorseer: {interval: 4, warmup: 3}}`"


def _read_cache(reader: Reader, node) -> str:
    """`speed.cache`: none, or one key naming the method with its main option's value or a mapping of its
    options under it; each option within its range. Returns the canonical text (`model.cache_text`)."""
    value = reader.value(node)
    if node is None or value is None or value == "none":
        return "none"
    methods = ", ".join(CACHE_METHODS)
    if isinstance(value, str) and value in CACHE_METHODS:
        return cache_text(value, {})  # the method with its defaults
    if not isinstance(value, dict) or len(value) != 1:
        reader.problem(node, f"speed.cache is {value!r}: give none or one method with its options",
                       f"write {CACHE_EXAMPLE}; methods: {methods}")
        return "none"
    (method, options), = value.items()
    if method not in CACHE_METHODS:
        reader.problem(node, f"speed.cache: unknown method {method!r}", f"use one of: {methods}")
        return "none"
    main, table = CACHE_METHODS[method]
    if not isinstance(options, dict):
        options = {} if options is None else {main: options}
    chosen = {}
    for key, given in options.items():
        if key not in table:
            reader.problem(node, f"speed.cache.{method} has no option {key!r}", f"use: {', '.join(table)}")
            continue
        default, lowest, highest, kind = table[key]
        number = isinstance(given, (int, float)) and not isinstance(given, bool) and (kind is float or given == int(given))
        if not number or not lowest <= given <= highest:
            what = "a whole number" if kind is int else "a number"
            reader.problem(node, f"speed.cache.{method}.{key} is {given!r}, out of range",
                           f"use {what} from {lowest} to {highest} (default {default})")
            continue
        chosen[key] = kind(given)
    return cache_text(method, chosen)


def lora_axis_keys(lora_names: tuple[str, ...]) -> tuple[str, ...]:
    """The axis keys of a manifest's LoRAs: `loras` (which are on) and `loras.NAME.strength|path` each."""
    return (("loras",) if lora_names else ()) + tuple(f"loras.{name}.{field_}" for name in lora_names
                                                      for field_ in LORA_AXIS_FIELDS)


def _read_axes(reader: Reader, node, lora_names: tuple[str, ...] = ()) -> tuple[tuple[Axis, ...], int | None]:
    """`axes:` — `KEY: [values]` per swept setting and `zip: [{KEY: [values], KEY: [values]}]` for
    settings whose i-th values go together, in the manifest's order; and `confirm_jobs`, the job
    count the user confirms (None if not given). `lora_names`: the LoRAs of `model.loras`, whose
    settings may be swept too (`loras`, `loras.NAME.strength`, `loras.NAME.path`)."""
    if node is None:
        return (), None
    allowed = AXIS_KEYS + lora_axis_keys(lora_names)
    misnamed: set[str] = set()  # LoRA keys said wrong below, with their own fix (not "unknown key")
    for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
        key = getattr(key_node, "value", None)
        if isinstance(key, str) and (key == "loras" or key.startswith("loras.")) and key not in allowed:
            # (said here, with the fix that applies; the generic "unknown key" below is then left out)
            name = key.split(".")[1] if key.count(".") == 2 else None
            if not lora_names:
                reader.problem(key_node, f"axes sweeps `{key}`, but model.loras lists no LoRA",
                               "declare it under model: `loras: {NAME: {path: FILE, strength: 1.0}}`")
            elif name not in lora_names:
                reader.problem(key_node, f"axes sweeps `{key}`, but model.loras has no LoRA named {name!r}",
                               f"use one of: {', '.join(lora_axis_keys(lora_names))}")
            else:
                reader.problem(key_node, f"axes cannot sweep `{key}`",
                               f"sweep loras.{name}.strength or loras.{name}.path")
            misnamed.add(key)
    keys = reader.mapping(node, "axes", {**{key: False for key in allowed + tuple(misnamed)}, "zip": False,
                                         "confirm_jobs": False})
    for key in misnamed:
        keys.pop(key, None)
    axes: list[Axis] = []
    swept: dict[str, yaml.Node] = {}

    def first_time(key: str, key_node) -> bool:
        if key in swept:
            reader.problem(key_node, f"axes sweeps `{key}` twice (also on line {swept[key].start_mark.line + 1})",
                           "sweep each setting once: one list, or one zip group")
            return False
        swept[key] = key_node
        return True

    confirmed = reader.scalar(keys.get("confirm_jobs", (None, None))[1], "axes.confirm_jobs", int)
    for key, (key_node, value_node) in keys.items():
        if key == "confirm_jobs":
            continue
        if key == "zip":
            axes.extend(_read_zip_groups(reader, value_node, first_time, allowed))
            continue
        if not first_time(key, key_node):
            continue
        values = _read_axis_values(reader, key, value_node, f"axes.{key}")
        if key == "loras" and values and not _lora_sets_declared(reader, value_node, lora_names):
            continue
        if values:
            axes.append(Axis((key,), tuple((value,) for value in values)))
    return tuple(axes), confirmed


def _read_zip_groups(reader: Reader, node, first_time: Callable[[str, yaml.Node], bool],
                     allowed: tuple[str, ...] = AXIS_KEYS) -> list[Axis]:
    example = "`zip: [{width: [832, 480], height: [480, 832]}]`"
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        reader.problem(node, "axes.zip must be a list of groups, each a mapping of settings to equally long lists",
                       f"write e.g. {example}")
        return []
    groups = []
    for group_node in node.value:
        keys = reader.mapping(group_node, "a group of axes.zip", {key: False for key in allowed})
        columns: list[tuple[str, yaml.Node, list]] = []
        complete = True
        for key, (key_node, value_node) in keys.items():
            if first_time(key, key_node):
                # (a value may repeat within a group's list: only a whole combination may not)
                values = _read_axis_values(reader, key, value_node, f"axes.zip.{key}", distinct=False)
                complete = complete and bool(values)
                columns.append((key, value_node, values))
        if not columns or not complete:
            continue
        lengths = {len(node_.value) for _, node_, _ in columns}
        if len(lengths) > 1:
            sizes = ", ".join(f"{key} has {len(node_.value)}" for key, node_, _ in columns)
            reader.problem(group_node, f"axes.zip: the lists of a group must be equally long ({sizes})",
                           "give each setting of the group one value per combination: the i-th values go together")
            continue
        points = list(zip(*(values for _, _, values in columns)))
        for index, point in enumerate(points):
            if point in points[:index]:
                names = [key for key, _, _ in columns]
                reader.problem(columns[0][1].value[index], f"axes.zip: the combination {dict(zip(names, point))} "
                               "is listed twice", "remove the repeated combination")
                break
        else:
            groups.append(Axis(tuple(key for key, _, _ in columns), tuple(points)))
    return groups


def _read_axis_values(reader: Reader, key: str, node, what: str, distinct: bool = True) -> list:
    """The values of one swept setting, each checked exactly as that setting is checked under
    `generation:` (`speed:` for quantize and cache; its reader runs on the value's own node, so a problem is at
    the value's line and names `what`), and each listed once where `distinct`. An empty list: something
    was reported."""
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        reader.problem(node, f"{what} must be a non-empty list of values",
                       f"write e.g. `{key}: [{'3.0, 5.0' if key == 'cfg_scale' else '30, 50'}]`"
                       if key in ("cfg_scale", "steps") else f"write `{key}: [first value, second value, …]`")
        return []
    values: list = []
    fine = True
    for item in node.value:
        before = len(reader.problems)
        if key == "loras" or key.startswith("loras."):
            value = _read_lora_axis_value(reader, key, item, what)
            if value is None:
                fine = False
            elif distinct and value in values:
                reader.problem(item, f"{what} lists {value!r} twice", "remove the repeated value")
                fine = False
            else:
                values.append(value)
            continue
        # The generation reader, given just this key with this value, checks it as it would there.
        mapping = yaml.MappingNode("tag:yaml.org,2002:map",
                                   [(yaml.ScalarNode("tag:yaml.org,2002:str", key, item.start_mark, item.end_mark),
                                     item)], item.start_mark, item.end_mark)
        section, read = ("speed", _read_speed) if key in SPEED_AXES else ("generation", _read_generation)
        value = getattr(read(reader, mapping), key)
        if len(reader.problems) > before:
            reader.problems[before:] = [replace(p, message=p.message.replace(f"{section}.{key}", what))
                                        for p in reader.problems[before:]]
            fine = False
            continue
        if distinct and value in values:
            reader.problem(item, f"{what} lists {value!r} twice", "remove the repeated value")
            fine = False
            continue
        values.append(value)
    return values if fine else []


def _lora_sets_declared(reader: Reader, node, lora_names: tuple[str, ...]) -> bool:
    """Whether every name in the `loras` axis's sets is one of model.loras (else said at its value)."""
    for item in node.value:
        for name_node in item.value if isinstance(item, yaml.SequenceNode) else ():
            if name_node.value not in lora_names:
                reader.problem(name_node, f"axes.loras: {name_node.value!r} is not a LoRA of model.loras",
                               f"use the names model.loras gives: {', '.join(lora_names)}")
                return False
    return True


def _read_lora_axis_value(reader: Reader, key: str, item, what: str):
    """One value of a LoRA axis, checked as under model.loras: a strength, a file, or (`loras`) the names
    of the LoRAs that are on, e.g. `[]` or `[motion, distill]` (a tuple: listed in any order, the same set)."""
    if key == "loras":
        value = reader.value(item)
        if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
            reader.problem(item, f"{what}: each value is a list of LoRA names, not {value!r}",
                           "write e.g. `loras: [[], [motion], [motion, distill]]`")
            return None
        if len(set(value)) != len(value):
            reader.problem(item, f"{what}: {value!r} names a LoRA twice", "name each once")
            return None
        return tuple(sorted(value))
    field_ = key.rsplit(".", 1)[1]
    if field_ == "strength":
        return read_lora_strength(reader, item, what)
    return _read_lora_path(reader, item, what)


def _check_job_count(reader: Reader, node, categories, seeds, axes: tuple[Axis, ...], confirmed: int | None,
                     seeds_node=None) -> None:
    """A sweep past MAX_JOBS_UNCONFIRMED jobs (categories × prompts × seeds × the axes' combinations) needs
    `axes.confirm_jobs: N` (N ≥ the count): a typo in a list (or one list too many) must not queue days of
    GPU time unseen; and none may pass MAX_JOBS (its jobs are held in memory and in the ledger). Counted
    from the lists' lengths, before anything is expanded."""
    count = job_count(categories, seeds, axes)
    if count <= MAX_JOBS_UNCONFIRMED:
        return
    what = "the axes make" if axes else "the manifest makes"
    confirm_node = node_at(node, "confirm_jobs") if node is not None else None
    at = confirm_node or node or seeds_node
    if count > MAX_JOBS:
        reader.problem(at, f"{what} {count:,} jobs, more than the {MAX_JOBS:,} a sweep may have",
                       "split the sweep into several manifests (categories, prompts or seeds apart), or shorten "
                       "the lists")
    elif confirmed is None or confirmed < count:
        where = "under axes:" if axes else "(an `axes:` section of its own)"
        example = f"`confirm_jobs: {count}` {where}" if axes else f"`axes: {{confirm_jobs: {count}}}` {where}"
        reader.problem(at, f"{what} {count:,} jobs, more than {MAX_JOBS_UNCONFIRMED:,}"
                       + (f" and more than axes.confirm_jobs ({confirmed:,})" if confirmed is not None else ""),
                       f"shorten the lists, or confirm the count with {example}")


def job_count(categories, seeds, axes: tuple[Axis, ...]) -> int:
    """How many jobs the manifest expands to, from its lists' lengths (nothing is expanded)."""
    count = sum(len(ref.prompts) for category in categories for ref in category.references) * len(seeds)
    for axis in axes:
        count *= len(axis.points)
    return count


def _read_cfg_scale(reader: Reader, node, default: float) -> float | tuple[float, float]:
    if node is None:
        return default
    value = reader.value(node)

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0

    if isinstance(value, list) and len(value) == 2 and all(map(number, value)):
        return (float(value[0]), float(value[1]))
    if number(value):
        return float(value)
    reader.problem(node, f"generation.cfg_scale is {value!r}",
                   "use a number ≥ 0, or a pair [high-noise expert, low-noise expert] for Wan 2.2 A14B")
    return default


def _read_seeds(reader: Reader, node) -> tuple[int, ...]:
    if node is None:
        return ()
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        reader.problem(node, "seeds must be a non-empty list of integers", "write e.g. `seeds: [42, 142]`")
        return ()
    if len(node.value) > MAX_SEEDS:
        reader.problem(node, f"seeds lists {len(node.value):,} seeds, more than {MAX_SEEDS:,}",
                       f"use at most {MAX_SEEDS:,} seeds per sweep (each is a video per prompt; split a larger "
                       "sweep into several manifests)")
        return ()
    seeds: dict[int, None] = {}  # (in order; a set's lookup: a list's made reading 20,000 seeds take minutes)
    for item in node.value:
        seed = reader.scalar(item, "each seed", int)
        if seed is None:
            continue
        if seed in seeds:
            reader.problem(item, f"seed {seed} is listed twice", "remove the duplicate seed")
            continue
        if not 0 <= seed < 2**63:
            reader.problem(item, f"seed {seed} is out of range", "use a seed in [0, 2^63)")
            continue
        seeds[seed] = None
    return tuple(seeds)


def _read_resources(reader: Reader, node) -> Resources:
    if node is None:
        return Resources()
    keys = reader.mapping(node, "resources", {"gpus": False, "workers_per_gpu": False,
                                              "gpus_per_worker": False, "cpu_slots": False,
                                              "memory_margin_gib": False})
    get = lambda k: keys.get(k, (None, None))[1]  # noqa: E731
    gpus: str | tuple[int, ...] = "all"
    if get("gpus") is not None:
        value = reader.value(get("gpus"))
        if value == "all":
            gpus = "all"
        elif isinstance(value, int) and not isinstance(value, bool):
            gpus = (value,)
        elif isinstance(value, list) and value and all(isinstance(v, int) and v >= 0 for v in value) \
                and len(set(value)) == len(value):
            gpus = tuple(value)
        else:
            reader.problem(get("gpus"), f"resources.gpus is {value!r}",
                           "use `all` or a list of distinct GPU indices, e.g. [0, 1]")

    def count_or_auto(key: str, default, most: int):
        n = get(key)
        if n is None:
            return default
        value = reader.value(n)
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= most):
            return value
        reader.problem(n, f"resources.{key} is {value!r}", f"use `auto` or a whole number from 1 to {most}")
        return default

    slots = reader.scalar(get("cpu_slots"), "resources.cpu_slots", int, 2)
    if not 1 <= slots <= MAX_CPU_SLOTS:
        reader.problem(get("cpu_slots"), f"resources.cpu_slots is {slots}",
                       f"use a number from 1 to {MAX_CPU_SLOTS} (one worker process each)")
        slots = 2
    margin = reader.scalar(get("memory_margin_gib"), "resources.memory_margin_gib", float, 2.0)
    if not 0 <= margin <= MAX_MARGIN_GIB:
        reader.problem(get("memory_margin_gib"), f"resources.memory_margin_gib is {margin}",
                       f"use 0 to {MAX_MARGIN_GIB} GiB")
        margin = 2.0
    return Resources(gpus=gpus, workers_per_gpu=count_or_auto("workers_per_gpu", 1, MAX_WORKERS_PER_GPU),
                     gpus_per_worker=count_or_auto("gpus_per_worker", 1, MAX_GPUS_PER_WORKER),
                     cpu_slots=slots, memory_margin_gib=margin)


def _read_execution(reader: Reader, node) -> Execution:
    if node is None:
        return Execution()
    keys = reader.mapping(node, "execution", {"executor": False, "retries": False,
                                              "job_timeout_s": False, "heartbeat_timeout_s": False,
                                              "max_restarts": False, "ray_address": False,
                                              "ray_stream_outputs": False})
    get = lambda k: keys.get(k, (None, None))[1]  # noqa: E731
    d = Execution()
    execution = Execution(
        executor=reader.scalar(get("executor"), "execution.executor", str, None, choices=EXECUTORS),
        retries=reader.scalar(get("retries"), "execution.retries", int, d.retries),
        job_timeout_s=reader.scalar(get("job_timeout_s"), "execution.job_timeout_s", float,
                                    d.job_timeout_s),
        heartbeat_timeout_s=reader.scalar(get("heartbeat_timeout_s"), "execution.heartbeat_timeout_s",
                                          float, d.heartbeat_timeout_s),
        max_restarts=reader.scalar(get("max_restarts"), "execution.max_restarts", int, d.max_restarts),
        ray_address=reader.scalar(get("ray_address"), "execution.ray_address", str, None),
        ray_stream_outputs=reader.scalar(get("ray_stream_outputs"), "execution.ray_stream_outputs", bool,
                                         d.ray_stream_outputs))
    for key, most in (("retries", MAX_RETRIES), ("max_restarts", MAX_RESTARTS)):
        if getattr(execution, key) < 0:
            reader.problem(get(key), f"execution.{key} is negative", "use 0 or more")
        elif getattr(execution, key) > most:
            reader.problem(get(key), f"execution.{key} is {getattr(execution, key)}", f"use 0 to {most}")
    for key in ("job_timeout_s", "heartbeat_timeout_s"):
        if not getattr(execution, key) > 0:  # (NaN too: it would turn the timeout off)
            reader.problem(get(key), f"execution.{key} must be positive", "use a number of seconds > 0")
        elif getattr(execution, key) > MAX_TIMEOUT_S:
            reader.problem(get(key), f"execution.{key} is {getattr(execution, key):g} seconds, more than a week",
                           f"use at most {MAX_TIMEOUT_S} seconds")
    return execution
