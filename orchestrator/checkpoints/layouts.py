"""Checkpoint layouts and what `models status` says of them: diffusers, the original Wan /
DiffSynth release, single files; every file an index names present and complete; the conditioned
releases' parts (VACE, Animate, S2V, Fun control) and the tasks a checkpoint runs."""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .files import CheckpointError, WEIGHT_SUFFIXES, WeightFile, _Broken, read_weight_file
from .releases import download_fix, repair_fix


# --------------------------------------------------------------------------------------------------
# Layouts and components


@dataclass
class Component:
    name: str
    kind: str  # "weights", "tokenizer", "scheduler", "processor", "other"
    where: str  # path relative to the checkpoint root
    cls: str = ""  # the class model_index.json names (diffusers), or what it is
    files: list[WeightFile] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    @property
    def params(self) -> int:
        return sum(f.params for f in self.files)

    @property
    def disk_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def dtypes(self) -> Counter:
        counts: Counter = Counter()
        for f in self.files:
            for dtype, shape in f.tensors.values():
                counts[dtype] += math.prod(shape)
        return counts

    def tensors(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        merged: dict = {}
        for f in self.files:
            merged.update(f.tensors)
        return merged


@dataclass(frozen=True)
class Problem:
    where: str  # path relative to the checkpoint root
    what: str
    layout: bool = False  # something the layout expects is absent (not a broken or missing named file)

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


@dataclass
class Checkpoint:
    root: Path
    layout: str  # diffusers | wan | single-file | weights
    description: str
    components: list[Component] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # The conditioned-task parts found (issue 23): part name -> parameters, e.g. {"VACE blocks": 3.1e9}
    parts: dict[str, int] = field(default_factory=dict)
    tasks: tuple[str, ...] = ()  # the model.task values its DiT runs, where the files tell

    def component(self, name: str) -> Component | None:
        return next((c for c in self.components if c.name == name), None)

    def error(self) -> CheckpointError:
        count = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        return CheckpointError(f"checkpoint {self.root} is incomplete or broken ({count}):\n"
                               + "\n".join(f"  {p}" for p in self.problems)
                               + f"\nfix: {repair_fix(self.root, self.layout)}")


class _Reader:
    """Collects the problems of one checkpoint while its files are read."""

    def __init__(self, root: Path):
        self.root = root
        self.problems: list[Problem] = []
        self.notes: list[str] = []

    def problem(self, where: str, what: str, layout: bool = False) -> None:
        self.problems.append(Problem(where, what, layout))

    def has_problem_under(self, prefix: str) -> bool:
        return any(p.where.startswith(prefix) for p in self.problems)

    def rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix() or path.name
        except ValueError:
            return str(path)

    def file(self, path: Path, named_by: Path | None = None) -> WeightFile | None:
        if not path.is_file():
            by = f" (named by {self.rel(named_by)})" if named_by else ""
            self.problem(self.rel(path), f"missing{by}")
            return None
        try:
            weights = read_weight_file(path)
        except _Broken as exc:
            self.problem(self.rel(path), str(exc))
            return None
        except OSError as exc:
            self.problem(self.rel(path), f"cannot be read ({exc.strerror or exc})")
            return None
        if weights.note:
            self.notes.append(f"{self.rel(path)}: {weights.note}")
        return weights

    def json(self, path: Path) -> dict | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            self.problem(self.rel(path), "missing")
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            self.problem(self.rel(path), f"unreadable JSON ({exc}): the file is truncated or corrupt")
            return None
        if not isinstance(data, dict):
            self.problem(self.rel(path), "not a JSON object")
            return None
        return data

    def weight_set(self, folder: Path, stems: tuple[str, ...] | None = None) -> list[WeightFile]:
        """The weight files of one folder: every file its safetensors indexes name (and each tensor an
        index maps to a file must be in that file), else every weight file there."""
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        if stems is not None:
            indexes = [i for i in indexes if i.name.split(".safetensors.index.json")[0].startswith(stems)]
        files: list[WeightFile] = []
        if indexes:
            for index_path in indexes:
                index = self.json(index_path)
                if index is None:
                    continue
                weight_map = index.get("weight_map")
                if not isinstance(weight_map, dict) or not weight_map:
                    self.problem(self.rel(index_path), "has no weight_map")
                    continue
                wanted: dict[str, list[str]] = {}
                for tensor, name in weight_map.items():
                    wanted.setdefault(str(name), []).append(tensor)
                for name, tensor_names in sorted(wanted.items()):
                    path = folder / name
                    if Path(name).is_absolute() or ".." in Path(name).parts:
                        self.problem(self.rel(index_path), f"names a file outside its folder: {name}")
                        continue
                    weights = self.file(path, named_by=index_path)
                    if weights is None:
                        continue
                    absent = [t for t in tensor_names if t not in weights.tensors]
                    if absent:
                        self.problem(self.rel(path), f"lacks {len(absent)} tensor(s) that {self.rel(index_path)} "
                                     f"maps to it (e.g. {absent[0]}): a file of another version or a broken download")
                    files.append(weights)
            return files
        candidates = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
        if stems is not None:
            candidates = [p for p in candidates if p.name.startswith(stems)]
        for path in candidates:
            weights = self.file(path)
            if weights is not None:
                files.append(weights)
        return files


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.json", "tokenizer.model")


def _folder_kind(folder: Path) -> str:
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    if "config.json" in names or any(n.endswith(WEIGHT_SUFFIXES) or n.endswith(".index.json") for n in names):
        return "weights"
    if "scheduler_config.json" in names:
        return "scheduler"
    if names & set(TOKENIZER_FILES):
        return "tokenizer"
    if "preprocessor_config.json" in names:
        return "processor"
    return "other"


def detect_layout(path: str | os.PathLike) -> str | None:
    """`diffusers`, `wan`, `single-file`, `weights`, or None for a folder of none of these."""
    root = Path(path)
    if root.is_file():
        return "single-file" if root.suffix in WEIGHT_SUFFIXES else None
    if not root.is_dir():
        return None
    if (root / "model_index.json").exists():
        return "diffusers"
    names = {p.name for p in root.iterdir()}
    if ({"high_noise_model", "low_noise_model"} & names
            or any(n.startswith("diffusion_pytorch_model") for n in names)
            or any(n.startswith("models_t5") or re.match(r"Wan2\.\d_VAE\.pth$", n) for n in names)):
        return "wan"
    if any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names):
        return "weights"
    return None


