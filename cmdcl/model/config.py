"""Configuration of a CMDCL model, as plain dataclasses.

Every choice docs/design.md section 2.9 lists as a reconstruction (pooling, token grid, depth,
dictionary sizes, use of priors, the two interventions) is a field here, so
ablations are a config change and the config round-trips through checkpoints
as a plain dict.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

# The limits on every number a config holds live in the artifact contract, which the command-line options use too.
from ..artifacts import (
    LIMITS,
    MAX_BUFFER_BYTES,
    MAX_CLASS_NAME,
    MAX_CLASSES,
    MAX_GRID,
    MAX_GRID_RATE,
    MAX_SAMPLING_SOURCE,
    SAMPLING_LIMITS,
)

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
    # Variants of the interventions (docs/design.md section 2.10); the defaults are the design's forms.
    approximator: str = "residual"  # "residual": V' = LN(X + Wo[X * sigmoid(M Wg); Zh]); "catt": V' = LN(Wo[M ; Zh])
    key_norm: str = "none"  # dictionary rows before the key projections: "none", "centre", "whiten"
    learn_temperature: bool = False  # a learnable inverse temperature on each dictionary's keys
    fixed_key_proj: bool = False  # the dictionary key projections keep their initial weights
    multi_label: bool = False  # sigmoid/BCE (Charades) instead of softmax/CE
    logit_scale_init: float = 1.0 / 0.07
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.text, dict):
            self.text = TextConfig(**self.text)
        self.mean, self.std = (tuple(v) if isinstance(v, (list, tuple)) else v for v in (self.mean, self.std))
        self.validate()

    @property
    def tokens_per_frame(self) -> int:
        return 1 + self.token_grid * self.token_grid

    @property
    def embed_dim(self) -> int:
        """D_vlm: width of CLIP embeddings, dictionaries and text init."""
        return self.vision.output_dim

    def validate(self) -> None:
        """Types, ranges (LIMITS) and shapes, so that nothing is sized from an absurd or malformed config."""
        problems = _field_problems(self.vision, "vision.") + _field_problems(self.text, "text.") + _field_problems(self)
        if not problems:
            problems = self._shape_problems()
        if problems:
            raise ValueError("invalid CMDCL config: " + "; ".join(problems))

    def _shape_problems(self) -> list[str]:
        problems = []
        for prefix, tower in (("", self), ("vision.", self.vision), ("text.", self.text)):
            if tower.width % tower.heads:
                problems.append(f"{prefix}width {tower.width} is not divisible by {prefix}heads {tower.heads}")
        grid = self.vision.grid
        if self.vision.image_size % self.vision.patch_size:
            problems.append("vision.image_size must be a multiple of vision.patch_size")
        elif grid > MAX_GRID:
            problems.append(f"vision.image_size / vision.patch_size is {grid}, at most {MAX_GRID} patches a side")
        if self.token_grid and grid % self.token_grid:
            problems.append(f"token_grid {self.token_grid} must divide the patch grid {grid}")
        if self.pooling not in ("mean", "attention"):
            problems.append(f"pooling must be 'mean' or 'attention', not {self.pooling!r}")
        if self.approximator not in ("residual", "catt"):
            problems.append(f"approximator must be 'residual' or 'catt', not {self.approximator!r:.40}")
        if self.key_norm not in ("none", "centre", "whiten"):
            problems.append(f"key_norm must be 'none', 'centre' or 'whiten', not {self.key_norm!r:.40}")
        for prefix, tower in (("vision.", self.vision), ("text.", self.text)):
            if tower.activation not in ("quick_gelu", "gelu"):
                problems.append(f"{prefix}activation must be 'quick_gelu' or 'gelu', not {tower.activation!r}")
        if not _numbers(self.mean, 0.0, 1.0) or not _numbers(self.std, 1e-3, 1.0):
            problems.append("mean needs three numbers in [0, 1] and std three in [0.001, 1] (RGB)")
        frames = self.num_frames * self.vision.image_size**2 * 3
        tokens = self.num_frames * self.tokens_per_frame * self.width * 4
        if max(frames, tokens) > MAX_BUFFER_BYTES:
            problems.append(f"one clip takes {max(frames, tokens) / 2**30:.1f} GiB (num_frames x image_size^2 x 3 "
                            f"bytes of frames, x tokens x width x 4 bytes of tokens), at most {MAX_BUFFER_BYTES / 2**30:g} GiB")
        return problems

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CMDCLConfig:
        """The config a plain dict describes (a checkpoint's, an export's); ValueError for anything else."""
        if not isinstance(d, dict):
            raise ValueError(f"a CMDCL config is an object, not {type(d).__name__}")
        d = dict(d)
        for name, tower in (("vision", VisionConfig), ("text", TextConfig)):
            if name in d and not isinstance(d[name], (dict, tower)):
                raise ValueError(f"CMDCL config field {name!r} must be an object")
            if isinstance(d.get(name), dict):
                d[name] = _known_fields(tower, d[name], f"{name}.")
        return cls(**_known_fields(cls, d, ""))

    def config_hash(self) -> str:
        """A short stable hash of the config, recorded in exported artifacts."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _known_fields(cls, d: dict, prefix: str) -> dict:
    """`d` when it names only fields of `cls`; missing ones take their defaults (and are validated like the rest),
    so checkpoints written before a field was added still load."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(d) - names))
    if unknown:
        raise ValueError(f"unknown CMDCL config fields: {', '.join(prefix + k for k in unknown)}"[:200])
    return d


def _field_problems(config, prefix: str = "") -> list[str]:
    """Each field of one config dataclass against its default's type and its LIMITS range."""
    problems = []
    for f in dataclasses.fields(config):
        value, default, name = getattr(config, f.name), f.default, prefix + f.name
        if isinstance(default, bool) or isinstance(default, str):
            if type(value) is not type(default):
                problems.append(f"{name} must be a {type(default).__name__}, not {value!r:.40}")
        elif isinstance(default, (int, float)) and f.name in LIMITS:
            low, high = LIMITS[f.name]
            number = int if isinstance(default, int) else (int, float)
            if not isinstance(value, number) or isinstance(value, bool):
                problems.append(f"{name} must be {'an integer' if number is int else 'a number'}, not {value!r:.40}")
            elif not low <= value <= high:  # NaN fails this too
                problems.append(f"{name} {value!r:.40} is out of range [{low:g}, {high:g}]")
    return problems


