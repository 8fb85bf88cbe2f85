"""Measured sizing: how many workers per card, and how many cards per worker: the `sizing` hook of
planning (`Sizer`, `make_sizer`), which reads a cached calibration profile (`profiles`) or measures one
(`calibration`) and decides from it (`decisions`). `plan` prints the measured figures (`expected_times`).

The synthetic backend and CPU slots are not sized (planning's defaults apply).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable

from ..backend import backend_class
from ..gpus import FAKE_ENV, Gpu
from ..manifest import Manifest
from ..planning import DeviceGroup, PlanError
from .calibration import MAX_PROBE_WORKERS, DoesNotFit, calibrate
from .decisions import Decision, decide_workers, fit_count
from .profiles import Profile, ProfileCache, cached_profiles, cards_name, profile_key, profiles_folder

log = logging.getLogger(__name__)

__all__ = ["Calibrator", "Decision", "DoesNotFit", "MAX_PROBE_WORKERS", "Profile", "ProfileCache", "Sizer",
           "cached_profiles", "calibrate", "cards_name", "decide_workers", "expected_times", "fit_count",
           "make_sizer", "needs_sizing", "profile_key", "profiles_folder"]


# --------------------------------------------------------------------------------------------------
# The sizing hook for planning


Calibrator = Callable[..., Profile]


class Sizer:
    """`sizing` hook of `planning.device_groups`: calibrate (or read the cache) and decide."""

    def __init__(self, cache_dir: str | os.PathLike, recalibrate: bool = False,
                 calibrator: Calibrator | None = None, say: Callable[[str], None] | None = None):
        self.cache = ProfileCache(cache_dir)
        self.recalibrate = recalibrate
        self.calibrator = calibrator or calibrate
        self.say = say or log.info
        self.profiles: dict[str, tuple[Profile, str]] = {}  # queue -> (profile, "cached"/"measured")
        self._done: set[str] = set()

    def profile(self, manifest: Manifest, cards: list[Gpu], probe_workers: int) -> tuple[Profile, str]:
        name = cards_name(cards)
        key = profile_key(manifest, name, len(cards))
        path = str(self.cache.path(key))
        if not (self.recalibrate and path not in self._done):
            cached = self.cache.get(key)
            if cached is not None and (not cached.fits or probe_workers <= 1
                                       or max(cached.jobs_per_hour, default=0) > 1
                                       or (cached.peak_nvml_bytes or 0) * 2 > min(g.free_bytes for g in cards)):
                return cached, "cached"
        self.say(f"calibrating {manifest.model.backend} on {', '.join(g.label for g in cards)} ({name}): "
                 f"one real job of these settings, then up to {probe_workers} workers at once…")
        started = time.monotonic()
        try:
            profile = self.calibrator(manifest, cards, probe_workers=probe_workers,
                                      margin_gib=manifest.resources.memory_margin_gib)
        except DoesNotFit as exc:
            profile = Profile(key=key, gpu_name=name, gpu_total_bytes=min(g.total_bytes for g in cards),
                              cards=len(cards), fits=False, notes=[str(exc)])
        profile.key = key
        profile.calibration_seconds = round(time.monotonic() - started, 1)
        profile.created_at = profile.created_at or time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.cache.put(profile)
        self._done.add(path)
        return profile, "measured"

    def __call__(self, manifest: Manifest, gpus: list[Gpu], notes: list[str]) -> list[DeviceGroup]:
        res = manifest.resources
        requested = res.workers_per_gpu
        probe = MAX_PROBE_WORKERS if requested == "auto" else 1
        if isinstance(res.gpus_per_worker, int):
            if res.gpus_per_worker > len(gpus):
                raise PlanError(f"resources.gpus_per_worker is {res.gpus_per_worker}, but only {len(gpus)} "
                                "GPUs are visible")
            per_worker = res.gpus_per_worker
        else:
            per_worker = None
            for k in range(1, len(gpus) + 1):
                profile, _ = self.profile(manifest, gpus[:k], probe)
                if profile.fits:
                    per_worker = k
                    break
            if per_worker is None:
                raise PlanError(f"one worker of this model runs out of memory even on all {len(gpus)} visible "
                                "GPUs together: use offload (model.options) or smaller settings")
            notes.append(f"gpus_per_worker: auto → {per_worker} card(s) per worker (one worker "
                         + ("fits on one card)" if per_worker == 1 else f"did not fit on {per_worker - 1})"))
        groups = []
        for start in range(0, len(gpus) - per_worker + 1, per_worker):
            cards = gpus[start:start + per_worker]
            queue = "gpu" + "+".join(str(g.index) for g in cards)
            if requested != "auto" and not self.recalibrate:
                # An explicit count is obeyed; it is checked against a profile measured before, but
                # never calibrated for (a real job of a 14B model costs minutes): --recalibrate does.
                cached = self.cache.get(profile_key(manifest, cards_name(cards), len(cards)))
                if cached is None:
                    groups.append(DeviceGroup(queue=queue, devices=tuple(g.index for g in cards), workers=requested,
                                              reason=f"workers_per_gpu: {requested} (from the manifest; not measured "
                                                     "here yet: `plan --recalibrate` checks that it fits)",
                                              gpus=tuple(cards)))
                    continue
                profile, source = cached, "cached"
            else:
                profile, source = self.profile(manifest, cards, probe)
            self.profiles[queue] = (profile, source)
            free = min(g.free_bytes for g in cards)
            if not profile.fits:
                groups.append(DeviceGroup(queue=queue, devices=tuple(g.index for g in cards), workers=0,
                                          reason=f"one worker ran out of memory on {len(cards)} such card(s) "
                                                 f"(calibration): no worker here", gpus=tuple(cards)))
                notes.append(f"{queue}: left idle: the model does not fit on it ({profile.gpu_name})")
                continue
            decision = decide_workers(profile, free, res.memory_margin_gib, requested)
            if decision.warning:
                notes.append(f"WARNING {queue}: {decision.warning}")
            groups.append(DeviceGroup(queue=queue, devices=tuple(g.index for g in cards),
                                      workers=decision.workers,
                                      reason=f"{decision.reason} [profile {source}]", gpus=tuple(cards)))
        left = len(gpus) % per_worker
        if left:
            notes.append(f"{left} GPU(s) left unused: {per_worker} cards per worker")
        seen = set()
        for queue, (profile, source) in self.profiles.items():
            path = self.cache.path(profile.key)
            if path in seen:
                continue
            seen.add(path)
            notes.append(f"profile ({source}) {profile.summary()}; {os.path.relpath(path)}")
        if not any(g.workers for g in groups):
            raise PlanError("no device group can hold a worker of this model: " +
                            "; ".join(f"{g.queue}: {g.reason}" for g in groups))
        return groups


def needs_sizing(manifest: Manifest) -> bool:
    """Measured sizing applies to backends that declare it (model backends, not the synthetic one)."""
    return backend_class(manifest.model.backend).measured_sizing


def expected_times(manifest: Manifest, gpus: list[Gpu]) -> list[str]:
    """Seconds per video and per denoising step on each kind of card, where a calibration profile of
    exactly these settings (speed settings included) was measured; `plan` prints them."""
    cache = ProfileCache(profiles_folder(manifest))
    g = manifest.heaviest_generation
    steps = max(1, int(g.steps * g.denoising_strength)) if manifest.model.task == "v2v" else g.steps
    lines = []
    for name in dict.fromkeys(gpu.name for gpu in gpus):
        cards = manifest.resources.gpus_per_worker if isinstance(manifest.resources.gpus_per_worker, int) else 1
        profile = cache.get(profile_key(manifest, name, cards))
        if profile is None or not profile.seconds_per_job:
            continue
        lines.append(f"{name}: {profile.seconds_per_job:.1f} s per video, about {profile.seconds_per_job / steps:.2f} s "
                     f"per step ({steps} steps; decoding included), measured {profile.created_at[:16]}")
    return lines


def make_sizer(manifest: Manifest, recalibrate: bool = False, calibrator: Calibrator | None = None,
               say: Callable[[str], None] | None = None) -> Sizer | None:
    if not needs_sizing(manifest):
        return None
    if calibrator is None and os.environ.get(FAKE_ENV):
        return None  # FAKE cards cannot run a calibration job: plan from the manifest's counts
    return Sizer(profiles_folder(manifest), recalibrate=recalibrate, calibrator=calibrator,
                 say=say)
