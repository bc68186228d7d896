"""CMDCL: Cross-Modal Dual-Causal Learning for long-term action recognition.

    frames uint8 [B, F, H, W, 3]
      -> frame_tokens: normalise, per-frame CLIP ViT, class token + g x g pooled
         patches, projection to D                       -> tokens [B*F, S, D]
      -> head: temporal + slot embeddings, H spatio-temporal blocks, visual
         front-door intervention guided by T', pooling, cosine classifier
                                                         -> logits [B, C], embedding [B, D]

T' comes from the textual back-door intervention on the learnable label
texts T and the bias dictionary V_P; it depends on no input, so export folds
it into a constant. Frames are encoded independently, which is what lets the
streaming runtime cache per-frame tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .clip import CLIP, ResidualAttentionBlock, VisionTransformer
from .config import CMDCLConfig
from .interventions import TextualIntervention, VisualIntervention

# Buffers that hold the offline dictionaries; checkpoints store them apart.
DICTIONARY_KEYS = ("bias_dict", "bias_prior", "conf_dict", "conf_prior")


class CMDCL(nn.Module):
    def __init__(self, cfg: CMDCLConfig, class_names: list[str], text_init: torch.Tensor | None = None):
        super().__init__()
        if not class_names:
            raise ValueError("a CMDCL model needs at least one class name")
        self.cfg, self.class_names = cfg, list(class_names)
        num_classes, width, embed_dim = len(class_names), cfg.width, cfg.embed_dim
        g = cfg.token_grid

        self.register_buffer("pixel_mean", torch.tensor(cfg.mean).view(3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.std).view(3, 1, 1) * 255.0, persistent=False)

        # Video encoder: a learnable copy of the CLIP image tower.
        self.video_encoder = VisionTransformer(cfg.vision)
        self.token_proj = nn.Linear(embed_dim, width)
        self.temporal_embedding = nn.Parameter(0.02 * torch.randn(cfg.num_frames, width))
        self.slot_embedding = nn.Parameter(0.02 * torch.randn(1 + g * g, width))
        self.blocks = nn.ModuleList(
            ResidualAttentionBlock(width, cfg.heads, cfg.mlp_ratio, "gelu") for _ in range(cfg.depth)
        )
        self.ln_sta = nn.LayerNorm(width)

        # Label texts T (learnable, initialised from text embeddings) and dictionaries.
        self.text = nn.Parameter(text_init.clone() if text_init is not None else 0.02 * torch.randn(num_classes, embed_dim))
        if self.text.shape != (num_classes, embed_dim):
            raise ValueError(f"text_init must be [{num_classes}, {embed_dim}], got {list(self.text.shape)}")
        self.text_proj = nn.Linear(embed_dim, width)
        self.register_buffer("bias_dict", torch.randn(cfg.num_bias, embed_dim))
        self.register_buffer("bias_prior", torch.full((cfg.num_bias,), 1.0 / cfg.num_bias))
        self.register_buffer("conf_dict", torch.randn(cfg.num_confounders, embed_dim))
        self.register_buffer("conf_prior", torch.full((cfg.num_confounders,), 1.0 / cfg.num_confounders))

        keys = dict(key_norm=cfg.key_norm, learn_temperature=cfg.learn_temperature, fixed_key_proj=cfg.fixed_key_proj)
        self.textual = TextualIntervention(width, embed_dim, cfg.heads, cfg.use_bias_prior, **keys)
        self.visual = VisualIntervention(width, embed_dim, cfg.heads, cfg.use_confounder_prior, approximator=cfg.approximator, **keys)

        self.pool_query = nn.Parameter(torch.zeros(width)) if cfg.pooling == "attention" else None
        self.video_proj = nn.Linear(width, width, bias=False)  # Wp
        self.logit_scale = nn.Parameter(torch.tensor(math.log(cfg.logit_scale_init)))
        self.logit_bias = nn.Parameter(torch.zeros(()))

    # ---- construction from a frozen VLM -------------------------------------------------
    @classmethod
    def from_clip(cls, cfg: CMDCLConfig, class_names: list[str], clip: CLIP, text_embeddings: torch.Tensor | None = None):
        """Start from CLIP: the video encoder copies the image tower; T is
        initialised from `text_embeddings` (e.g. CLIP text features of the label
        prompts, or any other embedder's, of width D_vlm)."""
        model = cls(cfg, class_names, text_embeddings)
        model.video_encoder.load_state_dict(clip.visual.state_dict())
        return model

    def set_dictionaries(self, bias_dict, bias_prior, conf_dict, conf_prior) -> None:
        """Install the k-means dictionaries V_P, pi_b, Z, pi_z (priors sum to 1)."""
        for name, value in zip(DICTIONARY_KEYS, (bias_dict, bias_prior, conf_dict, conf_prior)):
            current = getattr(self, name)
            if value.shape != current.shape:
                raise ValueError(f"{name} must be {list(current.shape)}, got {list(value.shape)}")
            current.copy_(value)

    def set_intervention_impl(self, impl: str) -> None:
        """Run the fused intervention op with `impl` ("torch", or "triton" for
        the fused kernel on CUDA; see cmdcl.kernels.IMPLEMENTATIONS)."""
        from ..kernels import IMPLEMENTATIONS

        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"unknown intervention impl {impl!r}; available: {', '.join(IMPLEMENTATIONS)}")
        self.visual.impl = impl

    # ---- the two halves ----------------------------------------------------------------
    def frame_tokens(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 RGB frames [N, H, W, 3] -> tokens [N, S, D]. Independent per frame."""
        return self.token_proj(self.vlm_tokens(frames))

    def vlm_tokens(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 RGB frames [N, H, W, 3] -> image-tower tokens [N, S, D_vlm]
        (class token + g x g pooled patches), before the projection to D.
        On a frozen copy of the tower these are the features the dictionaries
        are built from (cmdcl.train.dictionaries)."""
        x = frames.permute(0, 3, 1, 2).float()
        x = (x - self.pixel_mean) / self.pixel_std
        tokens = self.video_encoder(x)  # [N, 1 + P*P, D_vlm]
        g = self.cfg.token_grid
        if g:
            n, p, d = tokens.shape[0], self.cfg.vision.grid, tokens.shape[-1]
            patches = tokens[:, 1:].reshape(n, g, p // g, g, p // g, d).mean(dim=(2, 4))
            tokens = torch.cat([tokens[:, :1], patches.reshape(n, g * g, d)], dim=1)
        else:
            tokens = tokens[:, :1]
        return tokens

    def text_features(self) -> torch.Tensor:
        """T' [C, D]: the debiased label texts (textual back-door intervention)."""
        text = self.text_proj(self.text)
        if not self.cfg.textual_intervention:
            return text
        return self.textual(text, self.bias_dict, self._log(self.bias_prior))

    def intervention_memories(self, text_debiased: torch.Tensor):
        """Constant inputs of the fused intervention op, from T' and Z."""
        return self.visual.memories(text_debiased, self.conf_dict, self._log(self.conf_prior))

    def head(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, F, S, D] -> (logits [B, C], embedding [B, D])."""
        text_debiased = self.text_features()
        return self.classify(tokens, text_debiased, self.intervention_memories(text_debiased))

    def classify(self, tokens, text_debiased, memories):
        """The input-dependent part of the head; export calls it with constants."""
        x = self.contextualize(tokens)
        if self.cfg.visual_intervention:
            x = self.visual(x, memories)
        embedding = F.normalize(self.video_proj(self.pool(x)), dim=-1)
        text = F.normalize(text_debiased, dim=-1)
        logits = self.logit_scale.clamp(max=math.log(100.0)).exp() * embedding @ text.t() + self.logit_bias
        return logits, embedding

    def contextualize(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, F, S, D] -> X [B, F*S, D]: temporal and slot embeddings, the spatio-temporal blocks and their
        LayerNorm; the visual intervention's input."""
        b, f, s, d = tokens.shape
        x = tokens + self.temporal_embedding[:f, None] + self.slot_embedding[None, :s]
        x = x.reshape(b, f * s, d)
        for block in self.blocks:
            x = block(x)
        return self.ln_sta(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool_query is None:
            return x.mean(dim=1)
        weights = torch.softmax(x @ self.pool_query / math.sqrt(x.shape[-1]), dim=1)
        return (weights.unsqueeze(-1) * x).sum(dim=1)

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 RGB frames [B, F, H, W, 3] -> (logits [B, C], embedding [B, D])."""
        b, f = frames.shape[:2]
        if f > self.cfg.num_frames:
            raise ValueError(f"got {f} frames; this model takes at most {self.cfg.num_frames}")
        tokens = self.frame_tokens(frames.flatten(0, 1))
        return self.head(tokens.view(b, f, *tokens.shape[1:]))

    # ---- outputs -----------------------------------------------------------------------
    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax over classes, or per-class sigmoid for multi-label models."""
        return torch.sigmoid(logits) if self.cfg.multi_label else torch.softmax(logits, dim=-1)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on class indices, or BCE on multi-hot targets [B, C]."""
        if self.cfg.multi_label:
            return F.binary_cross_entropy_with_logits(logits, targets.float())
        return F.cross_entropy(logits, targets)

    @staticmethod
    def _log(prior: torch.Tensor) -> torch.Tensor:
        return torch.log(prior.clamp_min(1e-12))
