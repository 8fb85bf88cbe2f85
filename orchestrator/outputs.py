"""Outputs on disk: atomic mp4 writes, JSON sidecars, and "is this mp4 a complete video".

A final name only ever holds a checked video: frames go to a temporary file in the same folder, the
file is reopened and its frames counted, and only then is it renamed into place. The sidecar (same
name, `.json`) is written before the rename, so an mp4 without a sidecar was made by something else.
Outputs get the mode of any file the user writes (0666 less the umask), though their temporary files
are made private by `tempfile.mkstemp`: a shared review page must be able to play them.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import av
import numpy as np

log = logging.getLogger(__name__)

# Every temporary file of the product starts with this, and `remove_partials` deletes nothing else:
# a name no user or other program would choose (a user's `.partial-draft.txt` is left alone).
TEMP_MARK = ".wan-sweep-partial-"


class InvalidVideo(RuntimeError):
    pass


def _umask_at_import() -> int:
    # Setting the umask is the only portable way to read it, and it is process-wide: done once here,
    # before a worker starts its threads, never while they write files.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask_at_import()


def file_mode() -> int:
    """The mode a new file of the user's gets: 0666 less the umask (Linux reports it in /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o666 & ~_UMASK


def sidecar_path(mp4: str | os.PathLike) -> Path:
    return Path(mp4).with_suffix(".json")


def count_frames(path: str | os.PathLike) -> int | None:
    """Frames in the video stream, counted from its packets (no decoding); None if unreadable."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return None
            stream = container.streams.video[0]
            frames = 0
            for packet in container.demux(stream):
                if packet.size:
                    frames += 1
            return frames
    except (av.error.FFmpegError, OSError, ValueError):
        return None


def write_mp4(frames: np.ndarray | Iterable[np.ndarray], path: str | os.PathLike, fps: int,
              expected_frames: int | None = None, sidecar: dict | None = None, crf: int = 18,
              owner: str = "") -> Path:
    """Encode frames (T×H×W×3 uint8) to H.264 at `path`, atomically; return the path.

    With `sidecar`, the JSON record is written (with the encode time) after the check and before
    the rename, so every complete mp4 this writes has its sidecar.
    """
    temp_name = temp_path_beside(path, owner=owner)
    started = time.monotonic()
    try:
        write_mp4_file(frames, str(temp_name), fps, crf)
    except BaseException:
        os.unlink(temp_name)
        raise
    return adopt_mp4(temp_name, path, expected_frames, sidecar, started=started, owner=owner)


def temp_path_beside(path: str | os.PathLike, suffix: str = ".mp4", owner: str = "") -> Path:
    """A new, empty temporary file in `path`'s folder, named so that `remove_partials` finds it.

    `owner` (a worker id) goes into the name, so a restarted worker can remove what it left.
    """
    folder = Path(path).parent
    folder.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=TEMP_MARK + (f"{owner}-" if owner else ""), suffix=suffix, dir=folder)
    os.close(handle)
    return Path(name)


def adopt_mp4(temp: str | os.PathLike, path: str | os.PathLike, expected_frames: int | None = None,
              sidecar: dict | None = None, started: float | None = None, owner: str = "") -> Path:
    """Move a finished mp4 written under a temporary name in `path`'s folder into place, checked.

    The frames are counted first (a short or unreadable file raises `InvalidVideo` and is removed),
    then the sidecar is written, then the rename: the final name only ever holds a checked video.
    """
    path, temp = Path(path), Path(temp)
    try:
        got = count_frames(temp)
        if got is None or (expected_frames is not None and got != expected_frames):
            raise InvalidVideo(f"encoded video has {got} frames, expected {expected_frames}")
        if sidecar is not None:
            extra = {"frames": got, "bytes": os.path.getsize(temp)}
            if started is not None:
                extra["encode_seconds"] = round(time.monotonic() - started, 3)
            write_sidecar(path, {**sidecar, **extra}, owner=owner)
        os.chmod(temp, file_mode())
        os.replace(temp, path)
    finally:
        if temp.exists():
            temp.unlink()
    return path


def write_mp4_file(frames, filename: str, fps: int, crf: int = 18) -> None:
    with av.open(filename, mode="w", format="mp4") as container:
        stream = None
        for frame in frames:
            frame = np.ascontiguousarray(frame)
            if frame.dtype != np.uint8:
                frame = (np.clip(frame, 0.0, 1.0) * 255).round().astype(np.uint8)
            if stream is None:
                stream = container.add_stream("libx264", rate=fps)
                stream.height, stream.width = frame.shape[0], frame.shape[1]
                stream.pix_fmt = "yuv420p"  # what browsers play
                stream.options = {"crf": str(crf), "preset": "veryfast"}
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        if stream is None:
            raise InvalidVideo("no frames to write")
        for packet in stream.encode():
            container.mux(packet)


def write_sidecar(mp4: str | os.PathLike, record: dict, owner: str = "") -> Path:
    """Write the JSON record beside `mp4` atomically. Its temporary file carries `owner` (the worker's
    id) like the mp4's, so one left by a killed worker is removed when that worker starts again."""
    target = sidecar_path(mp4)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=TEMP_MARK + (f"{owner}-" if owner else ""), suffix=".json",
                                         dir=target.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(record, stream, indent=2, ensure_ascii=False, sort_keys=True)
        os.chmod(temp_name, file_mode())
        os.replace(temp_name, target)
    except BaseException:
        os.unlink(temp_name)
        raise
    return target


