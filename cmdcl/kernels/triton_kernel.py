"""The fused causal-intervention op as one Triton kernel (docs/design.md section 3).

One program handles BLOCK_L query tokens of one (batch, head) pair: the grid
is (cdiv(L, BLOCK_L), B * h), so heads live in the grid and the per-head
slices of Q and of the output are read and written in place (no transposes).
The program loads its query tile once and runs both attentions over it:
the text mediator (Kt, Vt: C rows) and the confounder dictionary (Kz, Vz,
log_prior: Kz rows), each as an online softmax over BLOCK_N-row tiles of
the memory, so neither the [L, C] nor the [L, Kz] score matrix is ever
written out. Both memories are constants shared by every program (a few MB
at serving shapes), so after the first programs they are served from L2.
Rows past L, memory rows past C / Kz and head dims past d are masked, so
every size is allowed. Dots take fp32/fp16/bf16 inputs and accumulate in
fp32; fp32 inputs use IEEE dots (TF32 would miss the fp32 tolerance).

The kernel's argument order is the TensorRT plugin's launch order: input
pointers, then int32 scalars, then the output pointer (see aot.py).

`program_tile`, `intervene` and `prepare_launch` are shared with the
experimental fused-Q-projection kernel (triton_fused_q.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) == exp2(x * LOG2E)

# Input pointers, int32 scalars, output pointer: the order TensorRT's AOT
# plugin passes arguments in (inputs, extra args, outputs).
KERNEL_ARGS = ("q", "kt", "vt", "kz", "vz", "log_prior", "seq_len", "num_text", "num_conf", "out")


@triton.jit
def _memory_attention(
    q,
    dims,
    dim_ok,
    k_ptr,
    v_ptr,
    prior_ptr,
    size,
    USE_PRIOR: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """softmax(q k^T * SCALE [+ prior]) v for one query tile over one head's
    memory of `size` rows, streamed in BLOCK_N-row tiles (online softmax)."""
    row_max = tl.full([BLOCK_L], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_L], tl.float32)
    acc = tl.zeros([BLOCK_L, BLOCK_D], tl.float32)
    for start in range(0, size, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < size
        tile_mask = col_ok[:, None] & dim_ok[None, :]
        offsets = cols[:, None] * HEAD_DIM + dims[None, :]
        k = tl.load(k_ptr + offsets, mask=tile_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * (SCALE * LOG2E)  # base 2
        if USE_PRIOR:
            prior = tl.load(prior_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            scores += prior[None, :] * LOG2E
        scores = tl.where(col_ok[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        # A row with only -inf so far (zero prior entries) must give 0, not NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp2(row_max - shift)
        p = tl.exp2(scores - shift[:, None])
        row_sum = row_sum * rescale + tl.sum(p, 1)
        v = tl.load(v_ptr + offsets, mask=tile_mask, other=0.0)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        row_max = new_max
    return acc / row_sum[:, None]


@triton.jit
def program_tile(seq_len, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's head, token indices (int64: B*L*2hd may pass 2^31),
    head dims and their masks."""
    batch = tl.program_id(1) // NUM_HEADS
    head = tl.program_id(1) % NUM_HEADS
    rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < seq_len
    dim_ok = dims < HEAD_DIM
    return head, batch.to(tl.int64) * seq_len + rows, row_ok, dims, dim_ok


