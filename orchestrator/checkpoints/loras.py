"""LoRA files as the product knows them before any model is loaded: which layout a file is in, which
Linear modules it targets (in Wan's own module names) with which shapes and rank, whether it fits a
checkpoint (from both files' headers only), its content identity, and its tensors renamed to the Wan
layout for DiffSynth's loader.

Two key layouts are read (both libraries load both):
  wan        the original Wan / ComfyUI / lightx2v layout: `diffusion_model.blocks.0.self_attn.q.lora_down.weight`
             [rank, in], `….lora_up.weight` [out, rank], `….alpha`, full deltas `….diff` / `….diff_b`; the
             prefix is optional, `lora_A`/`lora_B` in place of down/up and musubi's `lora_unet_blocks_0_…`
             names are read too
  diffusers  PEFT's layout as diffusers' `save_lora_weights` writes it: `transformer.blocks.0.attn1.to_q.lora_A.weight`
             [rank, in], `….lora_B.weight` [out, rank], `….lora_B.bias`

Module names are compared in Wan's naming (`blocks.0.self_attn.q`, `blocks.0.ffn.0`, `head.head`, …): the
diffusers transformer's names map onto it as diffusers' own converter
(`lora_conversion_utils._convert_non_diffusers_wan_lora_to_diffusers`) maps them; names neither side
knows are kept as they are. No torch at import: only `wan_state_dict` loads tensors.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .files import ST_BYTES, CheckpointError, _Broken, read_safetensors

log = logging.getLogger(__name__)


class LoraFileError(CheckpointError):
    """A LoRA file that cannot be used: `message` says what, `fix` what to do."""

    def __init__(self, message: str, fix: str):
        super().__init__(f"{message}\nfix: {fix}")
        self.message, self.fix = message, fix


# --------------------------------------------------------------------------------------------------
# Module names: diffusers' WanTransformer3DModel ↔ the original Wan DiT (DiffSynth's WanModel)

# inside a block (`blocks.N.` and VACE's `vace_blocks.N.`)
BLOCK_DIFFUSERS_TO_WAN = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o", "attn1.norm_q": "self_attn.norm_q", "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o", "attn2.norm_q": "cross_attn.norm_q", "attn2.norm_k": "cross_attn.norm_k",
    "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",
    "attn2.norm_added_k": "cross_attn.norm_k_img",
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2", "norm2": "norm3",
    "proj_in": "before_proj", "proj_out": "after_proj",  # VACE blocks
}
# outside the blocks
TOP_DIFFUSERS_TO_WAN = {
    "condition_embedder.time_proj": "time_projection.1", "proj_out": "head.head",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
}
BLOCK_WAN_TO_DIFFUSERS = {wan: diffusers for diffusers, wan in BLOCK_DIFFUSERS_TO_WAN.items()}
TOP_WAN_TO_DIFFUSERS = {wan: diffusers for diffusers, wan in TOP_DIFFUSERS_TO_WAN.items()}
BLOCK_NAME = re.compile(r"^(?P<blocks>(?:vace_)?blocks)\.(?P<index>\d+)\.(?P<rest>.+)$")
# the prefixes a LoRA's or a checkpoint's names may carry before the DiT's own module names
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "model.")

# Which model a LoRA was made for, by its width (the DiT's hidden size)
WIDTHS = {1536: "Wan 1.3B", 3072: "Wan2.2 TI2V-5B", 5120: "Wan 14B / A14B"}


def _rename(module: str, block_map: dict, top_map: dict) -> str:
    match = BLOCK_NAME.match(module)
    if match:
        rest = block_map.get(match["rest"], match["rest"])
        return f"{match['blocks']}.{match['index']}.{rest}"
    return top_map.get(module, module)


def wan_module_name(module: str) -> str:
    """A diffusers transformer module name in Wan's naming (a Wan name, or one neither knows, as it is)."""
    return _rename(module, BLOCK_DIFFUSERS_TO_WAN, TOP_DIFFUSERS_TO_WAN)


def diffusers_module_name(module: str) -> str:
    """A Wan module name in diffusers' transformer naming (the inverse of `wan_module_name`)."""
    return _rename(module, BLOCK_WAN_TO_DIFFUSERS, TOP_WAN_TO_DIFFUSERS)


