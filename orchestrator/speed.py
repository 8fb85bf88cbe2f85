"""Speed settings (the manifest's `speed:`): what each key does to the denoiser, which ones change the
pictures, and the shared compile cache.

    compile:   none | blocks | full       torch.compile of the repeated transformer blocks (regional
                                          compilation, diffusers' `compile_repeated_blocks`) or of the
                                          whole denoiser
    attention: auto | cudnn | flash | efficient | math | sage | <a diffusers attention backend>
                                          torch SDPA's kernel (auto: torch's own choice, cuDNN on
                                          Hopper; DiffSynth's own: flash-attn or SageAttention when
                                          installed), SageAttention 2 (`sage`: 8-bit Q·K, both
                                          backends; sm80 or newer), or diffusers'
                                          `set_attention_backend` (_sage_qk_int8_pv_fp16_cuda, …).
                                          Whichever kernel a worker runs is checked on its card before
                                          its first job (orchestrator/attention_guard.py)
    quantize:  none | fp8 | int8 | fp8_storage
                                          fp8: torchao fp8 weights (per row) and dynamic fp8
                                          activations on the blocks' Linear layers (speed; Ada,
                                          Hopper or newer); int8: torchao 8-bit weights (memory:
                                          a model that does not fit in bf16); fp8_storage: weights
                                          stored in fp8 and computed in the model's dtype (memory)
    cache:     none | {METHOD: VALUE} | {METHOD: {OPTION: VALUE, …}}
                                          a step cache (manifest.model.CACHE_METHODS): diffusers'
                                          hooks first_block, taylorseer, magcache, faster_cache, pab
                                          (orchestrator/backends/diffusers_caches.py); DiffSynth's own
                                          teacache

Identity: a key that changes the pictures beyond run-to-run noise is part of every job's identity, so
a changed value is detected like a changed generation setting and old and new videos are never mixed.
  quantize   yes: the weights themselves are rounded (to 8 bits), a different model in effect.
  compile    no: the same arithmetic, fused; its drift from eager is that of two eager runs on different
             kernels (0.4% relative L2 on the H200, docs/benchmarks.md), recorded in each sidecar.
  attention  no: each kernel computes exact attention; differences are rounding, recorded in the sidecar.
  cache      yes: a reused step is an approximation of the step it replaces; every sidecar also counts
             the steps and blocks computed and reused.

The backends (diffusers, diffsynth) call `apply_to_denoiser` once per denoiser after loading; the
worker calls `use_compile_cache` before the backend loads and holds `first_call_lock` around its first
job, so that of a machine's workers only one compiles and the others load its kernels from the cache.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from .manifest import SDPA_ATTENTION, SpeedConfig  # noqa: F401  (SDPA_ATTENTION: re-exported for the backends)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

IDENTITY_KEYS = ("quantize", "cache")  # the keys that change pictures (see the module docstring)
SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}
# diffusers' names for the same torch SDPA kernels (its `set_attention_backend`)
DIFFUSERS_SDPA = {"cudnn": "_native_cudnn", "flash": "_native_flash", "efficient": "_native_efficient",
                  "math": "_native_math"}
FP8_MIN_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada (8.9), Hopper (9.0) and newer
SAGE_MIN_CAPABILITY = (8, 0)  # SageAttention 2's CUDA kernels: sm80 (A100/A800), sm86, sm89, sm90, sm120
SAGE_MIN_VERSION = "2"
SAGE_INSTALL = ("SageAttention 2 is not on PyPI (PyPI's sageattention 1.x is the older Triton one): build its "
                "wheel on the GPU machine with bench/build_sageattention.sh (a pinned commit with the sm90 "
                "fix, for that machine's card), then `python -m pip install --no-deps sageattention-*.whl`; "
                "or use attention: auto or cudnn")


def identity(speed: SpeedConfig) -> dict:
    """The speed settings that belong in a job's identity; empty for the defaults, so a manifest
    without `speed:` keeps the job ids it always had."""
    return {key: getattr(speed, key) for key in IDENTITY_KEYS if getattr(speed, key) != getattr(SpeedConfig(), key)}


def describe(speed: SpeedConfig) -> str:
    return (f"compile {speed.compile}, attention {speed.attention}, quantize {speed.quantize}"
            + (f", cache {speed.cache}" if speed.cache != "none" else ""))


# The step caches each backend runs (`speed.cache`); a method of another backend is refused at its line.
CACHES_BY_BACKEND = {"diffusers": ("first_block", "taylorseer", "magcache", "faster_cache", "pab"),
                     "diffsynth": ("teacache",)}
# Caches whose skip schedule is fixed (a step count, not a measured change): their speed on random
# weights is their real speed; the adaptive ones' skips follow what the weights compute.
FIXED_SCHEDULE_CACHES = ("taylorseer", "faster_cache", "pab")


def cache_backend_problem(speed: SpeedConfig, backend: str) -> str | None:
    """Why `backend` cannot run `speed.cache`'s method, or None."""
    method = speed.cache_method[0]
    if method == "none" or method in CACHES_BY_BACKEND.get(backend, ()):
        return None
    ours = CACHES_BY_BACKEND.get(backend, ())
    others = [name for name, methods in CACHES_BY_BACKEND.items() if method in methods]
    return (f"speed.cache {method} is not a cache of the {backend} backend"
            + (f" (it is {', '.join(others)}'s)" if others else "")
            + (f"; it has: {', '.join(ours)}" if ours else "; it has none"))


