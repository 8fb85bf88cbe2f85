"""The reference rule: cover-scale and centre-crop, frames timed at the manifest's fps, padded at the end."""
import numpy as np
import pytest

from orchestrator.media import ReferenceCache, UnreadableReference, read_audio, read_image, read_video
from orchestrator.outputs import write_mp4


def numbered_video(path, count, fps, width=64, height=32):
    """Frame k is uniformly grey level 10*k (so the frame a reader picked can be told back)."""
    frames = np.stack([np.full((height, width, 3), 10 * k, dtype=np.uint8) for k in range(count)])
    write_mp4(frames, path, fps=fps, expected_frames=count)
    return path


def frame_numbers(clip):
    return [int(round(frame.mean() / 10)) for frame in clip]


def test_frames_are_timed_at_the_manifest_fps(tmp_path):
    source = numbered_video(tmp_path / "30fps.mp4", 20, fps=30)
    clip = read_video(source, 32, 32, num_frames=9, fps=15)
    assert clip.shape == (9, 32, 32, 3) and clip.dtype == np.uint8
    assert frame_numbers(clip) == [0, 2, 4, 6, 8, 10, 12, 14, 16]


def test_same_rate_keeps_consecutive_frames_and_short_sources_repeat_their_last_frame(tmp_path):
    source = numbered_video(tmp_path / "short.mp4", 5, fps=15)
    clip = read_video(source, 32, 32, num_frames=9, fps=15)
    assert frame_numbers(clip) == [0, 1, 2, 3, 4, 4, 4, 4, 4]


def test_scaled_to_cover_then_centre_cropped(tmp_path):
    # 64×32 source, left half black, right half white; a 32×32 target keeps the middle: half and half.
    frames = np.zeros((5, 32, 64, 3), dtype=np.uint8)
    frames[:, :, 32:] = 255
    write_mp4(frames, tmp_path / "halves.mp4", fps=5, expected_frames=5)
    clip = read_video(tmp_path / "halves.mp4", 32, 32, num_frames=5, fps=5)
    left, right = clip[0, :, :12].mean(), clip[0, :, 20:].mean()
    assert left < 30 and right > 225
    # A 16×64 target (taller than the source's aspect): scaled up to height 64, the middle 16 columns.
    tall = read_video(tmp_path / "halves.mp4", 16, 64, num_frames=5, fps=5)
    assert tall.shape == (5, 64, 16, 3)


def test_image_is_fitted_the_same_way(tmp_path):
    import av
    frame = av.VideoFrame.from_ndarray(np.full((40, 80, 3), 128, dtype=np.uint8), format="rgb24")
    with av.open(str(tmp_path / "ref.png"), "w", format="image2") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = 80, 40, "rgb24"
        for packet in stream.encode(frame):
            container.mux(packet)
    image = read_image(tmp_path / "ref.png", 32, 16)
    assert image.shape == (16, 32, 3) and abs(int(image.mean()) - 128) <= 2


def test_cache_reads_ahead_once_and_counts_hits(tmp_path):
    source = numbered_video(tmp_path / "a.mp4", 9, fps=15)
    cache = ReferenceCache(32, 32, 9, 15)
    cache.prefetch(source)
    first = cache.video(source)
    again = cache.video(source)
    assert first is again and cache.hits == 2 and cache.misses == 0
    cache.close()


def test_unreadable_reference_is_a_clear_error(tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    with pytest.raises(UnreadableReference, match="broken.mp4"):
        read_video(broken, 32, 32, 5, 15)


# ---- audio (speech-to-video): resampled to the model's rate, mono, cut to the video's length ----

def tone_file(path, seconds, rate=44100, amplitude=0.5, codec=None, channels=2):
    """A real audio file written with PyAV: a 440 Hz tone (or silence with amplitude 0)."""
    import av
    codec = codec or {".wav": "pcm_s16le", ".mp3": "libmp3lame", ".mp4": "aac", ".m4a": "aac"}[path.suffix]
    layout = "stereo" if channels == 2 else "mono"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = layout
        fmt = stream.codec_context.codec.audio_formats[0].name
        total = int(seconds * rate)
        t = np.arange(total) / rate
        wave = (amplitude * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        chunk = 1024
        for start in range(0, total, chunk):
            piece = np.tile(wave[start:start + chunk], (channels, 1))
            frame = av.AudioFrame.from_ndarray(piece, format="fltp", layout=layout)
            frame.sample_rate = rate
            frame.pts = start
            for out in av.AudioResampler(format=fmt, layout=layout, rate=rate).resample(frame):
                for packet in stream.encode(out):
                    container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


@pytest.mark.parametrize("name", ["speech.wav", "speech.mp3", "speech.mp4"])
def test_audio_is_resampled_to_the_models_rate_mono_and_cut_to_the_video(tmp_path, name):
    source = tone_file(tmp_path / name, seconds=3.0)
    audio = read_audio(source, sample_rate=16000, num_frames=33, fps=16)  # 33 / 16 = 2.0625 s
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert audio.shape == (round(33 / 16 * 16000),)
    # The tone survives: loud, and its pitch is still 440 Hz at the new rate.
    assert 0.3 < np.abs(audio[4000:]).max() <= 1.0
    spectrum = np.abs(np.fft.rfft(audio[4000:20000]))
    assert abs(np.argmax(spectrum) * 16000 / 16000 - 440) <= 2


def test_audio_shorter_than_the_video_is_an_error_saying_by_how_much(tmp_path):
    source = tone_file(tmp_path / "short.wav", seconds=1.0)
    with pytest.raises(UnreadableReference, match=r"short.wav: the audio lasts 1.00 s, 1.06 s shorter than the video "
                                                  r"\(33 frames at 16 fps = 2.06 s\); it covers num_frames 17"):
        read_audio(source, 16000, num_frames=33, fps=16)


def test_audio_short_by_less_than_a_frame_is_padded_with_silence(tmp_path):
    source = tone_file(tmp_path / "nearly.wav", seconds=2.0)  # 2.0 s for a 2.0625 s video: one frame short
    audio = read_audio(source, 16000, num_frames=33, fps=16)
    assert audio.shape == (33000,) and not audio[-900:].any() and np.abs(audio[:31000]).max() > 0.3


def test_silent_or_trackless_audio_is_an_error(tmp_path):
    silent = tone_file(tmp_path / "silent.wav", seconds=3.0, amplitude=0.0)
    with pytest.raises(UnreadableReference, match="silent.wav: the audio is silent"):
        read_audio(silent, 16000, 33, 16)
    video_only = numbered_video(tmp_path / "mute.mp4", 5, fps=5)
    with pytest.raises(UnreadableReference, match="mute.mp4: no audio track"):
        read_audio(video_only, 16000, 5, 5)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF nonsense")
    with pytest.raises(UnreadableReference, match="broken.wav: cannot be decoded"):
        read_audio(broken, 16000, 5, 5)


def test_cache_reads_audio_ahead(tmp_path):
    source = tone_file(tmp_path / "a.wav", seconds=1.0, channels=1)
    cache = ReferenceCache(32, 32, 9, 15, sample_rate=16000)
    cache.prefetch(source)  # a .wav is audio by its suffix
    cache.prefetch(tone_file(tmp_path / "b.m4a", seconds=1.0), kind="audio")
    assert cache.audio(source).shape == (9600,) and cache.audio(tmp_path / "b.m4a").shape == (9600,)
    assert cache.hits == 2 and cache.misses == 0
    cache.close()