def inspect(path: str | os.PathLike, task: str | None = None, layout: str | None = None) -> Checkpoint:
    """Read a checkpoint's indexes and weight headers; problems are collected, not raised. With `task`
    (a manifest's model.task), a part that task needs and the checkpoint lacks is a problem too. `layout`:
    the one the manifest's backend loads (`diffusers`, `wan`), offered first when the folder is missing."""
    root = Path(path).expanduser()
    if not root.exists():
        raise CheckpointError(f"checkpoint {root} does not exist (fix: {download_fix(root, layout, task)})")
    layout = detect_layout(root)
    if layout is None:
        raise CheckpointError(
            f"{root} is not a checkpoint layout this recognises: a diffusers folder has model_index.json; an "
            "original Wan / DiffSynth folder has diffusion_pytorch_model*.safetensors (or high_noise_model/ and "
            "low_noise_model/), models_t5_umt5-xxl-enc-bf16.pth and Wan2.1_VAE.pth; or give one .safetensors "
            "or .pth file")
    reader = _Reader(root if root.is_dir() else root.parent)
    checkpoint = {"diffusers": _inspect_diffusers, "wan": _inspect_wan, "single-file": _inspect_single,
                  "weights": _inspect_weights}[layout](root, reader)
    if task and checkpoint.tasks and task not in checkpoint.tasks:
        needs = TASK_NEEDS.get(task, f"a {task} model")
        reader.problem(checkpoint.components[0].where if checkpoint.components else ".",
                       f"task {task} needs {needs}; this checkpoint runs {', '.join(checkpoint.tasks)}", layout=True)
    checkpoint.problems = reader.problems
    checkpoint.notes += reader.notes
    return checkpoint


def verify(path: str | os.PathLike) -> Checkpoint:
    """`inspect`, raising CheckpointError (every problem, each naming its file, and the fix) when any."""
    checkpoint = inspect(path)
    if checkpoint.problems:
        raise checkpoint.error()
    return checkpoint