def _is_diffusers_name(module: str) -> bool:
    return wan_module_name(module) != module


def _strip_prefix(name: str) -> str:
    for prefix in PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


# musubi-tuner's names (`lora_unet_blocks_0_self_attn_q`): Wan's names with dots made underscores
MUSUBI_PREFIX = "lora_unet_"
_MUSUBI_WORDS = ("self_attn", "cross_attn", "k_img", "v_img", "norm_k_img", "time_projection", "time_embedding",
                 "text_embedding", "img_emb", "vace_blocks", "before_proj", "after_proj", "patch_embedding")


def _musubi_to_wan(name: str) -> str:
    dotted = name[len(MUSUBI_PREFIX):].replace("_", ".")
    for word in _MUSUBI_WORDS:
        dotted = dotted.replace(word.replace("_", "."), word)
    return dotted


# --------------------------------------------------------------------------------------------------
# Reading a LoRA file's header

# key suffix → (role, layout it belongs to)
ROLES = {
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha", ".diff": "diff", ".diff_b": "diff_b",
    ".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_B.bias": "bias",
    ".lora_A.default.weight": "down", ".lora_B.default.weight": "up",
    ".lora_magnitude_vector": "dora", ".dora_scale": "dora",
}
_SUFFIX = re.compile("(" + "|".join(re.escape(s) for s in sorted(ROLES, key=len, reverse=True)) + ")$")


def parse_key(key: str) -> tuple[str, str, bool] | None:
    """(module in Wan naming, role, named in diffusers' naming) of one LoRA key, or None for a key no
    LoRA layout has (metadata tensors, a text encoder's keys are kept as their own modules)."""
    match = _SUFFIX.search(key)
    if match is None:
        return None
    raw = key[:match.start()]
    if raw.startswith(MUSUBI_PREFIX):
        return _musubi_to_wan(raw), ROLES[match[1]], False
    module = _strip_prefix(raw)
    diffusers_named = raw.startswith("transformer.") or _is_diffusers_name(module)
    return wan_module_name(module), ROLES[match[1]], diffusers_named


@dataclass(frozen=True)
class LoraFile:
    path: Path
    layout: str  # "wan" (original / ComfyUI / lightx2v) or "diffusers" (PEFT lora_A / lora_B)
    targets: dict[str, tuple[int, int, int]]  # Wan-named module → (out_features, in_features, rank); rank 0: a full delta
    first_key: dict[str, str]  # module → the first key of the file that targets it (for messages)
    rank: int  # the largest rank
    width: int | None  # the model width it was made for (self_attn.q's), None if unknown
    blocks: int  # transformer blocks it targets (largest index + 1)
    expert_hint: str | None  # "high" / "low" where its name or metadata says it is for one Wan2.2 expert
    bytes: int  # its tensors' bytes (the memory of unfused adapters)


_EXPERT_IN_NAME = {"high": re.compile(r"high[\s_.-]*noise|(^|[^a-z0-9])high([^a-z0-9]|$)"),
                   "low": re.compile(r"low[\s_.-]*noise|(^|[^a-z0-9])low([^a-z0-9]|$)")}
_EXPERT_IN_METADATA = {"high": re.compile(r"high[\s_.-]*noise"), "low": re.compile(r"low[\s_.-]*noise")}


def _expert_hint(path: Path, metadata: dict) -> str | None:
    """"high" / "low" where exactly one expert is named: in the file name (`…_high_noise…`, `HighNoise`,
    `_low_`), else in the metadata's values (`high_noise` / `low_noise`)."""
    stem = path.stem.lower()
    found = {expert for expert, pattern in _EXPERT_IN_NAME.items() if pattern.search(stem)}
    if not found:
        text = " ".join(str(v) for v in metadata.values()).lower()
        found = {expert for expert, pattern in _EXPERT_IN_METADATA.items() if pattern.search(text)}
    return found.pop() if len(found) == 1 else None


