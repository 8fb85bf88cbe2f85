"""What fits where: one worker's GPU memory per strategy from the checkpoint's parameter bytes and
the generation settings, for this machine's GPUs or ones named on the command line."""
from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass

from ..gpus import NoGpus, discover
from ..sizing.profiles import ProfileCache, profile_key, profiles_folder
from .files import GIB, RUN_BYTES, CheckpointError
from .layouts import Checkpoint, _count, _table

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
    vace_layers: int = 0  # VACE blocks beside the DiT's (their hints are held through the forward pass)


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
    if name.startswith("audio_encoder"):
        return "audio"
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
            part.vace_layers = len({key.split(".")[1] for key in tensors if key.startswith("vace_blocks.")})
        elif role == "vae":
            out_conv = _first(tensors, r"decoder\.(conv_out|head\.2)\.weight")
            if out_conv:
                part.channels = int(out_conv[1])
                part.vae_patch = max(1, round(math.sqrt(out_conv[0] / 3)))
            part.spatial = int(config.get("scale_factor_spatial") or 8 * part.vae_patch)
        elif role == "audio":  # wav2vec2: hidden from the feature projection, ffn from the first layer
            projection = _first(tensors, r"(wav2vec2\.)?feature_projection\.projection\.weight")
            part.hidden = int(projection[0]) if projection else int(config.get("hidden_size") or 1024)
            ffn = _first(tensors, r"(wav2vec2\.)?encoder\.layers\.0\.feed_forward\.intermediate_dense\.weight")
            part.ffn = int(ffn[0]) if ffn else int(config.get("intermediate_size") or 4 * part.hidden)
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
            # VACE: each VACE block's hint (tokens × hidden) is kept until its DiT block adds it, and the
            # control stream runs beside the latents (DiffSynth's VaceWanModel, diffusers' WanVACETransformer3DModel)
            hints = p.vace_layers * t * b * p.hidden
            out[p.name] = factor * (t * b * (K_HIDDEN * p.hidden + K_FFN * p.ffn) + hints)
        elif p.role == "audio":
            # Wan2.2-S2V's wav2vec2-large encoder (24 layers, hidden 1024, ffn 4096: DiffSynth's
            # WanS2VAudioEncoder config; about 317M parameters in the release's model.safetensors) runs
            # once per clip on 50 feature frames a second of audio, all 25 hidden states kept
            seconds = settings.frames / 16
            out[p.name] = factor * 50 * seconds * b * (K_HIDDEN * p.hidden + K_FFN * p.ffn + 25 * p.hidden)
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
    # kept on the CPU, but each prompt's encoding runs on the card: DiffSynth's `vram_management:
    # text_encoder` moves the encoder's layers to the card while it has room (its vram_limit, by default
    # the whole card) and back after the prompt, so the card holds it beside the resident DiT
    "text_encoder_swap": "text encoder onto the card per prompt",
    "vae_cpu": "VAE on the CPU",
    "model_offload": "model CPU offload",  # one component on the card at a time
    "device_map": "device_map over {k} cards",  # whole components placed per card
    "fsdp": "FSDP over {k} cards",  # DiT and T5 sharded, sequence parallel (Wan's generate.py)
    "int8": "8-bit weights",  # DiT's and text encoder's linear weights
    "int8_offload": "8-bit + model offload",
    "block_offload": "block offload",  # blocks stream from the CPU, two on the card
}
QUANTIZED = ("int8", "int8_offload")  # strategies that round the weights (`speed: {quantize: int8}`)
PREFERENCE = ("whole", "text_encoder_cpu", "text_encoder_swap", "vae_cpu", "model_offload", "device_map", "fsdp", "int8",
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
    if strategy in ("text_encoder_cpu", "text_encoder_swap", "vae_cpu", "model_offload", "block_offload",
                    "int8_offload"):
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
    if strategy == "text_encoder_swap":
        # the rest resident; the encoder's weights and working set on the card only while it encodes
        resident = of(n for n in weights if roles[n] != "text")
        text = [n for n in weights if roles[n] == "text"]
        swapped = sum(weights[n] + ws[n] for n in text)
        if swapped <= resident.working:
            return resident
        return Estimate(strategy, cards, int(CUDA_CONTEXT + resident.weights + swapped), resident.weights,
                        int(swapped))
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


# What each backend calls a strategy: (model.options, resources[, speed]) — None where it has no such
# switch. The 8-bit strategies are `speed: {quantize: int8}` (torchao 8-bit weights, orchestrator/speed.py).
BACKEND_STRATEGIES: dict[str, dict[str, tuple | None]] = {
    "diffusers": {
        "whole": ({}, {}), "text_encoder_cpu": ({"text_encoder": "cpu"}, {}),
        "model_offload": ({"offload": "model"}, {}), "block_offload": ({"offload": "group"}, {}),
        "device_map": ({"device_map": "balanced"}, {"gpus_per_worker": "{k}", "workers_per_gpu": 1}),
        "int8": ({}, {}, {"quantize": "int8"}), "int8_offload": ({"offload": "model"}, {}, {"quantize": "int8"}),
    },
    "diffsynth": {
        "whole": ({"vram_management": False}, {}), "text_encoder_swap": ({"vram_management": "text_encoder"}, {}),
        "model_offload": ({"vram_management": True}, {}), "block_offload": ({"vram_management": True}, {}),
        "int8": ({"vram_management": "text_encoder"}, {}, {"quantize": "int8"}),
    },
    "command": {
        "whole": ({"offload_model": False}, {}), "text_encoder_cpu": ({"offload_model": False, "t5_cpu": True}, {}),
        "model_offload": ({"offload_model": True}, {}),
        "fsdp": ({"dit_fsdp": True, "t5_fsdp": True}, {"gpus_per_worker": "{k}", "workers_per_gpu": 1}),
    },
}


def strategy_for_options(backend: str, options: dict, cards: int, quantize: str = "none") -> str:
    """Which strategy a manifest's memory options and `speed.quantize` amount to (to set an estimate
    beside a profile): `quantize: int8` is one of the 8-bit strategies, whatever the options."""
    table = BACKEND_STRATEGIES.get(backend, {})
    relevant = {k: v for k, v in options.items()
                if any(k in entry[0] for entry in filter(None, table.values()))}
    for name, entry in table.items():
        entry_quantize = entry[2].get("quantize", "none") if entry is not None and len(entry) > 2 else "none"
        if entry is not None and entry[0] == relevant and entry_quantize == quantize:
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


def _backend_entry(backend: str, strategy: str, k: int) -> tuple[dict, dict, dict] | None:
    """(model.options, resources, speed) of a strategy for a backend, or None where it has none."""
    entry = BACKEND_STRATEGIES.get(backend, {}).get(strategy)
    if entry is None:
        return None
    options, resources, speed = (*entry, {}) if len(entry) == 2 else entry
    resources = {key: (int(v.format(k=k)) if isinstance(v, str) else v) for key, v in resources.items()}
    return dict(options), {"gpus_per_worker": 1, "workers_per_gpu": "auto", **resources}, dict(speed)


def _other_backend(strategy: str) -> str | None:
    for backend, table in BACKEND_STRATEGIES.items():
        if table.get(strategy) is not None:
            return backend
    return None


def fit_report(checkpoint: Checkpoint, settings: Settings, gpus: list[GpuKind], margin_gib: float = 2.0,
               backend: str = "diffusers", options: dict | None = None, measured: list | None = None,
               gpu_note: str | None = None, quantize: str = "none") -> str:
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
            if strategy in ("text_encoder_cpu", "text_encoder_swap") and not any(p.role == "text" for p in model):
                continue
            estimates.append(estimate(model, settings, strategy, k))
    header = ["strategy", "per card", "weights", "working", "host RAM", f"{backend} backend"]
    rows = []
    for e in estimates:
        entry = _backend_entry(backend, e.strategy, e.cards)
        how = (" + ".join(filter(None, ["model.options " + _yaml_flow(entry[0]) if entry[0] else "",
                                         "speed " + _yaml_flow(entry[2]) if entry[2] else ""])) or "(default)") \
            if entry else \
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
            # 8-bit weights change the pictures: an exact strategy that fits is recommended first, the
            # 8-bit one named beside it
            exact = [(e, n) for e, n in here if e.strategy not in QUANTIZED]
            quantized = [(e, n) for e, n in here if e.strategy in QUANTIZED]
            here = exact + quantized
            title = f"{g.name} ×{g.count}"
            if not fitting:
                smallest = min(estimates, key=lambda e: e.per_card)
                lines.append(f"{title}: nothing fits; the smallest is {smallest.label} at {_gib(smallest.per_card)} "
                             f"per card (+ {margin_gib:g} GiB margin)")
                continue
            if here:
                e, n = here[0]
                opts, res, speed = _backend_entry(backend, e.strategy, e.cards)
                lines.append(f"{title}: use {e.label}: {_gib(e.per_card)} per card"
                             + (f", {n} fit per card" if e.cards == 1 else "") + f" (backend {backend})"
                             + (f"; each worker keeps {_gib(e.host)} of weights in host memory" if e.host else ""))
                merged = dict(options or {})
                for key in _memory_keys(backend):
                    merged.pop(key, None)
                merged.update(opts)
                lines += [f"  resources: {_yaml_flow(res)}", "  model:", f"    options: {_yaml_flow(merged)}"]
                if speed:
                    lines.append(f"  speed: {_yaml_flow(speed)}")
            else:
                lines.append(f"{title}: the {backend} backend has no strategy that fits")
            if exact and quantized and exact[0][0].strategy in ("model_offload", "block_offload"):
                e, _ = quantized[0]
                lines.append(f"  also fits: {e.label} ({_gib(e.per_card)} per card) with speed: "
                             f"{_yaml_flow(_backend_entry(backend, e.strategy, e.cards)[2])} and model.options "
                             f"{_yaml_flow(_backend_entry(backend, e.strategy, e.cards)[0])}: faster than streaming "
                             "weights from the CPU, but 8-bit weights change the pictures slightly")
            better = fitting[0][0]
            if here and PREFERENCE.index(better.strategy) < PREFERENCE.index(here[0][0].strategy) or not here:
                other = _other_backend(better.strategy)
                lines.append(f"  also fits: {better.label} ({_gib(better.per_card)} per card)"
                             + (f", with backend: {other}" if other else "; no backend offers it yet"))
        lines.append("")
    for profile, path in measured or []:
        strategy = strategy_for_options(backend, options or {}, profile.cards, quantize)
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
    mine = {k: v for k, v in profile_key(manifest, "", 1).items() if k not in ("gpu", "cards")}
    return [(profile, os.path.relpath(path)) for profile, path in ProfileCache(profiles_folder(manifest)).all()
            if {k: v for k, v in profile.key.items() if k not in ("gpu", "cards")} == mine]