def is_component_spec(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2


def _inspect_diffusers(root: Path, reader: _Reader) -> Checkpoint:
    index = reader.json(root / "model_index.json") or {}
    checkpoint = Checkpoint(root, "diffusers", f"diffusers, {index.get('_class_name', 'pipeline')}")
    for name, spec in index.items():
        if name.startswith("_") or not is_component_spec(spec) or spec[0] is None:
            continue
        folder = root / name
        cls = f"{spec[0]}.{spec[1]}"
        if not folder.is_dir():
            reader.problem(f"{name}/", f"missing: model_index.json names component `{name}` ({cls}), but there "
                           "is no such folder", layout=True)
            checkpoint.components.append(Component(name, "missing", f"{name}/", cls))
            continue
        kind = _folder_kind(folder)
        component = Component(name, kind, f"{name}/", cls)
        if kind == "weights":
            if (folder / "config.json").exists():
                component.config = reader.json(folder / "config.json") or {}
            component.files = reader.weight_set(folder)
            if not component.files and not reader.has_problem_under(f"{name}/"):
                reader.problem(f"{name}/", "no weight files (.safetensors) in the folder of a model component",
                               layout=True)
        elif kind == "other":
            reader.problem(f"{name}/", f"empty or unrecognised: component `{name}` ({cls}) has no config, "
                           "weights or tokenizer files", layout=True)
        checkpoint.components.append(component)
    return checkpoint


def _inspect_wan(root: Path, reader: _Reader) -> Checkpoint:
    names = {p.name for p in root.iterdir()}
    experts = [n for n in ("high_noise_model", "low_noise_model") if n in names]
    description = "original Wan / DiffSynth" + (", Wan 2.2 two experts" if experts else "")
    checkpoint = Checkpoint(root, "wan", description)
    if experts:
        for name in ("high_noise_model", "low_noise_model"):
            folder = root / name
            if not folder.is_dir():
                reader.problem(f"{name}/", "missing: a Wan 2.2 A14B checkpoint has both experts "
                               "(high_noise_model/ and low_noise_model/)", layout=True)
                checkpoint.components.append(Component(name, "missing", f"{name}/", "Wan DiT (expert)"))
                continue
            component = Component(name, "weights", f"{name}/", "Wan DiT (expert)")
            if (folder / "config.json").exists():
                component.config = reader.json(folder / "config.json") or {}
            component.files = reader.weight_set(folder, stems=("diffusion_pytorch_model",))
            if not component.files and not reader.has_problem_under(f"{name}/"):
                reader.problem(f"{name}/", "no diffusion_pytorch_model*.safetensors in it", layout=True)
            checkpoint.components.append(component)
    else:
        component = Component("transformer", "weights", "diffusion_pytorch_model*.safetensors", "Wan DiT")
        if (root / "config.json").exists():
            component.config = reader.json(root / "config.json") or {}
        component.files = reader.weight_set(root, stems=("diffusion_pytorch_model",))
        if not component.files and not reader.has_problem_under("diffusion_pytorch_model"):
            reader.problem("diffusion_pytorch_model.safetensors", "missing: no DiT weights "
                           "(diffusion_pytorch_model*.safetensors, or high_noise_model/ and low_noise_model/)",
                           layout=True)
        checkpoint.components.append(component)
    for name, stem, cls, example in (
            ("text_encoder", "models_t5*", "umT5-XXL encoder", "models_t5_umt5-xxl-enc-bf16.pth"),
            ("vae", "Wan2.*_VAE", "Wan VAE", "Wan2.1_VAE.pth")):
        # a .safetensors of the same stem may stand beside or instead of the .pth (DiffSynth prefers it)
        found = sorted(root.glob(f"{stem}.safetensors")) + sorted(root.glob(f"{stem}.pth"))
        if not found:
            reader.problem(example, f"missing (the {cls})", layout=True)
            checkpoint.components.append(Component(name, "missing", example, cls))
            continue
        files = [reader.file(path) for path in found]
        checkpoint.components.append(Component(name, "weights", found[0].name, cls, [w for w in files[:1] if w]))
        for path in found[1:]:
            checkpoint.notes.append(f"{path.name}: also there, checked; {found[0].name} is the one counted")
    for found in sorted(root.glob("models_clip_*.pth")):
        weights = reader.file(found)
        checkpoint.components.append(Component("image_encoder", "weights", found.name, "CLIP image encoder",
                                               [weights] if weights else []))
    _conditioned_parts(root, reader, checkpoint)
    tokenizer = root / "google" / "umt5-xxl"
    if not tokenizer.is_dir() or not any((tokenizer / n).exists() for n in TOKENIZER_FILES):
        reader.problem("google/umt5-xxl/", "missing or empty (the text encoder's tokenizer: tokenizer.json, "
                       "spiece.model, tokenizer_config.json)", layout=True)
        checkpoint.components.append(Component("tokenizer", "missing", "google/umt5-xxl/", "umT5 tokenizer"))
    else:
        checkpoint.components.append(Component("tokenizer", "tokenizer", "google/umt5-xxl/", "umT5 tokenizer"))
    return checkpoint


# Wan's conditioned releases in the original layout (issue 23), told apart by their DiT's tensor names:
# the part, the tensor-name prefixes that are it, and the task it serves. VACE's blocks and Animate's
# adapter are in the DiT's own file; S2V's DiT has its own audio layers and needs the wav2vec2 folder.
DIT_PARTS = (
    ("VACE blocks", ("vace_blocks.", "vace_patch_embedding."), "vace"),
    ("Animate adapter", ("pose_patch_embedding.", "face_adapter.", "face_encoder.", "motion_encoder."), "animate"),
    ("S2V audio layers", ("casual_audio_encoder.", "audio_injector."), "s2v"),
    ("camera adapter", ("control_adapter.",), "control"),
)
AUDIO_ENCODER_FOLDER = "wav2vec2-large-xlsr-53-english"  # Wan2.2-S2V-14B's audio encoder and processor
TEXT_ENCODER_STEM = "models_t5_umt5-xxl-enc-bf16"  # the umT5-XXL text encoder (.pth, or .safetensors of that stem)
TOKENIZER_FOLDER = "google/umt5-xxl"  # its tokenizer
RELIGHTING_LORA = "relighting_lora.ckpt"  # Wan2.2-Animate-14B's, for its replace mode
TASK_NEEDS = {"vace": "VACE blocks in the DiT's file (Wan2.1-VACE-14B, Wan2.2-VACE-Fun-A14B)",
              "animate": "the Animate adapter in the DiT's file (Wan2.2-Animate-14B)",
              "s2v": f"the S2V DiT and its audio encoder `{AUDIO_ENCODER_FOLDER}/` (Wan2.2-S2V-14B)",
              "control": "a Fun control DiT (control video channels or a camera adapter: Wan-Fun Control)"}


def _conditioned_parts(root: Path, reader: _Reader, checkpoint: Checkpoint) -> None:
    """Name the conditioned-task parts of an original-layout folder and what each lacks: VACE blocks, the
    Animate adapter, S2V's audio layers and wav2vec2 encoder, Fun control channels; the tasks it runs."""
    dit = next((c for c in checkpoint.components if c.cls.startswith("Wan DiT") and c.files), None)
    if dit is None:
        return
    tensors = dit.tensors()
    for part, prefixes, _ in DIT_PARTS:
        params = sum(math.prod(shape) for key, (_, shape) in tensors.items() if key.startswith(prefixes))
        if params:
            checkpoint.parts[part] = params
    patch, head = tensors.get("patch_embedding.weight"), tensors.get("head.head.weight")
    in_channels = patch[1][1] if patch and len(patch[1]) == 5 else None
    out_channels = head[1][0] // 4 if head and len(head[1]) == 2 else None  # (out × the 1×2×2 patch, dim)
    if (in_channels in (48, 52) and out_channels == 16) and "S2V audio layers" not in checkpoint.parts:
        checkpoint.parts["Fun control channels"] = 0  # the control video's latents enter as extra channels
    tasks = {task for part, _, task in DIT_PARTS if part in checkpoint.parts}
    if "Fun control channels" in checkpoint.parts:
        tasks.add("control")
    if not tasks & {"s2v", "control"} and in_channels is not None:
        # as the diffsynth backend tells DiTs apart (backends/diffsynth_files.dit_kind): 16 channels text-
        # to-video, 36 image-to-video, the same in and out (48, TI2V-5B) both
        tasks |= ({"t2v", "v2v"} if in_channels == 16 else {"i2v"} if in_channels == 36 else
                  {"t2v", "v2v", "i2v"} if in_channels == out_channels else set())
    if "animate" in tasks:
        tasks.add("i2v")
    checkpoint.tasks = tuple(sorted(tasks))
    if checkpoint.parts:
        dit.cls += " + " + ", ".join(checkpoint.parts)
    audio = root / AUDIO_ENCODER_FOLDER
    if audio.is_dir():
        component = Component("audio_encoder", "weights", f"{AUDIO_ENCODER_FOLDER}/", "wav2vec2 audio encoder (S2V)")
        component.files = reader.weight_set(audio, stems=("model", "pytorch_model"))
        if not component.files and not reader.has_problem_under(f"{AUDIO_ENCODER_FOLDER}/"):
            reader.problem(f"{AUDIO_ENCODER_FOLDER}/model.safetensors", "missing (the wav2vec2 weights)", layout=True)
        # the processor's feature extractor: preprocessor_config.json as released (newer transformers save
        # it inside processor_config.json), and the tokenizer's vocab.json
        for names in (("preprocessor_config.json", "processor_config.json"), ("vocab.json",)):
            if not any((audio / name).is_file() for name in names):
                reader.problem(f"{AUDIO_ENCODER_FOLDER}/{names[0]}", "missing (the audio processor's files, which "
                               "DiffSynth reads the speech with)", layout=True)
        checkpoint.components.append(component)
    elif "s2v" in tasks:
        reader.problem(f"{AUDIO_ENCODER_FOLDER}/", "missing: the S2V DiT needs its audio encoder (wav2vec2 weights "
                       "and processor files, part of the Wan2.2-S2V-14B release)", layout=True)
        checkpoint.components.append(Component("audio_encoder", "missing", f"{AUDIO_ENCODER_FOLDER}/",
                                               "wav2vec2 audio encoder (S2V)"))
    if "animate" in tasks:
        lora = root / RELIGHTING_LORA
        if lora.is_file():
            weights = reader.file(lora)
            checkpoint.components.append(Component("relighting_lora", "weights", RELIGHTING_LORA,
                                                   "Animate relighting LoRA", [weights] if weights else []))
        else:
            checkpoint.notes.append(f"{RELIGHTING_LORA}: absent (Wan2.2-Animate's replace mode uses it; animate "
                                    "mode does not)")
        has_clip = any(c.name == "image_encoder" for c in checkpoint.components)
        if not has_clip and tensors.get("img_emb.proj.0.weight"):
            reader.problem("models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", "missing (the CLIP image "
                           "encoder this Animate DiT embeds the reference image with)", layout=True)


def _inspect_single(root: Path, reader: _Reader) -> Checkpoint:
    weights = reader.file(root)
    checkpoint = Checkpoint(root, "single-file", "one weight file")
    checkpoint.components.append(Component(root.stem, "weights", root.name, "weights", [weights] if weights else []))
    return checkpoint


def _inspect_weights(root: Path, reader: _Reader) -> Checkpoint:
    checkpoint = Checkpoint(root, "weights", "a folder of safetensors")
    component = Component(root.name, "weights", ".", "weights")
    if (root / "config.json").exists():
        component.config = reader.json(root / "config.json") or {}
    component.files = reader.weight_set(root)
    checkpoint.components.append(component)
    return checkpoint

# --------------------------------------------------------------------------------------------------
# Status: what `models status` prints


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}" if unit == "B" else f"{n / size:.1f}{unit}"
    return str(n)


