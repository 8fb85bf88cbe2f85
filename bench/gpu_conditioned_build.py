"""Full-size random-weight checkpoints of Wan's conditioned models in the original layout (issue 23).

    python bench/gpu_conditioned_build.py ROOT --models vace13 control13 [--device cuda]
    python bench/gpu_conditioned_build.py --verify-only        # no weights: checks the fingerprints (CPU)

Each model is a folder under ROOT named as its release, recognised by DiffSynth's own model table
(`diffsynth/configs/model_configs.py`: an md5 of the file's tensor names and shapes):
  vace13     Wan2.1-VACE-1.3B               the T2V-1.3B DiT and the VACE blocks in one file  a6145340…
  control13  Wan2.1-Fun-V1.1-1.3B-Control   48 input channels, a reference conv                70ddad9d…
  s2v14      Wan2.2-S2V-14B  (second stage) the S2V DiT (4 shards) + `wav2vec2-large-xlsr-53-english/`
                                            (Wav2Vec2ForCTC weights as released, its processor files)
  animate14  Wan2.2-Animate-14B (second stage) the I2V-14B DiT and the Animate adapter (4 shards)
The layouts come from DiffSynth's classes instantiated on the meta device (no memory) with the
configuration the table lists for that fingerprint, and every other model the table files under the
same fingerprint (VACE blocks, the Animate adapter) is added to the DiT's file, as in the releases.
The text encoder, VAE and tokenizer are those of `Wan2.1-T2V-1.3B/` (built first under ROOT by
gpu_diffsynth_build.build, which is also the t2v baseline) and linked, not copied.

The CLIP image encoder (`models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`, for control13 and
animate14): DiffSynth keeps only its visual half (its own class on meta gives those names and shapes), but
recognises the file by all of it, so the text half is written too, by the layout of the released file
(`clip_text_layout`: an XLM-RoBERTa-large text tower and its projection head); the fingerprint then matches
DiffSynth's table (5941c53e…).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import gpu_diffsynth_build as base  # noqa: E402  (the T2V builder: its helpers and layouts)

AUDIO_ENCODER_HASH = "06be60f3a4526586d8431cd038a71486"
IMAGE_ENCODER_HASH = "5941c53e207d62f20f9025686193c40b"
BASE_FOLDER = "Wan2.1-T2V-1.3B"


@dataclass(frozen=True)
class Release:
    folder: str
    task: str          # the manifest's model.task
    dit_hash: str      # DiffSynth's table entry the DiT's file must match
    shards: int
    audio_encoder: bool = False
    image_encoder: bool = False  # the CLIP file: the reference image's CLIP features
    stage: int = 1     # 2: 14B, needs a device call of its own


MODELS = {
    "vace13": Release("Wan2.1-VACE-1.3B", "vace", "a61453409b67cd3246cf0c3bebad47ba", 1),
    "control13": Release("Wan2.1-Fun-V1.1-1.3B-Control", "control", "70ddad9d3a133785da5ea371aae09504", 1,
                         image_encoder=True),
    "s2v14": Release("Wan2.2-S2V-14B", "s2v", "966cffdcc52f9c46c391768b27637614", 4, audio_encoder=True, stage=2),
    "animate14": Release("Wan2.2-Animate-14B", "animate", "31fa352acb8a1b1d33cd8764273d80a2", 4,
                         image_encoder=True, stage=2),
}


def _import(path: str):
    module, name = path.rsplit(".", 1)
    return getattr(__import__(module, fromlist=[name]), name)


def _shapes(module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def dit_layout(release: Release) -> dict[str, list[int]]:
    """{tensor name as in the release's DiT file: shape}: the DiT and each part DiffSynth loads from the
    same file (its table lists them under the DiT's fingerprint), each from its class on meta."""
    import torch
    from orchestrator.backends.diffsynth_files import diffsynth_model_table
    entries = [c for c in diffsynth_model_table() if c.get("model_hash") == release.dit_hash]
    keys: dict[str, list[int]] = {}
    with torch.device("meta"):
        for entry in sorted(entries, key=lambda c: c["model_name"] != "wan_video_dit"):  # the DiT first
            keys.update(_shapes(_import(entry["model_class"])(**entry.get("extra_kwargs", {}))))
    return keys


def audio_encoder_layout() -> tuple[dict[str, list[int]], dict]:
    """The wav2vec2 file's {name: shape} as released (DiffSynth's converter adds `model.` and maps the
    old weight-norm names to torch's parametrizations), and the model's config."""
    import torch
    from diffsynth.models.wav2vec import WanS2VAudioEncoder
    renamed = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}
    with torch.device("meta"):
        encoder = WanS2VAudioEncoder()
    keys = {}
    for name, shape in _shapes(encoder.model).items():
        for new, old in renamed.items():
            name = name.replace(new, old)
        keys[name] = shape
    return keys, encoder.model.config.to_dict()


def clip_text_layout(width: int = 1024, layers: int = 24, ffn: int = 4096, vocabulary: int = 250_002,
                     positions: int = 514) -> dict[str, list[int]]:
    """The text half of the released CLIP file, which DiffSynth drops on loading (its converter skips
    `textual.`) but counts in the file's fingerprint: XLM-RoBERTa-large's embeddings (one token type),
    `layers` post-norm blocks and a two-layer projection head without biases."""
    keys = {"textual.token_embedding.weight": [vocabulary, width], "textual.type_embedding.weight": [1, width],
            "textual.pos_embedding.weight": [positions, width]}
    for i in range(layers):
        block = f"textual.blocks.{i}"
        for projection in "qkvo":
            keys[f"{block}.attn.{projection}.weight"] = [width, width]
            keys[f"{block}.attn.{projection}.bias"] = [width]
        keys.update({f"{block}.norm1.weight": [width], f"{block}.norm1.bias": [width],
                     f"{block}.ffn.0.weight": [ffn, width], f"{block}.ffn.0.bias": [ffn],
                     f"{block}.ffn.2.weight": [width, ffn], f"{block}.ffn.2.bias": [width],
                     f"{block}.norm2.weight": [width], f"{block}.norm2.bias": [width]})
    keys.update({"textual.norm.weight": [width], "textual.norm.bias": [width],
                 "textual.head.0.weight": [width, width], "textual.head.2.weight": [width, width]})
    return keys


def image_encoder_layout() -> dict[str, list[int]]:
    """The CLIP file's {name: shape}: DiffSynth's WanImageEncoder on meta (its converter adds `model.`)
    and the text half."""
    import torch
    from diffsynth.models.wan_video_image_encoder import WanImageEncoder
    with torch.device("meta"):
        encoder = WanImageEncoder()
    visual = {name.removeprefix("model."): shape for name, shape in _shapes(encoder).items()}
    return {**visual, **clip_text_layout()}


def _digest(keys: dict) -> str:
    from diffsynth.core.loader.file import convert_keys_dict_to_single_str
    return hashlib.md5(convert_keys_dict_to_single_str(keys).encode()).hexdigest()


def verify(name: str) -> dict[str, dict]:
    release = MODELS[name]
    checks = {"dit": (dit_layout(release), release.dit_hash)}
    if release.audio_encoder:
        checks["audio_encoder"] = (audio_encoder_layout()[0], AUDIO_ENCODER_HASH)
    if release.image_encoder:
        checks["image_encoder"] = (image_encoder_layout(), IMAGE_ENCODER_HASH)
    return {part: {"hash": _digest(keys), "expected": expected, "ok": _digest(keys) == expected,
                   "tensors": len(keys), "parameters": sum(base._numel(s) for s in keys.values())}
            for part, (keys, expected) in checks.items()}


def write_audio_encoder(folder: Path, device: str, generator) -> None:
    """`wav2vec2-large-xlsr-53-english/`: the weights under their released names, config.json, and the
    processor files DiffSynth's pipeline reads the audio with (a CTC letter vocabulary, built offline)."""
    import torch
    from safetensors.torch import save_file
    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2Processor
    folder.mkdir(parents=True, exist_ok=True)
    keys, config = audio_encoder_layout()
    save_file(base._tensors(keys, torch.float32, device, generator), folder / "model.safetensors")
    letters = ["<pad>", "<s>", "</s>", "<unk>", "|"] + [chr(c) for c in range(ord("A"), ord("Z") + 1)] + ["'"]
    (folder / "vocab.json").write_text(json.dumps({ch: i for i, ch in enumerate(letters)}), encoding="utf-8")
    features = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                        do_normalize=True, return_attention_mask=True)
    Wav2Vec2Processor(feature_extractor=features,
                      tokenizer=Wav2Vec2CTCTokenizer(str(folder / "vocab.json"))).save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config, indent=1, default=str), encoding="utf-8")


