"""`models speed MANIFEST`: try speed settings on this machine's GPU (its CPU without one) with the
manifest's model, task and shapes, and print the `speed:` block to paste, as `models fit` does for memory.

Each candidate runs in a fresh process (compiled graphs, quantized weights and peak memory must not
carry over), with its own empty compile cache, then once more with that cache filled when `--warm`
is given. Per candidate:
  - load: seconds to load the model and apply the settings;
  - first call: the first forward pass of the denoiser (where torch.compile compiles), on seeded
    latents; a conditioned task's denoiser also gets the first job's encoded inputs (its audio
    features, control video, pose and face: `Backend.prepare_denoise`), recorded before any timing;
  - seconds per forward pass of the denoiser, then a short real job (`--steps`, the manifest's first
    prompt and reference, seed 0) twice: seconds per denoising step of the second, peak GPU memory;
  - drift from eager bf16 (the first candidate, added when missing): the relative L2 of the
    denoiser's output on the same seeded inputs, and the PSNR of the decoded frames of the same job.
"""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from .backend import backend_class
from .errors import WanSweepError
from .harness import open_backend
from .jobs import expand
from .manifest import COMPILE_MODES, QUANTIZE_MODES, Manifest, SpeedConfig
from .validation import load_manifest

log = logging.getLogger(__name__)

EAGER = SpeedConfig()
DEFAULT_CANDIDATES = ("compile=blocks", "compile=blocks,quantize=fp8")
MIN_PSNR_DB = 20.0  # below this the frames are another picture, not eager's rounded differently


class TrialError(WanSweepError, ValueError):
    """A candidate written wrongly on the command line."""


def parse_candidate(text: str) -> SpeedConfig:
    """`compile=blocks,quantize=fp8` (or `eager`) → SpeedConfig."""
    if text.strip() in ("eager", "none", ""):
        return EAGER
    values = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in ("compile", "attention", "quantize"):
            raise TrialError(f"candidate `{text}`: `{item}` is not compile=…, attention=… or quantize=…")
        if key == "compile" and value not in COMPILE_MODES or key == "quantize" and value not in QUANTIZE_MODES:
            raise TrialError(f"candidate `{text}`: {key} {value!r} is not one of "
                             f"{', '.join(COMPILE_MODES if key == 'compile' else QUANTIZE_MODES)}")
        values[key] = value
    return SpeedConfig(**values)


def candidate_problems(manifest: Manifest, speed: SpeedConfig) -> list[str]:
    """What `run` would refuse in this manifest with `speed` as its `speed:` section (the backend's own
    check, as `load_manifest` runs it: fp8 on a card without fp8, torchao missing, …), each with its fix;
    checked before any candidate loads the model. Problems the manifest has with its own settings are not
    the candidate's."""
    backend = backend_class(manifest.model.backend)
    own = {str(found) for found in backend.check(manifest)}
    trial = replace(manifest, model=replace(manifest.model, speed=speed))
    said = []
    for found in backend.check(trial):
        if str(found) not in own:
            fix = getattr(found, "fix", "")
            said.append(getattr(found, "message", str(found)) + (f" (fix: {fix})" if fix else ""))
    return said


def describe_outcome(outcome: dict) -> str:
    """One candidate's figures as they come in, rounded: `load 41.2s, first call 12.3s, 0.0987 s/forward, …`."""
    if outcome.get("error"):
        return f"failed: {outcome['error']}"
    parts = []
    for key, text in (("load_seconds", "load {:.1f}s"), ("first_call_seconds", "first call {:.1f}s"),
                      ("seconds_per_forward", "{:.3g} s/forward"), ("seconds_per_step", "{:.3g} s/step"),
                      ("job_seconds", "short job {:.1f}s"), ("seconds_per_video", "{:.1f} s/video")):
        if isinstance(outcome.get(key), (int, float)):
            parts.append(text.format(outcome[key]))
    if outcome.get("peak_memory_bytes"):
        parts.append(f"peak {outcome['peak_memory_bytes'] / 2**30:.1f} GiB")
    if outcome.get("denoiser_output_finite") is False:
        parts.append("the denoiser's output is NOT finite")
    return ", ".join(parts) or "no figures"


def device_text(results: list[dict]) -> str:
    """Where the candidates ran, as their processes said: a card's name, or the CPU when there was none."""
    devices = {r["device"] for r in results if "device" in r and not r.get("error")}
    if not devices:
        return "this machine"
    if devices == {None}:
        return "this machine's CPU (no GPU)"
    return ", ".join(sorted(d for d in devices if d))


def label(speed: SpeedConfig) -> str:
    parts = [f"{k}={v}" for k, v in asdict(speed).items() if v != getattr(EAGER, k)]
    return ",".join(parts) or "eager"