def _header(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict]:
    """(tensors, metadata) of a safetensors file, or LoraFileError saying what the file is."""
    fix_path = "point the LoRA's path at a .safetensors LoRA file (the manifest's model.loras.NAME.path)"
    if not path.exists():
        raise LoraFileError(f"LoRA file {path} does not exist", fix_path)
    if not path.is_file():
        raise LoraFileError(f"LoRA path {path} is a folder, not a file", fix_path)
    try:
        weights = read_safetensors(path)
        with open(path, "rb") as stream:
            length = int.from_bytes(stream.read(8), "little")
            metadata = json.loads(stream.read(length)).get("__metadata__") or {}
    except _Broken as exc:
        raise LoraFileError(f"LoRA file {path} is not a readable safetensors file ({exc}; it looks like "
                            f"{_looks_like(path)})",
                            "convert it to .safetensors (safetensors.torch.save_file), or download it again "
                            "if it is truncated") from None
    except OSError as exc:
        raise LoraFileError(f"LoRA file {path} cannot be read ({exc.strerror or exc})",
                            "make it readable by this user (permissions), or point the path at a copy") from None
    return weights.tensors, metadata if isinstance(metadata, dict) else {}


def _looks_like(path: Path) -> str:
    """What a file that is not safetensors looks like, from its first bytes."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(64)
    except OSError:
        return "an unreadable file"
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (torch.save's .pt/.pth/.ckpt format)"
    if head.startswith(b"\x80") and len(head) > 1 and head[1] in range(2, 6):
        return "a Python pickle (a legacy torch.save file)"
    if head.startswith(b"GGUF"):
        return "a GGUF file"
    if head.lstrip().startswith((b"<", b"<!")):
        return "an HTML page (a download that saved a web page, e.g. a login or error page)"
    if head.lstrip().startswith((b"{", b"[")):
        return "a JSON text"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer (the file itself was not fetched: git lfs pull)"
    if all(32 <= b < 127 or b in b"\r\n\t" for b in head):
        return f"a text file beginning {head[:40].decode('ascii')!r}"
    return f"binary data beginning {head[:8].hex(' ')}"


def read_lora(path: str | os.PathLike) -> LoraFile:
    """What a LoRA file holds, from its safetensors header only; LoraFileError (with the fix) for a
    missing, unreadable or non-safetensors file, or one without LoRA keys."""
    path = Path(path).expanduser()
    tensors, metadata = _header(path)
    downs: dict[str, tuple[int, ...]] = {}
    ups: dict[str, tuple[int, ...]] = {}
    diffs: dict[str, tuple[int, ...]] = {}
    first_key: dict[str, str] = {}
    diffusers_named = wan_named = 0
    for key, (_, shape) in tensors.items():
        parsed = parse_key(key)
        if parsed is None:
            continue
        module, role, in_diffusers_names = parsed
        if role in ("down", "up", "diff") or module not in first_key:  # a key with the layer's shape first
            first_key[module] = first_key.get(module) if _has_shape(first_key.get(module)) else key
        if in_diffusers_names:
            diffusers_named += 1
        else:
            wan_named += 1
        if role == "down":
            downs[module] = shape
        elif role == "up":
            ups[module] = shape
        elif role == "diff" and len(shape) == 2:  # a Linear's full delta (1-D ones are norms' and biases')
            diffs[module] = shape
    targets: dict[str, tuple[int, int, int]] = {}
    for module in sorted(set(downs) | set(ups) | set(diffs), key=_module_order):
        down, up = downs.get(module), ups.get(module)
        if down is not None and up is not None:
            targets[module] = (up[0], down[1], down[0])
        elif module in diffs:
            targets[module] = (diffs[module][0], diffs[module][1], 0)
        elif down is not None:  # a lone down matrix (lightx2v's head.head): its input side is known
            targets[module] = (0, down[1], down[0])
        else:
            targets[module] = (up[0], 0, up[1])
    if not targets:
        names = ", ".join(list(tensors)[:3]) or "none"
        raise LoraFileError(
            f"{path} holds no LoRA weights: no key ends in .lora_down.weight / .lora_up.weight (Wan / ComfyUI "
            f"layout), .lora_A.weight / .lora_B.weight (diffusers / PEFT) or .diff; its first keys: {names}",
            "give a LoRA file; a full model checkpoint belongs in model.path")
    first_key = {module: first_key[module] for module in targets}
    width = _width(targets)
    indexes = [int(m.split(".")[1]) for m in targets if m.startswith("blocks.")]
    return LoraFile(
        path=path, layout="diffusers" if diffusers_named > wan_named else "wan", targets=targets,
        first_key=first_key, rank=max(rank for _, _, rank in targets.values()), width=width,
        blocks=max(indexes) + 1 if indexes else 0, expert_hint=_expert_hint(path, metadata),
        bytes=sum(math.prod(shape) * ST_BYTES.get(dtype, 4) for dtype, shape in tensors.values()))


# where a LoRA's layers show the model's hidden size: (module ending, 0 = out / 1 = in)
WIDTH_SIDES = (("self_attn.q", 0), ("self_attn.k", 0), ("self_attn.v", 0), ("self_attn.o", 0), ("cross_attn.q", 0),
               ("cross_attn.o", 0), ("ffn.2", 0), ("ffn.0", 1))


def _width(targets: dict[str, tuple[int, int, int]]) -> int | None:
    """The model width a LoRA's blocks were made for, from the first of its layers that shows it."""
    for ending, side in WIDTH_SIDES:
        for module, shape in targets.items():
            if module.startswith("blocks.") and module.endswith("." + ending) and shape[side]:
                return shape[side]
    return None


