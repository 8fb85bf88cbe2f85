"""Shared fixtures: manifests written to tmp_path, tiny reference videos, CLI runs in subprocesses."""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from orchestrator.job_loop import JobSource
from orchestrator.ledger import Claim
from orchestrator.outputs import write_mp4

ROOT = Path(__file__).resolve().parent.parent

# The ceiling of every wait in the tests, there only so that a hung test ends (issue 28): no test may fail
# because a busy machine is slow, so nothing a test waits for may come near it.
PATIENCE_S = 1800


def wait_until(condition, what: str, timeout: float = PATIENCE_S, interval: float = 0.1):
    """condition()'s first true value, polled every `interval` s; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def skip_module_without(*packages: str) -> None:
    """`pytest.importorskip` for a whole test module without importing the packages: collecting the tests
    must not import torch, diffusers, diffsynth, … (seconds each; test_layering checks it)."""
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}", allow_module_level=True)


class LazyModule:
    """`torch = LazyModule("torch")` at a test module's top: torch is imported at the first `torch.x` a test
    runs, not when the module is collected."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attribute: str):
        if attribute.startswith("_"):  # pytest's collection asks every module-level name for __test__,
            raise AttributeError(attribute)  # __wrapped__, _mock_name, …: no answer, no import
        return getattr(importlib.import_module(self._name), attribute)


@pytest.fixture(scope="session")
def tiny_video(tmp_path_factory) -> Path:
    """One real 5-frame 32×32 mp4, copied wherever a reference video is needed."""
    path = tmp_path_factory.mktemp("ref") / "tiny.mp4"
    frames = np.zeros((5, 32, 32, 3), dtype=np.uint8)
    frames[:, :, :16] = 200
    write_mp4(frames, path, fps=5, expected_frames=5)
    return path


@pytest.fixture(scope="session")
def random_wan(tmp_path_factory):
    """random_wan(variant) → a tiny random-weight Wan checkpoint of the diffusers layout (`build_random_wan`,
    size tiny, float32, seed 0), built once for the whole session: tests read it, never change it (copy it
    to tmp_path first)."""
    built: dict[str, Path] = {}

    def get(variant: str = "t2v") -> Path:
        if variant not in built:
            from orchestrator.demo.random_checkpoints import build_random_wan
            built[variant] = build_random_wan(tmp_path_factory.mktemp("random-wan") / f"wan-{variant}", "tiny",
                                              variant=variant)
        return built[variant]
    return get


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(task) → the original-layout tiny random-weight Wan model (`build_tiny_checkpoint`,
    DiffSynth's), built once for the whole session: tests read it, never change it (copy it first)."""
    built: dict[str, Path] = {}

    def get(task: str = "t2v") -> Path:
        if task not in built:
            from orchestrator.demo.random_checkpoints import build_tiny_checkpoint
            built[task] = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-wan") / f"Wan-tiny-{task}", task=task)
        return built[task]
    return get


@pytest.fixture
def make_refs(tmp_path, tiny_video):
    """make_refs("camera_motion", ["a", "b"]) → reference mp4s under tmp_path/refs/<category>/."""
    def make(category: str, stems: list[str], suffix: str = ".mp4") -> Path:
        folder = tmp_path / "refs" / category
        folder.mkdir(parents=True, exist_ok=True)
        for stem in stems:
            shutil.copy(tiny_video, folder / f"{stem}{suffix}")
        return folder
    return make


SMALL_GENERATION = {"width": 32, "height": 32, "num_frames": 5, "fps": 5, "steps": 4}


@pytest.fixture
def write_manifest(tmp_path):
    """write_manifest(dict or text, name=...) → path of a manifest file in tmp_path."""
    def write(content, name: str = "manifest.yaml") -> Path:
        path = tmp_path / name
        text = content if isinstance(content, str) else yaml.safe_dump(content, allow_unicode=True, sort_keys=False)
        path.write_text(text, encoding="utf-8")
        return path
    return write


def synthetic_manifest(**overrides) -> dict:
    manifest = {
        "name": "t",
        "output_dir": "out",
        "model": {"backend": "synthetic", "task": "t2v", "options": {}},
        "generation": dict(SMALL_GENERATION),
        "seeds": [1, 2],
        "categories": {"alpha": {"prompts": ["a cat", "a dog"]}, "beta": {"prompts": ["a boat"]}},
        "resources": {"cpu_slots": 2},
        "execution": {"retries": 2, "job_timeout_s": 60, "heartbeat_timeout_s": 10, "max_restarts": 3},
    }
    for key, value in overrides.items():
        if key in ("model", "generation", "resources", "execution") and isinstance(value, dict):
            manifest[key] = {**manifest[key], **value}
        else:
            manifest[key] = value
    return manifest


def cli(*args: str, timeout: float = PATIENCE_S, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python run_experiment.py ARGS` as a user would (local executor unless told otherwise)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "run_experiment.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=full_env, cwd=ROOT)


def cli_into_closed_pipe(*args: str, timeout: float = PATIENCE_S) -> subprocess.CompletedProcess:
    """Run the CLI with its stdout a pipe whose reader has already gone, as in `… | head -1`."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, str(ROOT / "run_experiment.py"), *args], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=timeout, cwd=ROOT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    finally:
        os.close(write)


def backend_job(prompt: str = "a cat on a mat", seed: int = 1, reference=None):
    """A Job to hand a backend's `generate` directly (no manifest, no worker)."""
    from orchestrator.jobs import Job
    return Job(id=f"{prompt}-{seed}", ordinal=0, category="a", stem="s" if reference else None,
               reference=str(reference) if reference else None, prompt_index=0, prompt=prompt, seed=seed,
               output="/nonexistent/x.mp4")


def header_only_safetensors(path: Path, shapes: dict) -> Path:
    """A sparse safetensors file with these tensor names and shapes (bf16): its header is real, its data
    zeros on paper (a 14B DiT takes a few hundred kB on disk)."""
    import json
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as stream:
        stream.write(len(blob).to_bytes(8, "little") + blob)
        stream.truncate(8 + len(blob) + offset)
    return path



class ListJobSource(JobSource):
    """A FAKE job source for driving `JobLoop` without a ledger: hands out `jobs` in order, records which
    were completed (`done`) and failed (`failed`)."""

    def __init__(self, jobs: list):
        self.waiting, self.done, self.failed = list(jobs), [], []

    def claim(self, prefer_group=None):
        return Claim(self.waiting.pop(0), 1) if self.waiting else None

    def complete(self, job_id, seconds, skipped=False):
        self.done.append(job_id)
        return True

    def fail(self, job_id, message, outcome="error"):
        self.failed.append(job_id)
        return "failed"

    def release(self, job_id):
        pass

    def heartbeat(self, job_id):
        pass

    def unfinished(self):
        return len(self.waiting)
