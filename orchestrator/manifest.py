"""The experiment manifest: read YAML with line marks and validate it into frozen dataclasses.

Every problem is collected (file, line, what is wrong, how to fix it) and raised together as one
`ManifestError`, before anything starts. Relative paths resolve against the manifest's folder.
"""
from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .errors import WanSweepError
from .executors import EXECUTOR_NAMES as EXECUTORS  # the one list of executors

TASKS = ("t2v", "i2v", "v2v")
# Limits of what a manifest may hold, each far above any real sweep: past them YAML's own recursion,
# aliases expanded in the settings fingerprint, or a walk of the file system would hang or crash.
MAX_NESTING = 64  # lists and mappings inside each other (a manifest needs about 6)
MAX_ALIAS_EXPANSION = 1_000_000  # values and characters that aliases may add once expanded
# Plain YAML values only: they go to JSON specs and sidecars. A merge key (`<<: *defaults`) is fine.
PLAIN_TAGS = {f"tag:yaml.org,2002:{name}" for name in ("str", "int", "float", "bool", "null", "seq", "map")}
MERGE_TAG = "tag:yaml.org,2002:merge"
KIND_TAGS = {yaml.ScalarNode: PLAIN_TAGS - {"tag:yaml.org,2002:seq", "tag:yaml.org,2002:map"},
             yaml.SequenceNode: {"tag:yaml.org,2002:seq"}, yaml.MappingNode: {"tag:yaml.org,2002:map"}}
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
MAX_GLOB_ENTRIES = 100_000  # files and folders one `videos:`/`images:` glob may look at
NAME_MAX_BYTES = 255  # one file or folder name (ext4, xfs, btrfs, NTFS, APFS)
PATH_MAX_BYTES = 4095  # a whole path (Linux PATH_MAX, less its terminating NUL)
# A category or stem names a folder and, in the review page's cache, `<stem>.thumb.jpg`: it may take
# what a name can hold less the longest suffix the product adds to it.
MAX_COMPONENT_BYTES = NAME_MAX_BYTES - 15
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# The `speed:` section (orchestrator/speed.py applies it): the values each key takes.
COMPILE_MODES = ("none", "blocks", "full")
SDPA_ATTENTION = ("auto", "cudnn", "flash", "efficient", "math")  # torch SDPA's kernels; other names: diffusers'
QUANTIZE_MODES = ("none", "fp8", "int8", "fp8_storage")
# What the product itself keeps in the output folder (`sweep`, `review`): a category of one of these
# names would mix its videos with the ledger, the logs or the review page.
RESERVED_NAMES = (".sweep", "logs", "index.html")


@dataclass(frozen=True)
class Problem:
    file: Path
    line: int  # 1-based; 0 when the problem concerns the whole file
    message: str
    fix: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else f"{self.file}"
        return f"{where}: {self.message}" + (f" (fix: {self.fix})" if self.fix else "")


