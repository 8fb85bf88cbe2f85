"""Checkpoints on disk: what a checkpoint folder holds, whether it is complete, what fits on which
GPU, getting one (`download`), and loading a diffusers checkpoint's components fast.

Owns:
  - layout detection: `diffusers` (model_index.json and one folder per component), `wan` (the original
    Wan / DiffSynth release: diffusion_pytorch_model*.safetensors or Wan2.2's high_noise_model/ and
    low_noise_model/, models_t5_*.pth, Wan2.x_VAE.pth, google/umt5-xxl/), `single-file` (one
    .safetensors or .pth) and `weights` (a folder of safetensors without either, e.g. one component);
  - verification from headers only (`inspect`, `verify`): every file an index names is there; a
    safetensors file is at least as long as its header says (8-byte length + JSON header: a
    truncated file is caught without reading its data); a .pth is a torch.save zip archive whose
    storages are all present; each component's size, parameter count and dtypes;
  - the memory estimate per strategy (`estimate`, `fit_report`), from parameter bytes in the headers
    and the generation settings (the formula and its calibration are in the section's comment);
  - `download` through huggingface_hub (resumable; only when asked);
  - `load_components`: a diffusers checkpoint's components, each with its own class's
    `from_pretrained`, their files read in parallel threads, timed one by one.
Must not know: the ledger, executors, workers (a backend calls `load_components`; `cli` the rest).
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
import struct
import threading
import time
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

GIB = 1024**3

# safetensors dtype names → bytes per element
ST_BYTES = {"F64": 8, "I64": 8, "U64": 8, "C64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
            "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
# torch.save's legacy storage class names (what a .pth pickle names) → safetensors dtype names
STORAGE_DTYPES = {"FloatStorage": "F32", "DoubleStorage": "F64", "HalfStorage": "F16", "BFloat16Storage": "BF16",
                  "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
                  "ByteStorage": "U8", "BoolStorage": "BOOL", "Float8_e4m3fnStorage": "F8_E4M3",
                  "Float8_e5m2Storage": "F8_E5M2"}
RUN_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # pickled magic number of old torch.save
FIX = ("download it again into the same folder (`python run_experiment.py models download REPO_ID --to "
       "{root}` resumes and fetches only what is missing or broken), or point model.path at a complete copy")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as it is; the message names each file and the fix."""


class DownloadError(CheckpointError):
    """A download that did not finish (the hub unreachable, a wrong id); what arrived is kept."""


# --------------------------------------------------------------------------------------------------
# Reading weight files: headers only


@dataclass
class WeightFile:
    path: Path
    size: int  # bytes on disk
    tensors: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)  # name → (dtype, shape)
    note: str = ""  # what could not be read (not a problem for verification)

    @property
    def params(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors.values())


class _Broken(Exception):
    """One file's problem (the caller adds which file)."""


def read_safetensors(path: Path) -> WeightFile:
    """The tensors a safetensors file declares, checked against its length; no tensor data is read."""
    size = path.stat().st_size
    if size < 8:
        raise _Broken(f"truncated: {size} bytes, shorter than a safetensors header")
    with open(path, "rb") as stream:
        (length,) = struct.unpack("<Q", stream.read(8))
        if length > MAX_HEADER or 8 + length > size:
            raise _Broken(f"truncated or not a safetensors file: its header claims {length:,} bytes, the file "
                          f"has {size:,}")
        raw = stream.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _Broken("unreadable safetensors header (not JSON): the file is corrupt") from None
    if not isinstance(header, dict):
        raise _Broken("unreadable safetensors header (not a JSON object)")
    tensors, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise _Broken(f"unreadable safetensors header: tensor {name!r} lacks dtype, shape or offsets") from None
        if dtype in ST_BYTES and stop - begin != math.prod(shape) * ST_BYTES[dtype]:
            raise _Broken(f"corrupt safetensors header: tensor {name!r} spans {stop - begin} bytes, its shape "
                          f"{list(shape)} × {dtype} needs {math.prod(shape) * ST_BYTES[dtype]}")
        tensors[name] = (dtype, shape)
        end = max(end, int(stop))
    needed = 8 + length + end
    if size < needed:
        raise _Broken(f"truncated: {size:,} bytes on disk, its header declares {needed:,}")
    return WeightFile(path, size, tensors)


class _Storage:
    def __init__(self, dtype: str, key: str, numel: int):
        self.dtype, self.key, self.numel = dtype, key, numel


