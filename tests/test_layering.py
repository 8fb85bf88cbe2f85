"""The package's import graph (issue 21): no module imports, even inside a function, one that imports
it back, and the manifest reader comes without the backends."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import orchestrator

PACKAGE = Path(orchestrator.__file__).parent


def _import_graph(type_hints: bool = False) -> dict[str, set[str]]:
    """{module: the orchestrator modules it imports anywhere in its body}, TYPE_CHECKING blocks aside
    unless `type_hints`; importing a submodule counts as importing its packages too, as Python runs them."""
    modules = {}
    for file in PACKAGE.rglob("*.py"):
        parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (file, is_package)
    graph = {}
    for name, (file, is_package) in modules.items():
        tree = ast.parse(file.read_text(encoding="utf-8"))
        typing_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(block.test) for node in ast.walk(block)
                       } if not type_hints else set()
        targets = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets.update(f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module
                               for alias in node.names)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        with_parents = set()
        for target in targets:
            pieces = target.split(".")
            with_parents.update(".".join(pieces[:i]) for i in range(1, len(pieces) + 1))
        graph[name] = {t for t in with_parents if t in modules and t != name and not name.startswith(t + ".")}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, str] = {}
    circles = []

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                circles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return circles


def test_no_import_circle():
    circles = _circles(_import_graph())
    assert not circles, "import circles: " + "; ".join(" → ".join(c) for c in circles)


def test_no_import_circle_even_through_type_hints():
    """The flow goes one way for the reader too: a type named under TYPE_CHECKING comes from below
    (backends name Job and Manifest; jobs, which computes the ids, knows no backend)."""
    circles = _circles(_import_graph(type_hints=True))
    assert not circles, "import circles through type hints: " + "; ".join(" → ".join(c) for c in circles)


def test_manifest_reader_imports_no_backend():
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, orchestrator.manifest, orchestrator.jobs; "
                               "print(sorted(m for m in sys.modules if m.startswith('orchestrator.')))"],
        capture_output=True, text=True, check=True, cwd=PACKAGE.parent).stdout
    assert "orchestrator.backends" not in loaded
    assert "orchestrator.manifest" in loaded


def _reached(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others (function-local imports included)."""
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


# The backend interface (issue 29): one low module, below the job loop, the planner and sizing, which
# import it at their top; the backends themselves (torch, diffusers, DiffSynth) only when `backend_class`
# asks for one, by its module's name.
ABOVE_THE_BACKEND_INTERFACE = (
    "orchestrator.planning", "orchestrator.ledger", "orchestrator.sweep", "orchestrator.locks", "orchestrator.job_loop",
    "orchestrator.report", "orchestrator.sizing", "orchestrator.review", "orchestrator.checkpoints",
    "orchestrator.backends", "orchestrator.demo", "orchestrator.worker", "orchestrator.supervisor",
    "orchestrator.executors", "orchestrator.speed_trial", "orchestrator.validation", "orchestrator.run",
    "orchestrator.api", "orchestrator.cli")
BACKEND_LIBRARIES = ("torch", "diffusers", "transformers", "diffsynth", "torchao", "safetensors", "accelerate")


def test_the_backend_interface_imports_nothing_above_it():
    reached = _reached(_import_graph(), "orchestrator.backend")
    above = sorted(m for m in reached if any(m == a or m.startswith(a + ".") for a in ABOVE_THE_BACKEND_INTERFACE))
    assert not above, f"orchestrator.backend (the backend interface) imports modules above it: {above}"


def test_the_job_loop_and_the_planner_load_no_backend():
    """Importing the job loop, the planner and sizing (which name `Backend`, `OutOfMemory` and `backend_class`
    at their top) loads no backend module and none of the libraries the backends run on."""
    loaded = ast.literal_eval(subprocess.run(
        [sys.executable, "-c", "import sys, orchestrator.job_loop, orchestrator.planning, orchestrator.sizing; "
                               "print(sorted(sys.modules))"],
        capture_output=True, text=True, check=True, cwd=PACKAGE.parent).stdout)
    assert "orchestrator.backend" in loaded
    assert not [m for m in loaded if m == "orchestrator.backends" or m.startswith("orchestrator.backends.")]
    assert not [m for m in loaded if m.partition(".")[0] in BACKEND_LIBRARIES]


