"""`report --compare AXIS=VALUE` (issue 31): each done video scored against its baseline value's video, the
scores cached per pair, missing baselines named, the figures in the text, `--json` and the review page."""
from __future__ import annotations

import json
import math
import os
import shutil
import time

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from orchestrator import api, compare
from orchestrator.cli import main
from orchestrator.compare import (Baseline, ScoreCache, compare_sweep, parse_baseline, score_frames, score_pair,
                                  video_frames)
from orchestrator.errors import UserError
from orchestrator.output_names import value_text
from orchestrator.outputs import write_mp4
from orchestrator.report import build_report, format_report, report_json
from orchestrator.sweep import Sweep

from .conftest import cli, synthetic_manifest

SIZE, FRAMES = 32, 5


def _frames(seed: int, noise: float = 0.0, size: int = SIZE, frames: int = FRAMES) -> np.ndarray:
    """Smooth mid-grey frames (H.264 keeps them well), with Gaussian noise of `noise` grey levels added."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([np.stack([96 + 40 * np.sin((x + 3 * t + seed) / 5) + 20 * np.cos(y / 7)] * 3, axis=-1)
                     for t in range(frames)])
    if noise:
        base = base + rng.normal(0, noise, base.shape)
    return np.clip(np.round(base), 0, 255).astype(np.uint8)


def _manifest(write_manifest, **overrides):
    manifest = synthetic_manifest(**{"categories": {"alpha": {"prompts": ["a cat", "a dog"]}}, "seeds": [1, 2],
                                     "axes": {"cfg_scale": [3.0, 5.0]}, **overrides})
    return api.load(write_manifest(manifest))


def _make(job, frames: np.ndarray, seconds: float = 1.0) -> None:
    """A done video at the job's path, with the sidecar a worker writes."""
    write_mp4(frames, job.output, fps=5, expected_frames=len(frames),
              sidecar={"job_id": job.id, "generate_seconds": seconds, "axes": job.axes})


def _filled_sweep(write_manifest, skip_baseline_of: tuple | None = None) -> Sweep:
    """cfg 3 is the baseline; cfg 5's videos are the baseline's plus noise (4 grey levels), except seed 1 of
    prompt 0, identical. `skip_baseline_of`: the (prompt index, seed) whose cfg-3 video is not made."""
    sweep = Sweep(_manifest(write_manifest))
    sweep.state_dir.mkdir(parents=True)
    for job in sweep.jobs:
        place = (job.prompt_index, job.seed)
        if job.axes["cfg_scale"] == 3.0:
            if place != skip_baseline_of:
                _make(job, _frames(job.seed + 10 * job.prompt_index), seconds=2.0)
        else:
            noise = 0.0 if place == (0, 1) else 4.0
            _make(job, _frames(job.seed + 10 * job.prompt_index, noise=noise), seconds=1.0)
    return sweep


# ------------------------------------------------------------------------------------------ scores
def test_identical_frames_score_infinite_psnr_and_ssim_one():
    frames = _frames(1)
    score = score_frames(frames, frames.copy())
    assert score.problem is None and math.isinf(score.psnr) and score.ssim == pytest.approx(1.0)


def test_a_known_noise_gives_its_psnr_and_the_libraries_figures():
    base = np.full((6, 48, 64, 3), 128, np.uint8)
    noisy = np.clip(base + np.random.default_rng(0).normal(0, 8.0, base.shape).round(), 0, 255).astype(np.uint8)
    score = score_frames(noisy, base)
    assert score.psnr == pytest.approx(20 * math.log10(255 / 8.0), abs=0.1)  # 30.0 dB for σ = 8 grey levels
    # the video's PSNR over all its pixels, and the mean of its frames' SSIM, as scikit-image gives them
    assert score.psnr == pytest.approx(peak_signal_noise_ratio(base, noisy, data_range=255), rel=1e-9)
    assert score.ssim == pytest.approx(np.mean([structural_similarity(a, b, channel_axis=-1, data_range=255)
                                                for a, b in zip(noisy, base)]), rel=1e-9)


def test_videos_of_other_sizes_or_lengths_are_not_comparable():
    assert "32×32 vs 48×48" in score_frames(_frames(1), _frames(1, size=48)).problem
    assert "5 vs 9 frames" in score_frames(_frames(1), _frames(1, frames=9)).problem


