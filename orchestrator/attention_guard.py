"""The attention kernel guard: before a worker's first job, the attention kernel it will actually use is
run once on small Wan-shaped inputs on its own card and compared with torch SDPA's math kernel in float32.
A kernel outside its bound stops the worker (a message naming the kernel, its version, the error and the
fix); under `speed.attention: auto` a failing kernel is skipped instead and the worker switched to the next
kernel that passes, so `auto` never runs a kernel that failed. The result goes into the worker's log and,
through `backend.load_info["attention_guard"]`, into every sidecar (under `load`).

Why: a broken build of a fast kernel does not fail, it draws noise. SageAttention 2.2.0's sm90 kernel
gave "confetti" on Wan2.2 (SageAttention #320, diffusers #12783) and DiffSynth's `auto` picks SageAttention
whenever it is importable, so without a check a sweep of hundreds of videos could be spoiled silently.

The inputs (`wan_like_inputs`): [1, the model's heads, 3120 tokens, its head dim] on a GPU (3120 = two
latent frames at 480p, 2×30×52: Wan-shaped, and not a multiple of the kernels' 64/128-token tiles, so a
tile's tail is checked too); on the CPU 520 tokens and at most 4 heads (CPU SDPA is slow; the CPU runs
tests and tiny models). Keys carry a per-channel offset, as Wan's keys do, which is what SageAttention's
smoothing of K exists for. The reference is SDPA's math kernel in float32 on the same (rounded) inputs,
so the error is the kernel's own, not the rounding of its inputs.

The error (`block_error`): relative L2 (‖out − ref‖ / ‖ref‖) of each block of 64 query tokens of each
head, the worst block. A bug confined to a tile (a tail, one head) is then as visible as one everywhere:
24 garbage rows among 3120 raise the overall relative L2 to only 0.13, their block's to ~1.

The bounds, from measurements (CPU, torch 2.14; 4 heads × 3120 tokens × 128, bf16 inputs):
  - bf16/fp16/fp32 kernels (SDPA math, flash, efficient, cuDNN; flash-attn): healthy ones give 1.7e-3
    (math in bf16) to 2.2e-3 (CPU flash) worst-block error: output rounding to bf16 (2^-9). Bound 0.02.
  - 8-bit kernels (SageAttention: int8 Q·K, fp8 or fp16 P·V): an emulation of Sage2's quantization (int8
    Q per 128 and K per 64 tokens after smoothing K, P and V in fp8 e4m3) gives 0.042 overall, 0.050
    worst block; Sage2's own finer (per-thread) granularity should do better. Its authors report cosine
    similarity > 0.99 on real layers, i.e. relative L2 < ~0.14. Bound 0.1: twice the emulated healthy
    error, and ten times below a broken kernel (random output: 1.0-1.4; the sm90 confetti: O(1)).
Measured on a card: not yet (docs/benchmarks.md will hold Sage2's figures on the H100/H200).

Cost: one call of the kernel and one float32 math reference (in chunks of 8 heads, so ≤ 0.3 GB on a
card); on the CPU about 0.1 s at the tiny model's shape, on a GPU milliseconds (the first call of a
Triton kernel compiles it: seconds, once).
"""
from __future__ import annotations

import importlib.metadata
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger(__name__)

EXACT_BOUND = 0.02  # bf16/fp16/fp32 kernels: healthy 2e-3 (see the module docstring)
EIGHT_BIT_BOUND = 0.1  # int8/fp8 kernels (SageAttention): emulated healthy 0.05, broken ~1
BLOCK_TOKENS = 64
GPU_TOKENS = 3120  # two latent frames at 480p (2 × 30 × 52)
CPU_TOKENS, CPU_MAX_HEADS = 520, 4
REFERENCE_HEADS_PER_CHUNK = 8
SDPA_ORDER = ("cudnn", "flash", "efficient", "math")  # the fallbacks of `auto`, fastest first on Hopper
SDPA_NAMES = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn"}  # torch's SDPBackend values
SAGE_FIX = ("use speed.attention: cudnn (or auto), or install a fixed SageAttention build: "
            "bench/build_sageattention.sh builds commit d1a57a5, after the sm90 fix (SageAttention #320)")
SDPA_FIX = "use another speed.attention (auto, cudnn, flash, efficient or math), or another torch build"


