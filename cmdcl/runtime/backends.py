"""Inference backends behind one small interface (in the spirit of polygraphy's runners).

A Backend is loaded from a model file and exposes the model's metadata
(`info`), the I/O of its three graphs (`io(part)`), and `infer(part, feeds)`
on numpy arrays, where part is one of

    "model"          frames uint8 [B, F, H, W, 3] -> logits [B, C], embedding [B, D]
    "frame_encoder"  frames uint8 [N, H, W, 3]    -> tokens [N, S, D]
    "head"           tokens [B, F, S, D]          -> logits [B, C], embedding [B, D]

Implementations: PyTorch (`.pt` checkpoint), ONNX Runtime (`.onnx`, with the
CPU, CUDA or TensorRT execution provider; the split graphs sit next to it as
`<stem>.frame_encoder.onnx` / `<stem>.head.onnx`) and TensorRT (`.plan` with
its `.plan.json` sidecar and split `<stem>.frame_encoder.plan` /
`<stem>.head.plan`). torch-free imports: onnxruntime and tensorrt are
imported only when such a backend is loaded. Every model file's metadata is
validated (and bounded) before use, and a split graph must come from the same
export as the model next to it (`check_same_export`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BACKENDS = ("auto", "ort", "trt", "torch")
# Stream mode defaults when a model records none: one grid frame per second, windows overlapping by half.
DEFAULT_STREAM_FPS = 1.0


class BackendError(Exception):
    """A model file or backend that cannot be used; the message says why in one line."""


@dataclass
class ModelInfo:
    classes: list
    num_frames: int  # F
    image_size: int
    tokens_per_frame: int  # S
    width: int  # D
    multi_label: bool
    sampling: dict = field(default_factory=dict)  # num_frames, stream_fps, window_seconds, stride_frames

    @classmethod
    def from_metadata(cls, meta: dict) -> "ModelInfo":
        """From the metadata of an exported model (ONNX metadata_props or a TensorRT sidecar)."""
        return cls(list(meta["classes"]), int(meta["num_frames"]), int(meta["image_size"]), int(meta["tokens_per_frame"]),
                   int(meta["width"]), bool(meta["multi_label"]), dict(meta.get("sampling") or {}))

    @property
    def window_seconds(self) -> float:
        return float(self.sampling.get("window_seconds", self.num_frames / self.sampling.get("stream_fps", DEFAULT_STREAM_FPS)))

    @property
    def stride_seconds(self) -> float:
        stride_frames = self.sampling.get("stride_frames", max(1, self.num_frames // 2))
        return stride_frames * self.window_seconds / self.num_frames


def part_path(model, part: str) -> Path:
    """The file of one graph: the model itself, or `<stem>.frame_encoder<suffix>` /
    `<stem>.head<suffix>` next to it (as cmdcl-export and cmdcl-build name them)."""
    model = Path(model)
    return model if part == "model" else model.with_name(f"{model.stem}.{part}{model.suffix}")


class Backend:
    """A loaded model. Subclasses implement `load` and `infer`."""

    name = ""

    def __init__(self, path, device: str = "cpu"):
        self.path, self.device = Path(path), device
        self.info: ModelInfo | None = None
        self.load()

    def load(self) -> None:
        raise NotImplementedError

    def infer(self, part: str, feeds: dict) -> dict:
        """Run one graph on numpy inputs; returns its outputs by name as numpy arrays."""
        raise NotImplementedError

    def part_path(self, part: str) -> Path:
        return part_path(self.path, part)

    def io(self, part: str) -> tuple[dict, dict]:
        """(inputs, outputs) of a graph: name -> (dtype, shape), None for a dynamic axis."""
        i = self.info
        f, size, s, d, c = i.num_frames, i.image_size, i.tokens_per_frame, i.width, len(i.classes)
        heads = {"logits": ("float32", [None, c]), "embedding": ("float32", [None, d])}
        return {
            "model": ({"frames": ("uint8", [None, f, size, size, 3])}, heads),
            "frame_encoder": ({"frames": ("uint8", [None, size, size, 3])}, {"tokens": ("float32", [None, s, d])}),
            "head": ({"tokens": ("float32", [None, f, s, d])}, heads),
        }[part]

    # The three calls the runtime makes.
    def classify_clips(self, frames: np.ndarray) -> np.ndarray:
        return self.infer("model", {"frames": frames})["logits"]

    def encode_frames(self, frames: np.ndarray) -> np.ndarray:
        return self.infer("frame_encoder", {"frames": frames})["tokens"]

    def classify_tokens(self, tokens: np.ndarray) -> np.ndarray:
        return self.infer("head", {"tokens": tokens})["logits"]

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Softmax over classes, or per-class sigmoid for multi-label models."""
        logits = np.asarray(logits, dtype=np.float64)
        if self.info.multi_label:
            return 1.0 / (1.0 + np.exp(-logits))
        e = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)


