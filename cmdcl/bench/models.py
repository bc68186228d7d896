"""The models the bench measures, loaded as backends: the --engine files as given, or random-weight models of a preset.

Latency does not depend on the weights, so without --engine the bench makes its own model: a checkpoint for the
PyTorch backends, exported to ONNX for ONNX Runtime and built into TensorRT engines for TensorRT, each made once
per run (on first use) in the run's work folder.
"""

from __future__ import annotations

from pathlib import Path

from ..runtime.backends import Backend, BackendError, load_backend
from .variants import TORCH_VARIANTS, TorchVariantBackend


class BenchModels:
    """Loads the backend for a name (`load_generated`) or a model file (`load_file`) with the run's device and threads."""

    def __init__(self, settings, work: Path, device: str, threads: int, log):
        self.s, self.work, self.device, self.threads, self.log = settings, work, device, threads, log

    def load_file(self, path, backend: str) -> Backend:
        if backend in TORCH_VARIANTS and backend != "torch":  # a .pt checkpoint run as a PyTorch variant
            return TorchVariantBackend(path, self.device, backend, TORCH_VARIANTS[backend])
        return load_backend(path, backend, self.device, threads=self.threads)

    def load_generated(self, name: str) -> Backend:
        checkpoint = self.checkpoint()
        if name in TORCH_VARIANTS:
            return TorchVariantBackend(checkpoint, self.device, name, TORCH_VARIANTS[name])
        onnx_path = self.onnx()
        if name == "ort":
            return load_backend(onnx_path, "ort", self.device, threads=self.threads)
        return load_backend(self.tensorrt_engine(onnx_path), "trt", self.device)

    def config(self):
        """The CMDCLConfig of the generated model: the preset, with --frames if given."""
        from ..model import preset

        return preset(self.s.preset, **({"num_frames": self.s.frames} if self.s.frames else {}))

    def checkpoint(self) -> Path:
        """A random-weight model of the preset, saved once as a checkpoint."""
        path = self.work / "model.pt"
        if not path.exists():
            import torch

            from ..model import CMDCL, save_checkpoint

            torch.manual_seed(0)
            save_checkpoint(CMDCL(self.config(), [f"class {i}" for i in range(self.s.classes)]).eval(), path)
        return path

    def onnx(self) -> Path:
        path = self.work / "model.onnx"
        if not path.exists():
            from ..export import export_onnx
            from ..model import load_checkpoint

            self.log(f"cmdcl-bench: exporting the {self.s.preset} model to ONNX (full graph + frame_encoder + head)")
            export_onnx(load_checkpoint(self.checkpoint()), path)
        return path

    def tensorrt_engine(self, onnx_path: Path) -> Path:
        """fp16 engines of the exported graphs, with profiles up to the largest batch asked for."""
        from ..export.tensorrt_build import EngineBuildError, build_engine, split_pairs

        plan = self.work / "model.plan"
        if not plan.exists():
            self.log("cmdcl-bench: building TensorRT engines (fp16) from the exported ONNX")
            largest, frames = max(self.s.batches), self.config().num_frames
            try:  # the frame encoder's batch axis counts frames: its profile reaches the largest batch's B*F
                for part_onnx, part_plan in split_pairs(onnx_path, plan):
                    per_clip = frames if part_onnx.name.endswith(".frame_encoder.onnx") else 1
                    build_engine(part_onnx, part_plan, precision="fp16", max_batch=largest * per_clip)
            except EngineBuildError as exc:
                raise BackendError(str(exc)) from None
        return plan


def engine_label(path, backend: str) -> str:
    """The record label of an --engine file: the backend asked for, or the one its suffix picks."""
    suffix = Path(path).suffix.lower()
    return {".onnx": "ort", ".pt": "torch"}.get(suffix, "trt") if backend == "auto" else backend
