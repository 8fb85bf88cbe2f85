"""The reference rule: cover-scale and centre-crop, frames timed at the manifest's fps, padded at the end."""
import numpy as np
import pytest

from orchestrator.media import ReferenceCache, UnreadableReference, read_image, read_video
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
