"""The review page's HTML: its data (`review.build_page`) rendered with `templates/review.html.j2` (Jinja2,
autoescaped), and written atomically to `<output_dir>/index.html` (a watcher's browser never sees half a
page), only over a page of this product and only into a sweep's folder (or one that becomes the sweep's).
"""
from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

from .outputs import TEMP_MARK, file_mode
from .report import Report
from .review import Page, anchor, build_page
from .sweep import FolderProblem, Sweep

PAGE_NAME = "index.html"
GENERATOR_MARK = b'<meta name="generator" content="wan-sweep review">'  # in the template's head


@functools.lru_cache(maxsize=1)  # `--watch --html` renders every few seconds
def _environment():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined
    env = Environment(loader=FileSystemLoader(str(Path(__file__).parent / "templates")),
                      autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["pct"] = lambda part, whole: 100.0 * part / whole if whole else 0.0
    env.filters["fmt"] = lambda value, spec: format(value, spec)
    env.filters["anchor"] = anchor
    return env


def render(page: Page) -> str:
    return _environment().get_template("review.html.j2").render(page=page)


def _is_review_page(path: Path) -> bool:
    """A page this module wrote (its template names the generator in the head), not someone's own."""
    try:
        with open(path, "rb") as stream:
            return GENERATOR_MARK in stream.read(4096)
    except OSError:
        return False


def _claim_before_first_run(sweep: Sweep) -> None:
    """A page written before the sweep's first `run` (`report --watch --html` started first) makes the
    output folder the sweep's, as `run` does (`.sweep/sweep.json`), so that `run` does not then refuse a
    folder holding only the page as not a sweep's. Only a new or empty folder (or one holding nothing but
    a page of this product) is taken; another folder is refused, as `run` refuses it, and left as it is."""
    root = sweep.root
    try:
        others = [name for name in os.listdir(root)
                  if not name.startswith(TEMP_MARK) and not (name == PAGE_NAME and _is_review_page(root / name))]
    except FileNotFoundError:
        others = []
    except NotADirectoryError:
        others = [root.name]
    sweep.check_folder(allow_non_empty=True)  # /, the home folder, a file: refused as `run` refuses them
    if others:
        raise FolderProblem(f"output_dir {root} is not empty and is not a sweep's output folder (it has no "
                            ".sweep/): no review page is written into it",
                            "point output_dir at a new or empty folder, or start the sweep there first (`run "
                            "--allow-non-empty` takes the folder, deleting nothing); its page is written from then on")
    sweep.claim_folder()


def write_page(sweep: Sweep, report: Report | None = None, reload_s: float | None = None) -> Path:
    """Render the review page to `<output_dir>/index.html` atomically (a watcher's browser never
    sees half a page) and return its path."""
    root = sweep.root
    target = root / PAGE_NAME
    if target.exists() and not _is_review_page(target):
        raise FolderProblem(f"{target} exists and is not a review page of this product: not replaced",
                            "move that file away, or point output_dir at the sweep's own folder")
    if not sweep.state_dir.is_dir():
        _claim_before_first_run(sweep)
    html = render(build_page(sweep, report, reload_s))
    root.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=TEMP_MARK, suffix=".html", dir=root)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(html)
        os.chmod(temp_name, file_mode())  # mkstemp makes it private; the page is for sharing
        os.replace(temp_name, target)
    finally:
        if os.path.exists(temp_name):
            os.unlink(temp_name)
    return target
