"""Measure the working-memory constants of `orchestrator.checkpoints` (the `models fit` estimate) on the CPU.

    python bench/fit_calibration.py          # about a minute on 2 cores

Each measurement is a fresh process that builds one module with random weights, then runs its first
forward pass (no_grad) and reports the peak resident memory above what it held before (VmHWM reset
through /proc/self/clear_refs). MALLOC_MMAP_THRESHOLD_ makes every large allocation its own mapping,
returned to the OS when freed, so the peak is what was alive at once. Each module runs at two sizes and
the constant is the slope, so fixed costs (thread pools, kernels' first-use caches) cancel:

  - one Wan block of real width (hidden 1536 = 12 × 128) with ffn 8960 and with ffn 1536, bf16:
    bytes per token ÷ 2 = K_HIDDEN × 1536 + K_FFN × ffn  →  K_HIDDEN, K_FFN
  - the default Wan VAE (decoder channels 96, bf16) and the tiny one (3 channels, float32), decoding:
    bytes per pixel ÷ b = K_VAE_CH × C + K_VAE_PX  →  K_VAE_CH, K_VAE_PX
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, sys, torch
kind, a, b, frames, height, width, dtype = sys.argv[1:8]
dtype = getattr(torch, dtype)
torch.manual_seed(0)
latent = (int(frames) - 1) // 4 + 1
if kind == "block":
    from diffusers import WanTransformer3DModel
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=int(a) // 128, attention_head_dim=128,
        in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=int(b), num_layers=1,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024).to(dtype).eval()
    x = torch.randn(1, 16, latent, int(height) // 8, int(width) // 8, dtype=dtype)
    text = torch.randn(1, 512, 4096, dtype=dtype)
    run = lambda: model(x, torch.tensor([500.0]), text)
else:
    from diffusers import AutoencoderKLWan
    spec = {} if int(a) == 96 else dict(base_dim=int(a), dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    model = AutoencoderKLWan(**spec).to(dtype).eval()
    z = torch.randn(1, 16, latent, int(height) // 8, int(width) // 8, dtype=dtype)
    run = lambda: model.decode(z)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
with torch.no_grad():
    before = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    run()
    print(json.dumps({"peak_above": status("VmHWM") - before}))
"""


def measure(kind: str, a: int, b: int, frames: int, height: int, width: int, dtype: str) -> int:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", CHILD, kind, str(a), str(b), str(frames), str(height), str(width),
                          dtype], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_above"]


def slope(kind, a, b, dtype, small, large, frames):
    itemsize = {"bfloat16": 2, "float32": 4}[dtype]
    lo = measure(kind, a, b, frames, small, small, dtype)
    hi = measure(kind, a, b, frames, large, large, dtype)
    if kind == "block":
        latent = (frames - 1) // 4 + 1
        units = latent * (large // 16) ** 2 - latent * (small // 16) ** 2  # tokens
    else:
        units = large * large - small * small  # pixels
    per = (hi - lo) / units / itemsize
    print(f"  {kind} a={a} b={b} {dtype}: {lo:,} B at {small}², {hi:,} B at {large}² → {per:,.1f} elements per "
          f"{'token' if kind == 'block' else 'pixel'}", flush=True)
    return per


def main() -> int:
    from bench._common import machine
    from orchestrator import checkpoints
    print(f"machine: {machine()}")
    wide = slope("block", 1536, 8960, "bfloat16", 256, 512, 17)
    narrow = slope("block", 1536, 1536, "bfloat16", 256, 512, 17)
    k_ffn = (wide - narrow) / (8960 - 1536)
    k_hidden = (narrow - k_ffn * 1536) / 1536
    real = slope("vae", 96, 0, "bfloat16", 128, 256, 5)
    tiny = slope("vae", 3, 0, "float32", 256, 512, 5)
    k_ch = (real - tiny) / (96 - 3)
    k_px = tiny - 3 * k_ch
    print(f"K_HIDDEN {k_hidden:.2f}  K_FFN {k_ffn:.2f}  K_VAE_CH {k_ch:.1f}  K_VAE_PX {k_px:.0f}")
    print(f"in orchestrator/checkpoints/fit.py: K_HIDDEN {checkpoints.K_HIDDEN}  K_FFN {checkpoints.K_FFN}  "
          f"K_VAE_CH {checkpoints.K_VAE_CH}  K_VAE_PX {checkpoints.K_VAE_PX}  (GPU_FACTOR {checkpoints.GPU_FACTOR})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
