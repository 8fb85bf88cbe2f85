"""The experiment manifest: read YAML with line marks and validate it into frozen dataclasses.

Every problem is collected (file, line, what is wrong, how to fix it) and raised together as one
`ManifestError`, before anything starts. Relative paths resolve against the manifest's folder.
What a manifest holds is in `model`; reading YAML safely with line marks in `reader`; the sections in
`sections`, the categories with their references and prompts in `categories`; names the output
folder can hold in `names`. This package knows no backend: `orchestrator.validation.load_manifest`
reads a manifest and has its backend check it.
"""
from .categories import AUDIO_SUFFIXES, IMAGE_SUFFIXES, MAX_GLOB_ENTRIES, RESERVED_NAMES, VIDEO_SUFFIXES
from .model import (AXIS_KEYS, CAMERA_DIRECTIONS, COMPILE_MODES, CONDITIONED_TASKS, EXECUTORS, GENERATION_AXES,
                    MAX_JOBS, MAX_JOBS_UNCONFIRMED, QUANTIZE_MODES, SDPA_ATTENTION, TASKS, Axis, Category, Execution,
                    GenerationConfig, LORA_AXIS_FIELDS, LORA_EXPERTS, LoraConfig, Manifest, ManifestError,
                    ModelConfig, Problem, Reference, Resources,
                    SpeedConfig, apply_axes, model_with_axes)
from .names import (MAX_COMPONENT_BYTES, NAME_MAX_BYTES, PATH_MAX_BYTES, path_length_problem, portable_name_problem,
                    safe_component_problem)
from .reader import MAX_ALIAS_EXPANSION, MAX_NESTING, located_problem
from .sections import ManifestCheck, job_count, read_manifest

__all__ = [
    "AUDIO_SUFFIXES", "AXIS_KEYS", "Axis", "CAMERA_DIRECTIONS", "CONDITIONED_TASKS", "GENERATION_AXES",
    "MAX_JOBS", "MAX_JOBS_UNCONFIRMED", "LORA_AXIS_FIELDS", "LORA_EXPERTS", "LoraConfig", "apply_axes", "job_count", "model_with_axes",
    "COMPILE_MODES", "EXECUTORS", "IMAGE_SUFFIXES", "MAX_ALIAS_EXPANSION", "MAX_COMPONENT_BYTES",
    "MAX_GLOB_ENTRIES", "MAX_NESTING", "NAME_MAX_BYTES", "PATH_MAX_BYTES", "QUANTIZE_MODES",
    "RESERVED_NAMES", "SDPA_ATTENTION", "TASKS", "VIDEO_SUFFIXES", "Category", "Execution",
    "GenerationConfig", "Manifest", "ManifestCheck", "ManifestError", "ModelConfig", "Problem",
    "Reference", "Resources", "SpeedConfig", "located_problem", "path_length_problem", "portable_name_problem",
    "read_manifest",
    "safe_component_problem",
]
