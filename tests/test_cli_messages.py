"""Small things a new user reads: tables that line up with CJK names, plurals and articles, what a
`models fit` error says, help texts, `--version`, the README's option list, example manifests' comments,
comments in a prompts .txt."""
from __future__ import annotations

import re
import sys

import pytest

import orchestrator
from orchestrator.cli import _parser
from orchestrator.manifest import ManifestError
from orchestrator.validation import load_manifest
from orchestrator.report import build_report, display_width, format_report
from orchestrator.sweep import Sweep

from .conftest import ROOT, cli, synthetic_manifest

CJK = "镜头仰角旋转"


def test_display_width_counts_cjk_characters_as_two_columns():
    assert display_width(CJK) == 12 and display_width("abc") == 3 and display_width("é") == 1


def test_report_and_plan_tables_line_up_with_cjk_names(write_manifest):
    path = write_manifest(synthetic_manifest(categories={CJK: {"prompts": ["a"]}, "beta": {"prompts": ["b"]}}))
    text = format_report(build_report(Sweep(load_manifest(path))))
    table = [line for line in text.splitlines() if line.startswith((CJK, "beta", "total", "category"))]
    assert len(table) == 4 and len({display_width(line) for line in table}) == 1, text
    plan = cli("plan", str(path), "--cpu-slots", "1")
    assert plan.returncode == 0, plan.stderr
    rows = [line for line in plan.stdout.splitlines() if line.startswith("  ") and line.split()[0] in (CJK, "beta")]
    assert len(rows) == 2 and len({display_width(line) for line in rows}) == 1, plan.stdout