def _has_shape(key: str | None) -> bool:
    """A key whose tensor carries the layer's shape (not its alpha or bias)."""
    parsed = parse_key(key) if key else None
    return parsed is not None and parsed[1] in ("down", "up", "diff")


# a block's layers in the order its forward pass runs them (the "first key" of a message is the first run)
BLOCK_ORDER = {name: i for i, name in enumerate(
    ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k", "cross_attn.v",
     "cross_attn.k_img", "cross_attn.v_img", "cross_attn.o", "ffn.0", "ffn.2"))}


def _module_order(module: str) -> tuple:
    """Blocks in numeric order (blocks.2 before blocks.10), a block's layers in the order they run."""
    match = BLOCK_NAME.match(module)
    if match is None:
        return ("", -1, 0, module)
    return (match["blocks"], int(match["index"]), BLOCK_ORDER.get(match["rest"], len(BLOCK_ORDER)), match["rest"])


# --------------------------------------------------------------------------------------------------
# The model side: a checkpoint's Linear modules, from its weight headers

# checkpoint layout → expert → the component that holds that expert's DiT (`layouts.inspect`'s names)
EXPERT_COMPONENTS = {"diffusers": {"high": "transformer", "low": "transformer_2"},
                     "wan": {"high": ("high_noise_model", "transformer"), "low": ("low_noise_model",)}}


def model_linears(checkpoint_path: str | os.PathLike, layout: str | None = None) -> dict[str, dict[str, tuple[int, int]]]:
    """Expert ("high", and "low" for a Wan2.2 two-expert model) → Wan-named Linear module → (out, in), from
    the checkpoint's DiT weight headers. `layout` ("diffusers" / "wan") is the one the backend loads; the
    folder's own layout decides where the DiT files are. CheckpointError when no DiT weights are found."""
    from .layouts import inspect
    checkpoint = inspect(checkpoint_path, layout=layout)
    found = checkpoint.layout if checkpoint.layout in EXPERT_COMPONENTS else "wan"
    experts: dict[str, dict[str, tuple[int, int]]] = {}
    for expert, names in EXPERT_COMPONENTS[found].items():
        for name in (names,) if isinstance(names, str) else names:
            component = checkpoint.component(name)
            if component is not None and component.files:
                experts[expert] = linears_of(component.tensors())
                break
    if not experts and checkpoint.layout in ("single-file", "weights"):
        merged: dict = {}
        for component in checkpoint.components:
            merged.update(component.tensors())
        experts["high"] = linears_of(merged)
    if not experts:
        raise CheckpointError(f"no DiT weights found in {checkpoint.root} to check LoRAs against"
                              + (f" ({'; '.join(map(str, checkpoint.problems))})" if checkpoint.problems else ""))
    return experts


def linears_of(tensors: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, tuple[int, int]]:
    """Wan-named module → (out, in) of every 2-D `.weight` among a DiT's tensors (diffusers' or Wan's names)."""
    linears = {}
    for name, (_, shape) in tensors.items():
        if name.endswith(".weight") and len(shape) >= 2:  # Linear, and Conv (patch_embedding: out, in, k…)
            linears[wan_module_name(_strip_prefix(name[:-len(".weight")]))] = (shape[0], shape[1])
    return linears


