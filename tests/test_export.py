"""ONNX export: parity with PyTorch, folded constants, the custom node, fp16, metadata."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import cmdcl
from cmdcl.export import ExportError, export_onnx
from cmdcl.export.metadata import ModelFileError, read_metadata
from cmdcl.export.precision import convert_precision
from cmdcl.export.verify import TOLERANCES, VerificationError, compare, onnx_session, relative_error, run_split, verify_export
from cmdcl.kernels.onnx_node import DOMAIN, OP_TYPE, intervention_function
from cmdcl.kernels.reference import causal_intervention_reference
from cmdcl.runtime import load_backend
from conftest import random_frames, skew_priors

# name -> (num_classes, config overrides). Sizes are chosen distinct (C=3, Kb=7,
# Kz=6, D_vlm=24, D=32) so that initializer shapes identify what they hold.
CONFIGS = {
    "default": (3, dict(num_bias=7)),
    "C1-Kz1-S1-F3": (1, dict(num_confounders=1, token_grid=0, num_frames=3)),
    "multi-label-attention-pool-F3": (4, dict(multi_label=True, pooling="attention", num_frames=3)),
    "no-interventions": (2, dict(visual_intervention=False, textual_intervention=False)),
    "catt-whitened-keys-temperature-fixed": (3, dict(approximator="catt", key_norm="whiten", learn_temperature=True,
                                                     fixed_key_proj=True)),
    "centred-keys": (3, dict(key_norm="centre")),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each config exported once (fp32, split), shared by the tests of this module."""
    cache = {}

    def get(name, precision="fp32"):
        if (name, precision) not in cache:
            from conftest import small_config

            num_classes, overrides = CONFIGS[name]
            torch.manual_seed(0)
            model = cmdcl.model.CMDCL(small_config(**overrides), [f"class {i}" for i in range(num_classes)]).eval()
            with torch.no_grad():  # no parameter keeps its (shared) init value: ones, zeros
                for param in model.parameters():
                    param.add_(0.1 * torch.randn_like(param))
            skew_priors(model)  # a uniform prior cancels in softmax: an export that lost log pi would still match
            out = tmp_path_factory.mktemp(name) / f"model_{precision}.onnx"
            cache[(name, precision)] = model, export_onnx(model, out, precision=precision)
        return cache[(name, precision)]

    return get


def torch_outputs(model, frames):
    with torch.no_grad():
        return [t.numpy() for t in model(frames)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_full_and_split_graphs_match_pytorch(exported, name):
    model, paths = exported(name)
    full = onnx_session(paths["full"])
    split = onnx_session(paths["frame_encoder"]), onnx_session(paths["head"])
    for batch in (1, 3):
        frames = random_frames(batch, model.cfg.num_frames, model.cfg.vision.image_size, seed=batch).numpy()
        reference = torch_outputs(model, torch.from_numpy(frames))
        full_out = full.run(None, {"frames": frames})
        assert full_out[0].shape == (batch, len(model.class_names)) and full_out[1].shape == (batch, model.cfg.width)
        check = compare(f"{name} batch {batch}", full_out, reference, "fp32")
        assert check.passed, check
        split_out = run_split(*split, frames)
        for a, b in zip(split_out, full_out):  # the streaming composition is the full graph
            assert relative_error(a, b) <= 1e-5


def test_graph_holds_folded_constants_and_no_text_or_dictionary_weights(exported):
    model, paths = exported("default")
    proto = onnx.load(paths["full"])
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}

    def holds(value):
        value = value.detach().numpy()
        return any(a.shape == value.shape and np.allclose(a, value, atol=1e-6) for a in inits.values())

    with torch.no_grad():
        text_debiased = model.text_features()
        kt, vt, kz, vz, log_prior = model.intervention_memories(text_debiased)
    # T' and the op's memories are constants of the graph...
    for constant in (text_debiased, kt, vt, kz, vz, log_prior):
        assert holds(constant)
    assert [list(a.shape) for a in inits.values() if a.shape[:1] == (len(model.class_names),)] == [[3, 32]]
    # ...and nothing they are computed from is: no T, text projection, textual
    # intervention, bias or confounder dictionary, or memory projections.
    sources = [model.text, model.bias_dict, model.bias_prior, model.conf_dict, model.conf_prior,
               *model.text_proj.parameters(), *model.textual.parameters()]
    for module in (model.visual.k_text, model.visual.v_text, model.visual.k_conf, model.visual.v_conf):
        sources += [module.weight, module.weight.t(), module.bias]
    assert not any(holds(t) for t in sources)
    assert not [a.shape for a in inits.values() if model.cfg.num_bias in a.shape]  # Kb = 7 appears nowhere
    forbidden = ("model.text", "textual", "bias_dict", "bias_prior", "conf_dict", "conf_prior", "k_text", "v_text",
                 "k_conf", "v_conf")
    assert "text_debiased" in inits and not [n for n in inits if any(k in n for k in forbidden)]


