"""The review page (`report --html`): its content from disk + ledger, escaping, links, cached posters,
and a real sweep's page played in headless Chromium."""
from __future__ import annotations

import base64
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote, unquote

import av
import numpy as np
import pytest

from orchestrator import review
from orchestrator.validation import load_manifest
from orchestrator.outputs import TEMP_MARK, file_mode, write_mp4
from orchestrator.review import build_page, thumb_path
from orchestrator.review_html import render, write_page
from orchestrator.sweep import Sweep

from .conftest import PATIENCE_S, ROOT, cli, synthetic_manifest

EVIL = 'He said "hi" <b>x</b> $(rm -rf /) 镜头'
ARTIFACTS = ROOT / "tests" / "artifacts"


class Page(HTMLParser):
    """The parsed page: every start tag with its (unescaped) attributes, and the text."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def find(self, tag: str, **attrs) -> list[dict]:
        return [a for t, a in self.tags if t == tag and all(a.get(k.rstrip("_")) == v for k, v in attrs.items())]

    def links(self) -> list[str]:
        return [a[key] for _, a in self.tags for key in ("href", "src", "poster") if a.get(key)]


def _frames(n: int = 5, size: int = 32, shade: int = 90) -> np.ndarray:
    frames = np.full((n, size, size, 3), shade, dtype=np.uint8)
    frames[:, :, : size // 2, 0] = 220
    return frames


def _v2v_sweep(write_manifest, make_refs, **overrides) -> Sweep:
    make_refs("镜头 cam", ["ref 1", "参考"])
    make_refs("other", ["x", "y"])
    manifest = synthetic_manifest(
        model={"task": "v2v"}, seeds=[1, 2],
        categories={"镜头 cam": {"videos": "refs/镜头 cam/*.mp4", "prompts": [EVIL, "a dog"]},
                    "other": {"videos": "refs/other/*.mp4", "prompts": {"x": ["p0", "p1"], "y": ["q0"]}}},
        **overrides)
    return Sweep(load_manifest(write_manifest(manifest)))


def _set_states(sweep: Sweep) -> dict[str, str]:
    """Put the sweep's jobs in every state the page shows; return job id → expected state."""
    jobs = sweep.jobs
    expected = {job.id: "done" for job in jobs[5:]}
    for job in jobs[5:]:
        write_mp4(_frames(shade=20 * job.ordinal % 255), job.output, fps=5, expected_frames=5,
                  sidecar={"job_id": job.id})
    write_mp4(_frames(), jobs[4].output, fps=5, expected_frames=5, sidecar={"job_id": "made-by-other-settings"})
    ledger = sweep.ledger()
    ledger.sync(jobs, {job.id: "cpu0" for job in jobs}, {job.id for job in jobs[5:]}, max_attempts=2,
                heartbeat_timeout_s=300, fresh=True)
    ledger.register_worker("cpu0_worker0", ())
    ledger.register_worker("cpu1_worker0", ())
    assert ledger.claim("cpu0_worker0", "cpu0").job == jobs[0]
    for _ in range(2):  # both attempts of jobs[1] fail
        assert ledger.claim("cpu1_worker0", "cpu0").job == jobs[1]
        ledger.fail(jobs[1].id, "cpu1_worker0", "RuntimeError: <boom> & \"bad\"")
    assert ledger.claim("cpu1_worker0", "cpu0").job == jobs[2]
    ledger.fail(jobs[2].id, "cpu1_worker0", "OutOfMemory: once")
    ledger.set_meta("started_at", str(time.time() - 60))
    ledger.close()
    sweep.logs.mkdir(parents=True, exist_ok=True)
    (sweep.logs / "cpu1_worker0.log").write_text("log\n", encoding="utf-8")
    expected.update({jobs[0].id: "running", jobs[1].id: "failed", jobs[2].id: "retrying",
                     jobs[3].id: "pending", jobs[4].id: "stale"})
    return expected


