"""Why DiffSynth + `quantize: fp8` made NaN frames (docs/benchmarks.md, issue 20): torchao's dynamic
per-row fp8 scale of an activation row of zeros. Prints, on an fp8-capable GPU, whether a Linear layer
quantized as `speed: {quantize: fp8}` quantizes it (orchestrator.speed.quantize) gives finite outputs
for an input with one zero row, with torchao's default config and with the product's.

    python bench/gpu_fp8_zero_rows.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from orchestrator import speed  # noqa: E402


def finite_rows(config) -> list[bool]:
    from torchao.quantization import quantize_
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(1536, 1536)).to("cuda", torch.bfloat16)
    torch.nn.init.zeros_(layer[0].bias)  # as in the random test checkpoints and many real layers' padding path
    if config is None:
        speed.quantize(layer, [layer], "fp8", torch.bfloat16, "diffsynth")
    else:
        quantize_(layer, config)
    rows = torch.randn(4, 1536, device="cuda", dtype=torch.bfloat16)
    rows[2] = 0  # a padding row
    with torch.no_grad():
        return torch.isfinite(layer(rows)).all(dim=-1).tolist()


if __name__ == "__main__":
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow
    print("rows finite, torchao default per-row fp8:", finite_rows(Float8DynamicActivationFloat8WeightConfig(
        granularity=PerRow())))
    print("rows finite, speed: {quantize: fp8}:     ", finite_rows(None))