class _Opaque:
    """Stands in for every class a .pth pickle names other than tensors and dicts: nothing runs."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _Dict(dict):
    """An OrderedDict of a state dict: a dict that also takes the attributes pickle sets (`_metadata`)."""


class _TensorRef:
    def __init__(self, storage, offset, size, *rest):
        self.storage = storage if isinstance(storage, _Storage) else None
        self.shape = tuple(int(d) for d in size) if isinstance(size, (tuple, list)) else None


class _PthReader(pickle.Unpickler):
    """Reads a torch.save pickle into names, dtypes and shapes without torch and without running any
    code it names: every global resolves to a harmless stand-in."""

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return _Dict
        if module == "torch._utils" and name.startswith("_rebuild_tensor"):
            return _TensorRef
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, *rest: data
        if module == "torch" and name == "Size":
            return tuple
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        return _Opaque

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, numel)
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
            dtype = pid[1] if isinstance(pid[1], str) else "?"
            return _Storage(dtype, str(pid[2]), int(pid[4]))
        return _Opaque()


def _flatten(obj, prefix: str = "") -> Iterable[tuple[str, _TensorRef]]:
    if isinstance(obj, _TensorRef):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _flatten(value, f"{prefix}.{key}" if prefix else str(key))


def read_pth(path: Path) -> WeightFile:
    """A torch.save archive (a zip): its directory is read, its pickle parsed for names, dtypes and
    shapes, and every storage the pickle names must be in it; no tensor data is read."""
    size = path.stat().st_size
    if size == 0:
        raise _Broken("empty file (0 bytes)")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as stream:
            if stream.read(len(LEGACY_TORCH_MAGIC)) == LEGACY_TORCH_MAGIC:
                # torch.save before 1.6: one pickle stream, no directory to check it against
                return WeightFile(path, size, note="legacy torch.save format: its completeness is not checked")
        raise _Broken(f"not a readable torch.save archive ({size:,} bytes, no zip directory at its end): "
                      "truncated or corrupt")
    with zipfile.ZipFile(path) as archive:
        entries = {info.filename: info for info in archive.infolist()}
        pickles = [name for name in entries if name.endswith("data.pkl")]
        if not pickles:
            raise _Broken("a zip file without data.pkl: not a torch.save archive")
        prefix = pickles[0][: -len("data.pkl")]
        for info in entries.values():
            if info.header_offset + info.compress_size > size:
                raise _Broken(f"truncated: member {info.filename} ends past the end of the file")
        result = WeightFile(path, size)
        try:
            root = _PthReader(archive.open(pickles[0])).load()
        except Exception as exc:  # an exotic pickle: the archive itself is whole, so only say so
            result.note = f"contents not inspected ({type(exc).__name__})"
            return result
        for name, ref in _flatten(root):
            storage = ref.storage
            if storage is None or ref.shape is None:
                continue
            member = f"{prefix}data/{storage.key}"
            if member not in entries:
                raise _Broken(f"storage {storage.key} of tensor {name!r} is missing from the archive")
            needed = storage.numel * ST_BYTES.get(storage.dtype, 1)
            if entries[member].file_size < needed:
                raise _Broken(f"storage {storage.key} of tensor {name!r} holds {entries[member].file_size} "
                              f"bytes, {needed} needed")
            result.tensors[name] = (storage.dtype, ref.shape)
    return result


def read_weight_file(path: Path) -> WeightFile:
    return read_safetensors(path) if path.suffix == ".safetensors" else read_pth(path)


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

    def component(self, name: str) -> Component | None:
        return next((c for c in self.components if c.name == name), None)

    def error(self) -> CheckpointError:
        count = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        return CheckpointError(f"checkpoint {self.root} is incomplete or broken ({count}):\n"
                               + "\n".join(f"  {p}" for p in self.problems)
                               + f"\nfix: {FIX.format(root=self.root)}")


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


def inspect(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint's indexes and weight headers; problems are collected, not raised."""
    root = Path(path).expanduser()
    if not root.exists():
        raise CheckpointError(f"checkpoint {root} does not exist (fix: download it: python run_experiment.py "
                              f"models download REPO_ID --to {root})")
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
    tokenizer = root / "google" / "umt5-xxl"
    if not tokenizer.is_dir() or not any((tokenizer / n).exists() for n in TOKENIZER_FILES):
        reader.problem("google/umt5-xxl/", "missing or empty (the text encoder's tokenizer: tokenizer.json, "
                       "spiece.model, tokenizer_config.json)", layout=True)
        checkpoint.components.append(Component("tokenizer", "missing", "google/umt5-xxl/", "umT5 tokenizer"))
    else:
        checkpoint.components.append(Component("tokenizer", "tokenizer", "google/umt5-xxl/", "umT5 tokenizer"))
    return checkpoint


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
    for note in checkpoint.notes:
        lines.append(f"note: {note}")
    if not checkpoint.problems:
        count = sum(len(c.files) for c in weights)
        lines.append(f"\ncomplete: every file the indexes name is present, and each of the {count} weight files "
                     "is as long as its header says (headers read; no weights loaded)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Loading a diffusers checkpoint's components
#
# Why the builds hold a lock: while a model is built, diffusers, transformers and accelerate change
# process-wide state and put it back afterwards: the default dtype (`torch.set_default_dtype`),
# `nn.Module.register_parameter` (accelerate's `init_empty_weights`, which saves "the old one" on entry)
# and `torch.nn.init.*`. Two threads building at once restore each other's values: measured here, 15
# of 20 rounds of three concurrent `from_pretrained` calls left the process with bfloat16 as its
# default dtype or with `register_parameter` still putting every new parameter on the meta device.
# So one `from_pretrained` of a model runs at a time, and what runs in parallel is the part that is
# slow and safe: reading the weight files from disk into the page cache (large reads; the GIL is
# released while the kernel reads). Each model's build then maps its safetensors (from_pretrained's
# default, memory-mapped) from memory. Tokenizers and schedulers build under the same lock: they are
# quick, and a scheduler making a tensor while another build has changed the default dtype would
# inherit that dtype.

_BUILD_LOCK = threading.Lock()
READ_CHUNK = 16 << 20
READ_THREADS = 8
PREFETCH_RAM_SHARE = 0.5  # read ahead only what fits in this share of the available memory
PARALLEL_MIN_BYTES = 64 << 20  # below this, threads cost more than they save (bench/load_time.py, tiny)
LIBRARIES = ("diffusers", "transformers")


def model_index(folder: str | os.PathLike) -> tuple[dict[str, tuple[str, str] | None], dict]:
    """A diffusers checkpoint's components {name: (library, class) or None where absent} and its other
    settings (e.g. `boundary_ratio`, `expand_timesteps`: what the pipeline's constructor also takes)."""
    path = Path(folder) / "model_index.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing: {folder} is not a diffusers checkpoint folder") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc}); fix: {FIX.format(root=folder)}") from None
    components, settings = {}, {}
    for name, value in data.items():
        if name.startswith("_"):
            continue
        if is_component_spec(value):
            components[name] = (str(value[0]), str(value[1])) if value[0] is not None else None
        else:
            settings[name] = value
    return components, settings


def _component_class(library: str, name: str):
    import importlib
    if library not in LIBRARIES:
        # model_index.json may name any module; importing one it names is running its code
        raise CheckpointError(f"model_index.json names a component class from `{library}`; only classes of "
                              f"{' and '.join(LIBRARIES)} are loaded")
    module = importlib.import_module(library)
    cls = getattr(module, name, None)
    if cls is None:
        raise CheckpointError(f"{library} {getattr(module, '__version__', '')} has no class `{name}` (named by "
                              f"model_index.json): install a version that has it")
    return cls


