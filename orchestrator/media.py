"""Reference inputs as the model sees them: videos and images read, resized, cropped and timed.

The rule, the same for every backend (README, "Reference videos and images"):
- Size: scaled (keeping the aspect ratio) until it covers width × height, then centre-cropped.
- Time: frame i of the clip is the source frame on screen at i / fps seconds (fps from the manifest),
  so a 30 fps source sampled at 15 fps keeps every other frame and the motion keeps its speed. A source
  without a usable frame rate is read frame by frame.
- Length: the first `num_frames` such frames; a shorter source is padded by repeating its last frame.

`ReferenceCache` keeps recently used clips and reads the next one in a background thread, so a worker's
GPU never waits for the decoder between jobs.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


class UnreadableReference(ValueError):
    """A reference file that cannot be read as the model needs it."""


def _fit(frame: av.VideoFrame, width: int, height: int) -> np.ndarray:
    """Scale to cover width × height (aspect kept), then centre-crop; uint8 (height, width, 3)."""
    scale = max(width / frame.width, height / frame.height)
    scaled_w = max(width, round(frame.width * scale))
    scaled_h = max(height, round(frame.height * scale))
    rgb = frame.reformat(width=scaled_w, height=scaled_h, format="rgb24",
                         interpolation="BICUBIC").to_ndarray()
    top = (scaled_h - height) // 2
    left = (scaled_w - width) // 2
    return np.ascontiguousarray(rgb[top:top + height, left:left + width])


def read_video(path: str | Path, width: int, height: int, num_frames: int, fps: float | None) -> np.ndarray:
    """The reference clip: uint8 (num_frames, height, width, 3), by the rule in the module docstring."""
    picked: list[av.VideoFrame] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UnreadableReference(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            source_rate = stream.average_rate or stream.guessed_rate
            timed = bool(fps) and bool(source_rate)
            # Target times i / fps; a source frame covers [its time, next frame's time).
            targets = [Fraction(i) / Fraction(fps).limit_denominator(1000) for i in range(num_frames)] if timed else []
            start: Fraction | None = None
            previous = None
            for frame in container.decode(stream):
                if not timed:
                    picked.append(frame)
                    if len(picked) == num_frames:
                        break
                    continue
                when = Fraction(frame.pts * stream.time_base) if frame.pts is not None else None
                if when is None:
                    when = (Fraction(len(picked)) / Fraction(source_rate)) if start is None else start
                if start is None:
                    start = when
                when -= start
                # Every target time before this frame's start belongs to the previous frame.
                while previous is not None and len(picked) < num_frames and targets[len(picked)] < when:
                    picked.append(previous)
                previous = frame
                if len(picked) == num_frames:
                    break
            if timed and previous is not None and len(picked) < num_frames:
                picked.append(previous)  # the last frame is on screen at the next target time
    except av.error.FFmpegError as exc:
        raise UnreadableReference(f"{path}: cannot be decoded ({exc})") from None
    if not picked:
        raise UnreadableReference(f"{path}: has no frames")
    while len(picked) < num_frames:
        picked.append(picked[-1])
    fitted: dict[int, np.ndarray] = {}  # a source frame picked twice is resized once
    return np.stack([fitted.setdefault(id(f), _fit(f, width, height)) for f in picked])


def read_image(path: str | Path, width: int, height: int) -> np.ndarray:
    """The reference image: uint8 (height, width, 3), scaled to cover and centre-cropped."""
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                return _fit(frame, width, height)
    except av.error.FFmpegError as exc:
        raise UnreadableReference(f"{path}: cannot be decoded ({exc})") from None
    raise UnreadableReference(f"{path}: has no picture")


class ReferenceCache:
    """Prepared references of one worker (its size, length and rate), read ahead in a thread.

    `prefetch(path)` returns at once; `video(path)` / `image(path)` wait for a read in flight or
    read now. The few most recent are kept: a worker runs every job of one reference in a row.
    """

    def __init__(self, width: int, height: int, num_frames: int, fps: float | None, keep: int = 3):
        self.width, self.height, self.num_frames, self.fps = width, height, num_frames, fps
        self.keep = keep
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reference-reader")
        self.hits = 0
        self.misses = 0

    def _read(self, kind: str, path: str) -> np.ndarray:
        if kind == "video":
            return read_video(path, self.width, self.height, self.num_frames, self.fps)
        return read_image(path, self.width, self.height)

    def _future(self, kind: str, path: str | Path, count: bool) -> Future:
        key = (kind, str(path))
        with self._lock:
            future = self._entries.get(key)
            if future is not None:
                self._entries.move_to_end(key)
                if count:
                    self.hits += 1
                return future
            if count:
                self.misses += 1
            future = self._pool.submit(self._read, kind, str(path))
            self._entries[key] = future
            while len(self._entries) > self.keep:
                self._entries.popitem(last=False)
            return future

    def prefetch(self, path: str | Path, kind: str | None = None) -> None:
        self._future(kind or _kind_of(path), path, count=False)

    def video(self, path: str | Path) -> np.ndarray:
        return self._future("video", path, count=True).result()

    def image(self, path: str | Path) -> np.ndarray:
        return self._future("image", path, count=True).result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            self._entries.clear()


def _kind_of(path: str | Path) -> str:
    from .manifest import IMAGE_SUFFIXES
    return "image" if Path(path).suffix.lower() in IMAGE_SUFFIXES else "video"