def build(root: Path, name: str, device: str) -> dict:
    """The release folder of `name` under root (the shared files linked from root/Wan2.1-T2V-1.3B, built
    first if missing); returns the seconds each part took."""
    import torch

    from orchestrator.backends.diffsynth_files import AUDIO_ENCODER_FOLDER, IMAGE_ENCODER
    release = MODELS[name]
    shared = root / BASE_FOLDER
    seconds = {}
    if not (shared / ".built").exists():
        t0 = time.monotonic()
        base.build(shared, "1.3b", device, None)
        (shared / ".built").touch()
        seconds["t2v_1.3b_base"] = time.monotonic() - t0
    folder = root / release.folder
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=device).manual_seed(1)
    t0 = time.monotonic()
    base.write_dit(folder, dit_layout(release), release.shards, device, generator)
    (folder / "config.json").write_text(json.dumps({"model_type": release.task}), encoding="utf-8")
    seconds["dit"] = time.monotonic() - t0
    if release.audio_encoder:
        t0 = time.monotonic()
        write_audio_encoder(folder / AUDIO_ENCODER_FOLDER, device, generator)
        seconds["audio_encoder"] = time.monotonic() - t0
    if release.image_encoder:
        t0 = time.monotonic()
        clip = folder / f"{IMAGE_ENCODER}.pth"
        if not clip.exists():
            torch.save(base._tensors(image_encoder_layout(), torch.bfloat16, device, generator), clip)
        seconds["image_encoder"] = time.monotonic() - t0
    seconds.update(base.write_shared(folder, {}, device, generator, shared))
    return seconds


