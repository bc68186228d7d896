"""The artifact contract: what cmdcl-export and cmdcl-build write and what every reader expects (docs/design.md section 4).

One export is up to three graphs, each named by its role:

    full           frames uint8 [B, F, H, W, 3] -> logits [B, C], embedding [B, D]
    frame_encoder  frames uint8 [N, H, W, 3]    -> tokens [N, S, D]
    head           tokens [B, F, S, D]          -> logits [B, C], embedding [B, D]

`graph_io` is the one table of their inputs and outputs (the ONNX graphs, `Backend.io`, the
PyTriton bindings and the Triton repository's configs are derived from it), `graph_path` the
file names of the split graphs and engines beside the model, `sidecar_path` / `read_sidecar`
a TensorRT engine's JSON sidecar, `model_files` every file one model file brings with it (what
the commands' clash checks protect), and `default_sampling` how stream mode samples a model
that records no sampling of its own. No torch or onnx here (numpy only inside relative_error): export, runtime, serve,
bench and cli all import it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Literal

GraphRole = Literal["full", "frame_encoder", "head"]
GRAPH_ROLES: tuple[GraphRole, ...] = ("full", "frame_encoder", "head")
SPLIT_ROLES: tuple[GraphRole, ...] = ("frame_encoder", "head")  # stream mode's split of the full graph

# Stream mode, when a model records no sampling: one grid frame per second, windows overlapping by half.
DEFAULT_STREAM_FPS = 1.0
MAX_GRID_RATE = 1000.0  # grid frames per second (num_frames / window_seconds) a model's sampling may ask for
MAX_SCALES = 8  # most window lengths one stream mode run takes
MAX_RING_FRAMES = 4096  # most grid frames the ring buffer keeps: the longest window at the shortest one's grid

# The allowed range of every number a config holds, by field name (vision, text and the top level share
# width/heads/...). A checkpoint or an export is checked against it before a model, a clip or a token buffer is
# sized from it; the command-line options (cmdcl.cli.options) are bounded by it too. Generous for real towers:
# ViT-L/14@336, ViT-bigG (width 1664, 48 layers), 64-frame clips.
LIMITS = {
    "image_size": (1, 1024), "patch_size": (1, 1024), "width": (1, 8192), "layers": (1, 64), "heads": (1, 256),
    "output_dim": (1, 8192), "context_length": (1, 4096), "vocab_size": (1, 1_000_000), "num_frames": (1, 4096),
    "token_grid": (0, 64), "depth": (0, 64), "mlp_ratio": (0.25, 16.0), "num_bias": (1, 65536),
    "num_confounders": (1, 65536), "logit_scale_init": (1e-3, 1e3),
}
MAX_GRID = 64  # patches per side of a frame (1024 px / 16): the vision tower attends over grid^2 + 1 tokens
MAX_BUFFER_BYTES = 2**30  # one clip's frames (F x size x size x 3 bytes), and its tokens (F x S x D x 4 bytes)
MAX_CLASSES, MAX_CLASS_NAME = 100_000, 1000  # class names: how many, and characters in one
# Stream-mode sampling (a checkpoint's extra["sampling"], an export's metadata): field -> (min, max). A window may span
# up to a day (one frame of a day-long window: stream_fps 1 / 86400); clip_seconds is the training clips' span it came from.
SAMPLING_LIMITS = {"stream_fps": (1e-5, 1000.0), "window_seconds": (0.01, 86400.0), "stride_frames": (1, 4096),
                   "clip_seconds": (0.01, 86400.0)}
MAX_SAMPLING_SOURCE = 200  # characters of sampling "source": where the values came from, in words
# The ONNX opsets cmdcl-export writes: LayerNormalization is one op from opset 17 on, which is what lets fp16
# export keep it in fp32 (and the local function needs 15); torch's TorchScript exporter writes at most 20.
MIN_OPSET, MAX_OPSET = 17, 20


# How far an exported, compiled or fused path may be from the PyTorch reference: relative L2 error
# ||out - ref|| / ||ref|| of logits and embeddings, by precision (docs/design.md section 7).
TOLERANCES = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 2e-2}


def relative_error(out, ref) -> float:
    """||out - ref|| / ||ref|| over the whole arrays, in float64: what TOLERANCES bound."""
    import numpy as np

    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def graph_io(role: GraphRole, num_frames: int, image_size: int, tokens_per_frame: int, width: int,
             num_classes: int) -> tuple[dict, dict]:
    """(inputs, outputs) of a `role` graph: name -> (numpy dtype name, shape), None for the dynamic batch axis."""
    f, size, s, d, c = num_frames, image_size, tokens_per_frame, width, num_classes
    heads = {"logits": ("float32", [None, c]), "embedding": ("float32", [None, d])}
    return {
        "full": ({"frames": ("uint8", [None, f, size, size, 3])}, heads),
        "frame_encoder": ({"frames": ("uint8", [None, size, size, 3])}, {"tokens": ("float32", [None, s, d])}),
        "head": ({"tokens": ("float32", [None, f, s, d])}, heads),
    }[role]


def graph_path(model_path: str | Path, role: GraphRole) -> Path:
    """The file of one graph (or engine): the model itself for "full", else `<stem>.<role><suffix>` beside it
    (beside the file a symlinked model points to: `companion_base`)."""
    if role == "full":
        return Path(model_path)
    base = companion_base(model_path)
    return base.with_name(f"{base.stem}.{role}{base.suffix}")


def sidecar_path(engine_path: str | Path) -> Path:
    """A TensorRT engine's JSON sidecar: `model.plan` -> `model.plan.json` (for a symlink, its target's)."""
    base = companion_base(engine_path)
    return base.with_name(base.name + ".json")


def companion_base(model_path: str | Path) -> Path:
    """The name a model file's split graphs and sidecars are derived from: the file itself, or the file a symlink
    points to (`latest.onnx -> v3.onnx` brings `v3.head.onnx`), so that the writers, the runtime and the clash
    checks all name the same files."""
    model_path = Path(model_path)
    return Path(os.path.realpath(model_path)) if model_path.is_symlink() else model_path


def model_files(model_path: str | Path, name: str) -> list[tuple[str, Path]]:
    """Every file the runtime reads for the model file `model_path`, as `check_outputs` inputs (description, path),
    `name` describing the model (e.g. "the --engine model"): the file itself; for an ONNX model its split graphs;
    for a TensorRT engine (neither .onnx nor a .pt checkpoint) its split engines and each one's JSON sidecar.
    The one list of a model's companions for every command's clash check."""
    model_path = Path(model_path)
    suffix = model_path.suffix.lower()
    files = [(name, model_path)]
    if suffix == ".pt":  # a checkpoint holds the whole model
        return files
    files += [(f"{name}'s {role} graph", graph_path(model_path, role)) for role in SPLIT_ROLES]
    if suffix != ".onnx":
        files += [(f"{what}'s sidecar", sidecar_path(path)) for what, path in files]
    return files


def read_sidecar(engine_path: str | Path) -> dict:
    """The JSON sidecar cmdcl-build wrote for `engine_path`, checked: its "metadata" as the ONNX file's is
    (`check_metadata`) and its "batch_profile" (1 <= min <= opt <= max). Raises ModelFileError naming the sidecar."""
    from .export.metadata import ModelFileError, check_metadata

    sidecar = sidecar_path(engine_path)
    try:
        content = json.loads(sidecar.read_text())
        check_metadata(sidecar, content["metadata"])
        profile = content["batch_profile"]
    except ModelFileError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        detail = f"{str(exc) or type(exc).__name__:.100}"
        raise ModelFileError(f"{sidecar}: cannot read the engine's sidecar ({detail}); build the engine with cmdcl-build") from None
    if not (isinstance(profile, dict) and all(type(profile.get(k)) is int for k in ("min", "opt", "max"))
            and 1 <= profile["min"] <= profile["opt"] <= profile["max"]):
        raise ModelFileError(f"{sidecar}: batch_profile {profile!r:.80} is not integers 1 <= min <= opt <= max")
    return content


def default_sampling(num_frames: int) -> dict:
    """How stream mode samples a model of `num_frames` frames when its checkpoint records nothing else."""
    return {"num_frames": num_frames, "video": "uniform", "stream_fps": DEFAULT_STREAM_FPS,
            "window_seconds": num_frames / DEFAULT_STREAM_FPS, "stride_frames": default_stride_frames(num_frames)}


def default_stride_frames(num_frames: int) -> int:
    """Windows overlapping by half."""
    return max(1, num_frames // 2)


def window_seconds(sampling: dict, num_frames: int) -> float:
    """A recorded sampling's window length; an absent field takes its default."""
    fps = sampling.get("stream_fps", DEFAULT_STREAM_FPS)
    return float(sampling.get("window_seconds", num_frames / fps))


