"""Calibration profiles: what one worker of a manifest's settings measured on a kind of card (peak
memory, load time, jobs per hour at 1..N workers), their key, and the one reader and writer of a
sweep's profiles folder (`<output_dir>/.sweep/profiles/`), used by sizing, `models fit` and the Ray plan."""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..gpus import GIB, Gpu
from ..manifest import Manifest

PROFILE_VERSION = 1


@dataclass
class Profile:
    key: dict
    gpu_name: str
    gpu_total_bytes: int
    cards: int  # cards per worker when measured
    fits: bool = True  # False: one worker ran out of memory on this many cards
    peak_nvml_bytes: int | None = None  # per worker, on its most loaded card, CUDA context included
    peak_torch_reserved_bytes: int | None = None  # per worker (summed over its cards)
    loaded_nvml_bytes: int | None = None  # per worker after loading, before the first job
    nvml_source: str = "per-process"  # or "device-delta" where NVML cannot see the process
    load_seconds: float | None = None
    seconds_per_job: float | None = None  # one worker alone, mean of the timed jobs
    jobs_per_hour: dict[int, float] = field(default_factory=dict)  # concurrent workers -> measured
    free_bytes_at_calibration: int | None = None
    calibration_seconds: float | None = None
    created_at: str = ""
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        data = asdict(self)
        data["version"] = PROFILE_VERSION
        data["jobs_per_hour"] = {str(k): v for k, v in self.jobs_per_hour.items()}
        return json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Profile":
        data = json.loads(text)
        if data.pop("version", None) != PROFILE_VERSION:
            raise ValueError("old profile version")
        data["jobs_per_hour"] = {int(k): float(v) for k, v in data.get("jobs_per_hour", {}).items()}
        return cls(**data)

    def summary(self) -> str:
        if not self.fits:
            return f"{self.gpu_name} ×{self.cards}: one worker ran out of memory"
        tp = ", ".join(f"{n}: {v:.1f}" for n, v in sorted(self.jobs_per_hour.items()))
        torch_peak = (f", torch peak reserved {gib_text(self.peak_torch_reserved_bytes)}"
                      if self.peak_torch_reserved_bytes else "")
        return (f"{self.gpu_name} ×{self.cards}: peak {gib_text(self.peak_nvml_bytes)} per worker (NVML "
                f"{self.nvml_source}{torch_peak}), loaded {gib_text(self.loaded_nvml_bytes)}, load "
                f"{self.load_seconds:.1f}s, {self.seconds_per_job:.1f}s/job; jobs/hour by workers {{{tp}}}")


def gib_text(value: int | None) -> str:
    return "?" if value is None else f"{value / GIB:.1f} GiB"


def profile_key(manifest: Manifest, gpu_name: str, cards: int) -> dict:
    m, g = manifest.heaviest_model, manifest.heaviest_generation
    return {"backend": m.backend, "model": m.path, "task": m.task, "dtype": m.dtype,
            "width": g.width, "height": g.height, "frames": g.num_frames, "steps": g.steps,
            "guidance": g.uses_guidance, "options": {k: m.options[k] for k in sorted(m.options)},
            "gpu": gpu_name, "cards": cards,
            # measured with the manifest's speed settings (compile, fp8, … change time and memory; a
            # quantize axis: its heaviest value);
            # left out when default, so profiles measured before `speed:` existed still match
            **({"speed": asdict(m.speed)} if not m.speed.is_default else {})}


def cards_name(cards: list[Gpu]) -> str:
    """The name a profile is filed under: the cards' model names, each once ("A + B" when mixed)."""
    return " + ".join(dict.fromkeys(g.name for g in cards))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:40] or "gpu"


class ProfileCache:
    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def path(self, key: dict) -> Path:
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        return self.folder / f"{_slug(key['backend'])}-{_slug(key['gpu'])}-x{key['cards']}-{digest}.json"

    def get(self, key: dict) -> Profile | None:
        try:
            profile = Profile.from_json(self.path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError):
            return None
        return profile if profile.key == key else None

    def put(self, profile: Profile) -> Path:
        path = self.path(profile.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=".partial-", dir=path.parent)
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(profile.to_json())
        os.replace(temp, path)
        return path

    def all(self) -> list[tuple[Profile, Path]]:
        """Every profile in the folder (any settings, GPU and card count) with its file, in file-name
        order; unreadable or old ones are skipped."""
        found = []
        for path in sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []:
            try:
                found.append((Profile.from_json(path.read_text(encoding="utf-8")), path))
            except (OSError, ValueError, TypeError):
                continue
        return found


def profiles_folder(manifest: Manifest) -> Path:
    """Where a sweep keeps its calibration profiles."""
    return Path(manifest.output_dir) / ".sweep" / "profiles"


def cached_profiles(manifest: Manifest) -> list[Profile]:
    """Every calibration profile cached for this sweep (any settings and GPU), e.g. for the Ray plan,
    which matches them against each node's GPU type."""
    return [profile for profile, _ in ProfileCache(profiles_folder(manifest)).all()]
