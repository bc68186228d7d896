"""Inference backends behind one small interface (in the spirit of polygraphy's runners).

A Backend is loaded from a model file and exposes the model's metadata
(`info`), the I/O of its three graphs (`io(role)`) and `infer(role, feeds)` on
numpy arrays; the graph roles ("full", "frame_encoder", "head"), their I/O and
the files of the split graphs and engines are the artifact contract in
`cmdcl.artifacts`. `infer` checks the feeds against `io(role)` (names, dtypes,
shapes) before the implementation's `_infer` runs. A backend holds its sessions,
engines or model until `close()`, or the end of a `with` block:

    with load_backend("model.onnx") as backend:
        logits = backend.classify_clips(frames)

Implementations: PyTorch (`.pt` checkpoint), ONNX Runtime (`.onnx`, with the
CPU, CUDA or TensorRT execution provider) and TensorRT (`.plan` with its JSON
sidecar). torch-free imports: onnxruntime and tensorrt are imported only when
such a backend is loaded. Every model file's metadata is validated (and
bounded) before use, and a split graph must come from the same export as the
model next to it (`check_same_export`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..artifacts import GRAPH_ROLES, GraphRole, graph_io, graph_path, read_sidecar, stride_frames, window_seconds
from ..errors import CmdclError
from ..output_files import cache_dir

if TYPE_CHECKING:
    from ..model.config import CMDCLConfig

BACKENDS = ("auto", "ort", "trt", "torch")


class BackendError(CmdclError):
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
    config: CMDCLConfig | None = None  # the model's config (the checkpoint's, or the one its metadata records)

    @classmethod
    def from_metadata(cls, meta: dict) -> ModelInfo:
        """From the metadata of an exported model (ONNX metadata_props or a TensorRT sidecar), already validated."""
        from ..model.config import CMDCLConfig

        return cls(list(meta["classes"]), int(meta["num_frames"]), int(meta["image_size"]), int(meta["tokens_per_frame"]),
                   int(meta["width"]), bool(meta["multi_label"]), dict(meta.get("sampling") or {}),
                   CMDCLConfig.from_dict(meta["config"]))

    @property
    def window_seconds(self) -> float:
        return window_seconds(self.sampling, self.num_frames)

    @property
    def stride_seconds(self) -> float:
        return stride_frames(self.sampling, self.num_frames) * self.window_seconds / self.num_frames

    def io(self, role: GraphRole) -> tuple[dict, dict]:
        """(inputs, outputs) of a graph: name -> (dtype, shape), None for the dynamic batch axis (`artifacts.graph_io`)."""
        return graph_io(role, self.num_frames, self.image_size, self.tokens_per_frame, self.width, len(self.classes))


class Backend:
    """A loaded model. Subclasses implement `load`, `_infer` and, when they hold sessions or engines, `_close`."""

    name = ""
    closed = False

    def __init__(self, path, device: str = "cpu", threads: int | None = None):
        # threads: ONNX Runtime's intra-op threads (None: its default); the PyTorch backend follows torch.set_num_threads
        self.path, self.device, self.threads = Path(path), device, threads
        self.info: ModelInfo | None = None
        self.load()

    def load(self) -> None:
        raise NotImplementedError

    def infer(self, role: GraphRole, feeds: dict) -> dict:
        """Run one graph on numpy inputs, checked against `io(role)`; returns its outputs by name as numpy arrays."""
        if self.closed:
            raise BackendError(f"{self.path}: the {self.name} backend is closed")
        self.check_feeds(role, feeds)
        return self._infer(role, feeds)

    def _infer(self, role: GraphRole, feeds: dict) -> dict:
        raise NotImplementedError

    def check_feeds(self, role: GraphRole, feeds: dict) -> None:
        """BackendError, one line naming the model file, unless `feeds` are the arrays `io(role)` names, of its dtypes
        and shapes (any length along the batch axis)."""
        if role not in GRAPH_ROLES:
            raise BackendError(f"{self.path}: no {role!r} graph; the graphs are {', '.join(GRAPH_ROLES)}")
        inputs, _ = self.io(role)
        if set(feeds) != set(inputs):
            raise BackendError(f"{self.path}: the {role} graph takes {sorted(inputs)}, not {sorted(feeds)}")
        for name, (dtype, shape) in inputs.items():
            array = feeds[name]
            if not (isinstance(array, np.ndarray) and array.dtype == dtype and array.ndim == len(shape)
                    and all(want is None or want == have for want, have in zip(shape, array.shape))):
                got = f"{array.dtype} {list(array.shape)}" if isinstance(array, np.ndarray) else type(array).__name__
                wanted = ", ".join("B" if n is None else str(n) for n in shape)
                raise BackendError(f"{self.path}: the {role} graph's input {name!r} must be {dtype} [{wanted}], got {got}")

    def close(self) -> None:
        """Free the sessions, engines or model this backend holds; `infer` refuses afterwards. Idempotent."""
        if not self.closed:
            self._close()
            self.closed = True

    def _close(self) -> None:
        """What `close` frees; nothing by default."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def graph_path(self, role: GraphRole) -> Path:
        return graph_path(self.path, role)

    def checked_graph_path(self, role: GraphRole, read_meta, missing: str) -> Path:
        """`role`'s file, checked before it loads: it exists (else BackendError saying `missing`) and a split graph
        comes from the same export as the model (`read_meta(path)` reads its metadata; self.meta is the model's)."""
        from ..export.metadata import ModelFileError, check_same_export

        path = self.graph_path(role)
        if not path.exists():
            raise BackendError(f"{path}: no such file ({missing})")
        if role != "full":
            try:
                check_same_export(self.path, self.meta, path, read_meta(path), role)
            except ModelFileError as exc:
                raise BackendError(str(exc)) from None
        return path

    def io(self, role: GraphRole) -> tuple[dict, dict]:
        """(inputs, outputs) of a graph: name -> (dtype, shape), None for the dynamic batch axis."""
        return self.info.io(role)

    # The three calls the runtime makes.
    def classify_clips(self, frames: np.ndarray) -> np.ndarray:
        return self.infer("full", {"frames": frames})["logits"]

    def encode_frames(self, frames: np.ndarray) -> np.ndarray:
        return self.infer("frame_encoder", {"frames": frames})["tokens"]

    def classify_tokens(self, tokens: np.ndarray) -> np.ndarray:
        return self.infer("head", {"tokens": tokens})["logits"]

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Softmax over classes, or per-class sigmoid for multi-label models. A row with a logit that is not finite (a
        broken model: NaN, or an overflow to infinity) is NaN throughout, never a confident score (a sigmoid of +inf is
        1.0): the runtime turns it into an error record (README "Runtime")."""
        logits = np.asarray(logits, dtype=np.float64)
        broken = ~np.isfinite(logits).all(axis=-1, keepdims=True)
        logits = np.where(broken, 0.0, logits)
        if self.info.multi_label:
            probabilities = 1.0 / (1.0 + np.exp(-logits))
        else:
            e = np.exp(logits - logits.max(axis=-1, keepdims=True))
            probabilities = e / e.sum(axis=-1, keepdims=True)
        return np.where(broken, np.nan, probabilities)


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
                              cfg.width, cfg.multi_label, sampling_defaults(self.model), cfg)

    def _infer(self, role: GraphRole, feeds: dict) -> dict:
        import torch

        with torch.inference_mode():
            if role == "frame_encoder":
                return {"tokens": self.model.frame_tokens(self._tensor(feeds["frames"])).float().cpu().numpy()}
            if role == "head":
                logits, embedding = self.model.head(self._tensor(feeds["tokens"]))
            else:
                logits, embedding = self.model(self._tensor(feeds["frames"]))
        # .float(): under autocast (the benchmark's fp16/bf16 runs) outputs are 16-bit; numpy has no bfloat16
        return {"logits": logits.float().cpu().numpy(), "embedding": embedding.float().cpu().numpy()}

    def _tensor(self, array: np.ndarray):
        import torch

        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def _close(self) -> None:
        import gc

        import torch

        self.model = None
        gc.collect()  # a model can sit in reference cycles (torch.compile's wrappers, torch's first-use imports)
        if self.device == "cuda":
            torch.cuda.empty_cache()  # what the next model loads starts from the memory this one held


class OrtBackend(Backend):
    """An exported `.onnx` model on ONNX Runtime; the split graphs load on first use."""

    name = "ort"

    def __init__(self, path, device: str = "cpu", tensorrt_ep: bool = False, threads: int | None = None):
        self.tensorrt_ep = tensorrt_ep
        super().__init__(path, device, threads)

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

    def session(self, role: GraphRole):
        if role not in self.sessions:
            import onnxruntime as ort

            from ..export.metadata import read_metadata

            path = self.checked_graph_path(role, read_metadata, "stream mode needs the split graphs; export with split=True")
            options = ort.SessionOptions()
            options.log_severity_level = 3
            if self.threads:
                options.intra_op_num_threads = self.threads
            self.sessions[role] = ort.InferenceSession(str(path), options, providers=self.providers)
        return self.sessions[role]

    def _infer(self, role: GraphRole, feeds: dict) -> dict:
        session = self.session(role)
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feeds)))

    def _close(self) -> None:
        self.sessions.clear()


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
        """The validated metadata in an engine's JSON sidecar (cmdcl-build copies the ONNX file's)."""
        from ..export.metadata import ModelFileError

        try:
            return read_sidecar(engine_path)["metadata"]
        except ModelFileError as exc:
            raise BackendError(str(exc)) from None

    def engine(self, role: GraphRole):
        if role not in self.engines:
            path = self.checked_graph_path(role, self.sidecar_metadata, "stream mode needs the split engines; cmdcl-build makes them")
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise BackendError(f"{path}: TensorRT could not deserialise the engine (built by another TensorRT version or GPU?)")
            self.engines[role] = (engine, engine.create_execution_context())
        return self.engines[role]

    def _close(self) -> None:
        self.engines.clear()  # execution contexts and engines: their device memory goes with them

    def _infer(self, role: GraphRole, feeds: dict) -> dict:
        """Runs in chunks along dimension 0 no larger than the engine's profile allows."""
        engine, context = self.engine(role)
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