class ManifestError(WanSweepError, ValueError):
    """All the problems of one manifest, reported together."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__(self.describe("nothing was started"))

    def describe(self, outcome: str) -> str:
        """The problems, one a line, after what they prevented (`nothing was started`)."""
        count = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        return f"manifest has {count}; {outcome}:\n" + "\n".join(f"  {p}" for p in self.problems)


@dataclass(frozen=True)
class SpeedConfig:
    """How fast the denoiser runs (`speed:`): torch.compile, the attention kernel, quantized weights."""
    compile: str = "none"  # none | blocks (the repeated transformer blocks) | full (the whole denoiser)
    attention: str = "auto"  # auto | cudnn | flash | efficient | math, or a diffusers attention backend
    quantize: str = "none"  # none | fp8 | int8 | fp8_storage

    @property
    def is_default(self) -> bool:
        return self == SpeedConfig()


@dataclass(frozen=True)
class ModelConfig:
    backend: str
    task: str
    path: str | None = None
    dtype: str = "bfloat16"
    options: dict[str, Any] = field(default_factory=dict)  # backend-specific, checked by the backend
    # The manifest's `speed:` section; it lives here because it is part of how the model is built and
    # run, and every place that builds a backend (worker, Ray actor, calibration probe) gets it with it.
    speed: SpeedConfig = field(default_factory=SpeedConfig)

    def __post_init__(self):
        if isinstance(self.speed, dict):  # read back from a worker's JSON spec
            object.__setattr__(self, "speed", SpeedConfig(**self.speed))


@dataclass(frozen=True)
class GenerationConfig:
    width: int = 832
    height: int = 480
    num_frames: int = 81
    fps: int = 15
    steps: int = 50
    # One guidance scale, or a pair for Wan 2.2's two experts: [high-noise expert, low-noise expert]
    # in the order they run (Wan's own configs list them the other way round, low first).
    cfg_scale: float | tuple[float, float] = 5.0
    shift: float | None = None  # the sampler's flow shift; None keeps the checkpoint's own
    denoising_strength: float = 1.0
    negative_prompt: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # passed to the backend as keyword arguments

    @property
    def guidance(self) -> tuple[float, float | None]:
        """(scale, second expert's scale or None); a pair read back from a JSON spec is a list."""
        if isinstance(self.cfg_scale, (list, tuple)):
            return float(self.cfg_scale[0]), float(self.cfg_scale[1])
        return float(self.cfg_scale), None

    @property
    def uses_guidance(self) -> bool:
        high, low = self.guidance
        return high > 1.0 or (low is not None and low > 1.0)


@dataclass(frozen=True)
class Reference:
    """One input of a category: a reference video, an image, or nothing (text-to-video)."""
    stem: str | None
    path: Path | None
    prompts: tuple[str, ...]


@dataclass(frozen=True)
class Category:
    name: str
    kind: str  # "videos", "images" or "none"
    references: tuple[Reference, ...]


@dataclass(frozen=True)
class Resources:
    gpus: str | tuple[int, ...] = "all"
    workers_per_gpu: int | str = 1  # an integer, or "auto" (measured sizing)
    gpus_per_worker: int | str = 1
    cpu_slots: int = 2  # worker slots when the machine has no NVIDIA GPU and the backend runs on CPU
    memory_margin_gib: float = 2.0


@dataclass(frozen=True)
class Execution:
    executor: str | None = None  # None: tmux where tmux exists, else local
    retries: int = 2
    job_timeout_s: float = 1800.0
    heartbeat_timeout_s: float = 300.0
    max_restarts: int = 5
    ray_address: str | None = None  # executor ray: `auto`, HOST:PORT, or None for a local Ray
    ray_stream_outputs: bool = False  # executor ray: send each mp4 back to this machine's output_dir


@dataclass(frozen=True)
class Manifest:
    path: Path
    name: str
    output_dir: Path
    model: ModelConfig
    generation: GenerationConfig
    seeds: tuple[int, ...]
    categories: tuple[Category, ...]
    resources: Resources
    execution: Execution

    @property
    def max_attempts(self) -> int:
        return 1 + self.execution.retries


# --------------------------------------------------------------------------------------------------
# YAML nodes with line numbers


class _Reader:
    """Walks a composed YAML node tree and records problems with their file and line."""

    def __init__(self, file: Path):
        self.file = file
        self.problems: list[Problem] = []

    def problem(self, node: yaml.Node | None, message: str, fix: str = "", file: Path | None = None):
        line = node.start_mark.line + 1 if node is not None else 0
        self.problems.append(Problem(file or self.file, line, message, fix))

    def mapping(self, node, what: str, allowed: dict[str, bool] | None = None) -> dict[str, tuple]:
        """Return {key: (key_node, value_node)}; report unknown and missing required keys."""
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, f"{what} must be a mapping (key: value)", f"write {what} as `key: value` lines")
            return {}
        out: dict[str, tuple] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is None:
                self.problem(key_node, f"{what} has a key that is not a plain name")
                continue
            if key in out:
                self.problem(key_node, f"{what} has `{key}` twice", "keep one of them")
                continue
            if allowed is not None and key not in allowed:
                self.problem(key_node, f"unknown key `{key}` in {what}",
                             f"use one of: {', '.join(sorted(allowed))}")
                continue
            out[key] = (key_node, value_node)
        if allowed is not None:
            for key, required in allowed.items():
                if required and key not in out:
                    self.problem(node, f"{what} is missing `{key}`", f"add `{key}:` to {what}")
        return out

    def value(self, node) -> Any:
        if node is None:
            return None
        try:
            return yaml.safe_load(yaml.serialize(node))
        except yaml.YAMLError as exc:  # e.g. a list as a mapping key, a merge of a non-mapping
            # (the error's own marks count lines of the re-serialized value, not of the file)
            self.problem(node, f"cannot read this value: {getattr(exc, 'problem', None) or exc}",
                         "write plain text, numbers, lists and `key: value` mappings")
            return None

    def scalar(self, node, what: str, kind: type | tuple, default=None, choices=None):
        if node is None:
            return default
        value = self.value(node)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds).replace("str", "text").replace("int", "integer")
            article = "an" if names[0] in "aeiou" else "a"
            self.problem(node, f"{what} must be {names}, got {value!r}", f"set {what} to {article} {names}")
            return default
        if choices is not None and value not in choices:
            self.problem(node, f"{what} is {value!r}", f"use one of: {', '.join(map(str, choices))}")
            return default
        return value

    def check_tree(self, root, file: Path | None = None) -> bool:
        """Report what no key's own check can catch, anywhere in a composed file: tags other than
        plain YAML values, NUL characters, infinite or NaN numbers, and aliases that expand past
        MAX_ALIAS_EXPANSION (a "billion laughs"), at the anchor's line. True when nothing was found."""
        before = len(self.problems)
        constructor = yaml.constructor.SafeConstructor()
        seen: set[int] = set()
        stack: list[tuple[yaml.Node, bool]] = [(root, False)]
        while stack:
            node, is_key = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            if node.tag not in PLAIN_TAGS and not (is_key and node.tag == MERGE_TAG):
                if node.tag == "tag:yaml.org,2002:timestamp":
                    self.problem(node, f"`{node.value}` would be read as a date", "quote it: "
                                 f"\"{node.value}\"", file=file)
                else:
                    self.problem(node, f"the YAML tag `{tag}` is not supported here",
                                 "remove the tag (or quote the value): a manifest holds plain text, "
                                 "numbers, lists and `key: value` mappings", file=file)
            elif node.tag not in KIND_TAGS[type(node)] and node.tag != MERGE_TAG:
                kind = {yaml.ScalarNode: "a single value", yaml.SequenceNode: "a list",
                        yaml.MappingNode: "a mapping"}[type(node)]
                self.problem(node, f"{kind} cannot be a `{tag}`", "remove the tag", file=file)
            elif isinstance(node, yaml.ScalarNode):
                if node.tag == MERGE_TAG:
                    continue  # the `<<` of a merge; what it merges is checked where it is read
                if "\x00" in node.value:
                    self.problem(node, "a value contains a NUL character", "remove it", file=file)
                    continue
                try:
                    value = constructor.construct_object(node)
                except (ValueError, KeyError, yaml.YAMLError):  # `!!int abc`, `!!bool maybe`, `!!seq x`
                    self.problem(node, f"`{node.value}` is not a valid `{tag}`",
                                 "remove the tag (or quote the value)", file=file)
                    continue
                if isinstance(value, float) and not math.isfinite(value):
                    self.problem(node, f"`{node.value}` is not a finite number", "use a number", file=file)
            elif isinstance(node, yaml.SequenceNode):
                stack.extend((item, False) for item in reversed(node.value))
            else:
                for key, item in reversed(node.value):
                    stack.extend(((item, False), (key, True)))
        found = self._alias_problem(root)
        if found is not None:
            node, message = found
            self.problem(node, message, "write the values out instead of repeating this anchor", file=file)
        return len(self.problems) == before

    @staticmethod
    def _alias_problem(root) -> tuple[yaml.Node, str] | None:
        """(anchored node, what is wrong) when an alias sits inside its own anchor (an endless
        value), or when aliases make the file expand by more than MAX_ALIAS_EXPANSION ("billion
        laughs"), naming the anchor whose repetitions add most; else None. Sizes are computed once
        per distinct node (an alias is the anchored node itself), so nothing is ever expanded."""
        size: dict[int, int] = {}  # expanded size of each distinct node: 1 per node + its characters
        uses: dict[int, int] = {}
        nodes: dict[int, yaml.Node] = {}
        stack: list[tuple[yaml.Node, bool]] = [(root, False)]
        while stack:
            node, children_done = stack.pop()
            key = id(node)
            if children_done:
                size[key] = 1 + (len(node.value) if isinstance(node, yaml.ScalarNode) else
                                 sum(size[id(kid)] for kid in _children(node)))
                continue
            uses[key] = uses.get(key, 0) + 1
            if key in nodes:
                if key not in size:  # still being walked: this alias is inside its own anchor
                    return node, "an alias refers to the anchor on this line from inside it (an endless value)"
                continue
            nodes[key] = node
            stack.append((node, True))
            stack.extend((kid, False) for kid in _children(node))
        written = sum(1 + (len(n.value) if isinstance(n, yaml.ScalarNode) else 0) for n in nodes.values())
        if size[id(root)] - written <= MAX_ALIAS_EXPANSION:
            return None
        added = {key: size[key] * (count - 1) for key, count in uses.items() if count > 1}
        worst = max(added, key=lambda key: (added[key], -nodes[key].start_mark.line))
        return nodes[worst], (f"the aliases of the anchor on this line expand to about {added[worst]:,} "
                              f"values and characters (aliases may add at most {MAX_ALIAS_EXPANSION:,})")


