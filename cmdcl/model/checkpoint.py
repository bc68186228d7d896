"""CMDCL checkpoints: a dict of plain types and tensors (DESIGN.md section 4).

    {"format": "cmdcl-checkpoint", "format_version": 1, "toolkit_version": str,
     "config": dict, "class_names": [str], "state_dict": {name: tensor},
     "dictionaries": {"bias_dict", "bias_prior", "conf_dict", "conf_prior"},
     "preprocessing": {"image_size", "mean", "std", "resize"}, "extra": dict}

Loading goes through torch.load(weights_only=True): nothing in the file is
executed, and every way a file can be wrong raises CheckpointError naming the
file and the problem.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from .. import __version__
from .cmdcl import CMDCL, DICTIONARY_KEYS
from .config import CMDCLConfig

FORMAT = "cmdcl-checkpoint"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "format_version", "config", "class_names", "state_dict", "dictionaries")


class CheckpointError(ValueError):
    """A file that cannot be loaded as a CMDCL checkpoint; the message names it."""


def save_checkpoint(model: CMDCL, path: str | Path, extra: dict | None = None) -> Path:
    """Write `model` atomically (a temporary file renamed into place)."""
    path = Path(path)
    state = {k: v for k, v in model.state_dict().items() if k not in DICTIONARY_KEYS}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "toolkit_version": __version__,
        "config": model.cfg.to_dict(),
        "class_names": list(model.class_names),
        "state_dict": state,
        "dictionaries": {k: getattr(model, k).detach().clone() for k in DICTIONARY_KEYS},
        "preprocessing": {
            "image_size": model.cfg.vision.image_size,
            "mean": list(model.cfg.mean),
            "std": list(model.cfg.std),
            "resize": "shorter side to image_size, centre crop",
        },
        "extra": dict(extra or {}),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def read_checkpoint(path: str | Path) -> dict:
    """Read and validate the raw checkpoint dict without building a model."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = _unpickler_detail(str(exc))
        if "global" in detail.lower():
            raise CheckpointError(f"{path}: refused to load: the file holds objects other than tensors and plain types ({detail})") from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({detail})") from None
    # IndexError/KeyError: the weights-only unpickler on bytes that are not a pickle at all.
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, IndexError, KeyError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({_first_line(str(exc)) or type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a CMDCL checkpoint (no format tag {FORMAT!r})")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: CMDCL checkpoint is missing keys: {', '.join(missing)}")
    if payload["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {payload['format_version']!r} is not supported "
            f"(this toolkit reads version {FORMAT_VERSION})"
        )
    missing_dicts = [k for k in DICTIONARY_KEYS if k not in payload["dictionaries"]]
    if missing_dicts:
        raise CheckpointError(f"{path}: checkpoint dictionaries are missing: {', '.join(missing_dicts)}")
    return payload


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _unpickler_detail(message: str) -> str:
    """The informative line of torch's long weights-only error message."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    for line in message.splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line and not line.startswith(boilerplate):
            return line
    return _first_line(message)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> CMDCL:
    """Build the model a checkpoint describes and load its weights (eval mode)."""
    payload = read_checkpoint(path)
    try:
        cfg = CMDCLConfig.from_dict(payload["config"])
        model = CMDCL(cfg, payload["class_names"])
        state = {**payload["state_dict"], **payload["dictionaries"]}
        model.load_state_dict(state, strict=True)
    except (ValueError, TypeError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{path}: checkpoint does not match the CMDCL model ({_first_line(str(exc))})") from None
    model.checkpoint_extra = payload.get("extra", {})
    return model.to(map_location).eval()
