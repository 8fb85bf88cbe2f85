"""Random-weight LoRA files that fit a tiny (or any) checkpoint: a FAKE of trained LoRAs, for tests and
benchmarks, in both key layouts users have (the original Wan / ComfyUI / lightx2v layout and diffusers'
PEFT layout). The shapes come from the checkpoint's weight headers, so the LoRA fits the model it is made
for; `width` makes one for another model width (a "1.3B LoRA on a 14B" test double).

    python -m orchestrator.demo.random_loras CHECKPOINT LORA.safetensors [--layout wan|diffusers] [--rank 4] ...

The tensors are drawn in Wan's naming from one seeded generator, then renamed: the two layouts of one
seed hold the same values (`checkpoints.loras.wan_state_dict` of either gives the same tensors).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ..checkpoints.loras import diffusers_module_name, model_linears, model_width

log = logging.getLogger(__name__)

LAYOUTS = ("wan", "diffusers")
# `targets` words → the Wan module names (inside a block) each selects
TARGET_GROUPS = {
    "self_attn": ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o"),
    "cross_attn": ("cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "cross_attn.k_img",
                   "cross_attn.v_img"),
    "ffn": ("ffn.0", "ffn.2"),
}
TARGET_GROUPS["attention"] = TARGET_GROUPS["self_attn"] + TARGET_GROUPS["cross_attn"]


def _selected(targets: str) -> tuple[str, ...]:
    words = [w.strip() for w in targets.split("+") if w.strip()]
    unknown = [w for w in words if w not in TARGET_GROUPS]
    if unknown or not words:
        raise ValueError(f"unknown LoRA targets {targets!r}; join {', '.join(TARGET_GROUPS)} with '+'")
    return tuple(module for w in words for module in TARGET_GROUPS[w])


def build_random_lora(checkpoint: str | os.PathLike, path: str | os.PathLike, layout: str = "wan", rank: int = 4,
                      seed: int = 0, scale: float = 1.0, expert: str = "high", targets: str = "attention+ffn",
                      width: int | None = None) -> Path:
    """Write a random LoRA for `checkpoint`'s DiT (`expert` "high": `transformer` / the only or high-noise DiT;
    "low": `transformer_2` / low_noise_model) to `path` in `layout`, and return `path`.

    Every block's selected Linear modules (`targets`: "attention", "self_attn", "cross_attn", "ffn", joined
    with '+') get lora_down [rank, in] ~ N(0, 1/in) and lora_up [out, rank] ~ N(0, 1/rank) × `scale`, alpha =
    rank (scale 1 in both libraries): the frames of a tiny model change visibly at strength 1 and stay finite.
    `width`: every dimension equal to the model's hidden size becomes `width` (a LoRA for another model).
    """
    import torch
    from safetensors.torch import save_file

    if layout not in LAYOUTS:
        raise ValueError(f"unknown LoRA layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    experts = model_linears(checkpoint)
    if expert not in experts:
        raise ValueError(f"{checkpoint} has no {expert}-noise expert (it has {', '.join(experts)})")
    linears = experts[expert]
    hidden = model_width(linears)
    chosen = _selected(targets)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    modules = sorted((m for m in linears if m.startswith("blocks.") and m.split(".", 2)[2] in chosen),
                     key=lambda m: (int(m.split(".")[1]), chosen.index(m.split(".", 2)[2])))
    for module in modules:
        out, inp = (width if width and d == hidden else d for d in linears[module])
        down = torch.randn(rank, inp, generator=generator) / inp ** 0.5
        up = torch.randn(out, rank, generator=generator) / rank ** 0.5 * scale
        if layout == "wan":
            prefix = f"diffusion_model.{module}"
            tensors[f"{prefix}.lora_down.weight"] = down
            tensors[f"{prefix}.lora_up.weight"] = up
            tensors[f"{prefix}.alpha"] = torch.tensor(float(rank))
        else:
            prefix = f"transformer.{diffusers_module_name(module)}"
            tensors[f"{prefix}.lora_A.weight"] = down
            tensors[f"{prefix}.lora_B.weight"] = up
    if not tensors:
        raise ValueError(f"{checkpoint}'s {expert} DiT has no Linear module among {targets!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Save a random LoRA that fits a checkpoint (a fake, for tests)")
    parser.add_argument("checkpoint")
    parser.add_argument("path")
    parser.add_argument("--layout", choices=LAYOUTS, default="wan")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--expert", choices=("high", "low"), default="high")
    parser.add_argument("--targets", default="attention+ffn")
    parser.add_argument("--width", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = build_random_lora(args.checkpoint, args.path, layout=args.layout, rank=args.rank, seed=args.seed,
                             scale=args.scale, expert=args.expert, targets=args.targets, width=args.width)
    log.info("saved a random %s-layout LoRA (rank %d) to %s", args.layout, args.rank, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