def test_page_shows_every_cell_in_its_state(write_manifest, make_refs):
    sweep = _v2v_sweep(write_manifest, make_refs)
    expected = _set_states(sweep)
    page = build_page(sweep)
    html = render(page)
    parsed = Page(html)
    # 2 refs × 2 prompts, then x × 2 prompts and y × 1 (y has no second prompt: an empty slot).
    assert page.cell_count == 7
    assert len(parsed.find("td", class_="cell")) == 7 and len(parsed.find("td", class_="nocell")) == 1
    tiles = parsed.find("figure")
    assert {t["id"][len("job-"):]: t["data-state"] for t in tiles} == expected
    done = [j for j in sweep.jobs if expected[j.id] == "done"]
    result_videos = [v for v in parsed.find("video") if "/seed_" in v["src"]]
    assert len(result_videos) == len(done) == 9
    assert all({"muted", "loop", "playsinline"} <= set(v) and v["preload"] == "none" for v in result_videos)
    assert len(parsed.find("video")) == 9 + 4  # and each reference video in its row header
    text = " ".join(parsed.text)
    assert "running on cpu0_worker0" in text and "not made yet" in text and "other settings" in text
    assert 'RuntimeError: <boom> & "bad"' in text  # the failure's last error, escaped and shown
    # Failures at the top link to their cell and to the log of the worker that last tried them.
    failed = sweep.jobs[1]
    assert parsed.find("a", href=f"#job-{failed.id}")
    assert "logs/cpu1_worker0.log" in [a["href"] for a in parsed.find("a")]
    # Summary: bars per category, done / expected, per-worker activity from the attempts.
    assert "9 / 14" in text and "3 / 8" in text and "6 / 6" in text
    assert page.activity is not None
    lanes = {lane.worker: lane for lane in page.activity.lanes}
    assert set(lanes) == {"cpu0_worker0", "cpu1_worker0"} and len(lanes["cpu1_worker0"].bars) >= 1
    assert len(parsed.find("svg", class_="activity")) == 1
    assert len(parsed.find("rect")) >= 2 + 2  # a track per lane, bars for the attempts (close ones merge)


def test_prompts_and_names_are_escaped(write_manifest, make_refs):
    sweep = _v2v_sweep(write_manifest, make_refs)
    _set_states(sweep)
    html = render(build_page(sweep))
    assert EVIL not in html and "<b>x</b>" not in html
    assert "He said &#34;hi&#34; &lt;b&gt;x&lt;/b&gt; $(rm -rf /) 镜头" in html
    parsed = Page(html)
    # Parsed back, the prompt is intact: in its column header, as hover text, and in every tile's hover.
    assert parsed.find("th", class_="prompt", title=EVIL)
    assert EVIL in parsed.text  # one piece of text: its <b>x</b> made no element
    hovers = [t["title"] for t in parsed.find("figure") if EVIL in t["title"]]
    assert len(hovers) == 4  # 2 references × 2 seeds
    assert "镜头 cam" in parsed.text


def test_links_are_relative_quoted_and_point_at_the_files(write_manifest, make_refs, tmp_path):
    sweep = _v2v_sweep(write_manifest, make_refs)
    _set_states(sweep)
    parsed = Page(render(build_page(sweep)))
    links = [link for link in parsed.links() if not link.startswith("#")]
    assert links
    for link in links:
        assert link.isascii() and " " not in link, link
        assert "://" not in link and not link.startswith("/"), link
        assert quote(unquote(link)) == link, link
        assert (sweep.root / unquote(link)).resolve().exists(), link
    assert "%E9%95%9C%E5%A4%B4%20cam/%E5%8F%82%E8%80%83/seed_2_prompt_1.mp4" in links
    # The reference videos live outside output_dir: linked into .sweep/refs/, poster cached under .sweep/.
    ref = next(v for v in parsed.find("video") if "refs/" in v["src"])
    assert ref["src"] == ".sweep/refs/%E9%95%9C%E5%A4%B4%20cam/ref%201.mp4"
    assert ref["poster"].startswith(".sweep/thumbs/")
    linked = sweep.root / unquote(ref["src"])
    assert linked.read_bytes() == (tmp_path / "refs" / "镜头 cam" / "ref 1.mp4").read_bytes()
    # Copy the output folder alone elsewhere: every link still resolves, inside the copy.
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "out", moved / "out")
    for link in links:
        assert (moved / "out" / unquote(link)).resolve().is_relative_to(moved / "out"), link
        assert (moved / "out" / unquote(link)).exists(), link


