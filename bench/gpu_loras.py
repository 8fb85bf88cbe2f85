"""Issue 30 on the GPU machine: what a LoRA costs and what the 4-step distilled recipe saves, measured
through the product's own diffusers backend (`harness.open_backend`, `use_loras`, `generate`, `write_mp4`)
on a Wan2.1-14B-sized random-weight checkpoint and a random rank-64 LoRA in the lightx2v (Wan/ComfyUI) layout.

    python bench/gpu_loras.py CHECKPOINT LORA_DIR --stage eager|compile|fp8 [--tiny]

Stages (one process each; every measurement is printed, and appended to $OUT/loras_<stage>.jsonl as it
is made, so a run cut off by the device call's limit still says what it measured):
  eager    bf16, SDPA's own kernel: seconds per DiT forward with no LoRA, the LoRA as an adapter (unfused),
           and fused (`fuse_lora`); the time to switch strength and to switch file (`use_loras`); s/video of
           the 4-step recipe (distill LoRA, cfg 1, shift 5) twice (the second with its prompt cached), and of
           the 38-step job with CFG 5 and no LoRA, each split into text encoding, DiT, VAE decode and mp4
  compile  bf16 with `compile: blocks` and the LoRA as an adapter: does a change of strength recompile?
           (the first forward, steady forwards, then strength 0.5, 1.0 again and no LoRA, with dynamo's count
           of graphs)
  fp8      `compile: blocks, quantize: fp8` with the LoRA fused before quantizing (what the backend does
           under quantize): load, the first (compiling) forward, steady forwards, and the 4-step video
  vae      the VAE decode alone, the largest part of a 4-step video after the DiT: as run, with cuDNN's
           autotuner, with the decoder compiled; seconds and drift

A CFG step is two forwards (cond and uncond); the 4-step recipe at cfg 1 runs one per step. The text
encoder of these checkpoints is umT5-xxl's width with 2 layers instead of 24 (bench/gpu_build_model.py),
so its time here is a floor; the VAE is Wan's own at full size. `--tiny`: the same on the CPU with the tiny
random checkpoint and a 32x32x5 video (a dry run of the script, not a measurement).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import GpuRecord  # noqa: E402
from orchestrator.demo.random_loras import build_random_lora  # noqa: E402
from orchestrator.file_digests import content_digest  # noqa: E402
from orchestrator.harness import open_backend  # noqa: E402
from orchestrator.jobs import Job  # noqa: E402
from orchestrator.manifest import GenerationConfig, LoraConfig, ModelConfig, SpeedConfig  # noqa: E402
from orchestrator.outputs import write_mp4  # noqa: E402

PROMPT = "a red ball rolls across a wooden table, then falls to the floor"
OUT = Path(os.environ.get("OUT", "/tmp/out"))


class Bench(GpuRecord):
    def __init__(self, stage: str, tiny: bool):
        super().__init__(OUT / f"loras_{stage}.jsonl", tiny, stage=stage)
        self.stage = stage

    def seconds_per_forward(self, backend, count: int, seed: int = 0) -> float:
        self.sync()
        started = time.perf_counter()
        for index in range(count):
            backend.denoise_once(seed + index)
        self.sync()
        return round((time.perf_counter() - started) / count, 3)

    def timed_switch(self, backend, loras) -> float:
        self.sync()
        started = time.perf_counter()
        backend.use_loras(loras)
        backend.model = ModelConfig.from_dict({**backend.model.to_dict(), "loras": [l.to_dict() for l in loras]})
        self.sync()
        return round(time.perf_counter() - started, 3)

    def video(self, backend, name: str, generation: GenerationConfig, loras) -> dict:
        """One job through the backend as a worker runs it (its LoRAs switched first), then its mp4: the
        time split the backend reports, plus the encode."""
        if tuple(loras) != tuple(backend.model.loras):
            self.timed_switch(backend, loras)
        model = ModelConfig.from_dict({**backend.model.to_dict(), "loras": [l.to_dict() for l in loras]})
        output = Path(tempfile.mkdtemp()) / f"{name}.mp4"
        job = Job(id=name, ordinal=0, category="bench", stem=None, reference=None, prompt_index=0, prompt=PROMPT,
                  seed=0, output=str(output), model=model, generation=generation)
        self.sync()
        started = time.perf_counter()
        frames = backend.generate(job, lambda step, steps: None)
        self.sync()
        generate_s = time.perf_counter() - started
        info = backend.job_info()
        started = time.perf_counter()
        write_mp4(frames, output, generation.fps, expected_frames=generation.num_frames)
        mp4_s = time.perf_counter() - started
        parts = {key: round(value, 2) for key, value in (info.get("seconds") or {}).items()}
        facts = {"steps": generation.steps, "cfg": generation.cfg_scale, "shift": generation.shift,
                 "loras": [(lora.name, lora.strength) for lora in loras], "generate_s": round(generate_s, 2),
                 "mp4_s": round(mp4_s, 2), "video_s": round(generate_s + mp4_s, 2), "split": parts,
                 "seconds_per_step": info.get("seconds_per_step"),
                 "peak_gib": round((info.get("peak_memory_bytes") or 0) / 2**30, 1)}
        self.record(f"video {name}", **facts)
        return facts


def vae_stage(bench: Bench, checkpoint: Path, tiny: bool) -> int:
    """The VAE decode of one 832x480x81 video's latents (what follows the 4 DiT steps of the recipe): as the
    backend runs it (bf16), with cuDNN's autotuner (`torch.backends.cudnn.benchmark`), and with the decoder
    compiled; each one's seconds and its drift from the first (max abs and PSNR of the decoded frames)."""
    import torch
    from diffusers import AutoencoderKLWan
    device = "cuda" if bench.cuda else "cpu"
    vae = AutoencoderKLWan.from_pretrained(checkpoint / "vae", torch_dtype=torch.bfloat16).to(device)
    shape = (1, 16, 2, 4, 4) if tiny else (1, 16, 21, 60, 104)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, torch.bfloat16)

    def decode():
        with torch.no_grad():
            return vae.decode(latents, return_dict=False)[0].float().clamp(-1, 1)

    def timed(label: str, reference=None, repeats: int = 2):
        first_started = time.perf_counter()
        frames = decode()  # (warm-up: the autotuner's or the compiler's first call)
        bench.sync()
        first = time.perf_counter() - first_started
        started = time.perf_counter()
        for _ in range(repeats):
            frames = decode()
        bench.sync()
        facts = {"first_s": round(first, 2), "s_per_decode": round((time.perf_counter() - started) / repeats, 3)}
        if reference is not None:
            error = (frames - reference).abs()
            mse = float((error ** 2).mean())
            facts.update(max_abs=round(float(error.max()), 4),
                         psnr_db=round(10 * math.log10(4.0 / mse), 1) if mse > 0 else "inf")
        bench.record(f"vae decode, {label}", **facts)
        return frames
    reference = timed("as the backend runs it (bf16)")
    torch.backends.cudnn.benchmark = True
    timed("cudnn.benchmark", reference)
    vae.decoder = torch.compile(vae.decoder)
    timed("decoder compiled (+ cudnn.benchmark)", reference)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("lora_dir")
    parser.add_argument("--stage", choices=("eager", "compile", "fp8", "vae"), required=True)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    bench = Bench(args.stage, args.tiny)
    torch = bench.torch
    if args.stage == "vae":
        return vae_stage(bench, Path(args.checkpoint), args.tiny)
    lora_dir = Path(args.lora_dir)
    lora_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, seed in (("distill", 1), ("other", 2)):  # the second: what a switch of file reads
        files[name] = lora_dir / f"{name}_rank64.safetensors"
        if not files[name].exists():
            started = time.perf_counter()
            build_random_lora(args.checkpoint, files[name], layout="wan", rank=4 if args.tiny else 64, seed=seed)
            bench.record("built LoRA", file=files[name].name, bytes=files[name].stat().st_size,
                         seconds=round(time.perf_counter() - started, 1))
    distill = LoraConfig("distill", str(files["distill"]), 1.0, digest=content_digest(files["distill"]))
    other = LoraConfig("other", str(files["other"]), 1.0, digest=content_digest(files["other"]))
    size = dict(width=32, height=32, num_frames=5) if args.tiny else dict(width=832, height=480, num_frames=81)
    recipe = GenerationConfig(**size, fps=16, steps=4, cfg_scale=1.0, shift=5.0)
    baseline = GenerationConfig(**size, fps=16, steps=3 if args.tiny else 38, cfg_scale=5.0)
    speed = {"eager": SpeedConfig(), "compile": SpeedConfig(compile="blocks"),
             "fp8": SpeedConfig(compile="blocks", quantize="fp8")}[args.stage]
    model = ModelConfig(backend="diffusers", task="t2v", path=args.checkpoint, dtype="bfloat16", speed=speed,
                        loras=(distill,))
    started = time.perf_counter()
    backend = open_backend(model, recipe, (0,) if bench.cuda else ())
    bench.record("load", seconds=round(time.perf_counter() - started, 1), loras=backend.load_info.get("loras"),
                 device=torch.cuda.get_device_name(0) if bench.cuda else "cpu", torch=torch.__version__)
    repeats = 1 if args.tiny else 2

    if args.stage == "eager":
        bench.seconds_per_forward(backend, 1)  # warm-up
        bench.record("forward, LoRA as adapter", s_per_forward=bench.seconds_per_forward(backend, repeats))
        bench.record("switch to no LoRA", seconds=bench.timed_switch(backend, ()))
        bench.record("forward, no LoRA", s_per_forward=bench.seconds_per_forward(backend, repeats))
        bench.record("switch on (file loaded before)", seconds=bench.timed_switch(backend, (distill,)))
        half = LoraConfig("distill", distill.path, 0.5, digest=distill.digest)
        bench.record("switch strength 1.0 -> 0.5", seconds=bench.timed_switch(backend, (half,)))
        bench.record("switch file (read and load another)", seconds=bench.timed_switch(backend, (other,)))
        # fused: the adapter's delta merged into the bf16 weights (what quantize does before quantizing), then
        # taken out again for the videos
        bench.timed_switch(backend, (distill,))
        pipe = backend.pipe
        active = pipe.get_active_adapters()
        started = time.perf_counter()
        pipe.fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=active)
        bench.record("fuse_lora", seconds=round(time.perf_counter() - started, 2), adapters=active)
        bench.record("forward, LoRA fused", s_per_forward=bench.seconds_per_forward(backend, repeats))
        pipe.unfuse_lora(components=["transformer"])
        bench.video(backend, "recipe_4step_cfg1", recipe, (distill,))
        bench.video(backend, "recipe_4step_cfg1_again", recipe, (distill,))
        bench.video(backend, "baseline_38step_cfg5", baseline, ())  # last: the longest (about 4 min at 14B)

    elif args.stage == "compile":
        from torch._dynamo.utils import counters

        def graphs() -> int:
            return int(counters["stats"]["unique_graphs"])
        bench.record("first forward (compiles), LoRA as adapter", s_per_forward=bench.seconds_per_forward(backend, 1),
                     graphs=graphs())
        bench.record("forward, compiled, LoRA as adapter", s_per_forward=bench.seconds_per_forward(backend, repeats),
                     graphs=graphs())
        for label, loras in (("strength 0.5", (LoraConfig("distill", distill.path, 0.5, digest=distill.digest),)),
                             ("strength 1.0 again", (distill,)), ("no LoRA", ()), ("strength 1.0 once more", (distill,))):
            switch = bench.timed_switch(backend, loras)
            first = bench.seconds_per_forward(backend, 1)
            bench.record(f"after switch: {label}", switch_s=switch, first_forward_s=first,
                         steady_s_per_forward=bench.seconds_per_forward(backend, repeats), graphs=graphs())

    else:  # fp8: the LoRA fused before the weights are quantized, then compiled
        bench.record("first forward (compiles), fp8 + LoRA fused", s_per_forward=bench.seconds_per_forward(backend, 1))
        bench.record("forward, fp8 + compile, LoRA fused", s_per_forward=bench.seconds_per_forward(backend, repeats))
        bench.video(backend, "recipe_4step_cfg1_fp8_compile", recipe, (distill,))
    backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