@triton.jit
def intervene(
    q, head, tokens, row_ok, dims, dim_ok,
    kt_ptr, vt_ptr, kz_ptr, vz_ptr, prior_ptr, num_text, num_conf, out_ptr,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, SCALE: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_Z: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Both attentions for one query tile; stores [M ; Zh] of this head."""
    mediator = _memory_attention(
        q, dims, dim_ok,
        kt_ptr + head * num_text * HEAD_DIM, vt_ptr + head * num_text * HEAD_DIM, prior_ptr, num_text,
        False, HEAD_DIM, BLOCK_L, BLOCK_D, BLOCK_C, SCALE, DOT_PRECISION,
    )
    cross_sample = _memory_attention(
        q, dims, dim_ok,
        kz_ptr + head * num_conf * HEAD_DIM, vz_ptr + head * num_conf * HEAD_DIM, prior_ptr, num_conf,
        True, HEAD_DIM, BLOCK_L, BLOCK_D, BLOCK_Z, SCALE, DOT_PRECISION,
    )
    width: tl.constexpr = NUM_HEADS * HEAD_DIM
    io_mask = row_ok[:, None] & dim_ok[None, :]
    out = out_ptr + tokens[:, None] * (2 * width) + head * HEAD_DIM + dims[None, :]
    tl.store(out, mediator.to(out_ptr.dtype.element_ty), mask=io_mask)
    tl.store(out + width, cross_sample.to(out_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def causal_intervention_kernel(
    q_ptr, kt_ptr, vt_ptr, kz_ptr, vz_ptr, prior_ptr, seq_len, num_text, num_conf, out_ptr,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, SCALE: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_Z: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """q [B, L, h*d]; kt, vt [h, C, d]; kz, vz [h, Kz, d]; log_prior [Kz];
    out [B, L, 2*h*d] = per token [M ; Zh], heads merged. All contiguous."""
    head, tokens, row_ok, dims, dim_ok = program_tile(seq_len, NUM_HEADS, HEAD_DIM, BLOCK_L, BLOCK_D)
    width: tl.constexpr = NUM_HEADS * HEAD_DIM
    q_offsets = tokens[:, None] * width + head * HEAD_DIM + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    intervene(
        q, head, tokens, row_ok, dims, dim_ok, kt_ptr, vt_ptr, kz_ptr, vz_ptr, prior_ptr, num_text, num_conf, out_ptr,
        NUM_HEADS, HEAD_DIM, SCALE, BLOCK_L, BLOCK_D, BLOCK_C, BLOCK_Z, DOT_PRECISION,
    )


def _tile(n: int, cap: int | None = None) -> int:
    """A tile side covering n (up to cap): a power of two (tl.arange) and at
    least 16 (tl.dot)."""
    side = max(16, triton.next_power_of_2(n))
    return side if cap is None else min(side, max(16, cap))


def kernel_config(head_dim: int, num_text: int, num_conf: int, block_l: int = 64, dtype: torch.dtype = torch.float16) -> dict:
    """The kernel's compile-time parameters (shared by JIT launches and AOT).
    Memory tiles of 64 rows, 32 for fp32 to stay under 48 KiB of shared memory."""
    block_n = 32 if dtype == torch.float32 else 64
    return dict(
        HEAD_DIM=head_dim,
        BLOCK_L=block_l,
        BLOCK_D=_tile(head_dim),
        BLOCK_C=_tile(num_text, block_n),
        BLOCK_Z=_tile(num_conf, block_n),
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",  # tf32 is ignored for 16-bit inputs
    )


def launch_grid(batch, seq_len, num_heads: int, block_l: int, cdiv=triton.cdiv):
    """(cdiv(L, BLOCK_L), B * h, 1). `cdiv` and the sizes may be symbolic
    (TensorRT shape expressions), so the plugin and Python share this."""
    return (cdiv(seq_len, block_l), batch * num_heads, 1)


def default_block_l(batch: int, seq_len: int, num_heads: int) -> int:
    """64-row query tiles, or 16 when that leaves too few programs to fill a
    GPU (e.g. one stream: L=320, h=8 gives only 40 programs of 64 rows)."""
    return 64 if triton.cdiv(seq_len, 64) * batch * num_heads >= 256 else 16


def causal_intervention_triton(
    q, kt, vt, kz, vz, log_prior, num_heads: int, scale: float, block_l: int | None = None, out: torch.Tensor | None = None
):
    """Same contract as `causal_intervention_reference`. Memories and prior
    are cast to q's dtype; the output has q's dtype (written into `out` when
    given, a contiguous [B, L, 2*h*d] tensor). Needs CUDA tensors, or CPU
    tensors with TRITON_INTERPRET=1 set before this module is imported."""
    b, seq_len, width = q.shape
    memories, out, grid, options = prepare_launch(b, seq_len, width, q, kt, vt, kz, vz, log_prior, num_heads, scale, block_l, out)
    if out.numel():
        causal_intervention_kernel[grid](q.contiguous(), *memories, seq_len, kt.shape[1], kz.shape[1], out, **options)
    return out


def prepare_launch(b, seq_len, width, like, kt, vt, kz, vz, log_prior, num_heads, scale, block_l, out):
    """Shared checks and launch setup: (memories in like's dtype, out, grid, kernel options)."""
    h, num_text, head_dim = kt.shape
    num_conf = kz.shape[1]
    if h != num_heads or width != h * head_dim:
        raise ValueError(f"q width {width} does not match num_heads {num_heads} x memory head dim {head_dim}")
    if vt.shape != kt.shape or vz.shape != kz.shape or kz.shape[0] != h or kz.shape[2] != head_dim:
        raise ValueError(f"memory shapes disagree: Kt {list(kt.shape)} Vt {list(vt.shape)} Kz {list(kz.shape)} Vz {list(vz.shape)}")
    if log_prior.shape != (num_conf,):
        raise ValueError(f"log_prior must be [{num_conf}], got {list(log_prior.shape)}")
    if like.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported dtype {like.dtype}; use float32, float16 or bfloat16")
    memories = [t.to(like.dtype).contiguous() for t in (kt, vt, kz, vz, log_prior)]
    if out is None:
        out = torch.empty(b, seq_len, 2 * width, dtype=like.dtype, device=like.device)
    elif out.shape != (b, seq_len, 2 * width) or out.dtype != like.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {like.dtype} tensor of shape {[b, seq_len, 2 * width]}")
    block_l = block_l or default_block_l(b, seq_len, h)
    options = dict(NUM_HEADS=h, SCALE=float(scale), num_warps=4, num_stages=2)
    options.update(kernel_config(head_dim, num_text, num_conf, block_l=block_l, dtype=like.dtype))
    return memories, out, launch_grid(b, seq_len, h, block_l)[:2], options