def component_weight_files(folder: Path) -> list[Path]:
    """The files `from_pretrained` reads for one component folder: those its index names, else its one
    weight file (variants such as `.fp16.safetensors` are not read by default, so not here either)."""
    for stem in ("diffusion_pytorch_model", "model"):
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError):
                return []
            return [folder / n for n in names if (folder / n).is_file()]
        single = folder / f"{stem}.safetensors"
        if single.is_file():
            return [single]
    return []


def _resident_share(path: Path) -> float | None:
    """The share of a file's pages already in the page cache (Linux `mincore`), None where unknown."""
    try:
        import ctypes
        import mmap

        import numpy as np
        size = path.stat().st_size
        if size == 0:
            return 1.0
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        fd = os.open(path, os.O_RDONLY)
        try:
            address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if address in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
                vector = (ctypes.c_ubyte * pages)()
                if libc.mincore(ctypes.c_void_p(address), size, vector) != 0:
                    return None
                return float((np.frombuffer(vector, dtype=np.uint8) & 1).mean())
            finally:
                libc.munmap(ctypes.c_void_p(address), size)
        finally:
            os.close(fd)
    except Exception:
        return None


def read_ahead(path: Path) -> int:
    """Bring a file into the page cache with large reads; returns the bytes read (0 when it already
    was: a warm file costs one `mincore`, not a second pass over memory)."""
    share = _resident_share(path)
    if share is not None and share >= 0.98:
        return 0
    buffer = bytearray(READ_CHUNK)
    view = memoryview(buffer)
    total = 0
    with open(path, "rb", buffering=0) as stream:
        while True:
            n = stream.readinto(view)
            if not n:
                break
            total += n
    return total


def _torch_state():
    import torch
    init = {name: getattr(torch.nn.init, name) for name in dir(torch.nn.init)
            if not name.startswith("_") and callable(getattr(torch.nn.init, name))}
    return (torch.get_default_dtype(), torch.nn.Module.register_parameter, torch.nn.Module.register_buffer, init)


def _restore_torch_state(state) -> None:
    """Put back what a build may have left changed (belt and braces: builds are serialised)."""
    import torch
    dtype, register_parameter, register_buffer, init = state
    if torch.get_default_dtype() != dtype:
        torch.set_default_dtype(dtype)
    torch.nn.Module.register_parameter = register_parameter
    torch.nn.Module.register_buffer = register_buffer
    for name, function in init.items():
        setattr(torch.nn.init, name, function)


def _build(cls, path: Path, dtype, device, is_model: bool):
    if not is_model:
        return cls.from_pretrained(path)
    kwargs = {}
    if device is not None:
        kwargs["device_map"] = str(device)
    if cls.__module__.startswith("transformers"):
        import transformers
        key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    else:
        key = "torch_dtype"
    kwargs[key] = dtype
    return cls.from_pretrained(path, **kwargs)


def load_components(folder: str | os.PathLike, dtype, parallel: bool = True, names: Iterable[str] | None = None,
                    *, device=None, prefetch: bool | None = None,
                    detail: dict | None = None) -> tuple[dict[str, object], dict[str, float]]:
    """Load a diffusers checkpoint's components, each once, with its own class's `from_pretrained`.

    folder    a diffusers checkpoint (model_index.json and one folder per component)
    dtype     torch dtype (or its name) for the model components
    parallel  True: the components' weight files are read ahead in parallel threads while the models
              are built one at a time (see the comment above); False: one after the other, plain
              `from_pretrained` (what `Pipeline.from_pretrained` does)
    names     the components to load (default: every one model_index.json names, absent ones left out)
    device    where model components go (`device_map=` of from_pretrained): None (the CPU), a device,
              or {name: device}; tokenizers, schedulers and processors stay on the CPU
    prefetch  read ahead (default: = parallel); skipped when the files would not fit in half the
              available memory (they would push each other out of the page cache). Left at None, a
              checkpoint under PARALLEL_MIN_BYTES loads sequentially: there is nothing to overlap
    detail    a dict to fill with {name: {seconds, read_seconds, build_seconds, wait_seconds, bytes}}

    Returns (components, seconds): {name: object}, and {name: seconds it took}: reading its files ahead
    plus its own `from_pretrained`, not counting time spent waiting for another component's build.
    """
    import torch
    root = Path(folder)
    specs, _ = model_index(root)
    available = {n: s for n, s in specs.items() if s is not None}
    if names is None:
        wanted = list(available)
    else:
        wanted = list(dict.fromkeys(names))
        unknown = [n for n in wanted if n not in available]
        if unknown:
            raise CheckpointError(f"{root}/model_index.json has no component {', '.join(map(repr, unknown))} "
                                  f"(it has: {', '.join(available) or 'none'})")
    for name in wanted:
        if not (root / name).is_dir():
            raise CheckpointError(f"{root / name}/: missing: model_index.json names component `{name}`; "
                                  f"fix: {FIX.format(root=root)}")
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    classes = {n: _component_class(*available[n]) for n in wanted}
    is_model = {n: isinstance(classes[n], type) and issubclass(classes[n], torch.nn.Module) for n in wanted}
    files = {n: component_weight_files(root / n) if is_model[n] else [] for n in wanted}
    sizes = {n: sum(f.stat().st_size for f in files[n]) for n in wanted}
    if prefetch is None:
        prefetch = parallel = parallel and sum(sizes.values()) >= PARALLEL_MIN_BYTES
    if prefetch:
        try:
            import psutil
            prefetch = sum(sizes.values()) <= PREFETCH_RAM_SHARE * psutil.virtual_memory().available
        except Exception:
            pass

    def device_of(name: str):
        return device.get(name) if isinstance(device, dict) else device

    info = {n: {"seconds": 0.0, "read_seconds": 0.0, "build_seconds": 0.0, "wait_seconds": 0.0,
                "bytes": sizes[n]} for n in wanted}
    components: dict[str, object] = {}
    state = _torch_state()
    try:
        if not parallel:
            for name in wanted:
                t0 = time.perf_counter()
                if prefetch:
                    for path in files[name]:
                        read_ahead(path)
                t1 = time.perf_counter()
                components[name] = _build(classes[name], root / name, torch_dtype, device_of(name), is_model[name])
                t2 = time.perf_counter()
                info[name].update(read_seconds=t1 - t0, build_seconds=t2 - t1)
        else:
            # the biggest first: its reads start first, and models are built as their files arrive
            order = sorted(wanted, key=lambda n: -sizes[n])
            reads: dict[Path, object] = {}
            with ThreadPoolExecutor(max_workers=max(1, min(READ_THREADS, sum(len(files[n]) for n in order))),
                                    thread_name_prefix="read-ahead") as readers, \
                    ThreadPoolExecutor(max_workers=len(order) or 1, thread_name_prefix="load") as loaders:

                def timed_read(path: Path) -> tuple[float, float]:
                    start = time.perf_counter()
                    read_ahead(path)
                    return start, time.perf_counter()

                if prefetch:
                    for name in order:
                        for path in sorted(files[name], key=lambda p: -p.stat().st_size):
                            reads[path] = readers.submit(timed_read, path)

                def load(name: str):
                    t0 = time.perf_counter()
                    spans = [reads[p].result() for p in files[name] if p in reads]
                    t1 = time.perf_counter()
                    with _BUILD_LOCK:
                        t2 = time.perf_counter()
                        obj = _build(classes[name], root / name, torch_dtype,
                                     device_of(name) if is_model[name] else None, is_model[name])
                    t3 = time.perf_counter()
                    read = (max(e for _, e in spans) - min(s for s, _ in spans)) if spans else 0.0
                    info[name].update(read_seconds=read, build_seconds=t3 - t2,
                                      wait_seconds=max(0.0, t1 - t0 - read) + (t2 - t1))
                    return obj

                futures = {name: loaders.submit(load, name) for name in order}
                for name in wanted:
                    components[name] = futures[name].result()
    finally:
        _restore_torch_state(state)
    for name in wanted:
        info[name]["seconds"] = info[name]["read_seconds"] + info[name]["build_seconds"]
    if detail is not None:
        detail.update(info)
    return components, {n: info[n]["seconds"] for n in wanted}


