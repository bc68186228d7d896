"""The two causal interventions of CMDCL (docs/design.md sections 2.3 and 2.6)."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import causal_intervention
from ..kernels.reference import memory_attention, merge_heads, split_heads


def heads_of(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """A constant memory [K, h*d] -> [h, K, d]."""
    return split_heads(x.unsqueeze(0), num_heads).squeeze(0)


class TextualIntervention(nn.Module):
    """Back-door adjustment on the label texts (cuts B -> T).

    A = softmax((T Wq)(V_P Wk)^T / sqrt(d) + log pi_b), Bh = A (V_P Wv),
    T' = LN(T + Wt [T ; T * Bh]). Bh is the NWGM estimate of the cross-modal
    bias each label text carries; T' depends on parameters and constants only.
    """

    def __init__(self, width: int, embed_dim: int, heads: int, use_prior: bool = True):
        super().__init__()
        self.heads, self.use_prior = heads, use_prior
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(embed_dim, width)
        self.v = nn.Linear(embed_dim, width)
        self.t = nn.Linear(2 * width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, text, bias_dict, log_prior):
        """text [C, D], bias_dict V_P [Kb, D_vlm], log_prior [Kb] -> T' [C, D]."""
        q = split_heads(self.q(text).unsqueeze(0), self.heads)
        k, v = heads_of(self.k(bias_dict), self.heads), heads_of(self.v(bias_dict), self.heads)
        scale = (text.shape[-1] // self.heads) ** -0.5
        bias = merge_heads(memory_attention(q, k, v, scale, log_prior if self.use_prior else None)).squeeze(0)
        return self.norm(text + self.t(torch.cat([text, text * bias], dim=-1)))


class VisualIntervention(nn.Module):
    """Front-door adjustment on the video tokens (V -> M -> Y).

    One query projection feeds the fused op over two constant memories: the
    debiased texts T' (mediator M, in-sample) and the confounder dictionary Z
    (cross-sample Zh, with log pi_z). Approximator (NWGM):
    V' = LN(X + Wo [X * sigmoid(M Wg) ; Zh]).
    """

    def __init__(self, width: int, embed_dim: int, heads: int, use_prior: bool = True, impl: str = "torch"):
        super().__init__()
        self.heads, self.use_prior, self.impl = heads, use_prior, impl
        self.q = nn.Linear(width, width)
        self.k_text = nn.Linear(width, width)
        self.v_text = nn.Linear(width, width)
        self.k_conf = nn.Linear(embed_dim, width)
        self.v_conf = nn.Linear(embed_dim, width)
        self.gate = nn.Linear(width, width)
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
        gated = x * torch.sigmoid(self.gate(mediator))
        return self.norm(x + self.out(torch.cat([gated, cross_sample], dim=-1)))
