"""Inputs end in bounded time, are never replayed, and stay bounded (issue 14, items 2, 3, 4, 6).

Every test is bounded: network sources are loopback servers, and a call that
used to hang runs in a thread with a deadline (`finishes_within`)."""

import inspect
import itertools
import json
import socket
import subprocess
import sys
import textwrap
import threading
import tracemalloc

import av
import numpy as np
import pytest

import cmdcl.data.video as video
import cmdcl.runtime.recognizer as recognizer_module
from cmdcl.data.video import Reconnect, VideoError, declared_duration, frame_to_rgb, iter_grid_frames, read_clip, write_video
from cmdcl.runtime import Recognizer
from cmdcl.runtime.backends import Backend, ModelInfo
from test_runtime import moving_square, serve_video

CLASSES = ["a", "b", "c"]


class EchoBackend(Backend):
    """A stand-in model, no torch: a frame's token is its mean colour, a window's
    logits its frames' mean colour; enough to tell windows apart, and quick."""

    name = "echo"

    def __init__(self, num_frames=4, image_size=32):
        self.num_frames, self.image_size = num_frames, image_size
        super().__init__("echo.onnx")

    def load(self):
        self.info = ModelInfo(CLASSES, self.num_frames, self.image_size, 1, 3, False, {"window_seconds": 2.0, "stride_frames": 2})

    def encode_frames(self, frames):
        return frames.reshape(len(frames), -1, 3).mean(axis=1, dtype=np.float32)[:, None, :] / 255

    def classify_tokens(self, tokens):
        return tokens.mean(axis=(1, 2))

    def classify_clips(self, frames):
        return frames.reshape(len(frames), -1, 3).mean(axis=1) / 255


def finishes_within(seconds, function, *args):
    """function(*args) run in a daemon thread; fails the test if it is still running after `seconds` (it would hang)."""
    result = {}

    def run():
        try:
            result["value"] = function(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    if "error" in result:
        raise result["error"]
    return result["value"]


def silent_server(behaviour):
    """A loopback TCP server; each connection: "mute" accepts and never answers,
    bytes: answers an HTTP 200 promising twice as much, sends those bytes, then stalls."""
    listener = socket.create_server(("127.0.0.1", 0))
    held = []

    def serve():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            held.append(connection)
            if behaviour != "mute":
                connection.recv(4096)
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (2 * len(behaviour)) + behaviour)

    threading.Thread(target=serve, daemon=True).start()

    def close():
        listener.close()
        for connection in held:
            connection.close()

    return f"http://127.0.0.1:{listener.getsockname()[1]}/v.mp4", close


@pytest.fixture(scope="module")
def clip_ts(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("ts") / "v.ts", moving_square(40, 2), rate=10)  # 4 s


# ---- item 2: network inputs end in bounded time and never replay -------------------------------------------
@pytest.mark.parametrize("stall", ["never answers", "stalls half way"])
def test_video_mode_network_source_times_out_and_the_run_goes_on(clip_ts, stall):
    url, close = silent_server("mute" if stall == "never answers" else clip_ts.read_bytes()[:20000])
    try:
        with pytest.raises(VideoError, match="timed out"):
            finishes_within(10, read_clip, url, 4, 32, "center", None, "auto", 0.5)
        records = finishes_within(10, lambda: list(Recognizer(EchoBackend(), timeout=0.5).predict_many([url, clip_ts])))
    finally:
        close()
    assert "timed out" in records[0]["error"] and records[0]["video"] == url
    assert "error" not in records[1] and records[1]["top"]


def test_stream_http_file_cut_short_every_time_ends_without_replaying(clip_ts):
    """Every connection drops half way: the first half is read once, then the
    reconnects make no progress and the stream ends (it used to replay for ever)."""
    server, url, connections = serve_video(clip_ts.read_bytes(), ["drop"] * 1000)
    grid, error = [], None
    try:
        for item in itertools.islice(iter_grid_frames(url, 5, 32, Reconnect(tries=2, initial_delay=0.01)), 200):
            grid.append(item)
    except VideoError as exc:
        error = exc
    finally:
        server.shutdown()
    assert error is not None and "gave up after 2 reconnects without progress" in str(error)
    times = [t for t, _ in grid]
    local = list(iter_grid_frames(clip_ts, 5, 32))
    assert 5 <= len(times) < len(local) and times == [t for t, _ in local[: len(times)]]  # the file's times, once each
    assert len(connections) == 4  # the first read, and three reconnects without progress