# --------------------------------------------------------------------------------------------------
# What fits where: the memory of one worker, per strategy
#
# One worker's peak on a card = CUDA context + the weights on that card + the largest working set of
# the components that run there (the transformer's activations are freed before the VAE decodes, so
# the terms do not add up). Working sets, in bytes, b = bytes per element of the run dtype:
#
#   latent_frames = (F - 1) / 4 + 1;   tokens T = latent_frames × H/(s·p) × W/(s·p)
#       s: the VAE's spatial factor (8; 16 for the Wan2.2 VAE), p: the DiT's patch (2)
#   transformer  = T × b × (K_HIDDEN × hidden + K_FFN × ffn)         one block at a time (no_grad);
#                  classifier-free guidance runs its two passes one after the other
#   text encoder = L × b × (K_HIDDEN × d_model + K_FFN × d_ff)        L = max_sequence_length (512)
#   VAE decode   = (H/q) × (W/q) × b × (K_VAE_CH × C + K_VAE_PX) + 2 × F × 3 × H × W × b
#       C: channels of the decoder's finest level (96 in Wan2.1's VAE), q: its patch (1; 2 in Wan2.2's);
#       the decoder works a few frames at a time, so only its output grows with F
#
# The K constants are slopes measured on the CPU (`bench/fit_calibration.py`: peak RSS of a first
# forward pass, large allocations returned to the OS at once, at two sizes each so fixed costs cancel):
# one real-width Wan block (hidden 1536) with ffn 8960 and 1536 for K_HIDDEN and K_FFN; the default
# Wan VAE (C = 96) and the tiny one (C = 3) for K_VAE_CH and K_VAE_PX. On a GPU the same terms are
# scaled by GPU_FACTOR, fitted to the one real-size measurement recorded (docs/benchmarks.md, "GPU
# sizing"): a Wan-1.3B-sized pipeline (the wan-1.3b random checkpoint: 1,935,885,875 parameters in
# bf16) at 832×480×81 peaked at 12,631,146,496 bytes per worker on an H100 (NVML, per process), of
# which 719,323,136 were the CUDA context (NVML peak − torch's peak reserved). Its largest term there is
# the VAE decode. Check against a second figure (shared/gpu/README.md: the same transformer with a
# float32 VAE and no text encoder peaked at 17.6 GiB): this formula gives 18.7 GiB (+6%).

K_HIDDEN = 10.2
K_FFN = 0.96
K_VAE_CH = 50.3
K_VAE_PX = 270.0
TEXT_TOKENS = 512
CUDA_CONTEXT = 719_323_136
_H100 = dict(peak=12_631_146_496, params=1_935_885_875, width=832, height=480, frames=81, channels=96)


