"""Checkpoint load time: `load_components` sequential against parallel, from a cold and a warm page cache.

    python bench/load_time.py --size tiny                                  # CPU, seconds (shows it works)
    python bench/load_time.py --size wan-1.3b --device cuda --folder /tmp/loadbench/wan13b
    python bench/load_time.py --size wan-14b --device cuda --folder /tmp/loadbench/wan14b   # ~40 GB of files

The checkpoint is a random-weight diffusers folder, built once (`--folder` is reused when it holds one):
  tiny      `orchestrator.demo.random_checkpoints` (a few thousand parameters)
  wan-1.3b  Wan2.1-T2V-1.3B's transformer, the Wan VAE, a 2-layer umt5-width text encoder
            (`orchestrator.demo.random_checkpoints`, as in the GPU sizing benchmark)
  wan-14b   Wan2.1-T2V-14B's transformer (40 layers, 40 heads × 128, ffn 13824: 28.6 GB in bf16), the full
            umt5-xxl text encoder (24 layers, d_model 4096, d_ff 10240, 64 heads, vocab 256384: 11.4 GB)
            and the Wan VAE; built here (below), in bf16 from the start so the GPU holds it while it is built

Each measurement is a fresh process (imports timed apart), which loads the components the way the
diffusers backend does (`load_components(folder, dtype, parallel=…)`, then each model `.to(device)`) and
reports, after `torch.cuda.synchronize()`, the seconds until every component is ready on the device.
Cold: `os.sync()`, then `posix_fadvise(DONTNEED)` on every file of the checkpoint (no root needed; with
root, `/proc/sys/vm/drop_caches` too), and the share of its pages still cached is printed beside the
figure. Warm: every file read once before. Modes alternate order over repeats.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WAN14B = dict(
    transformer=dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                     out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
                     cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
    text=dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128))

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from orchestrator.checkpoints import load_components, model_index
from orchestrator.checkpoints.loading import _component_class
folder, dtype, device, parallel = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "parallel"
for spec in model_index(folder)[0].values():  # the classes' modules: imports, not loading
    if spec:
        _component_class(*spec)
imports = time.perf_counter() - t0
cuda = device.startswith("cuda")
if cuda:
    torch.cuda.init(); torch.zeros(1, device=device); torch.cuda.synchronize()
detail = {}
t1 = time.perf_counter()
# prefetch=parallel: the threaded path even below PARALLEL_MIN_BYTES, where the default skips it
components, seconds = load_components(folder, getattr(torch, dtype), parallel=parallel, prefetch=parallel,
                                      detail=detail)
t2 = time.perf_counter()
if cuda:
    for name, part in components.items():
        if isinstance(part, torch.nn.Module):
            part.to(device)
    torch.cuda.synchronize()
t3 = time.perf_counter()
print(json.dumps({"imports_s": round(imports, 2), "load_components_s": round(t2 - t1, 3),
                  "to_device_s": round(t3 - t2, 3), "ready_s": round(t3 - t1, 3),
                  "components": {n: {k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()}
                                 for n, d in detail.items()}}))
"""


def build_wan14b(folder: Path, device: str) -> None:
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from orchestrator.demo.random_checkpoints import tokenizer
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # float32 first would need 80 GB for the DiT and T5 alone
    try:
        with torch.device(device):
            transformer = WanTransformer3DModel(**WAN14B["transformer"])
            vae = AutoencoderKLWan()
            text_encoder = UMT5EncoderModel(UMT5Config(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                                                       is_encoder_decoder=False, **WAN14B["text"]))
    finally:
        torch.set_default_dtype(default)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    WanPipeline(tokenizer=tokenizer(), text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                transformer=transformer).save_pretrained(folder)


def ensure_checkpoint(size: str, folder: Path, device: str, dtype: str) -> float:
    if (folder / "model_index.json").is_file():
        print(f"reusing {folder}", flush=True)
        return 0.0
    started = time.monotonic()
    building = folder.with_name(folder.name + ".building")
    if size == "wan-14b":
        build_wan14b(building, device)
    else:
        from orchestrator.demo.random_checkpoints import build_random_wan
        build_random_wan(building, size=size, dtype=dtype, device=device)
    os.replace(building, folder)
    seconds = time.monotonic() - started
    print(f"built {size} in {seconds:.1f}s at {folder}", flush=True)
    return seconds