def test_stream_http_file_that_stalls_half_way_ends_in_bounded_time(clip_ts):
    url, close = silent_server(clip_ts.read_bytes()[: len(clip_ts.read_bytes()) // 2])
    try:
        with pytest.raises(VideoError, match="gave up after 1 reconnects without progress .*timed out"):
            finishes_within(15, lambda: list(iter_grid_frames(url, 5, 32, Reconnect(tries=1, initial_delay=0.01), timeout=0.5)))
    finally:
        close()


def test_reconnects_without_progress_add_up_even_with_progress_in_between(tmp_path):
    """A tcp:// source whose connections alternate between delivering frames and
    closing at once: the back-off restarts after progress, but the failures
    within the span add up and end it (a counter reset by any frame never did)."""
    data = write_video(tmp_path / "v.ts", moving_square(5, 3), rate=10).read_bytes()
    listener = socket.create_server(("127.0.0.1", 0))
    served = []

    def serve():
        for i in range(40):
            connection, _ = listener.accept()
            served.append(i)  # before the close the client reacts to
            connection.sendall(b"" if i % 2 else data)
            connection.close()
        listener.close()

    threading.Thread(target=serve, daemon=True).start()
    url, delays = f"tcp://127.0.0.1:{listener.getsockname()[1]}", []
    with pytest.raises(VideoError, match="gave up after 2 reconnects without progress"):
        reconnect = Reconnect(tries=2, initial_delay=0.01, span=60)
        finishes_within(20, lambda: list(iter_grid_frames(url, 5, 32, reconnect, sleep=delays.append)))
    assert len(served) == 6 and delays == [0.01, 0.02] * 2 + [0.01]


# ---- item 3: timestamps that jump do not run away ---------------------------------------------------------
def jumping_mkv(path, jump=100_000.0):
    times = [i * 0.1 for i in range(30)] + [jump + 3.0 + i * 0.1 for i in range(30)]  # 3 s, a jump, 3 s
    return write_video(path, moving_square(60, 4), times=times)


def test_forward_jump_restarts_the_grid_instead_of_filling_it(tmp_path):
    path = jumping_mkv(tmp_path / "jump.mkv")
    grid = finishes_within(20, lambda: [t for t, _ in itertools.islice(iter_grid_frames(path, 5, 32), 1000)])
    assert len(grid) < 40  # about 2 x 15 grid frames, not 100,000 s of copies
    steps = np.diff(grid)
    assert np.sum(steps > 0.2 + 1e-6) == 1 and grid[-1] == pytest.approx(100_005.8)


def test_stream_mode_reports_a_gap_and_no_window_spans_it(tmp_path):
    path = jumping_mkv(tmp_path / "jump.mkv")
    recognizer = Recognizer(EchoBackend(), window=2.0, stride=1.0)  # grid 2 fps
    records = finishes_within(20, lambda: list(itertools.islice(recognizer.stream(path), 1000)))
    windows, summary = records[:-1], records[-1]
    assert summary["summary"] and summary["gaps"] == 1 and summary["windows"] == len(windows) < 10
    after = [w for w in windows if "gap_before" in w]
    assert len(after) == 1 and after[0]["gap_before"] == pytest.approx(100_000.0) and after[0]["start"] == 100_003.0
    assert all(w["end"] - w["start"] <= 2.0 + 1e-6 for w in windows)  # no window spans the gap
    assert all("gap_before" not in w for w in windows if w["start"] < 100_000)


def test_backward_jump_continues_the_timeline(tmp_path):
    """Two MPEG-TS files back to back: the second's pts start again at 0."""
    a = write_video(tmp_path / "a.ts", moving_square(30, 5), rate=10)
    b = write_video(tmp_path / "b.ts", moving_square(30, 6), rate=10)
    joined = tmp_path / "joined.ts"
    joined.write_bytes(a.read_bytes() + b.read_bytes())
    grid = finishes_within(20, lambda: [t for t, _ in itertools.islice(iter_grid_frames(joined, 5, 32), 1000)])
    assert np.allclose(np.diff(grid), 0.2) and len(grid) >= 28  # about 6 s at 5 grid frames per second, in order


def test_endless_source_outage_restarts_the_window(tmp_path, monkeypatch):
    """A tcp:// source that drops and comes back after longer than max_gap: the
    grid is not filled over the outage; it restarts after it."""
    monkeypatch.setattr(video, "GAP_SECONDS", 0.25)  # max_gap(50) is then 0.25 s, so a 0.6 s outage is a gap
    data = write_video(tmp_path / "v.ts", moving_square(10, 3), rate=10).read_bytes()  # 1 s, sent at once
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        for _ in range(2):
            connection, _ = listener.accept()
            connection.sendall(data)
            connection.close()
        listener.close()

    threading.Thread(target=serve, daemon=True).start()
    url = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    grid = []
    with pytest.raises(VideoError, match="gave up"):
        for t, _ in iter_grid_frames(url, 50, 32, Reconnect(tries=0, initial_delay=0.6)):
            grid.append(t)
    jumps = [b - a for a, b in zip(grid, grid[1:]) if b - a > 0.03]
    assert len(jumps) == 1 and jumps[0] >= 0.55  # the outage, not filled with copies


# ---- item 4: bounded resources ------------------------------------------------------------------------------
def test_stream_many_reads_a_bounded_number_of_files_at_once(tmp_path, monkeypatch):
    paths = [write_video(tmp_path / f"v{i}.mp4", moving_square(40, i, 32, 32), rate=10) for i in range(7)]  # 4 s: read over several steps
    monkeypatch.setattr(recognizer_module, "max_open_sources", lambda: 3)
    reading, most = set(), [0]

    def counted(source, *args, **kwargs):
        reading.add(source)
        most[0] = max(most[0], len(reading))
        yield from iter_grid_frames(source, *args, **kwargs)
        reading.discard(source)

    monkeypatch.setattr(recognizer_module, "iter_grid_frames", counted)
    records = list(Recognizer(EchoBackend()).stream_many(paths))
    assert sorted(r["video"] for r in records if r.get("summary")) == sorted(map(str, paths))
    assert all("error" not in r for r in records) and most[0] == 3


def test_max_open_sources_follows_the_open_files_limit(monkeypatch):
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda kind: (64, 4096))
    assert recognizer_module.max_open_sources() == 8
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (1 << 20, 1 << 20))
    assert recognizer_module.max_open_sources() == recognizer_module.MAX_OPEN_SOURCES
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert recognizer_module.max_open_sources() == recognizer_module.MAX_OPEN_SOURCES


