"""A manifest's categories: their reference videos or images (globs, bounded walks, readable media),
their prompts (inline, or a .yaml/.txt file), and the output paths their jobs will write."""
from __future__ import annotations

import fnmatch
import functools
import glob
import itertools
import os
from pathlib import Path
from typing import Any

import yaml

from .model import CONDITIONED_TASKS, Category, Reference
from .names import path_length_problem, portable_name_problem, safe_component_problem
from .reader import Reader, compose, yaml_problem
from .task_inputs import EXTRA_FILE_KEYS, INPUT_KEYS, read_extra_inputs, task_layout, tasks_taking

MAX_GLOB_ENTRIES = 100_000  # files and folders one `videos:`/`images:` glob may look at
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
AUDIO_SUFFIXES = (".wav", ".mp3", ".flac", ".m4a", ".aac", ".ogg", ".opus")
# A category key holding files -> (suffixes, what one is called, the stream it must have).
FILE_KINDS = {"videos": (VIDEO_SUFFIXES, "video", "video"), "images": (IMAGE_SUFFIXES, "image", "video"),
              "control": (VIDEO_SUFFIXES, "control video", "video"),
              "audio": (AUDIO_SUFFIXES + VIDEO_SUFFIXES, "audio file", "audio")}  # (speech in a video's track too)
# What the product itself keeps in the output folder (`sweep`, `review`): a category of one of these
# names would mix its videos with the ledger, the logs or the review page.
RESERVED_NAMES = (".sweep", "logs", "index.html")


def read_categories(reader: Reader, node, base: Path, task: str | None,
                    output_dir: Path | None = None) -> tuple[Category, ...]:
    """The categories; their globs never match under `output_dir` (the sweep's own videos)."""
    if node is None:
        return ()
    entries = reader.mapping(node, "categories")
    if not entries and isinstance(node, yaml.MappingNode):
        reader.problem(node, "categories is empty", "add at least one category")
    categories = []
    for name, (key_node, value_node) in entries.items():
        why = safe_component_problem(name)
        if not why and name.casefold() in RESERVED_NAMES:  # casefold: one folder on a case-insensitive disk
            reader.problem(key_node, f"category name {name!r} is taken: the output folder keeps "
                                     f"{', '.join(RESERVED_NAMES)} for the sweep itself",
                           f"rename the category, e.g. `{name.strip('.')}_videos`")
            continue
        why = why or portable_name_problem(name)  # the rule of `output.name`'s names too, in every layout
        if why:
            reader.problem(key_node, f"category name {name!r} {why}",
                           "rename the category to a plain folder name")
            continue
        category = _read_category(reader, name, value_node, base, task, output_dir)
        if category is not None:
            categories.append(category)
    return tuple(categories)


