"""Expanding a manifest into jobs: deterministic order, stable ids, output paths.

One job is one video: (category, reference, prompt index, seed). Its id hashes everything that
determines the output (inputs, prompt, seed, model, generation settings), so a changed setting gives
a new id while the output path stays the same; the sidecar of an existing mp4 tells which id made it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
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
    inputs: dict = field(default_factory=dict)  # role -> absolute path or value of a conditioned task's extra inputs (issue 23)

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
    from .backends import backend_class
    from .speed import identity
    model = manifest.model
    runtime = backend_class(model.backend).runtime_options
    fingerprint = {
        "backend": model.backend, "task": model.task, "model": model.path, "dtype": model.dtype,
        "options": {k: v for k, v in sorted(model.options.items()) if k not in runtime},
        "generation": asdict(manifest.generation),
    }
    # Speed settings that change the pictures (quantize); compile and the attention kernel do not
    # (orchestrator/speed.py says why) and are recorded in each sidecar instead.
    speed = identity(model.speed)
    if speed:
        fingerprint["speed"] = speed
    return fingerprint


def output_folder(manifest: Manifest, category: str, stem: str | None) -> Path:
    """The folder of one reference's outputs, checked to stay inside output_dir."""
    for part in (category, stem):
        if part is not None and safe_component_problem(part):  # validated already; a second guard
            raise ValueError(f"unsafe output name {part!r}")
    root = manifest.output_dir.resolve()
    folder = (root / category / stem if stem is not None else root / category).resolve()
    if root not in folder.parents:
        raise ValueError(f"output folder {folder} escapes {root}")
    return folder


def output_name(seed: int, prompt_index: int) -> str:
    return f"seed_{seed}_prompt_{prompt_index}.mp4"


def expand(manifest: Manifest) -> list[Job]:
    """All jobs of the manifest in a fixed order: category, reference, prompt, seed."""
    fingerprint = json.dumps(settings_fingerprint(manifest), sort_keys=True, ensure_ascii=False)
    jobs: list[Job] = []
    for category in manifest.categories:
        for ref in category.references:
            # Once per reference, not per job: the file's identity and the checked output folder.
            file_identity = _file_identity(ref.path)
            # A conditioned task's other inputs (audio, control, driving videos, camera) are part of the
            # identity too; a job without any keeps the identity it always had.
            inputs_identity = {role: _file_identity(Path(value)) if role != "camera" else value
                               for role, value in sorted(ref.inputs.items())}
            folder = output_folder(manifest, category.name, ref.stem)
            reference = str(ref.path) if ref.path else None
            for prompt_index, prompt in enumerate(ref.prompts):
                for seed in manifest.seeds:
                    identity = json.dumps([category.name, ref.stem, prompt_index, prompt, seed,
                                           file_identity] + ([inputs_identity] if inputs_identity else []),
                                          ensure_ascii=False)
                    job_id = hashlib.sha1(f"{identity}|{fingerprint}".encode()).hexdigest()[:16]
                    jobs.append(Job(
                        id=job_id, ordinal=len(jobs), category=category.name, stem=ref.stem,
                        reference=reference, prompt_index=prompt_index, prompt=prompt, seed=seed,
                        output=str(folder / output_name(seed, prompt_index)), inputs=dict(ref.inputs)))
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
