"""Where records go: JSON Lines (flushed per record), JSON, CSV; a timeline plot; a labelled video.

To a file, records go to `<output>.partial`, renamed to the output when the run
ends (also when it is interrupted with Ctrl-C), so the output only ever holds a
finished run's records and an older output stays until then. JSON Lines and
CSV go out one record at a time, flushed: a live reader can tail the
`.partial` file, and a killed run leaves it with complete lines only (and the
older output untouched). JSON is one array written at the end, the only
format that keeps records in memory.

Every record written is valid in every format (`valid_record`): file names
that are not UTF-8 keep their bytes as `\\xNN` escapes, and a record whose
scores are not finite (a broken model's NaN) becomes an error record.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from ..output_files import OutputError, atomic_write, in_place, move_into_place, real_path

FORMATS = ("jsonl", "json", "csv")
CSV_COLUMNS = ("video", "summary", "start", "end", "scale", "rank", "label", "score", "error")  # scale: stream mode's window length
NON_FINITE_ERROR = "the model gave scores that are not numbers (NaN or infinity)"


def partial_path(path) -> Path:
    """Where a record file is written until the run ends."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def valid_record(record: dict) -> dict:
    """`record` as every format can write it: strings valid UTF-8 (a non-UTF-8 file name, which Python
    holds as surrogate escapes, gets `\\xNN` escapes for its bad bytes), non-finite numbers None, and
    a record with a non-finite score an error record without labels (its labels would mean nothing)."""
    clean = _clean(record)
    scores = [entry.get("score") for entry in record.get("top", [])]
    if any(isinstance(score, float) and not math.isfinite(score) for score in scores):
        clean["top"] = []
        clean.setdefault("error", NON_FINITE_ERROR)
    return clean


