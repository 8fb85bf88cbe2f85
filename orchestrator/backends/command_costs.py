"""What the command backend's program costs per job, for `plan`: the seconds it spends loading the
model, the median of earlier jobs' measured start (their sidecars) or an estimate from the weights."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .shared import model_files_identity


def startup_seconds(manifest, params: str | None) -> tuple[float | None, str]:
    """Seconds one job spends loading: measured from earlier sidecars, else estimated."""
    measured = _measured_startups(manifest.output_dir)
    if measured:
        measured.sort()
        return measured[len(measured) // 2], f"measured: median of {len(measured)} earlier jobs' start"
    identity = model_files_identity(manifest.model.path)
    gigabytes = identity.get("weight_bytes", 0) / 1e9
    if gigabytes:
        # Reading the weights at ~1 GB/s (page cache helps, sharding and the move to the cards cost),
        # plus starting Python, torch and CUDA.
        return 30 + gigabytes, f"estimated from its {gigabytes:.0f} GB of weights at ~1 GB/s"
    if params:
        guess = {"14B": 180.0, "5B": 60.0}.get(params, 120.0)
        return guess, "estimated: no weights at model.path to size it by"
    return None, ""


def _measured_startups(output_dir: Path, want: int = 20, scan: int = 500) -> list[float]:
    found: list[float] = []
    seen = 0
    for root, dirs, files in os.walk(output_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.endswith(".json") or name.startswith("."):
                continue
            seen += 1
            try:
                record = json.loads(Path(root, name).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(record, dict) and record.get("backend") == "command" \
                    and isinstance(record.get("startup_seconds"), (int, float)):
                found.append(float(record["startup_seconds"]))
            if len(found) >= want or seen >= scan:
                return found
    return found


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