class _ManifestLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing nesting deeper than MAX_NESTING: the composer recurses once
    per level, and 20,000 `[` would end in a RecursionError instead of a located error."""

    def compose_node(self, parent, index):
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_NESTING:
                raise yaml.composer.ComposerError(
                    None, None, f"lists or mappings nested more than {MAX_NESTING} levels deep "
                    "(a manifest needs about 6)", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _compose(path: Path) -> yaml.Node | None:
    with open(path, encoding="utf-8") as stream:
        return yaml.compose(stream, Loader=_ManifestLoader)


def _children(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def path_length_problem(path: Path) -> str | None:
    """Why the file system cannot hold `path` (a name over 255 bytes, a path over 4095), or None."""
    for part in path.parts:
        if len(os.fsencode(part)) > NAME_MAX_BYTES:
            return (f"has a name of {len(os.fsencode(part))} bytes (`{part[:40]}…`); "
                    f"file systems allow {NAME_MAX_BYTES}")
    if len(os.fsencode(str(path))) > PATH_MAX_BYTES:
        return f"is {len(os.fsencode(str(path)))} bytes long; paths may have {PATH_MAX_BYTES}"
    return None


# What PyYAML's context names when something opened on an earlier line runs on (an unclosed `[`, `{`
# or quote): that line is where to look, not where PyYAML gave up. Its other contexts (a block
# mapping, …) name the enclosing block, often line 1, so there the problem's own line is the one.
_OPENERS = {"flow sequence": "close the `[` with `]`", "flow mapping": "close the `{` with `}`",
            "quoted scalar": "close the quote", "simple key": "end the key with `:`"}


def _yaml_problem(file: Path, exc: yaml.YAMLError, what: str) -> Problem:
    """A YAML syntax error at the line where the problem starts."""
    problem_mark, context_mark = getattr(exc, "problem_mark", None), getattr(exc, "context_mark", None)
    line = problem_mark.line + 1 if problem_mark else 0
    context, problem = getattr(exc, "context", None) or "", getattr(exc, "problem", None) or str(exc)
    opener = next((name for name in _OPENERS if context.endswith(f" {name}")), None)
    if opener and context_mark is not None and problem_mark is not None and context_mark.line < problem_mark.line:
        return Problem(file, context_mark.line + 1, f"{what} is not valid YAML: the {opener} that starts on "
                       f"this line runs on to line {line} ({problem})", _OPENERS[opener])
    return Problem(file, line, f"{what} is not valid YAML: {problem}", "fix the YAML syntax at that line")


def safe_component_problem(name: str) -> str | None:
    """Why `name` cannot be one folder/file name under the output folder, or None when it can."""
    if not name or name.strip() != name:
        return "is empty or has leading/trailing spaces"
    if len(os.fsencode(name)) > MAX_COMPONENT_BYTES:
        return (f"is {len(os.fsencode(name))} bytes long (at most {MAX_COMPONENT_BYTES}: a file name may "
                f"have {NAME_MAX_BYTES}, and the product adds up to {NAME_MAX_BYTES - MAX_COMPONENT_BYTES})")
    if name in (".", "..") or ".." in name.split(os.sep):
        return "would escape the output folder (`..`)"
    if "/" in name or "\\" in name or os.path.isabs(name):
        return "contains a path separator or is an absolute path"
    if "\x00" in name or any(ord(ch) < 32 for ch in name):
        return "contains control characters"
    return None


# --------------------------------------------------------------------------------------------------
# Loading


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read and validate a manifest; raise ManifestError listing every problem."""
    path = Path(path).resolve()
    reader = _Reader(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
        example = f", e.g. {path / inside[0]}" if inside else ""
        raise ManifestError([Problem(path, 0, "this is a folder, not a manifest file",
                                     f"give the manifest's YAML file{example}")])
    if not path.is_file():
        raise ManifestError([Problem(path, 0, "manifest file does not exist", "check the path")])
    try:
        root = _compose(path)
    except yaml.YAMLError as exc:
        raise ManifestError([_yaml_problem(path, exc, "the manifest")]) from None
    except UnicodeDecodeError:
        raise ManifestError([Problem(path, 0, "manifest is not UTF-8 text", "save it as UTF-8")]) from None
    if root is None:
        raise ManifestError([Problem(path, 0, "manifest is empty", "see experiments/demo.yaml")])
    if not reader.check_tree(root):
        raise ManifestError(reader.problems)  # its values cannot be read safely: stop here

    base = path.parent
    top = reader.mapping(root, "the manifest", {
        "name": True, "output_dir": False, "model": True, "generation": False, "seeds": True,
        "categories": True, "resources": False, "execution": False, "speed": False})

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
    categories = _read_categories(reader, top.get("categories", (None, None))[1], base,
                                  model.task if model else None)
    _check_output_paths(reader, top.get("categories", (None, None))[1], output_dir, categories, seeds)

    manifest = Manifest(path=path, name=name, output_dir=output_dir, model=model,
                        generation=generation, seeds=seeds, categories=categories,
                        resources=resources, execution=execution)
    _check_backend(reader, manifest, root)
    if reader.problems:
        raise ManifestError(reader.problems)
    return manifest


def _read_output_dir(reader: _Reader, node, base: Path, name: str) -> Path:
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
    return output_dir


def _read_model(reader: _Reader, node) -> ModelConfig | None:
    if node is None:
        return None
    keys = reader.mapping(node, "model", {"backend": True, "task": True, "path": False,
                                          "dtype": False, "options": False})
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
    options = _resolve_path_options(backend, options, reader.file.parent)
    return ModelConfig(backend=backend, task=task, path=model_path, dtype=dtype, options=options)


def _resolve_path_options(backend: str | None, options: dict, base: Path) -> dict:
    """The backend's path options made absolute from the manifest's folder: a value with a path
    separator, or one that exists there (`python3` alone stays a command looked up on PATH)."""
    from .backends import BACKENDS, backend_class
    if backend not in BACKENDS:
        return options
    resolved = dict(options)
    for key in backend_class(backend).path_options:
        value = options.get(key)
        if not isinstance(value, str) or not value:
            continue
        path = Path(os.path.expanduser(value))
        if not path.is_absolute() and (os.sep in value or os.path.exists(base / path)):
            resolved[key] = str((base / path).resolve())
        elif path.is_absolute():
            resolved[key] = str(path)
    return resolved


def _read_generation(reader: _Reader, node) -> GenerationConfig:
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


def _read_speed(reader: _Reader, node) -> SpeedConfig:
    if node is None:
        return SpeedConfig()
    keys = reader.mapping(node, "speed", {"compile": False, "attention": False, "quantize": False})
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
                       quantize=text("quantize", QUANTIZE_MODES))


