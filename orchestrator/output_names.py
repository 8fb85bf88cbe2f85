"""Output names: the manifest's `output.name` template, rendered for each job and checked.

A template is Python's format syntax, parsed by `string.Formatter` (no parser of our own), over
`{category}`, `{stem}`, `{prompt_index}`, `{prompt_id}` (a short stable hash of the prompt text),
`{prompt}` / `{prompt:40}` (a filesystem-safe slug of at most 40 characters), `{seed}`, and each axis
by name (`{cfg_scale}`; a LoRA's as `{loras}`, `{lora_NAME}`, `{lora_NAME_file}`: `placeholder`). It names the mp4 under output_dir, without `.mp4`; `/` makes folders.

Without a template the layout is the fixed one, `<category>/<stem>/seed_<seed>_prompt_<i>`
(`<category>/seed_<seed>_prompt_<i>` for text-to-video), with `_<axis>-<value>` appended per axis
when the jobs have axes. `check_names` refuses, before anything starts and at the manifest's
`output.name` line: unknown placeholders, two jobs on one file, a name that leaves the output folder
or lands in the sweep's own files, a name over 255 bytes, and characters that break on common file
systems (Windows/SMB, macOS, FAT/exFAT USB disks).
"""
from __future__ import annotations

import hashlib
import os
import re
import string
from pathlib import Path

from .manifest import (NAME_MAX_BYTES, PATH_MAX_BYTES, RESERVED_NAMES, Manifest, ManifestError, located_problem,
                       path_length_problem, portable_name_problem)

FIXED_PLACEHOLDERS = ("category", "stem", "prompt_index", "prompt_id", "prompt", "seed")
DEFAULT_TEMPLATE = "{category}/{stem}/seed_{seed}_prompt_{prompt_index}"
DEFAULT_T2V_TEMPLATE = "{category}/seed_{seed}_prompt_{prompt_index}"
PROMPT_SLUG_CHARS = 40  # `{prompt}` without a width
MAX_SLUG_CHARS = 200
PROMPT_ID_HEX = 10
AXIS_TEXT_CHARS = 24  # a text axis value (negative_prompt) in a default name: its slug, then a hash
# The longest suffix the product adds to an output's name (its poster); its sidecar is `.json`.
LONGEST_SUFFIX = ".thumb.jpg"
MAX_LISTED = 3  # problems of one kind listed; the rest are counted


class _Slug(str):
    """The prompt, formatted as a filesystem-safe slug whose width is the format spec (`{prompt:40}`)."""

    def __format__(self, spec: str) -> str:
        return slug(self, int(spec) if spec else PROMPT_SLUG_CHARS)


class _Axis:
    """An axis value, formatted readably (`value_text`), or by its format spec (`{cfg_scale:.1f}`)."""

    def __init__(self, value):
        self.value = value

    def __format__(self, spec: str) -> str:
        if not spec:
            return value_text(self.value)
        items = self.value if isinstance(self.value, (list, tuple)) else [self.value]
        return ",".join(format(item, spec) for item in items)  # a [high, low] pair: both


# Templates are parsed (checked) with string.Formatter; rendering is str.format_map, which calls the
# placeholders' own __format__ above, at C speed (a sweep may have 100k names).
_FORMATTER = string.Formatter()


def slug(text: str, width: int = PROMPT_SLUG_CHARS) -> str:
    """`text` as a name: runs of anything but letters, digits, `.`, `_` and `-` become one `-`, cut
    to `width` characters, no dot, dash or space at either end (`prompt` when nothing is left)."""
    cut = re.sub(r"[^\w.-]+", "-", text).strip("-._")[:width].strip("-._")
    return cut or "prompt"


def prompt_id(prompt: str) -> str:
    """A short stable hash of the prompt's text: the same prompt has the same id at any position."""
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:PROMPT_ID_HEX]


