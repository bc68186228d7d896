"""Stream mode: the keyframe grid and isolated stream readers (issue 12, items 4 and 5).

Every test is bounded: network sources are loopback servers with short
timeouts, subprocesses have timeouts, and the stand-in sources are finite."""

import inspect
import json
import math
import socket
import subprocess
import sys
import textwrap
import threading
import time

import av
import numpy as np
import pytest

import cmdcl.runtime.recognizer as recognizer_module
from cmdcl.data.video import GridStatus, Reconnect, iter_grid_frames, write_video
from cmdcl.runtime import Recognizer
from cmdcl.runtime.output import partial_path
from test_drops import WatchedReader
from test_output_safety import run_in_subprocess, wait_for_lines
from test_runtime import moving_square
from test_stream_reliability import CLASSES, EchoBackend, finishes_within, silent_server

RATE = 10  # frames per second of the test videos
LEVELS = 80  # frame i is grey level 3 * (i % LEVELS)


def keyed_video(path, count, keyframes, rate=RATE):
    """`count` flat grey frames, frame i at level 3 * (i % LEVELS), with keyframes (IDR) exactly at the indices given."""
    images = (np.full((48, 64, 3), 3 * (i % LEVELS), np.uint8) for i in range(count))
    return encode_keyed(path, images, keyframes, rate)


def encode_keyed(path, images, keyframes, rate, encoder="libx264", options=None, pix_fmt="yuv420p"):
    """`images` (uint8 [48, 64, 3]) encoded with keyframes exactly at the indices in `keyframes` and nowhere else."""
    options = {"forced-idr": "1", "scenecut": "0"} if options is None else options
    with av.open(str(path), "w") as container:
        stream = container.add_stream(encoder, rate=rate, options=options)
        stream.width, stream.height, stream.pix_fmt = 64, 48, pix_fmt
        stream.codec_context.gop_size = 100_000  # no keyframes but ours
        for i, image in enumerate(images):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pict_type = av.video.frame.PictureType.I if i in keyframes else av.video.frame.PictureType.NONE
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def index_of(image) -> int:
    """The frame's index modulo LEVELS (the grid frames compared are never LEVELS frames apart)."""
    return round(float(image.mean()) / 3)