def _read_cfg_scale(reader: _Reader, node, default: float) -> float | tuple[float, float]:
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


def _read_seeds(reader: _Reader, node) -> tuple[int, ...]:
    if node is None:
        return ()
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        reader.problem(node, "seeds must be a non-empty list of integers", "write e.g. `seeds: [42, 142]`")
        return ()
    seeds: list[int] = []
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
        seeds.append(seed)
    return tuple(seeds)


def _read_resources(reader: _Reader, node) -> Resources:
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


def _read_execution(reader: _Reader, node) -> Execution:
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


# --------------------------------------------------------------------------------------------------
# Categories, references and prompts


def _read_categories(reader: _Reader, node, base: Path, task: str | None) -> tuple[Category, ...]:
    if node is None:
        return ()
    entries = reader.mapping(node, "categories")
    if not entries and isinstance(node, yaml.MappingNode):
        reader.problem(node, "categories is empty", "add at least one category")
    categories = []
    for name, (key_node, value_node) in entries.items():
        why = safe_component_problem(name)
        if why:
            reader.problem(key_node, f"category name {name!r} {why}",
                           "rename the category to a plain folder name")
            continue
        if name.casefold() in RESERVED_NAMES:  # casefold: one folder on a case-insensitive disk
            reader.problem(key_node, f"category name {name!r} is taken: the output folder keeps "
                                     f"{', '.join(RESERVED_NAMES)} for the sweep itself",
                           f"rename the category, e.g. `{name.strip('.')}_videos`")
            continue
        category = _read_category(reader, name, value_node, base, task)
        if category is not None:
            categories.append(category)
    return tuple(categories)