def test_two_mp4s_score_as_their_decoded_frames_do(tmp_path):
    base, noisy, same = tmp_path / "base.mp4", tmp_path / "noisy.mp4", tmp_path / "same.mp4"
    write_mp4(_frames(3), base, fps=5)
    write_mp4(_frames(3), same, fps=5)
    write_mp4(_frames(3, noise=4.0), noisy, fps=5)
    assert math.isinf(score_pair(str(same), str(base)).psnr)
    measured = score_pair(str(noisy), str(base))
    decoded = score_frames(list(video_frames(noisy)), list(video_frames(base)))
    assert measured == decoded
    assert 25 < measured.psnr < 45 and measured.ssim < 1  # noise of 4 grey levels: about 36 dB before H.264


# ------------------------------------------------------------------------------------------ the argument
def test_the_axis_and_value_are_checked_against_the_manifest(write_manifest):
    manifest = _manifest(write_manifest, axes={"cfg_scale": [3.0, [4.0, 3.5]], "steps": [4, 8]})
    assert parse_baseline(manifest, "cfg_scale=3").value == 3.0
    assert parse_baseline(manifest, "cfg_scale=3.0").value == 3.0
    assert parse_baseline(manifest, "cfg_scale=4,3.5").value == [4.0, 3.5]
    assert parse_baseline(manifest, "steps=8").label == "8"
    with pytest.raises(UserError, match=r"no axis `seed`; its axes are cfg_scale \(3, 4,3.5\), steps \(4, 8\)"):
        parse_baseline(manifest, "seed=1")
    with pytest.raises(UserError, match=r"the axis `steps` has no value 50; its values are 4, 8"):
        parse_baseline(manifest, "steps=50")
    with pytest.raises(UserError, match="give AXIS=VALUE"):
        parse_baseline(manifest, "steps")
    assert api.report(manifest, compare="steps=8").compare.axis == "steps"  # the Python API takes it too
    with pytest.raises(api.ArgumentError, match="`compare` must be \"AXIS=VALUE\" as text"):
        api.report(manifest, compare={"steps": 8})
    plain = api.load(write_manifest(synthetic_manifest(), name="plain.yaml"))
    with pytest.raises(UserError, match="has no axes; --compare needs an axis"):
        parse_baseline(plain, "steps=4")


def test_a_step_cache_is_named_as_the_manifest_writes_it(write_manifest):
    manifest = _manifest(write_manifest, axes={"cache": ["none", {"first_block": 0.05}, {"first_block": 0.1}]})
    assert parse_baseline(manifest, "cache=none").value == "none"
    for spelling in ("{first_block: 0.05}", "{first_block: {threshold: 0.05}}", "first_block:threshold=0.05"):
        assert parse_baseline(manifest, f"cache={spelling}").value == "first_block:threshold=0.05"
    with pytest.raises(UserError, match=r"no value \{first_block: 0.2\}; its values are none, .*\(first_block:threshold=0.05\)"):
        parse_baseline(manifest, "cache={first_block: 0.2}")


def test_a_lora_strength_is_compared_with_the_other_lora_axes_held(write_manifest, tmp_path):
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "motion.safetensors").write_bytes(os.urandom(64))
    manifest = api.load(write_manifest(synthetic_manifest(
        model={"backend": "synthetic", "task": "t2v", "options": {},
               "loras": {"motion": {"path": "loras/motion.safetensors", "strength": 0.8}}},
        categories={"alpha": {"prompts": ["a cat"]}}, seeds=[1],
        axes={"loras.motion.strength": [0.5, 1.0], "loras": [[], ["motion"]]})))
    sweep = Sweep(manifest)
    sweep.state_dir.mkdir(parents=True)
    off = []
    for job in sweep.jobs:
        if job.axes["loras"]:
            _make(job, _frames(1, noise=job.axes["loras.motion.strength"] * 3))
        else:  # the LoRA off: both strengths are one video (the same file: x264's threads may vary its bytes)
            _make(job, _frames(1)) if not off else shutil.copy(off[0], job.output)
            off.append(job.output)
    result = compare_sweep(sweep, {j.id for j in sweep.jobs}, parse_baseline(manifest, "loras.motion.strength=1.0"))
    by_job = {v.job: v for v in result.videos.values()}
    assert len(by_job) == 2 and not result.missing
    for key, video in by_job.items():  # each 0.5 video against the 1.0 one with the same LoRAs on
        assert key.replace("motion-0.5", "motion-1") == video.baseline
    off = next(v for k, v in by_job.items() if "loras-none" in k)
    assert math.isinf(off.psnr)  # the LoRA off: its strength changes nothing


