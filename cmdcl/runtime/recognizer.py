"""`Recognizer`: video mode and stream mode on top of a Backend, as JSON-ready records.

Records (one JSON object each, see README "Runtime"):

    window   {"video", "start", "end", "top": [{"label", "score"}], "window": i}
    summary  {"video", "summary": true, "mode", "start", "end", "top", ...}
    failure  {"video", "summary": true, "error": "<reason>"}

Video mode classifies F frames sampled over the whole file (`read_clip`) with
the full graph, `batch` files per call. Stream mode samples a fixed time grid
(F frames per `window` seconds), encodes each grid frame once, keeps its
tokens in a ring buffer and classifies a window every `stride` seconds with
the head graph, batching the windows of all sources into one head call.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ..data.video import Reconnect, VideoError, is_live, iter_grid_frames, list_videos, read_clip
from .backends import Backend, load_backend

ENCODER_BATCH = 64  # most frames per frame-encoder call


class Recognizer:
    """Classify videos and streams with a CMDCL model.

    `engine` is a model file (.onnx, .plan, .pt), an already loaded Backend, or
    None for the bundled demo model on ONNX Runtime CPU. `window`/`stride`
    (seconds) default to the model's recorded sampling. Multi-label models
    report every label whose score is >= `threshold` (default 0.5);
    single-label models the `top_k` best, dropping those under `threshold`."""

    def __init__(self, engine=None, backend: str = "auto", device: str = "cpu", top_k: int = 5, threshold: float | None = None,
                 window: float | None = None, stride: float | None = None, batch: int = 1, reconnect: Reconnect | None = None):
        self.backend = engine if isinstance(engine, Backend) else load_backend(engine, backend, device)
        info = self.backend.info
        self.info = info
        if top_k < 1 or batch < 1:
            raise ValueError("top_k and batch must be >= 1")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.top_k, self.batch = top_k, batch
        self.threshold = threshold if threshold is not None or not info.multi_label else 0.5
        self.window = float(window or info.window_seconds)
        self.stride = float(stride or info.stride_seconds)
        if self.window <= 0 or self.stride <= 0:
            raise ValueError("window and stride must be positive")
        self.grid_rate = info.num_frames / self.window  # grid frames per second
        self.stride_frames = max(1, round(self.stride * self.grid_rate))
        self.reconnect = reconnect or Reconnect()

    # ---- scores to labels ----------------------------------------------------------------
    def top(self, probabilities: np.ndarray) -> list[dict]:
        order = np.argsort(-probabilities, kind="stable")
        if not self.info.multi_label:
            order = order[: self.top_k]
        if self.threshold is not None:
            order = [i for i in order if probabilities[i] >= self.threshold]
        return [{"label": self.info.classes[i], "score": round(float(probabilities[i]), 6)} for i in order]

    # ---- video mode ----------------------------------------------------------------------
    def predict(self, path) -> dict:
        """The summary record of one video; raises VideoError for a file it cannot read."""
        clip = read_clip(path, self.info.num_frames, self.info.image_size)
        return self._video_records([(path, clip)])[0]

    def predict_many(self, paths: Iterable) -> Iterator[dict]:
        """Summary records in input order, `batch` videos per model call; a file
        that cannot be read gives a failure record and the others go on."""
        paths = list(paths)
        for start in range(0, len(paths), self.batch):
            chunk, clips, failures = paths[start : start + self.batch], [], {}
            for path in chunk:
                try:
                    clips.append((path, read_clip(path, self.info.num_frames, self.info.image_size)))
                except VideoError as exc:
                    failures[str(path)] = {"video": str(path), "summary": True, "error": exc.reason}
            records = iter(self._video_records(clips) if clips else [])
            for path in chunk:
                yield failures.get(str(path)) or next(records)

    def _video_records(self, clips: list) -> list[dict]:
        logits = self.backend.classify_clips(np.stack([clip.frames for _, clip in clips]))
        records = []
        for (path, clip), probabilities in zip(clips, self.backend.probabilities(logits)):
            records.append({"video": str(path), "summary": True, "mode": "video", "start": 0.0, "end": round(clip.duration, 3),
                            "top": self.top(probabilities), "frames": len(clip.frames),
                            "frames_decoded": clip.frames_decoded, "strategy": clip.strategy})
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
        """Window and summary records of several sources, windows batched into one head call."""
        f = self.info.num_frames
        active = [_Stream(s, iter_grid_frames(s, self.grid_rate, self.info.image_size, self.reconnect), f) for s in sources]
        while active:
            for stream in active:
                stream.pull(f - len(stream.tokens) if not stream.windows else self.stride_frames)
            pending = [(stream, frame) for stream in active for frame in stream.pending]
            for start in range(0, len(pending), ENCODER_BATCH):
                chunk = pending[start : start + ENCODER_BATCH]
                tokens = self.backend.encode_frames(np.stack([frame for _, (_, frame) in chunk]))
                for (stream, (t, _)), token in zip(chunk, tokens):
                    stream.tokens.append((t, token))
                    stream.new += 1
            for stream in active:
                stream.pending.clear()
            due = [s for s in active if len(s.tokens) == f and (not s.windows or s.new >= self.stride_frames)]
            due += [s for s in active if s.ended and not s.windows and 0 < len(s.tokens) < f]  # short: repeat frames
            if due:
                logits = self.backend.classify_tokens(np.stack([s.window_tokens() for s in due]))
                for stream, probabilities in zip(due, self.backend.probabilities(logits)):
                    yield stream.window_record(probabilities, self.top(probabilities), 1.0 / self.grid_rate)
            for stream in [s for s in active if s.ended]:
                yield stream.summary(self.top, 1.0 / self.grid_rate)
                active.remove(stream)


class _Stream:
    """One source's state in stream mode: grid frames not yet encoded, and the
    ring buffer of the last F frames' (time, tokens)."""

    def __init__(self, source, frames: Iterator, num_frames: int):
        self.source, self.frames = str(source), frames
        self.pending: list = []  # (t, frame) pulled, not yet encoded
        self.tokens: deque = deque(maxlen=num_frames)
        self.num_frames = num_frames
        self.new = 0  # frames encoded since the last window
        self.windows, self.scores, self.last_time = 0, [], None
        self.ended, self.error = False, None

    def pull(self, count: int) -> None:
        """Read grid frames until `count` are pending or the source ends."""
        while not self.ended and len(self.pending) < count:
            try:
                t, frame = next(self.frames)
            except StopIteration:
                self.ended = True
            except VideoError as exc:
                self.ended, self.error = True, exc.reason
            else:
                self.pending.append((t, frame))
                self.last_time = t

    def window_tokens(self) -> np.ndarray:
        tokens = [token for _, token in self.tokens]
        if len(tokens) < self.num_frames:  # a source shorter than one window: repeat frames uniformly
            tokens = [tokens[int((i + 0.5) * len(tokens) / self.num_frames)] for i in range(self.num_frames)]
        return np.stack(tokens)

    def window_record(self, probabilities: np.ndarray, top: list, step: float) -> dict:
        record = {"video": self.source, "start": round(self.tokens[0][0], 3), "end": round(self.tokens[-1][0] + step, 3),
                  "top": top, "window": self.windows}
        self.windows, self.new = self.windows + 1, 0
        self.scores.append(probabilities)
        return record

    def summary(self, top, step: float) -> dict:
        record = {"video": self.source, "summary": True, "mode": "stream"}
        if self.windows:
            record.update(start=0.0, end=round(self.last_time + step, 3), top=top(np.mean(self.scores, axis=0)), windows=self.windows)
        if self.error or not self.windows:
            record["error"] = self.error or "undecodable (no frame decoded)"
        return record


def expand_inputs(inputs: Iterable) -> list:
    """Directories become the video files under them; files and stream URLs stay."""
    expanded = []
    for item in inputs:
        if not is_live(item) and Path(item).is_dir():
            expanded += list_videos(item)
        else:
            expanded.append(item)
    return expanded