def model_width(linears: dict[str, tuple[int, int]]) -> int | None:
    q = linears.get("blocks.0.self_attn.q")
    return q[0] if q else None


def model_blocks(linears: dict[str, tuple[int, int]]) -> int:
    indexes = [int(m.split(".")[1]) for m in linears if m.startswith("blocks.")]
    return max(indexes) + 1 if indexes else 0


def likely_model(width: int | None) -> str:
    """The Wan model a LoRA of this width was made for (its DiT's hidden size)."""
    if width is None:
        return "an unknown model (no layer in the file shows its width)"
    return f"{WIDTHS[width]} (width {width})" if width in WIDTHS else f"a model of width {width} (no released Wan size)"


# --------------------------------------------------------------------------------------------------
# Fit


def fit_problems(lora: LoraFile, linears: dict[str, tuple[int, int]]) -> list[tuple[str, str]]:
    """(message, fix) for each way the LoRA does not fit a model with these Wan-named Linear modules
    (one expert's, `model_linears(...)[expert]`): layers of other shapes (the first key, both shapes, the
    model the LoRA was probably made for), layers the model lacks, no layer matched at all. Empty when it fits."""
    problems: list[tuple[str, str]] = []
    name = lora.path.name
    width, blocks = model_width(linears), model_blocks(linears)
    known = f"{WIDTHS[width]}, " if width in WIDTHS else ""
    model = f"this model ({known}width {width}, {blocks} blocks)" if width else "this model"
    made_for = f"; the LoRA was probably made for {likely_model(lora.width)}" if lora.width else ""
    fix_other = (f"use a LoRA made for this model ({known}width {width})" if width else "use a LoRA made for this model") \
        + (f", or set model.path to a {WIDTHS[lora.width]} checkpoint" if lora.width in WIDTHS else "")
    missing = [m for m in lora.targets if m not in linears]
    mismatched = [m for m, (out, inp, _) in lora.targets.items()
                  if m in linears and ((out and out != linears[m][0]) or (inp and inp != linears[m][1]))]
    if mismatched:
        module = mismatched[0]
        out, inp, _ = lora.targets[module]
        problems.append((
            f"LoRA {name} does not fit {model}: its key {lora.first_key[module]} is for a layer of "
            f"[{out or '?'} out, {inp or '?'} in], the model's {module} is "
            f"[{linears[module][0]} out, {linears[module][1]} in]; {len(mismatched)} of its {len(lora.targets)} layers differ{made_for}", fix_other))
    if missing and len(missing) == len(lora.targets):
        module = missing[0]
        problems.append((
            f"LoRA {name} matches no layer of {model}: none of its {len(lora.targets)} layers is the model's, the "
            f"first {lora.first_key[module]} ({module}){made_for}", fix_other))
    elif missing:
        module = missing[0]
        plural = "s" if len(missing) != 1 else ""
        problems.append((
            f"LoRA {name} targets {len(missing)} layer{plural} {model} lacks, the first {lora.first_key[module]} "
            f"({module}); the LoRA targets {lora.blocks} blocks{made_for}", fix_other))
    return problems


def describe(lora: LoraFile) -> str:
    """One line for `models status`: layout, blocks, width and the likely model, rank, size."""
    layout = {"wan": "Wan/ComfyUI layout", "diffusers": "diffusers/PEFT layout"}[lora.layout]
    width = f"width {lora.width} ({likely_model(lora.width)})" if lora.width else "width unknown"
    expert = f", for the {lora.expert_hint}-noise expert" if lora.expert_hint else ""
    size = f"{lora.bytes / 1024**2:.1f} MiB" if lora.bytes >= 1024**2 else f"{lora.bytes / 1024:.1f} KiB"
    blocks = f"{lora.blocks} block{'s' if lora.blocks != 1 else ''}"
    return (f"{layout}, {len(lora.targets)} layers in {blocks}, {width}, rank {lora.rank}"
            f"{expert}, {size}")


def adapter_params(lora: LoraFile) -> int:
    """The parameters of the LoRA as an unfused adapter in one denoiser: rank × (in + out) per layer (a
    full delta, rank 0 in `targets`, counts out × in)."""
    return sum(rank * (inp + out) if rank else out * inp for out, inp, rank in lora.targets.values())


