"""What a manifest holds: frozen dataclasses, the values some of their keys take, and the
problems found reading one (`Problem`, `ManifestError`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import WanSweepError
from ..executor_names import EXECUTOR_NAMES as EXECUTORS  # noqa: F401  (the one list of executors)

# Text, image and video to video, and Wan's conditioned tasks (issue 23; README's task table): speech to
# video (an image and its audio), VACE and Fun control videos (a control video, an optional reference image, or
# for camera control an image and a camera direction), Animate (an image driven by a pose and a face video).
TASKS = ("t2v", "i2v", "v2v", "s2v", "vace", "control", "animate")
CONDITIONED_TASKS = ("s2v", "vace", "control", "animate")
# A category's `camera:` (task control) -> DiffSynth-Studio's `camera_control_direction` of that motion.
CAMERA_DIRECTIONS = {"left": "Left", "right": "Right", "up": "Up", "down": "Down", "left_up": "LeftUp",
                     "left_down": "LeftDown", "right_up": "RightUp", "right_down": "RightDown",
                     "zoom_in": "In", "zoom_out": "Out"}
# The `speed:` section (orchestrator/speed.py applies it): the values each key takes.
COMPILE_MODES = ("none", "blocks", "full")
SDPA_ATTENTION = ("auto", "cudnn", "flash", "efficient", "math")  # torch SDPA's kernels; other names: diffusers'
QUANTIZE_MODES = ("none", "fp8", "int8", "fp8_storage")
# `speed.cache`: a step cache, one key naming the method and its options under it (`{first_block: 0.05}`,
# the main option alone, or `{taylorseer: {interval: 4, warmup: 3}}`). Per method: its main option, and
# each option's (default, lowest, highest, type). Which backend runs which: orchestrator/speed.py.
CACHE_METHODS: dict[str, tuple[str, dict[str, tuple]]] = {
    # diffusers' FirstBlockCacheConfig: skip the other blocks while the first block's residual changes by
    # less than `threshold` (relative mean absolute difference); 0 skips nothing
    "first_block": ("threshold", {"threshold": (0.05, 0.0, 1.0, float)}),
    # diffusers' TaylorSeerCacheConfig (lite mode: the output projection predicted by a Taylor series, the
    # blocks skipped): a full step every `interval` steps after `warmup` full ones, of `order`
    "taylorseer": ("interval", {"interval": (5, 1, 100, int), "warmup": (3, 0, 1000, int), "order": (1, 1, 4, int)}),
    # diffusers' MagCacheConfig: skip while the accumulated magnitude-ratio error stays under `threshold`,
    # at most `max_skip` steps in a row, never in the first `retention` fraction; its ratios calibrated
    # once per model and step count on the user's model
    "magcache": ("threshold", {"threshold": (0.06, 0.0, 1.0, float), "max_skip": (3, 1, 100, int),
                               "retention": (0.2, 0.0, 1.0, float)}),
    # diffusers' FasterCacheConfig: the self-attention recomputed every `skip` steps in its timestep range,
    # approximated in between
    "faster_cache": ("skip", {"skip": (2, 2, 100, int)}),
    # diffusers' PyramidAttentionBroadcastConfig: the self-attention output broadcast over `skip` steps
    "pab": ("skip", {"skip": (2, 2, 100, int)}),
    # DiffSynth's TeaCache (`tea_cache_l1_thresh`): skip while the rescaled input change stays under `threshold`
    "teacache": ("threshold", {"threshold": (0.05, 0.0, 1.0, float)}),
}
# The settings an `axes:` entry may sweep: GenerationConfig's fields (not `extra`, the backend's own
# keyword arguments) and speed's quantize (a worker loads its model again when a job's quantize differs).
GENERATION_AXES = ("width", "height", "num_frames", "fps", "steps", "cfg_scale", "shift", "denoising_strength",
                   "negative_prompt")
SPEED_AXES = ("quantize", "cache", "attention")  # `speed:` keys an axis may sweep
AXIS_KEYS = GENERATION_AXES + SPEED_AXES
# A product of axes grows fast: past this many jobs a manifest must say it means it (`axes.confirm_jobs`).
MAX_JOBS_UNCONFIRMED = 1_000_000
# And no sweep may pass this many, confirmed or not: its jobs are expanded in memory (about half a kB
# and 20 µs each) and are rows of its ledger.
MAX_JOBS = 10_000_000


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
    # none, or a step cache in its canonical text `METHOD:OPTION=VALUE,…` with every option of the method
    # (`cache_text`), e.g. `first_block:threshold=0.05`: one spelling per setting, so ids compare equal
    cache: str = "none"

    @property
    def is_default(self) -> bool:
        return self == SpeedConfig()

    @property
    def cache_method(self) -> tuple[str, dict]:
        """(method, its options), ("none", {}) without a cache."""
        return parse_cache(self.cache)


def cache_text(method: str, options: dict) -> str:
    """The canonical text of a step cache: every option of the method, in the table's order, the defaults
    filled in (`{first_block: 0.05}` and `{first_block: {threshold: 0.05}}` are one setting)."""
    if method == "none":
        return "none"
    _, table = CACHE_METHODS[method]
    values = {key: options.get(key, default) for key, (default, *_ignored) in table.items()}
    return f"{method}:" + ",".join(f"{key}={table[key][3](value)!r}" for key, value in values.items())


def parse_cache(text: str) -> tuple[str, dict]:
    """`cache_text`'s (method, options) back."""
    if not text or text == "none":
        return "none", {}
    method, _, rest = text.partition(":")
    _, table = CACHE_METHODS[method]
    options = {}
    for pair in filter(None, rest.split(",")):
        key, _, value = pair.partition("=")
        options[key] = table[key][3](float(value)) if table[key][3] is int else float(value)
    return method, {**{key: spec[0] for key, spec in table.items()}, **options}