def _numbers(values, low: float, high: float, count: int = 3) -> bool:
    return (isinstance(values, (tuple, list)) and len(values) == count
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high for v in values))


def class_name_problem(names) -> str | None:
    """Why `names` cannot be a model's class list (None when it can): a non-empty list of
    distinct, non-empty strings, bounded in number and length."""
    if not isinstance(names, list) or not names:
        return "class names must be a non-empty list"
    if len(names) > MAX_CLASSES:
        return f"{len(names)} class names, at most {MAX_CLASSES}"
    for name in names:
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_CLASS_NAME:
            return f"class name {name!r:.60} is not a non-blank string of at most {MAX_CLASS_NAME} characters"
    seen = set()
    for name in names:
        if name in seen:
            return f"class name {name!r:.60} appears more than once"
        seen.add(name)
    return None


def sampling_problem(sampling, num_frames: int) -> str | None:
    """Why `sampling` (stream-mode settings: stream_fps, window_seconds, stride_frames, num_frames, and what cmdcl-train
    records them from: clip_seconds, source) cannot be used for a model of `num_frames` frames (None when it can);
    fields may be absent."""
    if not isinstance(sampling, dict):
        return "sampling must be an object"
    if "num_frames" in sampling and (type(sampling["num_frames"]) is not int or sampling["num_frames"] != num_frames):
        return f"sampling num_frames {sampling['num_frames']!r:.40} is not the model's {num_frames}"
    for key, (low, high) in SAMPLING_LIMITS.items():
        if key not in sampling:
            continue
        value = sampling[key]
        number = int if isinstance(low, int) else (int, float)
        if not isinstance(value, number) or isinstance(value, bool) or not low <= value <= high:
            return f"sampling {key} {value!r:.40} is not {'an integer' if number is int else 'a number'} in [{low:g}, {high:g}]"
    source = sampling.get("source", "")
    if not isinstance(source, str) or len(source) > MAX_SAMPLING_SOURCE:
        return f"sampling source {source!r:.40} is not a string of at most {MAX_SAMPLING_SOURCE} characters"
    if "window_seconds" in sampling and num_frames / sampling["window_seconds"] > MAX_GRID_RATE:
        return (f"sampling takes {num_frames} frames in {sampling['window_seconds']:g} s, more than {MAX_GRID_RATE:g} frames "
                f"per second")
    return None


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
