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
is `actions.txt`. Every problem raises ManifestError naming the file and line.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

TARGETS = ("label", "segments")
CLASS_FILES = {"label": "classes.txt", "segments": "actions.txt"}


class ManifestError(ValueError):
    """A manifest or annotation file that cannot be used; the message names it."""


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


def read_class_file(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no such class list")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
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
            raise ManifestError(f"{where}: bad segment {part!r}; expected start:end:name in seconds") from None
        if end < start or not name:
            raise ManifestError(f"{where}: bad segment {part!r}; need start <= end and a name")
        segments.append(Segment(start, end, name))
    return segments


def read_manifest(path: str | Path, classes: list[str] | str | Path | None = None, target: str = "label", check_files: bool = True) -> VideoDataset:
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
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0][:2]] != ["path", "label"]:
        raise ManifestError(f"{path}:1: the header must start with 'path,label' (optionally ',segments')")
    header = [c.strip() for c in rows[0]]
    seg_col = header.index("segments") if "segments" in header else None
    parsed = []  # (line, video path, label names, segments)
    for line, row in enumerate(rows[1:], start=2):
        if not row or not any(c.strip() for c in row):
            continue
        where = f"{path}:{line}"
        if len(row) < 2 or not row[0].strip():
            raise ManifestError(f"{where}: expected at least a path and a label")
        video = Path(row[0].strip())
        video = video if video.is_absolute() else path.parent / video
        if check_files and not video.is_file():
            raise ManifestError(f"{where}: video file not found: {video}")
        segments = _parse_segments(row[seg_col], where) if seg_col is not None and seg_col < len(row) else []
        if target == "label":
            names = [n.strip() for n in row[1].split("|") if n.strip()]
        else:
            names = list(dict.fromkeys(s.name for s in segments))
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
            raise ManifestError(f"{path}:{line}: unknown label {unknown[0]!r} (not in the {len(classes)} classes)")
        entries.append(VideoEntry(video, [index[n] for n in names], segments))
    multi_label = target == "segments" or any(len(e.labels) > 1 for e in entries)
    return VideoDataset(entries, list(classes), multi_label, str(path))


def write_manifest(dataset: VideoDataset, path: str | Path) -> Path:
    """Write a dataset (e.g. one a dataset reader built) as a CSV manifest;
    paths under the manifest's folder are written relative to it."""
    path = Path(path)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "segments"])
        for e in dataset.entries:
            video = e.path.relative_to(path.parent) if e.path.is_relative_to(path.parent) else e.path
            segments = "|".join(f"{s.start:.2f}:{s.end:.2f}:{s.name}" for s in e.segments)
            writer.writerow([str(video), "|".join(dataset.classes[i] for i in e.labels), segments])
    return path
