"""What an exported CMDCL ONNX file says about itself, and its validation.

`build_metadata` writes everything the runtime needs into `metadata_props`
(string key -> string value; lists and dicts as JSON). `read_metadata` is the
loader the runtime uses: it parses those values, bounds them (the config's
LIMITS, class names, sampling) and checks that the graph is the one they
describe (inputs, outputs, the CausalIntervention node and its local function,
no dangling tensors), raising ModelFileError("<path>: ...") for a file that is
missing, not ONNX, tampered with or from another tool. `check_metadata` does
the same for the copy in a TensorRT engine's sidecar, and `check_same_export`
that a split graph belongs with the model next to it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx

from .. import __version__
from ..artifacts import GRAPH_ROLES, GraphRole, default_sampling, graph_io, window_seconds
from ..errors import CmdclError, first_line
from ..kernels.onnx_node import DOMAIN, OP_TYPE, OP_VERSION
from ..model.config import CMDCLConfig, class_name_problem, sampling_problem

FORMAT = "cmdcl-onnx"
FORMAT_VERSION = 1
NORMALIZATION = "inside_graph"  # the graph takes uint8 RGB 0..255 and applies mean/std itself
ONNX_TYPES = {"uint8": onnx.TensorProto.UINT8, "float32": onnx.TensorProto.FLOAT}  # graph_io's dtypes as ONNX element types

_INT_KEYS = ("format_version", "num_frames", "image_size", "tokens_per_frame", "width", "opset")
_BOOL_KEYS = ("multi_label", "visual_intervention")
_JSON_KEYS = ("classes", "mean", "std", "sampling", "config")
_STR_KEYS = ("format", "graph_role", "precision", "tokens_dtype", "normalization", "input_format", "resize",
             "config_hash", "toolkit_version")
REQUIRED_KEYS = _INT_KEYS + _BOOL_KEYS + _JSON_KEYS + _STR_KEYS
OPTIONAL_KEYS = ("weights_hash",)  # strings; absent from exports of toolkit versions before it
# What the three graphs of one export share: a split graph that differs in any is left from another export.
SAME_EXPORT_KEYS = ("config_hash", "weights_hash", "classes", "num_frames", "image_size", "tokens_per_frame", "width",
                    "multi_label", "visual_intervention", "precision")


class ModelFileError(CmdclError, ValueError):
    """An ONNX file the runtime must not use; the message names the file and the problem."""


def sampling_defaults(model) -> dict:
    """How the runtime samples frames for this model: a checkpoint's extra["sampling"] overrides the defaults, and a
    window it does not record follows the stream_fps it does (F frames at that rate), as the runtime reads it."""
    f = model.cfg.num_frames
    recorded = (getattr(model, "checkpoint_extra", None) or {}).get("sampling", {})
    window = window_seconds(recorded, f)
    return {**default_sampling(f), "window_seconds": window, "stream_fps": f / window, **recorded}


def build_metadata(model, role: GraphRole, precision: str, opset: int, weights: str) -> dict[str, str]:
    """The metadata_props of one graph; `weights` is the model's `weights_hash`, computed once per export
    (it reads every weight) rather than once per graph."""
    cfg: CMDCLConfig = model.cfg
    size = cfg.vision.image_size
    values = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "graph_role": role,
        "classes": list(model.class_names),
        "num_frames": cfg.num_frames,
        "image_size": size,
        "tokens_per_frame": cfg.tokens_per_frame,
        "width": cfg.width,
        "multi_label": cfg.multi_label,
        "visual_intervention": cfg.visual_intervention,
        "input_format": f"uint8 RGB, channels last, {size}x{size}",
        "normalization": NORMALIZATION,
        "mean": list(cfg.mean),
        "std": list(cfg.std),
        "resize": "shorter side to image_size, centre crop",
        "sampling": sampling_defaults(model),
        "precision": precision,
        "tokens_dtype": "float32",  # fp16 graphs cast inside, so I/O stays fp32
        "opset": opset,
        "config": cfg.to_dict(),
        "config_hash": cfg.config_hash(),
        "weights_hash": weights,
        "toolkit_version": __version__,
    }
    return {k: _encode(k, v) for k, v in values.items()}


def weights_hash(model) -> str:
    """A short hash of the model's weights and dictionaries: models with one config but other
    weights (retrained) have the same config_hash, not the same weights_hash."""
    import torch  # export time only: the runtime reads metadata without torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {list(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def _encode(key: str, value) -> str:
    if key in _JSON_KEYS:
        return json.dumps(value, sort_keys=True)
    if key in _BOOL_KEYS:
        return "true" if value else "false"
    return str(value)


def read_metadata(path: str | Path) -> dict:
    """Parse and validate a CMDCL ONNX file's metadata and graph interface.

    Returns the metadata with typed values (ints, bools, lists, dicts) plus
    "path". Raises ModelFileError for anything the runtime could not trust.
    """
    path = Path(path)
    proto = _load(path)
    props = {p.key: p.value for p in proto.metadata_props}
    _check_keys(path, props)
    meta = {"path": path}
    for key in REQUIRED_KEYS:
        meta[key] = _decode(path, key, props[key])
    meta.update({key: props[key] for key in OPTIONAL_KEYS if key in props})
    _check_values(path, meta)
    _check_graph(path, proto, meta)
    return meta


def check_metadata(source: str | Path, meta) -> dict:
    """Validate already typed metadata (the copy of read_metadata's result in a TensorRT engine's
    sidecar) as read_metadata does, less the graph; `source` names the file in errors."""
    if not isinstance(meta, dict):
        raise ModelFileError(f"{source}: metadata is not an object")
    _check_keys(source, meta)
    types = {**dict.fromkeys(_INT_KEYS, int), **dict.fromkeys(_BOOL_KEYS, bool), **dict.fromkeys(_STR_KEYS + OPTIONAL_KEYS, str)}
    for key, kind in types.items():
        if key in meta and type(meta[key]) is not kind:
            wanted = {int: "an integer", bool: "true or false", str: "a string"}[kind]
            raise ModelFileError(f"{source}: metadata {key!r} must be {wanted}, not {meta[key]!r:.40}")
    _check_values(source, meta)
    return meta


def check_same_export(model_path: str | Path, model_meta: dict, part_path: str | Path, part_meta: dict, role: str) -> None:
    """A split graph (`role`: frame_encoder or head) must come from the same export as the model
    it sits next to, or stream mode would silently run another model than video mode."""
    if part_meta["graph_role"] != role:
        raise ModelFileError(f"{part_path}: is a {part_meta['graph_role']} graph, not the {role} graph of {model_path}")
    for key in SAME_EXPORT_KEYS:
        if part_meta.get(key) != model_meta.get(key):
            raise ModelFileError(f"{part_path}: its {key} differs from that of {model_path}: a split graph left from another "
                                 f"export; export (and build) the model again with its split graphs")


def _check_keys(source, props: dict) -> None:
    if props.get("format") != FORMAT:
        raise ModelFileError(f"{source}: not a CMDCL model file (metadata 'format' is {props.get('format')!r:.40}, "
                             f"expected {FORMAT!r}); export it with cmdcl-export")
    missing = [k for k in REQUIRED_KEYS if k not in props]
    if missing:
        raise ModelFileError(f"{source}: metadata is missing: {', '.join(missing)}")


def _load(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise ModelFileError(f"{path}: no such file")
    if not path.is_file():
        raise ModelFileError(f"{path}: not a file")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError and friends carry no common base
        raise ModelFileError(f"{path}: not a readable ONNX file ({first_line(exc)})") from None


def _decode(path: Path, key: str, text: str):
    try:
        if key in _INT_KEYS:
            return int(text)
        if key in _BOOL_KEYS:
            if text not in ("true", "false"):
                raise ValueError(f"expected true or false, got {text!r}")
            return text == "true"
        if key in _JSON_KEYS:
            return json.loads(text)
        return text
    except ValueError as exc:
        raise ModelFileError(f"{path}: metadata {key!r} is malformed ({str(exc):.100})") from None
    except RecursionError:
        raise ModelFileError(f"{path}: metadata {key!r} is malformed (nested too deeply)") from None


def _check_values(path: Path, meta: dict) -> None:
    """Every value in range (the config's LIMITS, class names, sampling) and consistent with the config."""
    def bad(problem):
        raise ModelFileError(f"{path}: metadata {problem}")

    if meta["format_version"] != FORMAT_VERSION:
        bad(f"format_version {meta['format_version']} is not supported (this toolkit reads {FORMAT_VERSION})")
    if meta["graph_role"] not in GRAPH_ROLES:
        bad(f"graph_role {meta['graph_role']!r:.40} is not full, frame_encoder or head")
    problem = class_name_problem(meta["classes"])
    if problem:
        bad(problem)
    for key in ("mean", "std"):
        if not (isinstance(meta[key], list) and len(meta[key]) == 3 and all(isinstance(v, (int, float)) for v in meta[key])):
            bad(f"{key!r} must be three numbers")
    if meta["normalization"] != NORMALIZATION:
        bad(f"normalization {meta['normalization']!r:.40} is not {NORMALIZATION!r}")
    if meta["precision"] not in ("fp32", "fp16"):
        bad(f"precision {meta['precision']!r:.40} is not fp32 or fp16")
    try:
        cfg = CMDCLConfig.from_dict(meta["config"])
    except (ValueError, TypeError) as exc:
        bad(f"'config' does not describe a CMDCL model ({str(exc):.200})")
    if not isinstance(meta["sampling"], dict) or "num_frames" not in meta["sampling"]:
        bad("'sampling' must be an object with num_frames")
    problem = sampling_problem(meta["sampling"], cfg.num_frames)
    if problem:
        bad(problem)
    if cfg.config_hash() != meta["config_hash"]:
        bad(f"config_hash {meta['config_hash']:.40} does not match the recorded config ({cfg.config_hash()})")
    for key, expected in (("num_frames", cfg.num_frames), ("image_size", cfg.vision.image_size),
                          ("tokens_per_frame", cfg.tokens_per_frame), ("width", cfg.width),
                          ("multi_label", cfg.multi_label), ("visual_intervention", cfg.visual_intervention)):
        if meta[key] != expected:
            bad(f"{key} {meta[key]!r} disagrees with the recorded config ({expected!r})")


def graph_interface(role: GraphRole, f: int, size: int, s: int, d: int, c: int) -> tuple[dict, dict]:
    """`artifacts.graph_io` with ONNX element types: name -> (element type, shape; None = the dynamic batch axis)."""
    return tuple({name: (ONNX_TYPES[dtype], shape) for name, (dtype, shape) in tensors.items()}
                 for tensors in graph_io(role, f, size, s, d, c))


def _describe(value: onnx.ValueInfoProto) -> tuple[int, list]:
    tensor = value.type.tensor_type
    return tensor.elem_type, [dim.dim_value if dim.HasField("dim_value") else None for dim in tensor.shape.dim]


def _check_graph(path: Path, proto: onnx.ModelProto, meta: dict) -> None:
    graph = proto.graph
    inputs, outputs = graph_interface(meta["graph_role"], meta["num_frames"], meta["image_size"],
                                      meta["tokens_per_frame"], meta["width"], len(meta["classes"]))
    for kind, values, expected in (("input", graph.input, inputs), ("output", graph.output, outputs)):
        found = {v.name: _describe(v) for v in values}
        if set(found) != set(expected):
            raise ModelFileError(f"{path}: graph {kind}s are {sorted(found)}, expected {sorted(expected)} "
                                 f"for a {meta['graph_role']} graph")
        for name, (elem, shape) in expected.items():
            got_elem, got_shape = found[name]
            if got_elem != elem or got_shape != shape:
                raise ModelFileError(
                    f"{path}: graph {kind} {name!r} is {onnx.TensorProto.DataType.Name(got_elem)} {got_shape}, "
                    f"expected {onnx.TensorProto.DataType.Name(elem)} {shape}"
                )
    _check_connected(path, graph)
    needs_node = meta["visual_intervention"] and meta["graph_role"] != "frame_encoder"
    if needs_node:
        if not any(n.domain == DOMAIN and n.op_type == OP_TYPE for n in graph.node):
            raise ModelFileError(f"{path}: the {DOMAIN}::{OP_TYPE} node is missing from the graph")
        if not any(fn.domain == DOMAIN and fn.name == OP_TYPE for fn in proto.functions):
            raise ModelFileError(f"{path}: the local function {DOMAIN}::{OP_TYPE} is missing, so runtimes "
                                 f"without the plugin cannot run the graph")
        versions = {op.domain: op.version for op in proto.opset_import}
        if versions.get(DOMAIN) != OP_VERSION:
            raise ModelFileError(f"{path}: opset import for domain {DOMAIN!r} is {versions.get(DOMAIN)}, "
                                 f"expected {OP_VERSION}")


def _check_connected(path: Path, graph: onnx.GraphProto) -> None:
    """Every node input and graph output is produced by something (catches removed nodes)."""
    known = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    for node in graph.node:
        missing = [name for name in node.input if name not in known]
        if missing:
            raise ModelFileError(f"{path}: graph is broken: node {node.name or node.op_type!r} reads "
                                 f"{missing[0]!r}, which nothing produces (a node was removed or reordered)")
        known.update(node.output)
    for output in graph.output:
        if output.name not in known:
            raise ModelFileError(f"{path}: graph is broken: output {output.name!r} is produced by no node")
