"""`Recognizer`: video mode and stream mode on top of a Backend, as JSON-ready records.

Records (one JSON object each, see README "Runtime"):

    window   {"video", "start", "end", "scale", "top": [{"label", "score"}], "window": i, "decode", "dropped", "latency_s"}
    summary  {"video", "summary": true, "mode", "scale", "start", "end", "top", ...}  (stream mode: one per scale)
    failure  {"video", "summary": true, "error": "<reason>"}

Video mode classifies F frames sampled over the whole file (`read_clip`) with
the full graph, `batch` files per call, while `workers` processes decode the
next files (see `cmdcl.runtime.decode_pool`). Stream mode samples a fixed time grid
(F frames per `window` seconds), encodes each grid frame once, keeps its
tokens in a ring buffer and classifies a window every `stride` seconds with
the head graph, batching the windows of all sources that are due into one
head call. Each source is read in its own thread (`StreamReader`), so one
that stalls delays no other; a live source the model cannot keep up with
drops its oldest grid frames (`"dropped"`), a file never does. A window's
`"decode"` is "keyframes" when all its frames were keyframes decoded alone
(see `iter_grid_frames`), and `"latency_s"` the wall time from the arrival of
its last frame to the record. It reads at most `max_open_sources()` files at
once (the others wait their turn). A gap in a source's time (see `cmdcl.data.video.max_gap`) starts the
ring buffer again: no window spans it, the first window after it carries
`"gap_before": seconds`, and the summary counts `"gaps"`.

Several window lengths (scales) W_1 < ... < W_n share one stream: the grid is the shortest
window's (F frames per W_1 seconds), the ring buffer keeps the last round(F * W_n / W_1) grid
frames' tokens, and at each stride step every scale whose window has filled since the ring
(re)started takes F tokens from its part of the ring (`window_positions`): one more window in
the head call per scale, no more encoding. Each window and summary record names its "scale"
(docs/design.md section 5).

Whatever goes wrong while reading one input, even a bug, becomes that input's
failure record and the other inputs go on.
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np

from ..artifacts import stream_grid, window_positions, window_scales
from ..data.video import (
    DEFAULT_TIMEOUT,
    RUNTIME_SAMPLING,
    SAMPLINGS,
    Reconnect,
    VideoError,
    is_endless,
    is_live,
    iter_grid_frames,
    list_videos,
    read_clip,
)
from .backends import Backend, load_backend
from .decode_pool import Failure, check_workers, decoded_in_order, default_workers
from .stream_readers import StreamReader

ENCODER_BATCH = 64  # most frames per frame-encoder call
MAX_OPEN_SOURCES = 64  # most files stream mode reads at once (fewer under a low open-files limit)
READER_WAIT = 1.0  # seconds stream mode waits for its readers before it looks again (a reader wakes it sooner)
READER_STOP_SECONDS = 2.0  # how long a finished or interrupted stream_many waits for its readers to end


def max_open_sources() -> int:
    """Files stream mode reads at once: MAX_OPEN_SOURCES, or an eighth of the
    open-files limit (RLIMIT_NOFILE) when that is lower, leaving room for the
    model's and the output's files."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):  # no such limit on this platform
        return MAX_OPEN_SOURCES
    return MAX_OPEN_SOURCES if soft == resource.RLIM_INFINITY else max(1, min(MAX_OPEN_SOURCES, soft // 8))


class Recognizer:
    """Classify videos and streams with a CMDCL model.

    `engine` is a model file (.onnx, .plan, .pt), an already loaded Backend, or
    None for the bundled demo model on ONNX Runtime CPU. `window`/`stride`
    (seconds) default to the model's recorded sampling; `window` may be several
    lengths (see `window_scales`), each a scale of stream mode. Multi-label models
    report every label whose score is >= `threshold` (default 0.5);
    single-label models the `top_k` best, dropping those under `threshold`.
    Network sources get `timeout` seconds to open and to send each packet;
    `debug` prints the traceback of an unexpected error on stderr (it still
    becomes that input's failure record). Video mode samples frames with
    `sampling` ("keyframe", the default, or "exact" as training does; see
    read_clip) and decodes files in `workers` processes (None: one per usable
    core; 1: in this process).
    Stream mode decodes only keyframes where they come once per grid step,
    unless `keyframe_grid` is False (see iter_grid_frames)."""

    def __init__(self, engine=None, backend: str = "auto", device: str = "cpu", top_k: int = 5, threshold: float | None = None,
                 window: float | None = None, stride: float | None = None, batch: int = 1, reconnect: Reconnect | None = None,
                 timeout: float = DEFAULT_TIMEOUT, debug: bool = False, sampling: str = RUNTIME_SAMPLING, workers: int | None = None,
                 keyframe_grid: bool = True):
        self.backend = engine if isinstance(engine, Backend) else load_backend(engine, backend, device)
        info = self.backend.info
        self.info = info
        if top_k < 1 or batch < 1:
            raise ValueError("top_k and batch must be >= 1")
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}, not {sampling!r}")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.top_k, self.batch = top_k, batch
        self.threshold = threshold if threshold is not None or not info.multi_label else 0.5
        self.scales = window_scales(info.window_seconds if window is None else window, info.num_frames)
        self.window = self.scales[0]  # the shortest: its F frames set the grid
        self.stride = float(stride or info.stride_seconds)
        if not (math.isfinite(self.stride) and self.stride > 0):
            raise ValueError(f"stride must be a positive number of seconds, got {self.stride:g}")
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout:g}")
        # grid frames per second, the grid frames each scale's window spans (the ring keeps the longest), the stride
        self.grid_rate, self.spans, self.stride_frames = stream_grid(info.num_frames, self.scales, self.stride)
        self.reconnect = reconnect or Reconnect()
        self.timeout, self.debug = timeout, debug
        self.keyframe_grid = keyframe_grid
        self.workers = default_workers() if workers is None else check_workers(workers)
        self.sampling = sampling

    def _unexpected(self, exc: Exception) -> str:
        """The failure text for an error no reader anticipated (a bug, or a
        resource running out); with `debug` its traceback goes to stderr too."""
        return self._reason(Failure.of(exc))

    def _reason(self, failure: Failure) -> str:
        """A failure's text for its record; with `debug`, an unexpected error's traceback goes to stderr."""
        if self.debug and failure.traceback:
            print(failure.traceback, end="", file=sys.stderr)
        return failure.reason

    # ---- scores to labels ----------------------------------------------------------------
    def top(self, probabilities: np.ndarray) -> list[dict]:
        order = np.argsort(-probabilities, kind="stable")
        if not self.info.multi_label:
            order = order[: self.top_k]
        if self.threshold is not None:  # a NaN score stays: the record becomes an error record (output.valid_record)
            order = [i for i in order if not probabilities[i] < self.threshold]
        return [{"label": self.info.classes[i], "score": round(float(probabilities[i]), 6)} for i in order]

    # ---- video mode ----------------------------------------------------------------------
    def _read_clip(self, path):
        return read_clip(path, self.info.num_frames, self.info.image_size, timeout=self.timeout, sampling=self.sampling)

    def predict(self, path) -> dict:
        """The summary record of one video (decoded here); raises VideoError for a file it cannot read."""
        return self._video_records([(path, self._read_clip(path))])[0]

    def predict_many(self, paths: Iterable) -> Iterator[dict]:
        """Summary records in input order, `batch` videos per model call, the
        next files decoding meanwhile (`workers`, at most `batch + 2 * workers`
        clips ahead); a file that cannot be read (for whatever reason, its
        decoding process killed included) gives a failure record and the others go on.
        Closing the iterator stops the decoding processes."""
        paths = list(paths)
        decoded = decoded_in_order(paths, self._read_clip, self.workers, ahead=self.batch + 2 * self.workers)
        with contextlib.closing(decoded):
            for start in range(0, len(paths), self.batch):
                chunk = [next(decoded) for _ in paths[start : start + self.batch]]
                clips = [(path, clip) for path, clip in chunk if not isinstance(clip, Failure)]
                records = iter(self._video_records(clips) if clips else [])
                for path, clip in chunk:
                    if isinstance(clip, Failure):
                        yield {"video": str(path), "summary": True, "error": self._reason(clip)}
                    else:
                        yield next(records)

    def _video_records(self, clips: list) -> list[dict]:
        logits = self.backend.classify_clips(np.stack([clip.frames for _, clip in clips]))
        records = []
        for (path, clip), probabilities in zip(clips, self.backend.probabilities(logits)):
            records.append({"video": str(path), "summary": True, "mode": "video", "start": 0.0, "end": round(clip.duration, 3),
                            "top": self.top(probabilities), "frames": len(clip.frames),
                            "frames_decoded": clip.frames_decoded, "keyframes": clip.keyframes, "strategy": clip.strategy,
                            "timestamp_restarts": clip.restarts})
        return records

    # ---- stream mode ---------------------------------------------------------------------
    def stream(self, source) -> Iterator[dict]:
        """Window records then the summary of one source; VideoError when it fails
        (after the windows it did produce)."""
        for record in self.stream_many([source]):
            if "error" in record:
                raise VideoError(source, record["error"])
            yield record

    def stream_many(self, sources: Iterable) -> Iterator[dict]:
        """Window and summary records of several sources, windows batched into one head call.

        Each source is read by its own thread (see `cmdcl.runtime.stream_readers`),
        so a source that stalls or reconnects never holds up another's windows;
        each step encodes the grid frames that are ready, from every source in one
        batch, and classifies the windows due. At most `max_open_sources()` files
        are read at once, the others waiting their turn; endless sources (rtsp,
        devices, ...) all start at once, as they would never make room."""
        f, step, limit = self.info.num_frames, 1.0 / self.grid_rate, max_open_sources()
        sources = list(sources)
        waiting = deque(s for s in sources if not is_endless(s))
        wake = threading.Event()  # set by a reader with a new frame, or at its end
        active: list[_Stream] = []
        try:
            active += [self._open_stream(s, wake) for s in sources if is_endless(s)]
            while active or waiting:
                while waiting and sum(not is_endless(s.source) for s in active) < limit:
                    active.append(self._open_stream(waiting.popleft(), wake))
                wake.clear()  # before taking: a frame that comes later wakes the wait below
                took = False
                for stream in active:  # only what its next window still needs, so that the window ends where it should
                    needed = f - len(stream.tokens) if stream.fresh else self.stride_frames - stream.new
                    took |= stream.pull(min(needed, ENCODER_BATCH), step)  # a stride longer than ENCODER_BATCH: in parts
                pending = [(stream, item) for stream in active for item in stream.pending]
                for start in range(0, len(pending), ENCODER_BATCH):
                    chunk = pending[start : start + ENCODER_BATCH]
                    tokens = self.backend.encode_frames(np.stack([item.frame for _, item in chunk]))
                    for (stream, item), token in zip(chunk, tokens):
                        item.frame = None  # the ring buffer keeps the tokens, not the pixels
                        stream.tokens.append((item, token))
                        stream.new += 1
                for stream in active:
                    stream.pending.clear()
                due = [(s, k) for s in active for k in s.due_scales(self.stride_frames)]  # k: the scale's index
                if due:
                    windows = [s.window(k) for s, k in due]
                    logits = self.backend.classify_tokens(np.stack([np.stack([token for _, token in w]) for w in windows]))
                    for (stream, k), window, probabilities in zip(due, windows, self.backend.probabilities(logits)):
                        yield stream.window_record(k, window, probabilities, self.top(probabilities), step)
                ended = [s for s in active if s.ended]
                for stream in ended:
                    yield from stream.summaries(self.top, step)
                    active.remove(stream)
                for stream in active:
                    stream.restart_after_gap(step)
                if not took and not ended:
                    wake.wait(READER_WAIT)
        finally:  # done, stopped by the consumer, or Ctrl-C: no reader goes on
            for stream in active:
                stream.reader.stop()
            # and none is left decoding while the interpreter exits (which can abort the process): a reader ends at its
            # next frame; one in a network read may take until its timeout, so the wait is bounded
            deadline = time.monotonic() + READER_STOP_SECONDS
            for stream in active:
                stream.reader.thread.join(max(0.0, deadline - time.monotonic()))

    def _open_stream(self, source, wake: threading.Event) -> _Stream:
        def open_frames(sleep, status):
            return iter_grid_frames(source, self.grid_rate, self.info.image_size, self.reconnect, sleep=sleep, timeout=self.timeout,
                                    keyframes=self.keyframe_grid, status=status)

        capacity = min(ENCODER_BATCH, max(self.info.num_frames, self.stride_frames))
        drop_after = 1.0 / self.grid_rate if is_endless(source) else None  # a live source: its next frame is due in one grid step
        reader = StreamReader(source, open_frames, capacity, drop_after, wake, self._unexpected)
        return _Stream(source, reader, self.info.num_frames, self.scales, self.spans)