class AttentionKernelFailed(RuntimeError):
    """The attention kernel a worker would use computes wrong attention on its card."""


@dataclass
class Kernel:
    """One attention kernel as a worker would call it. `run(q, k, v)` takes and returns [batch, heads,
    tokens, head_dim]; `use()` switches the worker to it (a fallback of `auto`; None for the kernel already
    in use)."""
    name: str
    version: str
    run: Callable
    eight_bit: bool = False
    fix: str = SDPA_FIX
    use: Callable[[], None] | None = None

    @property
    def bound(self) -> float:
        return EIGHT_BIT_BOUND if self.eight_bit else EXACT_BOUND


@dataclass
class Plan:
    """What a loaded backend will run: `kernels[0]` is the kernel in use; with `auto`, the rest are what it
    may fall back to, in order."""
    kernels: list[Kernel]
    auto: bool
    heads: int
    head_dim: int
    dtype: object  # torch.dtype
    device: object  # torch.device or str
    notes: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Measuring one kernel


def shape_for(heads: int, head_dim: int, device) -> tuple[int, int, int, int]:
    if str(device).startswith("cuda"):
        return (1, heads, GPU_TOKENS, head_dim)
    return (1, min(heads, CPU_MAX_HEADS), CPU_TOKENS, head_dim)


def wan_like_inputs(shape, dtype, device, seed: int = 0):
    """q, k, v of `shape` in `dtype` on `device`: normal, q scaled by 1.5 (attention a little peaked) and
    k with a per-channel offset (Wan's keys have one). Drawn on the CPU, so every card gets the same."""
    import torch
    generator = torch.Generator().manual_seed(seed)
    batch, heads, tokens, dim = shape
    q = torch.randn(shape, generator=generator) * 1.5
    k = torch.randn(shape, generator=generator) + 2 * torch.randn((batch, heads, 1, dim), generator=generator)
    v = torch.randn(shape, generator=generator)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def math_reference(q, k, v):
    """SDPA's math kernel in float32, a few heads at a time (the attention matrix of all heads at once would
    take 1.5 GB on a card at 40 heads)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    parts = []
    with sdpa_kernel([SDPBackend.MATH]):
        for start in range(0, q.shape[1], REFERENCE_HEADS_PER_CHUNK):
            chunk = slice(start, start + REFERENCE_HEADS_PER_CHUNK)
            parts.append(F.scaled_dot_product_attention(q[:, chunk].float(), k[:, chunk].float(), v[:, chunk].float()))
    return torch.cat(parts, dim=1)


def block_error(out, reference, block: int = BLOCK_TOKENS) -> tuple[float, float]:
    """(worst, overall) relative L2 error: the worst block of `block` query tokens of any head, and all."""
    import torch.nn.functional as F
    diff = (out.float() - reference).pow(2)
    ref = reference.pow(2)
    batch, heads, tokens, dim = diff.shape
    pad = (-tokens) % block
    per_block = lambda t: F.pad(t, (0, 0, 0, pad)).reshape(batch, heads, -1, block * dim).sum(-1)  # noqa: E731
    worst = (per_block(diff) / per_block(ref).clamp_min(1e-30)).sqrt().max()
    overall = (diff.sum() / ref.sum()).sqrt()
    return float(worst), float(overall)


def measure(kernel: Kernel, shape, dtype, device) -> dict:
    """Run `kernel` once on Wan-like inputs and compare it with float32 math: the record of the check
    (`error` is the worst block's relative L2; NaN counts as failing)."""
    import math
    import torch
    started = time.perf_counter()
    q, k, v = wan_like_inputs(shape, dtype, device)
    with torch.no_grad():
        out = kernel.run(q, k, v)
        reference = math_reference(q, k, v)
        worst, overall = block_error(out, reference)
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    passed = math.isfinite(worst) and worst <= kernel.bound
    return {"kernel": kernel.name, "version": kernel.version, "error": _round(worst),
            "error_overall": _round(overall), "bound": kernel.bound, "passed": passed,
            "shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "device": _device_name(device),
            "seconds": round(time.perf_counter() - started, 4)}


def _round(value: float) -> float:
    return float(f"{value:.3g}")


def _device_name(device) -> str:
    if str(device).startswith("cuda"):
        import torch
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm{major}{minor})"
    return str(device)