def _read_category(reader: _Reader, name: str, node, base: Path, task: str | None) -> Category | None:
    what = f"category `{name}`"
    keys = reader.mapping(node, what, {"videos": False, "images": False, "prompts": True})
    if not keys:
        return None
    if "videos" in keys and "images" in keys:
        reader.problem(node, f"{what} has both videos and images", "keep one of them")
        return None
    kind = "videos" if "videos" in keys else "images" if "images" in keys else "none"
    expected = {"v2v": "videos", "i2v": "images", "t2v": "none"}.get(task or "")
    if expected and kind != expected:
        fix = {"videos": "add `videos:` (reference videos) or change model.task",
               "images": "add `images:` (first frames) or change model.task",
               "none": "remove the reference files or change model.task to v2v/i2v"}[expected]
        reader.problem(node, f"{what} has {kind if kind != 'none' else 'no references'}, "
                             f"but model.task {task} needs {expected if expected != 'none' else 'none'}", fix)

    inputs: list[Path] = []
    lost: set[str] | None = set()  # stems whose files are reported already; None: any may be
    if kind != "none":
        inputs, lost = _read_inputs(reader, what, keys[kind][1], base, kind)

    prompts_node = keys.get("prompts", (None, None))[1]
    prompts, prompts_file, prompt_lines, prompts_node = _read_prompts(reader, what, prompts_node, base)
    if prompts is None:
        return None

    references: list[Reference] = []
    if kind == "none":
        if isinstance(prompts, dict):
            reader.problem(prompts_node, f"{what} has no videos, so its prompts must be a list, "
                                         "not a mapping from video stem", "write the prompts as a list")
            return None
        references.append(Reference(stem=None, path=None, prompts=tuple(prompts)))
    else:
        stems: dict[str, Path] = {}
        for file in inputs:
            stem = file.stem
            why = safe_component_problem(stem)
            if why:
                reader.problem(keys[kind][1], f"{what}: file name {file.name!r} {why}", "rename the file")
                if lost is not None:
                    lost.add(stem)
                continue
            if stem in stems:
                reader.problem(keys[kind][1], f"{what}: {stems[stem].name} and {file.name} map to one "
                                              f"output folder `{name}/{stem}`",
                               "rename one of the files or put them in separate categories")
                continue
            stems[stem] = file
        if isinstance(prompts, dict):
            for stem in prompts:
                # a glob that matched nothing, or a missing file, is reported once, not again as
                # each stem whose prompts then have no video
                if stem not in stems and lost is not None and stem not in lost:
                    reader.problem(prompt_lines.get(stem, prompts_node),
                                   f"{what}: prompts are given for `{stem}`, but there is no such "
                                   f"{kind[:-1]}", f"add the {kind[:-1]} or remove those prompts",
                                   file=prompts_file)
            for stem, file in stems.items():
                if stem not in prompts:
                    reader.problem(prompts_node, f"{what}: {kind[:-1]} `{file.name}` has no prompts",
                                   f"add `{stem}:` with its prompts", file=prompts_file)
                    continue
                references.append(Reference(stem=stem, path=file, prompts=tuple(prompts[stem])))
        else:
            references.extend(Reference(stem=s, path=f, prompts=tuple(prompts)) for s, f in stems.items())
    return Category(name=name, kind=kind, references=tuple(references))