def value_text(value) -> str:
    """An axis value as readable, safe text: 3.0 → `3`, 0.6 → `0.6`, [5, 3] → `5,3`, a long or
    unsafe text → its slug and a hash (two texts never share a name)."""
    if isinstance(value, (list, tuple)):
        return ",".join(value_text(item) for item in value)
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)  # shortest exact form
    if isinstance(value, int):
        return str(value)
    text = str(value)
    short = slug(text, AXIS_TEXT_CHARS) if text else "empty"
    return short if short == text else f"{short}-{prompt_id(text)[:8]}"


def parse(template: str) -> tuple[list[str], list[str]]:
    """(placeholder names, problems of the template's form) of a template, read by string.Formatter."""
    names, problems = [], []
    try:
        fields = list(_FORMATTER.parse(template))
    except ValueError as exc:  # `Single '}' encountered`, an unclosed `{`
        return [], [f"output.name `{template}` is not a valid template ({exc}); write placeholders as "
                    "`{seed}`, and a literal brace as `{{` or `}}`"]
    for _, name, spec, conversion in fields:
        if name is None:
            continue
        if not name or name.isdigit() or not name.isidentifier():
            problems.append(f"output.name has the placeholder `{{{name}}}`; placeholders are names such as "
                            "`{seed}` (no positions, attributes or indexes)")
        elif conversion or (spec and "{" in spec):
            problems.append(f"output.name: `{{{name}}}` has a conversion or a nested placeholder; write "
                            f"`{{{name}}}` or `{{{name}:SPEC}}`")
        elif name == "prompt" and spec and not (spec.isdigit() and 1 <= int(spec) <= MAX_SLUG_CHARS):
            problems.append(f"output.name: `{{prompt:{spec}}}` must give a width from 1 to {MAX_SLUG_CHARS} "
                            "characters, e.g. `{prompt:40}`")
        else:
            names.append(name)
    return names, problems


def render(template: str, job) -> str:
    """The name of `job`'s mp4 under output_dir, without `.mp4`."""
    return template.format_map(_fields(job.category, job.stem, job.prompt_index, job.prompt, job.seed, job.axes))


def _fields(category, stem, prompt_index, prompt, seed, axes) -> dict:
    return {**{placeholder(name): _Axis(_named_value(name, value)) for name, value in axes.items()},
            "category": category, "stem": stem,
            "prompt_index": prompt_index, "prompt_id": prompt_id(prompt), "prompt": _Slug(prompt), "seed": seed}


def placeholder(axis: str) -> str:
    """The placeholder of an axis: its name (`{cfg_scale}`), or for a LoRA's (whose keys have dots, which
    format reads as attributes) `{loras}` (the LoRAs on), `{lora_NAME}` (its strength), `{lora_NAME_file}`
    (its file's stem)."""
    if not axis.startswith("loras."):
        return axis
    _, name, field_ = axis.split(".")
    return f"lora_{name}" if field_ == "strength" else f"lora_{name}_file"


def _named_value(axis: str, value):
    """An axis value as a name shows it: a LoRA file by its stem, a LoRA set as `distill,motion` (`none`)."""
    if axis == "loras":
        return list(value) if value else "none"
    if axis.startswith("loras.") and axis.endswith(".path"):
        return Path(value).stem
    return value


def template_for(manifest: Manifest, stem: str | None, axes: dict | None = None) -> str:
    """The template a job is named by: the manifest's, else the fixed layout (with its axes)."""
    if manifest.output_name:
        return manifest.output_name
    default = DEFAULT_TEMPLATE if stem is not None else DEFAULT_T2V_TEMPLATE
    # Axis names are settings (cfg_scale, steps, …), never a fixed placeholder's; a value goes in
    # through the formatter, so no text of it is read as a placeholder.
    return default + "".join(f"_{_short(name)}-{{{placeholder(name)}}}" for name in axes or {})


def _short(axis: str) -> str:
    # a LoRA's strength or file in a default name: `_motion-0.5`, `_motion-motion_e10`
    return axis.split(".")[1] if axis.startswith("loras.") else axis


def uses_prompt_index(manifest: Manifest) -> bool:
    """Whether outputs are named by the prompt's position (the default) rather than by its content."""
    if not manifest.output_name:
        return True
    return "prompt_index" in parse(manifest.output_name)[0]


