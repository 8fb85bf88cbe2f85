"""Outputs: atomic writes, frame counting, truncated and partial files never count as done."""
from __future__ import annotations

import os

import numpy as np
import pytest

from orchestrator.outputs import (TEMP_MARK, InvalidVideo, ProbeCache, count_frames, inspect_output,
                                  read_sidecar, remove_partials, write_mp4)


def _frames(n=9, h=48, w=64):
    return np.random.default_rng(0).integers(0, 255, size=(n, h, w, 3), dtype=np.uint8)


def test_written_mp4_has_the_expected_frames_and_its_sidecar(tmp_path):
    path = write_mp4(_frames(), tmp_path / "a" / "v.mp4", fps=15, expected_frames=9, sidecar={"job_id": "x"})
    assert count_frames(path) == 9
    assert inspect_output(path, 9).complete
    assert read_sidecar(path)["job_id"] == "x" and read_sidecar(path)["frames"] == 9
    assert not [p for p in os.listdir(path.parent) if p.startswith(TEMP_MARK)]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_mp4_and_sidecar_take_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = write_mp4(_frames(), tmp_path / "v.mp4", fps=15, expected_frames=9, sidecar={"job_id": "x"})
    finally:
        os.umask(old)
    expected = oct(0o666 & ~umask)  # what any file the user writes gets, not mkstemp's private 0600
    assert oct(path.stat().st_mode & 0o777) == expected
    assert oct(path.with_suffix(".json").stat().st_mode & 0o777) == expected


@pytest.mark.parametrize("keep", [0.0, 0.3, 0.6, 0.95])
def test_truncated_mp4_is_not_done(tmp_path, keep):
    path = write_mp4(_frames(), tmp_path / "v.mp4", fps=15, expected_frames=9)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    assert not inspect_output(path, 9).complete


def test_wrong_frame_count_and_garbage_are_not_done(tmp_path):
    path = write_mp4(_frames(5), tmp_path / "v.mp4", fps=15)
    assert not inspect_output(path, 9).complete
    (tmp_path / "g.mp4").write_bytes(b"\x00" * 1000)
    assert not inspect_output(tmp_path / "g.mp4", 9).complete
    assert not inspect_output(tmp_path / "missing.mp4", 9).complete


def test_failed_check_leaves_nothing_under_the_final_name(tmp_path):
    with pytest.raises(InvalidVideo):
        write_mp4(_frames(5), tmp_path / "v.mp4", fps=15, expected_frames=9, sidecar={"job_id": "x"})
    assert os.listdir(tmp_path) == []


def test_partials_are_removed_only_in_the_folders_given(tmp_path):
    (tmp_path / "c" / "deeper").mkdir(parents=True)
    (tmp_path / "c" / f"{TEMP_MARK}abc.mp4").write_bytes(b"half")
    (tmp_path / "c" / "deeper" / f"{TEMP_MARK}abc.mp4").write_bytes(b"half")
    (tmp_path / "c" / ".partial-keep.mp4").write_bytes(b"a user's")
    (tmp_path / "c" / "real.mp4").write_bytes(b"x")
    assert remove_partials([tmp_path / "c", tmp_path / "missing"]) == 1
    assert sorted(os.listdir(tmp_path / "c")) == [".partial-keep.mp4", "deeper", "real.mp4"]
    assert os.listdir(tmp_path / "c" / "deeper") == [f"{TEMP_MARK}abc.mp4"]


def test_probe_cache_notices_a_changed_file(tmp_path):
    path = write_mp4(_frames(), tmp_path / "v.mp4", fps=15)
    cache = ProbeCache(tmp_path / "cache.json")
    assert inspect_output(path, 9, cache).complete
    cache.save()
    path.write_bytes(path.read_bytes()[:100])  # size changes → probed again
    assert not inspect_output(path, 9, ProbeCache(tmp_path / "cache.json")).complete


def test_a_worker_killed_while_writing_a_sidecar_leaves_files_its_restart_removes(tmp_path):
    """SIGKILL in the middle of the sidecar's write: every temporary file left carries the worker's
    id, so `remove_partials(owner=…)` at that worker's next start removes them all."""
    import subprocess
    import sys
    script = """
import json, os, signal, sys
import numpy as np
from orchestrator import outputs
def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
outputs.json.dump = killed  # the worker dies while the sidecar is being written
frames = np.zeros((5, 32, 32, 3), np.uint8)
outputs.write_mp4(frames, sys.argv[1], fps=5, expected_frames=5, sidecar={"job_id": "x"}, owner="cpu0_worker0")
"""
    folder = tmp_path / "c1" / "x"
    done = subprocess.run([sys.executable, "-c", script, str(folder / "seed_1_prompt_0.mp4")],
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, capture_output=True)
    assert done.returncode == -9, done.stderr
    left = sorted(os.listdir(folder))
    assert [name for name in left if name.endswith(".json")], left  # the sidecar's temporary file
    assert all(name.startswith(f"{TEMP_MARK}cpu0_worker0-") for name in left), left
    assert remove_partials([folder], owner="cpu0_worker1") == 0  # another worker's files are not touched
    assert remove_partials([folder], owner="cpu0_worker0") == len(left)
    assert os.listdir(folder) == []
