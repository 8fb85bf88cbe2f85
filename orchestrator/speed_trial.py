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

A step cache (`cache=first_block:0.05`, `cache=taylorseer`, …) saves nothing in one forward pass: it
skips parts of later steps. A candidate with a cache runs one whole job instead of the short one (the
manifest's steps, or `--steps N`), and eager runs that whole job too when any candidate has a cache:
its seconds, the job info's count of the denoiser calls that reused a cached step, and the PSNR of
its frames against eager's whole job. MagCache's first job calibrates (stored for the sweep, under
`.sweep/compile_cache/magcache/`) and is run again for the timing. On random weights only the
fixed-schedule caches' speed is their real one (CACHE_CAVEAT).
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
from .manifest.model import CACHE_METHODS, cache_text, parse_cache
from .speed import FIXED_SCHEDULE_CACHES
from .validation import load_manifest

log = logging.getLogger(__name__)

EAGER = SpeedConfig()
# `attention=sage` too: SageAttention 2's 8-bit kernels, the attention lever of Ampere cards (no fp8); where it
# is not installed (or the card is older than sm80) it is left out, saying why, as fp8 is without an fp8 card.
DEFAULT_CANDIDATES = ("compile=blocks", "compile=blocks,quantize=fp8", "attention=sage")
MIN_PSNR_DB = 20.0  # below this the frames are another picture, not eager's rounded differently
SPEED_KEYS = ("compile", "attention", "quantize", "cache")
ADAPTIVE_CACHES = tuple(method for method in CACHE_METHODS if method not in FIXED_SCHEDULE_CACHES)
CACHE_CAVEAT = (f"Step caches: on random weights the adaptive methods' skip decisions ({', '.join(ADAPTIVE_CACHES)}) "
                "mean nothing, so neither does their speed or drift there; the fixed-schedule ones "
                f"({', '.join(FIXED_SCHEDULE_CACHES)}) skip the same steps on any weights and give their real speed "
                "(though not their drift). On your own trained weights both are real.")


class TrialError(WanSweepError, ValueError):
    """A candidate written wrongly on the command line."""


def parse_candidate(text: str) -> SpeedConfig:
    """`compile=blocks,quantize=fp8`, `cache=first_block:0.05` (or `eager`) → SpeedConfig. A cache's further
    options follow it after commas: `cache=taylorseer:interval=4,warmup=2,quantize=int8`."""
    if text.strip() in ("eager", "none", ""):
        return EAGER
    values: dict[str, str] = {}
    key = None
    for item in text.split(","):
        name, sep, value = (part.strip() for part in item.partition("="))
        if name not in SPEED_KEYS and key == "cache" and sep:  # one more option of the cache before it
            values["cache"] += f",{item.strip()}"
            continue
        if not sep or name not in SPEED_KEYS:
            raise TrialError(f"candidate `{text}`: `{item}` is not compile=…, attention=…, quantize=… or cache=…")
        key, values[name] = name, value
    for name, choices in (("compile", COMPILE_MODES), ("quantize", QUANTIZE_MODES)):
        if name in values and values[name] not in choices:
            raise TrialError(f"candidate `{text}`: {name} {values[name]!r} is not one of {', '.join(choices)}")
    if "cache" in values:
        try:
            values["cache"] = parse_cache_candidate(values["cache"])
        except ValueError as error:
            raise TrialError(f"candidate `{text}`: {error}") from None
    return SpeedConfig(**values)


def parse_cache_candidate(text: str) -> str:
    """`first_block:0.05` (the method's main option), `first_block:threshold=0.05`, `taylorseer`,
    `taylorseer:interval=4,warmup=2` or `none` → the canonical text (`cache_text`), each option checked
    against its range as the manifest checks it. Raises ValueError saying what is wrong."""
    method, _, rest = text.partition(":")
    method = method.strip()
    if method == "none" and not rest:
        return "none"
    if method not in CACHE_METHODS:
        raise ValueError(f"cache {method!r} is not one of none, {', '.join(CACHE_METHODS)}")
    main, table = CACHE_METHODS[method]
    options = {}
    for pair in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, given = (part.strip() for part in pair.partition("="))
        key, given = (key, given) if sep else (main, key)
        if key not in table:
            raise ValueError(f"cache {method} has no option {key!r} (it has: {', '.join(table)})")
        default, lowest, highest, kind = table[key]
        try:
            number = float(given)
        except ValueError:
            number = None
        if number is None or (kind is int and number != int(number)) or not lowest <= number <= highest:
            what = "a whole number" if kind is int else "a number"
            raise ValueError(f"cache {method} {key} {given!r} is out of range: use {what} from {lowest} to "
                             f"{highest} (default {default})")
        options[key] = kind(number)
    return cache_text(method, options)


def cache_label(text: str) -> str:
    """A cache's short name: the main option's value of a one-option method (`first_block:0.05`), else the
    options that differ from their defaults (`taylorseer`, `taylorseer:interval=4`); `parse_cache_candidate`
    reads it back."""
    method, options = parse_cache(text)
    if method == "none":
        return "none"
    main, table = CACHE_METHODS[method]
    if len(table) == 1:
        return f"{method}:{options[main]!r}"
    changed = [f"{key}={value!r}" for key, value in options.items() if value != table[key][0]]
    return method + (":" + ",".join(changed) if changed else "")


def cache_manifest_text(text: str) -> str:
    """The `cache:` value to paste into a manifest: `{first_block: 0.05}`, `taylorseer`,
    `{taylorseer: {interval: 4}}`."""
    method, options = parse_cache(text)
    main, table = CACHE_METHODS[method]
    changed = {key: value for key, value in options.items() if value != table[key][0] or key == main and len(table) == 1}
    if not changed:
        return method
    if list(changed) == [main]:
        return f"{{{method}: {changed[main]!r}}}"
    return f"{{{method}: {{" + ", ".join(f"{key}: {value!r}" for key, value in changed.items()) + "}}"


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
    if isinstance(outcome.get("whole_job_seconds"), (int, float)):
        parts.append(f"whole job {outcome['whole_job_seconds']:.1f}s ({outcome.get('whole_job_steps')} steps)")
    if outcome.get("reuse"):
        parts.append(f"{reuse_text(outcome['reuse'])} calls reused")
    if isinstance(outcome.get("calibration_job_seconds"), (int, float)):
        parts.append(f"magcache calibrated in a first job of {outcome['calibration_job_seconds']:.1f}s (stored)")
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
    parts = [f"{k}={cache_label(v) if k == 'cache' else v}" for k, v in asdict(speed).items() if v != getattr(EAGER, k)]
    return ",".join(parts) or "eager"


def has_cache(speed: SpeedConfig) -> bool:
    return speed.cache != "none"


def reuse_text(reuse: dict) -> str:
    """`12/16`: denoiser calls that reused a cached step, of all; with the self-attentions computed of all
    (`0/16, attention 40/64`) where a cache skips attentions inside blocks that ran (FasterCache, PAB)."""
    text = f"{reuse['calls_reused']}/{reuse['calls']}"
    if reuse.get("attention_computed", reuse.get("blocks_computed")) != reuse.get("blocks_computed"):
        text += f", attention {reuse['attention_computed']}/{reuse['blocks_total']}"
    return text


def _folder(work: Path, name: str) -> Path:
    return work / name.replace("=", "-").replace(",", "_")


def run_trials(manifest: Manifest, candidates: list[SpeedConfig], work: Path, steps: int = 4,
               warm: bool = False, timeout_s: float = 1800, whole_job_steps: int | None = None) -> list[dict]:
    """Each candidate in its own process (cold compile cache, then warm if asked); eager first. With a
    step cache among them, the cached candidates and eager run a whole job of `whole_job_steps` (default:
    the manifest's steps) instead of, or besides, the short job of `steps`."""
    candidates = [EAGER] + [c for c in candidates if c != EAGER]
    if any(has_cache(c) for c in candidates):
        whole_job_steps = whole_job_steps or manifest.generation.steps
    else:
        whole_job_steps = None
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for speed in candidates:
        name = label(speed)
        folder = _folder(work, name)
        runs = [("cold", True)] + ([("warm", False)] if warm and speed.compile != "none" else [])
        result: dict = {"speed": asdict(speed), "label": name}
        whole = whole_job_steps if whole_job_steps and (has_cache(speed) or speed == EAGER) else None
        for kind, fresh in runs:
            log.info("speed trial %s (%s compile cache) …", name, kind)
            outcome = _trial_process(manifest, speed, folder, steps, fresh_cache=fresh, timeout_s=timeout_s,
                                     **({"whole_job_steps": whole} if whole else {}))
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
                   timeout_s: float, whole_job_steps: int | None = None) -> dict:
    import shutil
    folder.mkdir(parents=True, exist_ok=True)
    cache = folder / "compile_cache"
    if fresh_cache and cache.exists():
        shutil.rmtree(cache)
    if fresh_cache:  # an earlier trial's arrays (another step count, another job) must not be compared
        for stale in folder.glob("*.npy"):
            stale.unlink()
    request = {"manifest": str(manifest.path), "speed": asdict(speed), "steps": steps, "folder": str(folder),
               "whole_job_steps": whole_job_steps}
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
    """Drift of each candidate from the eager one: relative L2 of the denoiser output, PSNR of the frames of
    the same job (a cached candidate's whole job against eager's whole job)."""
    eager = _folder(work, label(EAGER))
    reference_out = eager / "denoiser_out.npy"
    for result in results:
        folder = _folder(work, result["label"])
        if result.get("error") or not reference_out.exists():
            continue
        out, ref = np.load(folder / "denoiser_out.npy"), np.load(reference_out)
        result["denoiser_rel_l2"] = float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-12))
        name = "frames_whole.npy" if (folder / "frames_whole.npy").exists() else "frames.npy"
        if not (folder / name).exists() or not (eager / name).exists():
            continue
        frames, ref_frames = np.load(folder / name), np.load(eager / name)
        mse = float(np.mean((frames.astype(np.float64) - ref_frames.astype(np.float64)) ** 2))
        result["frames_psnr_db"] = math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def format_trials(results: list[dict], manifest: Manifest) -> str:
    """The table and the `speed:` block of the fastest candidate that ran."""
    g = manifest.generation
    steps = next((r["steps_per_video"] for r in results if r.get("steps_per_video")), g.steps)
    cached = any(r.get("speed", {}).get("cache", "none") != "none" for r in results)
    how = ("the whole job's time where one ran at the manifest's steps, else the short job's time plus the "
           f"rest of the manifest's {steps} steps at s/step" if cached else
           f"the short job's time plus the rest of the manifest's {steps} steps at s/step")
    lines = [f"Speed of {manifest.model.backend} {manifest.model.task} {manifest.model.path} at "
             f"{g.width}x{g.height}x{g.num_frames} on {device_text(results)} (s/video: {how}):", ""]
    header = ["candidate", "s/step", "s/video", "s/forward", "first call", "first call (warm)", "load",
              "peak GiB", "rel L2", "PSNR dB"]
    if cached:
        header[3:3] = ["whole job", "calls reused"]
    eager_whole = next((r.get("whole_job_seconds") for r in results if r["label"] == "eager"), None)
    rows = []
    for r in results:
        if r.get("error"):
            rows.append([r["label"], f"failed: {r['error']}"] + [""] * (len(header) - 2))
            continue
        psnr = r.get("frames_psnr_db")
        peak = r.get("peak_memory_bytes")
        row = [r["label"], _f(r.get("seconds_per_step"), 2), _f(r.get("seconds_per_video"), 1),
               _f(r.get("seconds_per_forward"), 3),
               _f(r.get("first_call_seconds"), 1, "s"), _f(r.get("first_call_warm_seconds"), 1, "s"),
               _f(r.get("load_seconds"), 1, "s"), _f(peak / 2**30 if peak else None, 1),
               f"{100 * r['denoiser_rel_l2']:.2f}%" if "denoiser_rel_l2" in r else "-",
               "identical" if psnr == math.inf else _f(psnr, 1)]
        if cached:
            whole = r.get("whole_job_seconds")
            gain = f" ({eager_whole / whole:.2f}x)" if whole and eager_whole and r["label"] != "eager" else ""
            row[3:3] = [f"{whole:.1f}s{gain}" if whole is not None else "-",
                        reuse_text(r["reuse"]) if r.get("reuse") else "-"]
        rows.append(row)
    # a failure's message spans the row: it sets no column's width
    widths = [max(len(str(row[i])) for row in [header] + rows if i == 0 or not str(row[1]).startswith("failed: "))
              for i in range(len(header))]
    for row in [header] + rows:
        lines.append("  " + "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    if cached:
        whole_steps = next((r["whole_job_steps"] for r in results if r.get("whole_job_steps")), None)
        lines += ["", f"whole job: one job of {whole_steps} steps, timed whole (a step cache saves nothing in one "
                  "forward pass), and its speed-up over eager's; calls reused: the denoiser calls (steps × guidance "
                  "passes, both experts) that reused a cached step, of all (and the self-attentions computed, of all, where a cache "
                  "skips those instead); a cached candidate's PSNR is of its "
                  "whole job's frames against eager's.", CACHE_CAVEAT]
    guarded = [(r["label"], r["attention_guard"]) for r in results
               if not r.get("error") and isinstance(r.get("attention_guard"), dict)]
    if guarded:
        lines += ["", "attention kernel of each candidate, checked by the guard against float32 math before its "
                  "first job (a kernel out of bound stops a worker; see attention_guard):"]
        lines += [f"  {name}: {guard_text(guard)}" for name, guard in guarded]
    # a candidate whose frames are far from eager's (PSNR under 20 dB: another picture, not rounding)
    # is not recommended, however fast
    ran = [r for r in results if not r.get("error") and r.get("seconds_per_step")
           and r.get("frames_psnr_db", math.inf) >= MIN_PSNR_DB]
    if ran:
        # by s/video where every one has it (a cached step's mean s/step hides its warm-up steps), else s/step
        key = "seconds_per_video" if all(r.get("seconds_per_video") for r in ran) else "seconds_per_step"
        best = min(ran, key=lambda r: r[key])
        eager = next((r for r in ran if r["label"] == "eager"), None)
        gain = f" ({eager[key] / best[key]:.2f}x eager)" if eager else ""
        speed = {k: cache_manifest_text(v) if k == "cache" else v for k, v in best["speed"].items()
                 if v != getattr(EAGER, k)}
        lines += ["", f"fastest: {best['label']}{gain}; paste into the manifest:",
                  "  speed: {" + ", ".join(f"{k}: {v}" for k, v in speed.items()) + "}" if speed else
                  "  (no speed: section; eager was fastest)",
                  "Look at the drift before you switch: quantize and cache change the pictures (they are part of "
                  "each job's identity); compile and attention only round differently."]
    return "\n".join(lines)


def guard_text(guard: dict) -> str:
    """`sage (sageattention 2.2.0+d1a57a5): error 0.041 ≤ 0.1`, what auto skipped, or `none`."""
    if guard.get("kernel") in (None, "none"):
        return "none (no attention in this process)"
    text = f"{guard['kernel']} ({guard.get('version', '?')})"
    if isinstance(guard.get("error"), (int, float)):
        text += f": error {guard['error']:.2g} ≤ {guard.get('bound')}"
    if guard.get("skipped"):
        text += "; auto skipped " + ", ".join(str(skipped.get("kernel")) for skipped in guard["skipped"])
    return text


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
                   "device": torch.cuda.get_device_name(0) if cuda else None,
                   # the attention kernel this candidate runs, as the worker's guard checked it (attention_guard)
                   "attention_guard": backend.load_info.get("attention_guard")}
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
    g = manifest.generation
    full = int(g.steps * g.denoising_strength) if manifest.model.task == "v2v" else g.steps
    whole_steps = request.get("whole_job_steps")
    if has_cache(speed):  # the first job's one-time work (the prompt's encoding, kernels' autotuning) left out
        log.info("warm-up: the short job (%d steps) without the cache, untimed …", generation.steps)
        backend.generate(replace(job, model=replace(model, speed=replace(speed, cache="none"))),
                         lambda step, steps: None)
    else:  # (a cache's skips depend on the step count: its short job would say nothing)
        log.info("denoiser: first call %.1fs, %.3fs per forward; the short job (%d steps) …",
                 facts["first_call_seconds"], facts["seconds_per_forward"], generation.steps)
        frames, seconds = timed(lambda: backend.generate(job, lambda step, steps: None))
        info = backend.job_info()  # seconds per step: between step ends, so the first step's warm-up is out
        facts["seconds_per_step"] = info.get("seconds_per_step")
        facts["job_seconds"] = round(seconds, 2)
        ran = info.get("steps") or generation.steps
        if facts["seconds_per_step"]:  # the manifest's own step count: the extra steps at the steady rate
            facts["seconds_per_video"] = round(seconds + (full - ran) * facts["seconds_per_step"], 1)
            facts["steps_per_video"] = full
        frames = np.asarray(frames)
        facts["frames_mean_std"] = [round(float(frames.mean()), 1), round(float(frames.std()), 1)]
        np.save(folder / "frames.npy", frames)
    if whole_steps:
        whole = replace(job, generation=replace(first.generation, steps=int(whole_steps)))
        facts.update(_whole_job(backend, whole, timed, folder))
        if has_cache(speed):  # its mean step, the reused ones with the computed ones
            facts["seconds_per_step"] = facts["whole_job_seconds_per_step"]
        if int(whole_steps) == g.steps:  # measured, not extrapolated (a cache's skips are not uniform)
            facts["seconds_per_video"] = facts["whole_job_seconds"]
            facts["steps_per_video"] = full
    facts["peak_memory_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
    backend.close()
    return facts


def _whole_job(backend, job, timed, folder: Path) -> dict:
    """One whole job (a step cache's effect shows only across its steps): seconds, the job info's seconds
    per step and its cache counts; frames saved as frames_whole.npy. MagCache's first job of a step count
    also calibrates (one uncached run, stored for the sweep): that one is timed apart and the job run again."""
    log.info("the whole job (%d steps, cache %s) …", job.generation.steps, job.model.speed.cache)
    frames, seconds = timed(lambda: backend.generate(job, lambda step, steps: None))
    info = backend.job_info()
    facts: dict = {}
    if (info.get("cache") or {}).get("calibration") == "calibrated":
        facts["calibration_job_seconds"] = round(seconds, 2)
        log.info("magcache calibrated in that job (%.1fs with it); the job again, timed …", seconds)
        frames, seconds = timed(lambda: backend.generate(job, lambda step, steps: None))
        info = backend.job_info()
    facts.update(whole_job_steps=info.get("steps") or job.generation.steps, whole_job_seconds=round(seconds, 2),
                 whole_job_seconds_per_step=info.get("seconds_per_step"))
    if info.get("cache"):
        facts["cache"] = info["cache"]
        facts["reuse"] = reuse_counts(info["cache"])
    frames = np.asarray(frames)
    facts["whole_job_frames_mean_std"] = [round(float(frames.mean()), 1), round(float(frames.std()), 1)]
    np.save(folder / "frames_whole.npy", frames)
    return facts


def reuse_counts(cache_info: dict) -> dict:
    """A job info's `cache` summed over its denoisers (both experts of Wan2.2): calls (steps × guidance
    passes), calls that reused a cached step, and blocks computed of all (diffusers only)."""
    experts = [counts for counts in cache_info.values() if isinstance(counts, dict) and "calls" in counts]
    calls = sum(c["calls"] for c in experts)
    reused = sum(c["calls_reused"] if "calls_reused" in c else c["calls"] - c.get("calls_computed", c["calls"])
                 for c in experts)
    summary = {"calls": calls, "calls_reused": reused}
    if experts and all("blocks_total" in c for c in experts):
        summary.update(blocks_computed=sum(c["blocks_computed"] for c in experts),
                       blocks_total=sum(c["blocks_total"] for c in experts),
                       attention_computed=sum(c.get("attention_computed", c["blocks_computed"]) for c in experts))
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # INFO with times: the trial's log (trial.log) says where a slow candidate spends its time
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(json.dumps(_one(json.loads(argv[0]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
