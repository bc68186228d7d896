"""The fused causal-intervention op and its implementations.

`causal_intervention` is the one entry point the model calls; `impl` picks the
implementation. Implementations other than the PyTorch reference are imported
lazily so that `import cmdcl` never pulls in triton or tensorrt.
"""

from __future__ import annotations

from .reference import causal_intervention_reference

IMPLEMENTATIONS = ("torch", "onnx", "triton")


def causal_intervention(q, kt, vt, kz, vz, log_prior, num_heads: int, scale: float | None = None, impl: str = "torch"):
    """Both front-door attentions of docs/design.md section 3 in one call.

    q [B, L, h*d]; kt, vt [h, C, d] (text mediator); kz, vz [h, Kz, d]
    (confounder dictionary); log_prior [Kz]. Returns [B, L, 2*h*d]: per token
    the mediator M then the cross-sample term Zh, heads merged.
    """
    head_dim = q.shape[-1] // num_heads
    if q.shape[-1] != num_heads * head_dim:
        raise ValueError(f"q width {q.shape[-1]} is not divisible by num_heads {num_heads}")
    if scale is None:
        scale = head_dim**-0.5
    if impl == "torch":
        return causal_intervention_reference(q, kt, vt, kz, vz, log_prior, num_heads, scale)
    if impl == "onnx":  # the reference, traced by torch.onnx.export as one cmdcl::CausalIntervention node
        from .onnx_node import causal_intervention_node

        return causal_intervention_node(q, kt, vt, kz, vz, log_prior, num_heads, scale)
    if impl == "triton":  # the fused Triton kernel: CUDA tensors (or CPU under TRITON_INTERPRET=1)
        from .triton_kernel import causal_intervention_triton

        return causal_intervention_triton(q, kt, vt, kz, vz, log_prior, num_heads, scale)
    raise ValueError(f"unknown causal_intervention impl {impl!r}; available: {', '.join(IMPLEMENTATIONS)}")
