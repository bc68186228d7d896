"""The cmdcl::CausalIntervention TensorRT plugin (needs TensorRT >= 10.9 with
tensorrt.plugin; the engine tests also need a CUDA GPU)."""

from __future__ import annotations

import pytest
import torch

from cmdcl.kernels.reference import causal_intervention_reference
from cmdcl.kernels.tensorrt_plugin import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION, register_plugin


def test_names_match_the_onnx_node():
    from cmdcl.export.intervention_node import DOMAIN, OP_TYPE, OP_VERSION

    assert (PLUGIN_NAMESPACE, PLUGIN_NAME, PLUGIN_VERSION) == (DOMAIN, OP_TYPE, str(OP_VERSION))


@pytest.fixture(scope="module")
def trt():
    try:
        import tensorrt
        import tensorrt.plugin  # noqa: F401
    except ImportError as error:
        pytest.skip(f"needs TensorRT >= 10.9 with tensorrt.plugin ({error})")
    register_plugin()
    return tensorrt


def test_registered(trt):
    register_plugin()  # idempotent
    assert trt.get_plugin_registry().get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is not None


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.float16, 5e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("aot", [True, False], ids=["aot", "jit"])
def test_plugin_layer_matches_reference(trt, dtype, tolerance, aot):
    """A network of one plugin layer (dynamic batch), built and run by TensorRT."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU to build and run TensorRT engines")
    import tensorrt.plugin as trtp

    from test_tensorrt_build import run_engine

    b, seq_len, h, d, c, kz = 3, 70, 4, 32, 13, 100
    torch.manual_seed(0)
    q = torch.randn(b, seq_len, h * d, device="cuda", dtype=dtype)
    memories = [torch.randn(h, n, d, device="cuda", dtype=dtype) for n in (c, c, kz, kz)]
    prior = torch.log_softmax(torch.randn(kz, device="cuda"), 0).to(dtype)
    names = ["Kt", "Vt", "Kz", "Vz", "log_prior"]
    trt_dtype = {torch.float32: trt.float32, torch.float16: trt.float16, torch.bfloat16: trt.bfloat16}[dtype]

    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    inputs = [network.add_input("Q", trt_dtype, (-1, seq_len, h * d))]
    inputs += [network.add_input(n, trt_dtype, tuple(t.shape)) for n, t in zip(names, [*memories, prior])]
    layer = network.add_plugin(trtp.op.cmdcl.CausalIntervention(*inputs, num_heads=h, scale=d**-0.5), aot=aot)
    layer.get_output(0).name = "out"
    network.mark_output(layer.get_output(0))
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("Q", (1, seq_len, h * d), (b, seq_len, h * d), (8, seq_len, h * d))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None

    out = run_engine(trt, bytes(plan), dict(zip(["Q", *names], [q, *memories, prior])))["out"]
    ref = causal_intervention_reference(q.float(), *(t.float() for t in memories), prior.float(), h, d**-0.5)
    assert out.shape == (b, seq_len, 2 * h * d) and torch.isfinite(out).all()
    assert ((out.float() - ref).norm() / ref.norm()).item() <= tolerance
