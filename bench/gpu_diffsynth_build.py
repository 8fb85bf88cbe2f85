"""Full-size random-weight Wan models in the original Wan file layout, which DiffSynth recognises.

    python bench/gpu_diffsynth_build.py FOLDER --size 1.3b|14b [--device cuda] [--link-from FOLDER]
    python bench/gpu_diffsynth_build.py --verify-only          # no weights: checks the fingerprints (CPU)

DiffSynth recognises a model file by an md5 of its tensor names and shapes (its model table,
`diffsynth/configs/model_configs.py`). The names and shapes here come from DiffSynth's own classes,
instantiated on the meta device (no memory) with the configuration the table lists for:
  Wan2.1-T2V-1.3B DiT   dim 1536, 30 layers, 12 heads, ffn 8960   diffusion_pytorch_model.safetensors
  Wan2.1-T2V-14B DiT    dim 5120, 40 layers, 40 heads, ffn 13824  6 shards + their index, as released
  umT5-XXL encoder      24 layers, d_model 4096, vocab 256384      models_t5_umt5-xxl-enc-bf16.pth
  Wan2.1 VAE                                                      Wan2.1_VAE.pth (fp32, as released)
Before writing anything the fingerprint of those names and shapes is checked against the table
(`--verify-only` does only that, on any machine); after writing, each file's header is fingerprinted
again by the backend's pre-start check and, for the DiT, by DiffSynth's own `hash_model_file`.

Weights are bf16 normal noise (std 0.02; norm scales 1, biases 0) drawn on the GPU in pieces, so the
14B DiT (28.6 GB) is never whole in memory twice. The DiT and text encoder are stored in bf16: same
names and shapes, so the same fingerprint, as the release files (whose DiT may be stored in fp32:
then a real load reads up to twice the bytes). `--link-from` links the text encoder, VAE and tokenizer
of a folder built before (they are the same for both sizes), which saves 12 GB of disk and a minute.
The tokenizer is a small offline byte-level one (its ids fit umT5's 256384-entry vocabulary).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {"1.3b": "9269f8db9040a9d860eaca435be61814", "14b": "aafcfd9672c3a2456dc46e1cb6e52c70"}
TEXT_ENCODER_HASH = "9c8818c2cbea55eca56c7b447df170da"
VAE_HASH = "ccc42284ea13e1ad04693284c7a09be6"
SHARDS = {"1.3b": 1, "14b": 6}  # as the release folders have them


def table_entry(model_hash: str) -> dict:
    from orchestrator.backends.diffsynth_files import diffsynth_model_table
    return next(c for c in diffsynth_model_table() if c.get("model_hash") == model_hash)


def layouts(size: str) -> dict[str, dict[str, list[int]]]:
    """{component: {tensor name as in the release file: shape}}, from DiffSynth's classes on meta."""
    import torch
    from diffsynth.models.wan_video_dit import WanModel
    from diffsynth.models.wan_video_text_encoder import WanTextEncoder
    from diffsynth.models.wan_video_vae import VideoVAE_

    def shapes(module):
        return {k: list(v.shape) for k, v in module.state_dict().items()}
    with torch.device("meta"):
        return {
            "dit": shapes(WanModel(**table_entry(SIZES[size])["extra_kwargs"])),
            "text_encoder": shapes(WanTextEncoder()),  # its defaults are umT5-XXL's encoder
            # DiffSynth's converter prefixes "model." to the release file's names
            "vae": shapes(VideoVAE_()),
        }


def verify(size: str) -> dict[str, dict]:
    import hashlib

    from diffsynth.core.loader.file import convert_keys_dict_to_single_str
    expected = {"dit": SIZES[size], "text_encoder": TEXT_ENCODER_HASH, "vae": VAE_HASH}
    report = {}
    for component, keys in layouts(size).items():
        digest = hashlib.md5(convert_keys_dict_to_single_str(keys).encode()).hexdigest()
        params = sum(_numel(s) for s in keys.values())
        report[component] = {"hash": digest, "expected": expected[component], "ok": digest == expected[component],
                             "parameters": params, "tensors": len(keys)}
    return report


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _fill(name: str, shape, dtype, device, generator):
    import torch
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype, device=device)
    if len(shape) == 1 or name.endswith("gamma"):  # norm scales (the VAE's RMS norms are "gamma")
        return torch.ones(shape, dtype=dtype, device=device)
    return torch.randn(shape, dtype=dtype, device=device, generator=generator) * 0.02


def _tensors(keys: dict, dtype, device, generator) -> dict:
    return {k: _fill(k, s, dtype, device, generator).cpu() for k, s in keys.items()}


def build(folder: Path, size: str, device: str, link_from: Path | None) -> dict:
    import torch
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=device).manual_seed(0)
    keys = layouts(size)
    seconds = {}

    t0 = time.monotonic()
    write_dit(folder, keys["dit"], SHARDS[size], device, generator)
    extra = table_entry(SIZES[size])["extra_kwargs"]
    (folder / "config.json").write_text(json.dumps({"_class_name": "WanModel", "model_type": "t2v", "text_len": 512,
                                                    **{k: v for k, v in extra.items() if k != "has_image_input"}}),
                                        encoding="utf-8")
    seconds["dit"] = time.monotonic() - t0
    seconds.update(write_shared(folder, keys, device, generator, link_from))
    return seconds


