"""Experimental: the fused causal-intervention kernel with the query projection fused in.

`causal_intervention_triton_fused_q(x, Wq, bq, ...)` is
`causal_intervention_triton(x @ Wq.T + bq, ...)` with each program computing
its Q tile from x and Wq, so Q never makes a round trip through global
memory. It exists to answer one question: does fusing the Q projection pay?
benchmarks/gpu_check.py times it against a separate projection plus the
kernel of triton_kernel.py. The model, the export and the TensorRT plugin
never call it; it is tested against the reference (under TRITON_INTERPRET=1
and on a GPU) so that the answer is about a correct kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_kernel import intervene, prepare_launch, program_tile


@triton.jit
def causal_intervention_fused_q_kernel(
    x_ptr, wq_ptr, bq_ptr, kt_ptr, vt_ptr, kz_ptr, vz_ptr, prior_ptr, seq_len, num_text, num_conf, out_ptr,
    IN_DIM: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, SCALE: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_Z: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The same op with the query projection fused: q = x Wq^T + bq is
    computed per tile from x [B, L, IN_DIM], wq [h*d, IN_DIM] (nn.Linear
    layout) and bq [h*d], so Q never goes through global memory."""
    head, tokens, row_ok, dims, dim_ok = program_tile(seq_len, NUM_HEADS, HEAD_DIM, BLOCK_L, BLOCK_D)
    out_features = head * HEAD_DIM + dims
    acc = tl.zeros([BLOCK_L, BLOCK_D], tl.float32)
    for start in range(0, IN_DIM, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < IN_DIM
        x = tl.load(x_ptr + tokens[:, None] * IN_DIM + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(wq_ptr + out_features[None, :] * IN_DIM + ks[:, None], mask=k_ok[:, None] & dim_ok[None, :], other=0.0)
        acc += tl.dot(x, w, input_precision=DOT_PRECISION)
    bias = tl.load(bq_ptr + out_features, mask=dim_ok, other=0.0).to(tl.float32)
    q = (acc + bias[None, :]).to(x_ptr.dtype.element_ty)  # rounded like nn.Linear's output
    intervene(
        q, head, tokens, row_ok, dims, dim_ok, kt_ptr, vt_ptr, kz_ptr, vz_ptr, prior_ptr, num_text, num_conf, out_ptr,
        NUM_HEADS, HEAD_DIM, SCALE, BLOCK_L, BLOCK_D, BLOCK_C, BLOCK_Z, DOT_PRECISION,
    )


def causal_intervention_triton_fused_q(
    x, weight, bias, kt, vt, kz, vz, log_prior, num_heads: int, scale: float, block_l: int | None = None,
    out: torch.Tensor | None = None,
):
    """`causal_intervention_triton(x @ weight.T + bias, ...)` with the query
    projection (nn.Linear weight [h*d, D_in], bias [h*d]) computed inside the
    kernel, tile by tile, instead of as a separate GEMM whose output makes a
    round trip through global memory."""
    b, seq_len, in_dim = x.shape
    width = weight.shape[0]
    if weight.shape != (width, in_dim) or bias.shape != (width,):
        raise ValueError(f"weight must be [h*d, {in_dim}] and bias [h*d], got {list(weight.shape)} and {list(bias.shape)}")
    memories, out, grid, options = prepare_launch(b, seq_len, width, x, kt, vt, kz, vz, log_prior, num_heads, scale, block_l, out)
    weight, bias = weight.to(x.dtype).contiguous(), bias.to(x.dtype).contiguous()
    if out.numel():
        causal_intervention_fused_q_kernel[grid](
            x.contiguous(), weight, bias, *memories, seq_len, kt.shape[1], kz.shape[1], out,
            IN_DIM=in_dim, BLOCK_K=32 if x.dtype == torch.float32 else 64, **options,
        )
    return out
