"""Readers for Breakfast, COIN and Charades as their authors distribute them.

Each returns a VideoDataset (cmdcl.data.manifest), the same thing a CSV
manifest gives, so training and evaluation see one format. The expected
folder layouts are in the README ("Datasets"). `load_dataset` picks the
reader from what the path holds. Annotation files are checked as manifests
are: UTF-8, the expected types and keys, segment times (manifest.check_segment);
every problem raises ManifestError naming the file and the line or video.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from .manifest import ManifestError, Segment, VideoDataset, VideoEntry, check_name, check_segment, read_csv, read_manifest, read_text, shown

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
            for n, line in enumerate(read_text(labels_file, "Breakfast labels file").splitlines(), start=1):
                m = re.fullmatch(r"\s*(\d{1,9})-(\d{1,9})\s+(\S+)\s*", line)
                if line.strip() and not m:
                    raise ManifestError(f"{labels_file}:{n}: expected 'first-last action' (1-based frame numbers)")
                if m:
                    first, last = int(m.group(1)), int(m.group(2))
                    segments.append(check_segment(Segment((first - 1) / BREAKFAST_FPS, last / BREAKFAST_FPS, m.group(3)),
                                                  f"{labels_file}:{n}"))
        entries.append(VideoEntry(video, [BREAKFAST_ACTIVITIES.index(activity)], segments))
    if not entries:
        raise ManifestError(f"{root}: no Breakfast videos (Pxx/camYY/Pxx_<activity>.avi) for split {split!r}")
    return VideoDataset(entries, list(BREAKFAST_ACTIVITIES), False, str(root))


def _plain_name(name: str, where: str) -> str:
    """A video id used as a file name: no folders, so an annotation cannot point outside the dataset."""
    if not name or name in (".", "..") or "/" in name or "\0" in name or len(name) > 200:  # 200: room for a suffix within NAME_MAX
        raise ManifestError(f"{where}: video id {shown(name)} is not a plain file name")
    return name


def _coin_video(item, where: str) -> tuple[int, str, list[Segment]]:
    """(recipe type, task, segments) of one COIN database entry, checked."""
    if not (isinstance(item, dict) and type(item.get("recipe_type")) is int and isinstance(item.get("class"), str)
            and isinstance(item.get("annotation", []), list)):
        raise ManifestError(f"{where}: expected 'recipe_type' (an integer), 'class' (a name) and an 'annotation' list")
    segments = []
    for a in item.get("annotation", []):
        span = a.get("segment") if isinstance(a, dict) else None
        if not (isinstance(span, list) and len(span) == 2 and all(type(t) in (int, float) for t in span)
                and isinstance(a.get("label"), str)):
            raise ManifestError(f"{where}: bad annotation {shown(json.dumps(a))}; expected {{\"segment\": [start, end], \"label\": name}}")
        # an int beyond float's range: not finite
        start, end = (float(t) if isinstance(t, float) or abs(t) < 1e300 else math.inf for t in span)
        segments.append(check_segment(Segment(start, end, a["label"].strip()), where))
    return item["recipe_type"], check_name(item["class"], where, "class"), segments


def read_coin(root: str | Path, split: str = "train") -> VideoDataset:
    """COIN: `root/COIN.json` and `root/videos/<recipe_type>/<youtube_id>.mp4`.

    Labels are the 180 tasks (`class`); segments are the annotated steps. Videos
    missing on disk are skipped (YouTube downloads are never complete); the
    task list comes from the JSON so class indices do not depend on them.
    """
    _check_split(split)
    root = Path(root)
    annotation = root / "COIN.json"
    if not annotation.is_file():
        raise ManifestError(f"{annotation}: no such file (expected COIN's annotation JSON)")
    try:
        database = json.loads(read_text(annotation, "COIN annotation JSON"))
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{annotation}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    except ValueError as exc:  # e.g. an integer over Python's 4300-digit limit
        raise ManifestError(f"{annotation}: not valid JSON ({exc})") from None
    except RecursionError:
        raise ManifestError(f"{annotation}: not COIN's annotation JSON (nested too deeply)") from None
    database = database.get("database") if isinstance(database, dict) else None
    if not isinstance(database, dict):
        raise ManifestError(f"{annotation}: not COIN's annotation JSON (no 'database' object of videos)")
    videos, tasks = {}, {}  # video id -> (where, recipe type, task, segments); recipe type -> task
    for video_id, item in database.items():
        where = f"{annotation}: video {shown(video_id)}"
        recipe, task, segments = _coin_video(item, where)
        if tasks.setdefault(recipe, task) != task:
            raise ManifestError(f"{where}: recipe_type {recipe} is {shown(task)} here but {shown(tasks[recipe])} elsewhere")
        videos[video_id] = (where, recipe, task, segments)
    classes = [tasks[k] for k in sorted(tasks)]
    if len(set(classes)) != len(classes):
        raise ManifestError(f"{annotation}: two recipe types share a class name")
    subset = {"train": "training", "test": "testing"}[split]
    entries = []
    for video_id, (where, recipe, task, segments) in sorted(videos.items()):
        if database[video_id].get("subset") != subset:
            continue
        folder = root / "videos" / str(recipe)
        stem = _plain_name(video_id, where)
        path = next((folder / f"{stem}{s}" for s in VIDEO_SUFFIXES if (folder / f"{stem}{s}").is_file()), None)
        if path is None:
            continue
        entries.append(VideoEntry(path, [classes.index(task)], segments))
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
    index, classes = {}, []  # code -> class index, names
    for n, line in enumerate(read_text(classes_file, "Charades class list").splitlines(), start=1):
        if line.strip():
            code, _, name = line.strip().partition(" ")
            where = f"{classes_file}:{n}"
            if not re.fullmatch(r"c\d+", code) or not name.strip():
                raise ManifestError(f"{where}: expected 'cNNN class name'")
            if code in index or name.strip() in classes:
                raise ManifestError(f"{where}: class {code} {shown(name.strip())} is listed twice")
            index[code] = len(classes)
            classes.append(check_name(name.strip(), where, "class name"))
    folder = next((root / d for d in ("Charades_v1_480", "Charades_v1") if (root / d).is_dir()), root / "Charades_v1_480")
    rows = read_csv(table, "Charades annotation table")
    header = [c.strip() for c in rows[0][1]] if rows else []
    if "id" not in header or "actions" not in header:
        raise ManifestError(f"{table}:1: the header must name the columns 'id' and 'actions'")
    id_col, actions_col = header.index("id"), header.index("actions")
    entries, first_listed = [], {}
    for line, row in rows[1:]:
        where = f"{table}:{line}"
        if len(row) <= max(id_col, actions_col) or not row[actions_col].strip():
            continue
        video_id = _plain_name(row[id_col].strip(), where)
        if video_id in first_listed:
            raise ManifestError(f"{where}: video {video_id} is already listed on line {first_listed[video_id]}")
        first_listed[video_id] = line
        path = folder / f"{video_id}.mp4"
        if not path.is_file():
            continue
        segments, labels = [], set()
        for part in filter(None, (p.strip() for p in row[actions_col].split(";"))):
            try:
                code, start, end = part.split()
                segment = Segment(float(start), float(end), classes[index[code]])
            except (ValueError, KeyError):
                raise ManifestError(f"{where}: bad action {shown(part)}; expected 'cNNN start end' with a known class") from None
            segments.append(check_segment(segment, where))
            labels.add(index[code])
        entries.append(VideoEntry(path, sorted(labels), segments, where))
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
