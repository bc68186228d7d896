"""The cmdcl::CausalIntervention TensorRT plugin (needs TensorRT >= 10.9 with
tensorrt.plugin; the engine tests also need a CUDA GPU)."""

from __future__ import annotations

import inspect
import sys
import types
import typing

import pytest
import torch
import triton

from cmdcl.kernels import tensorrt_plugin
from cmdcl.kernels.reference import causal_intervention_reference
from cmdcl.kernels.tensorrt_plugin import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION, register_plugin


def test_names_match_the_onnx_node():
    from cmdcl.kernels.onnx_node import DOMAIN, OP_TYPE, OP_VERSION

    assert (PLUGIN_NAMESPACE, PLUGIN_NAME, PLUGIN_VERSION) == (DOMAIN, OP_TYPE, str(OP_VERSION))


class _Dim(int):
    """A build-time constant shape expression (what TensorRT hands the AOT
    implementation for the constant memories and a fixed L)."""

    is_constant = True

    def constant_value(self) -> int:
        return int(self)


@pytest.fixture
def recorded_plugin(monkeypatch):
    """register_plugin() run against a recording stand-in for tensorrt and
    tensorrt.plugin: returns the four functions it defines, by decorator.
    The real module validates these functions when they are decorated (its
    _validate.py, read in TensorRT 10.13 and 11.4); the tests below check the
    same rules, and run the AOT implementation's body, where TensorRT is absent."""
    recorded = {}

    def recorder(kind):
        return lambda plugin_id: (lambda fn: recorded.setdefault(kind, (plugin_id, fn))[1])

    trt = types.ModuleType("tensorrt")
    trt.float32, trt.float16, trt.bfloat16 = "float32", "float16", "bfloat16"
    trtp = types.ModuleType("tensorrt.plugin")
    for kind in ("register", "autotune", "aot_impl", "impl"):
        setattr(trtp, kind, recorder(kind))

    class SymExprs(tuple):
        pass

    class SymIntExprs(SymExprs):
        from_tuple = classmethod(lambda cls, exprs: cls(exprs))

    class KernelLaunchParams(types.SimpleNamespace):
        pass

    trtp.TensorDesc, trtp.AutoTuneCombination = type("TensorDesc", (), {}), type("AutoTuneCombination", (), {})
    trtp.SymExprs, trtp.SymIntExprs, trtp.KernelLaunchParams = SymExprs, SymIntExprs, KernelLaunchParams
    trtp.SymInt32, trtp.cdiv = int, triton.cdiv
    trt.plugin = trtp
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    monkeypatch.setattr(tensorrt_plugin, "_registered", False)
    register_plugin()
    assert {plugin_id for plugin_id, _ in recorded.values()} == {tensorrt_plugin.PLUGIN_ID}
    return {kind: fn for kind, (_, fn) in recorded.items()}, trt, trtp


def test_plugin_functions_follow_the_tensorrt_plugin_schema(recorded_plugin):
    functions, _, trtp = recorded_plugin
    tensors = ["q", "kt", "vt", "kz", "vz", "log_prior"]
    attributes = ["num_heads", "scale"]
    expected = {
        "register": tensors + attributes,
        "autotune": tensors + ["outputs"],
        "aot_impl": tensors + attributes + ["outputs", "tactic"],
        "impl": tensors + attributes + ["outputs", "stream", "tactic"],
    }
    for kind, names in expected.items():
        assert list(inspect.signature(functions[kind]).parameters) == names, kind
    register = inspect.signature(functions["register"])
    assert all(register.parameters[n].annotation is trtp.TensorDesc for n in tensors)
    assert [register.parameters[n].annotation for n in attributes] == [int, float]
    assert typing.get_args(register.return_annotation) == (trtp.TensorDesc,)
    # An aot_impl without this return annotation is refused at decoration.
    returned = inspect.signature(functions["aot_impl"]).return_annotation
    assert typing.get_origin(returned) is tuple
    name, code, launch, extra = typing.get_args(returned)
    assert set(typing.get_args(name)) == set(typing.get_args(code)) == {str, bytes}
    assert launch is trtp.KernelLaunchParams and issubclass(extra, trtp.SymExprs)


@pytest.mark.slow
@pytest.mark.parametrize("tactic", [1, 2])
def test_aot_impl_returns_the_compiled_kernel_and_its_launch(recorded_plugin, monkeypatch, tactic):
    """The AOT implementation's body, with constant shapes: the PTX, grid,
    block, shared memory and int32 extras are those of compile_kernel."""
    functions, trt, trtp = recorded_plugin
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (9, 0))
    b, seq_len, h, d, c, kz = 3, 70, 4, 32, 13, 100

    def desc(*shape):
        return types.SimpleNamespace(shape_expr=[_Dim(n) for n in shape], dtype=trt.float16)

    q, kt, vt, kzd, vzd, prior = desc(b, seq_len, h * d), desc(h, c, d), desc(h, c, d), desc(h, kz, d), desc(h, kz, d), desc(kz)
    name, ptx, launch, extra = functions["aot_impl"](q, kt, vt, kzd, vzd, prior, h, d**-0.5, [desc(b, seq_len, 2 * h * d)], tactic)
    kernel = tensorrt_plugin.aot_launch("fp16", h, d, c, kz, d**-0.5, arch=90, tactic=tactic)
    assert (name, ptx) == (kernel.name, kernel.ptx)
    assert (launch.grid_x, launch.grid_y) == (triton.cdiv(seq_len, tensorrt_plugin.TACTIC_BLOCK_L[tactic]), b * h)
    assert (launch.block_x, launch.shared_mem) == (kernel.threads, kernel.shared_mem)
    assert isinstance(extra, trtp.SymIntExprs) and tuple(extra) == (seq_len, c, kz)

    with pytest.raises(ValueError, match="num_heads=2 but Kt has 4 heads"):
        functions["aot_impl"](q, kt, vt, kzd, vzd, prior, 2, d**-0.5, [q], tactic)


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
