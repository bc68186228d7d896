"""cmdcl.artifacts, the one artifact contract (graph roles and I/O, file names, sampling defaults), checked against
what the exporter, ONNX Runtime and the PyTriton bindings actually hold; and the backend lifecycle and feed checks
built on it (close, `with`, infer refusing feeds that do not match io)."""

import sys
import types
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from cmdcl.artifacts import GRAPH_ROLES, SPLIT_ROLES, default_sampling, graph_io, graph_path, sidecar_path, stride_frames, window_seconds
from cmdcl.export import export_onnx
from cmdcl.export.onnx_export import output_paths
from cmdcl.model import CMDCL, save_checkpoint
from cmdcl.runtime import BackendError, ModelInfo, load_backend
from conftest import small_config

CLASSES = ["make tea", "fry egg", "make pancake"]
F, SIZE, S, D, C = 4, 32, 5, 32, 3  # small_config


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """{"torch": the checkpoint, "ort": its export (with the split graphs beside it)}."""
    directory = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model = CMDCL(small_config(), CLASSES).eval()
    return {"torch": save_checkpoint(model, directory / "m.pt"), "ort": export_onnx(model, directory / "m.onnx")["full"]}


def test_graph_io_is_the_contract_in_numbers():
    heads = {"logits": ("float32", [None, C]), "embedding": ("float32", [None, D])}
    assert graph_io("full", F, SIZE, S, D, C) == ({"frames": ("uint8", [None, F, SIZE, SIZE, 3])}, heads)
    assert graph_io("frame_encoder", F, SIZE, S, D, C) == ({"frames": ("uint8", [None, SIZE, SIZE, 3])},
                                                          {"tokens": ("float32", [None, S, D])})
    assert graph_io("head", F, SIZE, S, D, C) == ({"tokens": ("float32", [None, F, S, D])}, heads)


def test_roles_and_file_names(tmp_path):
    assert GRAPH_ROLES == ("full", "frame_encoder", "head") and SPLIT_ROLES == ("frame_encoder", "head")
    assert graph_path("d/m.onnx", "full") == Path("d/m.onnx")
    assert graph_path("d/m.v2.plan", "head") == Path("d/m.v2.head.plan")
    assert graph_path("d/m.onnx", "frame_encoder") == Path("d/m.frame_encoder.onnx")
    assert sidecar_path("d/m.head.plan") == Path("d/m.head.plan.json")
    model = tmp_path / "m.onnx"
    assert output_paths(model) == {"full": model, "frame_encoder": tmp_path / "m.frame_encoder.onnx",
                                   "head": tmp_path / "m.head.onnx"}
    assert output_paths(model, split=False) == {"full": model}


@pytest.mark.parametrize("frames, stride", [(1, 1), (3, 1), (8, 4), (9, 4)])
def test_default_sampling_and_the_defaults_of_a_partial_one(frames, stride):
    assert default_sampling(frames) == {"num_frames": frames, "video": "uniform", "stream_fps": 1.0,
                                        "window_seconds": float(frames), "stride_frames": stride}
    assert window_seconds({}, frames) == frames and stride_frames({}, frames) == stride
    assert window_seconds({"stream_fps": 4.0}, frames) == frames / 4
    assert window_seconds({"stream_fps": 4.0, "window_seconds": 3.0}, frames) == 3.0
    assert stride_frames({"stride_frames": 7}, frames) == 7
    info = ModelInfo(CLASSES, frames, SIZE, S, D, False, {"stream_fps": 2.0})
    assert info.window_seconds == frames / 2 and info.stride_seconds == stride / 2


def test_exported_graphs_have_the_io_of_the_table(model_files):
    """What ONNX Runtime reads from each exported file is `graph_io` (dynamic batch axis, dtypes, shapes)."""
    onnx_types = {"uint8": "tensor(uint8)", "float32": "tensor(float)"}
    for role in GRAPH_ROLES:
        session = ort.InferenceSession(str(graph_path(model_files["ort"], role)), providers=["CPUExecutionProvider"])
        for found, expected in zip((session.get_inputs(), session.get_outputs()), graph_io(role, F, SIZE, S, D, C)):
            assert [(t.name, t.type, [None if isinstance(n, str) else n for n in t.shape]) for t in found] == \
                [(name, onnx_types[dtype], shape) for name, (dtype, shape) in expected.items()]


@pytest.mark.parametrize("kind", ["ort", "torch"])
def test_close_is_idempotent_and_with_closes(model_files, kind):
    path, frames = model_files[kind], np.zeros((1, F, SIZE, SIZE, 3), np.uint8)
    with load_backend(path) as backend:
        assert backend.name == kind and not backend.closed
        assert backend.classify_clips(frames).shape == (1, C)
        assert (backend.sessions if kind == "ort" else backend.model)  # what close frees
    assert backend.closed and (backend.sessions == {} if kind == "ort" else backend.model is None)
    backend.close()  # again: nothing left to free, no error
    with pytest.raises(BackendError, match=f"^{path}: the {kind} backend is closed$"):
        backend.classify_clips(frames)


