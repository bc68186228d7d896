"""A procedural benchmark for long-activity recognition with built-in biases.

Each video shows one *activity* ("make tea") as an ordered sequence of
*atomic actions* ("boil water", "pour", "stir"), each a simple rendered
object with its own shape, colour and motion. Atomic actions are shared
across activities (the paper's cross-modal bias B: "crack egg" appears in
"fry egg", "scramble eggs" and "make pancake"), so one frame rarely tells the
activity; the order and combination do.

A visual confounder Z, the background (colour and texture), correlates with
the activity in the `train` and `test` splits (each activity has a "home"
background, used with probability `home_bias`) and is drawn independently of
the activity in `ood`. A model that learned the background shortcut loses
accuracy on `ood`.

Videos are real H.264 MP4 files (cmdcl.data.video.write_video); the manifest
(`manifest.csv`, see cmdcl.data.manifest) lists the activity label and the
atomic-action segments, and `classes.txt` / `actions.txt` fix the label order.
`backgrounds.csv` (`video,label`) names each video's background texture: the
confounder's label, for `cmdcl-eval --interventions --probe-labels`.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .manifest import Segment, VideoDataset, VideoEntry, write_manifest
from .video import write_video

# name -> (shape, RGB colour, motion)
ATOMIC_ACTIONS = {
    "boil water": ("circle", (60, 120, 230), "pulse"),
    "pour": ("bar", (150, 90, 40), "diagonal"),
    "stir": ("square", (240, 240, 240), "orbit"),
    "crack egg": ("circle", (240, 220, 60), "split"),
    "fry": ("square", (250, 140, 30), "shake"),
    "serve": ("square", (210, 40, 40), "slide"),
    "cut": ("bar", (40, 180, 60), "sweep"),
    "grind": ("bar", (70, 50, 40), "rotate"),
}

# activity -> ordered atomic actions; every atomic action is in >= 2 activities.
ACTIVITIES = {
    "make tea": ["boil water", "pour", "stir"],
    "make coffee": ["grind", "boil water", "pour"],
    "fry egg": ["crack egg", "fry", "serve"],
    "scramble eggs": ["crack egg", "stir", "fry"],
    "make pancake": ["crack egg", "pour", "stir", "fry"],
    "make salad": ["cut", "stir", "serve"],
    "make juice": ["cut", "grind", "pour"],
}

# One background per activity (its "home" in train/test): (colour, texture).
BACKGROUNDS = [
    ((90, 100, 120), "plain"),
    ((200, 180, 140), "hstripes"),
    ((70, 130, 80), "checker"),
    ((190, 120, 160), "dots"),
    ((110, 90, 160), "vgradient"),
    ((150, 150, 60), "dstripes"),
    ((60, 140, 150), "noise"),
]

SPLITS = ("train", "test", "ood")


@dataclass
class SynthConfig:
    size: int = 96  # square frames, pixels (even, for yuv420p)
    fps: int = 10
    min_action_seconds: float = 1.0
    max_action_seconds: float = 2.2
    home_bias: float = 0.8  # P(home background) in train/test; ood draws uniformly


def render_background(index: int, size: int, rng: np.random.Generator) -> np.ndarray:
    colour, texture = BACKGROUNDS[index]
    base = np.array(colour, dtype=np.float32) + rng.uniform(-15, 15, 3)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if texture == "plain":
        shade = np.zeros_like(x)
    elif texture == "hstripes":
        shade = 30 * (np.floor(y * 8) % 2) - 15
    elif texture == "checker":
        shade = 30 * ((np.floor(x * 6) + np.floor(y * 6)) % 2) - 15
    elif texture == "dots":
        shade = 35 * (((x * 8) % 1 - 0.5) ** 2 + ((y * 8) % 1 - 0.5) ** 2 < 0.06) - 10
    elif texture == "vgradient":
        shade = 60 * (y - 0.5)
    elif texture == "dstripes":
        shade = 30 * (np.floor((x + y) * 6) % 2) - 15
    else:  # noise
        shade = rng.uniform(-25, 25, (size, size)).astype(np.float32)
    return np.clip(base[None, None] + shade[..., None], 0, 255)


def _draw(canvas: np.ndarray, shape: str, colour, cx: float, cy: float, r: float, angle: float = 0.0) -> None:
    """Draw a filled shape of radius r (pixels) centred at (cx, cy) in place."""
    size = canvas.shape[0]
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = x - cx, y - cy
    if shape == "circle":
        mask = dx**2 + dy**2 <= r**2
    elif shape == "square":
        mask = (np.abs(dx) <= r * 0.8) & (np.abs(dy) <= r * 0.8)
    else:  # bar: a long thin rectangle, rotated by `angle`
        u = dx * math.cos(angle) + dy * math.sin(angle)
        v = -dx * math.sin(angle) + dy * math.cos(angle)
        mask = (np.abs(u) <= r * 1.3) & (np.abs(v) <= r * 0.35)
    canvas[mask] = colour


def render_action(canvas, action: str, phase: float, place, colour, radius: float) -> None:
    """One frame of an atomic action at `phase` in [0, 1) of its segment."""
    shape, _, motion = ATOMIC_ACTIONS[action]
    size = canvas.shape[0]
    cx, cy = place
    amp = size * 0.18
    if motion == "pulse":
        _draw(canvas, shape, colour, cx, cy, radius * (0.7 + 0.5 * abs(math.sin(2 * math.pi * phase))))
    elif motion == "diagonal":
        _draw(canvas, shape, colour, cx - amp + 2 * amp * phase, cy - amp + 2 * amp * phase, radius, math.pi / 4)
    elif motion == "orbit":
        a = 2 * math.pi * phase
        _draw(canvas, shape, colour, cx + amp * math.cos(a), cy + amp * math.sin(a), radius * 0.7)
    elif motion == "split":
        gap = amp * phase
        _draw(canvas, shape, colour, cx - gap, cy, radius * 0.8)
        _draw(canvas, shape, colour, cx + gap, cy, radius * 0.8)
    elif motion == "shake":
        _draw(canvas, shape, colour, cx + 0.4 * amp * math.sin(6 * math.pi * phase), cy, radius)
    elif motion == "slide":
        _draw(canvas, shape, colour, cx - amp + 2 * amp * phase, cy, radius)
    elif motion == "sweep":
        _draw(canvas, shape, colour, cx, cy - amp + 2 * amp * phase, radius, 0.0)
    else:  # rotate
        _draw(canvas, shape, colour, cx, cy, radius, 2 * math.pi * phase)


def render_video(activity: str, background: int, cfg: SynthConfig, rng: np.random.Generator):
    """-> (frames uint8 [T, size, size, 3], segments [(start_s, end_s, action)])."""
    size = cfg.size
    bg = render_background(background, size, rng)
    frames, segments, t0 = [], [], 0.0
    for action in ACTIVITIES[activity]:
        seconds = rng.uniform(cfg.min_action_seconds, cfg.max_action_seconds)
        n = max(2, round(seconds * cfg.fps))
        place = rng.uniform(0.35, 0.65, 2) * size
        colour = np.clip(np.array(ATOMIC_ACTIONS[action][1]) + rng.uniform(-25, 25, 3), 0, 255)
        radius = size * rng.uniform(0.1, 0.14)
        for i in range(n):
            canvas = bg.copy()
            render_action(canvas, action, i / n, place, colour, radius)
            canvas += rng.normal(0, 4, canvas.shape).astype(np.float32)
            frames.append(np.clip(canvas, 0, 255).astype(np.uint8))
        segments.append((t0, t0 + n / cfg.fps, action))
        t0 += n / cfg.fps
    return np.stack(frames), segments


def choose_background(label: int, split: str, home_bias: float, rng: np.random.Generator) -> int:
    """The confounder: the activity's home background with probability
    `home_bias` in train/test (else uniform), uniform in ood."""
    if split != "ood" and rng.random() < home_bias:
        return label
    return int(rng.integers(len(BACKGROUNDS)))


def generate(out: str | Path, videos: int, seed: int, split: str = "train", cfg: SynthConfig | None = None, progress: bool = False) -> Path:
    """Write `videos` MP4s and `manifest.csv`, `classes.txt`, `actions.txt`, `backgrounds.csv` to `out`.

    Activities are balanced (round robin, then shuffled). Returns the manifest path.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    if videos < 1:
        raise ValueError("videos must be >= 1")
    cfg = cfg or SynthConfig()
    if cfg.size % 2:
        raise ValueError("size must be even (H.264 yuv420p)")
    # Distinct streams per split, so a test split never repeats train videos for one seed.
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "actions.txt").write_text("\n".join(ATOMIC_ACTIONS) + "\n")  # first: marks the folder as ours, also if stopped early
    names = list(ACTIVITIES)
    order = rng.permutation(np.arange(videos) % len(names))
    entries, backgrounds = [], []

    for i in tqdm(range(videos), desc=f"synth {split}", disable=not progress, unit="video"):
        label = int(order[i])
        background = choose_background(label, split, cfg.home_bias, rng)
        frames, segments = render_video(names[label], background, cfg, rng)
        name = f"{split}_{i:05d}.mp4"
        write_video(out / name, frames, rate=cfg.fps)
        entries.append(VideoEntry(out / name, [label], [Segment(s, e, a) for s, e, a in segments]))
        backgrounds.append((name, BACKGROUNDS[background][1]))
    manifest = write_manifest(VideoDataset(entries, names, False, str(out)), out / "manifest.csv")
    (out / "classes.txt").write_text("\n".join(names) + "\n")
    with open(out / "backgrounds.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("video", "label"), *backgrounds])
    return manifest
