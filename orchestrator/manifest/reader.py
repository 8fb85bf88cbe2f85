"""Reading manifest YAML with line marks, safely: `compose` (nesting depth bounded), `Reader` (walks
the node tree and records each problem at its file and line; refuses tags, NULs, lone surrogates,
non-finite numbers and alias bombs, then resolves merge keys), YAML syntax errors at the line where they
start, and `located_problem`."""
from __future__ import annotations

import functools
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

from .model import Manifest, ManifestError, Problem

log = logging.getLogger("orchestrator.manifest")

# Limits of what a manifest may hold, each far above any real sweep: past them YAML's own recursion,
# aliases expanded in the settings fingerprint, or a walk of the file system would hang or crash.
MAX_NESTING = 64  # lists and mappings inside each other (a manifest needs about 6)
MAX_ALIAS_EXPANSION = 1_000_000  # values and characters that aliases may add once expanded
# Plain YAML values only: they go to JSON specs and sidecars. A merge key (`<<: *defaults`) is fine:
# `check_tree` replaces it by the pairs it merges (`resolve_merges`), so every key is checked as if written.
PLAIN_TAGS = {f"tag:yaml.org,2002:{name}" for name in ("str", "int", "float", "bool", "null", "seq", "map")}
MERGE_TAG = "tag:yaml.org,2002:merge"
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # a double-quoted `"\ud800"` escape makes one
KIND_TAGS = {yaml.ScalarNode: PLAIN_TAGS - {"tag:yaml.org,2002:seq", "tag:yaml.org,2002:map"},
             yaml.SequenceNode: {"tag:yaml.org,2002:seq"}, yaml.MappingNode: {"tag:yaml.org,2002:map"}}


