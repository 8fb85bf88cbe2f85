"""Reference inputs as the model sees them: videos and images read, resized, cropped and timed; audio
resampled and cut to the video's length.

The rule, the same for every backend (README, "Reference videos and images"):
- Size: scaled (keeping the aspect ratio) until it covers width × height, then centre-cropped.
- Time: frame i of the clip is the source frame on screen at i / fps seconds (fps from the manifest),
  so a 30 fps source sampled at 15 fps keeps every other frame and the motion keeps its speed. A source
  without a usable frame rate is read frame by frame.
- Length: the first `num_frames` such frames; a shorter source is padded by repeating its last frame.

Audio (speech-to-video), `read_audio`:
- Samples: the first audio track, downmixed to mono float32 and resampled (PyAV's AudioResampler) to the
  model's rate (Wan2.2-S2V's wav2vec2 encoder hears 16 kHz).
- Length: the video's duration, num_frames / fps seconds, from the start of the track; a longer track is cut.
  A track shorter than that by at most one video frame (1 / fps s: container and encoder rounding) is
  padded with silence; shorter still is an error that says by how much.
- A track whose used part is silent (peak below -60 dBFS) is an error: the model would get no speech.

Control videos (vace, control, animate's driving pose and face videos) are read by the video rule above,
but padding would freeze the motion they drive and cropping would move it against the picture, so
`control_video_problem` refuses, before a sweep starts, one that lasts less than the video less one frame
(num_frames / fps - 1 / fps seconds) or, where the aspect matters (not for animate's face crops), whose
width / height differs from the video's by more than CONTROL_ASPECT_TOLERANCE (5%: at most a twentieth of
a side is cropped).

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

from .manifest import AUDIO_SUFFIXES, IMAGE_SUFFIXES


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


CONTROL_ASPECT_TOLERANCE = 0.05


def video_facts(path: str | Path) -> tuple[int, int, float]:
    """(width, height, seconds) of a video, from its headers where they say, else by counting frames."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UnreadableReference(f"{path}: no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            rate = stream.average_rate or stream.guessed_rate
            frames = stream.frames or sum(1 for _ in container.demux(stream) if _.size)
            if not width or not height or not rate or not frames:
                raise UnreadableReference(f"{path}: its size, frame rate or length cannot be read")
            return width, height, float(frames / rate)
    except av.error.FFmpegError as exc:
        raise UnreadableReference(f"{path}: cannot be decoded ({exc})") from None


def control_video_problem(path: str | Path, width: int, height: int, num_frames: int, fps: float,
                          check_aspect: bool = True) -> str | None:
    """Why a control video does not fit the video asked for (module docstring), or None."""
    try:
        source_w, source_h, seconds = video_facts(path)
    except UnreadableReference as exc:
        return str(exc)
    wanted = num_frames / fps
    shortfall = wanted - seconds
    if shortfall > 1 / fps + 1e-6:
        return (f"{path}: lasts {seconds:.2f} s, {shortfall:.2f} s shorter than the video ({num_frames} frames at "
                f"{fps:g} fps = {wanted:.2f} s); padding would freeze the motion it drives")
    aspect, asked = source_w / source_h, width / height
    if check_aspect and abs(aspect / asked - 1) > CONTROL_ASPECT_TOLERANCE:
        return (f"{path}: is {source_w}x{source_h} (aspect {aspect:.2f}), the video {width}x{height} "
                f"(aspect {asked:.2f}); fitting it would crop {abs(1 - min(aspect, asked) / max(aspect, asked)):.0%} "
                f"of a side, more than the {CONTROL_ASPECT_TOLERANCE:.0%} allowed, and move the motion against the picture")
    return None


SILENCE_PEAK = 1e-3  # -60 dBFS: quieter than this over the whole clip counts as silent


def read_audio(path: str | Path, sample_rate: int, num_frames: int, fps: float) -> np.ndarray:
    """The audio of a speech-to-video job: float32 mono (round(num_frames / fps * sample_rate),), by the
    rule in the module docstring."""
    if not fps:
        raise ValueError("read_audio needs the video's fps to know how long the audio must be")
    duration = num_frames / fps
    needed = round(duration * sample_rate)
    chunks: list[np.ndarray] = []
    have = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise UnreadableReference(f"{path}: no audio track")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            for frame in container.decode(container.streams.audio[0]):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    have += chunks[-1].size
                if have >= needed:
                    break
            else:
                for out in resampler.resample(None):  # what the resampler still holds
                    chunks.append(out.to_ndarray().reshape(-1))
                    have += chunks[-1].size
    except av.error.FFmpegError as exc:
        raise UnreadableReference(f"{path}: cannot be decoded ({exc})") from None
    samples = np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
    shortfall = needed - samples.size
    if shortfall > sample_rate / fps:
        # the most frames of Wan's 4n+1 it covers, within the tolerance of one frame
        covered = (int(samples.size / sample_rate * fps + 1) - 1) // 4 * 4 + 1
        raise UnreadableReference(
            f"{path}: the audio lasts {samples.size / sample_rate:.2f} s, {shortfall / sample_rate:.2f} s shorter "
            f"than the video ({num_frames} frames at {fps:g} fps = {duration:.2f} s)"
            + (f"; it covers num_frames {covered}" if covered > 1 else ""))
    if shortfall > 0:
        samples = np.concatenate([samples, np.zeros(shortfall, np.float32)])
    samples = samples[:needed]
    if not samples.size or float(np.abs(samples).max()) < SILENCE_PEAK:
        raise UnreadableReference(
            f"{path}: the audio is silent over the video's {duration:.2f} s (peak below -60 dBFS): "
            "the model would hear no speech")
    return np.ascontiguousarray(samples)


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

    `prefetch(path)` returns at once; `video(path)` / `image(path)` / `audio(path)` wait for a read in
    flight or read now. The few most recent are kept: a worker runs every job of one reference in a row
    (a conditioned job's several inputs, e.g. an image and its audio, count one each).
    """

    def __init__(self, width: int, height: int, num_frames: int, fps: float | None, keep: int = 3,
                 sample_rate: int = 16000):
        self.width, self.height, self.num_frames, self.fps = width, height, num_frames, fps
        self.sample_rate = sample_rate
        self.keep = keep
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reference-reader")
        self.hits = 0
        self.misses = 0

    def _read(self, kind: str, path: str) -> np.ndarray:
        if kind == "video":
            return read_video(path, self.width, self.height, self.num_frames, self.fps)
        if kind == "audio":
            return read_audio(path, self.sample_rate, self.num_frames, self.fps)
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

    def audio(self, path: str | Path) -> np.ndarray:
        return self._future("audio", path, count=True).result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            self._entries.clear()


def _kind_of(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in AUDIO_SUFFIXES:
        return "audio"
    return "image" if suffix in IMAGE_SUFFIXES else "video"