def keyframe_times(path) -> list:
    """Keyframe times from a packet scan (demuxing only), seconds from the first packet."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        packets = [p for p in container.demux(stream) if p.size and p.pts is not None]
    first = min(p.pts for p in packets)
    return sorted(float((p.pts - first) * stream.time_base) for p in packets if p.is_keyframe)


def grid(path, rate, keyframes=True):
    """[(t, frame index, decode)] and the GridStatus at the end."""
    status = GridStatus()
    frames = [(t, index_of(image), status.decode) for t, image in iter_grid_frames(path, rate, 32, keyframes=keyframes, status=status)]
    return frames, status


def nearest(times, t):
    """The time in `times` nearest t, the earlier on a tie."""
    return min(times, key=lambda k: (abs(k - t), k))


# ---- item 4: keyframe grid -----------------------------------------------------------------------------
def test_keyframe_grid_takes_the_keyframe_nearest_each_grid_time(tmp_path):
    """Keyframes every 0.7 s, a grid of 1 frame per second: only keyframes are
    decoded, and each grid time shows the keyframe nearest to it."""
    path = keyed_video(tmp_path / "k.mp4", 100, set(range(0, 100, 7)))
    keys = keyframe_times(path)
    assert keys == pytest.approx([i / RATE for i in range(0, 100, 7)])
    frames, status = grid(path, 1.0)
    assert [t for t, _, _ in frames] == [float(k) for k in range(10)]  # the same grid as full decoding
    assert [decode for _, _, decode in frames] == ["keyframes"] * 10
    assert [index for _, index, _ in frames] == [round(nearest(keys, t) * RATE) % LEVELS for t, _, _ in frames]
    assert any(index != math.floor(t * RATE) % LEVELS for t, index, _ in frames)  # not the frame on screen: the nearest keyframe
    assert status.frames_decoded == len(keys) == 15
    full, full_status = grid(path, 1.0, keyframes=False)
    assert {d for _, _, d in full} == {"all"} and full_status.frames_decoded == 100


def test_keyframe_grid_falls_back_to_full_decoding_when_keyframes_get_sparser_than_the_grid(tmp_path):
    """Keyframes every 0.5 s for 8 s, then every 3 s: keyframes only at first,
    then every frame again, each grid frame then the one on screen (as full decoding gives)."""
    keyframes = set(range(0, 80, 5)) | set(range(80, 200, 30))
    path = keyed_video(tmp_path / "k.mp4", 200, keyframes)
    keys = keyframe_times(path)
    frames, status = grid(path, 1.0)
    full, _ = grid(path, 1.0, keyframes=False)
    assert [t for t, _, _ in frames] == [t for t, _, _ in full] == [float(k) for k in range(20)]
    decodes = [decode for _, _, decode in frames]
    assert "keyframes" in decodes[:8] and decodes[9:] == ["all"] * 11  # sparse from 8 s on: every frame decoded again
    assert all(index == round(nearest(keys, t) * RATE) % LEVELS for t, index, decode in frames if decode == "keyframes")
    assert [index for t, index, decode in frames if decode == "all"] == [index for (t, index, _), d in zip(full, decodes) if d == "all"]
    assert status.frames_decoded < 200
    _, sparse = grid(keyed_video(tmp_path / "sparse.mp4", 60, {0, 20, 40}), 1.0)  # sparser than the grid from the start
    assert sparse.decode == "all" and sparse.frames_decoded == 60


def test_an_all_intra_source_is_read_as_every_frame(tmp_path):
    """Every frame a keyframe (MJPEG cameras, gop 1): nothing to skip, so the grid keeps the frame on screen, not the nearest."""
    path = keyed_video(tmp_path / "intra.mp4", 40, set(range(40)))
    frames, status = grid(path, 3.0)  # grid times between frames: the nearest frame would often be the next one
    full, _ = grid(path, 3.0, keyframes=False)
    assert [index for _, index, _ in frames] == [index for _, index, _ in full] and status.frames_decoded == 40
    assert {decode for _, _, decode in frames[1:]} == {"all"}


def test_stream_windows_say_how_they_were_decoded(tmp_path):
    path = keyed_video(tmp_path / "k.mp4", 120, set(range(0, 120, 5)))  # keyframes every 0.5 s
    for keyframe_grid, expected in ((True, "keyframes"), (False, "all")):
        recognizer = Recognizer(EchoBackend(), window=4.0, stride=1.0, keyframe_grid=keyframe_grid)  # a grid of 1 frame per second
        windows = [r for r in recognizer.stream(path) if not r.get("summary")]
        assert len(windows) == 9 and {w["decode"] for w in windows} == {expected}  # 12 grid frames, F = 4


# ---- item 5: isolated stream readers -------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_ts(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("ts") / "v.ts", moving_square(40, 2), rate=10)  # 4 s


def held_server(data: bytes, head: int, release: threading.Event):
    """A loopback HTTP server of `data` that sends its first `head` bytes, then nothing more until `release` is set."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        with listener:
            connection, _ = listener.accept()
            with connection:
                connection.recv(4096)
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data) + data[:head])
                release.wait(180)
                connection.sendall(data[head:])

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}/v.ts"