def _read_category(reader: Reader, name: str, node, base: Path, task: str | None,
                   output_dir: Path | None) -> Category | None:
    what = f"category `{name}`"
    keys = reader.mapping(node, what, {"videos": False, "images": False, "prompts": True,
                                       **{key: False for key in INPUT_KEYS}})
    if not keys:
        return None
    extras: tuple[str, ...] = ()
    if task in CONDITIONED_TASKS:
        layout = task_layout(reader, what, node, keys, task)
        if layout is None:
            return None
        main_key, extras = layout
        kind = "videos" if main_key == "control" else main_key
    else:
        for key in INPUT_KEYS:
            if key in keys:
                reader.problem(keys[key][0], f"{what}: `{key}:` is an input of model.task "
                                             f"{' or '.join(tasks_taking(key))}, not {task}",
                               f"remove `{key}:` or change model.task")
        if "videos" in keys and "images" in keys:
            reader.problem(node, f"{what} has both videos and images", "keep one of them")
            return None
        kind = "videos" if "videos" in keys else "images" if "images" in keys else "none"
        main_key = kind
        expected = {"v2v": "videos", "i2v": "images", "t2v": "none"}.get(task or "")
        if expected and kind != expected:
            fix = {"videos": "add `videos:` (reference videos) or change model.task",
                   "images": "add `images:` (first frames) or change model.task",
                   "none": "remove the reference files or change model.task to v2v/i2v"}[expected]
            reader.problem(node, f"{what} has {kind if kind != 'none' else 'no references'}, "
                                 f"but model.task {task} needs {expected if expected != 'none' else 'none'}", fix)
    noun = FILE_KINDS[main_key][1] if kind != "none" else ""

    inputs: list[Path] = []
    lost: set[str] | None = set()  # stems whose files are reported already; None: any may be
    if kind != "none":
        inputs, lost = _read_inputs(reader, what, keys[main_key][1], base, main_key, output_dir)

    prompts_node = keys.get("prompts", (None, None))[1]
    prompts, prompts_file, prompt_lines, prompts_node = _read_prompts(reader, what, prompts_node, base)
    if prompts is None:
        return None

    references: list[Reference] = []
    if kind == "none":
        if isinstance(prompts, dict):
            reader.problem(prompts_node, f"{what} has no videos, so its prompts must be a list, "
                                         "not a mapping from video stem", "write the prompts as a list")
            return None
        references.append(Reference(stem=None, path=None, prompts=tuple(prompts)))
    else:
        stems: dict[str, Path] = {}
        for file in inputs:
            stem = file.stem
            why = safe_component_problem(stem)
            if why:
                reader.problem(keys[main_key][1], f"{what}: file name {file.name!r} {why}", "rename the file")
                if lost is not None:
                    lost.add(stem)
                continue
            if stem in stems:
                reader.problem(keys[main_key][1], f"{what}: {stems[stem].name} and {file.name} map to one "
                                              f"output folder `{name}/{stem}`",
                               "rename one of the files or put them in separate categories")
                continue
            stems[stem] = file
        stem_inputs = read_extra_inputs(reader, what, keys, extras, base, main_key, stems, lost,
                                        functools.partial(_read_inputs, output_dir=output_dir))
        if isinstance(prompts, dict):
            for stem in prompts:
                # a glob that matched nothing, or a missing file, is reported once, not again as
                # each stem whose prompts then have no video
                if stem not in stems and lost is not None and stem not in lost:
                    reader.problem(prompt_lines.get(stem, prompts_node),
                                   f"{what}: prompts are given for `{stem}`, but there is no such "
                                   f"{noun}", f"add the {noun} or remove those prompts",
                                   file=prompts_file)
            for stem, file in stems.items():
                if stem not in prompts:
                    reader.problem(prompts_node, f"{what}: {noun} `{file.name}` has no prompts",
                                   f"add `{stem}:` with its prompts", file=prompts_file)
                    continue
                references.append(Reference(stem=stem, path=file, prompts=tuple(prompts[stem]),
                                            inputs=stem_inputs.get(stem, {})))
        else:
            references.extend(Reference(stem=s, path=f, prompts=tuple(prompts), inputs=stem_inputs.get(s, {}))
                              for s, f in stems.items())
    return Category(name=name, kind=kind, references=tuple(references))


def _absolute(path: Path) -> Path:
    """`path` made absolute without following links: a linked reference is named by the link (its
    stem names the outputs and keys the prompts) and read through it, from its target."""
    return Path(os.path.abspath(path))


def check_output_paths(reader: Reader, node, output_dir: Path, categories, seeds) -> None:
    """Every file a category's jobs will write must fit the file system's path length (checked
    for the longest name: the largest seed and prompt index, a poster's `.thumb.jpg`)."""
    if path_length_problem(output_dir) or not isinstance(node, yaml.MappingNode):
        return  # reported with output_dir / categories already
    key_nodes = {key.value: key for key, _ in node.value if isinstance(key, yaml.ScalarNode)}
    for category in categories:
        longest = max(
            (output_dir / category.name / (ref.stem or "") /
             f"seed_{max(seeds, default=0)}_prompt_{len(ref.prompts) - 1}.thumb.jpg"
             for ref in category.references), key=lambda path: len(os.fsencode(str(path))), default=None)
        too_long = longest is not None and path_length_problem(longest)
        if too_long:
            reader.problem(key_nodes.get(category.name), f"category `{category.name}`: the path of an output "
                           f"({longest}) {too_long}", "use a shorter output_dir, category name or file names")


