"""The fused intervention as one ONNX node plus its standard-op definition.

The op's one definition of its ONNX form: export writes it, the metadata
check and the TensorRT plugin name it from here.

Export emits `cmdcl::CausalIntervention` (docs/design.md section 3) through a
torch.autograd.Function whose `symbolic` the TorchScript ONNX exporter calls;
its forward is the PyTorch reference, so tracing computes the right values.
`intervention_function()` is the ONNX local function with the same domain and
name: ONNX Runtime, and a TensorRT without the plugin, inline it; a TensorRT
with the plugin registered runs the fused kernel instead.
"""

from __future__ import annotations

import onnx
import torch
from onnx import helper

from .reference import causal_intervention_reference

DOMAIN = "cmdcl"
OP_TYPE = "CausalIntervention"
OP_VERSION = 1
INPUTS = ("Q", "Kt", "Vt", "Kz", "Vz", "log_prior")
ATTRIBUTES = ("num_heads", "scale", "plugin_namespace", "plugin_version")


class CausalInterventionNode(torch.autograd.Function):
    """Runs the reference in PyTorch; exports as one `cmdcl::CausalIntervention` node."""

    @staticmethod
    def forward(ctx, q, kt, vt, kz, vz, log_prior, num_heads: int, scale: float):
        return causal_intervention_reference(q, kt, vt, kz, vz, log_prior, num_heads, scale)

    @staticmethod
    def symbolic(g, q, kt, vt, kz, vz, log_prior, num_heads: int, scale: float):
        out = g.op(
            f"{DOMAIN}::{OP_TYPE}",
            q, kt, vt, kz, vz, log_prior,
            num_heads_i=num_heads,
            scale_f=scale,
            plugin_namespace_s=DOMAIN,
            plugin_version_s=str(OP_VERSION),
        )
        # [B, L, h*d] -> [B, L, 2*h*d]: the exporter cannot infer a custom op's type.
        sizes = q.type().varyingSizes()
        if sizes is not None and sizes[-1] is not None:
            sizes = sizes[:-1] + [2 * sizes[-1]]
        out.setType(q.type().with_sizes(sizes))
        return out


def causal_intervention_node(q, kt, vt, kz, vz, log_prior, num_heads: int, scale: float):
    # Under tracing `scale` may be a traced value (it comes from q.shape); the node needs a number.
    return CausalInterventionNode.apply(q, kt, vt, kz, vz, log_prior, int(num_heads), float(scale))


def intervention_function(opset: int) -> onnx.FunctionProto:
    """`cmdcl::CausalIntervention` in standard ops, for a model of `opset` (>= 15:
    Shape start/end, CastLike).

    Type-generic: scores are computed in the dtype of Q and the softmaxes run
    in fp32, as in the PyTorch reference. h and d are read off Kt's shape, so
    only `scale` is needed from the attributes.
    """
    n = helper.make_node
    scale = n("Constant", [], ["scale_f32"])
    scale.attribute.append(helper.make_attribute_ref("value_float", onnx.AttributeProto.FLOAT, ref_attr_name="scale"))
    nodes = [
        n("Shape", ["Kt"], ["heads"], start=0, end=1),
        n("Shape", ["Kt"], ["head_dim"], start=2, end=3),
        n("Constant", [], ["keep_bl"], value=helper.make_tensor("keep_bl", onnx.TensorProto.INT64, [2], [0, 0])),
        n("Constant", [], ["merged"], value=helper.make_tensor("merged", onnx.TensorProto.INT64, [3], [0, 0, -1])),
        n("Concat", ["keep_bl", "heads", "head_dim"], ["split_shape"], axis=0),
        n("Reshape", ["Q", "split_shape"], ["q_split"]),
        n("Transpose", ["q_split"], ["q_heads"], perm=[0, 2, 1, 3]),  # [B, h, L, d]
        scale,
        n("CastLike", ["scale_f32", "Q"], ["scale_q"]),
    ]
    for memory, keys, values, prior in (("text", "Kt", "Vt", None), ("conf", "Kz", "Vz", "log_prior")):
        scores = f"{memory}_scores"
        nodes += [
            n("Transpose", [keys], [f"{memory}_keys_t"], perm=[0, 2, 1]),  # [h, d, K]
            n("MatMul", ["q_heads", f"{memory}_keys_t"], [f"{memory}_qk"]),  # [B, h, L, K]
            n("Mul", [f"{memory}_qk", "scale_q"], [f"{memory}_qk_scaled"]),
            n("Cast", [f"{memory}_qk_scaled"], [scores], to=onnx.TensorProto.FLOAT),
        ]
        if prior:
            nodes += [
                n("CastLike", [prior, scores], [f"{memory}_prior_f32"]),
                n("Add", [scores, f"{memory}_prior_f32"], [f"{memory}_scores_prior"]),
            ]
            scores = f"{memory}_scores_prior"
        nodes += [
            n("Softmax", [scores], [f"{memory}_attn_f32"], axis=-1),
            n("CastLike", [f"{memory}_attn_f32", values], [f"{memory}_attn"]),
            n("MatMul", [f"{memory}_attn", values], [f"{memory}_heads"]),  # [B, h, L, d]
            n("Transpose", [f"{memory}_heads"], [f"{memory}_tokens"], perm=[0, 2, 1, 3]),
            n("Reshape", [f"{memory}_tokens", "merged"], [f"{memory}_out"]),  # [B, L, h*d]
        ]
    nodes.append(n("Concat", ["text_out", "conf_out"], ["Y"], axis=-1))
    return helper.make_function(
        DOMAIN,
        OP_TYPE,
        list(INPUTS),
        ["Y"],
        nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=list(ATTRIBUTES),
    )
