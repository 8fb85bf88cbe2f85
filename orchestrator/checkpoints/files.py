"""Weight files read by their headers only: safetensors JSON headers and torch.save archives'
pickled indexes (with an unpickler that runs no code); the byte sizes of dtypes.

The one reader of weight-file headers: the checkpoint checks use the flat names (`tensors`), the
diffsynth backend's fingerprint the state dict as the file nests it (`tree`)."""
from __future__ import annotations

import json
import math
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..errors import WanSweepError


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


class CheckpointError(WanSweepError, RuntimeError):
    """A checkpoint that cannot be used as it is; the message names each file and the fix."""


class DownloadError(CheckpointError):
    """A download that did not finish (the hub unreachable, a wrong id); what arrived is kept."""

    exit_code = 1  # not the command's fault: the same command may well work later

# --------------------------------------------------------------------------------------------------
# Reading weight files: headers only


@dataclass
class WeightFile:
    path: Path
    size: int  # bytes on disk
    tensors: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)  # name → (dtype, shape)
    note: str = ""  # what could not be read (not a problem for verification)
    # The same tensors nested as the file's state dict nests them (a .pth may hold dicts in dicts,
    # which `tensors` flattens to dotted names): name → (dtype, shape) or a dict of the same. None
    # where the contents were not read (a legacy or exotic .pth) or hold no dict.
    tree: dict | None = None

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
    return WeightFile(path, size, tensors, tree=dict(tensors))  # safetensors are flat


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
        if module.startswith("torch") and name == "_rebuild_from_type_v2":  # a tensor with Python state
            return lambda func, new_type, args, state: func(*args)
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


def _tree(obj, check, prefix: str = ""):
    """An unpickled state dict's dicts and tensors, nested as in the file (name → (dtype, shape));
    `check(dotted name, storage)` sees each tensor."""
    if isinstance(obj, _TensorRef):
        if obj.storage is None or obj.shape is None:
            return None
        check(prefix, obj.storage)
        return (obj.storage.dtype, obj.shape)
    if not isinstance(obj, dict):
        return None
    tree = {}
    for key, value in obj.items():
        found = _tree(value, check, f"{prefix}.{key}" if prefix else str(key))
        if found is not None:
            tree[str(key)] = found
    return tree


def flatten(tree: dict, prefix: str = "") -> Iterable[tuple[str, tuple[str, tuple[int, ...]]]]:
    """(dotted name, (dtype, shape)) of each tensor of a nested `WeightFile.tree`."""
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            yield from flatten(value, name)
        else:
            yield name, value


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

        def check(name: str, storage: _Storage) -> None:
            member = f"{prefix}data/{storage.key}"
            if member not in entries:
                raise _Broken(f"storage {storage.key} of tensor {name!r} is missing from the archive")
            needed = storage.numel * ST_BYTES.get(storage.dtype, 1)
            if entries[member].file_size < needed:
                raise _Broken(f"storage {storage.key} of tensor {name!r} holds {entries[member].file_size} "
                              f"bytes, {needed} needed")
        tree = _tree(root, check)
        if isinstance(tree, tuple):  # a file holding one bare tensor
            result.tensors[""] = tree
        elif tree is not None:
            result.tree = tree
            result.tensors.update(flatten(tree))
    return result


def read_weight_file(path: Path) -> WeightFile:
    return read_safetensors(path) if path.suffix == ".safetensors" else read_pth(path)