def test_intervention_is_one_node_with_plugin_attributes_and_a_local_function(exported):
    model, paths = exported("default")
    proto = onnx.load(paths["full"])
    nodes = [n for n in proto.graph.node if n.domain == DOMAIN]
    assert [n.op_type for n in nodes] == [OP_TYPE]
    node = nodes[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    head_dim = model.cfg.width // model.cfg.heads
    assert attrs["num_heads"] == model.cfg.heads and attrs["scale"] == pytest.approx(head_dim**-0.5)
    assert attrs["plugin_namespace"] == b"cmdcl" and attrs["plugin_version"] == b"1"
    inits = {t.name: list(t.dims) for t in proto.graph.initializer}
    h, c, k = model.cfg.heads, len(model.class_names), model.cfg.num_confounders
    assert [inits.get(name) for name in node.input[1:]] == [[h, c, head_dim]] * 2 + [[h, k, head_dim]] * 2 + [[k]]
    assert [(f.domain, f.name) for f in proto.functions] == [(DOMAIN, OP_TYPE)]
    assert {o.domain: o.version for o in proto.opset_import}[DOMAIN] == 1
    onnx.checker.check_model(proto, full_check=True)
    # The frame encoder has no intervention, and the model without it has no node.
    assert not onnx.load(paths["frame_encoder"]).functions
    _, plain = exported("no-interventions")
    assert not any(n.domain == DOMAIN for n in onnx.load(plain["full"]).graph.node)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_local_function_alone_matches_the_reference(dtype):
    """The function body (what ONNX Runtime inlines) against the PyTorch reference op."""
    rng = np.random.default_rng(0)
    h, d, c, k = 2, 8, 3, 5
    arrays = [rng.standard_normal(s).astype(dtype) for s in ((2, 7, h * d), (h, c, d), (h, c, d), (h, k, d), (h, k, d))]
    arrays.append(np.log(rng.dirichlet(np.ones(k))).astype(dtype))
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    names = ["Q", "Kt", "Vt", "Kz", "Vz", "log_prior"]
    node = helper.make_node(OP_TYPE, names, ["Y"], domain=DOMAIN, num_heads=h, scale=0.3,
                            plugin_namespace="cmdcl", plugin_version="1")
    graph = helper.make_graph([node], "op", [helper.make_tensor_value_info(n, elem, a.shape) for n, a in zip(names, arrays)],
                              [helper.make_tensor_value_info("Y", elem, [2, 7, 2 * h * d])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)],
                              functions=[intervention_function(18)])
    onnx.checker.check_model(proto, full_check=True)
    (out,) = onnx_session_from_proto(proto).run(None, dict(zip(names, arrays)))
    tensors = [torch.from_numpy(a.astype(np.float32)) for a in arrays]
    reference = causal_intervention_reference(*tensors, num_heads=h, scale=0.3).numpy()
    assert out.dtype == dtype and out.shape == (2, 7, 2 * h * d)
    assert relative_error(out, reference) <= (1e-5 if dtype == np.float32 else TOLERANCES["fp16"])


