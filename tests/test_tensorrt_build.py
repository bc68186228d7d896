"""cmdcl-build / build_engine: error paths on any machine, engine builds where
TensorRT (>= 10.9, with tensorrt.plugin) and a CUDA GPU exist."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from click.testing import CliRunner

from cmdcl.artifacts import sidecar_path
from cmdcl.cli.build import main as build_cli
from cmdcl.export.tensorrt_build import EngineBuildError, build_engine, split_pairs
from conftest import skew_priors


def run_cli(*args):
    result = CliRunner().invoke(build_cli, [str(a) for a in args])
    return result.exit_code, result.output.strip().splitlines()


@pytest.fixture
def onnx_file(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not looked at before TensorRT is found")
    return path


def test_cli_without_tensorrt(monkeypatch, onnx_file):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, even where it is installed
    code, lines = run_cli(onnx_file, "--engine", onnx_file.with_suffix(".plan"))
    assert code == 1
    assert lines == ["cmdcl-build: error: TensorRT is not installed (pip install 'tensorrt>=10.9' on a machine with an NVIDIA GPU)"]
    assert not onnx_file.with_suffix(".plan").exists()


def test_tensorrt_without_libraries(monkeypatch, onnx_file):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # PyPI's stub package
    with pytest.raises(EngineBuildError, match="no runtime libraries"):
        build_engine(onnx_file, onnx_file.with_suffix(".plan"))


def test_no_gpu(monkeypatch, onnx_file):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(Builder=object))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, lines = run_cli(onnx_file)
    assert code == 1 and len(lines) == 1 and lines[0].startswith("cmdcl-build: error: no CUDA GPU")


def test_missing_onnx(tmp_path):
    code, lines = run_cli(tmp_path / "nothing.onnx")
    assert code == 1 and lines == [f"cmdcl-build: error: {tmp_path / 'nothing.onnx'}: no such file"]


@pytest.mark.parametrize("options,message", [({"precision": "int8"}, "precision"), ({"max_batch": 4, "opt_batch": 8}, "opt batch")])
def test_bad_options(onnx_file, options, message):
    with pytest.raises(EngineBuildError, match=message):
        build_engine(onnx_file, onnx_file.with_suffix(".plan"), **options)


def test_reduced_precision_export_cannot_make_another_precision(monkeypatch, tmp_path):
    from cmdcl.export import export_onnx
    from cmdcl.model import CMDCL
    from conftest import small_config

    fp16 = export_onnx(CMDCL(small_config(), ["a", "b"]).eval(), tmp_path / "m16.onnx", precision="fp16", split=False)
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(Builder=object))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "stand-in GPU")
    with pytest.raises(EngineBuildError, match="is a fp16 export: a bf16 engine needs an fp32"):
        build_engine(fp16["full"], tmp_path / "m.plan", precision="bf16")
    assert not (tmp_path / "m.plan").exists()


def test_network_flags_strongly_typed_with_the_aot_plugin():
    from cmdcl.export.tensorrt_build import _network_flags

    tensorrt_10 = types.SimpleNamespace(NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=1, PREFER_AOT_PYTHON_PLUGINS=3))
    assert _network_flags(tensorrt_10) == (1 << 1) | (1 << 3)
    without_the_flag = types.SimpleNamespace(NetworkDefinitionCreationFlag=types.SimpleNamespace(PREFER_AOT_PYTHON_PLUGINS=3))
    assert _network_flags(without_the_flag) == 1 << 3  # a TensorRT that dropped the (ignored) flag


def test_split_pairs_and_sidecar(tmp_path):
    model = tmp_path / "m.onnx"
    for path in (model, tmp_path / "m.frame_encoder.onnx", tmp_path / "m.head.onnx"):
        path.write_bytes(b"")
    engine = tmp_path / "out" / "e.plan"
    assert split_pairs(model, engine) == [
        (model, engine),
        (tmp_path / "m.frame_encoder.onnx", tmp_path / "out" / "e.frame_encoder.plan"),
        (tmp_path / "m.head.onnx", tmp_path / "out" / "e.head.plan"),
    ]
    (tmp_path / "m.head.onnx").unlink()
    assert [plan.name for _, plan in split_pairs(model, engine)] == ["e.plan", "e.frame_encoder.plan"]
    assert sidecar_path(engine) == tmp_path / "out" / "e.plan.json"


# ---- real builds: need TensorRT with tensorrt.plugin and a CUDA GPU ----------------------


def tensorrt_or_skip():
    try:
        import tensorrt as trt
        import tensorrt.plugin  # noqa: F401
    except ImportError as error:
        pytest.skip(f"needs TensorRT >= 10.9 with tensorrt.plugin ({error})")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU to build and run TensorRT engines")
    return trt


def run_engine(trt, plan: bytes, inputs: dict) -> dict:
    """Run a serialized engine on CUDA torch tensors; returns its outputs."""
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16, trt.uint8: torch.uint8}
    outputs = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            context.set_input_shape(name, tuple(inputs[name].shape))
            context.set_tensor_address(name, inputs[name].data_ptr())
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            outputs[name] = torch.full(tuple(context.get_tensor_shape(name)), float("nan"), device="cuda",
                                       dtype=dtypes[engine.get_tensor_dtype(name)])
            context.set_tensor_address(name, outputs[name].data_ptr())
    assert context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    return outputs


@pytest.mark.slow
@pytest.mark.parametrize("precision,tolerance", [("fp32", 1e-4), ("fp16", 5e-3), ("bf16", 2e-2)])
def test_engine_matches_pytorch(tmp_path, precision, tolerance):
    trt = tensorrt_or_skip()
    from cmdcl.export import export_onnx
    from cmdcl.kernels.tensorrt_plugin import PLUGIN_ID
    from cmdcl.model import CMDCL, tiny_config

    torch.manual_seed(0)
    model = skew_priors(CMDCL(tiny_config(), ["a", "b", "c", "d", "e"])).eval()  # a prior lost by the engine shows
    paths = export_onnx(model, tmp_path / "m.onnx")
    engine = build_engine(paths["full"], tmp_path / "m.plan", precision=precision, max_batch=4,
                          timing_cache=tmp_path / "cache.bin")
    sidecar = json.loads(sidecar_path(engine).read_text())
    assert sidecar["plugin"] == PLUGIN_ID, "the parser inlined the local function instead of using the plugin"
    assert sidecar["precision"] == precision and sidecar["tensorrt_version"] == trt.__version__
    assert sidecar["metadata"]["classes"] == model.class_names
    assert (tmp_path / "cache.bin").stat().st_size > 0

    frames = torch.randint(0, 256, (3, 8, 96, 96, 3), dtype=torch.uint8)
    with torch.no_grad():
        ref, _ = model(frames)
    logits = run_engine(trt, engine.read_bytes(), {"frames": frames.cuda()})["logits"].float().cpu()
    assert ((logits - ref).norm() / ref.norm()).item() <= tolerance


def parsed_network(tmp_path, input_shape):
    """A one-Relu ONNX graph parsed by TensorRT-RTX's CPU parser (same network API)."""
    trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (CPU parser) not installed")
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["frames"], ["y"])], "g",
        [helper.make_tensor_value_info("frames", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, input_shape)],
    )
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, trt.Logger(trt.Logger.ERROR))
    assert parser.parse_from_file(str(path))
    return builder, network, parser, path


def test_batch_profile(tmp_path):
    from cmdcl.export.tensorrt_build import _batch_profile

    builder, network, _parser, path = parsed_network(tmp_path, ["batch", 8, 3])
    profile = _batch_profile(builder, network, path, opt_batch=4, max_batch=16)
    assert [list(s) for s in profile.get_shape("frames")] == [[1, 8, 3], [4, 8, 3], [16, 8, 3]]


def test_batch_profile_rejects_other_dynamic_dims(tmp_path):
    from cmdcl.export.tensorrt_build import _batch_profile

    builder, network, _parser, path = parsed_network(tmp_path, ["batch", "frames", 3])
    with pytest.raises(EngineBuildError, match="dynamic beyond dimension 0"):
        _batch_profile(builder, network, path, opt_batch=4, max_batch=16)
