"""A Triton Inference Server model repository for an exported CMDCL model.

    repo/
      frame_encoder/   config.pbtxt, 1/model.onnx (or model.plan)   frames uint8 [N, H, W, 3] -> tokens [N, S, D]
      head/            config.pbtxt, labels.txt, 1/model.onnx|plan   tokens [B, F, S, D] -> logits [B, C], embedding
      cmdcl/           config.pbtxt, labels.txt, 1/model.py          BLS: a whole clip frames [B, F, H, W, 3] -> logits, embedding
      cmdcl_stream/    config.pbtxt, labels.txt, 1/model.py          sequence batching: one frame per request, one sequence per camera
                                                                     (windows of one or several lengths, as cmdcl-run --mode stream)

frame_encoder and head run on Triton's ONNX Runtime backend (the exported
graphs; the CausalIntervention node's local function needs no custom-op
library) or its TensorRT backend (engines from cmdcl-build), with dynamic
batching. `cmdcl` and `cmdcl_stream` are Python-backend models (the file
`triton_bls.py` of this package, copied) that call the two over BLS, so
frames of all clips and all cameras share frame-encoder batches.

Every tensor is a graph's (`cmdcl.artifacts.graph_io`; the batch axis is the
config's max_batch_size). Configs are written as protobuf text;
`validate_triton_repo` parses them with the `ModelConfig` schema that
tritonclient ships and checks every tensor against the model files.

Writing never touches what is not ours: the four model directories are
written in a temporary directory next to the repository and then swapped in,
one rename each, and an existing directory of one of those names is replaced
only when its config.pbtxt carries our marker (first line `MARKER`, and the
model's name); any other is an error and stays as it is, as does everything
else in the repository.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

from ..artifacts import SPLIT_ROLES, graph_io, graph_path, read_sidecar, sidecar_path, stream_grid, window_scales
from ..errors import CmdclError
from ..export.metadata import ModelFileError, check_same_export, read_metadata
from ..output_files import temporary_dir

ENGINE_FORMATS = ("onnx", "plan")
INSTANCE_KINDS = {"auto": "KIND_AUTO", "gpu": "KIND_GPU", "cpu": "KIND_CPU"}
LABELS_FILE = "labels.txt"
CLIP_MODEL, STREAM_MODEL = "cmdcl", "cmdcl_stream"
MODEL_FILES = {"onnx": "model.onnx", "plan": "model.plan"}
PLATFORMS = {"onnx": ("onnxruntime", "onnxruntime_onnx"), "plan": ("tensorrt", "tensorrt_plan")}
TRITON_TYPES = {"uint8": "TYPE_UINT8", "float32": "TYPE_FP32"}  # artifacts.graph_io's dtypes in a config
BLS_SOURCE = Path(__file__).with_name("triton_bls.py")
SEQUENCE_IDLE_US = 60_000_000  # a camera silent for a minute loses its window
MODEL_NAMES = ("frame_encoder", "head", CLIP_MODEL, STREAM_MODEL)
MARKER = "# written by cmdcl-export"  # first line of our config.pbtxt files: only such model directories are replaced


class TritonRepoError(CmdclError, ValueError):
    """A repository that cannot be written or does not validate; one line naming the file."""


class _Enum(str):
    """A protobuf enum value: written bare in text format, not quoted."""


def write_triton_repo(model_onnx, repo, engine_format: str = "onnx", engine=None, max_batch: int = 8,
                      max_frames: int = 64, instance_kind: str = "auto", instance_count: int = 1,
                      queue_delay_us: int = 2000, stride_frames: int | None = None, max_sequences: int = 64,
                      windows=None) -> list[Path]:
    """Write the four models for `model_onnx` (exported with its split graphs) into `repo`.

    `engine_format="plan"` takes the TensorRT engines `<engine stem>.frame_encoder.plan`
    and `.head.plan` that cmdcl-build wrote for `engine`. `max_batch` is the most clips
    per head call (and frames per cmdcl_stream batch), `max_frames` the most frames per
    frame_encoder call; a plan's optimisation profile bounds both. The stream model's
    `windows` (seconds: one number or several scales, as `cmdcl-run --window`) and
    `stride_frames` (its window step, in grid frames) default to the model's recorded
    sampling, as stream mode's do; `max_sequences` cameras stream at once (Triton holds
    a further camera back until one ends or idles out). Returns the config files written.
    """
    if engine_format not in ENGINE_FORMATS:
        raise TritonRepoError(f"engine format must be one of {', '.join(ENGINE_FORMATS)}, not {engine_format!r}")
    if instance_kind not in INSTANCE_KINDS:
        raise TritonRepoError(f"instance kind must be one of {', '.join(INSTANCE_KINDS)}, not {instance_kind!r}")
    if min(max_batch, max_frames, instance_count, max_sequences) < 1 or queue_delay_us < 0:
        raise TritonRepoError("max batch, max frames, instance count and max sequences must be >= 1, queue delay >= 0")
    model_onnx, repo = Path(model_onnx), Path(repo)
    meta = _read(model_onnx)
    sources = _engine_files(model_onnx, meta, engine_format, engine, max_batch, max_frames)
    check_triton_repo(repo, [("the model", model_onnx), *[(f"the {name} model", path) for name, path in sources.items()]])
    f = meta["num_frames"]
    scales, grid_rate, spans, stride = _stream_grid(meta, windows, stride_frames)
    labels = "".join(f"{name}\n" for name in meta["classes"])
    if any("\n" in name for name in meta["classes"]):
        raise TritonRepoError(f"{model_onnx}: a class name contains a newline; Triton's labels file is one per line")

    kind = "KIND_GPU" if engine_format == "plan" else INSTANCE_KINDS[instance_kind]
    backend, platform = PLATFORMS[engine_format]
    batching = {"max_queue_delay_microseconds": queue_delay_us}
    frames_in, tokens_out = _io_tensors("frame_encoder", meta)
    tokens_in, heads_out = _io_tensors("head", meta)
    clips_in, _ = _io_tensors("full", meta)
    bls_parameters = _parameters(num_frames=f, frame_encoder_max_batch=max_frames, head_max_batch=max_batch)
    stream_parameters = _parameters(stride_frames=stride, sequence_idle_us=SEQUENCE_IDLE_US, grid_fps=grid_rate,
                                    window_seconds=",".join(map(repr, scales)), window_frames=",".join(map(str, spans)))
    logits_out = heads_out[0] if len(scales) == 1 else {**heads_out[0], "dims": [len(scales), *heads_out[0]["dims"]]}
    configs = {
        "frame_encoder": {
            "name": "frame_encoder", "backend": backend, "platform": platform, "max_batch_size": max_frames,
            "input": frames_in, "output": tokens_out,
            "dynamic_batching": batching, "instance_group": [{"count": instance_count, "kind": _Enum(kind)}],
        },
        "head": {
            "name": "head", "backend": backend, "platform": platform, "max_batch_size": max_batch,
            "input": tokens_in, "output": heads_out,
            "dynamic_batching": batching, "instance_group": [{"count": instance_count, "kind": _Enum(kind)}],
        },
        CLIP_MODEL: {
            "name": CLIP_MODEL, "backend": "python", "max_batch_size": max_batch,
            "input": clips_in, "output": heads_out,
            "dynamic_batching": batching, "instance_group": [{"count": 1, "kind": _Enum("KIND_CPU")}],
            "parameters": bls_parameters,
        },
        STREAM_MODEL: {
            "name": STREAM_MODEL, "backend": "python", "max_batch_size": max_batch,
            "input": [{**frames_in[0], "name": "frame"}],  # one frame encoder input per request
            "output": [logits_out, _tensor("window", "TYPE_INT32", [len(scales)]), _tensor("scale", "TYPE_FP32", [len(scales)])],
            "sequence_batching": {
                "max_sequence_idle_microseconds": SEQUENCE_IDLE_US,
                "control_input": [
                    _control("START", "CONTROL_SEQUENCE_START"),
                    _control("END", "CONTROL_SEQUENCE_END"),
                    {"name": "CORRID", "control": [{"kind": _Enum("CONTROL_SEQUENCE_CORRID"), "data_type": _Enum("TYPE_UINT64")}]},
                ],
                "oldest": {"max_candidate_sequences": max_sequences, "preferred_batch_size": [max_batch],
                           "max_queue_delay_microseconds": queue_delay_us},
            },
            "instance_group": [{"count": 1, "kind": _Enum("KIND_CPU")}],
            "parameters": bls_parameters + stream_parameters,
        },
    }
    with _staging_dir(repo) as staging:  # removed at the end, with the replaced model directories
        for name, config in configs.items():
            model_dir = staging / name
            try:
                (model_dir / "1").mkdir(parents=True)
                if name in sources:
                    shutil.copyfile(sources[name], model_dir / "1" / MODEL_FILES[engine_format])
                    if engine_format == "plan":  # the engine's metadata travels with it
                        shutil.copyfile(sidecar_path(sources[name]), sidecar_path(model_dir / "1" / MODEL_FILES["plan"]))
                else:
                    shutil.copyfile(BLS_SOURCE, model_dir / "1" / "model.py")
                if name != "frame_encoder":
                    (model_dir / LABELS_FILE).write_text(labels)
                (model_dir / "config.pbtxt").write_text(f"{MARKER}\n{to_pbtxt(config)}\n")
            except OSError as exc:
                raise TritonRepoError(f"{repo / name}: cannot write the model ({exc.strerror or exc})") from None
        for name in configs:
            _swap_in(staging / name, repo / name, staging / f"{name}.old")
    return [repo / name / "config.pbtxt" for name in configs]


def check_triton_repo(repo, files=()) -> None:
    """Raise TritonRepoError unless writing `repo` would replace only model directories of ours and
    none of `files` ((description, path) pairs: the export's inputs and outputs) lies in them."""
    repo = Path(repo)
    if repo.exists() and not repo.is_dir():
        raise TritonRepoError(f"{repo}: is not a directory")
    for name in MODEL_NAMES:
        model_dir = repo / name
        if (model_dir.exists() or model_dir.is_symlink()) and not _is_ours(model_dir, name):
            raise TritonRepoError(f"{model_dir}: exists and was not written by cmdcl-export (its config.pbtxt lacks "
                                  f"the line {MARKER!r}); refusing to replace it: move it or choose another repository")
        for what, path in files:
            if path is not None and Path(path).resolve().is_relative_to(model_dir.resolve()):
                raise TritonRepoError(f"{what} {path} lies in {model_dir}, which writing the repository replaces")


def _is_ours(model_dir: Path, name: str) -> bool:
    """A real directory whose config.pbtxt starts with our marker and names model `name`."""
    try:
        lines = (model_dir / "config.pbtxt").read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    return not model_dir.is_symlink() and lines[:1] == [MARKER] and f"name: {json.dumps(name)}" in lines


def _staging_dir(repo: Path):
    """A temporary directory beside `repo`, or inside it when `repo` is a mount point (renames cannot
    cross file systems) or its parent is read-only."""
    try:
        repo.mkdir(parents=True, exist_ok=True)
        parent = repo.resolve().parent
        beside = os.stat(parent).st_dev == os.stat(repo).st_dev and os.access(parent, os.W_OK)
        return temporary_dir(parent if beside else repo, repo.resolve().name)
    except OSError as exc:
        raise TritonRepoError(f"{repo}: cannot write the repository ({exc.strerror or exc})") from None


def _swap_in(new: Path, target: Path, old: Path) -> None:
    """Put `new` at `target`; a previous `target` (ours: checked) is moved to `old` first."""
    moved = False
    try:
        if target.exists():
            os.replace(target, old)
            moved = True
        os.replace(new, target)
    except OSError as exc:
        if moved:  # put the previous model back rather than leave none
            os.replace(old, target)
        raise TritonRepoError(f"{target}: cannot swap in the new model ({exc.strerror or exc})") from None


@contextlib.contextmanager
def _as_repo_error():
    """A model file's problem (ModelFileError) is the repository's: the same line, as a TritonRepoError."""
    try:
        yield
    except ModelFileError as exc:
        raise TritonRepoError(str(exc)) from None


def _read(path: Path) -> dict:
    with _as_repo_error():
        return read_metadata(path)


def _engine_files(model_onnx: Path, model_meta: dict, engine_format: str, engine, max_batch: int, max_frames: int) -> dict:
    """frame_encoder / head model files to copy into the repository, checked (`model_meta`: model_onnx's metadata)."""
    onnx_parts = {role: graph_path(model_onnx, role) for role in SPLIT_ROLES}
    for role, path in onnx_parts.items():
        if not path.is_file():
            raise TritonRepoError(f"{path}: no such file (the repository needs the split graphs; export with --split)")
        with _as_repo_error():  # a split graph left from another export would serve another model than the clip model
            check_same_export(model_onnx, model_meta, path, _read(path), role)
    if engine_format == "onnx":
        return onnx_parts
    if engine is None:
        raise TritonRepoError("--engine-format plan needs the TensorRT engine (--engine model.plan)")
    plans = {}
    for role in SPLIT_ROLES:
        plan = graph_path(engine, role)
        if not plan.is_file():
            raise TritonRepoError(f"{plan}: no such file (cmdcl-build writes it next to {Path(engine).name})")
        with _as_repo_error():
            profile = read_sidecar(plan)["batch_profile"]["max"]
        wanted = max_frames if role == "frame_encoder" else max_batch
        if wanted > profile:
            raise TritonRepoError(f"{plan}: its optimisation profile allows batch {profile}, the repository asks for "
                                  f"{wanted}; rebuild with --max-batch {wanted} or lower the repository's batch")
        plans[role] = plan
    return plans


def _stream_grid(meta: dict, windows, stride_frames: int | None) -> tuple[tuple, float, tuple, int]:
    """The stream model's windows (seconds, ascending), grid frames per second, the grid frames each spans, and the
    stride in grid frames,
    derived as stream mode derives them (`Recognizer`: one grid of F frames per shortest window; the model's
    recorded window and stride in seconds unless given)."""
    from ..runtime import ModelInfo

    info = ModelInfo.from_metadata(meta)
    try:
        scales = window_scales(info.window_seconds if windows is None else windows, info.num_frames)
    except ValueError as exc:
        raise TritonRepoError(f"stream {exc}") from None
    grid_rate, spans, stride = stream_grid(info.num_frames, scales, info.stride_seconds)
    stride = stride if stride_frames is None else stride_frames
    if stride < 1:
        raise TritonRepoError(f"stride frames must be >= 1, not {stride}")
    return scales, grid_rate, spans, stride


def _tensor(name: str, dtype: str, dims: list, **extra) -> dict:
    return {"name": name, "data_type": _Enum(dtype), "dims": dims, **extra}


def _io_tensors(role: str, meta: dict) -> tuple[list, list]:
    """The config tensors of a graph's inputs and outputs (`artifacts.graph_io` less the batch axis, which is the
    config's max_batch_size); logits carry the labels file."""
    return tuple([_tensor(name, TRITON_TYPES[dtype], shape[1:], **({"label_filename": LABELS_FILE} if name == "logits" else {}))
                  for name, (dtype, shape) in tensors.items()]
                 for tensors in graph_io(role, meta["num_frames"], meta["image_size"], meta["tokens_per_frame"], meta["width"],
                                         len(meta["classes"])))


def _control(name: str, kind: str) -> dict:
    return {"name": name, "control": [{"kind": _Enum(kind), "int32_false_true": [0, 1]}]}


def _parameters(**values) -> list:
    return [{"key": key, "value": {"string_value": str(value)}} for key, value in values.items()]


def to_pbtxt(message: dict, indent: int = 0) -> str:
    """Protobuf text format of a nested dict: dicts are messages, lists of dicts
    repeated messages, lists of scalars repeated scalars."""
    pad, lines = "  " * indent, []
    for key, value in message.items():
        if isinstance(value, list) and value and not isinstance(value[0], dict):
            lines.append(f"{pad}{key}: [{', '.join(map(_scalar, value))}]")
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                body = to_pbtxt(item, indent + 1)
                lines += [f"{pad}{key} {{", *([body] if body else []), f"{pad}}}"]
            else:
                lines.append(f"{pad}{key}: {_scalar(item)}")
    return "\n".join(lines)


def _scalar(value) -> str:
    if isinstance(value, _Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a quoted string; JSON escapes are valid text-format escapes


# ---- validation ---------------------------------------------------------------------------
def validate_triton_repo(repo) -> dict:
    """Parse every `config.pbtxt` with Triton's ModelConfig schema (tritonclient) and
    check names, tensors, labels and model files; returns a summary per model.
    Raises TritonRepoError naming the file and the problem."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise TritonRepoError(f"validating a Triton repository needs tritonclient[grpc] ({exc}); "
                              "install the serve extra (make serve-venv)") from None
    repo = Path(repo)
    configs = sorted(repo.glob("*/config.pbtxt"))
    if not configs:
        raise TritonRepoError(f"{repo}: no */config.pbtxt: not a Triton model repository")
    summary = {}
    for path in configs:
        config = model_config_pb2.ModelConfig()
        try:
            text_format.Parse(path.read_text(), config)
        except text_format.ParseError as exc:
            raise TritonRepoError(f"{path}: not a valid Triton model config ({exc})") from None
        summary[config.name] = _check_config(path, config, model_config_pb2)
    missing = set(MODEL_NAMES) - set(summary)
    if missing:
        raise TritonRepoError(f"{repo}: missing models: {', '.join(sorted(missing))}")
    return summary


def _check_config(path: Path, config, pb) -> dict:
    model_dir = path.parent

    def bad(problem):
        raise TritonRepoError(f"{path}: {problem}")

    if config.name != model_dir.name:
        bad(f"name {config.name!r} is not the directory name {model_dir.name!r}")
    dtype = pb.DataType.Name
    inputs = {t.name: [dtype(t.data_type), list(t.dims)] for t in config.input}
    outputs = {t.name: [dtype(t.data_type), list(t.dims)] for t in config.output}
    for tensor in config.output:
        if tensor.label_filename and not (model_dir / tensor.label_filename).is_file():
            bad(f"output {tensor.name!r} names labels file {tensor.label_filename!r}, which does not exist")
    fmt = {"onnxruntime_onnx": "onnx", "tensorrt_plan": "plan"}.get(config.platform)
    if config.backend == "python":
        if not (model_dir / "1" / "model.py").is_file():
            bad("the Python-backend model has no 1/model.py")
    elif fmt is None:
        bad(f"unexpected platform {config.platform!r} / backend {config.backend!r}")
    else:
        model_file = model_dir / "1" / MODEL_FILES[fmt]
        if not model_file.is_file():
            bad(f"no model file {model_file.relative_to(model_dir)}")
        _check_tensors(path, model_file, fmt, config.name, inputs, outputs)
    batching = ("sequence" if config.HasField("sequence_batching") else
                "dynamic" if config.HasField("dynamic_batching") else None)
    return {
        "backend": config.backend, "platform": config.platform, "max_batch_size": config.max_batch_size,
        "inputs": inputs, "outputs": outputs, "batching": batching,
        "instance_groups": [[pb.ModelInstanceGroup.Kind.Name(g.kind), g.count] for g in config.instance_group],
        "labels": {t.name: t.label_filename for t in config.output if t.label_filename},
        "control_inputs": [c.name for c in config.sequence_batching.control_input],
        "parameters": {k: v.string_value for k, v in config.parameters.items()},
    }


def _check_tensors(path: Path, model_file: Path, fmt: str, role: str, inputs: dict, outputs: dict) -> None:
    """The config's tensors are the model file's, batch axis aside."""
    if fmt == "onnx":
        meta = _read(model_file)
    else:
        with _as_repo_error():
            meta = read_sidecar(model_file)["metadata"]
    if meta["graph_role"] != role:
        raise TritonRepoError(f"{model_file}: is a {meta['graph_role']} graph, the config says {role}")
    for kind, found, tensors in zip(("input", "output"), (inputs, outputs), _io_tensors(role, meta)):
        want = {t["name"]: [t["data_type"], t["dims"]] for t in tensors}
        if found != want:
            raise TritonRepoError(f"{path}: {kind}s {found} do not match {model_file.name}'s {want}")
    labels = (path.parent / LABELS_FILE)
    if role == "head" and labels.read_text().splitlines() != list(meta["classes"]):
        raise TritonRepoError(f"{labels}: labels differ from the model's classes")


def main(argv=None) -> int:
    """`python -m cmdcl.serve.triton_repo REPO`: validate and print the summary as JSON."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m cmdcl.serve.triton_repo REPO", file=sys.stderr)
        return 2
    try:
        print(json.dumps(validate_triton_repo(argv[0]), indent=1, sort_keys=True))
    except TritonRepoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