def test_a_changed_reference_is_linked_again_and_one_that_cannot_be_is_said(write_manifest, make_refs, tmp_path,
                                                                            monkeypatch):
    sweep = _v2v_sweep(write_manifest, make_refs)
    source = tmp_path / "refs" / "other" / "x.mp4"
    build_page(sweep)
    linked = sweep.state_dir / "refs" / "other" / "x.mp4"
    assert linked.read_bytes() == source.read_bytes()
    replacement = tmp_path / "new.mp4"  # a new file under the old name (a new inode, as editors write)
    write_mp4(_frames(shade=200), replacement, fps=5, expected_frames=5)
    os.replace(replacement, source)
    build_page(sweep)
    assert linked.read_bytes() == source.read_bytes()
    assert not [p for p in linked.parent.iterdir() if p.name.startswith(TEMP_MARK)]

    monkeypatch.setattr("orchestrator.review.keep_copy", lambda source, target: False)  # e.g. a full disk
    parsed = Page(render(build_page(sweep)))
    assert {v["src"] for v in parsed.find("video") if "refs/" in v["src"]} >= {"../refs/other/x.mp4"}
    assert "a copy of this folder will not show them" in " ".join(parsed.text)


def test_posters_are_made_once_beside_each_mp4(write_manifest, make_refs, monkeypatch):
    sweep = _v2v_sweep(write_manifest, make_refs)
    _set_states(sweep)
    page = write_page(sweep)
    assert page == sweep.root / "index.html"
    done = list(sweep.jobs[5:])
    posters = [thumb_path(j.output) for j in done]
    assert posters[0].name == Path(done[0].output).stem + ".thumb.jpg"
    assert all(p.read_bytes()[:2] == b"\xff\xd8" for p in posters)  # JPEG
    before = {p: p.stat().st_mtime_ns for p in posters}
    calls = []
    real = review.make_poster
    monkeypatch.setattr(review, "PARALLEL_FROM", 10**6)  # in this process, so the calls are seen
    monkeypatch.setattr(review, "make_poster", lambda *a, **k: calls.append(a) or real(*a, **k))
    write_page(sweep)
    assert calls == [] and {p: p.stat().st_mtime_ns for p in posters} == before
    # A remade video (newer than its poster) gets a new poster; the others are left alone.
    changed = Path(done[0].output)
    old_poster = posters[0].read_bytes()
    write_mp4(_frames(shade=250), changed, fps=5, expected_frames=5, sidecar={"job_id": done[0].id})
    write_page(sweep)
    assert [Path(c[0]) for c in calls] == [changed]
    assert posters[0].stat().st_mtime_ns >= changed.stat().st_mtime_ns and posters[0].read_bytes() != old_poster
    assert all(posters[i].stat().st_mtime_ns == before[posters[i]] for i in range(1, len(posters)))
    assert not list(sweep.root.rglob(f"{TEMP_MARK}*"))


def test_poster_without_pillow_is_written_by_pyav(tmp_path, monkeypatch):
    video = tmp_path / "v.mp4"
    write_mp4(_frames(n=5, size=64), video, fps=5, expected_frames=5)
    monkeypatch.setitem(sys.modules, "PIL", None)  # `import PIL` now fails
    assert review.make_poster(video, tmp_path / "v.thumb.jpg")
    with av.open(str(tmp_path / "v.thumb.jpg")) as container:
        frame = next(container.decode(video=0))
    assert (frame.width, frame.height) == (64, 64)
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    assert review.make_poster(tmp_path / "broken.mp4", tmp_path / "broken.thumb.jpg") is False


