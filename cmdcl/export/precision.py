"""fp32 -> fp16 or bf16 conversion of an exported graph, with the fragile parts kept fp32.

ViT/CLIP models collapse in fp16 when LayerNorm statistics, softmax or the
(large) logit scale are computed in half precision, so those stay fp32:
every LayerNormalization and Softmax node, and the cosine classifier (every
node downstream of the `embedding` output: logit scale, dot product with T',
bias). Everything else that computes in float runs in the reduced type; Cast
nodes are inserted where the two regions meet. Graph inputs and outputs keep their
types (uint8 frames in, fp32 out), so callers need not care. The
CausalIntervention function is type-generic and keeps its softmaxes fp32.

`cmdcl-export --precision fp16` writes fp16 files (ONNX Runtime runs them);
bf16 graphs are made in memory by the TensorRT engine build, whose networks
are strongly typed (the graph's types are the engine's precision).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FP32_OPS = ("LayerNormalization", "Softmax")
FP32_FROM_TENSOR = "embedding"  # the classifier consumes it
REDUCED_TYPES = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
FLOATS = (TensorProto.FLOAT, *REDUCED_TYPES.values())


def convert_precision(proto: onnx.ModelProto, precision: str) -> onnx.ModelProto:
    """A copy of the fp32 graph `proto` computing in `precision` (fp16 or bf16)."""
    reduced = REDUCED_TYPES[precision]
    inferred = onnx.shape_inference.infer_shapes(proto)
    graph = inferred.graph
    dtype = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)}
    dtype.update({t.name: t.data_type for t in graph.initializer})
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    fp32_nodes = _fp32_nodes(graph, consumers)

    def only_fp32_consumers(name: str) -> bool:
        return all(id(n) in fp32_nodes for n in consumers.get(name, []))

    initializers = []
    for tensor in graph.initializer:
        if tensor.data_type == TensorProto.FLOAT and not only_fp32_consumers(tensor.name):
            tensor = _reduce(tensor, reduced)
            dtype[tensor.name] = reduced
        initializers.append(tensor)

    graph_outputs = {v.name for v in graph.output}
    casts: dict[tuple[str, int], str] = {}  # (tensor, dtype) -> name of that tensor in that dtype
    nodes: list[onnx.NodeProto] = []

    def as_dtype(name: str, target: int) -> str:
        if dtype.get(name) not in FLOATS or dtype[name] == target:
            return name
        if (name, target) not in casts:
            cast_name = f"{name}_as_{TensorProto.DataType.Name(target).lower()}"
            nodes.append(helper.make_node("Cast", [name], [cast_name], to=target, name=cast_name))
            casts[(name, target)] = cast_name
            dtype[cast_name] = target
        return casts[(name, target)]

    for node in graph.node:
        compute = TensorProto.FLOAT if id(node) in fp32_nodes else reduced
        if node.op_type == "Cast":
            if compute == reduced and _attr(node, "to") == TensorProto.FLOAT:
                _set_attr(node, "to", reduced)
        elif node.op_type == "Constant" and compute == reduced:
            value = _attr(node, "value")
            if value is not None and value.data_type == TensorProto.FLOAT and not only_fp32_consumers(node.output[0]):
                _set_attr(node, "value", _reduce(value, reduced))
        else:
            node.input[:] = [as_dtype(name, compute) for name in node.input]
        nodes.append(node)
        for i, name in enumerate(node.output):
            if dtype.get(name) not in FLOATS:
                continue
            produced = _produced_dtype(node, compute)
            if name in graph_outputs and produced != TensorProto.FLOAT:
                # Keep the graph's fp32 interface: compute under another name, cast to the output.
                node.output[i] = f"{name}_{precision}"
                nodes.append(helper.make_node("Cast", [node.output[i]], [name], to=TensorProto.FLOAT, name=f"{name}_to_fp32"))
                dtype[node.output[i]] = produced
                casts[(name, produced)] = node.output[i]
                dtype[name] = TensorProto.FLOAT
            else:
                dtype[name] = produced

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    del out.graph.node[:], out.graph.initializer[:], out.graph.value_info[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(initializers)
    return out


def _fp32_nodes(graph: onnx.GraphProto, consumers: dict) -> set[int]:
    """ids of the nodes kept in fp32: FP32_OPS, everything downstream of
    `embedding` (the classifier), and the input-free nodes that feed the
    classifier (e.g. exp of the logit scale)."""
    keep = {id(n) for n in graph.node if n.op_type in FP32_OPS}
    classifier, pending = set(), [FP32_FROM_TENSOR]
    while pending:
        for node in consumers.get(pending.pop(), []):
            if id(node) not in classifier:
                classifier.add(id(node))
                pending.extend(node.output)
    dynamic = {v.name for v in graph.input}  # tensors that depend on a graph input
    for node in graph.node:
        if any(name in dynamic for name in node.input):
            dynamic.update(node.output)
    producer = {name: node for node in graph.node for name in node.output}
    pending = [name for node in graph.node if id(node) in classifier for name in node.input]
    while pending:
        node = producer.get(pending.pop())
        if node is not None and id(node) not in classifier and not any(o in dynamic for o in node.output):
            classifier.add(id(node))
            pending.extend(node.input)
    return keep | classifier


def _produced_dtype(node: onnx.NodeProto, compute: int) -> int:
    if node.op_type == "Cast":
        return _attr(node, "to")
    return compute


def _reduce(tensor: onnx.TensorProto, reduced: int) -> onnx.TensorProto:
    """An fp32 initializer in fp16 (clipped to its range) or bf16 (rounded to nearest even)."""
    array = numpy_helper.to_array(tensor).astype(np.float32)
    if reduced == TensorProto.FLOAT16:
        return numpy_helper.from_array(np.clip(array, -65504, 65504).astype(np.float16), tensor.name)
    bits = array.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    out = onnx.TensorProto(name=tensor.name, data_type=TensorProto.BFLOAT16, dims=array.shape)
    out.raw_data = rounded.tobytes()
    return out


def _attr(node: onnx.NodeProto, name: str):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return None


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for attr in node.attribute:
        if attr.name == name:
            attr.CopyFrom(helper.make_attribute(name, value))
            return