def test_hundred_files_under_a_low_open_files_limit_all_get_summaries(tmp_path):
    """The reproduction: more inputs than file descriptors (RLIMIT_NOFILE 64)."""
    source = write_video(tmp_path / "v.mp4", moving_square(40, 1, 32, 32), rate=10)  # 4 s: open over several steps
    for i in range(100):
        (tmp_path / f"c{i:03d}.mp4").write_bytes(source.read_bytes())
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import json, resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        import numpy as np
        from cmdcl.runtime import Recognizer
        from cmdcl.runtime.backends import Backend, ModelInfo
        from cmdcl.runtime.recognizer import expand_inputs
        CLASSES = {CLASSES!r}
    """) + inspect.getsource(EchoBackend) + textwrap.dedent(f"""
        summaries = [r for r in Recognizer(EchoBackend()).stream_many(expand_inputs([{str(tmp_path)!r}])) if r.get("summary")]
        print(json.dumps(summaries))
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    summaries = json.loads(result.stdout)
    assert len(summaries) == 101 and [r for r in summaries if "error" in r] == []


def test_stream_summary_keeps_a_running_sum_not_every_window(tmp_path, monkeypatch):
    """An endless source: memory must not grow with the windows (it kept every
    window's scores). A stand-in grid of 3000 frames, a window every frame."""
    frame = np.zeros((32, 32, 3), np.uint8)

    def endless_grid(source, rate, *args, **kwargs):
        for k in range(3000):
            yield k / rate, frame

    monkeypatch.setattr(recognizer_module, "iter_grid_frames", endless_grid)
    recognizer = Recognizer(EchoBackend(), window=2.0, stride=0.5)
    records = recognizer.stream_many(["rtsp://127.0.0.1:9/cam"])
    for _ in range(500):  # warm up
        next(records)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(2000):
        next(records)
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    summary = list(records)[-1]
    assert grown < 100_000, f"{grown} bytes kept for 2000 windows"
    assert summary["windows"] == 3000 - 3 and summary["top"][0]["score"] == pytest.approx(1 / 3)


def test_frame_to_rgb_keeps_normal_frames_bit_exact():
    """The crop-first path is only for extreme aspect ratios: an ordinary frame
    gives exactly the pixels of resizing the whole frame and cropping."""
    rng = np.random.default_rng(0)
    for height, width in [(48, 64), (720, 1280), (1280, 720), (100, 400)]:
        frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8), format="rgb24")
        scale = 32 / min(width, height)
        whole = frame.to_ndarray(width=max(32, round(width * scale)), height=max(32, round(height * scale)), format="rgb24",
                                 interpolation="BILINEAR")
        top, left = (whole.shape[0] - 32) // 2, (whole.shape[1] - 32) // 2
        assert np.array_equal(frame_to_rgb(frame, 32), whole[top : top + 32, left : left + 32])


def test_frame_to_rgb_of_an_extreme_aspect_ratio_is_cheap():
    image = np.zeros((16000, 2, 3), np.uint8)
    image[7999:8001] = 200  # the centre rows: what the crop keeps
    frame = av.VideoFrame.from_ndarray(image, format="rgb24")
    tracemalloc.start()
    rgb = frame_to_rgb(frame, 32)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert rgb.shape == (32, 32, 3) and rgb.min() == 200  # the centre 2 x 2 square, scaled up (tests/test_frame_crop.py: more)
    assert peak < 1_000_000  # resizing the whole frame took 25 MB (1.2 GB at 224 px)


