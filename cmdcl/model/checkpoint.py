"""CMDCL checkpoints: a dict of plain types and tensors (docs/design.md section 4.2).

    {"format": "cmdcl-checkpoint", "format_version": 1, "toolkit_version": str,
     "config": dict, "class_names": [str], "state_dict": {name: tensor},
     "dictionaries": {"bias_dict", "bias_prior", "conf_dict", "conf_prior"},
     "preprocessing": {"image_size", "mean", "std", "resize"}, "extra": dict}

Loading goes through torch.load(weights_only=True): nothing in the file is
executed, and every way a file can be wrong raises CheckpointError naming the
file and the problem. Sizes are checked before any tensor is read: the zip's
entries must be stored as torch.save writes them (a deflated entry could unpack
to gigabytes), the config is validated against its LIMITS, and the tensors may
not be much larger than the model the config describes.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from .. import __version__
from ..errors import CmdclError, first_line
from ..output_files import atomic_write
from .cmdcl import CMDCL, DICTIONARY_KEYS
from .config import CMDCLConfig, class_name_problem, sampling_problem

FORMAT = "cmdcl-checkpoint"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "format_version", "config", "class_names", "state_dict", "dictionaries")
MAX_MODEL_BYTES = 16 * 2**30  # the largest model (and tensor data) a checkpoint may hold; ViT-bigG's tower is ~7 GiB
MAX_PICKLE_BYTES = 64 * 2**20  # the pickled dict around the tensors: config, class names, extra
EXTRA_TENSOR_BYTES = 64 * 2**20  # tensor data allowed beyond the model's own state (whatever `extra` holds)


class CheckpointError(CmdclError, ValueError):
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
    with atomic_write(path) as tmp:  # an interrupted save leaves the previous checkpoint as it was
        torch.save(payload, tmp)
    return path


def read_checkpoint(path: str | Path) -> dict:
    """Read and validate the raw checkpoint dict; the only model built is a size probe on the meta device."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    tensor_bytes = archive_tensor_bytes(path)
    try:  # mmap: the tensors stay in the file until their size has been checked against the config
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        detail = _unpickler_detail(str(exc))
        if "global" in detail.lower():
            raise CheckpointError(f"{path}: refused to load: the file holds objects other than tensors and plain types "
                                  f"({detail})") from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({detail})") from None
    # IndexError/KeyError: the weights-only unpickler on bytes that are not a pickle at all.
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, IndexError, KeyError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({first_line(exc)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a CMDCL checkpoint (no format tag {FORMAT!r})")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: CMDCL checkpoint is missing keys: {', '.join(missing)}")
    if payload["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {payload['format_version']!r:.40} is not supported "
            f"(this toolkit reads version {FORMAT_VERSION})"
        )
    for key in ("state_dict", "dictionaries", "extra"):
        if not isinstance(payload.get(key, {}), dict):
            raise CheckpointError(f"{path}: checkpoint {key!r} is not a dict")
    missing_dicts = [k for k in DICTIONARY_KEYS if k not in payload["dictionaries"]]
    if missing_dicts:
        raise CheckpointError(f"{path}: checkpoint dictionaries are missing: {', '.join(missing_dicts)}")
    model_bytes = _model_bytes(path, payload)
    if tensor_bytes > model_bytes + EXTRA_TENSOR_BYTES:
        raise CheckpointError(f"{path}: refused: its tensors take {_mib(tensor_bytes)}, far more than the "
                              f"{_mib(model_bytes)} of the model its config describes")
    try:
        return _in_memory(payload)
    except RecursionError:
        raise CheckpointError(f"{path}: refused: its data is nested too deeply") from None


def archive_tensor_bytes(path: Path) -> int:
    """The unpacked size of the tensors in torch's zip archive, read from its directory before
    anything is unpacked; refuses compressed entries (torch.save never writes them) and sizes
    beyond the MAX_ bounds."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint (not a zip archive as torch.save writes: "
                              f"{first_line(exc)})") from None
    tensor_bytes = 0
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED or entry.compress_size != entry.file_size:
            raise CheckpointError(f"{path}: refused: archive entry {entry.filename!r:.80} is compressed "
                                  f"(torch.save stores entries as they are; this file was rewritten)")
        if entry.filename.endswith("/data.pkl") and entry.file_size > MAX_PICKLE_BYTES:
            raise CheckpointError(f"{path}: refused: its pickled data takes {_mib(entry.file_size)}, "
                                  f"at most {_mib(MAX_PICKLE_BYTES)}")
        tensor_bytes += entry.file_size if "/data/" in entry.filename else 0
    if tensor_bytes > MAX_MODEL_BYTES + EXTRA_TENSOR_BYTES:
        raise CheckpointError(f"{path}: refused: its tensors take {_mib(tensor_bytes)}, "
                              f"at most {_mib(MAX_MODEL_BYTES + EXTRA_TENSOR_BYTES)}")
    return tensor_bytes


def _model_bytes(path: Path, payload: dict) -> int:
    """Bytes of the state (weights and dictionaries) of the model the checkpoint's config describes,
    counted on the meta device (no memory); CheckpointError for an invalid config or class list."""
    problem = class_name_problem(payload["class_names"])
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    try:
        cfg = CMDCLConfig.from_dict(payload["config"])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: {first_line(str(exc))}") from None
    extra = payload.get("extra", {})
    problem = sampling_problem(extra.get("sampling", {}), cfg.num_frames)
    if problem:
        raise CheckpointError(f"{path}: checkpoint extra: {problem}")
    with torch.device("meta"):
        state = CMDCL(cfg, payload["class_names"]).state_dict()
    size = sum(t.numel() * t.element_size() for t in state.values())
    if size > MAX_MODEL_BYTES:
        raise CheckpointError(f"{path}: refused: its config describes a model of {_mib(size)}, at most {_mib(MAX_MODEL_BYTES)}")
    return size


def _in_memory(value):
    """A copy of the loaded payload with every tensor read out of the memory-mapped file."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _in_memory(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_in_memory(v) for v in value)
    return value


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


def _unpickler_detail(message: str) -> str:
    """The informative line of torch's long weights-only error message."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    for line in message.splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line and not line.startswith(boilerplate):
            return line
    return first_line(message)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> CMDCL:
    """Build the model a checkpoint describes and load its weights (eval mode)."""
    payload = read_checkpoint(path)
    try:
        model = CMDCL(CMDCLConfig.from_dict(payload["config"]), payload["class_names"])
        state = {**payload["state_dict"], **payload["dictionaries"]}
        model.load_state_dict(state, strict=True)
    except (ValueError, TypeError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{path}: checkpoint does not match the CMDCL model ({first_line(str(exc))})") from None
    model.checkpoint_extra = payload.get("extra", {})
    return model.to(map_location).eval()
