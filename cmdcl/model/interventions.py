"""The two causal interventions of CMDCL (docs/design.md sections 2.3 and 2.6).

Each attends over a constant dictionary (V_P for the textual one, Z for the visual one). Variants of the
dictionary keys (CMDCLConfig.key_norm, learn_temperature, fixed_key_proj) change only the memories, which depend
on parameters and constants; the approximator variant (CMDCLConfig.approximator) changes only the standard ops
after the fused op. So export, ONNX Runtime, the TensorRT plugin and the Triton kernel carry over unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import causal_intervention
from ..kernels.reference import memory_weights, merge_heads, split_heads

KEY_NORMS = ("none", "centre", "whiten")
APPROXIMATORS = ("residual", "catt")


def heads_of(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """A constant memory [K, h*d] -> [h, K, d]."""
    return split_heads(x.unsqueeze(0), num_heads).squeeze(0)


def normalise_rows(rows: torch.Tensor, mode: str) -> torch.Tensor:
    """Dictionary rows [K, D] as the key projection sees them: unchanged ("none"), minus their mean ("centre"), or
    centred and ZCA-whitened ("whiten": unit variance along every direction the rows span), so that keys differ
    by what sets the rows apart rather than by what they share (a random tower's rows are nearly collinear)."""
    if mode == "none":
        return rows
    centred = rows - rows.mean(dim=0)
    if mode == "centre":
        return centred
    centred64 = centred.double()  # in float64: directions the rows do not span must stay at zero, not be amplified
    eigenvalues, eigenvectors = torch.linalg.eigh(centred64.T @ centred64 / rows.shape[0])
    spanned = eigenvalues > 1e-9 * eigenvalues.max().clamp_min(1e-30)
    basis = eigenvectors[:, spanned]
    return (centred64 @ basis @ torch.diag(eigenvalues[spanned].rsqrt()) @ basis.T).to(rows.dtype)


class DictionaryKeys(nn.Linear):
    """Keys of a dictionary: Wk applied to its (normalised) rows, times a learnable inverse temperature
    exp(log_temperature) when asked; a fixed Wk keeps its initial weights. An nn.Linear, so that checkpoints keep
    the keys' parameter names."""

    def __init__(self, in_dim: int, width: int, key_norm: str = "none", learn_temperature: bool = False,
                 fixed: bool = False):
        super().__init__(in_dim, width)
        self.key_norm = key_norm
        self.requires_grad_(not fixed)
        self.log_temperature = nn.Parameter(torch.zeros(())) if learn_temperature else None

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        keys = super().forward(normalise_rows(rows, self.key_norm))
        return keys if self.log_temperature is None else keys * self.log_temperature.exp()


class TextualIntervention(nn.Module):
    """Back-door adjustment on the label texts (cuts B -> T).

    A = softmax((T Wq)(V_P Wk)^T / sqrt(d) + log pi_b), Bh = A (V_P Wv),
    T' = LN(T + Wt [T ; T * Bh]). Bh is the NWGM estimate of the cross-modal
    bias each label text carries; T' depends on parameters and constants only.
    """

    def __init__(self, width: int, embed_dim: int, heads: int, use_prior: bool = True, key_norm: str = "none",
                 learn_temperature: bool = False, fixed_key_proj: bool = False):
        super().__init__()
        self.heads, self.use_prior = heads, use_prior
        self.q = nn.Linear(width, width)
        self.k = DictionaryKeys(embed_dim, width, key_norm, learn_temperature, fixed_key_proj)
        self.v = nn.Linear(embed_dim, width)
        self.t = nn.Linear(2 * width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, text, bias_dict, log_prior):
        """text [C, D], bias_dict V_P [Kb, D_vlm], log_prior [Kb] -> T' [C, D]."""
        weights = self.attention(text, bias_dict, log_prior).unsqueeze(0)  # [1, h, C, Kb]
        v = heads_of(self.v(bias_dict), self.heads)
        bias = merge_heads(torch.matmul(weights.to(v.dtype), v)).squeeze(0)
        return self.norm(text + self.t(torch.cat([text, text * bias], dim=-1)))

    def attention(self, text, bias_dict, log_prior) -> torch.Tensor:
        """A: the attention of each label text over the rows of V_P, per head [h, C, Kb] (diagnostics read it)."""
        q = split_heads(self.q(text).unsqueeze(0), self.heads)
        k = heads_of(self.k(bias_dict), self.heads)
        scale = (text.shape[-1] // self.heads) ** -0.5
        return memory_weights(q, k, scale, log_prior if self.use_prior else None).squeeze(0)


class VisualIntervention(nn.Module):
    """Front-door adjustment on the video tokens (V -> M -> Y).

    One query projection feeds the fused op over two constant memories: the
    debiased texts T' (mediator M, in-sample) and the confounder dictionary Z
    (cross-sample Zh, with log pi_z). Approximator (NWGM), `approximator`:
    "residual" (the design's): V' = LN(X + Wo [X * sigmoid(M Wg) ; Zh]);
    "catt" (CATT's): V' = LN(Wo [M ; Zh]), the attention outputs without the X bypass.
    """

    def __init__(self, width: int, embed_dim: int, heads: int, use_prior: bool = True, impl: str = "torch",
                 approximator: str = "residual", key_norm: str = "none", learn_temperature: bool = False,
                 fixed_key_proj: bool = False):
        super().__init__()
        self.heads, self.use_prior, self.impl, self.approximator = heads, use_prior, impl, approximator
        self.q = nn.Linear(width, width)
        self.k_text = nn.Linear(width, width)
        self.v_text = nn.Linear(width, width)
        self.k_conf = DictionaryKeys(embed_dim, width, key_norm, learn_temperature, fixed_key_proj)
        self.v_conf = nn.Linear(embed_dim, width)
        self.gate = nn.Linear(width, width) if approximator == "residual" else None
        self.out = nn.Linear(2 * width, width)
        self.norm = nn.LayerNorm(width)

    def memories(self, text_debiased, conf_dict, log_prior):
        """The op's constant inputs: (Kt, Vt, Kz, Vz, log_prior), already per head.

        These depend on parameters and constants only; export folds them.
        """
        h = self.heads
        prior = log_prior if self.use_prior else torch.zeros_like(log_prior)
        return (
            heads_of(self.k_text(text_debiased), h),
            heads_of(self.v_text(text_debiased), h),
            heads_of(self.k_conf(conf_dict), h),
            heads_of(self.v_conf(conf_dict), h),
            prior,
        )

    def forward(self, x, memories):
        """x [B, L, D] -> V' [B, L, D]."""
        fused = causal_intervention(self.q(x), *memories, num_heads=self.heads, impl=self.impl)
        mediator, cross_sample = fused.chunk(2, dim=-1)
        if self.approximator == "catt":
            return self.norm(self.out(torch.cat([mediator, cross_sample], dim=-1)))
        gated = x * torch.sigmoid(self.gate(mediator))
        return self.norm(x + self.out(torch.cat([gated, cross_sample], dim=-1)))

    def attention(self, x, memories) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused op's two attentions for x [B, L, D], per head: over the C rows of T' [B, h, L, C] and over the
        Kz rows of Z [B, h, L, Kz] (diagnostics read them; the op itself never materialises them)."""
        kt, _, kz, _, prior = memories
        q = split_heads(self.q(x), self.heads)
        scale = (x.shape[-1] // self.heads) ** -0.5
        return memory_weights(q, kt, scale), memory_weights(q, kz, scale, prior)
