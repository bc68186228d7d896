"""Configuration of a CMDCL model, as plain dataclasses.

Every choice DESIGN.md marks as a reconstruction (pooling, token grid, depth,
dictionary sizes, use of priors, the two interventions) is a field here, so
ablations are a config change and the config round-trips through checkpoints
as a plain dict.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

# OpenAI CLIP's preprocessing constants (RGB, images scaled to [0, 1]).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    """A CLIP ViT image tower (OpenAI layout)."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    output_dim: int = 512  # D_vlm: the joint image-text embedding width
    activation: str = "quick_gelu"  # OpenAI checkpoints use QuickGELU

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class TextConfig:
    """A CLIP text tower (OpenAI layout); used offline to initialise T."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    layers: int = 12
    heads: int = 8
    output_dim: int = 512
    activation: str = "quick_gelu"


@dataclass
class CMDCLConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    num_frames: int = 64  # F
    token_grid: int = 2  # g: S = 1 + g*g tokens per frame (g = 0: class token only)
    width: int = 512  # D
    heads: int = 8  # h
    depth: int = 6  # H spatio-temporal attention blocks
    mlp_ratio: float = 4.0
    num_bias: int = 512  # Kb, size of the cross-modal bias dictionary V_P
    num_confounders: int = 512  # Kz, size of the visual confounder dictionary Z
    textual_intervention: bool = True  # back-door on T (ablation: False -> T' = T)
    visual_intervention: bool = True  # front-door on V (ablation: False -> V' = X)
    use_bias_prior: bool = True  # add log pi_b in the textual attention
    use_confounder_prior: bool = True  # add log pi_z in the cross-sample attention
    pooling: str = "mean"  # "mean" or "attention"
    multi_label: bool = False  # sigmoid/BCE (Charades) instead of softmax/CE
    logit_scale_init: float = 1.0 / 0.07
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.text, dict):
            self.text = TextConfig(**self.text)
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        self.validate()

    @property
    def tokens_per_frame(self) -> int:
        return 1 + self.token_grid * self.token_grid

    @property
    def embed_dim(self) -> int:
        """D_vlm: width of CLIP embeddings, dictionaries and text init."""
        return self.vision.output_dim

    def validate(self) -> None:
        problems = []
        if self.width % self.heads:
            problems.append(f"width {self.width} is not divisible by heads {self.heads}")
        grid = self.vision.grid
        if self.vision.image_size % self.vision.patch_size:
            problems.append("vision.image_size must be a multiple of vision.patch_size")
        if self.token_grid < 0 or (self.token_grid and grid % self.token_grid):
            problems.append(f"token_grid {self.token_grid} must divide the patch grid {grid}")
        if self.pooling not in ("mean", "attention"):
            problems.append(f"pooling must be 'mean' or 'attention', not {self.pooling!r}")
        for name in ("num_frames", "num_bias", "num_confounders"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if self.depth < 0:
            problems.append("depth must be >= 0")
        if len(self.mean) != 3 or len(self.std) != 3:
            problems.append("mean and std need three values (RGB)")
        if problems:
            raise ValueError("invalid CMDCL config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CMDCLConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown CMDCL config fields: {', '.join(unknown)}")
        return cls(**d)

    def config_hash(self) -> str:
        """A short stable hash of the config, recorded in exported artifacts."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def tiny_config(**overrides) -> CMDCLConfig:
    """A small ViT at 96 px and 8 frames: tests and the bundled demo model."""
    cfg = dict(
        vision=VisionConfig(image_size=96, patch_size=16, width=128, layers=2, heads=4, output_dim=128),
        text=TextConfig(context_length=32, vocab_size=49408, width=128, layers=2, heads=4, output_dim=128),
        num_frames=8,
        token_grid=2,
        width=128,
        heads=4,
        depth=2,
        num_bias=32,
        num_confounders=32,
    )
    cfg.update(overrides)
    return CMDCLConfig(**cfg)


def base_config(**overrides) -> CMDCLConfig:
    """The paper's setting as far as known: CLIP ViT-B/16, 224 px, 64 frames."""
    return CMDCLConfig(**overrides)


PRESETS = {"tiny": tiny_config, "base": base_config}


def preset(name: str, **overrides) -> CMDCLConfig:
    try:
        return PRESETS[name](**overrides)
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None