def test_a_stalled_http_source_does_not_delay_a_good_files_windows(clip_ts, tmp_path):
    """The stalled source comes first: read in turn, the file waited for its timeouts (56 s in the issue). Here the
    source stays stalled until the file's summary is out, and only then sends the rest of its file: read in turn, the
    file would never come first (the stalled source would time out after 60 s instead)."""
    good = write_video(tmp_path / "good.mp4", moving_square(40, 1), rate=10)
    release = threading.Event()
    url = held_server(clip_ts.read_bytes(), 20000, release)  # the head of a stream, then silence
    recognizer = Recognizer(EchoBackend(), window=2.0, stride=1.0, timeout=60.0, reconnect=Reconnect(tries=0))

    def read():
        seen = []  # (record, whether the stalled source had been released when it came)
        for record in recognizer.stream_many([url, good]):
            seen.append((record, release.is_set()))
            if record["video"] == str(good) and record.get("summary"):
                release.set()
        return seen

    try:
        seen = finishes_within(180, read)
    finally:
        release.set()
    good_records = [(r, released) for r, released in seen if r["video"] == str(good)]
    assert [r.get("window") for r, _ in good_records] == [0, 1, 2, None] and "error" not in good_records[-1][0]
    assert not any(released for _, released in good_records)  # all of them while the other source stalled
    stalled = [(r, released) for r, released in seen if r["video"] == url]
    assert stalled[-1][0].get("summary") and "error" not in stalled[-1][0] and stalled[-1][1]  # read to its end once released


class FullQueues(EchoBackend):
    """EchoBackend whose frame encoder first waits until every reader's queue is full (or its source has ended), as
    when the model is slower than the readers: the next step of the main loop then finds more frames ready than the
    next windows need. Readers are watched through the `watched_readers` fixture."""

    def __init__(self, readers):
        super().__init__()
        self.readers = readers

    def encode_frames(self, frames):
        for reader in self.readers:
            reader.wait_until_full_or_done()
        return super().encode_frames(frames)


@pytest.fixture
def watched_readers(monkeypatch):
    """The stream readers of the test, as WatchedReaders (see tests/test_drops.py)."""
    readers = []

    class Registered(WatchedReader):
        def __init__(self, *args):
            super().__init__(*args)
            readers.append(self)

    monkeypatch.setattr(recognizer_module, "StreamReader", Registered)
    return readers


@pytest.mark.parametrize("full_queues", [False, True])
def test_file_records_are_the_models_windows_over_the_grid(full_queues, tmp_path, watched_readers):
    """Several plain files read in parallel: each file's windows and scores are exactly
    those of its own grid (iter_grid_frames) cut into windows, as they were when read in turn.
    Full queues: the model waits until every reader's queue is full (as under load), so a step of
    the main loop finds more frames ready than the next window needs: it must take no more than that."""
    paths = [write_video(tmp_path / f"v{i}.mp4", moving_square(n, i), rate=10) for i, n in enumerate((40, 25, 7, 52))]
    backend = FullQueues(watched_readers) if full_queues else EchoBackend()
    recognizer = Recognizer(backend, window=2.0, stride=1.0)  # 2 grid frames per second, F = 4, a window every 2 frames
    records = list(recognizer.stream_many(paths))
    step = 1 / recognizer.grid_rate
    for path in paths:
        times, frames = zip(*iter_grid_frames(path, recognizer.grid_rate, 32, keyframes=False))
        tokens = backend.encode_frames(np.stack(frames))
        starts = list(range(0, max(len(frames) - 4, 0) + 1, 2))
        expected = []
        for i, first in enumerate(starts):
            window = tokens[first : first + 4]
            window = window if len(window) == 4 else window[[int((j + 0.5) * len(window) / 4) for j in range(4)]]
            probabilities = backend.probabilities(backend.classify_tokens(window[None]))[0]
            expected.append({"video": str(path), "start": round(times[first], 3), "end": round(times[first : first + 4][-1] + step, 3),
                             "scale": 2.0, "top": recognizer.top(probabilities), "window": i, "decode": "all", "dropped": 0})
        got = [r for r in records if r["video"] == str(path)]
        assert [{k: v for k, v in r.items() if k != "latency_s"} for r in got[:-1]] == expected
        assert got[-1]["windows"] == len(expected) and got[-1]["dropped"] == 0 and "error" not in got[-1]