LORA_EXPERTS = ("both", "high", "low")  # Wan2.2 A14B's experts a LoRA goes into (`model.loras.NAME.expert`)
# The LoRA settings an `axes:` entry may sweep, per LoRA of `model.loras`: `loras.NAME.strength`, `loras.NAME.path`;
# and `loras`, which of them are on (a list of name lists).
LORA_AXIS_FIELDS = ("strength", "path")


@dataclass(frozen=True)
class LoraConfig:
    """One LoRA a job runs with (`model.loras.NAME`): its file, how strongly it is applied, into which of
    Wan2.2's two experts. `strength` is one scale, or a pair (high-noise expert, low-noise expert) in the
    order they run, as `cfg_scale`. `digest` is the file's content identity (sha256 of its bytes, filled
    in as jobs are expanded), so a retrained file under the same name is a changed setting."""
    name: str
    path: str  # absolute
    strength: float | tuple[float, float] = 1.0
    expert: str = "both"  # both | high | low; Wan2.1 and TI2V-5B have one denoiser: both
    digest: str = ""

    @property
    def strengths(self) -> tuple[float, float]:
        """(high-noise expert's scale, low-noise expert's): 0 for the expert it is not meant for. On a
        model of one denoiser only the first counts."""
        if isinstance(self.strength, (list, tuple)):
            high, low = float(self.strength[0]), float(self.strength[1])
        else:
            high = low = float(self.strength)
        return (high if self.expert != "low" else 0.0, low if self.expert != "high" else 0.0)

    def to_dict(self) -> dict:
        data = dict(vars(self))
        if isinstance(self.strength, tuple):
            data["strength"] = list(self.strength)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "LoraConfig":
        strength = data.get("strength", 1.0)
        return cls(**dict(data, strength=tuple(strength) if isinstance(strength, list) else strength))


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
    # The LoRAs that are on (`model.loras`, with a job's axis values: `loras`, `loras.NAME.strength|path`),
    # in the manifest's order. A worker switches between jobs' sets without reloading the base weights
    # where its backend can (`Backend.use_loras`; `loras.switch_kind` says which change needs a reload).
    loras: tuple[LoraConfig, ...] = ()
    # The LoRAs never change in this sweep (no axis sets them: `jobs.expand`): a worker fuses them into the
    # weights at load instead of running them as adapters, which cost 7.6% a step at 14B (docs/benchmarks.md).
    # Not part of any identity: fused and unfused differ by rounding only, as compile does.
    fuse_loras: bool = False

    def to_dict(self) -> dict:
        """Its JSON form (a worker spec's `model`, a job's, a sidecar's); `from_dict` reads it back. (Its
        fields copied one level, not `asdict`'s deep copy: a ledger of millions of jobs writes one per job.)"""
        data = {**vars(self), "options": dict(self.options), "speed": dict(vars(self.speed))}
        if self.speed.cache == "none":
            del data["speed"]["cache"]  # (a model without a step cache writes what it always wrote)
        if self.loras:
            data["loras"] = [lora.to_dict() for lora in self.loras]
        else:
            del data["loras"]  # (a model without LoRAs writes what it always wrote)
        if not self.fuse_loras:
            del data["fuse_loras"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """The settings `to_dict` wrote, typed again (the speed section too): the one way back from JSON."""
        return cls(**{**data, "speed": SpeedConfig(**(data.get("speed") or {})),
                      "loras": tuple(LoraConfig.from_dict(lora) for lora in data.get("loras") or ())})


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

    def to_dict(self) -> dict:
        """Its JSON form (a worker spec's `generation`, a job's, a sidecar's); `from_dict` reads it back
        (copied one level, as `ModelConfig.to_dict`)."""
        return {**vars(self), "extra": dict(self.extra)}

    @classmethod
    def from_dict(cls, data: dict) -> "GenerationConfig":
        """The settings `to_dict` wrote, typed again (a cfg pair, a list in JSON, a tuple again)."""
        cfg_scale = data.get("cfg_scale")
        return cls(**(dict(data, cfg_scale=tuple(cfg_scale)) if isinstance(cfg_scale, list) else data))


def apply_axes(generation: GenerationConfig, values: dict) -> GenerationConfig:
    """`generation` with one job's axis values (Job.axes) in place of the manifest's own."""
    chosen = {key: value for key, value in values.items() if key in GENERATION_AXES}
    if isinstance(chosen.get("cfg_scale"), list):  # a pair read back from a JSON spec or job
        chosen["cfg_scale"] = tuple(chosen["cfg_scale"])
    return replace(generation, **chosen) if chosen else generation


def model_with_axes(model: ModelConfig, values: dict) -> ModelConfig:
    """`model` with one job's quantize, cache and attention (Job.axes, or an axis value being checked) in its speed,
    and its
    LoRA values: which of the manifest's LoRAs are on (`loras`: names, in the manifest's order) and each
    one's `loras.NAME.strength` and `loras.NAME.path`."""
    changes = {key: values[key] for key in SPEED_AXES if values.get(key) is not None
               and values[key] != getattr(model.speed, key)}
    if changes:
        model = replace(model, speed=replace(model.speed, **changes))
    if not model.loras or not any(key == "loras" or key.startswith("loras.") for key in values):
        return model
    on = values.get("loras")
    loras = []
    for lora in model.loras:
        if on is not None and lora.name not in on:
            continue
        changes = {field_: values[f"loras.{lora.name}.{field_}"] for field_ in LORA_AXIS_FIELDS
                   if f"loras.{lora.name}.{field_}" in values}
        if isinstance(changes.get("strength"), list):  # a pair read back from JSON
            changes["strength"] = tuple(changes["strength"])
        if "path" in changes and changes["path"] != lora.path:
            changes["digest"] = ""  # another file: its identity is worked out again (jobs.expand)
        loras.append(replace(lora, **changes) if changes else lora)
    return replace(model, loras=tuple(loras))


def is_lora_axis(key: str) -> bool:
    """Whether an axis key is a LoRA's (`loras`, `loras.NAME.strength`, `loras.NAME.path`)."""
    return key == "loras" or key.startswith("loras.")


@dataclass(frozen=True)
class Axis:
    """One dimension of the product of jobs (`axes:`): a setting and its values, or a `zip` group of
    settings whose i-th values go together (width and height)."""
    keys: tuple[str, ...]
    points: tuple[tuple, ...]  # one per job of this dimension: a value per key, in `keys`' order

    def assignments(self) -> list[dict]:
        return [dict(zip(self.keys, point)) for point in self.points]


@dataclass(frozen=True)
class Reference:
    """One input of a category: a reference video, an image, or nothing (text-to-video); for a
    conditioned task also its other inputs by role (`audio`, `reference_image`, `pose_video`, `face_video`:
    absolute paths; `camera`: a direction), as `Job.inputs` gets them."""
    stem: str | None
    path: Path | None
    prompts: tuple[str, ...]
    inputs: dict[str, str] = field(default_factory=dict, hash=False)


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

    def to_dict(self) -> dict:
        """Its JSON form (a worker spec's `execution`); `from_dict` reads it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Execution":
        return cls(**data)


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
    # Model options that change no output (its backend's `runtime_options`), left out of the job ids;
    # the backend names them when it checks the manifest (validation.load_manifest).
    runtime_options: frozenset[str] = frozenset()
    axes: tuple[Axis, ...] = ()  # the `axes:` section, in the manifest's order; () without one
    # `output.name`: the template of each mp4's path under output_dir, without `.mp4` (orchestrator/
    # output_names.py); None keeps the fixed layout <category>/<stem>/seed_<seed>_prompt_<i>.
    output_name: str | None = None
    # What the reader says without refusing (a glob that left the sweep's own videos out), each at its
    # file and line; logged as the manifest is read (`orchestrator.manifest` logger, a warning).
    notes: tuple[Problem, ...] = field(default=(), compare=False)

    @property
    def max_attempts(self) -> int:
        return 1 + self.execution.retries

    @property
    def heaviest_generation(self) -> GenerationConfig:
        """The generation settings of the most expensive job (each axis at its value of most pixels ×
        frames × denoiser calls): what worker sizing, calibration and `models fit` plan for, so that
        every job of a sweep with axes fits where its workers are placed."""
        generation = self.generation
        for axis in self.axes:
            generation = max((apply_axes(generation, values) for values in axis.assignments()), key=_job_cost)
        return generation

    @property
    def heaviest_model(self) -> ModelConfig:
        """The model settings worker sizing and calibration plan for: the manifest's own, or with a
        quantize axis the value that needs the most memory. 8-bit weights (int8, fp8, fp8_storage) take
        less memory than none, so a sweep with `none` among its values is sized for none, and one of 8-bit
        values only (about the same memory each) for its first value: every job fits where it runs."""
        values = [point["quantize"] for axis in self.axes if "quantize" in axis.keys for point in axis.assignments()]
        if not values:
            return self.model
        return model_with_axes(self.model, {"quantize": "none" if "none" in values else values[0]})


def _job_cost(g: GenerationConfig) -> float:
    return g.width * g.height * g.num_frames * g.steps * (2 if g.uses_guidance else 1)