# ------------------------------------------------------------------------------------------ the sweep
def test_each_video_is_scored_against_its_baseline_and_a_missing_one_is_named(write_manifest):
    sweep = _filled_sweep(write_manifest, skip_baseline_of=(1, 2))
    report = build_report(sweep, compare=parse_baseline(sweep.manifest, "cfg_scale=3"))
    result = report.compare
    base, other = result.values
    assert (base.label, base.baseline, base.done, base.seconds_median) == ("3", True, 3, 2.0)
    assert (other.label, other.done, other.scored, other.missing, other.seconds_median) == ("5", 4, 3, 1, 1.0)
    assert math.isinf(other.psnr_median) is False and math.isinf(max(v.psnr for v in result.videos.values()))
    assert 25 < other.psnr_worst < 45 and other.ssim_worst < 1
    (missing,) = result.missing  # named, not scored as zero
    assert missing["state"] == "not made yet" and "seed_2_prompt_1_cfg_scale-3" in missing["baseline"]
    assert "seed_2_prompt_1_cfg_scale-5" in missing["job"]
    failed = next(j for j in sweep.jobs if j.key == missing["baseline"])
    again = compare_sweep(sweep, report.scan.complete, parse_baseline(sweep.manifest, "cfg_scale=3"), failed={failed.id})
    assert [m["state"] for m in again.missing] == ["failed"]
    text = format_report(report)
    assert "quality against cfg_scale = 3" in text and "LPIPS: absent (no offline weights)" in text
    assert "1 video(s) not scored: their baseline (cfg_scale 3) is not done (1 not made yet)" in text
    assert "3 (baseline)" in text
    data = json.loads(report_json(report))["compare"]  # standard JSON: identical videos' PSNR is "inf"
    json.dumps(data, allow_nan=False)
    assert data["axis"] == "cfg_scale" and data["baseline"] == {"value": 3.0, "label": "3"}
    assert [v["label"] for v in data["values"]] == ["3", "5"] and data["values"][1]["scored"] == 3
    assert sorted(v["psnr"] == "inf" for v in data["videos"]) == [False, False, True]
    assert data["missing_baselines"]["count"] == 1 and data["metrics"]["lpips"] == "absent (no offline weights)"


def test_scores_are_cached_and_scored_again_when_a_video_is_redone(write_manifest, monkeypatch):
    sweep = _filled_sweep(write_manifest)
    baseline = parse_baseline(sweep.manifest, "cfg_scale=3")
    calls = []
    real = compare.score_pair
    monkeypatch.setattr(compare, "score_pair", lambda a, b: calls.append(a) or real(a, b))
    first = build_report(sweep, compare=baseline).compare
    assert len(calls) == 4 and first.scored_now == 4
    assert (sweep.state_dir / "compare" / "cfg_scale=3.json").is_file()
    calls.clear()
    again = build_report(sweep, compare=baseline).compare
    assert calls == [] and again.scored_now == 0  # no decoding: every pair from the cache
    assert {k: (v.psnr, v.ssim) for k, v in again.videos.items()} == {k: (v.psnr, v.ssim) for k, v in first.videos.items()}
    # the identical video is made again, now noisy: only its pair is scored again
    redone = next(j for j in sweep.jobs if j.axes["cfg_scale"] == 5.0 and (j.prompt_index, j.seed) == (0, 1))
    _make(redone, _frames(1, noise=6.0))
    third = build_report(sweep, compare=baseline).compare
    assert calls == [redone.output] and math.isfinite(third.videos[redone.id].psnr)
    # a redone baseline invalidates the pair that uses it
    calls.clear()
    base_job = next(j for j in sweep.jobs if j.axes["cfg_scale"] == 3.0 and (j.prompt_index, j.seed) == (1, 1))
    _make(base_job, _frames(11, noise=2.0), seconds=2.0)
    build_report(sweep, compare=baseline)
    assert len(calls) == 1 and calls[0].endswith("seed_1_prompt_1_cfg_scale-5.mp4")


def test_a_zip_axis_pairs_by_its_group_and_other_sizes_are_not_comparable(write_manifest):
    sweep = Sweep(_manifest(write_manifest, axes={"zip": [{"width": [32, 48], "height": [48, 32]}]}))
    sweep.state_dir.mkdir(parents=True)
    for job in sweep.jobs:
        _make(job, _frames(job.seed, size=job.generation.width)[:, :job.generation.height])
    result = compare_sweep(sweep, {j.id for j in sweep.jobs}, parse_baseline(sweep.manifest, "width=32"))
    assert result.videos == {} and len(result.not_comparable) == 4
    assert all("48×32×5 vs 32×48×5" in e["problem"] for e in result.not_comparable)
    assert all("width-32_height-48" in e["baseline"] for e in result.not_comparable)