def _read_inputs(reader: Reader, what: str, node, base: Path, kind: str,
                 output_dir: Path | None = None) -> tuple[list[Path], set[str] | None]:
    """The readable files under key `kind` (FILE_KINDS), and the stems of those reported missing or
    unreadable (None where a glob matched nothing: then any stem may be one of its files). A glob never
    matches under `output_dir`: the sweep's own videos are no references (a note says how many it left)."""
    suffixes, noun, stream = FILE_KINDS[kind]
    value = reader.value(node)
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) for p in patterns):
        reader.problem(node, f"{what}: {kind} must be a glob pattern or a list of paths",
                       f"write e.g. `{kind}: refs/{kind}/*{suffixes[0]}`"
                       + (", or a mapping from each reference's stem to its file" if kind in EXTRA_FILE_KEYS else ""))
        return [], None
    items = node.value if isinstance(node, yaml.SequenceNode) else [node]
    found: list[tuple[Path, yaml.Node]] = []
    lost: set[str] | None = set()
    for pattern, item in zip(patterns, items):
        full = pattern if os.path.isabs(pattern) else str(base / pattern)
        if glob.has_magic(pattern):
            matches, left_out, too_wide = glob_files(full, output_dir)
            if too_wide:
                reader.problem(item, f"{what}: glob `{pattern}` {too_wide}",
                               "start the pattern at the folder that holds the files, e.g. refs/**/*.mp4")
                continue
            files = f"{left_out:,} file{'s' if left_out != 1 else ''}"
            if not matches and left_out:
                reader.problem(item, f"{what}: glob `{pattern}` matches no file outside the output folder "
                                     f"{output_dir} ({files} under it were left out: the sweep's own videos are "
                                     "no references)", "point the pattern at the reference files, outside output_dir")
                lost = None
            elif not matches:
                reader.problem(item, f"{what}: glob `{pattern}` matches no file (looked in {base})",
                               "check the pattern and that the files are there")
                lost = None
            elif left_out:
                reader.note(item, f"{what}: glob `{pattern}` left out {files} under the output folder "
                                  f"{output_dir} (the sweep's own videos are no references)",
                            "start the pattern at the folder of the references (e.g. refs/**/*.mp4), or move "
                            "output_dir out of the glob's folder")
            found.extend((_absolute(m), item) for m in matches)
            continue
        file = Path(full)
        if os.path.isdir(file):
            suggested = f"{pattern.rstrip('/' + os.sep)}/*{_usual_suffix(file, suffixes)}"
            reader.problem(item, f"{what}: `{pattern}` is a folder, not {'an' if noun[0] in 'aeiou' else 'a'} "
                                 f"{noun} ({file})",
                           f"match the files in it with a glob: `{kind}: {suggested}`")
            lost = None  # any stem may be one of its files
            continue
        if not os.path.isfile(file):  # (False, not an error, for a name too long to exist)
            reader.problem(item, f"{what}: {noun} `{pattern}` does not exist ({file})",
                           "fix the path; relative paths start at the manifest's folder")
            if lost is not None:
                lost.add(file.stem)
            continue
        found.append((_absolute(file), item))
    files = []
    for file, item in found:
        if file.suffix.lower() not in suffixes:
            reader.problem(item, f"{what}: `{file.name}` is not {'an' if noun[0] in 'aeiou' else 'a'} {noun.removesuffix(' file')} "
                                 f"file ({', '.join(suffixes)})", f"list only {noun}s under `{kind}:`"
                           if kind not in ("videos", "images") else f"list only {kind} here")
        elif not _readable_media(file, stream):
            reader.problem(item, f"{what}: `{file}` cannot be read as {'an' if noun[0] in 'aeiou' else 'a'} {noun} (empty, corrupt or "
                                 "no permission)", "replace it with a working file or remove it")
        else:
            files.append(file)
            continue
        if lost is not None:
            lost.add(file.stem)
    return files, lost


