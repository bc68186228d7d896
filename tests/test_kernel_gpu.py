"""The compiled Triton kernel on a CUDA GPU against the reference (fp32/fp16/bf16).
Skips without a GPU; benchmarks/gpu_check.py is the fuller check."""

from __future__ import annotations

import pytest
import torch

from cmdcl.kernels.reference import causal_intervention_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU path is tested under TRITON_INTERPRET=1)")

TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(4, 320, 8, 64, 200, 1024), (3, 77, 4, 24, 37, 301), (2, 5, 2, 32, 1, 1)], ids=str)
@pytest.mark.parametrize("block_l", [64, 16])
def test_matches_reference(dtype, shape, block_l):
    from cmdcl.kernels.triton_kernel import causal_intervention_triton

    b, seq_len, h, d, c, kz = shape
    generator = torch.Generator(device="cuda").manual_seed(0)
    shapes = ((b, seq_len, h * d), (h, c, d), (h, c, d), (h, kz, d), (h, kz, d))
    inputs = [torch.randn(*s, device="cuda", generator=generator).to(dtype) for s in shapes]
    inputs.append(torch.log_softmax(torch.randn(kz, device="cuda", generator=generator), 0).to(dtype))
    out = torch.full((b, seq_len, 2 * h * d), float("nan"), device="cuda", dtype=dtype)
    causal_intervention_triton(*inputs, h, d**-0.5, block_l=block_l, out=out)
    ref = causal_intervention_reference(*(t.float() for t in inputs), h, d**-0.5)
    assert torch.isfinite(out).all()
    assert ((out.float() - ref).norm() / ref.norm()).item() <= TOLERANCE[dtype]


def test_model_uses_kernel_on_cuda():
    from cmdcl.model import CMDCL, tiny_config

    torch.manual_seed(0)
    model = CMDCL(tiny_config(), ["a", "b", "c"]).cuda().eval()
    frames = torch.randint(0, 256, (2, 8, 96, 96, 3), dtype=torch.uint8, device="cuda")
    with torch.no_grad():
        ref, _ = model(frames)
        model.set_intervention_impl("triton")
        out, _ = model(frames)
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-4


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=["fp32", "fp16", "bf16"])
def test_fused_q_projection(dtype):
    from cmdcl.kernels.triton_fused_q import causal_intervention_triton_fused_q

    b, seq_len, h, d, c, kz, in_dim = 3, 77, 8, 64, 37, 301, 512
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(b, seq_len, in_dim, device="cuda", generator=generator).to(dtype)
    weight = (torch.randn(h * d, in_dim, device="cuda", generator=generator) / in_dim**0.5).to(dtype)
    bias = torch.randn(h * d, device="cuda", generator=generator).to(dtype)
    memories = [torch.randn(h, n, d, device="cuda", generator=generator).to(dtype) for n in (c, c, kz, kz)]
    prior = torch.log_softmax(torch.randn(kz, device="cuda", generator=generator), 0).to(dtype)
    out = torch.full((b, seq_len, 2 * h * d), float("nan"), device="cuda", dtype=dtype)
    causal_intervention_triton_fused_q(x, weight, bias, *memories, prior, h, d**-0.5, out=out)
    q = x.float() @ weight.float().T + bias.float()
    ref = causal_intervention_reference(q, *(t.float() for t in memories), prior.float(), h, d**-0.5)
    assert torch.isfinite(out).all()
    assert ((out.float() - ref).norm() / ref.norm()).item() <= TOLERANCE[dtype]
