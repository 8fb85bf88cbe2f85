"""Build a random-weight Wan pipeline and save it with save_pretrained (GPU benchmarks, issue 5 and 7).

    python bench/gpu_build_model.py FOLDER [--size wan-1.3b|tiny] [--device cuda|cpu] [--dtype bfloat16]

wan-1.3b: Wan2.1-T2V-1.3B's transformer (30 layers, 12 heads x 128, ffn 8960, text_dim 4096), the default
AutoencoderKLWan, and a UMT5 text encoder of umt5-xxl's width (d_model 4096) with 2 layers instead of 24,
with an offline word-level tokenizer. Random weights: the videos are noise; the work per video is real.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--size", default="wan-1.3b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    started = time.monotonic()
    from orchestrator.demo.random_checkpoints import build_random_wan
    folder = build_random_wan(args.folder, size=args.size, dtype=args.dtype, device=args.device)
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in folder.iterdir() if p.is_dir()}
    print(f"built {args.size} ({args.dtype}) in {time.monotonic() - started:.1f}s at {folder}: " +
          ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in sorted(sizes.items())), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
