"""TensorRT's ONNX parser on exported graphs, without a GPU (the tensorrt-rtx wheel).

For each graph: parse it as exported (the parser expands the
cmdcl::CausalIntervention local function when no plugin is registered),
ask the parser whether every node is supported, and build an engine from
the function-inlined graph (`onnx.inliner.inline_local_functions`), with an
optimisation profile over the batch axis. TensorRT registers plugins and
holds process-wide state, so callers use `check_in_subprocess`; this module
is also the subprocess: `python -m cmdcl.export.trt_parser_check a.onnx ...`
prints one JSON object per graph.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import onnx.inliner

from ..errors import CmdclError


class TensorRTUnavailable(CmdclError, RuntimeError):
    """The tensorrt-rtx wheel is not installed or does not load."""


def check_graph(path: str | Path, build: bool = True, max_batch: int = 4) -> dict:
    """Parse, support query and (optionally) engine build for one ONNX file, in this process."""
    try:
        import tensorrt_rtx as trt
    except ImportError as exc:
        raise TensorRTUnavailable(f"tensorrt-rtx is not importable ({exc}); pip install tensorrt-rtx") from None
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    proto = onnx.load(str(path))
    result = {"path": str(path), "tensorrt": trt.__version__}

    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    result["parsed"] = bool(parser.parse(proto.SerializeToString()))
    result["parse_errors"] = _errors(parser)

    support_network = builder.create_network(0)  # the parser must not outlive its network
    support_parser = trt.OnnxParser(support_network, logger)
    result["all_supported"] = bool(support_parser.supports_model_v2(proto.SerializeToString()))
    result["unsupported_subgraphs"] = [
        len(support_parser.get_subgraph_nodes(i))
        for i in range(support_parser.num_subgraphs)
        if not support_parser.is_subgraph_supported(i)
    ]
    if build:
        result.update(_build_inlined(trt, builder, logger, proto, max_batch))
    return result


def _errors(parser) -> list[str]:
    """Each parser error as "<op> node <name>: <description>"."""
    errors = (parser.get_error(i) for i in range(parser.num_errors))
    return [f"{e.node_operator()} node {e.node_name()!r}: {e.desc()}" for e in errors]


def _build_inlined(trt, builder, logger, proto: onnx.ModelProto, max_batch: int) -> dict:
    inlined = onnx.inliner.inline_local_functions(proto)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(inlined.SerializeToString()):
        return {"engine_bytes": None, "build_error": "inlined graph does not parse: " + "; ".join(_errors(parser))}
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = list(tensor.shape)[1:]
        profile.set_shape(tensor.name, [1, *rest], [max(1, max_batch // 2), *rest], [max_batch, *rest])
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        return {"engine_bytes": None, "build_error": "build_serialized_network returned no engine"}
    return {"engine_bytes": engine.nbytes, "build_error": None}


def check_in_subprocess(paths, build: bool = True, max_batch: int = 4, timeout: float = 600) -> list[dict]:
    """`check_graph` for each path in a fresh Python process; raises TensorRTUnavailable when the wheel is missing."""
    cmd = [sys.executable, "-m", __name__, "--max-batch", str(max_batch), *([] if build else ["--no-build"])]
    proc = subprocess.run([*cmd, *map(str, paths)], capture_output=True, text=True, timeout=timeout)
    if proc.returncode == 3:
        raise TensorRTUnavailable(proc.stdout.strip() or proc.stderr.strip())
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"TensorRT parser check exited with {proc.returncode}: {tail[0]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--no-build", dest="build", action="store_false")
    parser.add_argument("--max-batch", type=int, default=4)
    args = parser.parse_args(argv)
    for path in args.paths:
        try:
            result = check_graph(path, build=args.build, max_batch=args.max_batch)
        except TensorRTUnavailable as exc:
            print(exc)
            return 3
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
