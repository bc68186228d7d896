"""Files shipped with the package: the demo model and two demo videos.

- `cmdcl_tiny_synth.pt`: a `tiny` CMDCL trained on the synthetic benchmark
  (cmdcl.data.synth, 7 activities) from the mini-VLM of `cmdcl-mini-vlm`
  (the README's "Bundled demo model" gives the exact commands and its accuracy);
- `demo_fry_egg.mp4`, `demo_make_tea.mp4`: the first "fry egg" and the first
  "make tea" video of that benchmark's `test` split (seed 0). The demo model
  gets both right; the make-tea video shows make juice's background (the
  visual confounder), which the first demo model, trained from a random
  frozen tower, fell for.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent
DEMO_VIDEOS = {"fry egg": "demo_fry_egg.mp4", "make tea": "demo_make_tea.mp4"}


def _existing(name: str) -> Path:
    path = ASSETS / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: bundled asset missing (reinstall the cmdcl package)")
    return path


def demo_checkpoint() -> Path:
    """Path of the bundled demo checkpoint (load with cmdcl.model.load_checkpoint)."""
    return _existing("cmdcl_tiny_synth.pt")


def demo_video(label: str = "fry egg") -> Path:
    """Path of a bundled demo video; `label` is its ground truth ("fry egg" or "make tea")."""
    if label not in DEMO_VIDEOS:
        raise ValueError(f"no demo video for {label!r}; choose from {', '.join(DEMO_VIDEOS)}")
    return _existing(DEMO_VIDEOS[label])
