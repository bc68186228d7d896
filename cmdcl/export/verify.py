"""Check exported graphs against the PyTorch model with ONNX Runtime (CPU).

The full graph and, when exported, the frame_encoder + head composition run
on random frames and on a real video (the demo video, or one given); each
check reports relative error ||out - ref|| / ||ref|| of logits and embedding
and top-1 agreement, against the tolerances of docs/design.md section 7 (`artifacts.TOLERANCES`). fp32 must also
agree on every top-1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..artifacts import TOLERANCES, relative_error
from ..errors import CmdclError


class VerificationError(CmdclError, RuntimeError):
    """Exported graphs disagree with the PyTorch model beyond tolerance."""


@dataclass
class Check:
    name: str
    logits_error: float
    embedding_error: float
    top1_agreement: float
    passed: bool

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (f"{self.name}: logits rel err {self.logits_error:.2e}, embedding rel err "
                f"{self.embedding_error:.2e}, top-1 agreement {100 * self.top1_agreement:.0f}% [{verdict}]")


def onnx_session(path: str | Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # CPU-EP notices about fp16 nodes it cannot constant-fold
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_split(frame_encoder, head, frames: np.ndarray) -> list[np.ndarray]:
    """frames [B, F, H, W, 3] through frame_encoder then head, as the streaming runtime does."""
    b, f = frames.shape[:2]
    (tokens,) = frame_encoder.run(None, {"frames": frames.reshape(b * f, *frames.shape[2:])})
    return head.run(None, {"tokens": tokens.reshape(b, f, *tokens.shape[1:])})


def compare(name: str, outputs, reference, precision: str) -> Check:
    (logits, embedding), (ref_logits, ref_embedding) = outputs, reference
    tol = TOLERANCES[precision]
    logits_error, embedding_error = relative_error(logits, ref_logits), relative_error(embedding, ref_embedding)
    agreement = float(np.mean(np.argmax(logits, -1) == np.argmax(ref_logits, -1)))
    passed = logits_error <= tol and embedding_error <= tol and (precision != "fp32" or agreement == 1.0)
    return Check(name, logits_error, embedding_error, agreement, passed)


def video_frames(model, video: str | Path | None = None) -> tuple[np.ndarray | None, str]:
    """(frames [1, F, H, W, 3] from `video` or the demo video, description) or (None, why not)."""
    try:
        from ..data.video import VideoError, read_clip
    except ImportError:
        return None, "video check skipped: cmdcl.data.video is not available"
    if video is None:
        try:
            from ..assets import demo_video

            video = demo_video()
        except (ImportError, FileNotFoundError):
            return None, "video check skipped: no demo video (cmdcl.assets.demo_video) in this install"
    try:
        clip = read_clip(video, model.cfg.num_frames, model.cfg.vision.image_size)
    except (VideoError, OSError) as exc:
        return None, f"video check skipped: cannot read {video} ({exc})"
    return clip.frames[None], f"video {Path(video).name}"


def verify_export(model, paths: dict, precision: str = "fp32", video: str | Path | None = None,
                  batch: int = 2, seed: int = 0) -> tuple[list[Check], list[str]]:
    """Run every check; returns (checks, notes) or raises VerificationError listing the failures."""
    model = model.float().cpu().eval()
    cfg = model.cfg
    generator = torch.Generator().manual_seed(seed)
    size = cfg.vision.image_size
    inputs = [(f"random frames, batch {batch}",
               torch.randint(0, 256, (batch, cfg.num_frames, size, size, 3), dtype=torch.uint8, generator=generator).numpy())]
    clip, note = video_frames(model, video)
    notes = [] if clip is not None else [note]
    if clip is not None:
        inputs.append((note, clip))

    full = onnx_session(paths["full"])
    split = (onnx_session(paths["frame_encoder"]), onnx_session(paths["head"])) if "head" in paths else None
    checks = []
    for name, frames in inputs:
        with torch.no_grad():
            reference = [t.numpy() for t in model(torch.from_numpy(frames))]
        checks.append(compare(f"{Path(paths['full']).name} on {name}", full.run(None, {"frames": frames}), reference, precision))
        if split:
            checks.append(compare(f"frame_encoder + head on {name}", run_split(*split, frames), reference, precision))
    failed = [c for c in checks if not c.passed]
    if failed:
        raise VerificationError(
            f"exported {precision} graphs disagree with PyTorch beyond rel err {TOLERANCES[precision]:g}"
            + (" or on top-1" if precision == "fp32" else "") + ": " + "; ".join(str(c) for c in failed)
        )
    return checks, notes