def stride_frames(sampling: dict, num_frames: int) -> int:
    """A recorded sampling's step between windows, in grid frames; an absent field takes its default."""
    return int(sampling.get("stride_frames", default_stride_frames(num_frames)))


def window_scales(window, num_frames: int) -> tuple[float, ...]:
    """Stream mode's windows (seconds) from one number or several: de-duplicated, ascending, and checked, since a
    grid of F / W_1 frames per second and a ring of W_n / W_1 * F grid frames must stay bounded. ValueError says why not."""
    values = list(window) if isinstance(window, (list, tuple)) else [window]
    try:
        scales = tuple(sorted({float(value) for value in values}))
    except (TypeError, ValueError):
        raise ValueError(f"window: {values!r:.80} is not a number of seconds or a list of them") from None
    if not 1 <= len(scales) <= MAX_SCALES:
        raise ValueError(f"window: give 1 to {MAX_SCALES} different window lengths, not {len(scales)}")
    if not all(math.isfinite(scale) and scale > 0 for scale in scales):
        raise ValueError(f"window: every window must be a positive number of seconds, got {', '.join(f'{s:g}' for s in scales)}")
    if num_frames / scales[0] > MAX_GRID_RATE:
        raise ValueError(f"window {scales[0]:g} s is too short for {num_frames} frames: at most {MAX_GRID_RATE:g} "
                         f"grid frames per second (a window of at least {num_frames / MAX_GRID_RATE:g} s)")
    if scales[-1] / scales[0] * num_frames > MAX_RING_FRAMES:
        raise ValueError(f"window: {scales[-1]:g} s at the grid of the {scales[0]:g} s window ({num_frames} frames) is "
                         f"{scales[-1] / scales[0] * num_frames:.0f} grid frames; at most {MAX_RING_FRAMES} (a longest window of at most "
                         f"{MAX_RING_FRAMES / num_frames * scales[0]:g} s)")
    _, spans, _ = stream_grid(num_frames, scales, 1.0)
    for shorter, longer, span, next_span in zip(scales, scales[1:], spans, spans[1:]):
        if span == next_span:  # the same grid frames: the two lengths would give the same windows twice
            raise ValueError(f"window: {shorter:g} s and {longer:g} s both span {span} grid frames of the {scales[0]:g} s window's "
                             f"grid ({num_frames} frames); give lengths at least {scales[0] / num_frames:g} s apart")
    return scales


def window_positions(num_frames: int, span: int) -> list[int]:
    """The positions (0 = oldest) of the F tokens a window takes from its last `span` grid frames: the centre of each
    of F equal segments, floor((j + 0.5) * span / F). With span == F every frame once; with fewer frames (a part
    shorter than a window) some repeat. cmdcl/serve/triton_bls.py mirrors this rule (it runs inside Triton without cmdcl
    installed); a test pins both to the same values."""
    return [(2 * j + 1) * span // (2 * num_frames) for j in range(num_frames)]


def stream_grid(num_frames: int, scales: tuple[float, ...], stride_seconds: float) -> tuple[float, tuple[int, ...], int]:
    """Stream mode's grid for `window_scales(...)` and a stride in seconds: (grid frames per second, the grid frames
    each scale's window spans (the ring keeps the longest), the stride in grid frames). The shortest window's F
    frames set the grid; cmdcl-run and the Triton repository's cmdcl_stream model both take it from here."""
    grid_rate = num_frames / scales[0]
    spans = tuple(round(num_frames * scale / scales[0]) for scale in scales)
    return grid_rate, spans, max(1, round(stride_seconds * grid_rate))
