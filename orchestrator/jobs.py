"""Expanding a manifest into jobs: deterministic order, stable ids, output paths.

One job is one video: (category, reference, prompt index, seed, and its value of each of the
manifest's `axes:`). Its id hashes everything that determines the output (inputs, prompt, seed, model,
generation settings, axis values), so a changed setting gives a new id while the output path stays
the same; the sidecar of an existing mp4 tells which id made it. A manifest without axes gives the
ids it gave before axes existed. Output paths are the manifest's `output.name` rendered per job
(`output_names`).

Each job carries its own settings, resolved here once (`job_settings`: the manifest's with its axis values
in place) and serialized with it: the ledger, the job loop, the sidecar, the slot's reload decision and the
backends read `Job.model` and `Job.generation`, never the manifest's with the axes applied again.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from .manifest import (GenerationConfig, Manifest, ModelConfig, apply_axes, job_count, model_with_axes,
                       safe_component_problem)
from .file_digests import content_digest
from .manifest.model import is_lora_axis
from .output_names import check_names, output_path, uses_prompt_index
from .speed import identity

log = logging.getLogger(__name__)
# An expansion of this many jobs (about 4 s on a 2-core machine) says so before it starts, and how far
# it got every EXPAND_PROGRESS_JOBS (a confirmed sweep of 10^7 jobs takes minutes).
EXPAND_NOTICE_JOBS = 200_000
EXPAND_PROGRESS_JOBS = 1_000_000


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
    axes: dict = field(default_factory=dict)  # axis name -> this job's value, in the manifest's order (issue 22)
    inputs: dict = field(default_factory=dict)  # role -> absolute path or value of a conditioned task's extra inputs (issue 23)

    @property
    def group(self) -> str:
        """Jobs of one reference input (and one quantize value and LoRA setting, which the worker loads its
        model with): a worker prefers to stay within its group."""
        group = f"{self.category}/{self.stem}" if self.stem is not None else f"{self.category}/#{self.prompt_index}"
        for key in ("quantize", "attention"):  # (another value: the model loaded again)
            if key in self.axes:
                group += f" {key}={self.axes[key]}"
        loras = {key: value for key, value in self.axes.items() if is_lora_axis(key)}
        return f"{group} loras={json.dumps(loras, sort_keys=True)}" if loras else group

    @property
    def key(self) -> str:
        """A readable name: the output's path under output_dir without `.mp4` (by default
        category/stem/seed_S_prompt_I)."""
        if self.name:
            return self.name
        # A job written before names were templates (an old ledger row or sidecar): the fixed layout.
        return str(Path(self.output).relative_to(Path(self.output).parents[2 if self.stem else 1]).with_suffix(""))

    def __post_init__(self):
        # A job with axis values runs with its own settings: never silently with its worker's.
        if self.axes and (self.model is None or self.generation is None):
            raise ValueError(f"job {self.id} has axis values {self.axes} but no resolved settings "
                             "(jobs.expand attaches them)")

    def to_dict(self, settings: bool = True) -> dict:
        """Its JSON form (a ledger row, what a Ray actor gets); `from_dict` reads it back. Without `settings`,
        its model and generation left out (a sidecar records them beside it, as `model` and `generation`)."""
        data = {**vars(self), "axes": dict(self.axes), "inputs": dict(self.inputs)}  # (one level: see ModelConfig)
        if not settings:
            del data["model"], data["generation"]
        else:
            data["model"] = None if self.model is None else self.model.to_dict()
            data["generation"] = None if self.generation is None else self.generation.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Job":
        model, generation = data.get("model"), data.get("generation")
        return cls(**{**data, "model": None if model is None else ModelConfig.from_dict(model),
                      "generation": None if generation is None else GenerationConfig.from_dict(generation)})

    # Declared last, apart from the fields above (old specs and ledger rows lack them: the defaults).
    name: str = ""  # the output's path under output_dir, without `.mp4`: `output.name` rendered
    # This job's own settings, resolved by `expand` (`job_settings`): the manifest's model with the job's
    # quantize (an axis) in its speed, and its generation with the job's other axis values. None only for a
    # job made by hand without axes (a test's): it runs with its worker's settings.
    model: ModelConfig | None = None
    generation: GenerationConfig | None = None


def settings_fingerprint(manifest: Manifest) -> dict:
    """What, besides the job's own inputs, determines every output of this manifest (its backend's
    runtime options aside, which the manifest names once its backend has checked it)."""
    model = manifest.model
    fingerprint = {
        "backend": model.backend, "task": model.task, "model": model.path, "dtype": model.dtype,
        "options": {k: v for k, v in sorted(model.options.items()) if k not in manifest.runtime_options},
        "generation": asdict(manifest.generation),
    }
    # A swept setting is part of each job's own identity (its axis values), not of the manifest's.
    swept = {key for axis in manifest.axes for key in axis.keys}
    for key in swept:
        fingerprint["generation"].pop(key, None)
    # Speed settings that change the pictures (quantize, unless swept); compile and the attention kernel
    # do not (orchestrator/speed.py says why) and are recorded in each sidecar instead.
    speed = {key: value for key, value in identity(model.speed).items() if key not in swept}
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


def axis_points(manifest: Manifest) -> list[dict]:
    """Every combination of the manifest's axis values, the first axis varying slowest: [{}] without axes."""
    points = []
    for combination in itertools.product(*(axis.assignments() for axis in manifest.axes)):
        point: dict = {}
        for assignment in combination:
            # JSON's form (a cfg pair is a list): a job read back from a spec or the ledger is equal.
            point.update({key: list(v) if isinstance(v, tuple) else v for key, v in assignment.items()})
        points.append(point)
    return points


