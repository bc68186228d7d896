"""The CSV manifest: one video per line, the common format every dataset reader returns.

    path,label,segments
    videos/a.mp4,make tea,0.00:1.40:boil water|1.40:3.00:pour|3.00:4.60:stir
    videos/b.mp4,Holding a cup|Drinking from a cup,

- `path`: the video, relative to the manifest's folder (or absolute);
- `label`: one class name, or several separated by `|` (multi-label);
- `segments` (optional column, may be empty): `start:end:name` in seconds,
  separated by `|` (e.g. the atomic actions of an activity).

The class order comes from `classes` when given (a list, or a text file with
one name per line), else from `classes.txt` beside the manifest, else the
sorted labels found. With `target="segments"` the labels are the segment
names (multi-label, e.g. atomic-action recognition) and the default class file
is `actions.txt`. Files are UTF-8 (a byte-order mark is allowed). Every
problem raises ManifestError naming the file and line: bad bytes, over-long
fields, segment times that are not finite seconds >= 0 with start <= end,
unknown labels, and a video listed twice.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CmdclError

TARGETS = ("label", "segments")
CLASS_FILES = {"label": "classes.txt", "segments": "actions.txt"}
MAX_PATH = 4096  # characters in a video path (Linux's PATH_MAX): longer ones are refused before any stat()
MAX_NAME = 256  # characters in a class or segment name


class ManifestError(CmdclError, ValueError):
    """A manifest or annotation file that cannot be used (or a video it lists); the message names it."""


@dataclass
class Segment:
    start: float
    end: float
    name: str


@dataclass
class VideoEntry:
    path: Path
    labels: list[int]  # class indices (one for single-label data)
    segments: list[Segment] = field(default_factory=list)
    listed_at: str = ""  # "file:line" that lists the video, when there is one (for messages)


@dataclass
class VideoDataset:
    """Videos, their labels as indices into `classes`, and whether labels are multi-hot."""

    entries: list[VideoEntry]
    classes: list[str]
    multi_label: bool
    source: str  # where it was read from, for messages and checkpoints

    def targets(self, multi_label: bool | None = None):
        """Class indices [N] (single-label) or multi-hot [N, C] (multi-label; default: the dataset's kind)."""
        import torch

        if not (self.multi_label if multi_label is None else multi_label):
            return torch.tensor([e.labels[0] for e in self.entries], dtype=torch.long)
        hot = torch.zeros(len(self.entries), len(self.classes))
        for i, e in enumerate(self.entries):
            hot[i, e.labels] = 1.0
        return hot


def shown(text: str, limit: int = 60) -> str:
    """`text` quoted for a one-line message, shortened when long."""
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def read_text(path: str | Path, what: str) -> str:
    """A UTF-8 text file (a byte-order mark is allowed); a file that cannot be read or
    holds other bytes raises ManifestError naming it (and the line of the first bad byte)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ManifestError(f"{path}:{line}: the {what} is not UTF-8 text (byte 0x{data[exc.start]:02x}); save it as UTF-8") from None


def read_csv(path: Path, what: str) -> list[tuple[int, list[str]]]:
    """The rows of a UTF-8 CSV file with the line each starts on; malformed CSV
    (e.g. a field over csv's size limit) raises ManifestError naming the line."""
    reader = csv.reader(io.StringIO(read_text(path, what), newline=""))
    rows = []
    try:
        while True:
            line = reader.line_num + 1
            rows.append((line, next(reader)))
    except StopIteration:
        return rows
    except csv.Error as exc:
        raise ManifestError(f"{path}:{reader.line_num}: malformed {what} ({exc})") from None


def check_name(name: str, where: str, what: str = "label") -> str:
    """`name` if it is at most MAX_NAME characters (names end up in messages, prompts and outputs)."""
    if len(name) > MAX_NAME:
        raise ManifestError(f"{where}: {what} {shown(name)} is longer than {MAX_NAME} characters")
    return name


def check_segment(segment: Segment, where: str) -> Segment:
    """`segment` if its times are finite seconds >= 0 with start <= end and it has a name."""
    problem = (
        "its times must be finite seconds" if not (math.isfinite(segment.start) and math.isfinite(segment.end))
        else "it starts before 0 s" if segment.start < 0
        else "it ends before it starts" if segment.end < segment.start
        else "it has no name" if not segment.name
        else None
    )
    if problem:
        raise ManifestError(f"{where}: bad segment {shown(f'{segment.start:g}:{segment.end:g}:{segment.name}')}: {problem}")
    check_name(segment.name, where, "segment name")
    return segment


def read_class_file(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no such class list")
    names = [check_name(line.strip(), f"{path}:{n}", "class name")
             for n, line in enumerate(read_text(path, "class list").splitlines(), start=1)]
    names = [name for name in names if name]
    if not names:
        raise ManifestError(f"{path}: class list is empty")
    if len(set(names)) != len(names):
        raise ManifestError(f"{path}: class list has duplicate names")
    return names


def _parse_segments(text: str, where: str) -> list[Segment]:
    segments = []
    for part in filter(None, (p.strip() for p in text.split("|"))):
        pieces = part.split(":", 2)
        try:
            start, end, name = float(pieces[0]), float(pieces[1]), pieces[2].strip()
        except (ValueError, IndexError):
            raise ManifestError(f"{where}: bad segment {shown(part)}; expected start:end:name in seconds") from None
        segments.append(check_segment(Segment(start, end, name), where))
    return segments


def read_manifest(path: str | Path, classes: list[str] | str | Path | None = None, target: str = "label",
                  check_files: bool = True) -> VideoDataset:
    """Read and validate a CSV manifest (see the module docstring)."""
    path = Path(path)
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, not {target!r}")
    if not path.is_file():
        raise ManifestError(f"{path}: no such manifest")
    if isinstance(classes, (str, Path)):
        classes = read_class_file(classes)
    elif classes is None and (path.parent / CLASS_FILES[target]).is_file():
        classes = read_class_file(path.parent / CLASS_FILES[target])
    rows = read_csv(path, "manifest")
    if not rows:
        raise ManifestError(f"{path}: the manifest is empty (expected a header 'path,label' and one line per video)")
    if [c.strip() for c in rows[0][1][:2]] != ["path", "label"]:
        raise ManifestError(f"{path}:{rows[0][0]}: the header must start with 'path,label' (optionally ',segments')")
    header = [c.strip() for c in rows[0][1]]
    seg_col = header.index("segments") if "segments" in header else None
    parsed = []  # (line, video path, label names, segments)
    first_listed = {}  # video path -> line
    for line, row in rows[1:]:
        if not row or not any(c.strip() for c in row):
            continue
        where = f"{path}:{line}"
        if len(row) < 2 or not row[0].strip():
            raise ManifestError(f"{where}: expected at least a path and a label")
        if len(row[0].strip()) > MAX_PATH or "\0" in row[0]:
            raise ManifestError(f"{where}: not a file path (a NUL byte, or over {MAX_PATH} characters): {shown(row[0].strip())}")
        video = Path(row[0].strip())
        video = video if video.is_absolute() else path.parent / video
        if video in first_listed:
            raise ManifestError(f"{where}: {video} is already listed on line {first_listed[video]}")
        first_listed[video] = line
        if check_files:
            try:
                found = video.is_file()
            except OSError as exc:  # e.g. a name over the file system's limit, a folder we may not enter
                raise ManifestError(f"{where}: cannot use the path {shown(row[0].strip())} ({exc.strerror or exc})") from None
            if not found:
                raise ManifestError(f"{where}: video file not found: {video}")
        segments = _parse_segments(row[seg_col], where) if seg_col is not None and seg_col < len(row) else []
        if target == "label":
            names = [check_name(n.strip(), where) for n in row[1].split("|") if n.strip()]
        else:
            names = [s.name for s in segments]
        names = list(dict.fromkeys(names))  # "tea|tea" is one label, not a multi-label row
        if not names:
            raise ManifestError(f"{where}: no {'label' if target == 'label' else 'segments'} given")
        parsed.append((line, video, names, segments))
    if not parsed:
        raise ManifestError(f"{path}: the manifest lists no videos")
    if classes is None:
        classes = sorted({n for _, _, names, _ in parsed for n in names})
    index = {name: i for i, name in enumerate(classes)}
    entries = []
    for line, video, names, segments in parsed:
        unknown = [n for n in names if n not in index]
        if unknown:
            raise ManifestError(f"{path}:{line}: unknown label {shown(unknown[0])} (not in the {len(classes)} classes)")
        entries.append(VideoEntry(video, [index[n] for n in names], segments, f"{path}:{line}"))
    multi_label = target == "segments" or any(len(e.labels) > 1 for e in entries)
    return VideoDataset(entries, list(classes), multi_label, str(path))


def write_manifest(dataset: VideoDataset, path: str | Path) -> Path:
    """Write a dataset (e.g. one a dataset reader built) as a CSV manifest;
    paths under the manifest's folder are written relative to it."""
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "segments"])
        for e in dataset.entries:
            video = e.path.relative_to(path.parent) if e.path.is_relative_to(path.parent) else e.path
            segments = "|".join(f"{s.start:.2f}:{s.end:.2f}:{s.name}" for s in e.segments)
            writer.writerow([str(video), "|".join(dataset.classes[i] for i in e.labels), segments])
    return path