def output_path(manifest: Manifest, category: str, stem: str | None, prompt_index: int, prompt: str,
                seed: int, axes: dict | None = None, root: str | None = None) -> tuple[str, str]:
    """(absolute mp4 path, name under output_dir without `.mp4`) of one job; `check_names` checks them.
    `root`: output_dir resolved (once for all jobs, by the caller)."""
    template = template_for(manifest, stem, axes)
    try:
        name = template.format_map(_fields(category, stem, prompt_index, prompt, seed, axes or {}))
    except (KeyError, ValueError, IndexError, TypeError, AttributeError):
        name = ""  # an unknown placeholder or a bad spec: `check_names` says which, at its line
    return os.path.join(root or str(manifest.output_dir.resolve()), f"{name}.mp4"), name


def check_names(manifest: Manifest, jobs: list) -> None:
    """Raise ManifestError, at the manifest's `output.name` line, when the jobs' names cannot be
    written: unknown placeholders, two jobs on one file (both named), a name leaving the output
    folder, a name too long or with characters common file systems refuse."""
    found: list[tuple[str, str]] = []  # (what is wrong, how to fix it)
    axis_names = {placeholder(name) for job in jobs for name in job.axes}
    fix = f"make output.name tell every job apart, e.g. `{_example(jobs)}`"
    template = manifest.output_name
    if template:
        names, problems = parse(template)
        found.extend((problem, "write placeholders as `{name}` or `{name:SPEC}`, a literal brace as `{{` or `}}`")
                     for problem in problems)
        unknown = [name for name in dict.fromkeys(names) if name not in FIXED_PLACEHOLDERS and name not in axis_names]
        if unknown:
            known = ", ".join(f"{{{n}}}" for n in (*FIXED_PLACEHOLDERS[:4], "prompt:40", "seed", *sorted(axis_names)))
            found.append((f"output.name has unknown placeholder{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(f'`{{{n}}}`' for n in unknown)}", f"use {known}"))
        if "stem" in names and any(job.stem is None for job in jobs):
            found.append(("output.name uses `{stem}`, but text-to-video jobs have no reference stem",
                          "leave `{stem}` out"))
        if not found and jobs:
            try:
                render(template, jobs[0])
            except (KeyError, ValueError, IndexError, TypeError, AttributeError) as exc:
                found.append((f"output.name `{template}` cannot be formatted: {exc}",
                              "use a format spec that fits the value, e.g. `{seed:06d}`, `{prompt:40}`"))
        if found:
            raise _located(manifest, found)
    kinds: dict[tuple[str, str], list[str]] = {}
    owner: dict[str, object] = {}
    root = manifest.output_dir.resolve()
    folders_checked: dict[str, str | None] = {}
    probes_checked: dict[str, str | None] = {}
    for job in jobs:
        name = job.name or os.path.relpath(job.output, root)[:-len(".mp4")]
        problem = _name_problem(name, root, folders_checked)
        if not problem and template:
            # The characters the template adds: a category name was checked by the same rule as the manifest
            # was read (at its own line), and a stem is its reference file's own name (the fixed layout's
            # folder too), so they stand in as a plain `x` here.
            probe = template.format_map(_fields("x", "x", job.prompt_index, job.prompt, job.seed, job.axes))
            problem = _characters_problem(probe, probes_checked)
        if problem:
            kinds.setdefault((problem, "change the template's text so that every name can be written"),
                             []).append(f"`{name}` ({describe(job)})")
            continue
        key = job.output.casefold()  # one file on a case-insensitive disk (macOS, Windows)
        first = owner.setdefault(key, job)
        if first is job:
            continue
        if (first.category, first.stem, first.prompt, first.seed, first.axes) == \
                (job.category, job.stem, job.prompt, job.seed, job.axes):
            # Named by content, the same prompt listed twice is one video made twice.
            kinds.setdefault((f"prompts {first.prompt_index} and {job.prompt_index} of the same list are the same "
                              "text, so named by content they are one file",
                              "remove the repeated prompt, or name outputs by position (`{prompt_index}`)"),
                             []).append(f"`{name}.mp4`: {describe(first)} and {describe(job)}")
        else:
            kinds.setdefault(("two jobs would write the same file", fix), []).append(
                f"`{name}.mp4`: {describe(first)} and {describe(job)}")
    for (problem, how), examples in kinds.items():
        more = f" (and {len(examples) - MAX_LISTED} more)" if len(examples) > MAX_LISTED else ""
        found.append((f"output.name: {problem}: {'; '.join(examples[:MAX_LISTED])}{more}", how))
    if found:
        raise _located(manifest, found)


