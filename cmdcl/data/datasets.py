"""Readers for Breakfast, COIN and Charades as their authors distribute them.

Each returns a VideoDataset (cmdcl.data.manifest), the same thing a CSV
manifest gives, so training and evaluation see one format. The expected
folder layouts are in the README ("Datasets"). `load_dataset` picks the
reader from what the path holds.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from .manifest import ManifestError, Segment, VideoDataset, VideoEntry, read_manifest

SPLITS = ("train", "test")

BREAKFAST_ACTIVITIES = ["cereals", "coffee", "friedegg", "juice", "milk", "pancake", "salat", "sandwich", "scrambledegg", "tea"]
BREAKFAST_FPS = 15.0  # the frame rate of the distributed videos; .labels files count frames
VIDEO_SUFFIXES = (".avi", ".mp4", ".mkv", ".webm")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")


def read_breakfast(root: str | Path, split: str = "train", test_persons: range = range(3, 16)) -> VideoDataset:
    """Breakfast: `root/<any folders>/Pxx/camYY/Pxx_<activity>.avi`, 10 activities.

    The activity comes from the file name. Split s1 (the usual one): persons
    P03-P15 are `test`, the rest `train`. Fine-grained segments are read from
    `<video>.avi.labels` beside a video when present (lines `first-last action`,
    1-based frame numbers at 15 fps).
    """
    _check_split(split)
    root = Path(root)
    entries = []
    for video in sorted(root.rglob("P*_*.avi")):
        match = re.fullmatch(r"P(\d+)_(\w+?)\d*", video.stem)
        activity = match and next((a for a in BREAKFAST_ACTIVITIES if match.group(2) == a), None)
        if not activity:
            continue
        in_test = int(match.group(1)) in test_persons
        if in_test != (split == "test"):
            continue
        segments = []
        labels_file = video.with_name(video.name + ".labels")
        if labels_file.is_file():
            for n, line in enumerate(labels_file.read_text().splitlines(), start=1):
                m = re.fullmatch(r"\s*(\d+)-(\d+)\s+(\S+)\s*", line)
                if line.strip() and not m:
                    raise ManifestError(f"{labels_file}:{n}: expected 'first-last action'")
                if m:
                    first, last = int(m.group(1)), int(m.group(2))
                    segments.append(Segment((first - 1) / BREAKFAST_FPS, last / BREAKFAST_FPS, m.group(3)))
        entries.append(VideoEntry(video, [BREAKFAST_ACTIVITIES.index(activity)], segments))
    if not entries:
        raise ManifestError(f"{root}: no Breakfast videos (Pxx/camYY/Pxx_<activity>.avi) for split {split!r}")
    return VideoDataset(entries, list(BREAKFAST_ACTIVITIES), False, str(root))


def read_coin(root: str | Path, split: str = "train") -> VideoDataset:
    """COIN: `root/COIN.json` and `root/videos/<recipe_type>/<youtube_id>.mp4`.

    Labels are the 180 tasks (`class`); segments are the annotated steps. Videos
    missing on disk are skipped (YouTube downloads are never complete); the
    task list comes from the JSON so class indices do not depend on them.
    """
    _check_split(split)
    root = Path(root)
    annotation = root / "COIN.json"
    try:
        database = json.loads(annotation.read_text())["database"]
    except FileNotFoundError:
        raise ManifestError(f"{annotation}: no such file (expected COIN's annotation JSON)") from None
    except (json.JSONDecodeError, KeyError) as exc:
        raise ManifestError(f"{annotation}: not COIN's annotation JSON ({exc})") from None
    subset = {"train": "training", "test": "testing"}[split]
    tasks = {}
    for item in database.values():
        tasks.setdefault(int(item["recipe_type"]), item["class"])
    classes = [tasks[k] for k in sorted(tasks)]
    entries = []
    for video_id, item in sorted(database.items()):
        if item.get("subset") != subset:
            continue
        folder = root / "videos" / str(item["recipe_type"])
        path = next((folder / f"{video_id}{s}" for s in VIDEO_SUFFIXES if (folder / f"{video_id}{s}").is_file()), None)
        if path is None:
            continue
        segments = [Segment(float(a["segment"][0]), float(a["segment"][1]), a["label"]) for a in item.get("annotation", [])]
        entries.append(VideoEntry(path, [classes.index(item["class"])], segments))
    if not entries:
        raise ManifestError(f"{root}: no COIN videos found under videos/<recipe_type>/ for split {split!r}")
    return VideoDataset(entries, classes, False, str(annotation))


def read_charades(root: str | Path, split: str = "train") -> VideoDataset:
    """Charades: `root/Charades_v1_{train,test}.csv`, `root/Charades_v1_classes.txt`
    and the videos in `root/Charades_v1_480/<id>.mp4` (or `Charades_v1/`).

    Multi-label: the 157 action classes present in a video (`actions` column,
    `c092 11.90 21.20;...`), which are also its segments. Videos without
    actions or missing on disk are skipped.
    """
    _check_split(split)
    root = Path(root)
    classes_file, table = root / "Charades_v1_classes.txt", root / f"Charades_v1_{split}.csv"
    for required in (classes_file, table):
        if not required.is_file():
            raise ManifestError(f"{required}: no such file (expected Charades' annotation layout)")
    codes, classes = [], []
    for n, line in enumerate(classes_file.read_text().splitlines(), start=1):
        if line.strip():
            code, _, name = line.strip().partition(" ")
            if not re.fullmatch(r"c\d+", code) or not name:
                raise ManifestError(f"{classes_file}:{n}: expected 'cNNN class name'")
            codes.append(code)
            classes.append(name.strip())
    index = {code: i for i, code in enumerate(codes)}
    folder = next((root / d for d in ("Charades_v1_480", "Charades_v1") if (root / d).is_dir()), root / "Charades_v1_480")
    entries = []
    with open(table, newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            path = folder / f"{row['id']}.mp4"
            if not row.get("actions") or not path.is_file():
                continue
            segments = []
            for part in row["actions"].split(";"):
                try:
                    code, start, end = part.split()
                    segments.append(Segment(float(start), float(end), classes[index[code]]))
                except (ValueError, KeyError):
                    raise ManifestError(f"{table}:{line}: bad action {part!r}; expected 'cNNN start end' with a known class") from None
            labels = sorted({classes.index(s.name) for s in segments})
            entries.append(VideoEntry(path, labels, segments))
    if not entries:
        raise ManifestError(f"{root}: no Charades videos with actions found in {folder}")
    return VideoDataset(entries, classes, True, str(table))


def load_dataset(path: str | Path, split: str = "train", classes=None, target: str = "label") -> VideoDataset:
    """A CSV manifest, or a dataset folder (COIN, Charades, Breakfast, or one holding `<split>.csv`/`manifest.csv`)."""
    path = Path(path)
    if path.is_file():
        return read_manifest(path, classes, target)
    if not path.is_dir():
        raise ManifestError(f"{path}: no such manifest or dataset folder")
    if (path / "COIN.json").is_file():
        return read_coin(path, split)
    if (path / "Charades_v1_classes.txt").is_file():
        return read_charades(path, split)
    for name in (f"{split}.csv", "manifest.csv"):
        if (path / name).is_file():
            return read_manifest(path / name, classes, target)
    if next(path.rglob("P*_*.avi"), None) is not None:
        return read_breakfast(path, split)
    raise ManifestError(f"{path}: not a manifest, nor a Breakfast, COIN or Charades folder (see the README's Datasets section)")