def _absolute(path: Path) -> Path:
    """`path` made absolute without following links: a linked reference is named by the link (its
    stem names the outputs and keys the prompts) and read through it, from its target."""
    return Path(os.path.abspath(path))


def _check_output_paths(reader: _Reader, node, output_dir: Path, categories, seeds) -> None:
    """Every file a category's jobs will write must fit the file system's path length (checked
    for the longest name: the largest seed and prompt index, a poster's `.thumb.jpg`)."""
    if path_length_problem(output_dir) or not isinstance(node, yaml.MappingNode):
        return  # reported with output_dir / categories already
    key_nodes = {key.value: key for key, _ in node.value if isinstance(key, yaml.ScalarNode)}
    for category in categories:
        longest = max(
            (output_dir / category.name / (ref.stem or "") /
             f"seed_{max(seeds, default=0)}_prompt_{len(ref.prompts) - 1}.thumb.jpg"
             for ref in category.references), key=lambda path: len(os.fsencode(str(path))), default=None)
        too_long = longest is not None and path_length_problem(longest)
        if too_long:
            reader.problem(key_nodes.get(category.name), f"category `{category.name}`: the path of an output "
                           f"({longest}) {too_long}", "use a shorter output_dir, category name or file names")


def _read_inputs(reader: _Reader, what: str, node, base: Path, kind: str) -> tuple[list[Path], set[str] | None]:
    """The readable files, and the stems of those reported missing or unreadable (None where a glob
    matched nothing: then any stem may be one of its files)."""
    suffixes = VIDEO_SUFFIXES if kind == "videos" else IMAGE_SUFFIXES
    value = reader.value(node)
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) for p in patterns):
        reader.problem(node, f"{what}: {kind} must be a glob pattern or a list of paths",
                       f"write e.g. `{kind}: refs/{kind}/*{suffixes[0]}`")
        return [], None
    items = node.value if isinstance(node, yaml.SequenceNode) else [node]
    found: list[tuple[Path, yaml.Node]] = []
    lost: set[str] | None = set()
    for pattern, item in zip(patterns, items):
        full = pattern if os.path.isabs(pattern) else str(base / pattern)
        if glob.has_magic(pattern):
            too_wide = _glob_walk_problem(full)
            if too_wide:
                reader.problem(item, f"{what}: glob `{pattern}` {too_wide}",
                               "start the pattern at the folder that holds the files, e.g. refs/**/*.mp4")
                continue
            matches = sorted(Path(m) for m in glob.glob(full, recursive=True) if os.path.isfile(m))
            if not matches:
                reader.problem(item, f"{what}: glob `{pattern}` matches no file (looked in {base})",
                               "check the pattern and that the files are there")
                lost = None
            found.extend((_absolute(m), item) for m in matches)
            continue
        file = Path(full)
        if not os.path.isfile(file):  # (False, not an error, for a name too long to exist)
            reader.problem(item, f"{what}: {kind[:-1]} `{pattern}` does not exist ({file})",
                           "fix the path; relative paths start at the manifest's folder")
            if lost is not None:
                lost.add(file.stem)
            continue
        found.append((_absolute(file), item))
    files = []
    for file, item in found:
        if file.suffix.lower() not in suffixes:
            reader.problem(item, f"{what}: `{file.name}` is not a {kind[:-1]} file ({', '.join(suffixes)})",
                           f"list only {kind} here")
        elif not _readable_media(file):
            reader.problem(item, f"{what}: `{file}` cannot be read as a {kind[:-1]} (empty, corrupt or "
                                 "no permission)", "replace it with a working file or remove it")
        else:
            files.append(file)
            continue
        if lost is not None:
            lost.add(file.stem)
    return files, lost