def _usual_suffix(folder: Path, suffixes: tuple[str, ...], most: int = 1000) -> str:
    """The suffix of `suffixes` that most files directly in `folder` have (of the first `most`), for a
    glob to suggest; the first of `suffixes` when none has one."""
    counts = dict.fromkeys(suffixes, 0)
    try:
        with os.scandir(folder) as entries:
            for entry in itertools.islice(entries, most):
                suffix = os.path.splitext(entry.name)[1]
                if suffix in counts:
                    counts[suffix] += 1
    except OSError:
        pass
    return max(suffixes, key=lambda suffix: counts[suffix])  # (the first among equals)


def glob_files(pattern: str, outputs: Path | None = None) -> tuple[list[Path], int, str | None]:
    """(the files `pattern` matches, how many more it matched under `outputs`, why it was not walked).

    The files are those of `glob.glob(pattern, recursive=True)`, sorted: `*`, `?` and `[…]` within a name,
    `**` for any depth of folders, hidden names only where the pattern's own part starts with `.`, links
    to folders followed. None is under `outputs` (the sweep's output folder, its `.sweep/` included): those
    are only counted, up to MAX_GLOB_ENTRIES of their files and folders. Not walked at all: `**` from `/`
    or the home folder, and a pattern that would look at more than MAX_GLOB_ENTRIES files and folders
    outside `outputs`; the walk stops at that bound."""
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    start = Path(*parts[:fixed]) if fixed else Path(".")
    rest = parts[fixed:]
    where = start.resolve()
    if any("**" in part for part in rest) and where in (Path(where.anchor), Path.home().resolve()):
        return [], 0, f"would search all of {where} (`**` walks every folder below it)"
    if pattern.endswith(("/", os.sep)):
        return [], 0, None  # glob's matches are folders then
    out = os.path.realpath(outputs) if outputs is not None else None

    def inside_outputs(folder: str) -> bool:
        real = os.path.realpath(folder)
        return out is not None and (real == out or real.startswith(out.rstrip(os.sep) + os.sep))

    found: set[str] = set()
    left_out: set[str] = set()
    seen = {False: 0, True: 0}  # files and folders looked at, outside and inside `outputs`
    done: set[tuple[str, int]] = set()
    stack = [(str(start), 0, inside_outputs(str(start)))]
    while stack:
        folder, index, excluded = stack.pop()
        if (folder, index) in done or seen[True] > MAX_GLOB_ENTRIES and excluded:
            continue
        done.add((folder, index))
        part, last = rest[index], index == len(rest) - 1
        matched = left_out if excluded else found
        if not glob.has_magic(part):  # a plain name: glob looks it up without listing the folder
            path = os.path.join(folder, part)
            if last and os.path.isfile(path):
                matched.add(path)
            elif not last and os.path.isdir(path):
                stack.append((path, index + 1, excluded or inside_outputs(path)))
            continue
        recursive = part == "**"
        if recursive and not last:
            stack.append((folder, index + 1, excluded))  # `**` as no folder at all
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith(".") and (recursive or not part.startswith(".")):
                continue  # glob's `*` and `**` skip hidden names
            seen[excluded] += 1
            if seen[False] > MAX_GLOB_ENTRIES:
                return [], 0, f"would look at more than {MAX_GLOB_ENTRIES:,} files and folders under {where}"
            if not recursive and not fnmatch.fnmatch(entry.name, part):
                continue
            try:  # glob follows links to folders too (a link to its own parent loops until the bound)
                is_dir = entry.is_dir()
                is_file = not is_dir and (last or recursive) and entry.is_file()
            except OSError:
                continue
            if is_file and last:
                matched.add(entry.path)
            if is_dir and (recursive or not last):
                stack.append((entry.path, index if recursive else index + 1,
                              excluded or inside_outputs(entry.path)))
    return sorted(Path(path) for path in found), len(left_out), None


