"""Sizing decisions: how many workers of a measured profile fit in a card's free memory, and how many
to run.

Decisions (`decide_workers`):
  - fit: the largest N with N × (peak + resources.memory_margin_gib) ≤ the card's free memory now
    (the most loaded card of a group);
  - `workers_per_gpu: auto` keeps N > 1 only where the measured jobs/hour beats one worker by
    CLEAR_GAIN (10%); of the counts that fit, it takes the smallest within 3% of the best;
  - an explicit integer is obeyed, with a warning when it does not fit;
  - `gpus_per_worker: auto` tries 1 card, then 2, … until one worker's calibration does not run out of
    memory; the cards are then grouped (4 cards → 2 workers × 2 cards);
  - each card (kind) gets its own count: a 16 GB and a 12 GB card are decided separately.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..gpus import GIB
from .profiles import Profile, gib_text

CLEAR_GAIN = 0.10  # more workers must add at least this much throughput
NEAR_BEST = 0.97  # the fewest workers within this share of the best throughput win


@dataclass(frozen=True)
class Decision:
    workers: int
    fit: int
    reason: str
    warning: str | None = None


def fit_count(free_bytes: int, peak_bytes: int, margin_bytes: int) -> int:
    """How many workers of this peak fit in this free memory, each with its margin."""
    return max(0, int(free_bytes // (peak_bytes + margin_bytes)))


def decide_workers(profile: Profile, free_bytes: int, margin_gib: float, requested: int | str) -> Decision:
    """Workers for one device group from its profile and its free memory now."""
    margin = int(margin_gib * GIB)
    peak = profile.peak_nvml_bytes or 0
    fit = fit_count(free_bytes, peak, margin)
    memory = (f"peak {gib_text(peak)}/worker + {margin_gib:g} GiB margin, {gib_text(free_bytes)} free → {fit} fit")
    if isinstance(requested, int):
        if requested <= fit:
            return Decision(requested, fit, f"workers_per_gpu: {requested} (manifest); {memory}")
        warning = (f"workers_per_gpu: {requested} does not fit: {requested} × ({gib_text(peak)} + {margin_gib:g} GiB) "
                   f"> {gib_text(free_bytes)} free; expect out-of-memory (a worker that keeps running out of "
                   f"memory retires itself)")
        return Decision(requested, fit, f"workers_per_gpu: {requested} (manifest, obeyed); {memory}: "
                                        f"DOES NOT FIT", warning)
    if fit == 0:
        return Decision(0, 0, f"auto: {memory}: this card cannot hold one worker")
    tp = profile.jobs_per_hour
    measured = sorted(n for n in tp if n <= fit)
    figures = ", ".join(f"{tp[n]:.0f}/h at {n}" for n in sorted(tp))
    if 1 not in tp or len(measured) <= 1:
        why = "only 1 worker measured" if fit > 1 else "1 fits"
        return Decision(1, fit, f"auto: {memory}; {why} → 1 worker" + (f" ({figures})" if figures else ""))
    best = max(measured, key=lambda n: tp[n])
    chosen = min(n for n in measured if tp[n] >= NEAR_BEST * tp[best])
    if tp[chosen] < (1 + CLEAR_GAIN) * tp[1]:
        chosen = 1
        verdict = f"more workers add < {CLEAR_GAIN:.0%} throughput → 1 worker"
    else:
        verdict = f"{chosen} workers give {tp[chosen] / tp[1]:.2f}× one worker → {chosen} workers"
    return Decision(chosen, fit, f"auto: {memory}; measured {figures}; {verdict}")