class _Stream:
    """One source's state in stream mode: its reader, grid frames not yet
    encoded, the ring buffer of the last frames' (GridItem, tokens) (as many as the
    longest window spans), and per window scale the running sum of its window scores
    (for its summary; nothing grows with the stream's length)."""

    def __init__(self, source, reader: StreamReader, num_frames: int, scales: tuple, spans: tuple):
        self.source, self.reader = str(source), reader
        self.pending: list = []  # GridItems taken, not yet encoded
        self.tokens: deque = deque(maxlen=spans[-1])
        self.num_frames, self.scales, self.spans = num_frames, scales, spans
        self.new = 0  # frames encoded since the last window
        self.fresh = True  # no window since the ring buffer (re)started
        self.last_time = None
        self.windows, self.score_sums = [0] * len(scales), [0.0] * len(scales)  # per scale
        self.after_gap, self.gap_before, self.gaps = None, None, 0  # the grid frame after a gap, held back; the gap; gaps so far
        self.gap_unreported = [False] * len(scales)  # per scale: the gap is for its next window's record
        self.dropped_total = 0  # grid frames the reader dropped
        self.dropped_before = [0] * len(scales)  # per scale: dropped_total at its last window
        self.ended, self.error = False, None

    def pull(self, count: int, step: float) -> bool:
        """Take the grid frames the reader has ready until `count` are pending or a
        gap (a jump of more than one grid `step`, frames dropped aside) comes: the
        frame after it waits. True when it took any."""
        took = False
        while self.after_gap is None and len(self.pending) < count:
            item = self.reader.take()
            if item is None:
                break
            took = True
            self.dropped_total += item.dropped
            if self.last_time is not None and item.t - self.last_time > (item.dropped + 1.5) * step:
                self.after_gap = item
            else:
                self.pending.append(item)
                self.last_time = item.t
        if self.after_gap is None and self.reader.finished:
            self.ended, self.error = True, self.reader.error
        return took

    def due_scales(self, stride_frames: int) -> list[int]:
        """The scales (indices) with a window due: at a stride step (`stride_frames`
        after the last window, or the first window since the ring buffer (re)started),
        each scale whose window's frames have all come since then. A part shorter than
        the shortest window (the source ended or a gap came) gets one window of the
        shortest scale, repeating its frames."""
        held = len(self.tokens)
        if held >= self.spans[0]:
            return [k for k, span in enumerate(self.spans) if held >= span] if self.fresh or self.new >= stride_frames else []
        return [0] if self.fresh and held > 0 and (self.ended or self.after_gap is not None) else []

    def restart_after_gap(self, step: float) -> None:
        """After a gap: the ring buffer starts again with the frame held back, for every scale."""
        if self.after_gap is None:
            return
        item = self.after_gap
        self.gap_before, self.gaps = round(item.t - self.last_time - step, 3), self.gaps + 1
        self.gap_unreported = [True] * len(self.scales)
        self.tokens.clear()
        self.fresh, self.new, self.after_gap = True, 0, None
        self.pending.append(item)
        self.last_time = item.t

    def window(self, k: int) -> list:
        """Scale k's window: the (GridItem, tokens) at `window_positions` of its span, the last frames of the ring buffer
        (all of them in a part shorter than the span). Reads only the span, not the whole ring."""
        span = list(islice(reversed(self.tokens), self.spans[k]))[::-1]
        return [span[i] for i in window_positions(self.num_frames, len(span))]

    def window_record(self, k: int, window: list, probabilities: np.ndarray, top: list, step: float) -> dict:
        """Scale k's record of `window` (see `window`), from the first to the last grid frame of its span; "latency_s"
        runs from its last frame's arrival from the reader to now."""
        first, last = self.tokens[-min(self.spans[k], len(self.tokens))][0], self.tokens[-1][0]
        record = {"video": self.source, "start": round(first.t, 3), "end": round(last.t + step, 3), "scale": self.scales[k],
                  "top": top, "window": self.windows[k],
                  "decode": "keyframes" if all(item.decode == "keyframes" for item, _ in window) else "all",
                  "dropped": self.dropped_total - self.dropped_before[k], "latency_s": round(time.monotonic() - last.arrival, 3)}
        if self.gap_unreported[k]:
            record["gap_before"], self.gap_unreported[k] = self.gap_before, False
        if k == 0:  # the shortest scale's window is at every stride step: the next step counts from here
            self.new, self.fresh = 0, False
        self.windows[k], self.dropped_before[k] = self.windows[k] + 1, self.dropped_total
        self.score_sums[k] = self.score_sums[k] + probabilities
        return record

    def summaries(self, top, step: float) -> Iterator[dict]:
        """One summary per scale, shortest first: the mean of its window scores. A source shorter than a longer scale's
        window has no window of it (its summary says "windows": 0); a source with no window at all failed."""
        for k, scale in enumerate(self.scales):
            record = {"video": self.source, "summary": True, "mode": "stream", "scale": scale}
            if self.windows[k]:
                record.update(start=0.0, end=round(self.last_time + step, 3), top=top(self.score_sums[k] / self.windows[k]),
                              windows=self.windows[k], gaps=self.gaps, dropped=self.dropped_total)
            if self.error or not self.windows[0]:
                record["error"] = self.error or "undecodable (no frame decoded)"
            elif not self.windows[k]:
                record.update(top=[], windows=0)
            yield record


def expand_inputs(inputs: Iterable) -> list:
    """Directories become the video files under them; files and stream URLs stay."""
    expanded = []
    for item in inputs:
        if not is_live(item) and Path(item).is_dir():
            expanded += list_videos(item)
        else:
            expanded.append(item)
    return expanded