def _glob_walk_problem(pattern: str) -> str | None:
    """Why globbing `pattern` would walk too much of the file system (`**` from `/` or the home
    folder, or more than MAX_GLOB_ENTRIES files and folders), or None. It counts what glob would
    look at, level by level from the pattern's fixed folder, and stops at the bound."""
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    start = Path(*parts[:fixed]) if fixed else Path(".")
    recursive = any("**" in part for part in parts[fixed:])
    depth = len(parts) - fixed
    where = start.resolve()
    if recursive and where in (Path(where.anchor), Path.home().resolve()):
        return f"would search all of {where} (`**` walks every folder below it)"
    seen = 0
    folders = [(start, 1)]
    while folders:
        folder, level = folders.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue  # glob's `*` and `**` skip hidden names
            seen += 1
            if seen > MAX_GLOB_ENTRIES:
                return (f"would look at more than {MAX_GLOB_ENTRIES:,} files and folders under {where}")
            try:  # glob follows links to folders too (a link to its own parent loops until ELOOP)
                below = (recursive or level < depth) and entry.is_dir()
            except OSError:
                below = False
            if below:
                folders.append((Path(entry.path), level + 1))
    return None


def _readable_media(file: Path) -> bool:
    """Open the file and find a picture stream in it (cheap: headers only)."""
    import av
    try:
        with open(file, "rb") as stream:
            if not stream.read(1):
                return False
        with av.open(str(file)) as container:
            return bool(container.streams.video)
    except (OSError, av.error.FFmpegError, ValueError):
        return False