def _folder(work: Path, name: str) -> Path:
    return work / name.replace("=", "-").replace(",", "_")


def run_trials(manifest: Manifest, candidates: list[SpeedConfig], work: Path, steps: int = 4,
               warm: bool = False, timeout_s: float = 1800) -> list[dict]:
    """Each candidate in its own process (cold compile cache, then warm if asked); eager first."""
    candidates = [EAGER] + [c for c in candidates if c != EAGER]
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for speed in candidates:
        name = label(speed)
        folder = _folder(work, name)
        runs = [("cold", True)] + ([("warm", False)] if warm and speed.compile != "none" else [])
        result: dict = {"speed": asdict(speed), "label": name}
        for kind, fresh in runs:
            log.info("speed trial %s (%s compile cache) …", name, kind)
            outcome = _trial_process(manifest, speed, folder, steps, fresh_cache=fresh, timeout_s=timeout_s)
            cache = f" ({kind} compile cache)" if speed.compile != "none" else ""
            print(f"  {name}{cache}: {describe_outcome(outcome)}",
                  flush=True)  # as each finishes: a long trial that is cut short keeps what it measured
            if kind == "cold":
                result.update(outcome)
            else:
                result["first_call_warm_seconds"] = outcome.get("first_call_seconds")
                result["warm_error"] = outcome.get("error")
        results.append(result)
    _compare(results, work)
    return results


def _trial_process(manifest: Manifest, speed: SpeedConfig, folder: Path, steps: int, fresh_cache: bool,
                   timeout_s: float) -> dict:
    import shutil
    folder.mkdir(parents=True, exist_ok=True)
    cache = folder / "compile_cache"
    if fresh_cache and cache.exists():
        shutil.rmtree(cache)
    request = {"manifest": str(manifest.path), "speed": asdict(speed), "steps": steps, "folder": str(folder)}
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    log_path = folder / ("trial.log" if fresh_cache else "trial_warm.log")
    started = time.monotonic()
    # The child writes its log as it goes (not captured and written at the end), so a trial that is cut
    # off, or a device call that ends mid-trial, still shows how far it got and where its time went.
    with open(log_path, "w", encoding="utf-8") as sink:
        try:
            done = subprocess.run([sys.executable, "-m", "orchestrator.speed_trial", json.dumps(request)],
                                  stdout=sink, stderr=subprocess.STDOUT, text=True, env=env, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout_s:.0f}s"}
    output = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    lines = [line for line in output if line.startswith("{")]
    if done.returncode != 0 or not lines:
        last = next((line for line in reversed(output) if line.strip()), "no output")
        return {"error": f"exit {done.returncode}: {last[:300]}", "wall_seconds": round(time.monotonic() - started, 1)}
    return json.loads(lines[-1])