def test_the_fake_checkpoints_are_reached_through_their_seam_only():
    """The demo's and the tests' fake checkpoints (`orchestrator/demo/`) stay out of the product's path: a
    module outside it imports its `__init__` only (`materialize`, `tiny_folder`: light), never its builders
    or DiffSynth's tiny classes, and nothing in it imports a backend."""
    graph = _import_graph()
    inside = {m for m in graph if m.startswith("orchestrator.demo.")}
    reaching_in = {m: sorted(graph[m] & inside) for m in graph
                   if m != "orchestrator.demo" and not m.startswith("orchestrator.demo.") and graph[m] & inside}
    assert not reaching_in, f"modules importing the fake checkpoints' builders past orchestrator.demo: {reaching_in}"
    backends = {m: sorted(t for t in graph[m] if t.startswith("orchestrator.backend"))
                for m in inside | {"orchestrator.demo"}}
    assert not {m: t for m, t in backends.items() if t}, "the fake checkpoints import the backends"
    loaded = ast.literal_eval(subprocess.run(
        [sys.executable, "-c", "import sys, orchestrator.demo; print(sorted(sys.modules))"],
        capture_output=True, text=True, check=True, cwd=PACKAGE.parent).stdout)
    assert not [m for m in loaded if m.partition(".")[0] in BACKEND_LIBRARIES]
    assert not [m for m in loaded if m.startswith("orchestrator.demo.")]


# Where a library module still prints, and why: a command's own output (the CLI, the scripts' `main`
# and usage lines), a child process's answer to its parent, results shown as each arrives, and the
# supervisor's lines to a pane that may be gone (written to the log file too).
PRINTS_BY_DESIGN = {
    ("orchestrator.worker", "main"), ("orchestrator.supervisor", "main"), ("orchestrator.supervisor", "_say"),
    ("orchestrator.sizing.calibration", "main"), ("orchestrator.demo.random_checkpoints", "main"),
    ("orchestrator.speed_trial", "main"), ("orchestrator.speed_trial", "run_trials"),
}


def test_library_modules_log_instead_of_printing():
    printing = set()
    for file in PACKAGE.rglob("*.py"):
        module = ".".join(file.relative_to(PACKAGE.parent).with_suffix("").parts)
        if module == "orchestrator.cli":  # the CLI prints what the user asked for
            continue
        tree = ast.parse(file.read_text(encoding="utf-8"))
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                    printing.add((module, function.name))
    assert printing <= PRINTS_BY_DESIGN, f"print instead of logging.getLogger(__name__): {printing - PRINTS_BY_DESIGN}"


# What collecting the tests must not import (issue 28): seconds each, paid by `pytest -m "not slow"` before its
# first test. A test module imports them in the tests that use them (conftest's LazyModule and
# skip_module_without in place of a module-level `torch = pytest.importorskip("torch")`).
HEAVY_LIBRARIES = ("torch", "diffusers", "transformers", "diffsynth", "torchao", "ray")

COLLECT_WATCHING_IMPORTS = """
import json, sys, traceback
import pytest
heavy, report = set(sys.argv[1].split(",")), sys.argv[2]
first = {}

class Watch:  # sees every import before it happens (and importlib.util.find_spec's look-ups); finds nothing
    def find_spec(self, name, path=None, target=None):
        top, stack = name.partition(".")[0], traceback.extract_stack()
        if top in heavy and top not in first and not any(f.name == "find_spec" and f.filename.endswith(
                "importlib/util.py") for f in stack):
            first[top] = [f"{f.filename}:{f.lineno}" for f in stack if "/tests/" in f.filename][-3:]
        return None

sys.meta_path.insert(0, Watch())
pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "tests"])
with open(report, "w") as out:
    json.dump({name: first.get(name, []) for name in sorted(heavy) if name in sys.modules}, out)
"""


def test_collecting_the_tests_imports_no_torch(tmp_path):
    """`pytest --collect-only` over tests/ in a fresh interpreter (the test modules, the orchestrator modules
    they import at their top, the conftest, and pytest's look at every module-level name): none of the heavy
    libraries is imported; a failure names the lines of tests/ that imported one."""
    root, report = PACKAGE.parent, tmp_path / "imported.json"
    run = subprocess.run([sys.executable, "-c", COLLECT_WATCHING_IMPORTS, ",".join(HEAVY_LIBRARIES), str(report)],
                         cwd=root, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)})
    assert report.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    imported = json.loads(report.read_text(encoding="utf-8"))
    assert not imported, "collecting the tests imports " + "; ".join(
        f"{name} (from {' < '.join(reversed(where)) or 'outside tests/'})" for name, where in imported.items())