class TorchBackend(Backend):
    """A `.pt` checkpoint run by the PyTorch reference model."""

    name = "torch"

    def load(self) -> None:
        import torch

        from ..export.metadata import sampling_defaults
        from ..model import CheckpointError, load_checkpoint

        if self.device == "cuda" and not torch.cuda.is_available():
            raise BackendError("--device cuda: PyTorch sees no CUDA GPU on this machine")
        try:
            self.model = load_checkpoint(self.path, map_location=self.device)
        except CheckpointError as exc:
            raise BackendError(str(exc)) from None
        cfg = self.model.cfg
        self.info = ModelInfo(list(self.model.class_names), cfg.num_frames, cfg.vision.image_size, cfg.tokens_per_frame,
                              cfg.width, cfg.multi_label, sampling_defaults(self.model))

    def infer(self, part: str, feeds: dict) -> dict:
        import torch

        with torch.inference_mode():
            if part == "frame_encoder":
                return {"tokens": self.model.frame_tokens(self._tensor(feeds["frames"])).float().cpu().numpy()}
            if part == "head":
                logits, embedding = self.model.head(self._tensor(feeds["tokens"]))
            else:
                logits, embedding = self.model(self._tensor(feeds["frames"]))
        # .float(): under autocast (the benchmark's fp16/bf16 runs) outputs are 16-bit; numpy has no bfloat16
        return {"logits": logits.float().cpu().numpy(), "embedding": embedding.float().cpu().numpy()}

    def _tensor(self, array: np.ndarray):
        import torch

        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)


class OrtBackend(Backend):
    """An exported `.onnx` model on ONNX Runtime; the split graphs load on first use."""

    name = "ort"

    def __init__(self, path, device: str = "cpu", tensorrt_ep: bool = False, threads: int | None = None):
        self.tensorrt_ep, self.threads = tensorrt_ep, threads  # threads: intra-op threads (None: ONNX Runtime's default)
        super().__init__(path, device)

    def load(self) -> None:
        import onnxruntime as ort

        from ..export.metadata import ModelFileError, read_metadata

        try:
            self.meta = read_metadata(self.path)
        except ModelFileError as exc:
            raise BackendError(str(exc)) from None
        self.info = ModelInfo.from_metadata(self.meta)
        available = ort.get_available_providers()
        wanted = ["CPUExecutionProvider"]
        if self.device == "cuda":
            wanted.insert(0, "CUDAExecutionProvider")
        if self.tensorrt_ep:
            wanted.insert(0, "TensorrtExecutionProvider")
        missing = [p for p in wanted if p not in available]
        if missing:
            raise BackendError(f"onnxruntime here lacks {', '.join(missing)} (available: {', '.join(available)}); "
                               "install onnxruntime-gpu for CUDA / TensorRT")
        self.providers = wanted
        self.sessions: dict = {}

    def session(self, part: str):
        if part not in self.sessions:
            import onnxruntime as ort

            from ..export.metadata import ModelFileError, check_same_export, read_metadata

            path = self.part_path(part)
            if not path.exists():
                raise BackendError(f"{path}: no such file (stream mode needs the split graphs; export with split=True)")
            if part != "model":
                try:
                    check_same_export(self.path, self.meta, path, read_metadata(path), part)
                except ModelFileError as exc:
                    raise BackendError(str(exc)) from None
            options = ort.SessionOptions()
            options.log_severity_level = 3
            if self.threads:
                options.intra_op_num_threads = self.threads
            self.sessions[part] = ort.InferenceSession(str(path), options, providers=self.providers)
        return self.sessions[part]

    def infer(self, part: str, feeds: dict) -> dict:
        session = self.session(part)
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feeds)))