@pytest.mark.parametrize("window", [1e-9, float("nan"), float("inf")])
def test_absurd_window_is_one_line_value_error(window):
    with pytest.raises(ValueError) as info:
        Recognizer(EchoBackend(), window=window)
    assert "\n" not in str(info.value) and "window" in str(info.value)


# ---- item 6: bad metadata in one file never stops the run ------------------------------------------------
def malformed_duration_mkv(path):
    write_video(path, moving_square(16, 1), rate=10)
    data = path.read_bytes()
    tag = b"00:00:01.600000000"
    assert data.count(tag) == 1
    path.write_bytes(data.replace(tag, b"00-00-01.6".ljust(len(tag), b"\0")))
    return path


def test_malformed_duration_tag_is_ignored(tmp_path):
    path = malformed_duration_mkv(tmp_path / "bad-tag.mkv")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.metadata["DURATION"] == "00-00-01.6"
        assert declared_duration(container, stream) in (None, pytest.approx(1.6))  # the container's own duration may remain
    assert read_clip(path, 4, 32).frames.shape == (4, 32, 32, 3)
    good = write_video(tmp_path / "good.mp4", moving_square(16, 2), rate=10)
    recognizer = Recognizer(EchoBackend(), window=1.0, stride=1.0)
    assert all("error" not in r for r in recognizer.predict_many([path, good]))
    summaries = [r for r in recognizer.stream_many([path, good]) if r.get("summary")]
    assert len(summaries) == 2 and all("error" not in r for r in summaries)


@pytest.mark.parametrize("mode", ["video", "stream"])
def test_unexpected_error_in_one_input_becomes_its_record(tmp_path, monkeypatch, capsys, mode):
    paths = [write_video(tmp_path / f"v{i}.mp4", moving_square(16, i), rate=10) for i in range(3)]
    real = video.open_video

    def buggy_open(source, *args, **kwargs):
        if str(source) == str(paths[1]):
            raise RuntimeError("a bug in the reader\nsecond line")
        return real(source, *args, **kwargs)

    monkeypatch.setattr(video, "open_video", buggy_open)
    for debug in (False, True):
        recognizer = Recognizer(EchoBackend(), window=1.0, stride=1.0, debug=debug)
        records = list(recognizer.predict_many(paths) if mode == "video" else recognizer.stream_many(paths))
        summaries = {r["video"]: r for r in records if r.get("summary")}
        assert summaries[str(paths[1])]["error"] == "unexpected RuntimeError: a bug in the reader"
        assert all("error" not in summaries[str(p)] for p in (paths[0], paths[2]))
        assert ("Traceback" in capsys.readouterr().err) == debug


# ---- beyond the brief -------------------------------------------------------------------------------------
def test_video_mode_on_an_http_stream_that_never_ends_stops(clip_ts, monkeypatch):
    """Data keeps coming, so no timeout fires: the packet scan's bound ends it."""
    monkeypatch.setattr(video, "MAX_SCAN_FRAMES", 100)
    data = clip_ts.read_bytes()
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        connection, _ = listener.accept()
        connection.recv(4096)
        try:
            connection.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
            while True:
                connection.sendall(data)
        except OSError:
            connection.close()
            listener.close()

    threading.Thread(target=serve, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/live.ts"
    with pytest.raises(VideoError, match="more than 100 frames: too long for video mode"):
        finishes_within(20, read_clip, url, 4, 32)


def test_fifo_input_is_refused_as_not_a_regular_file(tmp_path):
    import os

    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    with pytest.raises(VideoError, match="not a regular file"):
        finishes_within(5, read_clip, fifo, 4, 32)


def test_stride_longer_than_anything_does_not_hold_frames(monkeypatch):
    """stride 1e9 s: frames are pulled and encoded ENCODER_BATCH at a time, not held until the stride is reached."""
    frame, yielded, backlog = np.zeros((32, 32, 3), np.uint8), [0], []

    def grid(source, rate, *args, **kwargs):
        for k in range(1000):
            yielded[0] += 1
            yield k / rate, frame

    class Counting(EchoBackend):
        encoded = 0

        def encode_frames(self, frames):
            backlog.append(yielded[0] - self.encoded)
            self.encoded += len(frames)
            return super().encode_frames(frames)

    monkeypatch.setattr(recognizer_module, "iter_grid_frames", grid)
    records = list(Recognizer(Counting(), window=2.0, stride=1e9).stream_many(["rtsp://127.0.0.1:9/cam"]))
    # one encoder batch taken, plus the reader's buffer (at most ENCODER_BATCH) and the frame it is handing over
    assert records[-1]["windows"] == 1 and max(backlog) <= 2 * recognizer_module.ENCODER_BATCH + 1