def read_sidecar(mp4: str | os.PathLike) -> dict | None:
    try:
        return json.loads(sidecar_path(mp4).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class OutputState:
    """What the disk says about one job's output."""
    complete: bool  # a valid mp4 of the expected frame count
    job_id: str | None = None  # the job id recorded in its sidecar (None: no sidecar)

    def stale_for(self, job_id: str) -> bool:
        """Complete, but made by other settings than this job's (the sidecar says so)."""
        return self.complete and self.job_id is not None and self.job_id != job_id


def inspect_output(mp4: str | os.PathLike, expected_frames: int, cache: "ProbeCache | None" = None) -> OutputState:
    path = Path(mp4)
    try:
        st = path.stat()
    except OSError:
        return OutputState(False)
    if st.st_size == 0:
        return OutputState(False)
    frames = cache.get(path, st) if cache is not None else None
    if frames is None:
        frames = count_frames(path)
        if cache is not None and frames is not None:
            cache.put(path, st, frames)
    if frames != expected_frames:
        return OutputState(False)
    sidecar = read_sidecar(path)
    return OutputState(True, sidecar.get("job_id") if sidecar else None)


class ProbeCache:
    """Frame counts by (path, size, mtime): `report` re-probes only files that changed."""

    def __init__(self, file: str | os.PathLike | None = None):
        self.file = Path(file) if file else None
        self.entries: dict[str, list] = {}
        self.dirty = False
        if self.file and self.file.exists():
            try:
                entries = json.loads(self.file.read_text(encoding="utf-8"))
                self.entries = entries if isinstance(entries, dict) else {}
            except (OSError, ValueError):
                self.entries = {}

    def get(self, path: Path, st: os.stat_result) -> int | None:
        entry = self.entries.get(str(path))
        if entry and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
            return entry[2]
        return None

    def put(self, path: Path, st: os.stat_result, frames: int) -> None:
        self.entries[str(path)] = [st.st_size, st.st_mtime_ns, frames]
        self.dirty = True

    def save(self) -> None:
        if self.file and self.dirty and save_cache_file(self.file, self.entries):
            self.dirty = False


def save_cache_file(file: Path, data) -> bool:
    """Write a cache's JSON whole or not at all (a temporary file, then a rename); False where the folder
    refuses it (read-only, full): a cache only saves time, it is never needed."""
    temp_name = None
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(prefix=TEMP_MARK, dir=file.parent)
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(data, stream)
        os.replace(temp_name, file)
        return True
    except OSError as exc:
        log.debug("%s: cache not written (%s)", file, exc)
        if temp_name and os.path.exists(temp_name):
            os.unlink(temp_name)
        return False


def remove_partials(folders: Iterable[str | os.PathLike], owner: str = "") -> int:
    """Delete temporary files left by killed workers (only `owner`'s, when given); return how many.

    Only in `folders` themselves (the sweep's own: its jobs' folders, never a walk below them), and
    only names this module made (`TEMP_MARK`), so nothing of anyone else's can match.
    """
    removed = 0
    prefix = TEMP_MARK + (f"{owner}-" if owner else "")
    for folder in folders:
        try:
            with os.scandir(folder) as entries:
                names = [e.name for e in entries if e.name.startswith(prefix) and e.is_file(follow_symlinks=False)]
        except OSError:  # not there (yet), or not a folder
            continue
        for name in names:
            try:
                os.unlink(os.path.join(folder, name))
                removed += 1
            except OSError:
                pass
    return removed