def _compare(results: list[dict], work: Path) -> None:
    """Drift of each candidate from the eager one: relative L2 of the denoiser output, PSNR of frames."""
    eager = _folder(work, label(EAGER))
    reference_out, reference_frames = eager / "denoiser_out.npy", eager / "frames.npy"
    for result in results:
        folder = _folder(work, result["label"])
        if result.get("error") or not reference_out.exists():
            continue
        out, ref = np.load(folder / "denoiser_out.npy"), np.load(reference_out)
        result["denoiser_rel_l2"] = float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-12))
        frames, ref_frames = np.load(folder / "frames.npy"), np.load(reference_frames)
        mse = float(np.mean((frames.astype(np.float64) - ref_frames.astype(np.float64)) ** 2))
        result["frames_psnr_db"] = math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def format_trials(results: list[dict], manifest: Manifest) -> str:
    """The table and the `speed:` block of the fastest candidate that ran."""
    g = manifest.generation
    steps = next((r["steps_per_video"] for r in results if r.get("steps_per_video")), g.steps)
    lines = [f"Speed of {manifest.model.backend} {manifest.model.task} {manifest.model.path} at "
             f"{g.width}x{g.height}x{g.num_frames} on {device_text(results)} (s/video: the short job's time "
             f"plus the rest of the manifest's {steps} steps at s/step):", ""]
    header = ["candidate", "s/step", "s/video", "s/forward", "first call", "first call (warm)", "load",
              "peak GiB", "rel L2", "PSNR dB"]
    rows = []
    for r in results:
        if r.get("error"):
            rows.append([r["label"], f"failed: {r['error']}"] + [""] * (len(header) - 2))
            continue
        psnr = r.get("frames_psnr_db")
        peak = r.get("peak_memory_bytes")
        rows.append([r["label"], _f(r.get("seconds_per_step"), 2), _f(r.get("seconds_per_video"), 1),
                     _f(r.get("seconds_per_forward"), 3),
                     _f(r.get("first_call_seconds"), 1, "s"), _f(r.get("first_call_warm_seconds"), 1, "s"),
                     _f(r.get("load_seconds"), 1, "s"), _f(peak / 2**30 if peak else None, 1),
                     f"{100 * r['denoiser_rel_l2']:.2f}%" if "denoiser_rel_l2" in r else "-",
                     "identical" if psnr == math.inf else _f(psnr, 1)])
    # a failure's message spans the row: it sets no column's width
    widths = [max(len(str(row[i])) for row in [header] + rows if i == 0 or not str(row[1]).startswith("failed: "))
              for i in range(len(header))]
    for row in [header] + rows:
        lines.append("  " + "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    # a candidate whose frames are far from eager's (PSNR under 20 dB: another picture, not rounding)
    # is not recommended, however fast
    ran = [r for r in results if not r.get("error") and r.get("seconds_per_step")
           and r.get("frames_psnr_db", math.inf) >= MIN_PSNR_DB]
    if ran:
        best = min(ran, key=lambda r: r["seconds_per_step"])
        eager = next((r for r in ran if r["label"] == "eager"), None)
        gain = f" ({eager['seconds_per_step'] / best['seconds_per_step']:.2f}x eager)" if eager else ""
        speed = {k: v for k, v in best["speed"].items() if v != getattr(EAGER, k)}
        lines += ["", f"fastest: {best['label']}{gain}; paste into the manifest:",
                  "  speed: {" + ", ".join(f"{k}: {v}" for k, v in speed.items()) + "}" if speed else
                  "  (no speed: section; eager was fastest)",
                  "Look at the drift before you switch: quantize changes the pictures (it is part of each job's "
                  "identity); compile and attention only round differently."]
    return "\n".join(lines)


def _f(value, digits: int, unit: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


# --------------------------------------------------------------------------------------------------
# One candidate, in its own process


def _one(request: dict) -> dict:
    import torch


    manifest = load_manifest(request["manifest"])
    folder = Path(request["folder"])
    speed = SpeedConfig(**request["speed"])
    model = replace(manifest.model, speed=speed)
    generation = replace(manifest.generation, steps=int(request["steps"]))
    cuda = torch.cuda.is_available()
    log.info("loading %s with %s", model.path, label(speed))
    backend = open_backend(model, generation, (0,) if cuda else ())
    facts: dict = {"load_seconds": backend.load_info["load_seconds"],
                   "device": torch.cuda.get_device_name(0) if cuda else None}
    log.info("loaded in %.1fs; first denoiser call (compiles, if compile is on) …", facts["load_seconds"])

    def timed(call):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        value = call()
        if cuda:
            torch.cuda.synchronize()
        return value, time.perf_counter() - t0

    first = expand(manifest)[0]  # the short job: its own settings with the trial's speed and steps
    job = replace(first, seed=0, model=model, generation=replace(first.generation, steps=generation.steps))
    backend.prepare_denoise(job)  # a conditioned task's denoiser inputs (its hints, audio, pose), untimed
    out, facts["first_call_seconds"] = timed(lambda: backend.denoise_once(seed=0))
    times = [timed(lambda: backend.denoise_once(seed=0))[1] for _ in range(3)]
    facts["seconds_per_forward"] = round(sorted(times)[1], 4)
    facts["denoiser_output_finite"] = bool(torch.isfinite(out).all())
    np.save(folder / "denoiser_out.npy", out.float().cpu().numpy())
    del out
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    log.info("denoiser: first call %.1fs, %.3fs per forward; the short job (%d steps) …",
             facts["first_call_seconds"], facts["seconds_per_forward"], generation.steps)
    frames, seconds = timed(lambda: backend.generate(job, lambda step, steps: None))
    info = backend.job_info()  # seconds per step: between step ends, so the first step's warm-up is out
    facts["seconds_per_step"] = info.get("seconds_per_step")
    facts["job_seconds"] = round(seconds, 2)
    g = manifest.generation
    full = int(g.steps * g.denoising_strength) if manifest.model.task == "v2v" else g.steps
    ran = info.get("steps") or generation.steps
    if facts["seconds_per_step"]:  # the manifest's own step count: the extra steps at the steady rate
        facts["seconds_per_video"] = round(seconds + (full - ran) * facts["seconds_per_step"], 1)
        facts["steps_per_video"] = full
    facts["peak_memory_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
    frames = np.asarray(frames)
    facts["frames_mean_std"] = [round(float(frames.mean()), 1), round(float(frames.std()), 1)]
    np.save(folder / "frames.npy", frames)
    backend.close()
    return facts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # INFO with times: the trial's log (trial.log) says where a slow candidate spends its time
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(json.dumps(_one(json.loads(argv[0]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
