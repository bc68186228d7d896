"""The PyTorch CMDCL model, its CLIP towers and checkpoint I/O."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .clip import CLIP, load_clip, read_clip_state_dict
from .cmdcl import CMDCL
from .config import CMDCLConfig, TextConfig, VisionConfig, base_config, preset, tiny_config

__all__ = [
    "CLIP",
    "CMDCL",
    "CMDCLConfig",
    "CheckpointError",
    "TextConfig",
    "VisionConfig",
    "base_config",
    "load_checkpoint",
    "load_clip",
    "preset",
    "read_clip_state_dict",
    "save_checkpoint",
    "tiny_config",
]
