"""The PyTorch reference of the fused intervention op (docs/design.md section 3).

This is the definition every other implementation (ONNX local function,
Triton kernel, TensorRT plugin) is checked against.
"""

from __future__ import annotations

import torch


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, L, h*d] -> [B, h, L, d]."""
    b, n, w = x.shape
    return x.view(b, n, num_heads, w // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, h, L, d] -> [B, L, h*d]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def memory_weights(q, k, scale: float, log_prior=None):
    """softmax(q k^T * scale + log_prior) in fp32: the attention of queries [B, h, L, d] over the K rows of a
    constant memory k [h, K, d] shared by the whole batch -> [B, h, L, K]."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if log_prior is not None:
        scores = scores + log_prior
    return torch.softmax(scores.float(), dim=-1)


def memory_attention(q, k, v, scale: float, log_prior=None):
    """softmax(q k^T * scale + log_prior) v for queries [B, h, L, d] over a
    constant memory k, v [h, K, d] shared by the whole batch."""
    return torch.matmul(memory_weights(q, k, scale, log_prior).to(v.dtype), v)


def causal_intervention_reference(q, kt, vt, kz, vz, log_prior, num_heads: int, scale: float):
    """q [B, L, h*d]; kt, vt [h, C, d]; kz, vz [h, Kz, d]; log_prior [Kz]
    -> [B, L, 2*h*d] holding per token [M ; Zh], heads merged."""
    qh = split_heads(q, num_heads)
    mediator = memory_attention(qh, kt, vt, scale)
    cross_sample = memory_attention(qh, kz, vz, scale, log_prior)
    return torch.cat([merge_heads(mediator), merge_heads(cross_sample)], dim=-1)