def onnx_session_from_proto(proto):
    import onnxruntime as ort

    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def assert_reduced_except_fragile_parts(proto: onnx.ModelProto, reduced: int) -> None:
    """LayerNorm, softmax and the logit scale compute in fp32, the weights are
    in the `reduced` type, and the graph's inputs and outputs keep their types."""
    inferred = onnx.shape_inference.infer_shapes(proto).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.input, *inferred.value_info, *inferred.output)}
    types.update({t.name: t.data_type for t in inferred.initializer})
    fp32_nodes = [n for n in inferred.node if n.op_type in ("LayerNormalization", "Softmax", "Exp")]
    assert {n.op_type for n in fp32_nodes} == {"LayerNormalization", "Softmax", "Exp"}  # Exp: the logit scale
    for node in fp32_nodes:
        assert types[node.input[0]] == TensorProto.FLOAT, node.name
    weights = [t for t in proto.graph.initializer if len(t.dims) == 2 and t.dims[0] * t.dims[1] >= 256]
    assert weights and all(t.data_type == reduced for t in weights)
    assert types["frames"] == TensorProto.UINT8 and types["logits"] == types["embedding"] == TensorProto.FLOAT


def test_fp16_export_keeps_layernorm_softmax_and_logit_scale_fp32_and_stays_within_tolerance(exported):
    model, paths = exported("multi-label-attention-pool-F3", "fp16")
    assert_reduced_except_fragile_parts(onnx.load(paths["full"]), TensorProto.FLOAT16)
    full = onnx_session(paths["full"])
    split = onnx_session(paths["frame_encoder"]), onnx_session(paths["head"])
    frames = random_frames(3, model.cfg.num_frames, model.cfg.vision.image_size, seed=5).numpy()
    reference = torch_outputs(model, torch.from_numpy(frames))
    for outputs in (full.run(None, {"frames": frames}), run_split(*split, frames)):
        check = compare("fp16", outputs, reference, "fp16")
        assert check.passed, check
        assert check.logits_error > 1e-6  # it really is fp16, not the fp32 graph


def test_bf16_conversion_keeps_the_same_parts_fp32_and_rounds_weights_to_nearest(exported):
    """The in-memory bf16 graph the engine build makes (ONNX Runtime cannot run
    bf16 graphs; TensorRT's parser builds it in test_trt_parser, the GPU test
    checks its numbers)."""
    _, paths = exported("multi-label-attention-pool-F3")
    fp32 = onnx.load(paths["full"])
    bf16 = convert_precision(fp32, "bf16")
    assert_reduced_except_fragile_parts(bf16, TensorProto.BFLOAT16)
    before = {t.name: numpy_helper.to_array(t) for t in fp32.graph.initializer}
    for tensor in bf16.graph.initializer:
        if tensor.data_type == TensorProto.BFLOAT16:
            expected = torch.from_numpy(before[tensor.name].copy()).to(torch.bfloat16).float().numpy()
            assert np.array_equal(numpy_helper.to_array(tensor).astype(np.float32), expected), tensor.name


@pytest.mark.parametrize("name", ["default", "multi-label-attention-pool-F3"])
def test_metadata_round_trips_for_every_graph(exported, name):
    model, paths = exported(name)
    cfg = model.cfg
    assert list(paths) == ["full", "frame_encoder", "head"]  # the roles are the metadata's graph_role
    for role, path in paths.items():
        meta = read_metadata(path)
        assert meta["graph_role"] == role and meta["precision"] == "fp32" and meta["tokens_dtype"] == "float32"
        assert meta["classes"] == model.class_names and meta["multi_label"] == cfg.multi_label
        assert (meta["num_frames"], meta["image_size"], meta["tokens_per_frame"], meta["width"]) == (
            cfg.num_frames, cfg.vision.image_size, cfg.tokens_per_frame, cfg.width)
        assert meta["mean"] == pytest.approx(cfg.mean) and meta["std"] == pytest.approx(cfg.std)
        assert meta["normalization"] == "inside_graph"
        assert meta["sampling"]["num_frames"] == cfg.num_frames and meta["sampling"]["window_seconds"] > 0
        assert meta["config"] == cfg.to_dict() and meta["config_hash"] == cfg.config_hash()
        assert meta["toolkit_version"] == cmdcl.__version__ and meta["format_version"] == 1