def describe(job) -> str:
    """The job in words: category, reference, prompt, seed and axes (what tells two jobs apart)."""
    parts = [f"category {job.category}"]
    if job.stem is not None:
        parts.append(f"reference {job.stem}")
    parts += [f"prompt {job.prompt_index}", f"seed {job.seed}"]
    parts += [f"{name} {value_text(value)}" for name, value in job.axes.items()]
    return ", ".join(parts)


def _name_problem(name: str, root: Path, folders_checked: dict) -> str | None:
    """What is wrong with the shape of one output name (relative to output_dir, without `.mp4`): a
    name leaving the output folder or landing in the sweep's files, too long; or None."""
    if not name:
        return "a name is empty"
    if name.startswith("/") or os.path.isabs(name):
        return "a name leaves the output folder (it starts with `/`)"
    parts = name.split("/")
    folder, file = "/".join(parts[:-1]), parts[-1]
    if folder not in folders_checked:
        folders_checked[folder] = next(filter(None, (_folder_problem(p, i == 0) for i, p in enumerate(parts[:-1]))),
                                       None)
    if folders_checked[folder]:
        return folders_checked[folder]
    if file in ("", ".", ".."):
        return _folder_problem(file, first=False)
    longest = f"{file}{LONGEST_SUFFIX}"
    if len(longest.encode("utf-8", "surrogateescape")) > NAME_MAX_BYTES or \
            len(os.fsencode(str(root))) + len(name.encode("utf-8", "surrogateescape")) + 20 > PATH_MAX_BYTES:
        too_long = path_length_problem(root / folder / longest)  # says which, in the product's words
        return f"a path (with its poster's `{LONGEST_SUFFIX}`) {too_long}" if too_long else None
    return None


def _folder_problem(part: str, first: bool) -> str | None:
    if part in ("", ".", ".."):
        return "a name leaves the output folder or has an empty folder name (`..`, `.`, `//`)"
    if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX_BYTES:
        return f"a folder name has more than {NAME_MAX_BYTES} bytes, which file systems allow"
    if first and part.casefold() in RESERVED_NAMES:
        return f"a name lands in the sweep's own files ({', '.join(RESERVED_NAMES)})"
    return None


def _characters_problem(name: str, checked: dict) -> str | None:
    """What in a name breaks on common file systems (its folders' verdicts cached in `checked`), or None."""
    folder, _, file = name.rpartition("/")
    if folder not in checked:
        checked[folder] = next(filter(None, (_part_characters(p, True) for p in folder.split("/") if folder)), None)
    return checked[folder] or _part_characters(file, False)


def _part_characters(part: str, folder: bool) -> str | None:
    why = portable_name_problem(part, folder)  # the rule category names are read by (manifest.names)
    return f"a {'folder' if folder else 'file'} name {why}" if why else None


def _example(jobs: list) -> str:
    """A template that tells every job of these apart, by content, axes included."""
    axes = dict.fromkeys(name for job in jobs for name in job.axes)
    t2v = any(job.stem is None for job in jobs)
    return ("{category}/seed_{seed}_{prompt_id}" if t2v else "{category}/{stem}/seed_{seed}_{prompt_id}") + \
        "".join(f"_{_short(name)}-{{{placeholder(name)}}}" for name in axes)


def _located(manifest: Manifest, found: list[tuple[str, str]]) -> ManifestError:
    return ManifestError([located_problem(manifest, "output.name", message, fix,
                                          fallback="categories").problems[0] for message, fix in found])
