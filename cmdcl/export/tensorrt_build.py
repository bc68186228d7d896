"""Build TensorRT engines from exported CMDCL ONNX files (docs/design.md section 4.5).

`build_engine` registers the `cmdcl::CausalIntervention` plugin first (so
TensorRT's parser runs the fused Triton kernel instead of inlining the
node's ONNX local function), parses the file, adds one optimisation profile
over the batch axis (min 1 / opt / max), and writes the engine plus a JSON
sidecar `<engine>.json` with the ONNX metadata and the build's TensorRT
version, GPU and precision. Engines are specific to the GPU model and
TensorRT version that built them.

Precision: networks are strongly typed (the only kind TensorRT 11 builds;
TensorRT 10 is asked for it), so the graph's own types are the engine's.
An fp16 or bf16 engine is built from an fp32 export converted in memory by
`precision.convert_precision`, which keeps LayerNorm, softmax and the
classifier in fp32, or from an export already in that precision.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..artifacts import SPLIT_ROLES, graph_path, sidecar_path
from ..errors import CmdclError
from ..output_files import atomic_write

PRECISIONS = ("fp32", "fp16", "bf16")
INSTALL_HINT = "pip install 'tensorrt>=10.9' on a machine with an NVIDIA GPU"


class EngineBuildError(CmdclError, RuntimeError):
    """An engine cannot be built; the message is one line naming the cause."""


def split_pairs(onnx_path: str | Path, engine_path: str | Path) -> list[tuple[Path, Path]]:
    """(onnx, engine) for the model and for each split graph exported next to it:
    `<stem>.frame_encoder.onnx` -> `<engine stem>.frame_encoder.plan`, same for `head`."""
    pairs = [(Path(onnx_path), Path(engine_path))]
    for role in SPLIT_ROLES:
        if graph_path(onnx_path, role).is_file():
            pairs.append((graph_path(onnx_path, role), graph_path(engine_path, role)))
    return pairs


def import_tensorrt():
    """The tensorrt module, or EngineBuildError saying how to get it."""
    try:
        import tensorrt
    except ImportError:
        raise EngineBuildError(f"TensorRT is not installed ({INSTALL_HINT})") from None
    if not hasattr(tensorrt, "Builder"):  # PyPI's meta-package without its libraries
        raise EngineBuildError(f"the installed tensorrt package has no runtime libraries ({INSTALL_HINT})")
    return tensorrt


def cuda_device() -> tuple[str, str]:
    """(GPU name, compute capability 'major.minor') of the current CUDA device."""
    import torch

    if not torch.cuda.is_available():
        raise EngineBuildError("no CUDA GPU: TensorRT builds an engine for the GPU it runs on, and none is visible")
    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    precision: str = "fp16",
    max_batch: int = 32,
    timing_cache: str | Path | None = None,
    opt_batch: int | None = None,
) -> Path:
    """Build `engine_path` from `onnx_path`; returns the engine path.

    Dimension 0 of every input (batch, or frames for the frame encoder) gets
    the profile min 1 / opt `opt_batch` (default `max_batch`) / max `max_batch`.
    `timing_cache` is read if it exists and written back after the build.
    """
    from .metadata import ModelFileError, read_metadata

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    opt_batch = opt_batch or max_batch
    if precision not in PRECISIONS:
        raise EngineBuildError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if not 1 <= opt_batch <= max_batch:
        raise EngineBuildError(f"need 1 <= opt batch ({opt_batch}) <= max batch ({max_batch})")
    if not onnx_path.is_file():
        raise EngineBuildError(f"{onnx_path}: no such file")
    trt = import_tensorrt()
    gpu_name, capability = cuda_device()
    try:
        metadata = read_metadata(onnx_path)
    except ModelFileError as error:
        raise EngineBuildError(str(error)) from None
    if metadata["precision"] not in ("fp32", precision):
        raise EngineBuildError(
            f"{onnx_path} is a {metadata['precision']} export: a {precision} engine needs an fp32 (or {precision}) export"
        )
    from ..kernels.tensorrt_plugin import PLUGIN_ID, register_plugin

    try:
        register_plugin()
    except ImportError as error:
        raise EngineBuildError(f"TensorRT {trt.__version__} has no usable tensorrt.plugin (needs >= 10.9): {error}") from None

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if precision == metadata["precision"]:
        parsed = parser.parse_from_file(str(onnx_path))
    else:
        import onnx

        from .precision import convert_precision

        converted = convert_precision(onnx.load(str(onnx_path)), precision)
        parsed = parser.parse(converted.SerializeToString(), str(onnx_path))
    if not parsed:
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
        raise EngineBuildError(f"{onnx_path}: TensorRT could not parse it: {errors}")

    config = builder.create_builder_config()
    config.add_optimization_profile(_batch_profile(builder, network, onnx_path, opt_batch, max_batch))
    _load_timing_cache(config, timing_cache)

    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"{onnx_path}: TensorRT failed to build the engine (its log above says why)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(engine_path, bytes(serialized))
    if timing_cache is not None:
        _write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))

    sidecar = {
        "engine": engine_path.name,
        "onnx": onnx_path.name,
        "metadata": metadata,
        "tensorrt_version": trt.__version__,
        "gpu": gpu_name,
        "compute_capability": capability,
        "precision": precision,
        "batch_profile": {"min": 1, "opt": opt_batch, "max": max_batch},
        "plugin": PLUGIN_ID if _has_plugin_node(network, trt) else None,
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    _write_atomic(sidecar_path(engine_path), (json.dumps(sidecar, indent=2, default=str) + "\n").encode())
    return engine_path


def _write_atomic(path, data: bytes) -> None:
    """A killed or failed build never leaves a truncated engine, sidecar or timing cache."""
    try:
        with atomic_write(path) as tmp:
            tmp.write_bytes(data)
    except OSError as exc:
        raise EngineBuildError(f"{path}: cannot write: {exc.strerror or exc}") from None


def build_engines(onnx_path, engine_path, **options) -> list[Path]:
    """`build_engine` for the model and the split graphs exported next to it."""
    return [build_engine(part, plan, **options) for part, plan in split_pairs(onnx_path, engine_path)]


def _network_flags(trt) -> int:
    """Strongly typed (TensorRT 11 ignores the flag: it is always so) and,
    since the plugin has both an AOT and a JIT implementation, the AOT one:
    the engine then carries the compiled kernel and runs without Python."""
    flags = trt.NetworkDefinitionCreationFlag
    wanted = [getattr(flags, "STRONGLY_TYPED", None), flags.PREFER_AOT_PYTHON_PLUGINS]
    return sum(1 << int(flag) for flag in wanted if flag is not None)


def _batch_profile(builder, network, onnx_path: Path, opt_batch: int, max_batch: int):
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        if any(d < 0 for d in shape[1:]):
            raise EngineBuildError(f"{onnx_path}: input {tensor.name} {shape} is dynamic beyond dimension 0")
        profile.set_shape(tensor.name, [1, *shape[1:]], [opt_batch, *shape[1:]], [max_batch, *shape[1:]])
    return profile


def _load_timing_cache(config, timing_cache) -> None:
    """Start from the cache file's timings if it exists (empty cache otherwise)."""
    blob = b""
    if timing_cache is not None and Path(timing_cache).is_file():
        blob = Path(timing_cache).read_bytes()
    config.set_timing_cache(config.create_timing_cache(blob), ignore_mismatch=False)


def _has_plugin_node(network, trt) -> bool:
    """Whether the parser mapped the intervention node to the plugin (not the
    inlined local function)."""
    return any(network.get_layer(i).type == trt.LayerType.PLUGIN_V3 for i in range(network.num_layers))