def test_many_posters_are_made_in_parallel(tmp_path):
    pairs = []
    for i in range(2 * review.PARALLEL_FROM):
        video = tmp_path / f"v{i}.mp4"
        write_mp4(_frames(n=5, size=32, shade=i * 10), video, fps=5, expected_frames=5)
        pairs.append((video, thumb_path(video)))
    made = review.make_posters(pairs)
    assert made == {target: True for _, target in pairs} and all(t.exists() for _, t in pairs)


def test_text_and_image_tasks(write_manifest, make_refs, tmp_path):
    t2v = Sweep(load_manifest(write_manifest(synthetic_manifest(), name="t2v.yaml")))
    parsed = Page(render(build_page(t2v)))
    # No ledger yet: every tile is missing, one row per category, a column per prompt.
    assert {t["data-state"] for t in parsed.find("figure")} == {"pending"}
    assert len(parsed.find("td", class_="cell")) == 3 and not parsed.find("video")
    assert "No ledger" in " ".join(parsed.text)

    images = tmp_path / "imgs"
    images.mkdir()
    for stem in ("first frame", "二"):
        with av.open(str(images / f"{stem}.png"), "w", format="image2") as out:
            stream = out.add_stream("png", rate=1)
            stream.width = stream.height = 32
            stream.pix_fmt = "rgb24"
            for packet in stream.encode(av.VideoFrame.from_ndarray(_frames(1)[0], format="rgb24")):
                out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
    i2v = Sweep(load_manifest(write_manifest(synthetic_manifest(
        model={"task": "i2v"}, output_dir="out_i2v", categories={"pics": {"images": "imgs/*.png", "prompts": ["p"]}}),
        name="i2v.yaml")))
    parsed = Page(render(build_page(i2v)))
    # The image itself heads its row (no poster needed).
    assert sorted(img["src"] for img in parsed.find("img")) == [".sweep/refs/pics/%E4%BA%8C.png",
                                                                ".sweep/refs/pics/first%20frame.png"]
    assert len(parsed.find("td", class_="cell")) == 2 and not parsed.find("video")


def test_page_write_is_atomic_and_reloads_only_while_work_is_left(write_manifest, make_refs):
    sweep = _v2v_sweep(write_manifest, make_refs)
    _set_states(sweep)
    path = write_page(sweep, reload_s=5)
    html = path.read_text(encoding="utf-8")
    assert 'data-reload="30"' in html and 'id="auto-reload"' in html  # at least 30 s between reloads
    assert 'data-reload=""' in write_page(sweep).read_text(encoding="utf-8")  # not watching
    assert [p.name for p in sweep.root.iterdir() if p.name.endswith(".html")] == ["index.html"]
    assert not list(sweep.root.glob(f"{TEMP_MARK}*"))
    assert oct(path.stat().st_mode & 0o777) == oct(file_mode())  # readable as the user's files are
    # Self-contained: no stylesheet, script or font from elsewhere.
    parsed = Page(html)
    assert not parsed.find("link") and all("src" not in a for a in parsed.find("script"))
    assert not [link for link in parsed.links() if re.match(r"[a-z]+:", link)]


# ------------------------------------------------------------------------------------------------------
# End to end: a real sweep through the CLI, its page opened in headless Chromium.

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--no-first-run", "--disable-component-update", "--disable-sync",
                  "--autoplay-policy=no-user-gesture-required", "--hide-scrollbars"]