def job_settings(manifest: Manifest, axes: dict) -> tuple[ModelConfig, GenerationConfig]:
    """The model and generation settings of a job with these axis values: the manifest's, with its quantize
    in the model's speed and its other values in generation. The one place a job's settings are worked out:
    `expand` attaches them to each job (`Job.model`, `Job.generation`), and everything after reads those."""
    return model_with_axes(manifest.model, axes), apply_axes(manifest.generation, axes)


def expand(manifest: Manifest, say: Callable[[str], None] | None = None) -> list[Job]:
    """All jobs of the manifest in a fixed order: category, reference, prompt, seed, then the axes'
    combinations (a reference's jobs stay together, and one prompt and seed's settings side by side);
    their names checked (`output_names.check_names`: ManifestError at `output.name`). An expansion of
    EXPAND_NOTICE_JOBS or more (seconds: about 20 µs a job) says so first, with the count, and every
    EXPAND_PROGRESS_JOBS how far it got: to `say`, else as warnings of the `orchestrator.jobs` logger
    (which Python prints on stderr where logging is not set up)."""
    fingerprint = json.dumps(settings_fingerprint(manifest), sort_keys=True, ensure_ascii=False)
    points = axis_points(manifest)
    settings = [job_settings(manifest, axes) for axes in points]  # once per combination, shared by its jobs
    loras_identity = [_loras_identity(model) for model, _ in settings] if manifest.model.loras else None
    if loras_identity is not None:
        # LoRAs that no axis changes are fused at load (`ModelConfig.fuse_loras`): no worker ever switches them
        fixed = not any(is_lora_axis(key) for axis in manifest.axes for key in axis.keys)
        settings = [(replace(model, fuse_loras=fixed, loras=tuple(replace(lora, digest=identity[i][1])
                                                                  for i, lora in enumerate(model.loras))), generation)
                    for (model, generation), identity in zip(settings, loras_identity)]
    total = job_count(manifest.categories, manifest.seeds, manifest.axes)  # from the lists' lengths
    tell = (say or _tell) if total >= EXPAND_NOTICE_JOBS else None
    if tell:
        tell(f"expanding {total:,} jobs…")
    # Outputs named by the prompt's content (`{prompt_id}`) keep their identity when prompts move:
    # a prompt inserted at the top leaves the others' videos done. Named by position (the default),
    # the position is part of the identity, as it always was (old sweeps keep their ids).
    by_position = uses_prompt_index(manifest)
    root = str(manifest.output_dir.resolve())
    jobs: list[Job] = []
    for category in manifest.categories:
        for ref in category.references:
            # Once per reference, not per job: the file's identity and the checked output folder.
            file_identity = _file_identity(ref.path)
            # A conditioned task's other inputs (audio, control, driving videos, camera) are part of the
            # identity too; a job without any keeps the identity it always had.
            inputs_identity = {role: _file_identity(Path(value)) if role != "camera" else value
                               for role, value in sorted(ref.inputs.items())}
            output_folder(manifest, category.name, ref.stem)
            reference = str(ref.path) if ref.path else None
            for prompt_index, prompt in enumerate(ref.prompts):
                for seed, (point, (axes, (model, generation))) in itertools.product(
                        manifest.seeds, enumerate(zip(points, settings))):
                    where = [prompt_index] if by_position else []
                    parts = [category.name, ref.stem, *where, prompt, seed, file_identity]
                    if inputs_identity:
                        parts.append(inputs_identity)
                    if axes:  # only then: a manifest without axes keeps its ids
                        # (a LoRA file swept by path counts by its content, below, not its location)
                        parts.append({key: value for key, value in axes.items()
                                      if not (key.startswith("loras.") and key.endswith(".path"))})
                    if loras_identity is not None:  # the LoRAs on: name, content, strength, expert
                        parts.append({"loras": loras_identity[point]})
                    # (sorted keys: listing the axes in another order keeps every job's id)
                    identity = json.dumps(parts, ensure_ascii=False, sort_keys=True)
                    job_id = hashlib.sha1(f"{identity}|{fingerprint}".encode()).hexdigest()[:16]
                    output, name = output_path(manifest, category.name, ref.stem, prompt_index, prompt, seed,
                                               axes=axes, root=root)
                    jobs.append(Job(
                        id=job_id, ordinal=len(jobs), category=category.name, stem=ref.stem,
                        reference=reference, prompt_index=prompt_index, prompt=prompt, seed=seed,
                        output=output, name=name, axes=dict(axes), inputs=dict(ref.inputs),
                        model=model, generation=generation))
                    if tell and len(jobs) % EXPAND_PROGRESS_JOBS == 0 and len(jobs) < total:
                        tell(f"expanded {len(jobs):,} of {total:,} jobs")
    check_names(manifest, jobs)
    return _loading_slowest(manifest, jobs)