def files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def drop_cache(folder: Path) -> str:
    os.sync()
    how = "posix_fadvise(DONTNEED)"
    for path in files_of(folder):
        with open(path, "rb") as stream:
            os.posix_fadvise(stream.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if os.geteuid() == 0:
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            how += " + drop_caches"
        except OSError:
            pass
    return how


def warm_cache(folder: Path) -> None:
    from orchestrator.checkpoints import read_ahead
    for path in files_of(folder):
        read_ahead(path)


def resident(folder: Path) -> float | None:
    from orchestrator.checkpoints.loading import _resident_share
    total = cached = 0.0
    for path in files_of(folder):
        share = _resident_share(path)
        if share is None:
            return None
        size = path.stat().st_size
        total += size
        cached += share * size
    return cached / total if total else 1.0


def measure(folder: Path, dtype: str, device: str, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), dtype, device, mode], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode:
        raise SystemExit(f"measurement failed ({mode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    from bench._common import machine, table
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "wan-1.3b", "wan-14b"), default="tiny")
    parser.add_argument("--folder", help="where the checkpoint is (built there when absent)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: components moved there, as a worker does")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on the CPU")
    parser.add_argument("--modes", default="sequential,parallel")
    parser.add_argument("--caches", default="cold,warm")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", help="append one JSON line per measurement to this file")
    args = parser.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    folder = Path(args.folder or f"/tmp/loadbench/{args.size}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}", flush=True)
    build_s = ensure_checkpoint(args.size, folder, args.device, dtype)
    sizes = {p.relative_to(folder).parts[0]: 0 for p in files_of(folder)}
    for path in files_of(folder):
        sizes[path.relative_to(folder).parts[0]] += path.stat().st_size
    from orchestrator.checkpoints.layouts import _bytes
    print("files: " + ", ".join(f"{k} {_bytes(v)}" for k, v in sorted(sizes.items()) if v > 1e3)
          + f" (total {_bytes(sum(sizes.values()))})", flush=True)
    modes = [m for m in args.modes.split(",") if m]
    rows = []
    for cache in [c for c in args.caches.split(",") if c]:
        for repeat in range(args.repeat):
            for mode in (modes if repeat % 2 == 0 else modes[::-1]):
                how = drop_cache(folder) if cache == "cold" else (warm_cache(folder) or "read once before")
                before = resident(folder)
                result = measure(folder, dtype, args.device, mode)
                result.update(size=args.size, device=args.device, dtype=dtype, mode=mode, cache=cache, how=how,
                              resident_before=None if before is None else round(before, 3), build_s=round(build_s, 1),
                              date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
                parts = sorted(result["components"].items(), key=lambda kv: -kv[1]["bytes"])
                per = ", ".join(f"{n} {d['seconds']:.2f}s (read {d['read_seconds']:.2f} build {d['build_seconds']:.2f})"
                                for n, d in parts if d["bytes"])
                print(f"  {cache:<4} {mode:<10} ready {result['ready_s']:.2f}s = load_components "
                      f"{result['load_components_s']:.2f}s + to {args.device} {result['to_device_s']:.2f}s; "
                      f"cached before {'?' if before is None else f'{before:.0%}'}; {per}", flush=True)
                rows.append([args.size, cache, mode, "?" if before is None else f"{before:.0%}",
                             f"{result['load_components_s']:.2f}", f"{result['to_device_s']:.2f}",
                             f"{result['ready_s']:.2f}", f"{result['imports_s']:.1f}"])
                if args.json:
                    with open(args.json, "a", encoding="utf-8") as stream:
                        stream.write(json.dumps(result) + "\n")
    print()
    print(table(["size", "cache", "mode", "cached before", "load_components s", f"to {args.device} s",
                 "ready s", "imports s"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
