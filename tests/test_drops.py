"""Drop accounting in stream mode (issue 21, item 5), deterministic: no test depends on how fast this machine is.

A live source without an end drops its oldest grid frame when its reader's queue stays full for a grid step; the
frame after the dropped ones carries their count (`GridItem.dropped`), which adds up in every window record (per
window length: the drops since that length's previous window) and in the summaries. Files, http(s) files included,
never drop. Here the queue is driven directly (a producer with no consumer, a consumer that takes only once the
producer is provably waiting), the model is held until the source has been read to its end, and scripted readers
hand the recognizer frames with known drops."""

import threading
import time
from collections import deque

import numpy as np
import pytest

import cmdcl.runtime.recognizer as recognizer_module
from cmdcl.runtime import Recognizer
from cmdcl.runtime.stream_readers import GridItem, StreamReader
from test_stream_reliability import EchoBackend, finishes_within

WAIT = 60  # seconds a step may wait for the other thread before the test fails (it never takes that long)


def numbered(count):
    """open_frames for a StreamReader: `count` grid frames at once, frame k flat at level k, at k / 10 s."""

    def open_frames(sleep, status):
        return ((k / 10, np.full((2, 2, 3), k, np.uint8)) for k in range(count))

    return open_frames


class WatchedReader(StreamReader):
    """A StreamReader that counts the frames it has tried to queue (`attempts`) and says when its queue changes. The
    count goes up under the queue's lock (a re-entrant one), which the put keeps until it has queued, dropped or started
    to wait: whoever sees `attempts` reach n knows the n-th put has done its first look at the queue."""

    attempts = 0

    def _put(self, item):
        with self.changed:
            self.attempts += 1
            self.changed.notify_all()
            queued = super()._put(item)
            self.changed.notify_all()
            return queued

    def wait_for_attempts(self, count):
        with self.changed:
            assert self.changed.wait_for(lambda: self.attempts >= count, WAIT), f"the reader never tried to queue frame {count}"

    def wait_until_full_or_done(self):
        """Until the queue holds `capacity` frames (a file's reader then waits) or the source has ended (which nobody
        is told of: looked at every 10 ms)."""
        deadline = time.monotonic() + WAIT
        with self.changed:
            while not (self.done or len(self.items) >= self.capacity):
                assert time.monotonic() < deadline, "the reader neither filled its queue nor ended"
                self.changed.wait(0.01)


def levels(items):
    return [int(item.frame[0, 0, 0]) for item in items]


def take_all(reader):
    reader.thread.join(WAIT)
    assert not reader.thread.is_alive()
    items = []
    while (item := reader.take()) is not None:
        items.append(item)
    return items


# ---- the queue ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("capacity", [1, 2, 4])
@pytest.mark.parametrize("drop_after", [0.0, 0.001])
def test_drops_cascade_in_a_full_queue_and_the_frame_after_them_counts_them_all(capacity, drop_after):
    """10 frames into a queue nobody takes from: each frame past the capacity pushes the oldest out, and the count moves
    on with each push (a dropped frame that carried drops hands them on), so the first frame left carries all 10 - capacity."""
    reader = StreamReader("rtsp://camera", numbered(10), capacity, drop_after, threading.Event(), str)
    items = take_all(reader)
    assert levels(items) == list(range(10 - capacity, 10))
    assert [item.dropped for item in items] == [10 - capacity] + [0] * (capacity - 1)
    assert reader.finished and reader.error is None


def test_a_reader_without_drop_after_waits_for_room_and_drops_nothing():
    """drop_after None (a file): before the consumer takes frame k, the reader has already tried to queue frame
    k + capacity into the full queue; it waits, and every frame comes through once, in order."""
    count, capacity = 12, 2
    reader = WatchedReader("/videos/file.mp4", numbered(count), capacity, None, threading.Event(), str)
    items = []
    for k in range(count):
        if k + capacity < count:
            reader.wait_for_attempts(k + capacity + 1)  # frame k + capacity waits for room
        else:
            reader.thread.join(WAIT)  # the last frames are all queued
        items.append(reader.take())
    assert levels(items) == list(range(count)) and [item.dropped for item in items] == [0] * count
    assert reader.finished


# ---- which sources may drop -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source, drops", [
    ("/videos/file.mp4", False), ("http://127.0.0.1:9/v.mp4", False), ("https://127.0.0.1:9/v.mp4", False),
    ("rtsp://127.0.0.1:9/cam", True), ("rtmp://127.0.0.1:9/cam", True), ("udp://127.0.0.1:9", True),
    ("tcp://127.0.0.1:9", True), ("srt://127.0.0.1:9", True), ("/dev/video0", True),
])
def test_only_sources_without_an_end_may_drop_and_then_after_one_grid_step(monkeypatch, source, drops):
    """README "Runtime": files never drop, http(s) files included (they are read at the speed of the model); a source
    without an end drops once its queue has stayed full for one grid step (grid of 4 frames in 0.2 s: 0.05 s)."""
    made = []

    class Recorded(StreamReader):
        def __init__(self, source, open_frames, capacity, drop_after, wake, unexpected):
            made.append(drop_after)
            super().__init__(source, numbered(0), capacity, drop_after, wake, unexpected)

    monkeypatch.setattr(recognizer_module, "StreamReader", Recorded)
    finishes_within(WAIT, list, Recognizer(EchoBackend(), window=0.2, stride=0.1).stream_many([source]))
    assert made == [pytest.approx(0.05) if drops else None]