def _loaded_speed(job: Job) -> tuple:
    """The speed settings a worker loads its model with for this job (its quantize and attention: another
    value is another load; a step cache is set up per job)."""
    return job.model.speed.quantize, job.model.speed.attention


def _loras_identity(model: ModelConfig) -> list[list]:
    """The LoRAs of a job as its id counts them: [name, content digest, strength, expert] each, in order. A
    retrained file under the same name is another identity; a moved one is the same."""
    return [[lora.name, content_digest(lora.path), list(lora.strength) if isinstance(lora.strength, tuple)
             else lora.strength, lora.expert] for lora in model.loras]


def _tell(line: str) -> None:
    # a warning: where logging is not set up (the command line), Python prints it on stderr as it is
    log.warning(line)


def _loading_slowest(manifest: Manifest, jobs: list[Job]) -> list[Job]:
    """The jobs of each quantize and attention value (axes, alone or in a zip group) before those of the next, and
    within one the jobs of each set of LoRAs on (the `loras` axes' values resolved: two values that leave the
    same LoRAs on are one) together: a worker loads its model
    again when the quantize changes and switches (or, fused, reloads) its LoRAs when they change, and taking
    jobs in this order (and in groups, `Job.group`) it does so as rarely as the sweep allows. Ids and names
    do not depend on the order; without such axes the order is expand's own."""
    keys = [key for axis in manifest.axes for key in axis.keys if key in ("quantize", "attention") or is_lora_axis(key)]
    if not keys:
        return jobs
    speed_rank: dict = {}
    lora_rank: dict = {}
    for job in jobs:  # in expand's order: a value's rank is where it first comes
        speed_rank.setdefault(_loaded_speed(job), len(speed_rank))
        lora_rank.setdefault(job.model.loras, len(lora_rank))  # (the LoRAs on: `[]` and strength 0 of none)
    ordered = sorted(jobs, key=lambda job: (speed_rank[_loaded_speed(job)], lora_rank[job.model.loras]))
    return [replace(job, ordinal=ordinal) for ordinal, job in enumerate(ordered)]


def _file_identity(path: Path | None) -> str | None:
    # The reference's name and size, not its location: moving the refs folder keeps the ids.
    if path is None:
        return None
    return f"{path.name}:{path.stat().st_size}"


def axis_value_text(value) -> str:
    """An axis value as report tables and JSON keys show it: `5.0`, `[4.0, 3.0]`, `"blurry"`."""
    return json.dumps(list(value) if isinstance(value, tuple) else value, ensure_ascii=False)


def count_by_category(jobs: list[Job]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.category] = counts.get(job.category, 0) + 1
    return counts