def needs_torchao(speed: SpeedConfig) -> bool:
    return speed.quantize in ("fp8", "int8")


def torchao_missing(speed: SpeedConfig) -> str | None:
    """Why the quantize setting cannot run here (torchao missing), or None."""
    import importlib.util
    if needs_torchao(speed) and importlib.util.find_spec("torchao") is None:
        return f"speed.quantize {speed.quantize} needs torchao, which is not installed"
    return None


def cards_below(cards: list[tuple[str, tuple[int, int] | None]], minimum: tuple[int, int]) -> list[str]:
    """The cards of a compute capability under `minimum`, each as `NAME (compute capability X.Y)`."""
    return [f"{name} (compute capability {cc[0]}.{cc[1]})" for name, cc in cards
            if cc is not None and tuple(cc) < minimum]


def fp8_card_problem(cards: list[tuple[str, tuple[int, int] | None]]) -> str | None:
    """Why fp8 compute cannot run on these cards ((name, compute capability) each), or None."""
    if not cards:
        return ("speed.quantize fp8 needs an fp8-capable NVIDIA card (Ada, Hopper or newer), and this "
                "machine has none")
    slow = cards_below(cards, FP8_MIN_CAPABILITY)
    if slow:
        return (f"speed.quantize fp8 needs fp8 tensor cores (Ada, Hopper or newer, compute capability ≥ 8.9); "
                f"{', '.join(sorted(set(slow)))} has none")
    return None


def is_sage(attention: str) -> bool:
    """`sage`, or one of diffusers' SageAttention backends (sage_varlen, _sage_qk_int8_pv_fp16_cuda, …)."""
    return attention.lstrip("_").startswith("sage")


def sage_installed_problem() -> str | None:
    """Why SageAttention 2 cannot be imported here (missing, or version 1), or None. From the package's
    metadata: importing it would load CUDA extensions at check time."""
    import importlib.metadata
    from packaging.version import Version
    try:
        version = importlib.metadata.version("sageattention")
    except importlib.metadata.PackageNotFoundError:
        return "speed.attention `sage` cannot run here: it needs SageAttention 2 (`sageattention` ≥ 2), which is not installed"
    if Version(version) < Version(SAGE_MIN_VERSION):
        return (f"speed.attention `sage` cannot run here: it needs SageAttention 2 (`sageattention` ≥ 2); {version} is installed (the "
                "Triton SageAttention 1, without the 8-bit kernels of 2)")
    return None


def sage_card_problem(cards: list[tuple[str, tuple[int, int] | None]]) -> str | None:
    """Why SageAttention 2 cannot run on these cards ((name, compute capability) each), or None."""
    if not cards:
        return ("speed.attention `sage` cannot run here: it runs on NVIDIA cards (compute capability ≥ 8.0), and "
                "this machine has none")
    old = cards_below(cards, SAGE_MIN_CAPABILITY)
    if old:
        return (f"speed.attention `sage` cannot run here: it needs compute capability ≥ 8.0 (Ampere or newer); "
                f"{', '.join(sorted(set(old)))} is older")
    return None