def _readable_media(file: Path, stream_type: str = "video") -> bool:
    """Open the file and find a picture (or sound) stream in it (cheap: headers only)."""
    import av
    try:
        with open(file, "rb") as stream:
            if not stream.read(1):
                return False
        with av.open(str(file)) as container:
            return bool(container.streams.audio if stream_type == "audio" else container.streams.video)
    except (OSError, av.error.FFmpegError, ValueError):
        return False


def _read_prompts(reader: Reader, what: str, node, base: Path):
    """Return (list | {stem: list} | None, the file they came from, {stem: key node}, their node)."""
    file = reader.file
    value = reader.value(node)
    if isinstance(value, str) and not value.strip().startswith(("[", "{")) and "\n" not in value \
            and Path(value).suffix.lower() in (".yaml", ".yml", ".txt", ".json"):
        prompt_path = Path(value) if os.path.isabs(value) else base / value
        if not os.path.isfile(prompt_path):
            reader.problem(node, f"{what}: prompts file `{value}` does not exist ({prompt_path})",
                           "fix the path; relative paths start at the manifest's folder")
            return None, file, {}, node
        file = prompt_path.resolve()
        if prompt_path.suffix.lower() == ".txt":
            try:
                text = prompt_path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError) as exc:
                reader.problem(node, f"{what}: prompts file `{value}` cannot be read as text ({exc})",
                               "save it as UTF-8 text, one prompt per line")
                return None, file, {}, node
            if "\x00" in text:
                reader.problem(node, f"{what}: prompts file `{value}` contains NUL characters (a binary "
                                     "file?)", "save it as UTF-8 text, one prompt per line")
                return None, file, {}, node
            lines = [line.strip() for line in text.splitlines()]
            # blank lines and `#` lines (comments, as in the YAML files) are not prompts
            value, node = [line for line in lines if line and not line.startswith("#")], None
        else:
            try:
                node = compose(prompt_path)
            except (UnicodeDecodeError, OSError) as exc:
                reader.problem(node, f"{what}: prompts file `{value}` cannot be read as text ({exc})",
                               "save it as UTF-8 text")
                return None, file, {}, node
            except yaml.YAMLError as exc:
                reader.problems.append(yaml_problem(file, exc, "the prompts file"))
                return None, file, {}, None
            if node is not None and not reader.check_tree(node, file=file):
                return None, file, {}, None
            value = reader.value(node)
    lines: dict[str, Any] = {}
    if isinstance(node, yaml.MappingNode):
        lines = {k.value: k for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
    if isinstance(value, list) and value and all(isinstance(p, str) and p.strip() for p in value):
        return value, file, lines, node
    if isinstance(value, dict) and value:
        wrong = {str(k): _prompt_list_problem(v) for k, v in value.items()}
        if not any(wrong.values()):
            return {str(k): v for k, v in value.items()}, file, lines, node
        for stem, why in wrong.items():
            if why:  # at the stem's own line: an entry with nothing under it is a stem line
                reader.problem(lines.get(stem, node), f"{what}: the prompts of `{stem}` {why}",
                               f"list its prompts under `{stem}:`, one `- text` line each", file=file)
        return None, file, {}, node
    reader.problem(node, f"{what}: prompts must be a non-empty list of texts, a mapping from video "
                         "stem to such a list, or the path of a .yaml/.txt file holding one",
                   "see experiments/motion_transfer.yaml", file=file)
    return None, file, {}, node


def _prompt_list_problem(value) -> str | None:
    """Why one stem's prompts are not a non-empty list of texts, or None."""
    if value is None:
        return "are empty (nothing under it)"
    if not isinstance(value, list):
        return f"must be a list of texts, not {type(value).__name__} {value!r}"
    if not value:
        return "are an empty list"
    blank = [i + 1 for i, p in enumerate(value) if not (isinstance(p, str) and p.strip())]
    if blank:
        return f"have an empty or non-text prompt (number {', '.join(map(str, blank))})"
    return None