# What the page's videos are doing, read from outside the page.
VIDEOS_NOW = """JSON.stringify({
  cells: document.querySelectorAll("td.cell").length,
  mp4: document.createElement("video").canPlayType('video/mp4; codecs="avc1.42E01E"'),
  videos: Array.prototype.map.call(document.querySelectorAll("video"), function (v) {
    return {src: v.getAttribute("src"), time: v.currentTime, ready: v.readyState, paused: v.paused,
            frames: v.getVideoPlaybackQuality().totalVideoFrames, error: v.error ? v.error.code : null};
  })})"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("chromium not found (run_tests.sh installs it: apt-get install chromium)")


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: it
    reads NUL-terminated JSON on fd 3 and answers on fd 4).

    Real time, not --virtual-time-budget: under CPU load virtual time can run out before the media
    pipeline has loaded anything, and the test would fail for the machine's sake, not the page's.
    """

    def __init__(self, profile: Path, width: int, height: int):
        self.log = open(profile.parent / "chromium.log", "wb")  # its stderr, for a failure's message
        to_child, self._write = os.pipe()
        self._read, from_child = os.pipe()
        # bash (dash takes no fd above 9) puts the pipe ends on fds 3 and 4, then becomes chromium;
        # its arguments stay "$@", never part of the command string.
        self.process = subprocess.Popen(
            [shutil.which("bash") or "/bin/bash", "-c", f'exec "$0" "$@" 3<&{to_child} 4>&{from_child}', _chromium(), *CHROMIUM_FLAGS,
             f"--user-data-dir={profile}", f"--window-size={width},{height}", "--remote-debugging-pipe",
             "about:blank"],
            pass_fds=(to_child, from_child), stdout=subprocess.DEVNULL, stderr=self.log,
            start_new_session=True)
        os.close(to_child)
        os.close(from_child)
        self._buffer = b""
        self._id = 0
        self.session = None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def call(self, method: str, timeout: float = PATIENCE_S, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        try:
            os.write(self._write, json.dumps(message).encode() + b"\0")
        except BrokenPipeError:
            raise RuntimeError(f"chromium exited ({self.process.poll()}): {self._stderr()}") from None
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._read], [], [], left)[0]:
                    raise TimeoutError(f"chromium did not answer {method} in {timeout}s")
                chunk = os.read(self._read, 1 << 16)
                if not chunk:
                    raise RuntimeError(f"chromium closed its DevTools pipe: {self._stderr()}")
                self._buffer += chunk
            raw, _, self._buffer = self._buffer.partition(b"\0")
            reply = json.loads(raw)
            if reply.get("id") == self._id:  # anything else is an event
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def _stderr(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(encoding="utf-8", errors="replace")[-3000:]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
            self.process.wait(timeout=10)
        except (OSError, RuntimeError, TimeoutError, subprocess.TimeoutExpired):
            pass
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # the renderer and helpers too
            self.process.wait()
        os.close(self._write)
        os.close(self._read)
        self.log.close()


@pytest.mark.slow
def test_review_page_plays_in_headless_chromium(write_manifest, make_refs, tmp_path):
    _chromium()
    make_refs("镜头 cam", ["ref 1", "参考"])
    path = write_manifest(synthetic_manifest(
        model={"task": "v2v", "options": {"fail_jobs": ["镜头 cam/参考/seed_2_prompt_1"]}},
        generation={"width": 64, "height": 48, "num_frames": 17, "fps": 8, "steps": 2},  # 2.1 s videos
        execution={"retries": 0},
        categories={"镜头 cam": {"videos": "refs/镜头 cam/*.mp4", "prompts": [EVIL, "a dog"]}}))
    run = cli("run", str(path), "--executor", "local", "--no-progress")
    assert run.returncode == 1, run.stdout + run.stderr  # the one injected failure
    result = cli("report", str(path), "--html")
    assert result.returncode == 1, result.stderr  # a job failed for good; the page is written all the same
    page = Path(result.stdout.strip())
    assert page == tmp_path / "out" / "index.html" and page.exists()

    browser = Chromium(tmp_path / "profile", 1400, 1300)
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=page.as_uri())
        first: dict[str, float] = {}
        advanced: list[str] = []
        deadline = time.monotonic() + PATIENCE_S
        while time.monotonic() < deadline:
            seen = json.loads(browser.evaluate(VIDEOS_NOW))
            results = [v for v in seen["videos"] if "/seed_" in v["src"]]
            for v in results:
                if v["time"] > 0 and v["frames"]:
                    first.setdefault(v["src"], v["time"])
                    if v["time"] != first[v["src"]]:
                        advanced.append(v["src"])
            if advanced:
                break
            time.sleep(0.2)
        assert seen["mp4"] == "probably"
        assert seen["cells"] == 4  # 2 references × 2 prompts
        assert len(results) == 7  # 8 jobs, one failed
        assert not [v for v in seen["videos"] if v["error"]]
        assert advanced, seen  # currentTime moves on and frames are decoded: the videos really play
        assert browser.evaluate("document.querySelectorAll('figure[data-state=failed]').length") == 1
        ref = browser.evaluate("document.querySelector('th.ref video').currentSrc")
        assert ref.endswith("/out/.sweep/refs/%E9%95%9C%E5%A4%B4%20cam/ref%201.mp4")
        time.sleep(1.0)  # let every visible video show a frame
        shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
    finally:
        browser.close()
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 10_000
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "review.png").write_bytes(shot)
    print(f"screenshot of the review page: {ARTIFACTS / 'review.png'}")