def sage_problem(cards: list[tuple[str, tuple[int, int] | None]] | None) -> tuple[str, str] | None:
    """(message, fix) when `speed.attention` sage cannot run: not installed, or the cards (None: not known
    here, as a Ray cluster's, checked by each worker's guard when it loads); else None."""
    missing = sage_installed_problem()
    if missing:
        return missing, SAGE_INSTALL
    why = sage_card_problem(cards) if cards is not None else None
    if why:
        return why, "use attention: auto, cudnn or flash on these cards"
    return None


def selected_cards(manifest) -> list[tuple[str, tuple[int, int] | None]] | None:
    """This machine's cards as `resources.gpus` selects them, (name, compute capability) each; None under
    the Ray executor (the cluster's cards are not this machine's)."""
    if manifest.execution.executor == "ray":
        return None
    from . import gpus
    try:
        found = gpus.discover()
    except gpus.NoGpus:
        found = []
    wanted = manifest.resources.gpus
    return [(g.name, g.compute_capability) for g in found if wanted == "all" or g.index in wanted]


def sage_manifest_problem(manifest) -> tuple[str, str] | None:
    """(message, fix) when the manifest's `speed.attention` is SageAttention and cannot run here, else None."""
    if not is_sage(manifest.model.speed.attention):
        return None
    return sage_problem(selected_cards(manifest))


# --------------------------------------------------------------------------------------------------
# Applying the settings to a loaded denoiser


def apply_to_denoiser(denoiser: "torch.nn.Module", blocks: list["torch.nn.Module"], speed: SpeedConfig, *,
                      compute_dtype: "torch.dtype", library: str = "diffusers") -> dict:
    """Quantize, choose the attention kernel and compile, in that order (torchao's weights must be in
    place before compile traces them). `blocks` are the denoiser's repeated transformer blocks.
    Returns what was done and how long it took, for the load record (compile itself happens lazily,
    at the first call)."""
    started = time.perf_counter()
    done: dict = {"compile": speed.compile, "attention": speed.attention, "quantize": speed.quantize}
    if speed.quantize != "none":
        done["quantized_layers"] = quantize(denoiser, blocks, speed.quantize, compute_dtype, library)
    if speed.attention != "auto" and library == "diffusers":
        denoiser.set_attention_backend(DIFFUSERS_SDPA.get(speed.attention, speed.attention))
    if speed.compile == "blocks":
        for block in blocks:
            block.compile(fullgraph=True)
        done["compiled_modules"] = len(blocks)
    elif speed.compile == "full":
        denoiser.compile(fullgraph=True)
        done["compiled_modules"] = 1
    done["apply_seconds"] = round(time.perf_counter() - started, 3)
    return done


# The cross-attention's key and value projections read the text (and, for Wan2.1 I2V, the image)
# context: 512 (+257) tokens against the 32,760 of a 480p video, so fp8 buys nothing there: they keep
# the model's dtype under `quantize: fp8`. Names: diffusers' WanTransformerBlock, DiffSynth's DiTBlock.
TEXT_CONTEXT_LAYERS = ("attn2.to_k", "attn2.to_v", "attn2.add_k_proj", "attn2.add_v_proj",
                       "cross_attn.k", "cross_attn.v", "cross_attn.k_img", "cross_attn.v_img")


FP8_ACTIVATION_AMAX_FLOOR = 1e-12  # far below any real activation's row maximum in bf16


