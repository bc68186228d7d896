"""Stream-mode evaluation (`cmdcl-eval --mode stream`): how well the windows a stream gives match the labels.

For each configuration (window, stride) the stream path (Recognizer.stream_many) runs over the dataset's
videos, and video mode (Recognizer.predict_many) once, both on one backend. With target "label" (single-label
data) it reports the top-1 of every window against its video's label, the top-1 of each video's stream summary,
and how often the summary's top-1 class is video mode's. With target "segments" a window's targets are the
classes of the annotated segments that overlap [start, end] (none: a negative for every class), and the
window and summary figures are mAP (cmdcl.train.metrics). A video that fails in either mode is left out of
every figure and listed under "skipped".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..data.manifest import VideoDataset, VideoEntry
from ..model.config import SAMPLING_LIMITS
from .metrics import mean_average_precision, topk_accuracy

MAX_CONFIGS = 16  # --window/--stride pairs one run may compare
MAX_SECONDS = SAMPLING_LIMITS["window_seconds"][1]  # the longest window a model may record; strides too


@dataclass(frozen=True)
class StreamConfig:
    window: float | None  # seconds; None: the model's window
    stride: float | None  # seconds; None: the model's default stride


def parse_configs(windows: Sequence[float], strides: Sequence[float]) -> list[StreamConfig]:
    """`--window`/`--stride` values (positive seconds) paired in order: as many strides as windows, one stride for
    every window, or none (the model's default stride). No window: one configuration with the model's window."""
    ws, ss = [float(w) for w in windows], [float(s) for s in strides]
    for option, values in (("--window", ws), ("--stride", ss)):
        if len(values) > MAX_CONFIGS:
            raise ValueError(f"{option}: at most {MAX_CONFIGS} values")
        if any(not 0 < value <= MAX_SECONDS for value in values):  # NaN fails this too
            raise ValueError(f"{option}: every value must be a number of seconds in (0, {MAX_SECONDS:g}]")
    if not ws:
        if len(ss) > 1:
            raise ValueError(f"--stride: {len(ss)} strides but no --window (one stride goes with the model's window)")
        return [StreamConfig(None, ss[0] if ss else None)]
    if len(ss) not in (0, 1, len(ws)):
        raise ValueError(f"--stride: {len(ss)} strides for {len(ws)} windows (give one per window, one for all, or none)")
    return [StreamConfig(w, ss[0] if len(ss) == 1 else ss[i] if ss else None) for i, w in enumerate(ws)]


def overlapping(entry: VideoEntry, start: float, end: float, index: dict[str, int]) -> list[int]:
    """Class indices of the segments of `entry` that overlap [start, end] for a positive time."""
    return sorted({index[s.name] for s in entry.segments if s.start < end and s.end > start})


def _scores(record: dict, index: dict[str, int]) -> np.ndarray:
    """A record's probabilities as a vector over the classes (its "top" lists every class)."""
    scores = np.zeros(len(index), dtype=np.float32)
    for item in record["top"]:
        scores[index[item["label"]]] = item["score"]
    return scores


def _check_dataset(dataset: VideoDataset, classes: list[str], target: str) -> dict[str, int]:
    """Class name -> index; raises ValueError (one line) for data this evaluation cannot score."""
    index = {name: i for i, name in enumerate(classes)}
    if target == "label" and dataset.multi_label:
        raise ValueError(f"{dataset.source}: videos with several labels; stream evaluation scores windows against one label "
                         "per video (use --target segments for mAP over the segments each window overlaps)")
    if target == "segments":
        for entry in dataset.entries:
            unknown = next((s.name for s in entry.segments if s.name not in index), None)
            if unknown is not None:
                raise ValueError(f"{entry.listed_at or entry.path}: segment {unknown!r:.60} is not among the model's "
                                 f"{len(classes)} classes (--target segments needs a model trained on the segment labels)")
        if not any(entry.segments for entry in dataset.entries):
            raise ValueError(f"{dataset.source}: no video has annotated segments (needed by --target segments)")
    return index


def _hot(labels: list[int], num_classes: int) -> np.ndarray:
    row = np.zeros(num_classes, dtype=np.float32)
    row[labels] = 1.0
    return row


def evaluate_stream(make_recognizer, dataset: VideoDataset, configs: list[StreamConfig], target: str = "label") -> dict:
    """The figures of the module docstring for every configuration.

    `make_recognizer(window, stride)` gives a Recognizer (window/stride None: the model's defaults, both None:
    the one for video mode) whose records list every class ("top" of all classes, no threshold). Every
    configuration's recognizer is made first, so that one the model cannot take fails before any video is decoded."""
    video_mode = make_recognizer(None, None)
    recognizers = [make_recognizer(config.window, config.stride) for config in configs]
    classes = list(video_mode.info.classes)
    index = _check_dataset(dataset, classes, target)
    entries = {str(e.path): e for e in dataset.entries}
    videos, skipped = {}, {}  # path -> video mode's scores; path -> reason
    for record in video_mode.predict_many(list(entries)):
        if "error" in record:
            skipped[record["video"]] = record["error"]
        else:
            videos[record["video"]] = _scores(record, index)
    runs = []
    for recognizer in recognizers:
        windows, summaries = {}, {}  # path -> [(start, end, scores)]; path -> summary scores
        for record in recognizer.stream_many(list(entries)):
            path = record["video"]
            if "error" in record:
                skipped.setdefault(path, record["error"])
            elif record.get("summary"):
                summaries[path] = _scores(record, index)
            else:
                windows.setdefault(path, []).append((record["start"], record["end"], _scores(record, index)))
        runs.append((recognizer, windows, summaries))
    kept = [p for p in entries if p in videos and p not in skipped and all(p in s for *_, s in runs)]
    if not kept:
        raise ValueError(f"{dataset.source}: no video could be read in both video and stream mode")

    def targets(path, start: float = -math.inf, end: float = math.inf):
        """What a clip of `path` spanning [start, end] (the whole video by default) is scored against."""
        if target == "label":
            return entries[path].labels[0]
        return _hot(overlapping(entries[path], start, end, index), len(classes))

    def metric(scores: list[np.ndarray], targets: list) -> float:
        scores_t = torch.from_numpy(np.stack(scores))
        if target == "label":
            return topk_accuracy(scores_t, torch.tensor(targets), 1)
        return mean_average_precision(scores_t, torch.from_numpy(np.stack(targets)))[0]

    name = "top1" if target == "label" else "mAP"
    vid_targets = [targets(p) for p in kept]
    video_top = np.stack([videos[p] for p in kept]).argmax(axis=1)
    report = {"mode": "stream", "target": target, "videos": len(kept), "classes": len(classes), "metric": name,
              f"video_{name}": metric([videos[p] for p in kept], vid_targets), "configs": []}
    for recognizer, windows, summaries in runs:
        window_scores, window_targets = [], []
        for p in kept:
            for start, end, scores in windows.get(p, []):
                window_scores.append(scores)
                window_targets.append(targets(p, start, end))
        summary_top = np.stack([summaries[p] for p in kept]).argmax(axis=1)
        report["configs"].append({
            "window": recognizer.window, "stride": recognizer.stride, "windows": len(window_scores),
            f"window_{name}": metric(window_scores, window_targets),
            f"summary_{name}": metric([summaries[p] for p in kept], vid_targets),
            "agreement": float((summary_top == video_top).mean()),
        })
    report["skipped"] = [{"video": p, "error": e} for p, e in skipped.items()]
    return report


def format_stream_report(report: dict) -> str:
    """The report as a table: one row per configuration, figures in percent."""
    name = report["metric"]
    title = "top-1" if name == "top1" else "mAP"
    lines = [f"videos {report['videos']}  classes {report['classes']}  target {report['target']}  "
             f"video mode {title} {100 * report[f'video_{name}']:.2f}",
             f"{'window s':>9}  {'stride s':>9}  {'windows':>7}  {'window ' + title:>12}  {'summary ' + title:>13}  {'agreement':>9}"]
    for c in report["configs"]:
        lines.append(f"{c['window']:>9.4g}  {c['stride']:>9.4g}  {c['windows']:>7}  {100 * c[f'window_{name}']:>12.2f}  "
                     f"{100 * c[f'summary_{name}']:>13.2f}  {100 * c['agreement']:>9.2f}")
    return "\n".join(lines)