def test_report_watch_html_keeps_rewriting_the_page(write_manifest, tmp_path):
    path = write_manifest(synthetic_manifest())
    process = subprocess.Popen([sys.executable, str(ROOT / "run_experiment.py"), "report", str(path),
                                "--watch", "0.3", "--html"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    page = tmp_path / "out" / "index.html"
    try:
        writes = set()
        deadline = time.monotonic() + PATIENCE_S
        while len(writes) < 3 and time.monotonic() < deadline and process.poll() is None:
            if page.exists():
                writes.add(page.stat().st_mtime_ns)
            time.sleep(0.05)
        assert len(writes) >= 3
    finally:
        process.terminate()  # not Ctrl-C: that could land outside the sleep, mid-write (harmless, atomic)
        out, _ = process.communicate(timeout=PATIENCE_S)
    assert f"review page: {page}" in out
    html = page.read_text(encoding="utf-8")
    assert 'data-reload="30"' in html  # nothing has run: the open page reloads itself


def test_activity_lanes_per_gpu_with_busy_share_and_merged_bars():
    attempts = [
        {"worker": "gpu1_worker0", "started_at": 100.0, "finished_at": 150.0, "outcome": "done", "error": None},
        {"worker": "gpu1_worker0", "started_at": 140.0, "finished_at": 200.0, "outcome": "done", "error": None},
        {"worker": "gpu0_worker0", "started_at": 100.0, "finished_at": 120.0, "outcome": "oom", "error": "OOM <x>"},
        {"worker": "gpu0_worker0", "started_at": 150.0, "finished_at": None, "outcome": None, "error": None},
    ]
    devices = {"gpu0_worker0": "0", "gpu1_worker0": "1,2"}  # each worker's cards, as the ledger has them
    activity = review._activity(attempts, devices, now=300.0, log_url=lambda worker: None)
    assert [(lane.device, lane.worker) for lane in activity.lanes] == [("GPU 0", "gpu0_worker0"),
                                                                     ("GPU 1+2", "gpu1_worker0")]
    gpu0, gpu1 = activity.lanes
    assert gpu1.busy_percent == pytest.approx(100 * 100 / 200)  # overlapping attempts count once
    assert gpu0.busy_percent == pytest.approx(100 * 170 / 200)
    assert len(gpu1.bars) == 1 and gpu1.bars[0].count == 2  # touching bars of one outcome merge
    assert [bar.outcome for bar in gpu0.bars] == ["oom", "running"]
    assert gpu0.bars[1].x + gpu0.bars[1].width == pytest.approx(activity.width)  # running until now
    assert activity.ticks and all(0 <= x <= activity.width for x, _ in activity.ticks)


def test_videos_sidecars_posters_and_page_take_the_umask(write_manifest, make_refs):
    # A lab's shared server: umask 002, the group opens the page; no output may be private (0600).
    old = os.umask(0o002)
    try:
        sweep = _v2v_sweep(write_manifest, make_refs)
        _set_states(sweep)
        page = write_page(sweep)
    finally:
        os.umask(old)
    done = [Path(job.output) for job in sweep.jobs[5:]]
    files = [page] + done + [p.with_suffix(".json") for p in done] + [thumb_path(p) for p in done]
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: oct(0o664) for f in files}


def test_jobs_that_differ_only_in_axis_values_are_compared_side_by_side(write_manifest, make_refs):
    from dataclasses import replace

    from orchestrator.output_names import output_path
    plain = _v2v_sweep(write_manifest, make_refs)
    m = plain.manifest
    jobs = []  # the expansion with axes (issue 22): each job once per cfg_scale × steps
    for job in (j for j in plain.jobs if j.category == "镜头 cam"):
        for cfg in (3.0, (5.0, 3.5)):
            for steps in (30, 50):
                axes = {"cfg_scale": cfg, "steps": steps}
                output, name = output_path(m, job.category, job.stem, job.prompt_index, job.prompt, job.seed, axes)
                jobs.append(replace(job, id=f"{job.id}-{len(jobs)}", ordinal=len(jobs), axes=axes,
                                    output=output, name=name))
    made = jobs[1]  # one of them done: its video sits in its column
    write_mp4(_frames(), made.output, fps=5, expected_frames=5, sidecar={"job_id": made.id, "job": made.to_dict()})
    page = build_page(Sweep(m, jobs))
    cam = next(grid for grid in page.grids if grid.category == "镜头 cam")
    assert cam.comparison.columns == ["cfg_scale 3 · steps 30", "cfg_scale 3 · steps 50",
                                      "cfg_scale 5,3.5 · steps 30", "cfg_scale 5,3.5 · steps 50"]
    assert len(cam.comparison.rows) == 2 * 2 * 2  # 2 references × 2 prompts × 2 seeds
    first = cam.comparison.rows[0]
    assert (first.stem, first.prompt_index, first.seed) == (made.stem, made.prompt_index, made.seed)
    assert [t.id for t in first.tiles] == [j.id for j in jobs[:4]]  # one job per axis combination
    assert [t.state for t in first.tiles] == ["pending", "done", "pending", "pending"]
    assert next(grid for grid in page.grids if grid.category == "other").comparison is None  # no axes there
    html = Page(render(page))
    assert "镜头 cam: axis values side by side" in "".join(html.text)
    assert [a["class"] for a in html.find("table") if "compare" in a.get("class", "")] == ["grid compare"]
    assert html.text.count("cfg_scale 5,3.5 · steps 50") >= 1
    assert made.key.endswith("seed_1_prompt_0_cfg_scale-3_steps-50")
    assert len(html.find("video", src=review.url(made.output, m.output_dir))) == 2  # the grid and the comparison
    ids = [a["id"] for _, a in html.tags if a.get("id", "").startswith("job-")]
    assert len(ids) == len(set(ids))  # the comparison repeats no anchor of the grid


@pytest.mark.slow
def test_a_page_written_before_the_first_run_leaves_the_folder_to_the_sweep(write_manifest, tmp_path):
    """Issue 28: `report --html` before the first `run` wrote index.html into a folder without .sweep/,
    and `run` then refused that folder as not a sweep's. The page now makes the folder the sweep's first;
    a folder holding someone else's files gets no page."""
    path = write_manifest(synthetic_manifest(execution={"executor": "local"}))
    out = tmp_path / "out"
    assert cli("report", str(path), "--html").returncode == 0 and (out / "index.html").is_file()
    shutil.rmtree(out / ".sweep")  # a page written by a version before the fix: the folder holds it alone
    result = cli("report", str(path), "--html")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / ".sweep" / "sweep.json").read_text(encoding="utf-8"))["name"] == "t"
    run = cli("run", str(path), "--cpu-slots", "1", "--no-progress")
    assert run.returncode == 0, run.stdout + run.stderr

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine", encoding="utf-8")
    other = write_manifest(synthetic_manifest(name="u", output_dir="theirs"), name="u.yaml")
    refused = cli("report", str(other), "--html")
    assert refused.returncode == 2
    assert f"output_dir {theirs} is not empty and is not a sweep's output folder" in refused.stderr
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt"]