class Reader:
    """Walks a composed YAML node tree and records problems with their file and line."""

    def __init__(self, file: Path):
        self.file = file
        self.problems: list[Problem] = []
        self.notes: list[Problem] = []  # said, not refused (Manifest.notes)

    def problem(self, node: yaml.Node | None, message: str, fix: str = "", file: Path | None = None):
        line = node.start_mark.line + 1 if node is not None else 0
        self.problems.append(Problem(file or self.file, line, message, fix))

    def note(self, node: yaml.Node | None, message: str, fix: str = ""):
        """Something to say about a line that is not a problem: logged as a warning, kept in Manifest.notes."""
        line = node.start_mark.line + 1 if node is not None else 0
        self.notes.append(Problem(self.file, line, message, fix))
        log.warning("note: %s", self.notes[-1])

    def mapping(self, node, what: str, allowed: dict[str, bool] | None = None) -> dict[str, tuple]:
        """Return {key: (key_node, value_node)}; report unknown and missing required keys."""
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, f"{what} must be a mapping (key: value)", f"write {what} as `key: value` lines")
            return {}
        out: dict[str, tuple] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is None:
                self.problem(key_node, f"{what} has a key that is not a plain name")
                continue
            if key in out:
                self.problem(key_node, f"{what} has `{key}` twice", "keep one of them")
                continue
            if allowed is not None and key not in allowed:
                self.problem(key_node, f"unknown key `{key}` in {what}",
                             f"use one of: {', '.join(sorted(allowed))}")
                continue
            out[key] = (key_node, value_node)
        if allowed is not None:
            for key, required in allowed.items():
                if required and key not in out:
                    self.problem(node, f"{what} is missing `{key}`", f"add `{key}:` to {what}")
        return out

    def value(self, node) -> Any:
        if node is None:
            return None
        try:  # the node itself, constructed as safe_load would (not written out and read again)
            return yaml.constructor.SafeConstructor().construct_document(node)
        except yaml.YAMLError as exc:  # e.g. a list as a mapping key, a merge of a non-mapping
            # (the error's own marks count lines of the re-serialized value, not of the file)
            self.problem(node, f"cannot read this value: {getattr(exc, 'problem', None) or exc}",
                         "write plain text, numbers, lists and `key: value` mappings")
            return None

    def scalar(self, node, what: str, kind: type | tuple, default=None, choices=None):
        if node is None:
            return default
        value = self.value(node)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds).replace("str", "text").replace("int", "integer")
            article = "an" if names[0] in "aeiou" else "a"
            self.problem(node, f"{what} must be {names}, got {value!r}", f"set {what} to {article} {names}")
            return default
        if choices is not None and value not in choices:
            self.problem(node, f"{what} is {value!r}", f"use one of: {', '.join(map(str, choices))}")
            return default
        return value

    def check_tree(self, root, file: Path | None = None) -> bool:
        """Report what no key's own check can catch, anywhere in a composed file: tags other than
        plain YAML values, NUL characters, infinite or NaN numbers, and aliases that expand past
        MAX_ALIAS_EXPANSION (a "billion laughs"), at the anchor's line. True when nothing was found."""
        before = len(self.problems)
        constructor = yaml.constructor.SafeConstructor()
        seen: set[int] = set()
        stack: list[tuple[yaml.Node, bool]] = [(root, False)]
        while stack:
            node, is_key = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            if node.tag not in PLAIN_TAGS and not (is_key and node.tag == MERGE_TAG):
                if node.tag == "tag:yaml.org,2002:timestamp":
                    self.problem(node, f"`{node.value}` would be read as a date", "quote it: "
                                 f"\"{node.value}\"", file=file)
                else:
                    self.problem(node, f"the YAML tag `{tag}` is not supported here",
                                 "remove the tag (or quote the value): a manifest holds plain text, "
                                 "numbers, lists and `key: value` mappings", file=file)
            elif node.tag not in KIND_TAGS[type(node)] and node.tag != MERGE_TAG:
                kind = {yaml.ScalarNode: "a single value", yaml.SequenceNode: "a list",
                        yaml.MappingNode: "a mapping"}[type(node)]
                self.problem(node, f"{kind} cannot be a `{tag}`", "remove the tag", file=file)
            elif isinstance(node, yaml.ScalarNode):
                if node.tag == MERGE_TAG:
                    continue  # the `<<` of a merge; what it merges is checked where it is read
                if "\x00" in node.value:
                    self.problem(node, "a value contains a NUL character", "remove it", file=file)
                    continue
                surrogate = _LONE_SURROGATE.search(node.value)
                if surrogate:  # (a `"\ud800"` escape): no file name, hash or UTF-8 text can hold it
                    self.problem(node, f"a value contains `\\u{ord(surrogate.group()):04x}`, a lone surrogate "
                                 "(half of a UTF-16 pair, not a character)", "remove it, or write the whole "
                                 "character (e.g. `\\U0001F600`, or the character itself)", file=file)
                    continue
                try:
                    value = constructor.construct_object(node)
                except (ValueError, KeyError, yaml.YAMLError):  # `!!int abc`, `!!bool maybe`, `!!seq x`
                    self.problem(node, f"`{node.value}` is not a valid `{tag}`",
                                 "remove the tag (or quote the value)", file=file)
                    continue
                if isinstance(value, float) and not math.isfinite(value):
                    self.problem(node, f"`{node.value}` is not a finite number", "use a number", file=file)
            elif isinstance(node, yaml.SequenceNode):
                stack.extend((item, False) for item in reversed(node.value))
            else:
                for key, item in reversed(node.value):
                    stack.extend(((item, False), (key, True)))
        found = self._alias_problem(root)
        if found is not None:
            node, message = found
            self.problem(node, message, "write the values out instead of repeating this anchor", file=file)
        if len(self.problems) == before:
            for node, message in resolve_merges(root):
                self.problem(node, message, "merge a mapping (`<<: *defaults`) or a list of mappings "
                             "(`<<: [*a, *b]`)", file=file)
        return len(self.problems) == before

    @staticmethod
    def _alias_problem(root) -> tuple[yaml.Node, str] | None:
        """(anchored node, what is wrong) when an alias sits inside its own anchor (an endless
        value), or when aliases make the file expand by more than MAX_ALIAS_EXPANSION ("billion
        laughs"), naming the anchor whose repetitions add most; else None. Sizes are computed once
        per distinct node (an alias is the anchored node itself), so nothing is ever expanded."""
        size: dict[int, int] = {}  # expanded size of each distinct node: 1 per node + its characters
        uses: dict[int, int] = {}
        nodes: dict[int, yaml.Node] = {}
        stack: list[tuple[yaml.Node, bool]] = [(root, False)]
        while stack:
            node, children_done = stack.pop()
            key = id(node)
            if children_done:
                size[key] = 1 + (len(node.value) if isinstance(node, yaml.ScalarNode) else
                                 sum(size[id(kid)] for kid in _children(node)))
                continue
            uses[key] = uses.get(key, 0) + 1
            if key in nodes:
                if key not in size:  # still being walked: this alias is inside its own anchor
                    return node, "an alias refers to the anchor on this line from inside it (an endless value)"
                continue
            nodes[key] = node
            stack.append((node, True))
            stack.extend((kid, False) for kid in _children(node))
        written = sum(1 + (len(n.value) if isinstance(n, yaml.ScalarNode) else 0) for n in nodes.values())
        if size[id(root)] - written <= MAX_ALIAS_EXPANSION:
            return None
        added = {key: size[key] * (count - 1) for key, count in uses.items() if count > 1}
        worst = max(added, key=lambda key: (added[key], -nodes[key].start_mark.line))
        return nodes[worst], (f"the aliases of the anchor on this line expand to about {added[worst]:,} "
                              f"values and characters (aliases may add at most {MAX_ALIAS_EXPANSION:,})")