def status_lines(files: list[tuple[str, str, str]], checkpoint: str | os.PathLike | None, layout: str | None,
                 experts: dict[str, str]) -> list[str]:
    """`models status` on a manifest: each LoRA file it may run (`files`: (key, name, path), as validation
    gathers them) with what it is, and whether it fits the manifest's model (`checkpoint` in `layout`), the
    expert it goes into (`experts`: name -> both/high/low) checked first."""
    try:
        linears = model_linears(checkpoint, layout) if checkpoint and layout else {}
    except (OSError, ValueError, CheckpointError):
        linears = {}
    lines = []
    for _, name, path in files:
        try:
            lora = read_lora(path)
        except LoraFileError as exc:
            lines.append(f"  {name:<12} {Path(path).name}: {exc.message}")
            continue
        expert = experts.get(name, "both")
        if not linears:
            verdict = "(the model's layers could not be read: fit not checked)"
        else:
            found = [problem for which in (("high", "low") if expert == "both" else (expert,))
                     for problem in fit_problems(lora, linears.get(which) or linears.get("high") or {})]
            verdict = "fits this model" if not found else f"does NOT fit: {found[0][0]}"
        lines.append(f"  {name:<12} {Path(path).name}: {describe(lora)}; {verdict}")
    return lines


# --------------------------------------------------------------------------------------------------
# Tensors in the Wan layout (what DiffSynth's loader takes)


def wan_state_dict(path: str | os.PathLike, dtype=None) -> dict:
    """The LoRA's tensors in the Wan layout without prefix: `blocks.0.self_attn.q.lora_down.weight` [rank, in],
    `….lora_up.weight` [out, rank], `….alpha`, `….diff`, `….diff_b`, whatever layout the file is in; a
    diffusers/PEFT file's modules get `alpha` = its `lora_alpha` (PEFT's metadata) or the rank, the scale
    diffusers gives them. DiffSynth's `GeneralLoRALoader.convert_state_dict` names these as its WanModel's
    modules. `dtype`: a torch dtype to cast the float tensors to."""
    import torch
    from safetensors import safe_open

    path = Path(path).expanduser()
    lora = read_lora(path)  # the file's problems, as the checks word them
    renamed: dict = {}
    alphas = _peft_alphas(lora)
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            parsed = parse_key(key)
            if parsed is None:
                log.debug("%s: key %s is no LoRA key; left out", path.name, key)
                continue
            module, role, _ = parsed
            suffix = {"down": "lora_down.weight", "up": "lora_up.weight", "alpha": "alpha", "diff": "diff",
                      "diff_b": "diff_b", "bias": "diff_b", "dora": "dora_scale"}[role]
            tensor = handle.get_tensor(key)
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            renamed[f"{module}.{suffix}"] = tensor
    for name in [n for n in renamed if n.endswith(".lora_down.weight")]:
        module = name[:-len(".lora_down.weight")]
        if f"{module}.alpha" not in renamed and module in alphas:
            renamed[f"{module}.alpha"] = torch.tensor(float(alphas[module]), dtype=dtype or torch.float32)
    return renamed


def _peft_alphas(lora: LoraFile) -> dict[str, float]:
    """Wan-named module → lora_alpha of a diffusers/PEFT file: its `lora_adapter_metadata` (diffusers'
    `save_lora_weights` writes PEFT's LoraConfig there, as `transformer.lora_alpha`, …) where it has one,
    else the rank (PEFT's scale alpha/rank = 1, as diffusers loads a file without metadata). Empty for a
    Wan-layout file (its alphas are tensors)."""
    if lora.layout != "diffusers":
        return {}
    _, metadata = _header(lora.path)
    try:
        packed = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except (TypeError, ValueError):
        packed = {}
    config = {key.removeprefix("transformer."): value for key, value in packed.items()} \
        if isinstance(packed, dict) else {}
    default_alpha = config.get("lora_alpha")
    patterns = config.get("alpha_pattern") or {}
    alphas = {}
    for module, (_, _, rank) in lora.targets.items():
        diffusers_name = diffusers_module_name(module)
        alpha = next((a for pattern, a in patterns.items() if diffusers_name.endswith(pattern)), default_alpha)
        alphas[module] = alpha if alpha is not None else rank
    return alphas