def failure_message(record: dict, kernel: Kernel) -> str:
    return (f"attention kernel {kernel.name} ({kernel.version}) is wrong on {record['device']}: worst relative L2 "
            f"error {record['error']:.3g} (overall {record['error_overall']:.3g}) against float32 math on "
            f"Wan-shaped inputs {record['shape']} in {record['dtype']}, bound {kernel.bound}; fix: {kernel.fix}")


# --------------------------------------------------------------------------------------------------
# Guarding a worker


def protect(plan: Plan, slot_log: logging.Logger | None = None) -> dict:
    """Check the plan's kernel in use; under `auto`, a kernel that fails (or raises) is skipped and the next
    one that passes is put in use (`Kernel.use`). Returns the record of the kernel in use, with the skipped
    ones under `skipped`. Raises AttentionKernelFailed when the chosen kernel (or, under auto, every one) fails."""
    slot_log = slot_log or log
    shape = shape_for(plan.heads, plan.head_dim, plan.device)
    skipped: list[dict] = []
    for position, kernel in enumerate(plan.kernels):
        try:
            record = measure(kernel, shape, plan.dtype, plan.device)
        except Exception as exc:  # a kernel that cannot run these inputs (not built for this card, …)
            record = {"kernel": kernel.name, "version": kernel.version, "passed": False,
                      "raised": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
            if position == 0 and not plan.auto:
                raise AttentionKernelFailed(f"attention kernel {kernel.name} ({kernel.version}) failed on "
                                            f"{_device_name(plan.device)}: {record['raised']}; fix: {kernel.fix}") from exc
        if record["passed"]:
            if position and kernel.use is not None:
                kernel.use()
            record = {**record, **plan.notes, **({"skipped": skipped} if skipped else {})}
            record.pop("passed")
            slot_log.info("attention guard: %s (%s) within bound on %s: error %.3g ≤ %s (%s, %.3f s)%s",
                          kernel.name, kernel.version, record["device"], record["error"], record["bound"],
                          "x".join(map(str, record["shape"])), record["seconds"],
                          "; skipped " + ", ".join(s["kernel"] for s in skipped) if skipped else "")
            return record
        if not plan.auto:
            raise AttentionKernelFailed(failure_message(record, kernel))
        reason = record.get("raised") or failure_message(record, kernel)
        slot_log.warning("attention guard: auto skips %s: %s", kernel.name, reason)
        skipped.append({k: record[k] for k in ("kernel", "version", "error", "bound", "raised") if k in record})
    raise AttentionKernelFailed("attention: auto found no attention kernel within bound on "
                                f"{_device_name(plan.device)}: " + "; ".join(
                                    f"{s['kernel']} ({s.get('raised') or s.get('error')})" for s in skipped))


NO_ATTENTION = {"kernel": "none", "why": "this backend runs no attention kernel of its own in this process"}


def guard_backend(backend, slot_log: logging.Logger | None = None) -> dict:
    """The guard of a loaded backend (`harness.open_backend`, before the first job): the backend's
    `attention_plan()` checked by `protect`, the record put in `load_info["attention_guard"]`. A backend
    without an attention plan (synthetic, command: no attention in this process) records "none"."""
    planner = getattr(backend, "attention_plan", None)
    plan = planner() if planner is not None else None
    record = protect(plan, slot_log) if plan is not None else dict(NO_ATTENTION)
    backend.load_info["attention_guard"] = record
    return record


# --------------------------------------------------------------------------------------------------
# The kernels the library backends run


def package_version(name: str) -> str:
    try:
        return f"{name} {importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{name} (not installed)"


def torch_version(sdpa: str = "") -> str:
    import torch
    text = f"torch {torch.__version__}"
    if sdpa == "cudnn" and torch.backends.cudnn.is_available():
        text += f", cuDNN {torch.backends.cudnn.version()}"
    return text


def sdpa_choice(shape, dtype, device) -> str | None:
    """The kernel torch SDPA picks on its own for these inputs (cudnn, flash, efficient, math), or None
    when torch does not say (`torch._fused_sdp_choice`, private)."""
    import torch
    q, k, v = wan_like_inputs(shape, dtype, device)
    try:
        return SDPA_NAMES.get(int(torch._fused_sdp_choice(q, k, v)))
    except Exception:
        return None


def sdpa_run(name: str):
    """torch SDPA restricted to one kernel ("auto": unrestricted)."""
    def run(q, k, v):
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
        if name == "auto":
            return F.scaled_dot_product_attention(q, k, v)
        from .speed import SDPA_BACKENDS
        with sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[name])]):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def sdpa_chain(shape, dtype, device, use: Callable[[str], None], first: Kernel | None = None,
               first_is_sdpa: bool = True, label: str = "sdpa") -> list[Kernel]:
    """`auto`'s kernels: `first` (the library's own pick; None: SDPA's), then, when `first` is not SDPA
    itself, SDPA's own pick, then each other SDPA kernel, fastest first. `use(name)` makes the worker use
    SDPA's kernel `name` ("auto": SDPA's own pick, unrestricted)."""
    chosen = sdpa_choice(shape, dtype, device)
    auto = Kernel(f"{label} auto (SDPA picks {chosen or 'its own'})", torch_version(chosen or ""), sdpa_run("auto"),
                  use=lambda: use("auto"))
    kernels = [first] if first is not None else []
    if first is None or not first_is_sdpa:
        kernels.append(auto)
    kernels += [Kernel(f"{label} {name}", torch_version(name), sdpa_run(name), use=lambda name=name: use(name))
                for name in SDPA_ORDER if name != chosen]
    return kernels


