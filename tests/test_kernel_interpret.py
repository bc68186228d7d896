"""The Triton kernel against the PyTorch reference on CPU, under TRITON_INTERPRET=1.

The interpreter must be switched on before triton kernels are defined, and
the AOT tests compile the same kernel for real targets in this process, so
the cases run in one child process: this file, run as a script with
TRITON_INTERPRET=1, prints one JSON result per case. The interpreter has no
bf16 dots; bf16 is covered by the GPU tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

TOLERANCE = {"float32": 1e-4, "float16": 5e-3}  # docs/design.md section 7

# name: (dtype, B, L, h, d, C, Kz, block_l); sizes chosen to leave partial tiles everywhere.
CASES = {
    "fp32 ragged tiles": ("float32", 2, 37, 2, 16, 5, 70, 16),
    "fp32 d<16, L=1, C=1, Kz=1": ("float32", 1, 1, 1, 8, 1, 1, 16),
    "fp32 d=24 (padded), C=1": ("float32", 1, 20, 3, 24, 1, 33, 16),
    "fp16 ragged tiles": ("float16", 2, 33, 2, 32, 17, 40, 16),
    "fp16 64-row tiles, several memory tiles": ("float16", 1, 70, 1, 16, 65, 130, 64),
}

EXTRA_CASES = {  # name: dtype of the tolerance
    "fp32 -inf log prior on a whole tile": "float32",
    "fused Q projection fp32": "float32",
    "fused Q projection fp16": "float16",
    "dispatch impl='triton'": "float32",
    "tiny CMDCL logits": "float32",
}


def run_cases() -> dict:
    """Child side: run every case, return {name: {rel_error, finite}}."""
    import torch

    from cmdcl.kernels import causal_intervention, triton_kernel
    from cmdcl.kernels.reference import causal_intervention_reference
    from cmdcl.kernels.triton_fused_q import causal_intervention_triton_fused_q
    from cmdcl.kernels.triton_kernel import causal_intervention_triton

    results = {}
    generator = torch.Generator().manual_seed(0)
    for name, (dtype_name, b, seq_len, h, d, c, kz, block_l) in CASES.items():
        dtype = getattr(torch, dtype_name)
        shapes = ((b, seq_len, h * d), (h, c, d), (h, c, d), (h, kz, d), (h, kz, d))
        q, kt, vt, kz_, vz = (torch.randn(*s, generator=generator) for s in shapes)
        prior = torch.log_softmax(3 * torch.randn(kz, generator=generator), 0)
        inputs = [t.to(dtype) for t in (q, kt, vt, kz_, vz, prior)]
        ref = causal_intervention_reference(*(t.float() for t in inputs), h, d**-0.5)
        out = torch.full((b, seq_len, 2 * h * d), float("nan"), dtype=dtype)  # poisoned: every element must be written
        causal_intervention_triton(*inputs, h, d**-0.5, block_l=block_l, out=out)
        results[name] = {"rel_error": ((out.float() - ref).norm() / ref.norm()).item(), "finite": bool(torch.isfinite(out).all())}

    # Zero prior on the first 40 dictionary entries (log prior -inf): a whole
    # memory tile that contributes nothing must not turn into NaN.
    h, d, kz = 2, 16, 70
    q, kz_, vz, kt, vt = (torch.randn(*s, generator=generator) for s in ((1, 9, h * d), (h, kz, d), (h, kz, d), (h, 3, d), (h, 3, d)))
    prior = torch.log_softmax(torch.randn(kz, generator=generator), 0)
    prior[:40] = float("-inf")
    out = causal_intervention_triton(q, kt, vt, kz_, vz, prior, h, d**-0.5, block_l=16)
    ref = causal_intervention_reference(q, kt, vt, kz_, vz, prior, h, d**-0.5)
    results["fp32 -inf log prior on a whole tile"] = {
        "rel_error": ((out - ref).norm() / ref.norm()).item(),
        "finite": bool(torch.isfinite(out).all()),
    }

    # Query projection fused into the kernel: q = x W^T + b, D_in not a tile multiple.
    for name, dtype, in_dim in (("fused Q projection fp32", torch.float32, 40), ("fused Q projection fp16", torch.float16, 70)):
        b, seq_len, h, d, c, kz = 2, 21, 2, 16, 7, 45
        x = torch.randn(b, seq_len, in_dim, generator=generator)
        weight, bias = torch.randn(h * d, in_dim, generator=generator) / in_dim**0.5, torch.randn(h * d, generator=generator)
        memories = [torch.randn(h, n, d, generator=generator) for n in (c, c, kz, kz)]
        prior = torch.log_softmax(torch.randn(kz, generator=generator), 0)
        inputs = [t.to(dtype) for t in (x, weight, bias, *memories, prior)]
        x, weight, bias, *rest = (t.float() for t in inputs)
        ref = causal_intervention_reference(x @ weight.T + bias, *rest, h, d**-0.5)
        out = torch.full((b, seq_len, 2 * h * d), float("nan"), dtype=dtype)
        causal_intervention_triton_fused_q(*inputs, h, d**-0.5, block_l=16, out=out)
        results[name] = {"rel_error": ((out.float() - ref).norm() / ref.norm()).item(), "finite": bool(torch.isfinite(out).all())}

    # Through the dispatcher, default scale.
    q, kt, vt, kz_, vz = (torch.randn(*s, generator=generator) for s in ((2, 9, 64), (4, 3, 16), (4, 3, 16), (4, 20, 16), (4, 20, 16)))
    prior = torch.log_softmax(torch.randn(20, generator=generator), 0)
    out = causal_intervention(q, kt, vt, kz_, vz, prior, num_heads=4, impl="triton")
    ref = causal_intervention(q, kt, vt, kz_, vz, prior, num_heads=4, impl="torch")
    results["dispatch impl='triton'"] = {"rel_error": ((out - ref).norm() / ref.norm()).item(), "finite": bool(torch.isfinite(out).all())}

    # The whole tiny model with the kernel in its visual intervention (a
    # skewed confounder prior, so dropping it would show), counting launches.
    from cmdcl.model import CMDCL, tiny_config

    torch.manual_seed(0)
    model = CMDCL(tiny_config(), ["a", "b", "c", "d", "e"]).eval()
    conf_prior = torch.softmax(3 * torch.randn(model.conf_prior.shape[0], generator=generator), 0)
    model.set_dictionaries(model.bias_dict, model.bias_prior, model.conf_dict, conf_prior)
    frames = torch.randint(0, 256, (2, 8, 96, 96, 3), dtype=torch.uint8, generator=generator)
    launches = []
    kernel = triton_kernel.causal_intervention_triton
    triton_kernel.causal_intervention_triton = lambda *a, **k: launches.append(1) or kernel(*a, **k)
    with torch.no_grad():
        ref, _ = model(frames)
        model.set_intervention_impl("triton")
        out, _ = model(frames)
    results["tiny CMDCL logits"] = {
        "rel_error": ((out - ref).norm() / ref.norm()).item() if launches else float("inf"),
        "finite": bool(torch.isfinite(out).all()),
    }
    return results


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.timeout(900)  # the first one waits for the interpreter run (up to 600 s)
@pytest.mark.parametrize("name", [*CASES, *EXTRA_CASES])
def test_matches_reference(results, name):
    result = results[name]
    tolerance = TOLERANCE[CASES[name][0] if name in CASES else EXTRA_CASES[name]]
    assert result["finite"], f"{name}: output has NaN/inf (unwritten elements keep the NaN poison)"
    assert result["rel_error"] <= tolerance, f"{name}: relative error {result['rel_error']:.2e} > {tolerance}"


def test_rejects_mismatched_shapes():
    import torch

    from cmdcl.kernels.triton_kernel import causal_intervention_triton

    q = torch.zeros(1, 4, 32)
    memory = torch.zeros(2, 3, 16)
    with pytest.raises(ValueError, match="log_prior"):
        causal_intervention_triton(q, memory, memory, memory, memory, torch.zeros(4), 2, 0.25)
    with pytest.raises(ValueError, match="num_heads"):
        causal_intervention_triton(q, memory, memory, memory, memory, torch.zeros(3), 4, 0.25)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1")
    print(json.dumps(run_cases()))
