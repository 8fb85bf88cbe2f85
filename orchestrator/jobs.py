"""Expanding a manifest into jobs: deterministic order, stable ids, output paths.

One job is one video: (category, reference, prompt index, seed). Its id hashes everything that
determines the output (inputs, prompt, seed, model, generation settings), so a changed setting gives
a new id while the output path stays the same; the sidecar of an existing mp4 tells which id made it.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .manifest import Manifest, safe_component_problem


@dataclass(frozen=True)
class Job:
    id: str
    ordinal: int  # position in the manifest's expansion order
    category: str
    stem: str | None  # reference video/image stem; None for text-to-video
    reference: str | None  # absolute path of the reference file
    prompt_index: int
    prompt: str
    seed: int
    output: str  # absolute path of the final mp4

    @property
    def group(self) -> str:
        """Jobs of one reference input: a worker prefers to stay within its group."""
        return f"{self.category}/{self.stem}" if self.stem is not None else f"{self.category}/#{self.prompt_index}"

    @property
    def key(self) -> str:
        """A readable name: category/stem/seed_S_prompt_I."""
        return str(Path(self.output).relative_to(Path(self.output).parents[2 if self.stem else 1]).with_suffix(""))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Job":
        return cls(**data)


def settings_fingerprint(manifest: Manifest) -> dict:
    """What, besides the job's own inputs, determines every output of this manifest."""
    model = manifest.model
    return {
        "backend": model.backend, "task": model.task, "model": model.path, "dtype": model.dtype,
        "options": {k: v for k, v in sorted(model.options.items()) if not _is_runtime_option(k)},
        "generation": asdict(manifest.generation),
    }


def _is_runtime_option(key: str) -> bool:
    # How fast or on which devices a job runs does not change its pixels.
    return key in ("seconds_per_job", "fail_rate", "oom_rate", "hang_rate", "crash_rate",
                   "fail_jobs", "crash_jobs", "fail_attempts", "step_seconds", "offload", "device_map")


def output_path(manifest: Manifest, category: str, stem: str | None, seed: int, prompt_index: int) -> Path:
    root = manifest.output_dir.resolve()
    return _output_in(_output_folder(manifest, category, stem), seed, prompt_index, root)


def _output_folder(manifest: Manifest, category: str, stem: str | None) -> Path:
    """The resolved folder of one reference's outputs (resolved once per reference, not per job)."""
    folder = manifest.output_dir / category
    if stem is not None:
        folder = folder / stem
    for part in (category, stem):
        if part is not None and safe_component_problem(part):  # validated already; a second guard
            raise ValueError(f"unsafe output name {part!r}")
    return folder.resolve()


def _output_in(folder: Path, seed: int, prompt_index: int, root: Path, inside: bool | None = None) -> Path:
    """folder/seed_S_prompt_I.mp4, resolved as `Path.resolve` would, and checked to stay under root.

    `inside`: the caller already knows whether `folder` lies under `root` (saves a check per job).
    """
    path = folder / f"seed_{seed}_prompt_{prompt_index}.mp4"
    if os.path.islink(path):  # an mp4 that is a link resolves to its target, as before
        path = path.resolve()
    elif inside if inside is not None else (folder == root or root in folder.parents):
        return path
    if root not in path.parents:
        raise ValueError(f"output {path} escapes {root}")
    return path


def expand(manifest: Manifest) -> list[Job]:
    """All jobs of the manifest in a fixed order: category, reference, prompt, seed."""
    fingerprint = json.dumps(settings_fingerprint(manifest), sort_keys=True, ensure_ascii=False)
    root = manifest.output_dir.resolve()
    jobs: list[Job] = []
    for category in manifest.categories:
        for ref in category.references:
            # Once per reference, not per job: the file's identity and the resolved output folder.
            file_identity = _file_identity(ref.path)
            folder = _output_folder(manifest, category.name, ref.stem)
            inside = folder == root or root in folder.parents
            reference = str(ref.path) if ref.path else None
            for prompt_index, prompt in enumerate(ref.prompts):
                for seed in manifest.seeds:
                    identity = json.dumps([category.name, ref.stem, prompt_index, prompt, seed,
                                           file_identity], ensure_ascii=False)
                    job_id = hashlib.sha1(f"{identity}|{fingerprint}".encode()).hexdigest()[:16]
                    jobs.append(Job(
                        id=job_id, ordinal=len(jobs), category=category.name, stem=ref.stem,
                        reference=reference, prompt_index=prompt_index, prompt=prompt, seed=seed,
                        output=str(_output_in(folder, seed, prompt_index, root, inside))))
    return jobs


def _file_identity(path: Path | None) -> str | None:
    # The reference's name and size, not its location: moving the refs folder keeps the ids.
    if path is None:
        return None
    return f"{path.name}:{path.stat().st_size}"


def count_by_category(jobs: list[Job]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.category] = counts.get(job.category, 0) + 1
    return counts
