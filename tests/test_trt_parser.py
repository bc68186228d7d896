"""TensorRT's ONNX parser on the exported graphs, on CPU, through the tensorrt-rtx wheel.

Every TensorRT call runs in a subprocess (`check_in_subprocess`): TensorRT
registers plugins and keeps process-wide state.
"""

from __future__ import annotations

import importlib.util

import onnx
import pytest

from cmdcl.export import export_onnx
from cmdcl.export.precision import convert_precision
from cmdcl.export.trt_parser_check import TensorRTUnavailable, check_in_subprocess

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt_rtx") is None,
    reason="the tensorrt-rtx wheel is not installed (pip install tensorrt-rtx; it is in the test extra)",
)


def checks(paths, **options):
    try:
        return check_in_subprocess(paths, **options)
    except TensorRTUnavailable as exc:
        pytest.skip(f"tensorrt-rtx does not load here: {exc}")


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    import torch

    from cmdcl.model import CMDCL
    from conftest import small_config

    torch.manual_seed(0)
    model = CMDCL(small_config(), ["a", "b", "c"]).eval()
    out = tmp_path_factory.mktemp("trt")
    fp32 = export_onnx(model, out / "model.onnx")
    fp16 = export_onnx(model, out / "model16.onnx", precision="fp16", split=False)
    bf16 = out / "model_bf16.onnx"  # what the engine build makes in memory for --precision bf16
    onnx.save(convert_precision(onnx.load(fp32["full"]), "bf16"), bf16)
    return [fp32["full"], fp32["frame_encoder"], fp32["head"], fp16["full"], bf16]


def test_parser_parses_supports_and_builds_every_graph(graphs):
    results = checks(graphs)
    assert [r["path"] for r in results] == [str(p) for p in graphs]
    for result in results:
        assert result["parsed"] and not result["parse_errors"], result
        assert result["all_supported"] and not result["unsupported_subgraphs"], result
        assert result["build_error"] is None and result["engine_bytes"] > 0, result  # function-inlined graph


def test_parser_rejects_the_node_without_its_function(graphs, tmp_path):
    """The check can fail: without the local function (and no plugin) the node is unknown to TensorRT."""
    proto = onnx.load(graphs[0])
    del proto.functions[:]
    path = tmp_path / "no_function.onnx"
    onnx.save(proto, path)
    (result,) = checks([path], build=False)
    assert not result["parsed"] and any("CausalIntervention" in e for e in result["parse_errors"]), result
    assert not result["all_supported"]