def _clean(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {_clean(key): _clean(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(item) for item in value]
    return value


class RecordWriter:
    """Write records to `path` (stdout when None) in `fmt`; use as a context manager.

    Leaving the `with` block normally, or by KeyboardInterrupt once records were written, finishes
    the output (renames `<path>.partial` onto `path`); any other exit leaves `path` as it was and
    keeps the `.partial` file when it holds records. An existing `.partial` file (an interrupted or still
    running run's) is never overwritten: OutputError. A failed write is an OutputError too.
    """

    def __init__(self, path=None, fmt: str = "jsonl"):
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
        self.fmt, self.records, self.written, self.count = fmt, [], 0, 0
        self.path = Path(path) if path else None
        self.partial = None
        if self.path and in_place(self.path):  # /dev/null, /dev/stdout, a named pipe: written directly, never replaced
            try:
                self.file = open(self.path, "wb", buffering=0)
            except OSError as exc:
                raise OutputError(f"{self.path}: cannot write: {exc.strerror or exc}") from None
        elif self.path:
            self.partial = partial_path(real_path(self.path))  # beside a symlink's target: the link is kept
            try:
                fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                raise OutputError(f"{self.partial}: exists (an interrupted run's records, or another run is writing "
                                  f"to {self.path.name}); move it away or delete it") from None
            except OSError as exc:
                raise OutputError(f"{self.partial}: cannot write: {exc.strerror or exc}") from None
            self.file = open(fd, "wb", buffering=0)  # unbuffered: `written` is what the file holds
        elif sys.stdout is None:  # started with stdout closed (`>&-`)
            raise OutputError("stdout: cannot write the records: stdout is closed")
        else:
            sys.stdout.flush()
            self.file = sys.stdout.buffer
        if fmt == "csv":
            self.buffer = io.StringIO()
            self.csv = csv.DictWriter(self.buffer, CSV_COLUMNS)
            self.csv.writeheader()
            try:
                self._emit_csv()
            except OutputError:  # the header does not fit (a full disk): no empty .partial file is left to block the next run
                self.close(finished=False)
                raise

    def write(self, record: dict) -> dict:
        """Write one record; returns it as written (see `valid_record`)."""
        record = valid_record(record)
        if self.fmt == "json":
            self.records.append(record)
        elif self.fmt == "jsonl":
            self._emit(json.dumps(record, allow_nan=False) + "\n")
        else:
            base = {k: record.get(k, "") for k in ("video", "start", "end", "scale", "error")}
            base["summary"] = bool(record.get("summary"))
            rows = [{**base, "rank": i + 1, **entry} for i, entry in enumerate(record.get("top", []))]
            self.csv.writerows(rows or [base])
            self._emit_csv()
        self.count += 1
        return record

    def _emit_csv(self) -> None:
        self._emit(self.buffer.getvalue())
        self.buffer.seek(0)
        self.buffer.truncate()

    def _emit(self, text: str) -> None:
        """Write and flush `text` whole; `written` counts the bytes of complete records."""
        data = text.encode("utf-8")
        try:
            view = memoryview(data)
            while view:
                view = view[self.file.write(view):]
            self.file.flush()
        except OSError as exc:
            raise OutputError(f"{self.path or 'stdout'}: cannot write the records: {exc.strerror or exc}") from None
        self.written += len(data)

    def close(self, finished: bool = True) -> None:
        """End the output; for a file, `finished` renames `.partial` onto the output (else it is kept
        when it holds records, removed when not)."""
        try:
            if finished and self.fmt == "json":
                self._emit(json.dumps(self.records, indent=1, allow_nan=False) + "\n")
            if self.partial:
                os.ftruncate(self.file.fileno(), self.written)  # drop the end of a record cut short by Ctrl-C
        except BaseException:
            finished = False  # never rename an output that failed to finish into place
            raise
        finally:
            if self.path:
                self.file.close()
            if self.partial and finished:
                move_into_place(self.partial, self.path)
            elif self.partial and (not self.count or self.fmt == "json"):
                self.partial.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(finished=exc_type is None or (issubclass(exc_type, KeyboardInterrupt) and self.count > 0))


def plot_timeline(records: list[dict], path) -> Path:
    """Scores of the reported labels over time, one panel per video (window records); with several window
    scales, one line per label and scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    videos = list(dict.fromkeys(r["video"] for r in records if not r.get("summary")))
    if not videos:
        raise ValueError("no window records to plot (use --mode stream)")
    fig, axes = plt.subplots(len(videos), 1, figsize=(9, 2.6 * len(videos)), squeeze=False)
    for ax, video in zip(axes[:, 0], videos):
        windows = [r for r in records if r["video"] == video and not r.get("summary")]
        scales = list(dict.fromkeys(r.get("scale") for r in windows))
        for scale in scales:
            mine = [r for r in windows if r.get("scale") == scale]
            mid = [(r["start"] + r["end"]) / 2 for r in mine]
            for label in dict.fromkeys(e["label"] for r in mine for e in r["top"]):
                scores = [next((e["score"] for e in r["top"] if e["label"] == label), np.nan) for r in mine]
                ax.plot(mid, scores, marker=".", label=label if len(scales) == 1 else f"{label} ({scale:g} s)")
        ax.set_title(Path(video).name, fontsize=9)
        ax.set_xlabel("time (s, window centre)")
        ax.set_ylabel("score")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    with atomic_write(path) as tmp:  # the format follows the output's suffix, not the temporary file's
        fig.savefig(tmp, dpi=100, format=Path(path).suffix[1:] or plt.rcParams["savefig.format"])
    plt.close(fig)
    return Path(path)


def write_overlay(source, records: list[dict], path) -> Path:
    """Re-encode `source` with the current window's labels (or the video's) drawn on each frame."""
    from PIL import Image, ImageDraw

    from ..data.video import open_video, write_video

    name = _clean(str(source))  # as the records spell it
    windows = [r for r in records if not r.get("summary") and r["video"] == name]
    shortest = min((r.get("scale", 0) for r in windows), default=0)
    windows = [r for r in windows if r.get("scale", 0) == shortest]  # several scales: the shortest's windows, in time order
    summary = next((r for r in records if r.get("summary") and r["video"] == name), {})
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

    with container, atomic_write(path) as tmp:
        rate = float(stream.average_rate) if stream.average_rate else 25.0
        write_video(tmp, labelled_frames(), rate=rate, times=times)  # `times` is filled as frames are produced
    return Path(path)