def load_backend(engine=None, backend: str = "auto", device: str = "cpu", threads: int | None = None) -> Backend:
    """The backend for `engine` (by suffix, or as `backend` says); the bundled
    demo model on ONNX Runtime when `engine` is None. `threads`: ONNX Runtime's
    intra-op threads (None: its default); the other backends take none."""
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
        return OrtBackend(path, device, tensorrt_ep=kind == "trt", threads=threads)
    if kind == "trt":
        return TensorRTBackend(path, device)
    raise BackendError(f"{path}: the {kind} backend runs .onnx files")


DEMO_MODEL = "model.onnx"  # in the demo cache folder, with its split graphs
DEMO_RECORD = "cmdcl-cache.json"  # what the cache folder must hold: its source and each file's hash


def demo_engine() -> Path:
    """The bundled demo checkpoint exported to ONNX, cached in cmdcl's cache folder by the checkpoint's hash.

    The cache checks itself on every use: a record beside the graphs holds the checkpoint's and each graph's SHA-256
    and the cmdcl version that exported them; a missing, damaged or stale cache is exported again, aside, and renamed
    into place whole. A lock makes concurrent first runs wait for one export instead of racing."""
    try:
        from .. import assets
    except ImportError:
        raise BackendError("no --engine given and this install has no bundled demo model (cmdcl.assets)") from None
    try:
        checkpoint = Path(assets.demo_checkpoint())
    except FileNotFoundError as exc:
        raise BackendError(f"no --engine given and the demo model is missing: {exc}") from None
    digest = _sha256(checkpoint)
    target = cache_dir() / f"demo-{digest[:16]}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.with_name(target.name + ".lock")):
        intact = _demo_record(target, digest)
        if intact is None or intact != _read_record(target):
            _export_demo(checkpoint, target, digest)
    return target / DEMO_MODEL