def _vae_working(width: int, height: int, frames: int, b: int, channels: int, patch: int = 1) -> float:
    pixels = (height // patch) * (width // patch)
    return pixels * b * (K_VAE_CH * channels + K_VAE_PX) + 2 * frames * 3 * height * width * b


GPU_FACTOR = round((_H100["peak"] - CUDA_CONTEXT - 2 * _H100["params"])
                   / _vae_working(_H100["width"], _H100["height"], _H100["frames"], 2, _H100["channels"]), 2)


@dataclass
class Part:
    """One component as the estimate sees it."""
    name: str
    role: str  # denoiser | text | vae | image | other
    params: int
    quantizable: int  # parameters in 2-D linear weights (what 8-bit loading quantizes)
    block: int  # parameters of the largest block (blocks.N / block.N)
    hidden: int = 0
    ffn: int = 0
    patch: int = 2
    channels: int = 96
    vae_patch: int = 1
    spatial: int = 8


_BLOCK = re.compile(r"^(.*?\bblocks?\.\d+)\.")


def _role(name: str, tensors: dict) -> str:
    if name.startswith("transformer") or name.endswith("noise_model") or "patch_embedding.weight" in tensors:
        return "denoiser"
    if name == "vae" or any(k.startswith("decoder.") for k in tensors):
        return "vae"
    if name.startswith("text_encoder") or any(k in tensors for k in ("shared.weight", "token_embedding.weight")):
        return "text"
    if name.startswith("image_encoder"):
        return "image"
    return "other"


def _first(tensors: dict, pattern: str) -> tuple[int, ...] | None:
    regex = re.compile(pattern)
    for key, (_, shape) in tensors.items():
        if regex.fullmatch(key):
            return shape
    return None


def parts(checkpoint: Checkpoint) -> list[Part]:
    """The components with weights, with what the estimate needs read from their headers and configs."""
    out = []
    for c in checkpoint.components:
        if c.kind != "weights" or not c.files:
            continue
        tensors = c.tensors()
        blocks: Counter = Counter()
        quantizable = 0
        for key, (_, shape) in tensors.items():
            n = math.prod(shape)
            match = _BLOCK.match(key)
            if match:
                blocks[match.group(1)] += n
            if len(shape) == 2 and key.endswith(".weight") and not re.search(r"embed|shared|token", key):
                quantizable += n
        role = _role(c.name, tensors)
        part = Part(c.name, role, c.params, quantizable, max(blocks.values(), default=0))
        config = c.config
        if role == "denoiser":
            entry = tensors.get("patch_embedding.weight")  # (dtype, [hidden, in channels, 1, 2, 2])
            shape = entry[1] if entry else None
            part.hidden = int(shape[0]) if shape else int(
                config.get("dim") or config.get("num_attention_heads", 12) * config.get("attention_head_dim", 128))
            part.patch = int(shape[-1]) if shape and len(shape) == 5 else 2
            ffn = _first(tensors, r"blocks\.0\.ffn\.(net\.0\.proj|0)\.weight")
            part.ffn = int(ffn[0]) if ffn else int(config.get("ffn_dim") or 4 * part.hidden)
        elif role == "vae":
            out_conv = _first(tensors, r"decoder\.(conv_out|head\.2)\.weight")
            if out_conv:
                part.channels = int(out_conv[1])
                part.vae_patch = max(1, round(math.sqrt(out_conv[0] / 3)))
            part.spatial = int(config.get("scale_factor_spatial") or 8 * part.vae_patch)
        elif role in ("text", "image"):
            embed = _first(tensors, r"(shared|encoder\.embed_tokens|token_embedding)\.weight")
            part.hidden = int(embed[1]) if embed else int(config.get("d_model") or config.get("hidden_size") or 0)
            ffn = _first(tensors, r".*(DenseReluDense\.wi(_0)?|ffn\.fc1|ffn\.gate\.0|mlp\.fc1)\.weight")
            part.ffn = int(ffn[0]) if ffn else int(config.get("d_ff") or config.get("intermediate_size") or 0)
        out.append(part)
    return out


@dataclass(frozen=True)
class Settings:
    width: int = 832
    height: int = 480
    frames: int = 81
    dtype: str = "bfloat16"
    text_tokens: int = TEXT_TOKENS

    @property
    def b(self) -> int:
        return RUN_BYTES.get(self.dtype, 2)


def tokens(settings: Settings, spatial: int = 8, patch: int = 2) -> int:
    latent_frames = (settings.frames - 1) // 4 + 1
    return latent_frames * (settings.height // (spatial * patch)) * (settings.width // (spatial * patch))


def working_sets(model: list[Part], settings: Settings, gpu: bool = True) -> dict[str, float]:
    """Bytes of working memory of each component while it runs (GPU-scaled unless gpu=False)."""
    factor = GPU_FACTOR if gpu else 1.0
    b = settings.b
    vae = next((p for p in model if p.role == "vae"), None)
    spatial = vae.spatial if vae else 8
    out = {}
    for p in model:
        if p.role == "denoiser":
            t = tokens(settings, spatial, p.patch)
            out[p.name] = factor * t * b * (K_HIDDEN * p.hidden + K_FFN * p.ffn)
        elif p.role in ("text", "image"):
            out[p.name] = factor * settings.text_tokens * b * (K_HIDDEN * p.hidden + K_FFN * p.ffn)
        elif p.role == "vae":
            out[p.name] = factor * _vae_working(settings.width, settings.height, settings.frames, b, p.channels,
                                                p.vae_patch)
        else:
            out[p.name] = 0.0
    return out


STRATEGIES = {
    "whole": "whole model on one card",
    "text_encoder_cpu": "text encoder on the CPU",
    "vae_cpu": "VAE on the CPU",
    "model_offload": "model CPU offload",  # one component on the card at a time
    "device_map": "device_map over {k} cards",  # whole components placed per card
    "fsdp": "FSDP over {k} cards",  # DiT and T5 sharded, sequence parallel (Wan's generate.py)
    "int8": "8-bit weights",  # DiT's and text encoder's linear weights
    "int8_offload": "8-bit + model offload",
    "block_offload": "block offload",  # blocks stream from the CPU, two on the card
}
PREFERENCE = ("whole", "text_encoder_cpu", "vae_cpu", "model_offload", "device_map", "fsdp", "int8",
              "int8_offload", "block_offload")


@dataclass
class Estimate:
    strategy: str
    cards: int  # per worker
    per_card: int  # bytes on the most loaded card, CUDA context included
    weights: int  # bytes of weights on that card
    working: int  # bytes of working memory on that card
    host: int = 0  # bytes of weights each worker keeps in CPU memory instead

    @property
    def label(self) -> str:
        return STRATEGIES[self.strategy].format(k=self.cards)


def estimate(model: list[Part], settings: Settings, strategy: str, cards: int = 1) -> Estimate:
    """One worker's peak GPU memory per card under `strategy` (over `cards` cards for device_map/fsdp)."""
    result = _estimate(model, settings, strategy, cards)
    if strategy in ("text_encoder_cpu", "vae_cpu", "model_offload", "block_offload", "int8_offload"):
        total = sum(p.params * settings.b for p in model)
        if strategy == "int8_offload":
            total -= sum(p.quantizable * (settings.b - 1) for p in model if p.role in ("denoiser", "text"))
        result.host = max(0, int(total - (result.weights if strategy != "model_offload" else 0)))
    return result


def _estimate(model: list[Part], settings: Settings, strategy: str, cards: int) -> Estimate:
    b = settings.b
    ws = working_sets(model, settings)
    weights = {p.name: p.params * b for p in model}
    roles = {p.name: p.role for p in model}

    def of(names):
        names = list(names)
        w = sum(weights[n] for n in names)
        work = max((ws[n] for n in names), default=0.0)
        return Estimate(strategy, cards, int(CUDA_CONTEXT + w + work), int(w), int(work))

    if strategy == "whole":
        return of(weights)
    if strategy == "text_encoder_cpu":
        return of(n for n in weights if roles[n] != "text")
    if strategy == "vae_cpu":
        return of(n for n in weights if roles[n] != "vae")
    if strategy == "model_offload":
        return max((of([n]) for n in weights), key=lambda e: e.per_card)
    if strategy in ("int8", "int8_offload"):
        int8 = {p.name: p.params * b - p.quantizable * (b - 1) if p.role in ("denoiser", "text") else p.params * b
                for p in model}
        if strategy == "int8":
            w = sum(int8.values())
            work = max(ws.values(), default=0.0)
            return Estimate(strategy, 1, int(CUDA_CONTEXT + w + work), int(w), int(work))
        best = max(model, key=lambda p: int8[p.name] + ws[p.name])
        return Estimate(strategy, 1, int(CUDA_CONTEXT + int8[best.name] + ws[best.name]), int8[best.name],
                        int(ws[best.name]))
    if strategy == "block_offload":
        # two blocks resident (the one running and the next, prefetched), the rest streams from the CPU
        running = max(model, key=lambda p: 2 * p.block * b + ws[p.name] + (0 if p.block else p.params * b))
        w = 2 * running.block * b if running.block else running.params * b
        return Estimate(strategy, 1, int(CUDA_CONTEXT + w + ws[running.name]), int(w), int(ws[running.name]))
    if strategy == "device_map":
        # accelerate places whole components (a pipeline's device_map does not split a model)
        loads: list[list[str]] = [[] for _ in range(cards)]
        for name in sorted(weights, key=lambda n: -weights[n]):
            target = min(loads, key=lambda names: sum(weights[n] for n in names))
            target.append(name)
        return max((of(names) for names in loads), key=lambda e: e.per_card)
    if strategy == "fsdp":
        # Wan's generate.py: DiT and T5 sharded over the cards, attention split by Ulysses, VAE on rank 0
        sharded = sum(weights[n] for n in weights if roles[n] in ("denoiser", "text")) / cards
        rest = sum(weights[n] for n in weights if roles[n] not in ("denoiser", "text"))
        gathered = 2 * max((p.block * b for p in model if p.role == "denoiser"), default=0)
        work = max([ws[n] / cards for n in ws if roles[n] == "denoiser"]
                   + [ws[n] for n in ws if roles[n] != "denoiser"] + [0.0])
        w = int(sharded + rest + gathered)
        return Estimate(strategy, cards, int(CUDA_CONTEXT + w + work), w, int(work))
    raise ValueError(f"unknown strategy {strategy!r}")


# What each backend calls a strategy: (model.options, resources) — None where it has no such switch.
BACKEND_STRATEGIES: dict[str, dict[str, tuple[dict, dict] | None]] = {
    "diffusers": {
        "whole": ({}, {}), "text_encoder_cpu": ({"text_encoder": "cpu"}, {}),
        "model_offload": ({"offload": "model"}, {}), "block_offload": ({"offload": "group"}, {}),
        "device_map": ({"device_map": "balanced"}, {"gpus_per_worker": "{k}", "workers_per_gpu": 1}),
    },
    "diffsynth": {
        "whole": ({"vram_management": False}, {}), "text_encoder_cpu": ({"vram_management": "text_encoder"}, {}),
        "model_offload": ({"vram_management": True}, {}), "block_offload": ({"vram_management": True}, {}),
    },
    "command": {
        "whole": ({"offload_model": False}, {}), "text_encoder_cpu": ({"offload_model": False, "t5_cpu": True}, {}),
        "model_offload": ({"offload_model": True}, {}),
        "fsdp": ({"dit_fsdp": True, "t5_fsdp": True}, {"gpus_per_worker": "{k}", "workers_per_gpu": 1}),
    },
}


def strategy_for_options(backend: str, options: dict, cards: int) -> str:
    """Which strategy a manifest's memory options amount to (to set an estimate beside a profile)."""
    table = BACKEND_STRATEGIES.get(backend, {})
    relevant = {k: v for k, v in options.items()
                if any(k in opts for opts, _ in filter(None, table.values()))}
    for name, entry in table.items():
        if entry is not None and {k: v for k, v in entry[0].items()} == relevant:
            return name
    if backend == "diffusers" and cards > 1:
        return "device_map"
    if backend == "command" and cards > 1:
        return "fsdp"
    return "whole"


# --------------------------------------------------------------------------------------------------
# GPUs: this machine's, or named on the command line


@dataclass(frozen=True)
class GpuKind:
    name: str
    count: int
    total_bytes: int
    usable_bytes: int  # free memory now (this machine), or the whole card (a card named by size)


def parse_gpu(text: str) -> GpuKind:
    """`24GB x2`, `24GBx2`, `2x24GB`, `80GB`, `48`, `16GiB x4`: memory per card and how many.

    A card sold as "24 GB" has 24 GiB (24576 MiB); so GB and GiB both mean GiB here, MB and MiB MiB."""
    text = (text or "").strip()
    match = (re.fullmatch(r"(?P<size>\d+(?:\.\d+)?)\s*(?P<unit>gib|gb|g|mib|mb)?\s*(?:[x×*]\s*(?P<count>\d+))?",
                          text, re.IGNORECASE)
             or re.fullmatch(r"(?P<count>\d+)\s*[x×*]\s*(?P<size>\d+(?:\.\d+)?)\s*(?P<unit>gib|gb|g|mib|mb)",
                             text, re.IGNORECASE))
    if not match:
        raise ValueError(f"cannot read GPU {text!r}: write memory per card and an optional count, e.g. "
                         "`24GB x2`, `80GB`, `2x24GB`")
    size = float(match["size"])
    unit = (match["unit"] or "gb").lower()
    total = int(size * (1024**2 if unit in ("mb", "mib") else GIB))
    count = int(match["count"] or 1)
    if total <= 0 or count <= 0:
        raise ValueError(f"GPU {text!r}: memory and count must be positive")
    label = f"{size:g} GB card" if unit not in ("mb", "mib") else f"{size:g} MB card"
    return GpuKind(label, count, total, total)


def machine_gpus() -> tuple[list[GpuKind], str | None]:
    """This machine's GPUs (NVML, or FAKE cards via ORCHESTRATOR_FAKE_GPUS), one entry per model."""
    from .gpus import NoGpus, discover
    try:
        gpus = discover()
    except NoGpus as exc:
        return [], str(exc)
    kinds: dict[str, list] = {}
    for gpu in gpus:
        kinds.setdefault(gpu.name, []).append(gpu)
    return [GpuKind(name, len(cards), min(g.total_bytes for g in cards), min(g.free_bytes for g in cards))
            for name, cards in kinds.items()], None


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _yaml_flow(mapping: dict) -> str:
    def value(v):
        return "true" if v is True else "false" if v is False else str(v)
    return "{" + ", ".join(f"{k}: {value(v)}" for k, v in mapping.items()) + "}"


def _backend_entry(backend: str, strategy: str, k: int) -> tuple[dict, dict] | None:
    entry = BACKEND_STRATEGIES.get(backend, {}).get(strategy)
    if entry is None:
        return None
    options, resources = entry
    resources = {key: (int(v.format(k=k)) if isinstance(v, str) else v) for key, v in resources.items()}
    return dict(options), {"gpus_per_worker": 1, "workers_per_gpu": "auto", **resources}


def _other_backend(strategy: str) -> str | None:
    for backend, table in BACKEND_STRATEGIES.items():
        if table.get(strategy) is not None:
            return backend
    return None


def fit_report(checkpoint: Checkpoint, settings: Settings, gpus: list[GpuKind], margin_gib: float = 2.0,
               backend: str = "diffusers", options: dict | None = None, measured: list | None = None,
               gpu_note: str | None = None) -> str:
    """The `models fit` text: the model's parts, the estimate per strategy, and per GPU kind which
    strategies fit and the `resources:` / `model.options:` to use. `measured`: [(Profile, path)]."""
    model = parts(checkpoint)
    if not any(p.role == "denoiser" for p in model):
        raise CheckpointError(f"{checkpoint.root}: no DiT (transformer) weights found, nothing to estimate")
    b, margin = settings.b, int(margin_gib * GIB)
    vae = next((p for p in model if p.role == "vae"), None)
    spatial = vae.spatial if vae else 8
    den = next(p for p in model if p.role == "denoiser")
    latent = (settings.frames - 1) // 4 + 1
    t = tokens(settings, spatial, den.patch)
    ws = working_sets(model, settings)
    lines = [f"checkpoint {checkpoint.root} ({checkpoint.description})",
             f"settings   {settings.width}x{settings.height}, {settings.frames} frames, {settings.dtype}: {latent} latent "
             f"frames × {settings.height // (spatial * den.patch)} × {settings.width // (spatial * den.patch)} "
             f"= {t:,} tokens", ""]
    rows = []
    for p in model:
        shape = (f"hidden {p.hidden}, ffn {p.ffn}" if p.role in ("denoiser", "text", "image") and p.hidden
                 else f"decoder {p.channels} channels, {p.spatial}x spatial" if p.role == "vae" else "")
        rows.append([p.name, p.role, _count(p.params), _gib(p.params * b), shape, _gib(ws[p.name])])
    lines += [_table(["component", "role", "params", f"weights ({settings.dtype})", "shape", "working set"], rows), ""]

    counts = sorted({2, 4} | {g.count for g in gpus if 2 <= g.count <= 8})
    estimates = []
    for strategy in PREFERENCE:
        for k in (counts if strategy in ("device_map", "fsdp") else [1]):
            if strategy == "vae_cpu" and vae is None:
                continue
            if strategy == "text_encoder_cpu" and not any(p.role == "text" for p in model):
                continue
            estimates.append(estimate(model, settings, strategy, k))
    header = ["strategy", "per card", "weights", "working", "host RAM", f"{backend} backend"]
    rows = []
    for e in estimates:
        entry = _backend_entry(backend, e.strategy, e.cards)
        how = ("model.options " + _yaml_flow(entry[0]) if entry[0] else "(default)") if entry else \
            (f"not here; backend {_other_backend(e.strategy)}" if _other_backend(e.strategy) else "no backend offers it")
        rows.append([e.label, _gib(e.per_card), _gib(e.weights), _gib(e.working), _gib(e.host) if e.host else "-",
                     how])
    lines += ["One worker's peak GPU memory per card (estimate: CUDA context "
              f"{_gib(CUDA_CONTEXT)} + weights on the card + the largest working set there):", _table(header, rows), ""]

    if gpus:
        lines.append(f"GPUs ({gpu_note or 'this machine'}), with resources.memory_margin_gib {margin_gib:g} per worker:")
        header = ["strategy"] + [f"{g.name} ×{g.count} ({_gib(g.usable_bytes)})" for g in gpus]
        rows = []
        verdicts: dict[str, list[tuple[Estimate, int]]] = {g.name: [] for g in gpus}
        for e in estimates:
            row = [e.label]
            for g in gpus:
                if e.cards > g.count:
                    row.append("-")
                    continue
                n = g.usable_bytes // (e.per_card + margin)
                if n >= 1:
                    workers = n if e.cards == 1 else g.count // e.cards
                    row.append(f"fits ({workers} per card)" if e.cards == 1 else f"fits ({workers} worker(s))")
                    verdicts[g.name].append((e, int(workers)))
                else:
                    row.append(f"no (+{_gib(e.per_card + margin - g.usable_bytes)})")
            rows.append(row)
        lines += [_table(header, rows), ""]
        for g in gpus:
            fitting = verdicts[g.name]
            here = [(e, n) for e, n in fitting if _backend_entry(backend, e.strategy, e.cards)]
            title = f"{g.name} ×{g.count}"
            if not fitting:
                smallest = min(estimates, key=lambda e: e.per_card)
                lines.append(f"{title}: nothing fits; the smallest is {smallest.label} at {_gib(smallest.per_card)} "
                             f"per card (+ {margin_gib:g} GiB margin)")
                continue
            if here:
                e, n = here[0]
                opts, res = _backend_entry(backend, e.strategy, e.cards)
                lines.append(f"{title}: use {e.label}: {_gib(e.per_card)} per card"
                             + (f", {n} fit per card" if e.cards == 1 else "") + f" (backend {backend})"
                             + (f"; each worker keeps {_gib(e.host)} of weights in host memory" if e.host else ""))
                merged = dict(options or {})
                for key in _memory_keys(backend):
                    merged.pop(key, None)
                merged.update(opts)
                lines += [f"  resources: {_yaml_flow(res)}", "  model:", f"    options: {_yaml_flow(merged)}"]
            else:
                lines.append(f"{title}: the {backend} backend has no strategy that fits")
            better = fitting[0][0]
            if here and PREFERENCE.index(better.strategy) < PREFERENCE.index(here[0][0].strategy) or not here:
                other = _other_backend(better.strategy)
                lines.append(f"  also fits: {better.label} ({_gib(better.per_card)} per card)"
                             + (f", with backend: {other}" if other else "; no backend offers it yet"))
        lines.append("")
    for profile, path in measured or []:
        strategy = strategy_for_options(backend, options or {}, profile.cards)
        e = estimate(model, settings, strategy, profile.cards)
        if profile.fits and profile.peak_nvml_bytes:
            percent = round(100 * (e.per_card / profile.peak_nvml_bytes - 1))
            lines.append(f"measured   {profile.gpu_name} ×{profile.cards}: peak {_gib(profile.peak_nvml_bytes)} per "
                         f"worker (NVML, calibration {profile.created_at or '?'}); estimate for these options "
                         f"({e.label}): {_gib(e.per_card)} ({percent:+d}%) [{path}]")
        else:
            lines.append(f"measured   {profile.gpu_name} ×{profile.cards}: one worker ran out of memory "
                         f"(estimate {_gib(e.per_card)}) [{path}]")
    return "\n".join(lines).rstrip()


def _memory_keys(backend: str) -> set[str]:
    return {key for entry in BACKEND_STRATEGIES.get(backend, {}).values() if entry for key in entry[0]}


def measured_profiles(manifest) -> list:
    """Calibration profiles of this manifest's settings (any GPU, any card count) with their paths."""
    from .sizing import Profile, profile_key
    folder = Path(manifest.output_dir) / ".sweep" / "profiles"
    if not folder.is_dir():
        return []
    mine = {k: v for k, v in profile_key(manifest, "", 1).items() if k not in ("gpu", "cards")}
    found = []
    for path in sorted(folder.glob("*.json")):
        try:
            profile = Profile.from_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError):
            continue
        if {k: v for k, v in profile.key.items() if k not in ("gpu", "cards")} == mine:
            found.append((profile, os.path.relpath(path)))
    return found


# --------------------------------------------------------------------------------------------------
# Download (only when asked)

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def remove_broken(folder: Path) -> list[str]:
    """Delete the weight files `inspect` finds truncated or unreadable (and the hub client's record of
    them, which would otherwise make it keep them), so a download fetches them again."""
    try:
        checkpoint = inspect(folder)
    except CheckpointError:
        return []
    removed = []
    for problem in checkpoint.problems:
        rel, what = problem.where, problem.what
        path = folder / rel
        if what.startswith("missing") or not path.is_file() or path.suffix not in WEIGHT_SUFFIXES:
            continue
        path.unlink()
        record = folder / ".cache" / "huggingface" / "download" / f"{rel}.metadata"
        if record.is_file():
            record.unlink()
        removed.append(rel)
    return removed


def download(repo_id: str, to: str | os.PathLike, revision: str | None = None,
             say: Callable[[str], None] = print) -> Checkpoint | None:
    """`huggingface_hub.snapshot_download(repo_id, local_dir=to)`: resumable (an interrupted file goes
    on where it stopped), files already complete are skipped; then the result is verified."""
    if not REPO_ID.match(repo_id or ""):
        raise CheckpointError(f"`{repo_id}` is not a hub repository id: write owner/name, e.g. "
                              "Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    target = Path(to).expanduser()
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"--to {target} is a file; give a folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError("huggingface_hub is not installed: pip install huggingface_hub "
                              "(it comes with diffusers)") from None
    if target.is_dir():
        for rel in remove_broken(target):
            say(f"removed broken {rel} (it is fetched again)")
    say(f"downloading {repo_id}" + (f"@{revision}" if revision else "") + f" into {target} (resumable) …")
    try:
        snapshot_download(repo_id=repo_id, local_dir=str(target), revision=revision)
    except KeyboardInterrupt:
        raise DownloadError(f"download of {repo_id} interrupted; what arrived is kept in {target}: run the "
                            "same command again to resume") from None
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise DownloadError(f"download of {repo_id} into {target} failed: {type(exc).__name__}: {reason}\n"
                            "What arrived is kept; run the same command again to resume (check the repository "
                            "id, your network, and `hf auth login` for gated repositories)") from None
    if detect_layout(target) is None:
        say(f"downloaded {repo_id} into {target}; it is not a checkpoint layout `models status` knows, so it "
            "was not checked")
        return None
    return verify(target)