def test_model_config_and_threads_are_public(model_files):
    torch_backend, ort_backend = load_backend(model_files["torch"]), load_backend(model_files["ort"], threads=1)
    assert ort_backend.info.config.to_dict() == torch_backend.info.config.to_dict() == small_config().to_dict()
    assert ort_backend.threads == 1 and ort_backend.session("full").get_session_options().intra_op_num_threads == 1
    assert load_backend(model_files["ort"]).session("full").get_session_options().intra_op_num_threads == 0  # ORT's default


@pytest.mark.parametrize("kind", ["ort", "torch"])
def test_infer_refuses_feeds_that_do_not_match_io(model_files, kind):
    path = model_files[kind]
    frames = np.zeros((2, SIZE, SIZE, 3), np.uint8)
    with load_backend(path) as backend:
        assert backend.infer("frame_encoder", {"frames": frames})["tokens"].shape == (2, S, D)  # any batch
        assert backend.infer("frame_encoder", {"frames": frames[:1]})["tokens"].shape == (1, S, D)
        wanted = f"{path}: the frame_encoder graph's input 'frames' must be uint8 [B, {SIZE}, {SIZE}, 3], got"
        bad = [({"image": frames}, f"{path}: the frame_encoder graph takes ['frames'], not ['image']"),
               ({"frames": frames, "tokens": frames}, f"{path}: the frame_encoder graph takes ['frames'], not ['frames', 'tokens']"),
               ({"frames": frames.astype(np.float32)}, f"{wanted} float32 [2, {SIZE}, {SIZE}, 3]"),
               ({"frames": frames[:, :16]}, f"{wanted} uint8 [2, 16, {SIZE}, 3]"),
               ({"frames": frames[None]}, f"{wanted} uint8 [1, 2, {SIZE}, {SIZE}, 3]"),
               ({"frames": frames.tolist()}, f"{wanted} list")]
        for feeds, message in bad:
            with pytest.raises(BackendError) as info:
                backend.infer("frame_encoder", feeds)
            assert str(info.value) == message
        with pytest.raises(BackendError) as info:
            backend.infer("model", {"frames": frames[None]})  # the whole graph's role was called "model" once
        assert str(info.value) == f"{path}: no 'model' graph; the graphs are full, frame_encoder, head"
        with pytest.raises(BackendError) as info:
            backend.classify_tokens(np.zeros((1, F + 1, S, D), np.float32))
        wanted = f"{path}: the head graph's input 'tokens' must be float32 [B, {F}, {S}, {D}], got"
        assert str(info.value) == f"{wanted} float32 [1, {F + 1}, {S}, {D}]"


def test_pytriton_bindings_are_the_graphs_io(model_files, monkeypatch):
    """The served models' tensors (bound without PyTriton: a stand-in module records them) are what ONNX Runtime
    reads from the exported graphs, plus the clip model's top-k outputs."""
    from cmdcl.serve.server import ServeConfig, bind_models

    class Record:
        def __init__(self, **fields):
            self.__dict__.update(fields)

    stand_in = types.ModuleType("pytriton.model_config")
    stand_in.DynamicBatcher = stand_in.ModelConfig = stand_in.Tensor = Record
    monkeypatch.setitem(sys.modules, "pytriton", types.ModuleType("pytriton"))
    monkeypatch.setitem(sys.modules, "pytriton.model_config", stand_in)
    bound = {}

    class Triton:
        def bind(self, model_name, inputs, outputs, **_):
            bound[model_name] = [[(t.name, np.dtype(t.dtype), list(t.shape)) for t in tensors] for tensors in (inputs, outputs)]

    with load_backend(model_files["ort"]) as backend:
        assert bind_models(Triton(), backend, ServeConfig(top_k=2)) == ["cmdcl", "frame_encoder", "head"]
    numpy_types = {"tensor(uint8)": np.dtype(np.uint8), "tensor(float)": np.dtype(np.float32)}
    for model, role in (("cmdcl", "full"), ("frame_encoder", "frame_encoder"), ("head", "head")):
        session = ort.InferenceSession(str(graph_path(model_files["ort"], role)), providers=["CPUExecutionProvider"])
        graph = [[(t.name, numpy_types[t.type], t.shape[1:]) for t in tensors] for tensors in (session.get_inputs(), session.get_outputs())]
        extra = [("top_labels", np.dtype(bytes), [2]), ("top_scores", np.dtype(np.float32), [2])] if model == "cmdcl" else []
        assert bound[model] == [graph[0], graph[1] + extra]