def check_files(folder: Path, name: str) -> dict:
    """What the diffsynth backend's pre-start check makes of the written folder (and DiffSynth's own
    hash of the DiT)."""
    from diffsynth.core.loader.file import hash_model_file

    from orchestrator.backends.diffsynth_files import TASK_PARTS, fingerprint, identify, model_files
    release = MODELS[name]
    files, problems = model_files(folder)
    found = identify(files, str(folder))
    parts = [p for p in TASK_PARTS.get(release.task, ()) if p != "audio_encoder"]
    report = {
        "problems": [p.message for p in problems],
        "dit": {"files": len(files["dit"][0]), "fingerprint": fingerprint(files["dit"][0]),
                "diffsynth_hash": hash_model_file(files["dit"][0]), "expected": release.dit_hash,
                "parts_found": found["dit_parts"], "parts_needed": parts},
        "text_encoder": fingerprint(files["text_encoder"]) == base.TEXT_ENCODER_HASH,
        "vae": fingerprint(files["vae"]) == base.VAE_HASH,
        "gigabytes": {p.name: round(p.stat().st_size / 1e9, 2) for p in sorted(folder.iterdir()) if p.is_file()},
    }
    if release.audio_encoder:
        report["audio_encoder"] = {"fingerprint": fingerprint(files["audio_encoder"]) if files["audio_encoder"] else None,
                                   "expected": AUDIO_ENCODER_HASH}
    if release.image_encoder:
        report["image_encoder"] = {"fingerprint": fingerprint(files["image_encoder"]) if files["image_encoder"] else None,
                                   "expected": IMAGE_ENCODER_HASH}
    dit = report["dit"]
    report["ok"] = (not problems and dit["fingerprint"] == dit["diffsynth_hash"] == release.dit_hash
                    and set(parts) <= set(dit["parts_found"]) and report["text_encoder"] and report["vae"]
                    and (not release.audio_encoder or report["audio_encoder"]["fingerprint"] == AUDIO_ENCODER_HASH)
                    and (not release.image_encoder or report["image_encoder"]["fingerprint"] == IMAGE_ENCODER_HASH))
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", type=Path)
    parser.add_argument("--models", nargs="+", choices=tuple(MODELS), default=["vace13", "control13"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--verify-only", action="store_true", help="check every model's fingerprints, write nothing")
    args = parser.parse_args()
    names = tuple(MODELS) if args.verify_only else tuple(args.models)
    failed = False
    for name in names:
        report = verify(name)
        print(f"{name} ({MODELS[name].folder}, stage {MODELS[name].stage}): " + "; ".join(
            f"{part} {r['tensors']} tensors, {r['parameters'] / 1e9:.3f}B params, fingerprint "
            f"{'matches' if r['ok'] else 'DIFFERS from'} DiffSynth's table" for part, r in report.items()), flush=True)
        if not all(r["ok"] for r in report.values()):
            print(json.dumps(report, indent=1))
            failed = True
    if args.verify_only or failed:
        return 1 if failed else 0
    if args.root is None:
        parser.error("ROOT is needed to build")
    for name in names:
        started = time.monotonic()
        seconds = build(args.root, name, args.device)
        print(f"built {name} at {args.root / MODELS[name].folder} in {time.monotonic() - started:.1f}s: "
              + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()), flush=True)
        checked = check_files(args.root / MODELS[name].folder, name)
        print(json.dumps(checked, indent=1), flush=True)
        print(f"{name} files recognised: " + ("yes" if checked["ok"] else "NO"), flush=True)
        failed |= not checked["ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