def test_sampling_from_checkpoint_extra_is_recorded(make_model, tmp_path):
    model = make_model()
    model.checkpoint_extra = {"sampling": {"stream_fps": 2.0, "window_seconds": 2.0}}
    paths = export_onnx(model, tmp_path / "m.onnx", split=False)
    assert set(paths) == {"full"} and not (tmp_path / "m.head.onnx").exists()
    sampling = read_metadata(paths["full"])["sampling"]
    assert sampling["stream_fps"] == 2.0 and sampling["window_seconds"] == 2.0


def test_a_recorded_stream_fps_alone_sets_the_window_the_runtime_uses(make_model, tmp_path):
    model = make_model()  # F = 4 frames
    model.checkpoint_extra = {"sampling": {"stream_fps": 2.0}}
    path = export_onnx(model, tmp_path / "m.onnx", split=False)["full"]
    sampling = read_metadata(path)["sampling"]
    assert sampling["stream_fps"] == 2.0 and sampling["window_seconds"] == model.cfg.num_frames / 2.0  # was F / 1 s
    assert load_backend(path).info.window_seconds == model.cfg.num_frames / 2.0


def _remove_node(proto):
    proto.graph.node.remove(next(n for n in proto.graph.node if n.domain == DOMAIN))


def _remove_metadata(key):
    def tamper(proto):
        proto.metadata_props.remove(next(p for p in proto.metadata_props if p.key == key))
    return tamper


def _set_metadata(key, value):
    def tamper(proto):
        next(p for p in proto.metadata_props if p.key == key).value = value
    return tamper


TAMPERS = {
    "intervention node removed": (_remove_node, "nothing produces"),
    "local function removed": (lambda p: p.functions.pop(), "local function cmdcl::CausalIntervention is missing"),
    "classes missing": (_remove_metadata("classes"), "metadata is missing: classes"),
    "all metadata missing": (lambda p: p.metadata_props.clear(), "not a CMDCL model file"),
    "extra class": (_set_metadata("classes", '["a", "b", "c", "d"]'), "graph output 'logits'"),
    "config edited": (_set_metadata("config_hash", "0123456789abcdef"), "config_hash"),
    "frames changed": (_set_metadata("num_frames", "9"), "disagrees with the recorded config"),
    "malformed json": (_set_metadata("sampling", "{not json"), "metadata 'sampling' is malformed"),
    "input renamed": (lambda p: setattr(p.graph.input[0], "name", "video"), "graph inputs are ['video']"),
}


@pytest.mark.parametrize("case", list(TAMPERS))
def test_tampered_model_is_rejected_by_the_runtime_loader(exported, tmp_path, case):
    _, paths = exported("default")
    tamper, expected = TAMPERS[case]
    proto = onnx.load(paths["full"])
    tamper(proto)
    path = tmp_path / "tampered.onnx"
    onnx.save(proto, path)
    with pytest.raises(ModelFileError) as info:
        read_metadata(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message


def test_loader_rejects_missing_and_non_onnx_files(tmp_path):
    with pytest.raises(ModelFileError, match="no such file"):
        read_metadata(tmp_path / "absent.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\xffnot a protobuf" * 10)
    with pytest.raises(ModelFileError, match="not a readable ONNX file|not a CMDCL model file"):
        read_metadata(garbage)


def test_verify_passes_for_the_export_and_fails_against_another_model(exported, make_model):
    model, paths = exported("default")
    checks, notes = verify_export(model, paths, "fp32")
    assert len(checks) >= 2 and all(c.passed for c in checks)  # full + split on random frames at least
    other = make_model(num_classes=3, seed=1, num_bias=7)
    with pytest.raises(VerificationError, match="disagree with PyTorch"):
        verify_export(other, paths, "fp32")


def test_bad_opset_and_unwritable_output_are_export_errors(make_model, tmp_path):
    model = make_model()
    with pytest.raises(ExportError, match="opset 13 is not supported: the graph needs opset >= 17"):
        export_onnx(model, tmp_path / "m.onnx", opset=13)
    with pytest.raises(ExportError, match="does not exist"):
        export_onnx(model, tmp_path / "no" / "such" / "m.onnx")
    with pytest.raises(ExportError, match="is a directory"):
        export_onnx(model, tmp_path)
