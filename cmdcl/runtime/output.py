"""Where records go: JSON Lines (flushed per record), JSON, CSV; a timeline plot; a labelled video.

JSON Lines is the crash-safe format: every record is one line written and
flushed as it is produced, so a killed run leaves only complete lines. JSON
is one array written when the run ends; CSV is one row per reported label.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

FORMATS = ("jsonl", "json", "csv")
CSV_COLUMNS = ("video", "summary", "start", "end", "rank", "label", "score", "error")


class RecordWriter:
    """Write records to `path` (stdout when None) in `fmt`; use as a context manager."""

    def __init__(self, path=None, fmt: str = "jsonl"):
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
        self.fmt, self.records = fmt, []
        self.file = open(path, "w", newline="", encoding="utf-8") if path else sys.stdout
        self.csv = csv.DictWriter(self.file, CSV_COLUMNS) if fmt == "csv" else None
        if self.csv:
            self.csv.writeheader()

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.fmt == "jsonl":
            self.file.write(json.dumps(record) + "\n")
        elif self.fmt == "csv":
            base = {k: record.get(k, "") for k in ("video", "start", "end", "error")}
            base["summary"] = bool(record.get("summary"))
            rows = [{**base, "rank": i + 1, **entry} for i, entry in enumerate(record.get("top", []))]
            self.csv.writerows(rows or [base])
        self.file.flush()

    def close(self) -> None:
        if self.fmt == "json":
            json.dump(self.records, self.file, indent=1)
            self.file.write("\n")
        self.file.flush()
        if self.file is not sys.stdout:
            self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def plot_timeline(records: list[dict], path) -> Path:
    """Scores of the reported labels over time, one panel per video (window records)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    videos = list(dict.fromkeys(r["video"] for r in records if not r.get("summary")))
    if not videos:
        raise ValueError("no window records to plot (use --mode stream)")
    fig, axes = plt.subplots(len(videos), 1, figsize=(9, 2.6 * len(videos)), squeeze=False)
    for ax, video in zip(axes[:, 0], videos):
        windows = [r for r in records if r["video"] == video and not r.get("summary")]
        mid = [(r["start"] + r["end"]) / 2 for r in windows]
        labels = list(dict.fromkeys(e["label"] for r in windows for e in r["top"]))
        for label in labels:
            scores = [next((e["score"] for e in r["top"] if e["label"] == label), np.nan) for r in windows]
            ax.plot(mid, scores, marker=".", label=label)
        ax.set_title(Path(video).name, fontsize=9)
        ax.set_xlabel("time (s, window centre)")
        ax.set_ylabel("score")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def write_overlay(source, records: list[dict], path) -> Path:
    """Re-encode `source` with the current window's labels (or the video's) drawn on each frame."""
    from PIL import Image, ImageDraw

    from ..data.video import open_video, write_video

    windows = [r for r in records if not r.get("summary") and r["video"] == str(source)]
    summary = next((r for r in records if r.get("summary") and r["video"] == str(source)), {})
    starts = [r["start"] for r in windows]
    container, stream = open_video(source)
    times: list = []

    def labelled_frames():
        first = None
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            first = frame.pts if first is None else first
            t = float((frame.pts - first) * stream.time_base)
            times.append(t)
            current = windows[max(int(np.searchsorted(starts, t, side="right")) - 1, 0)] if windows else summary
            image = Image.fromarray(np.rot90(frame.to_ndarray(format="rgb24"), k=round(frame.rotation / 90) % 4))
            text = "\n".join(f"{e['label']} {e['score']:.2f}" for e in current.get("top", [])[:3]) or "-"
            draw = ImageDraw.Draw(image)
            box = draw.multiline_textbbox((4, 4), text)
            draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
            draw.multiline_text((4, 4), text, fill=(255, 255, 255))
            yield np.asarray(image)

    with container:
        rate = float(stream.average_rate) if stream.average_rate else 25.0
        return write_video(path, labelled_frames(), rate=rate, times=times)  # filled as frames are produced

