"""Malformed manifests found by fault injection (issue 18): each one is refused by `load_manifest` and
by `plan` with the file, the line and a fix, without a traceback, a hang or a file written."""
from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest

from orchestrator import cli
from orchestrator.manifest import ManifestError
from orchestrator.validation import load_manifest

BASE = """\
name: fuzz
output_dir: out
model: {backend: synthetic, task: t2v, options: {}}
generation: {width: 32, height: 32, num_frames: 5, fps: 5, steps: 4, extra: {}}
seeds: [1, 2]
categories:
  alpha:
    prompts: [a cat, a dog]
resources: {cpu_slots: 2}
execution: {retries: 2, job_timeout_s: 60, heartbeat_timeout_s: 10, max_restarts: 3}
"""


def _laughs(indent: str, levels: int = 9) -> str:
    """A "billion laughs": each anchor repeats the one before it nine times."""
    lines = [f'{indent}l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        lines.append(f"{indent}l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]")
    return "\n".join(lines)


def _edit(*replacements: str):
    """BASE with each (old, new) pair of `replacements` replaced."""
    def make(tmp_path: Path, video: Path) -> str:
        text = BASE
        for old, new in zip(replacements[::2], replacements[1::2]):
            assert old in text
            text = text.replace(old, new)
        return text
    return make


def _with_file(name: str, content: bytes, old: str, new: str):
    def make(tmp_path: Path, video: Path) -> str:
        (tmp_path / name).write_bytes(content)
        return BASE.replace(old, new.format(tmp=tmp_path))
    return make


def _reference(stem: str, old: str, new: str):
    """A v2v manifest whose category holds one reference video named `stem`.mp4."""
    def make(tmp_path: Path, video: Path) -> str:
        refs = tmp_path / "refs"
        refs.mkdir()
        shutil.copy(video, refs / f"{stem}.mp4")
        return BASE.replace("task: t2v", "task: v2v").replace(old, new.format(stem=stem))
    return make


# (id, manifest text from tmp_path, line of the problem, part of its message)
CASES = [
    ("nesting 20,000 deep", lambda tmp, video: BASE + "extra: " + "[" * 20000 + "]" * 20000 + "\n", 11,
     "nested more than 64 levels"),
    ("python object tag", _edit("name: fuzz", "name: !!python/object/apply:os.system ['touch PWNED']"), 1,
     "tag `!!python/object/apply:os.system` is not supported"),
    ("unknown local tag", _edit("name: fuzz", "name: !foo fuzz"), 1, "tag `!foo` is not supported"),
    ("binary tag in options", _edit("options: {}", "options: {fail_jobs: !!binary aGk=}"), 3, "`!!binary`"),
    ("date in generation.extra", _edit("extra: {}", "extra: {since: 2024-01-01}"), 4, "read as a date"),
    ("YAML value key", _edit("extra: {}", "extra: {a: =}"), 4, "not supported"),
    ("list as a mapping key", _edit("extra: {}", "extra: {[1]: 2}"), 4, "cannot read this value"),
    ("unparsable !!int", _edit("steps: 4", "steps: !!int abc"), 4, "is not a valid `!!int`"),
    ("list tagged as text", _edit("extra: {}", "extra: {a: !!str [1]}"), 4, "a list cannot be a `!!str`"),
    ("list as a prompts key", _edit("prompts: [a cat, a dog]", "prompts: {[a]: [x]}"), 8, "cannot read this value"),
    ("video path too long", _edit("    prompts: [a cat, a dog]", "    videos: [" + "v" * 300 + ".mp4]\n    prompts: [x]"),
     8, "does not exist"),
    ("output_dir is a file", _with_file("afile", b"x", "output_dir: out", "output_dir: afile"), 2,
     "exists and is not a folder"),
    ("output_dir is /dev/null", _edit("output_dir: out", "output_dir: /dev/null"), 2, "is not a folder"),
    ("NUL in output_dir", _edit("output_dir: out", 'output_dir: "out\\0x"'), 2, "NUL character"),
    ("5,000-character output_dir", _edit("output_dir: out", "output_dir: " + "o" * 5000), 2,
     "file systems allow 255"),
    ("empty output_dir", _edit("output_dir: out", 'output_dir: ""'), 2, "output_dir is empty"),
    ("options a list", _edit("options: {}", "options: [1, 2]"), 3, "model.options must be a mapping"),
    ("extra a list", _edit("extra: {}", "extra: [1, 2]"), 4, "generation.extra must be a mapping"),
    ("binary prompts file", _with_file("p.txt", bytes(range(256)) * 4, "prompts: [a cat, a dog]",
                                       "prompts: p.txt"), 8, "cannot be read as text"),
    ("NULs in prompts file", _with_file("p.txt", b"a cat\x00\x00\n", "prompts: [a cat, a dog]",
                                        "prompts: p.txt"), 8, "contains NUL characters"),
    ("binary prompts YAML file", _with_file("p.yaml", b"\xff\xfe\x00garbage", "prompts: [a cat, a dog]",
                                            "prompts: p.yaml"), 8, "cannot be read as text"),
    ("tag in prompts YAML file", _with_file("p.yaml", b"- !!python/name:os.system x\n", "prompts: [a cat, a dog]",
                                            "prompts: p.yaml"), 1, "is not supported"),
    ("cpu_slots 1e9", _edit("cpu_slots: 2", "cpu_slots: 1000000000"), 9, "use a number from 1 to 256"),
    ("cpu_slots '1e9'", _edit("cpu_slots: 2", "cpu_slots: 1e9"), 9, "resources.cpu_slots must be integer"),
    ("workers_per_gpu 1e9", _edit("cpu_slots: 2", "workers_per_gpu: 1000000000"), 9, "from 1 to 64"),
    ("memory margin negative", _edit("cpu_slots: 2", "memory_margin_gib: -5"), 9, "use 0 to 1024 GiB"),
    ("width 1e20", _edit("width: 32", "width: 1.0e+20"), 4, "generation.width must be integer"),
    ("width 10^20", _edit("width: 32", f"width: {10**20}"), 4, "more than 4096 pixels"),
    ("height 10^6", _edit("height: 32", "height: 1000000"), 4, "more than 4096 pixels"),
    ("num_frames 10^19+1", _edit("num_frames: 5", f"num_frames: {10**19 + 1}"), 4, "more than 1025"),
    ("fps 10^19", _edit("fps: 5", f"fps: {10**19}"), 4, "from 1 to 240"),
    ("steps 10^12", _edit("steps: 4", f"steps: {10**12}"), 4, "1 to 1000 denoising steps"),
    ("cfg_scale inf", _edit("extra: {}", "cfg_scale: .inf"), 4, "not a finite number"),
    ("NaN job timeout", _edit("job_timeout_s: 60", "job_timeout_s: .nan"), 10, "not a finite number"),
    ("overflowing timeout", _edit("job_timeout_s: 60", "job_timeout_s: 1.0e+999"), 10, "not a finite number"),
    ("negative heartbeat timeout", _edit("heartbeat_timeout_s: 10", "heartbeat_timeout_s: -1"), 10,
     "must be positive"),
    ("year-long job timeout", _edit("job_timeout_s: 60", "job_timeout_s: 31536000"), 10, "more than a week"),
    ("retries 10^9", _edit("retries: 2", "retries: 1000000000"), 10, "use 0 to 100"),
    ("NaN seconds_per_job", _edit("options: {}", "options: {seconds_per_job: .nan}"), 3, "not a finite number"),
    ("negative seconds_per_job", _edit("options: {}", "options: {seconds_per_job: -1}"), 3,
     "`seconds_per_job` is -1"),
    ("jitter past 1", _edit("options: {}", "options: {jitter: 3}"), 3, "`jitter` is 3"),
    ("negative load_seconds", _edit("options: {}", "options: {load_seconds: -5}"), 3, "`load_seconds` is -5"),
    ("a number among crash_jobs", _edit("options: {}", "options: {crash_jobs: [alpha/*, 7]}"), 3,
     "`crash_jobs` holds 7, not a glob of job keys"),
    ("an empty glob among hang_jobs", _edit("options: {}", "options: {hang_jobs: ['']}"), 3,
     "`hang_jobs` holds '', not a glob"),
    ("300-character category", _edit("  alpha:", "  " + "c" * 300 + ":"), 7, "bytes long (at most 240"),
    ("250-byte file stem", _reference("s" * 246, "    prompts: [a cat, a dog]",
                                      "    videos: refs/*.mp4\n    prompts: [a cat, a dog]"), 8,
     "bytes long (at most 240"),
    ("output path over 4095 bytes", _edit("output_dir: out", "output_dir: " + "/".join(["d" * 200] * 20)), 7,
     "paths may have 4095"),
    ("recursive glob over /", _edit("    prompts: [a cat, a dog]", "    videos: /**/*.mp4\n    prompts: [a cat]"),
     8, "would search all of /"),
    ("recursive glob over home", _edit("    prompts: [a cat, a dog]",
                                       f"    videos: {Path.home()}/**/*.mp4\n    prompts: [a cat]"),
     8, f"would search all of {Path.home().resolve()}"),
    ("alias bomb in generation.extra", _edit(
        "generation: {width: 32, height: 32, num_frames: 5, fps: 5, steps: 4, extra: {}}",
        "generation:\n  extra:\n" + _laughs("    ")), 13, "aliases of the anchor"),
    ("alias bomb in model.options", _edit("name: fuzz\n", "name: fuzz\nanchors:\n" + _laughs("  ") + "\n",
                                          "options: {}", "options: {fail_jobs: *l8}"), 11, "aliases of the anchor"),
    ("alias inside its own anchor", _edit("extra: {}", "extra: &loop {a: *loop}"), 4, "from inside it"),
    # issue 28: a located error, not a traceback
    ("output_dir under a file", _with_file("afile", b"x", "output_dir: out", "output_dir: {tmp}/afile/x"), 2,
     "afile` is a file"),
    ("output_dir under /etc/passwd", _edit("output_dir: out", "output_dir: /etc/passwd/x"), 2,
     "`/etc/passwd` is a file"),
    ("lone surrogate in a prompt", _edit("prompts: [a cat, a dog]", 'prompts: ["a \\ud800 cat"]'), 8,
     "lone surrogate"),
    ("lone surrogate in a category name", _edit("  alpha:", '  "al\\udfffpha":'), 7, "lone surrogate"),
    ("lone surrogate in the name", _edit("name: fuzz", 'name: "fu\\ud800zz"'), 1, "lone surrogate"),
    ("lone surrogate in generation.extra", _edit("extra: {}", 'extra: {"k\\ud800": v}'), 4, "lone surrogate"),
    ("lone surrogate in a prompts YAML file", _with_file("p.yaml", b'- "a \\ud800 cat"\n', "prompts: [a cat, a dog]",
                                                         "prompts: p.yaml"), 1, "lone surrogate"),
    ("file name of bytes that are not UTF-8", _reference("a\udcff", "    prompts: [a cat, a dog]",
                                                         "    videos: refs/*.mp4\n    prompts: [a cat, a dog]"), 8,
     "not UTF-8 text"),
]


@pytest.fixture
def hang_guard():
    """Fail a case that hangs (the bugs these cases catch took minutes and gigabytes) instead of
    stalling the suite; a bound far above the fraction of a second each case takes."""
    class Hung(BaseException):  # not an OSError (TimeoutError is one, and glob swallows those)
        pass

    def expired(signum, frame):
        raise Hung("the manifest was not refused within 20 s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("make, line, message", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_malformed_manifest_is_refused_at_its_line(make, line, message, tmp_path, tiny_video, capsys,
                                                   hang_guard):
    text = make(tmp_path, tiny_video)
    path = tmp_path / "manifest.yaml"
    path.write_text(text, encoding="utf-8")
    before = _tree(tmp_path)

    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    problems = [str(p) for p in info.value.problems]
    where = [p for p in problems if message in p]
    assert where, problems
    file = next(p.file for p in info.value.problems if message in str(p))
    assert where[0].startswith(f"{file}:{line}: "), problems
    assert "(fix: " in where[0]

    assert cli.main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{file}:{line}: " in err and message in err
    assert "Traceback" not in err
    assert _tree(tmp_path) == before  # nothing written: no output folder, no ledger