class _ManifestLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing nesting deeper than MAX_NESTING: the composer recurses once
    per level, and 20,000 `[` would end in a RecursionError instead of a located error."""

    def compose_node(self, parent, index):
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_NESTING:
                raise yaml.composer.ComposerError(None, None, _NESTING_PROBLEM, self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


# libyaml, PyYAML's C parser, where PyYAML has it (its wheels do): a 10 MB manifest is read in a fraction
# of the time its pure-Python parser takes. Its composer recurses in C, so the nesting is checked first,
# on its events (a flat stream, as fast).
_C_LOADER = getattr(yaml, "CSafeLoader", None)
_NESTING_PROBLEM = f"lists or mappings nested more than {MAX_NESTING} levels deep (a manifest needs about 6)"


def compose(path: Path) -> yaml.Node | None:
    """The node tree of the YAML file at `path`, with line marks; nesting deeper than MAX_NESTING, and
    YAML syntax errors, raise a yaml.YAMLError at their line."""
    with open(path, encoding="utf-8") as stream:
        if _C_LOADER is None:
            return yaml.compose(stream, Loader=_ManifestLoader)
        text = stream.read()
    try:
        depth = 0
        for event in yaml.parse(text, Loader=_C_LOADER):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
                continue
            elif not isinstance(event, yaml.NodeEvent):
                continue
            if depth + isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent)) > MAX_NESTING + 1:
                raise yaml.composer.ComposerError(None, None, _NESTING_PROBLEM, event.start_mark)
        return yaml.compose(text, Loader=_C_LOADER)
    except yaml.MarkedYAMLError as exc:  # libyaml's words for what PyYAML's parser reads otherwise
        if exc.problem == "exceeded maximum nesting depth":  # (its own bound, met while scanning ahead)
            exc.context, exc.context_mark, exc.problem = None, None, _NESTING_PROBLEM
        elif exc.problem == "found invalid Unicode character escape code":  # (PyYAML makes the character)
            exc.problem = ("an escape names no character: a lone surrogate (`\\ud800` to `\\udfff`, half of a "
                           "UTF-16 pair) or a code past `\\U0010FFFF`")
        raise


def resolve_merges(root) -> list[tuple[yaml.Node, str]]:
    """Replace, in place, each mapping's merge keys (`<<: *defaults`, `<<: [*a, *b]`) by the pairs they
    merge, by YAML's merge rule: a key written in the mapping wins over a merged one, and an earlier
    mapping of a merged list over a later one. The pairs keep their nodes, so a problem in a merged value
    is reported at its anchor's line, and the readers never see a `<<`. Returns (node, what is wrong)
    for each merge of something that is not a mapping (those merge keys stay, unresolved)."""
    problems: list[tuple[yaml.Node, str]] = []
    order: list[yaml.MappingNode] = []  # every mapping, each after the mappings inside it (an anchor's too)
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            stack.append((node, True))
        stack.extend((kid, False) for kid in reversed(_children(node)))
    failed: set[int] = set()
    for node in order:
        if not any(key.tag == MERGE_TAG for key, _ in node.value):
            continue
        own = [(key, value) for key, value in node.value if key.tag != MERGE_TAG]
        taken = {key.value for key, _ in own if isinstance(key, yaml.ScalarNode)}
        merged = []
        for key, value in node.value:
            if key.tag != MERGE_TAG:
                continue
            for source in value.value if isinstance(value, yaml.SequenceNode) else [value]:
                if id(source) in failed:  # a mapping whose own merge was reported
                    failed.add(id(node))
                    break
                if not isinstance(source, yaml.MappingNode) or any(k.tag == MERGE_TAG for k, _ in source.value):
                    what = (f"`{source.value}` is not a mapping" if isinstance(source, yaml.ScalarNode) else
                            "a list is not a mapping" if isinstance(source, yaml.SequenceNode) else
                            "this mapping merges itself (a loop)")
                    problems.append((source, f"`<<` merges mappings into this one, and {what}"))
                    failed.add(id(node))
                    break
                for pair in source.value:
                    name = pair[0].value if isinstance(pair[0], yaml.ScalarNode) else None
                    if name is None or name not in taken:
                        merged.append(pair)
                        if name is not None:
                            taken.add(name)
        if id(node) not in failed:
            node.value = merged + own
    return problems


def _children(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


# What PyYAML's context names when something opened on an earlier line runs on (an unclosed `[`, `{`
# or quote): that line is where to look, not where PyYAML gave up. Its other contexts (a block
# mapping, …) name the enclosing block, often line 1, so there the problem's own line is the one.
_OPENERS = {"flow sequence": "close the `[` with `]`", "flow mapping": "close the `{` with `}`",
            "quoted scalar": "close the quote", "simple key": "end the key with `:`"}


def yaml_problem(file: Path, exc: yaml.YAMLError, what: str) -> Problem:
    """A YAML syntax error at the line where the problem starts."""
    problem_mark, context_mark = getattr(exc, "problem_mark", None), getattr(exc, "context_mark", None)
    line = problem_mark.line + 1 if problem_mark else 0
    context, problem = getattr(exc, "context", None) or "", getattr(exc, "problem", None) or str(exc)
    opener = next((name for name in _OPENERS if context.endswith(f" {name}")), None)
    if opener and context_mark is not None and problem_mark is not None and context_mark.line < problem_mark.line:
        return Problem(file, context_mark.line + 1, f"{what} is not valid YAML: the {opener} that starts on "
                       f"this line runs on to line {line} ({problem})", _OPENERS[opener])
    return Problem(file, line, f"{what} is not valid YAML: {problem}", "fix the YAML syntax at that line")


def node_at(root, dotted: str):
    """The YAML node of a dotted key (`generation.num_frames`), else of its nearest parent present. A key
    with dots of its own (the axis `loras.motion.strength`) is matched whole, the longest first; a number
    after a list's key is its item (`axes.steps.1`: the second value)."""
    node, found = root, None
    parts = dotted.split(".")
    while parts:
        if isinstance(node, yaml.SequenceNode) and parts[0].isdigit() and int(parts[0]) < len(node.value):
            found = node = node.value[int(parts.pop(0))]
            continue
        if not isinstance(node, yaml.MappingNode):
            break
        keys = {key.value: (key, value) for key, value in node.value if isinstance(key, yaml.ScalarNode)}
        length = next((n for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in keys), 0)
        if not length:
            break
        found, node = keys[".".join(parts[:length])]  # the key's line: a block mapping's value starts on the next
        del parts[:length]
    return found


@functools.lru_cache(maxsize=4)
def _composed(path: Path, mtime_ns: int, size: int):
    """The manifest's tree for `located_problem`, composed once per version of the file (a template's
    problems are located one by one), its merges resolved (a merged key is at its anchor's line)."""
    root = compose(path)
    if root is not None:
        resolve_merges(root)
    return root


def located_problem(manifest: Manifest, dotted: str, message: str, fix: str = "",
                    fallback: str | None = None) -> ManifestError:
    """A problem found after loading (the output folder's contents, …), at the line of `dotted` in
    the manifest file, else of `fallback` (e.g. `name`, which a default output_dir comes from)."""
    try:
        stat = os.stat(manifest.path)
        root = _composed(manifest.path, stat.st_mtime_ns, stat.st_size)
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        root = None
    node = node_at(root, dotted) if root is not None else None
    if node is None and fallback and root is not None:
        node = node_at(root, fallback)
    line = node.start_mark.line + 1 if node is not None else 0
    return ManifestError([Problem(manifest.path, line, message, fix)])