def _bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def dtype_summary(counts: Counter) -> str:
    if not counts:
        return "-"
    total = sum(counts.values())
    ranked = counts.most_common()
    text = ranked[0][0]
    rest = [f"{d} {n / total:.1%}" if n / total >= 0.001 else d for d, n in ranked[1:]]
    return text + (f" (+ {', '.join(rest)})" if rest else "")


def _table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def format_status(checkpoint: Checkpoint) -> str:
    def state(c: Component) -> str:
        prefix = c.where.split("*")[0]
        return "BROKEN" if any(p.where.startswith(prefix) for p in checkpoint.problems) else "ok"

    rows = []
    for c in checkpoint.components:
        if c.kind == "weights":
            rows.append([c.name, c.where, c.cls, len(c.files), _bytes(c.disk_bytes), _count(c.params),
                         dtype_summary(c.dtypes), state(c)])
        else:
            rows.append([c.name, c.where, c.cls, "-", "-", "-", c.kind, state(c)])
    weights = [c for c in checkpoint.components if c.kind == "weights"]
    rows.append(["total", "", "", sum(len(c.files) for c in weights), _bytes(sum(c.disk_bytes for c in weights)),
                 _count(sum(c.params for c in weights)), "", ""])
    lines = [f"checkpoint {checkpoint.root}", f"layout     {checkpoint.layout} ({checkpoint.description})", "",
             _table(["component", "where", "class", "files", "on disk", "params", "dtype", "check"], rows)]
    if checkpoint.parts:
        lines.append("parts      " + ", ".join(f"{name} ({_count(n)} params)" if n else name
                                              for name, n in checkpoint.parts.items()))
    if checkpoint.tasks:
        lines.append(f"tasks      {', '.join(checkpoint.tasks)}")
    for note in checkpoint.notes:
        lines.append(f"note: {note}")
    if not checkpoint.problems:
        count = sum(len(c.files) for c in weights)
        lines.append(f"\ncomplete: every file the indexes name is present, and each of the {count} weight files "
                     "is as long as its header says (headers read; no weights loaded)")
    return "\n".join(lines)