class TensorRTBackend(Backend):
    """A TensorRT engine (`.plan` + `.plan.json` sidecar from cmdcl-build), run
    on torch CUDA buffers. The CausalIntervention plugin is registered before
    the engines are deserialised. Needs the full TensorRT (>= 10.9) and an NVIDIA GPU."""

    name = "trt"

    def load(self) -> None:
        from ..export.tensorrt_build import EngineBuildError, import_tensorrt

        try:
            trt = import_tensorrt()
        except EngineBuildError as exc:
            raise BackendError(f"{self.path}: the TensorRT backend cannot run: {exc}") from None
        import torch

        if not torch.cuda.is_available():
            raise BackendError(f"{self.path}: the TensorRT backend needs an NVIDIA GPU; none is visible to PyTorch")
        self.meta = self.sidecar_metadata(self.path)
        self.info = ModelInfo.from_metadata(self.meta)
        from ..kernels.tensorrt_plugin import register_plugin

        try:
            register_plugin()
        except ImportError as exc:
            raise BackendError(f"{self.path}: TensorRT {trt.__version__} cannot register the CausalIntervention plugin ({exc})") from None
        self.trt, self.torch = trt, torch
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines: dict = {}

    @staticmethod
    def sidecar_metadata(engine_path: Path) -> dict:
        """The validated metadata in an engine's `.plan.json` sidecar (cmdcl-build copies the ONNX file's)."""
        from ..export.metadata import ModelFileError, check_metadata
        from ..export.tensorrt_build import sidecar_path

        sidecar = sidecar_path(engine_path)
        try:
            return check_metadata(sidecar, json.loads(sidecar.read_text())["metadata"])
        except ModelFileError as exc:
            raise BackendError(str(exc)) from None
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise BackendError(f"{sidecar}: cannot read the engine's metadata sidecar ({str(exc) or type(exc).__name__:.100})") from None

    def engine(self, part: str):
        if part not in self.engines:
            from ..export.metadata import ModelFileError, check_same_export

            path = self.part_path(part)
            if not path.exists():
                raise BackendError(f"{path}: no such file (stream mode needs the split engines; cmdcl-build makes them)")
            if part != "model":
                try:
                    check_same_export(self.path, self.meta, path, self.sidecar_metadata(path), part)
                except ModelFileError as exc:
                    raise BackendError(str(exc)) from None
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise BackendError(f"{path}: TensorRT could not deserialise the engine (built by another TensorRT version or GPU?)")
            self.engines[part] = (engine, engine.create_execution_context())
        return self.engines[part]

    def infer(self, part: str, feeds: dict) -> dict:
        """Runs in chunks along dimension 0 no larger than the engine's profile allows."""
        engine, context = self.engine(part)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT]
        limit = min(engine.get_tensor_profile_shape(n, 0)[2][0] for n in inputs)
        total = len(feeds[inputs[0]])
        chunks = [self._run(engine, context, names, inputs, {n: feeds[n][i : i + limit] for n in inputs})
                  for i in range(0, total, limit)]
        return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}

    def _run(self, engine, context, names, inputs, feeds) -> dict:
        torch, trt = self.torch, self.trt

        def torch_dtype(name):
            return torch.from_numpy(np.zeros(0, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype

        buffers = {}
        for name in inputs:
            buffers[name] = torch.from_numpy(np.ascontiguousarray(feeds[name])).to("cuda", torch_dtype(name))
            context.set_input_shape(name, tuple(buffers[name].shape))
        outputs = [n for n in names if n not in inputs]
        for name in outputs:
            buffers[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=torch_dtype(name), device="cuda")
        for name, tensor in buffers.items():
            context.set_tensor_address(name, tensor.data_ptr())
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise BackendError(f"{self.path}: TensorRT execution failed")
        stream.synchronize()
        return {name: buffers[name].float().cpu().numpy() for name in outputs}


def load_backend(engine=None, backend: str = "auto", device: str = "cpu") -> Backend:
    """The backend for `engine` (by suffix, or as `backend` says); the bundled
    demo model on ONNX Runtime when `engine` is None."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if device not in ("cpu", "cuda"):
        raise BackendError(f"unknown device {device!r}; choose cpu or cuda")
    path = Path(engine) if engine is not None else demo_engine()
    if not path.exists():
        raise BackendError(f"{path}: no such file")
    suffix = path.suffix.lower()
    kind = backend if backend != "auto" else {".onnx": "ort", ".plan": "trt", ".engine": "trt", ".pt": "torch"}.get(suffix)
    if kind is None:
        raise BackendError(f"{path}: unknown model file type {suffix!r}; expected .onnx, .plan or .pt")
    if kind == "torch":
        if suffix != ".pt":
            raise BackendError(f"{path}: the torch backend runs .pt checkpoints")
        return TorchBackend(path, device)
    if suffix == ".onnx":  # --backend trt with an ONNX file: ONNX Runtime's TensorRT execution provider
        return OrtBackend(path, device, tensorrt_ep=kind == "trt")
    if kind == "trt":
        return TensorRTBackend(path, device)
    raise BackendError(f"{path}: the {kind} backend runs .onnx files")


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cmdcl"


def demo_engine() -> Path:
    """The bundled demo checkpoint exported to ONNX, cached by the checkpoint's hash."""
    try:
        from .. import assets
    except ImportError:
        raise BackendError("no --engine given and this install has no bundled demo model (cmdcl.assets)") from None
    try:
        checkpoint = Path(assets.demo_checkpoint())
    except FileNotFoundError as exc:
        raise BackendError(f"no --engine given and the demo model is missing: {exc}") from None
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:16]
    target = cache_dir() / f"demo-{digest}"
    if not (target / "model.head.onnx").exists():
        import shutil
        import tempfile

        from ..export import export_onnx
        from ..model import load_checkpoint

        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".export-"))
        try:
            export_onnx(load_checkpoint(checkpoint), tmp / "model.onnx")
            os.replace(tmp, target)  # atomic: a concurrent first run sees all files or none
        except OSError:
            if not (target / "model.head.onnx").exists():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target / "model.onnx"