# ---- the recognizer's accounting ------------------------------------------------------------------------------------
class HeldEcho(EchoBackend):
    """EchoBackend whose first frame-encoder call waits for `release`; records the level of every frame it encodes."""

    def __init__(self, release: threading.Event):
        super().__init__()
        self.release, self.encoded = release, []

    def encode_frames(self, frames):
        if not self.encoded:
            assert self.release.wait(WAIT), "the source was never read to its end"
        self.encoded += [int(frame[0, 0, 0]) for frame in frames]
        return super().encode_frames(frames)


def test_a_live_source_the_model_cannot_keep_up_with_drops_its_oldest_frames_and_counts_every_one(monkeypatch):
    """The model is held at its first call until the camera's 40 grid frames have all been read: the frames taken
    before (a, 1 to 4 of them) are encoded, the reader's queue (4 frames) keeps the newest, and every frame in between
    is dropped and counted once, in a window record and in the summary; drops are not gaps."""
    count, read = 40, threading.Event()

    def camera(source, rate, size, *args, **kwargs):
        for k in range(count):
            yield k / rate, np.full((size, size, 3), k, np.uint8)
        read.set()

    monkeypatch.setattr(recognizer_module, "iter_grid_frames", camera)
    backend = HeldEcho(read)
    records = finishes_within(WAIT, list, Recognizer(backend, window=0.02, stride=0.01).stream_many(["rtsp://127.0.0.1:9/cam"]))
    taken_first = backend.encoded.index(count - 4)  # a: the frames encoded before the hold
    assert 1 <= taken_first <= 4 and backend.encoded == [*range(taken_first), *range(count - 4, count)]
    windows, summary = records[:-1], records[-1]
    assert summary["dropped"] == count - 4 - taken_first == sum(w["dropped"] for w in windows)
    assert summary["gaps"] == 0 and all("gap_before" not in w and w["latency_s"] >= 0 for w in windows)


def test_a_file_is_read_at_the_models_pace_and_drops_nothing(monkeypatch):
    """The same with a file: the model is held until the reader holds a frame its full queue cannot take; the reader
    waits (a file has no drop_after), and all 40 frames are encoded, in order."""
    count, readers = 40, []

    class Watched(WatchedReader):
        def __init__(self, *args):
            super().__init__(*args)
            readers.append(self)

    class HeldUntilFull(EchoBackend):
        encoded: list = []

        def encode_frames(self, frames):
            if not self.encoded:  # the queue (4 frames) is full and one more frame waits to go in
                readers[0].wait_for_attempts(len(frames) + 4 + 1)
            self.encoded += [int(frame[0, 0, 0]) for frame in frames]
            return super().encode_frames(frames)

    def file(source, rate, size, *args, **kwargs):
        return ((k / rate, np.full((size, size, 3), k, np.uint8)) for k in range(count))

    monkeypatch.setattr(recognizer_module, "iter_grid_frames", file)
    monkeypatch.setattr(recognizer_module, "StreamReader", Watched)
    backend = HeldUntilFull()
    records = finishes_within(WAIT, list, Recognizer(backend, window=0.02, stride=0.01).stream_many(["/videos/file.mp4"]))
    assert backend.encoded == list(range(count)) and readers[0].drop_after is None
    assert records[-1]["dropped"] == 0 and all(w["dropped"] == 0 for w in records[:-1])


class ScriptedReader:
    """Stands in for StreamReader: the grid frames of `kept` (indices k, at k / rate seconds) ready at once, each
    carrying the count of indices missing just before it, as a reader that dropped them would hand them over."""

    def __init__(self, kept, rate):
        items, previous = [], -1
        for k in kept:
            items.append(GridItem(k / rate, np.full((32, 32, 3), k, np.uint8), "all", 0.0, dropped=k - previous - 1))
            previous = k
        self.items, self.error = deque(items), None
        self.thread = threading.Thread(target=lambda: None)
        self.thread.start()

    def take(self):
        return self.items.popleft() if self.items else None

    @property
    def finished(self):
        return not self.items

    def stop(self):
        pass


def test_drops_are_counted_per_window_length_since_that_lengths_last_window(monkeypatch):
    """Windows of 2 and 4 s (F = 4: grid 2 per second, spans 4 and 8 grid frames), a window every 2 grid frames. Of grid
    frames 0-19, 5 and 6 are dropped (frame 7 carries 2) and 13 (frame 14 carries 1). By hand, with n the frames
    encoded so far: 2 s windows at n = 4, 6, ..., 16 (they end at frames 3, 7, 9, 11, 14, 16, 18); 4 s windows at
    n = 8, ..., 16. A window counts the drops since the previous window of its own length:
      2 s: 0, 2 (frame 7), 0, 0, 1 (frame 14), 0, 0;   4 s: 2 (frames 5-6, before its first window), 0, 1, 0, 0."""
    kept = [k for k in range(20) if k not in (5, 6, 13)]
    monkeypatch.setattr(recognizer_module, "StreamReader", lambda *args: ScriptedReader(kept, 2.0))
    records = finishes_within(WAIT, list, Recognizer(EchoBackend(), window=[2.0, 4.0], stride=1.0).stream_many(["rtsp://cam"]))
    dropped = {scale: [r["dropped"] for r in records if r["scale"] == scale and not r.get("summary")] for scale in (2.0, 4.0)}
    assert dropped == {2.0: [0, 2, 0, 0, 1, 0, 0], 4.0: [2, 0, 1, 0, 0]}
    ends = [r["end"] for r in records if r["scale"] == 2.0 and not r.get("summary")]
    assert ends == [(k + 1) / 2 for k in (3, 7, 9, 11, 14, 16, 18)]
    summaries = [r for r in records if r.get("summary")]
    assert [(s["scale"], s["dropped"], s["gaps"]) for s in summaries] == [(2.0, 3, 0), (4.0, 3, 0)]
