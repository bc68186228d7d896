"""TensorRT plugin for `cmdcl::CausalIntervention` (tensorrt.plugin API, TensorRT >= 10.9).

`register_plugin()` defines, once per process:
- `register`: the output [B, L, 2*h*d] with Q's type; attributes num_heads
  and scale (the ONNX node's; TensorRT's parser reads plugin_namespace and
  plugin_version itself to find this plugin: namespace "cmdcl", name
  "CausalIntervention", version "1", as the exported node says);
- `autotune`: all seven tensors fp32, fp16 or bf16 together, linear layout,
  two tactics (64- or 16-row query tiles; TensorRT times both);
- `aot_impl`: the Triton kernel compiled to PTX for the building GPU, with
  its grid, block, shared memory and int32 arguments as shape expressions,
  so the engine runs without Python (trtexec, C++);
- `impl`: a JIT fallback that launches the same kernel from Python.
The network must be created with PREFER_AOT_PYTHON_PLUGINS (build_engine
does) since both implementations exist.

Everything TensorRT-specific is imported inside `register_plugin`, so this
module imports without TensorRT, and Triton only when a kernel is compiled
(building an engine, or the JIT path): running an AOT engine needs neither.
`aot_launch` is the plain function the AOT implementation calls, testable on
any machine.
"""

# No `from __future__ import annotations`: tensorrt.plugin validates the
# decorated functions' annotations as real objects, not strings.
from types import SimpleNamespace
from typing import TYPE_CHECKING, List, Tuple, Union

from .onnx_node import DOMAIN as PLUGIN_NAMESPACE
from .onnx_node import OP_TYPE as PLUGIN_NAME

if TYPE_CHECKING:
    from .aot import AotKernel

PLUGIN_VERSION = "1"  # tensorrt.plugin registers every plugin as version "1" (the node's version must agree)
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
# tactic -> query rows per program (tactic 0 is TensorRT's "default").
TACTIC_BLOCK_L = {0: 64, 1: 64, 2: 16}

_registered = False


def aot_launch(
    dtype: str, num_heads: int, head_dim: int, num_text: int, num_conf: int, scale: float, arch: int, tactic: int
) -> "AotKernel":
    """The kernel and launch contract the plugin hands TensorRT for one
    (dtype, tactic) on a GPU of compute capability `arch` (e.g. 90)."""
    from .aot import compile_kernel  # triton: needed to build engines, not to run them

    return compile_kernel(dtype, num_heads, head_dim, num_text, num_conf, scale, arch=arch, block_l=TACTIC_BLOCK_L[tactic])


def register_plugin() -> None:
    """Register the plugin with TensorRT (idempotent). Raises ImportError
    without TensorRT >= 10.9's tensorrt.plugin."""
    global _registered
    if _registered:
        return
    import tensorrt as trt
    import tensorrt.plugin as trtp

    dtype_names = {trt.float32: "fp32", trt.float16: "fp16", trt.bfloat16: "bf16"}

    @trtp.register(PLUGIN_ID)
    def causal_intervention_desc(
        q: trtp.TensorDesc,
        kt: trtp.TensorDesc,
        vt: trtp.TensorDesc,
        kz: trtp.TensorDesc,
        vz: trtp.TensorDesc,
        log_prior: trtp.TensorDesc,
        num_heads: int,
        scale: float,
    ) -> Tuple[trtp.TensorDesc]:
        out = q.like()
        out.shape_expr[2] = q.shape_expr[2] * 2
        return (out,)

    @trtp.autotune(PLUGIN_ID)
    def causal_intervention_autotune(q, kt, vt, kz, vz, log_prior, outputs) -> List[trtp.AutoTuneCombination]:
        same_type = ", ".join(["FP32|FP16|BF16"] * 7)
        return [trtp.AutoTuneCombination(same_type, "LINEAR", [1, 2])]

    @trtp.aot_impl(PLUGIN_ID)
    def causal_intervention_aot(
        q, kt, vt, kz, vz, log_prior, num_heads: int, scale: float, outputs, tactic: int
    ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
        # tensorrt.plugin refuses an aot_impl without this return annotation.
        import torch

        heads, num_text, head_dim = (kt.shape_expr[i] for i in range(3))
        num_conf = kz.shape_expr[1]
        if not (heads.is_constant and head_dim.is_constant):
            raise ValueError(f"{PLUGIN_ID}: Kt must have constant head count and head dim (make it an initializer)")
        if heads.constant_value() != num_heads:
            raise ValueError(f"{PLUGIN_ID}: num_heads={num_heads} but Kt has {heads.constant_value()} heads")
        major, minor = torch.cuda.get_device_capability()
        kernel = aot_launch(
            dtype_names[q.dtype],
            heads.constant_value(),
            head_dim.constant_value(),
            num_text.constant_value() if num_text.is_constant else 64,
            num_conf.constant_value() if num_conf.is_constant else 64,
            scale,
            arch=10 * major + minor,
            tactic=tactic,
        )
        batch, seq_len = q.shape_expr[0], q.shape_expr[1]
        grid_x, grid_y, _ = kernel.grid(batch, seq_len, cdiv=trtp.cdiv)
        launch = trtp.KernelLaunchParams()
        launch.grid_x, launch.grid_y = grid_x, grid_y
        launch.block_x = kernel.threads
        launch.shared_mem = kernel.shared_mem
        extra_args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in kernel.scalar_args(seq_len, num_text, num_conf)])
        return kernel.name, kernel.ptx, launch, extra_args

    @trtp.impl(PLUGIN_ID)
    def causal_intervention_jit(q, kt, vt, kz, vz, log_prior, num_heads: int, scale: float, outputs, stream: int, tactic: int) -> None:
        import torch

        from .triton_kernel import causal_intervention_triton

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            tensors = [_as_torch(t, trt) for t in (q, kt, vt, kz, vz, log_prior)]
            causal_intervention_triton(
                *tensors, num_heads, scale, block_l=TACTIC_BLOCK_L[tactic], out=_as_torch(outputs[0], trt)
            )

    _registered = True


def _as_torch(tensor, trt):
    """A zero-copy torch view of a contiguous tensorrt.plugin.Tensor. bf16 goes
    through an int16 view: __cuda_array_interface__ has no bf16 type."""
    import torch

    typestr, dtype = {
        trt.float32: ("<f4", torch.float32),
        trt.float16: ("<f2", torch.float16),
        trt.bfloat16: ("<i2", torch.bfloat16),
    }[tensor.dtype]
    interface = dict(shape=tuple(tensor.shape), typestr=typestr, data=(tensor.data_ptr, False), strides=None, version=3)
    return torch.as_tensor(SimpleNamespace(__cuda_array_interface__=interface), device="cuda").view(dtype)