@pytest.mark.slow  # 20,000 files written, four reports of them
def test_a_report_of_10000_cached_pairs_costs_about_what_the_plain_report_does(write_manifest, tmp_path):
    """The cache holds 10,000 scored pairs (written here, as a first report would have): reading them back
    for the comparison must cost no more than a few plain reports of the same sweep, whatever the machine."""
    manifest = _manifest(write_manifest, categories={"alpha": {"prompts": [f"prompt {i}" for i in range(100)]}},
                         seeds=list(range(100)))
    sweep = Sweep(manifest)
    assert len(sweep.jobs) == 20_000
    baseline = parse_baseline(manifest, "cfg_scale=3")
    # Every job's mp4 "done": a small file whose frame count the probe cache already knows (no decoding).
    probes, pairs, seconds = {}, {}, {}
    stats = {}
    for job in sweep.jobs:
        os.makedirs(os.path.dirname(job.output), exist_ok=True)
        with open(job.output, "wb") as stream:
            stream.write(b"x")
        st = os.stat(job.output)
        stats[job.id] = [st.st_size, st.st_mtime_ns]
        probes[job.output] = [st.st_size, st.st_mtime_ns, FRAMES]
        seconds[os.path.relpath(job.output, sweep.root)] = [st.st_size, st.st_mtime_ns, 1.5]
    by_place = {(j.prompt_index, j.seed): j for j in sweep.jobs if j.axes["cfg_scale"] == 3.0}
    for job in sweep.jobs:
        if job.axes["cfg_scale"] == 5.0:
            base = by_place[(job.prompt_index, job.seed)]
            pairs[os.path.relpath(job.output, sweep.root)] = [
                *stats[job.id], os.path.relpath(base.output, sweep.root), *stats[base.id], 30.0, 0.9, None]
    assert len(pairs) == 10_000
    sweep.state_dir.mkdir(parents=True, exist_ok=True)
    (sweep.state_dir / "probe-cache.json").write_text(json.dumps(probes))
    (sweep.state_dir / "compare").mkdir()
    (sweep.state_dir / "compare" / baseline.cache_name).write_text(
        json.dumps({"version": compare.CACHE_VERSION, "pairs": pairs, "seconds": seconds}))

    def timed(**kwargs) -> tuple[float, object]:
        best, report = math.inf, None
        for _ in range(2):  # the better of two: a loaded machine's hiccups are not the code's cost
            started = time.perf_counter()
            report = build_report(sweep, **kwargs)
            best = min(best, time.perf_counter() - started)
        return best, report

    plain_s, _ = timed()
    compared_s, report = timed(compare=baseline)
    result = report.compare
    assert result.scored_now == 0 and len(result.videos) == 10_000
    assert result.values[1].psnr_median == 30.0 and result.values[1].seconds_median == 1.5
    # the comparison adds less than three plain reports' time (a plain report reads 20,000 files' state)
    assert compared_s - plain_s < 3 * plain_s, (plain_s, compared_s)


# ------------------------------------------------------------------------------------------ the commands
def test_the_command_prints_the_comparison_in_json_and_on_the_review_page(write_manifest, capsys):
    sweep = _filled_sweep(write_manifest, skip_baseline_of=(1, 2))
    path = str(sweep.manifest.path)
    assert main(["report", path, "--json", "--compare", "cfg_scale=3"]) == 0
    out, err = capsys.readouterr()
    assert "scoring 3 video pairs against cfg_scale=3" in err
    data = json.loads(out)["compare"]
    assert data["values"][1]["scored"] == 3 and data["missing_baselines"]["count"] == 1
    assert main(["report", path, "--html", "--compare", "cfg_scale=3"]) == 0
    out, err = capsys.readouterr()
    assert "scoring" not in err  # the pairs were scored by the first report
    html = (sweep.root / "index.html").read_text(encoding="utf-8")
    assert "Quality against cfg_scale = 3" in html and "LPIPS: absent (no offline weights)" in html
    assert html.count('class="psnr"') == 3 and ">inf</td>" in html  # the per-video column
    assert html.count('class="score"') == 2 * (3 + 3 + 1)  # under each tile, grid and side by side: scored,
    # baselines, the one whose baseline is missing
    assert "PSNR inf dB · SSIM 1.0000" in html and ">baseline</span>" in html
    assert ">not scored: baseline not made yet</span>" in html
    assert main(["report", path, "--compare", "steps=4"]) == 2
    assert "no axis `steps`; its axes are cfg_scale (3, 5)" in capsys.readouterr().err


@pytest.mark.slow
def test_the_installed_command_takes_compare(write_manifest):
    sweep = _filled_sweep(write_manifest)
    result = cli("report", str(sweep.manifest.path), "--compare", "cfg_scale=3")
    assert result.returncode == 0, result.stderr
    assert "quality against cfg_scale = 3" in result.stdout and "5 " in result.stdout
    assert "scoring 4 video pairs" in result.stderr