def diffusers_kernel(backend_name: str | None, use: Callable[[], None] | None = None) -> Kernel:
    """A diffusers attention backend as its dispatcher calls it (None: the active one, `native` unless
    DIFFUSERS_ATTN_BACKEND says otherwise). diffusers' layout is [batch, tokens, heads, dim]."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, dispatch_attention_fn
    name = backend_name or _AttentionBackendRegistry.get_active_backend()[0].value
    backend = AttentionBackendName(name)

    def run(q, k, v):
        out = dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                    backend=None if backend_name is None else backend)
        return out.transpose(1, 2)
    sage = "sage" in name
    version = package_version("diffusers") + ", " + (package_version("sageattention") if sage else
                                                     package_version("flash-attn") if "flash" in name and
                                                     not name.startswith("_native") else torch_version())
    return Kernel(f"diffusers {name}", version, run, eight_bit=sage, fix=SAGE_FIX if sage else SDPA_FIX, use=use)


def diffsynth_pick() -> str:
    """Which kernel DiffSynth's Wan DiT calls (`wan_video_dit.flash_attention`: flash-attn 3, then 2, then
    SageAttention, each when importable and not turned off, else torch SDPA)."""
    from diffsynth.models import wan_video_dit as dit
    for flag, name in (("FLASH_ATTN_3_AVAILABLE", "flash_attn_3"), ("FLASH_ATTN_2_AVAILABLE", "flash_attn_2"),
                       ("SAGE_ATTN_AVAILABLE", "sage")):
        if getattr(dit, flag, False):
            return name
    return "sdpa"


def diffsynth_kernel(sdpa: str) -> Kernel:
    """DiffSynth's own attention function as its DiT calls it, under the worker's SDPA restriction `sdpa`
    (layout [batch, tokens, heads × dim])."""
    from diffsynth.models import wan_video_dit as dit
    from .speed import sdpa_kernel
    picked = diffsynth_pick()

    def run(q, k, v):
        heads = q.shape[1]
        flat = lambda t: t.transpose(1, 2).flatten(2)  # noqa: E731
        with sdpa_kernel(sdpa):
            out = dit.flash_attention(flat(q), flat(k), flat(v), num_heads=heads)
        return out.unflatten(2, (heads, -1)).transpose(1, 2)
    version = {"flash_attn_3": "flash-attn 3 (flash_attn_interface)", "flash_attn_2": package_version("flash-attn"),
               "sage": package_version("sageattention")}.get(picked, torch_version(sdpa))
    name = f"diffsynth {picked}" + (f" ({sdpa})" if picked == "sdpa" else "")
    return Kernel(name, f"{package_version('diffsynth')}, {version}", run, eight_bit=picked == "sage",
                  fix=SAGE_FIX if picked == "sage" else SDPA_FIX)