def _read_prompts(reader: _Reader, what: str, node, base: Path):
    """Return (list | {stem: list} | None, the file they came from, {stem: key node}, their node)."""
    file = reader.file
    value = reader.value(node)
    if isinstance(value, str) and not value.strip().startswith(("[", "{")) and "\n" not in value \
            and Path(value).suffix.lower() in (".yaml", ".yml", ".txt", ".json"):
        prompt_path = Path(value) if os.path.isabs(value) else base / value
        if not os.path.isfile(prompt_path):
            reader.problem(node, f"{what}: prompts file `{value}` does not exist ({prompt_path})",
                           "fix the path; relative paths start at the manifest's folder")
            return None, file, {}, node
        file = prompt_path.resolve()
        if prompt_path.suffix.lower() == ".txt":
            try:
                text = prompt_path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError) as exc:
                reader.problem(node, f"{what}: prompts file `{value}` cannot be read as text ({exc})",
                               "save it as UTF-8 text, one prompt per line")
                return None, file, {}, node
            if "\x00" in text:
                reader.problem(node, f"{what}: prompts file `{value}` contains NUL characters (a binary "
                                     "file?)", "save it as UTF-8 text, one prompt per line")
                return None, file, {}, node
            lines = [line.strip() for line in text.splitlines()]
            # blank lines and `#` lines (comments, as in the YAML files) are not prompts
            value, node = [line for line in lines if line and not line.startswith("#")], None
        else:
            try:
                node = _compose(prompt_path)
            except (UnicodeDecodeError, OSError) as exc:
                reader.problem(node, f"{what}: prompts file `{value}` cannot be read as text ({exc})",
                               "save it as UTF-8 text")
                return None, file, {}, node
            except yaml.YAMLError as exc:
                reader.problems.append(_yaml_problem(file, exc, "the prompts file"))
                return None, file, {}, None
            if node is not None and not reader.check_tree(node, file=file):
                return None, file, {}, None
            value = reader.value(node)
    lines: dict[str, Any] = {}
    if isinstance(node, yaml.MappingNode):
        lines = {k.value: k for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
    if isinstance(value, list) and value and all(isinstance(p, str) and p.strip() for p in value):
        return value, file, lines, node
    if isinstance(value, dict) and value:
        wrong = {str(k): _prompt_list_problem(v) for k, v in value.items()}
        if not any(wrong.values()):
            return {str(k): v for k, v in value.items()}, file, lines, node
        for stem, why in wrong.items():
            if why:  # at the stem's own line: an entry with nothing under it is a stem line
                reader.problem(lines.get(stem, node), f"{what}: the prompts of `{stem}` {why}",
                               f"list its prompts under `{stem}:`, one `- text` line each", file=file)
        return None, file, {}, node
    reader.problem(node, f"{what}: prompts must be a non-empty list of texts, a mapping from video "
                         "stem to such a list, or the path of a .yaml/.txt file holding one",
                   "see experiments/motion_transfer.yaml", file=file)
    return None, file, {}, node


def _prompt_list_problem(value) -> str | None:
    """Why one stem's prompts are not a non-empty list of texts, or None."""
    if value is None:
        return "are empty (nothing under it)"
    if not isinstance(value, list):
        return f"must be a list of texts, not {type(value).__name__} {value!r}"
    if not value:
        return "are an empty list"
    blank = [i + 1 for i, p in enumerate(value) if not (isinstance(p, str) and p.strip())]
    if blank:
        return f"have an empty or non-text prompt (number {', '.join(map(str, blank))})"
    return None


def _check_backend(reader: _Reader, manifest: Manifest, root) -> None:
    """Let the chosen backend check the manifest (unknown backend → a problem here)."""
    if manifest.model is None:
        return
    from .backends import BACKENDS, BackendProblem, backend_class
    model_node = _node_at(root, "model")
    if manifest.model.backend not in BACKENDS:
        reader.problem(_node_at(root, "model.backend") or model_node,
                       f"unknown model.backend `{manifest.model.backend}`",
                       f"use one of: {', '.join(sorted(BACKENDS))}")
        return
    for found in backend_class(manifest.model.backend).check(manifest):
        if isinstance(found, BackendProblem):
            reader.problem(_node_at(root, found.key) or model_node, found.message, found.fix)
        else:
            reader.problem(model_node, found)


def _node_at(root, dotted: str):
    """The YAML node of a dotted key (`generation.num_frames`), else of its nearest parent present."""
    node, found = root, None
    for part in dotted.split("."):
        if not isinstance(node, yaml.MappingNode):
            break
        match = next(((key, value) for key, value in node.value
                      if isinstance(key, yaml.ScalarNode) and key.value == part), None)
        if match is None:
            break
        found, node = match  # the key's line: a block mapping's value starts on the next one
    return found


def located_problem(manifest: Manifest, dotted: str, message: str, fix: str = "",
                    fallback: str | None = None) -> ManifestError:
    """A problem found after loading (the output folder's contents, …), at the line of `dotted` in
    the manifest file, else of `fallback` (e.g. `name`, which a default output_dir comes from)."""
    try:
        root = _compose(manifest.path)
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        root = None
    node = _node_at(root, dotted) if root is not None else None
    if node is None and fallback and root is not None:
        node = _node_at(root, fallback)
    line = node.start_mark.line + 1 if node is not None else 0
    return ManifestError([Problem(manifest.path, line, message, fix)])
