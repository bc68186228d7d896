"""The backends the bench measures beyond the runtime's own: PyTorch variants and a timing wrapper.

A variant is the PyTorch backend run another way (autocast precision, torch.compile, the Triton
intervention); `TimedBackend` wraps any backend to add up the time spent inside its graphs, which
the stream and worker stages report apart from the wall time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..artifacts import GraphRole
from ..runtime.backends import Backend, TorchBackend


@dataclass(frozen=True)
class TorchVariant:
    """How a PyTorch backend runs: autocast precision, torch.compile mode, intervention implementation."""

    precision: str = "fp32"
    compile_mode: str | None = None  # "default", or "reduce-overhead" (CUDA graphs)
    impl: str = "torch"

    @property
    def needs_cuda(self) -> bool:
        return self.precision != "fp32" or self.impl == "triton" or self.compile_mode == "reduce-overhead"


TORCH_VARIANTS = {
    "torch": TorchVariant(),
    "torch-fp16": TorchVariant("fp16"),
    "torch-bf16": TorchVariant("bf16"),
    "torch-compile": TorchVariant(compile_mode="default"),
    "torch-fp16-triton": TorchVariant("fp16", impl="triton"),
    "torch-fp16-cudagraphs": TorchVariant("fp16", compile_mode="reduce-overhead"),
}
BACKENDS = (*TORCH_VARIANTS, "ort", "trt")
CPU_DEFAULT = ("torch", "ort")
GPU_DEFAULT = ("torch", "torch-fp16", "torch-bf16", "torch-compile", "torch-fp16-triton", "ort", "trt")


class TorchVariantBackend(TorchBackend):
    """The PyTorch backend run as a variant: under autocast, compiled, or with the Triton intervention."""

    def __init__(self, path, device: str, name: str, variant: TorchVariant):
        self.variant = variant
        super().__init__(path, device)
        self.name = name

    def load(self) -> None:
        super().load()
        import torch

        if self.variant.impl != "torch":
            self.model.set_intervention_impl(self.variant.impl)
        if self.variant.compile_mode:  # the model's forward calls these two
            self.model.frame_tokens = torch.compile(self.model.frame_tokens, mode=self.variant.compile_mode)
            self.model.head = torch.compile(self.model.head, mode=self.variant.compile_mode)

    def _infer(self, role: GraphRole, feeds: dict) -> dict:
        import torch

        if self.variant.precision == "fp32":
            return super()._infer(role, feeds)
        with torch.autocast(self.device, dtype=torch_dtype(self.variant.precision)):
            return super()._infer(role, feeds)


def intervention_call(backend: TorchBackend, batch: int):
    """The fused intervention op alone, on the PyTorch model's own memories and a random query of `batch` windows,
    in the backend's variant (precision, implementation, compilation): (a call to time, a note on the shapes)."""
    import torch

    from ..kernels import causal_intervention

    model = backend.model
    variant = backend.variant if isinstance(backend, TorchVariantBackend) else TORCH_VARIANTS["torch"]
    dtype = torch_dtype(variant.precision)
    with torch.inference_mode():
        memories = [m.to(dtype) for m in model.intervention_memories(model.text_features())]
    seq_len = model.cfg.num_frames * model.cfg.tokens_per_frame
    q = torch.randn(batch, seq_len, model.cfg.width, device=backend.device, dtype=dtype)
    op = causal_intervention
    if variant.compile_mode:
        op = torch.compile(causal_intervention, mode=variant.compile_mode)

    def run():
        with torch.inference_mode():
            op(q, *memories, num_heads=model.cfg.heads, impl=variant.impl)

    return run, f"B={batch} L={seq_len} D={model.cfg.width} C={memories[0].shape[1]} Kz={memories[2].shape[1]}"


class TimedBackend(Backend):
    """Runs another backend, adding up the seconds spent in its graphs (`seconds`)."""

    def __init__(self, inner: Backend):
        self.inner, self.info, self.path, self.device, self.seconds = inner, inner.info, inner.path, inner.device, 0.0

    def infer(self, role: GraphRole, feeds: dict) -> dict:
        """The inner backend's `infer` (which checks the feeds), timed."""
        started = time.perf_counter()
        try:
            return self.inner.infer(role, feeds)
        finally:
            self.seconds += time.perf_counter() - started


def torch_dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
