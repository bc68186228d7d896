"""CMDCL -> ONNX (docs/design.md sections 4.3 and 4.4).

Three graphs (the roles full, frame_encoder and head of `cmdcl.artifacts`,
with the inputs and outputs `artifacts.graph_io` gives), each a thin nn.Module
around the model that the TorchScript exporter traces
(`torch.onnx.export(..., dynamo=False)`, which calls
`CausalInterventionNode.symbolic` for the fused op).

T' and the intervention memories depend on no input: they are computed once
here and enter the traced graphs as buffers, so the files hold those
constants and none of the text / bias-dictionary / confounder-dictionary
weights they come from.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from ..artifacts import MAX_OPSET, MIN_OPSET, SPLIT_ROLES, GraphRole, graph_io, graph_path
from ..errors import CmdclError, first_line
from ..kernels.onnx_node import DOMAIN, OP_VERSION, intervention_function
from ..model.cmdcl import CMDCL
from ..output_files import OutputError, atomic_write, check_writable
from . import metadata
from .precision import convert_precision

PRECISIONS = ("fp32", "fp16")


class ExportError(CmdclError, RuntimeError):
    """An export that cannot be done as asked; the message is one line."""


class FrameEncoderGraph(nn.Module):
    def __init__(self, model: CMDCL):
        super().__init__()
        self.model = model

    def forward(self, frames):
        # Cast first: TensorRT accepts a uint8 input only as the input of a Cast.
        return self.model.frame_tokens(frames.float())


class HeadGraph(nn.Module):
    """The head with T' and the intervention memories as constant buffers."""

    def __init__(self, model: CMDCL):
        super().__init__()
        self.model = model
        with torch.no_grad():
            text_debiased = model.text_features()
            memories = model.intervention_memories(text_debiased)
        self.register_buffer("text_debiased", text_debiased)
        for name, value in zip(("kt", "vt", "kz", "vz", "log_prior"), memories):
            self.register_buffer(name, value)

    def forward(self, tokens):
        memories = (self.kt, self.vt, self.kz, self.vz, self.log_prior)
        return self.model.classify(tokens, self.text_debiased, memories)


class FullGraph(HeadGraph):
    """Frames in: the frame encoder on every frame, then the head."""

    def forward(self, frames):
        b, f = frames.shape[:2]
        tokens = self.model.frame_tokens(frames.float().flatten(0, 1))  # Cast first, as above
        return super().forward(tokens.view(b, f, tokens.shape[1], tokens.shape[2]))


def output_paths(out_path: str | Path, split: bool = True) -> dict[GraphRole, Path]:
    """role -> file: `<stem>.onnx` (full) and, with `split`, `<stem>.frame_encoder.onnx`, `<stem>.head.onnx`."""
    return {role: graph_path(out_path, role) for role in ("full", *(SPLIT_ROLES if split else ()))}


def export_onnx(model: CMDCL, out_path: str | Path, opset: int = 18, precision: str = "fp32", split: bool = True,
                progress=None) -> dict[GraphRole, Path]:
    """Export `model`; returns {"full": Path[, "frame_encoder": Path, "head": Path]}.

    `progress`, if given, is called with a short description before each graph.
    """
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(
            f"opset {opset} is not supported: the graph needs opset >= {MIN_OPSET} (LayerNormalization, kept in "
            f"fp32 for fp16; CastLike in the CausalIntervention function) and torch writes at most {MAX_OPSET}"
        )
    paths = output_paths(out_path, split)
    for path in paths.values():
        try:
            check_writable(path, "output")
        except OutputError as exc:
            raise ExportError(str(exc)) from None

    model = copy.deepcopy(model).float().cpu().eval()
    model.set_intervention_impl("onnx")  # trace the fused op as one cmdcl::CausalIntervention node
    cfg = model.cfg
    f, size, s, d = cfg.num_frames, cfg.vision.image_size, cfg.tokens_per_frame, cfg.width
    # Tracing runs the model once: one clip is enough (the batch axis is exported dynamic).
    example_frames = torch.randint(0, 256, (1, f, size, size, 3), dtype=torch.uint8)
    graphs = {
        "full": (FullGraph(model), example_frames),
        "frame_encoder": (FrameEncoderGraph(model), example_frames[0, :2]),
        "head": (HeadGraph(model), torch.randn(2, f, s, d)),
    }
    weights = metadata.weights_hash(model)
    for role, path in paths.items():
        module, example = graphs[role]
        inputs, outputs = (list(names) for names in graph_io(role, f, size, s, d, len(model.class_names)))
        if progress:
            progress(f"exporting {role} -> {path.name}")
        proto = _trace(module, example, inputs, outputs, opset)
        proto = _finish(proto, model, role, precision, opset, weights)
        _save(proto, path)
    return paths


def _trace(module: nn.Module, example: torch.Tensor, inputs: list[str], outputs: list[str], opset: int) -> onnx.ModelProto:
    """torch.onnx.export to memory, batch axes dynamic, constants folded."""
    import io

    buffer = io.BytesIO()
    dynamic = {name: {0: "batch"} for name in inputs + outputs}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
        torch.onnx.export(
            module,
            (example,),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buffer.getvalue())


def _finish(proto: onnx.ModelProto, model: CMDCL, role: str, precision: str, opset: int, weights: str) -> onnx.ModelProto:
    """Add the local function, convert precision, attach metadata, check."""
    has_node = any(n.domain == DOMAIN for n in proto.graph.node)
    if has_node:
        proto.functions.append(intervention_function(opset))
        del proto.opset_import[:]
        proto.opset_import.extend([onnx.helper.make_opsetid("", opset), onnx.helper.make_opsetid(DOMAIN, OP_VERSION)])
    if precision == "fp16":
        proto = convert_precision(proto, precision)
    cfg = model.cfg
    _set_interface(proto, *metadata.graph_interface(role, cfg.num_frames, cfg.vision.image_size, cfg.tokens_per_frame,
                                                     cfg.width, len(model.class_names)))
    proto.doc_string = f"CMDCL {role} graph exported by the cmdcl toolkit"
    del proto.metadata_props[:]
    for key, value in metadata.build_metadata(model, role, precision, opset, weights).items():
        proto.metadata_props.add(key=key, value=value)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"the exported {role} graph fails onnx.checker: {first_line(exc)}") from None
    return proto


def _set_interface(proto: onnx.ModelProto, inputs: dict, outputs: dict) -> None:
    """Write the full input/output types: the tracer cannot see through the custom node."""
    for values, expected in ((proto.graph.input, inputs), (proto.graph.output, outputs)):
        for value in values:
            elem, shape = expected[value.name]
            dims = ["batch" if n is None else n for n in shape]
            value.type.CopyFrom(onnx.helper.make_tensor_type_proto(elem, dims))


def _save(proto: onnx.ModelProto, path: Path) -> None:
    """Write atomically: a temporary file renamed into place."""
    try:
        with atomic_write(path) as tmp:
            onnx.save(proto, tmp)
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: cannot write: {exc}") from None
