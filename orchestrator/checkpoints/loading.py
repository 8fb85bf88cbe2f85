"""Loading a diffusers checkpoint's components: each with its own class's `from_pretrained`,
the weight files read ahead in parallel threads, timed one by one."""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

from .files import CheckpointError
from .releases import repair_fix
from .layouts import is_component_spec

log = logging.getLogger(__name__)


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
        raise CheckpointError(f"{path}: unreadable ({exc}); fix: {repair_fix(folder, 'diffusers')}") from None
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
                                  f"fix: {repair_fix(root, 'diffusers')}")
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
    log.debug("%s: loading %s (%.2f GiB of weights); read ahead: %s, parallel: %s", root, ", ".join(wanted),
              sum(sizes.values()) / 2**30, prefetch, parallel)

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