def fp8_config():
    """torchao's fp8 config of `quantize: fp8`: fp8 weights per row, activations quantized per row at run
    time. A row of zeros (the text context's padding, or a zero-bias layer's output for it) has an amax
    of 0, so torchao's per-row scale would be 0 and the row 0/0 = NaN (what made DiffSynth's frames NaN
    on the H200, bench/gpu_fp8_zero_rows.py): the floor gives such a row a tiny scale instead."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), activation_value_lb=FP8_ACTIVATION_AMAX_FLOOR)


def fp8_layers(module, name: str) -> bool:
    """Whether `quantize: fp8` turns this layer of a block (`name` relative to the block) into fp8."""
    import torch
    return isinstance(module, torch.nn.Linear) and not name.endswith(TEXT_CONTEXT_LAYERS)


def quantize(denoiser, blocks, mode: str, compute_dtype, library: str) -> int:
    """Replace the blocks' Linear weights: torchao's tensor subclasses (fp8, int8), or fp8 storage with
    the model's dtype for compute. Returns the number of Linear layers changed."""
    import torch
    linears = [m for block in blocks for m in block.modules() if isinstance(m, torch.nn.Linear)]
    if mode in ("fp8", "int8"):
        from torchao.quantization import quantize_
        if mode == "fp8":
            # checked before the start on this machine's cards; a Ray actor's card is checked here
            card = (torch.cuda.get_device_name(), torch.cuda.get_device_capability()) if torch.cuda.is_available() \
                else None
            why = fp8_card_problem([card] if card else [])
            if why:
                raise RuntimeError(why)
            config = fp8_config()
        else:
            from torchao.quantization import Int8WeightOnlyConfig
            config = Int8WeightOnlyConfig()
        chosen = fp8_layers if mode == "fp8" else (lambda module, name: isinstance(module, torch.nn.Linear))
        for block in blocks:
            quantize_(block, config, filter_fn=chosen)
        return sum(1 for block in blocks for name, m in block.named_modules() if chosen(m, name))
    if mode == "fp8_storage":
        if library == "diffusers":
            # diffusers' layerwise casting (its own skip list keeps norms and embeddings in full precision)
            denoiser.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)
            return sum(1 for m in denoiser.modules() if isinstance(m, torch.nn.Linear)
                       and m.weight.dtype == torch.float8_e4m3fn)
        for layer in linears:
            _store_in_fp8(layer, compute_dtype)
        return len(linears)
    raise ValueError(f"unknown quantize mode {mode!r}")


def _store_in_fp8(layer, compute_dtype) -> None:
    """Keep a Linear layer's weight in float8 and cast it to `compute_dtype` for each call (what
    diffusers' layerwise casting does, for a model that is not a diffusers one)."""
    import torch
    layer.weight.data = layer.weight.data.to(torch.float8_e4m3fn)

    def upcast(module, args):
        module.weight.data = module.weight.data.to(compute_dtype)

    def downcast(module, args, output):
        module.weight.data = module.weight.data.to(torch.float8_e4m3fn)
    layer.register_forward_pre_hook(upcast)
    layer.register_forward_hook(downcast)


@contextlib.contextmanager
def sdpa_kernel(attention: str) -> Iterator[None]:
    """torch SDPA restricted to one kernel (for a library that calls SDPA itself, as DiffSynth does)."""
    if attention not in SDPA_BACKENDS:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel as restrict
    with restrict([getattr(SDPBackend, SDPA_BACKENDS[attention])]):
        yield


# --------------------------------------------------------------------------------------------------
# One compile cache per machine


def compile_cache_dir(output_dir: str | os.PathLike) -> Path:
    """The inductor cache of this machine's workers of a sweep: under `.sweep/`, one per host (kernels
    are built for the host's GPUs and compiler; a sweep's folder may be shared between machines)."""
    return Path(output_dir) / ".sweep" / "compile_cache" / socket.gethostname()


def use_compile_cache(folder: str | os.PathLike) -> Path:
    """Point torch's inductor (and its FX graph and autograd caches) at `folder`; call before the first
    compile. It replaces any TORCHINDUCTOR_CACHE_DIR already set: importing diffusers' attention
    dispatch writes torch's per-user default into the environment, which the workers would inherit,
    so an inherited value cannot be told from a user's choice; the sweep's cache is this one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return folder


@contextlib.contextmanager
def first_call_lock(folder: str | os.PathLike | None) -> Iterator[float]:
    """Held around a worker's first compiled call: the first worker of the machine compiles and fills
    the cache; the others wait for it (yields the seconds waited) and then find its kernels there,
    instead of all compiling the same graphs at once."""
    if folder is None:
        yield 0.0
        return
    path = Path(folder) / "first_call.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        started = time.monotonic()
        fcntl.flock(handle, fcntl.LOCK_EX)
        waited = time.monotonic() - started
        if waited > 1:
            log.info("waited %.0fs for another worker to compile; its kernels are in %s", waited, folder)
        try:
            yield waited
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