@pytest.mark.slow
def test_one_worker_is_one_worker(write_manifest):
    path = write_manifest(synthetic_manifest(seeds=[1], categories={"alpha": {"prompts": ["a"]}},
                                             execution={"executor": "local"}))
    result = cli("run", str(path), "--cpu-slots", "1", "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "started 1 worker (local)" in result.stdout


def test_a_wrong_seed_asks_for_an_integer(write_manifest):
    with pytest.raises(ManifestError) as caught:
        load_manifest(write_manifest(synthetic_manifest(seeds=["x"])))
    assert "set each seed to an integer" in str(caught.value)


def test_a_models_fit_error_does_not_say_something_was_started():
    result = cli("models", "fit", str(ROOT / "experiments" / "ti2v_5b.yaml"))
    assert result.returncode == 2
    assert "nothing was started" not in result.stderr.lower()
    assert result.stderr.startswith("error: manifest has 1 problem; nothing was sized")


def test_version_and_the_help_of_every_report_option():
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"wan-sweep {orchestrator.__version__}"
    report = cli("report", "--help").stdout
    assert re.search(r"--json\s+print the report as JSON", report)
    assert re.search(r"--watch \[SECONDS\]\s+print the report again every SECONDS", report)


def test_the_readme_lists_every_option_of_every_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = readme.split("## The commands", 1)[1].split("```", 2)[1]
    parser = _parser()
    subcommands = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("run", "plan", "report", "stop"):
        line = next(l for l in commands.splitlines() if l.startswith(f"python run_experiment.py {name} "))
        block = commands[commands.index(line):].split("\npython run_experiment.py ", 1)[0]
        for action in subcommands[name]._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    assert option in block, (name, option)


def test_example_manifests_point_at_nothing_a_user_does_not_have():
    for example in (ROOT / "experiments").glob("*.yaml"):
        text = example.read_text(encoding="utf-8")
        assert "shared/" not in text and "huggingface-cli" not in text, example.name


def test_hash_lines_in_a_prompts_txt_are_comments(write_manifest, tmp_path):
    (tmp_path / "prompts.txt").write_text("# camera moves\na crane shot\n\n  # slow ones\na dolly zoom\n",
                                          encoding="utf-8")
    manifest = load_manifest(write_manifest(synthetic_manifest(categories={"alpha": {"prompts": "prompts.txt"}})))
    (category,) = manifest.categories
    assert category.references[0].prompts == ("a crane shot", "a dolly zoom")


# ------------------------------------------------------------------------------------------ issue 28


def test_report_of_an_output_folder_reports_the_sweep_its_manifest_recorded(write_manifest, tmp_path):
    path = write_manifest(synthetic_manifest())
    Sweep(load_manifest(path)).claim_folder()  # what `run` records in .sweep/sweep.json
    result = cli("report", str(tmp_path / "out"), "--json")
    assert result.returncode == 0, result.stderr
    assert '"name": "t"' in result.stdout  # stdout is the report alone
    assert f"its manifest is {path} (recorded in .sweep/sweep.json)" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("report", str(empty))
    assert result.returncode == 2
    assert f"error: {empty} is a folder that holds no sweep" in result.stderr and "give the manifest" in result.stderr
    path.rename(tmp_path / "moved.yaml")
    result = cli("report", str(tmp_path / "out"))
    assert result.returncode == 2 and f"the manifest it records, {path}, is not there" in result.stderr


def test_report_watch_clears_the_screen_only_on_a_terminal(write_manifest, monkeypatch, capsys):
    from orchestrator import cli as command_line
    path = write_manifest(synthetic_manifest())
    for terminal in (False, True):
        monkeypatch.setattr(sys.stdout, "isatty", lambda: terminal)
        sleeps = []

        def sleep(seconds):
            sleeps.append(seconds)
            if len(sleeps) == 2:
                raise KeyboardInterrupt
        monkeypatch.setattr(command_line.time, "sleep", sleep)
        assert command_line.main(["report", str(path), "--watch", "1"]) == 0
        out = capsys.readouterr().out
        assert out.count("sweep t ") == 2
        assert ("\x1b[2J" in out) == terminal, repr(out[:80])


@pytest.mark.slow
def test_plans_queues_count_only_the_jobs_left(write_manifest):
    data = synthetic_manifest(seeds=[1], categories={"alpha": {"prompts": ["a cat", "a dog"]}},
                              execution={"executor": "local"})
    path = write_manifest(data)
    assert cli("run", str(path), "--cpu-slots", "1", "--no-progress").returncode == 0
    write_manifest({**data, "seeds": [1, 2, 3]})  # 4 new jobs beside the 2 done
    plan = cli("plan", str(path), "--cpu-slots", "1")
    assert plan.returncode == 0, plan.stderr
    queues = next(line for line in plan.stdout.splitlines() if line.startswith("queues "))
    assert queues.startswith("queues     cpu0: 4 ") and "2 already done" in queues, queues


def test_the_top_level_help_names_every_models_command():
    text = _parser().format_help()
    for command in ("status", "fit", "speed", "download"):
        assert f" models {command} " in text, command
    assert "checkpoints: status, fit, speed, download" in text


def test_without_the_venvs_packages_one_line_says_to_activate_it(tmp_path):
    """`python3 run_experiment.py …` from a fresh shell: an interpreter without the packages (-S: no
    site-packages, -E: no PYTHONPATH) prints one line saying what to do, no traceback."""
    import subprocess
    result = subprocess.run([sys.executable, "-S", "-E", str(ROOT / "run_experiment.py"), "plan", "x.yaml"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert "No module named" in line and f"source {ROOT}/.venv/bin/activate" in line and "demo.sh" in line, line


@pytest.mark.parametrize("value", ["0", "257", "1000000", "-1"])
def test_cpu_slots_out_of_range_are_refused_naming_the_flag(write_manifest, value):
    path = write_manifest(synthetic_manifest())
    result = cli("plan", str(path), "--cpu-slots", value, timeout=60)
    assert result.returncode == 2, result.stdout
    assert f"error: --cpu-slots is {value}: use a whole number from 1 to 256" in result.stderr