@pytest.mark.timeout(600)  # its subprocess may take 300 s
def test_memory_stays_bounded_with_many_inputs(tmp_path):
    """200 small files, 16 read at once (an open-files limit of 128): the RSS
    while reading 200 stays about that while reading 16 (readers bounded, nothing kept per input)."""
    source = write_video(tmp_path / "v.mp4", moving_square(20, 1, 240, 320), rate=10)
    for i in range(200):
        (tmp_path / f"c{i:03d}.mp4").write_bytes(source.read_bytes())
    source.unlink()
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import glob, json, resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        import numpy as np
        from cmdcl.runtime import Recognizer
        from cmdcl.runtime.backends import Backend, ModelInfo
        CLASSES = {CLASSES!r}
    """) + inspect.getsource(EchoBackend) + textwrap.dedent(f"""
        from cmdcl.bench.measure import _rss_mb
        paths = sorted(glob.glob({str(tmp_path / "c*.mp4")!r}))
        peaks, summaries = [], 0
        for chunk in (paths[:16], paths):
            peak = 0.0
            for record in Recognizer(EchoBackend()).stream_many(chunk):
                summaries += bool(record.get("summary")) and "error" not in record
                peak = max(peak, _rss_mb())
            peaks.append(peak)
        print(json.dumps([summaries, peaks]))
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summaries, (with_16, with_200) = json.loads(result.stdout)
    assert summaries == 216 and with_200 - with_16 < 45, f"RSS {with_16:.0f} MB reading 16 inputs, {with_200:.0f} MB reading 200"


def test_ctrl_c_ends_a_stream_run_at_once_while_a_source_is_stalled(tmp_path, clip_ts):
    """A reader blocked in a network read (timeout 60 s) must not hold up the exit."""
    url, close = silent_server(clip_ts.read_bytes()[:20000])
    out = tmp_path / "out.jsonl"
    good = write_video(tmp_path / "good.mp4", moving_square(40, 1), rate=10)
    process = run_in_subprocess([url, good, "--mode", "stream", "--window", "2", "--stride", "1", "--timeout", "60", "-o", out, "-q"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # the good file's windows and summary (a loaded machine is slow to start)
        wait_for_lines(partial_path(out), 4, process, seconds=180)
        signalled = time.monotonic()
        process.send_signal(2)
        _, stderr = process.communicate(timeout=30)
        took = time.monotonic() - signalled
    finally:
        process.kill()
        close()
    assert process.returncode == 130 and took < 10, (took, stderr.decode())  # the stalled read would hold it for up to 60 s
    assert len(out.read_text().splitlines()) == 4


def test_windows_due_together_share_one_head_call(tmp_path, watched_readers):
    """While a slow model runs, every reader fills its buffer: the next steps batch all sources' frames and windows.
    (The model waits for the full buffers, rather than for time to pass.)"""
    paths = [write_video(tmp_path / f"v{i}.mp4", moving_square(40, i), rate=10) for i in range(3)]

    class Counting(FullQueues):
        head_calls = 0

        def classify_tokens(self, tokens):
            self.head_calls += 1
            return super().classify_tokens(tokens)

    backend = Counting(watched_readers)
    records = finishes_within(60, lambda: list(Recognizer(backend, window=2.0, stride=1.0).stream_many(paths)))
    assert sum("window" in r for r in records) == 9 and backend.head_calls <= 4  # three windows per file; at most one step alone


def reader_threads():
    return [t for t in threading.enumerate() if t.name.startswith("cmdcl reader")]


def test_readers_end_when_the_consumer_stops_early(tmp_path):
    """Breaking out of stream_many (a consumer that has seen enough) leaves no reader running, nor a file open."""
    paths = [write_video(tmp_path / f"v{i}.mp4", moving_square(40, i), rate=10) for i in range(3)]
    records = Recognizer(EchoBackend(), window=2.0, stride=1.0).stream_many(paths)
    next(records)
    started = reader_threads()
    assert len(started) >= 3  # each blocked on its full buffer
    records.close()
    for thread in started:
        thread.join(5)
    assert not any(thread.is_alive() for thread in started)
