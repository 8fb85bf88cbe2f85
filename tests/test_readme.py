"""The README's commands as a new user types them: in a fresh shell, after the activation line it
shows; and the commands `run` prints, pasted into a shell in another folder."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import invocation
from orchestrator.manifest import ManifestError
from orchestrator.validation import load_manifest

from .conftest import PATIENCE_S, ROOT, synthetic_manifest

README = (ROOT / "README.md").read_text(encoding="utf-8")
ACTIVATE = "source .venv/bin/activate"


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def _commands(block: str) -> list[str]:
    lines = (re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_the_readme_activates_the_venv_before_its_first_command():
    first_command = README.index("\npython run_experiment.py ")
    assert README.index(f"\n{ACTIVATE}") < first_command


@pytest.mark.slow
def test_the_readmes_first_commands_run_as_written_in_a_fresh_shell(tmp_path, random_wan):
    """A fresh clone (the package, the entry script, the demo manifest) after ./demo.sh (its .venv: this
    test's interpreter's environment; the demo's checkpoint), and a shell with nothing of this session
    in its environment."""
    pytest.importorskip("diffusers")  # the demo's backend
    (block,) = [b for b in _bash_blocks() if ACTIVATE in b]
    commands = _commands(block)
    assert commands[0] == ACTIVATE and len(commands) > 1
    clone = tmp_path / "clone"
    shutil.copytree(ROOT / "orchestrator", clone / "orchestrator", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "run_experiment.py", clone)
    (clone / "experiments").mkdir()
    shutil.copy(ROOT / "experiments" / "demo.yaml", clone / "experiments")
    shutil.copytree(random_wan("t2v"), clone / "models" / "random-tiny-wan-t2v")  # what ./demo.sh built
    venv = ROOT / ".venv" if (ROOT / ".venv" / "bin" / "activate").is_file() else Path(sys.prefix)
    if not (venv / "bin" / "activate").is_file():
        pytest.skip("the tests do not run in a virtual environment")
    (clone / ".venv").symlink_to(venv)
    fresh = {"HOME": str(tmp_path), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
             "ORCHESTRATOR_FAKE_GPUS": os.environ.get("ORCHESTRATOR_FAKE_GPUS", "")}
    script = "set -e\n" + "\n".join(commands) + "\n"
    result = subprocess.run(["bash", "-c", script], cwd=clone, env=fresh, capture_output=True, text=True,
                            timeout=PATIENCE_S)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ModuleNotFoundError" not in result.stderr
    assert "jobs       14 " in result.stdout  # the plan ran, and the report after it
    assert "demo" in result.stdout.rsplit("jobs       14 ", 1)[1]


def _console_script(folder: Path) -> Path:
    """A `wan-sweep` like the one pip installs (pyproject's [project.scripts])."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "wan-sweep"
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom orchestrator.cli import main\nsys.exit(main())\n")
    script.chmod(0o755)
    return script


def test_help_names_the_program_as_it_was_started(tmp_path):
    script = _console_script(tmp_path / "bin")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{script.parent}{os.pathsep}{os.environ['PATH']}"}
    as_script = subprocess.run(["wan-sweep", "--help"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert as_script.stdout.startswith("usage: wan-sweep ") and "\n    wan-sweep plan MANIFEST" in as_script.stdout
    as_file = subprocess.run([sys.executable, str(ROOT / "run_experiment.py"), "--help"], capture_output=True,
                             text=True, cwd=tmp_path)
    assert as_file.stdout.startswith("usage: run_experiment.py ")
    assert "\n    python run_experiment.py plan MANIFEST" in as_file.stdout


def test_printed_commands_name_the_program_as_started_and_run_from_any_folder(tmp_path, monkeypatch):
    script = _console_script(tmp_path / "bin")
    monkeypatch.setattr(sys, "argv", [str(script), "run", "x.yaml"])
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    assert invocation.command_prefix() == "wan-sweep"
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # started by its path, not on PATH: that path
    assert invocation.command_prefix() == str(script)
    monkeypatch.setattr(sys, "argv", ["run_experiment.py", "run", "x.yaml"])  # started in the checkout
    prefix = invocation.command_prefix()
    assert prefix.endswith(f" {ROOT / 'run_experiment.py'}")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run(["bash", "-c", f"{prefix} --help"], cwd=elsewhere, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0 and result.stdout.startswith("usage: run_experiment.py"), result.stderr



def _png(path: Path) -> None:
    import av
    import numpy as np
    with av.open(str(path), "w", format="image2") as out:
        stream = out.add_stream("png", rate=1)
        stream.width = stream.height = 16
        stream.pix_fmt = "rgb24"
        for packet in [*stream.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")),
                       *stream.encode()]:
            out.mux(packet)


def test_what_the_readme_says_a_category_may_hold_per_task_is_what_validation_accepts(make_refs, write_manifest,
                                                                                      tmp_path):
    table = re.findall(r"^  \| `(t2v|i2v|v2v)` \| (.*?) \| (.*?) \|$", README, flags=re.M)
    assert [task for task, _, _ in table] == ["t2v", "i2v", "v2v"]
    make_refs("clips", ["a"])
    (tmp_path / "refs" / "pics").mkdir()
    _png(tmp_path / "refs" / "pics" / "a.png")
    kinds = {"videos": {"videos": "refs/clips/*.mp4"}, "images": {"images": "refs/pics/*.png"},
             "neither": {}, "both": {"videos": "refs/clips/*.mp4", "images": "refs/pics/*.png"}}
    for task, holds, prompts in table:
        allowed = "neither" if holds.startswith("neither") else re.match(r"`(\w+)`", holds)[1]
        for kind, files in kinds.items():
            for per_stem in (False, True):
                category = {**files, "prompts": {"a": ["p"]} if per_stem else ["p"]}
                path = write_manifest(synthetic_manifest(model={"task": task}, categories={"c": category}))
                says = kind == allowed and (not per_stem or "mapping" in prompts)
                try:
                    load_manifest(path)
                    accepted = True
                except ManifestError:
                    accepted = False
                assert accepted == says, (task, kind, per_stem)


@pytest.mark.slow
def test_the_readmes_python_api_example_runs_as_written(tmp_path):
    section = README.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True,
                            timeout=PATIENCE_S, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout + result.stderr
    # what the example's comments say it prints
    printed = [re.search(r"# (.*)$", line)[1] for line in block.splitlines() if line.startswith("print(")]
    assert result.stdout.splitlines() == printed
    assert (tmp_path / ".wan-sweep-api-demo.yaml").is_file()
    assert len(list((tmp_path / "results" / "api-demo" / "animals").rglob("seed_*.mp4"))) == 4


def test_the_readme_names_every_tiny_checkpoint_and_the_first_install():
    """Issue 28: the demo's time left out the first install; the tiny checkpoints' names were not listed,
    nor why `random-tiny-wan-vace` runs with diffusers and not with diffsynth."""
    from orchestrator.demo import FAKE_NAME, VARIANTS
    quick = README.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"first .{0,80}install.{0,80}about 4½ minutes", quick, flags=re.S), quick
    sentence = quick[quick.index("`random-tiny-wan-<variant>`"):].split(".\n", 1)[0]
    listed = re.findall(r"`([a-z0-9-]+)`", sentence)
    assert [v for v in listed if v in VARIANTS] == list(VARIANTS), sentence
    assert all(FAKE_NAME.match(f"random-tiny-wan-{v}") for v in VARIANTS)
    why = re.sub(r"\s+", " ", quick)
    assert "diffusers layout" in why and "the diffsynth backend" in why and "`random-tiny-wan-vace`" in why