def _export_demo(checkpoint: Path, target: Path, digest: str) -> None:
    """Export the demo checkpoint into a new folder, record its hashes, and rename it onto `target` (a damaged
    cache is moved aside first and removed with the staging folder)."""
    import json

    from ..export import export_onnx
    from ..model import load_checkpoint
    from ..output_files import temporary_dir

    with temporary_dir(target.parent, target.name) as staging:
        fresh = staging / "export"
        fresh.mkdir()
        export_onnx(load_checkpoint(checkpoint), fresh / DEMO_MODEL)
        (fresh / DEMO_RECORD).write_text(json.dumps(_demo_record(fresh, digest), indent=2) + "\n")
        if target.exists() or target.is_symlink():
            os.rename(target, staging / "damaged")
        os.rename(fresh, target)


def _demo_record(target: Path, digest: str) -> dict | None:
    """The record an intact, current demo cache in `target` holds, from the graphs the runtime reads there now
    (None: one is missing)."""
    from .. import __version__

    try:
        files = {path.name: _sha256(path) for path in (graph_path(target / DEMO_MODEL, role) for role in GRAPH_ROLES)}
    except OSError:
        return None
    return {"checkpoint": digest, "cmdcl": __version__, "files": files}


def _read_record(target: Path) -> dict | None:
    import json

    try:
        return json.loads((target / DEMO_RECORD).read_text())
    except (OSError, ValueError, RecursionError):
        return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock (flock) on `path`, created if needed, held for the block."""
    import fcntl

    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