def write_dit(folder: Path, keys: dict, shard_count: int, device: str, generator) -> None:
    """A DiT's tensors ({name: shape}) as bf16 noise, in `shard_count` release-like safetensors files of
    about equal bytes (in state-dict order, with their index when more than one)."""
    import torch
    from safetensors.torch import save_file
    names = list(keys)
    total = sum(_numel(keys[k]) * 2 for k in names)
    shards, current, size_now = [], [], 0
    for name in names:
        current.append(name)
        size_now += _numel(keys[name]) * 2
        if size_now >= total / shard_count and len(shards) < shard_count - 1:
            shards.append(current)
            current, size_now = [], 0
    shards.append(current)
    weight_map = {}
    for index, shard in enumerate(shards, 1):
        file = ("diffusion_pytorch_model.safetensors" if len(shards) == 1
                else f"diffusion_pytorch_model-{index:05d}-of-{len(shards):05d}.safetensors")
        save_file(_tensors({k: keys[k] for k in shard}, torch.bfloat16, device, generator), folder / file)
        weight_map.update({k: file for k in shard})
    if len(shards) > 1:
        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1), encoding="utf-8")


def write_shared(folder: Path, keys: dict, device: str, generator, link_from: Path | None) -> dict:
    """The text encoder, VAE and tokenizer (the same for every Wan2.1 model): linked from `link_from`
    where it has them, else written. Returns the seconds each took."""
    import torch

    from orchestrator.backends.diffsynth_files import TEXT_ENCODER, TOKENIZER
    from orchestrator.demo.random_checkpoints import offline_tokenizer
    seconds = {}
    shared = {f"{TEXT_ENCODER}.pth": "text_encoder", "Wan2.1_VAE.pth": "vae", TOKENIZER.split("/")[0]: "tokenizer"}
    for name, component in shared.items():
        target = folder / name
        t0 = time.monotonic()
        if link_from is not None and (link_from / name).exists():
            if not target.exists():
                os.symlink((link_from / name).resolve(), target)
        elif component == "text_encoder":
            torch.save(_tensors(keys["text_encoder"], torch.bfloat16, device, generator), target)
        elif component == "vae":
            torch.save(_tensors(keys["vae"], torch.float32, device, generator), target)
        else:
            offline_tokenizer(folder / TOKENIZER)
        seconds[component] = time.monotonic() - t0
    return seconds


def check_files(folder: Path, size: str) -> dict:
    """What the backend's pre-start check and DiffSynth's own hash make of the written files."""
    from diffsynth.core.loader.file import hash_model_file

    from orchestrator.backends.diffsynth_files import fingerprint, identify, model_files
    files, problems = model_files(folder)
    found = identify(files, str(folder))
    return {
        "problems": [p.message for p in problems],
        "dit": {"files": len(files["dit"][0]), "fingerprint": fingerprint(files["dit"][0]),
                "diffsynth_hash": hash_model_file(files["dit"][0]), "expected": SIZES[size],
                "recognised_as": (found["dit"][0] or {}).get("extra_kwargs", {}).get("dim")},
        "text_encoder": {"fingerprint": fingerprint(files["text_encoder"]), "expected": TEXT_ENCODER_HASH},
        "vae": {"fingerprint": fingerprint(files["vae"]), "expected": VAE_HASH},
        "gigabytes": {p.name: round(p.stat().st_size / 1e9, 2) for p in sorted(folder.iterdir()) if p.is_file()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?")
    parser.add_argument("--size", choices=tuple(SIZES), default="1.3b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--link-from", type=Path)
    parser.add_argument("--verify-only", action="store_true")
    args = parser.parse_args()
    started = time.monotonic()
    sizes = tuple(SIZES) if args.verify_only else (args.size,)
    for size in sizes:
        report = verify(size)
        print(f"{size}: " + "; ".join(f"{c} {r['tensors']} tensors, {r['parameters'] / 1e9:.3f}B params, "
                                     f"fingerprint {'matches' if r['ok'] else 'DIFFERS from'} DiffSynth's table"
                                     for c, r in report.items()), flush=True)
        if not all(r["ok"] for r in report.values()):
            print(json.dumps(report, indent=1))
            return 1
    if args.verify_only:
        return 0
    if not args.folder:
        parser.error("FOLDER is needed to build")
    folder = Path(args.folder)
    seconds = build(folder, args.size, args.device, args.link_from)
    print(f"built {args.size} at {folder} in {time.monotonic() - started:.1f}s: "
          + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()), flush=True)
    checked = check_files(folder, args.size)
    print(json.dumps(checked, indent=1), flush=True)
    dit = checked["dit"]
    ok = (not checked["problems"] and dit["fingerprint"] == dit["diffsynth_hash"] == SIZES[args.size]
          and checked["text_encoder"]["fingerprint"] == TEXT_ENCODER_HASH and checked["vae"]["fingerprint"] == VAE_HASH)
    print("files recognised: " + ("yes" if ok else "NO"), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
