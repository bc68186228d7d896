"""Ahead-of-time compilation of the Triton intervention kernel to PTX.

`compile_kernel` compiles for an explicit GPU target (sm_80, sm_90, ...) with
no GPU present and returns everything a launcher needs: kernel name, PTX,
threads per block, shared memory, the grid as a function of (B, L) and the
argument order. The TensorRT plugin's AOT implementation returns exactly
this to TensorRT (so engines run without Python), and the GPU check script
launches the same PTX through cupy with the same grid and arguments.

Triton appends scratch-buffer pointers to every kernel's parameter list;
TensorRT passes only inputs, int32 extras and outputs, so those trailing
parameters are removed from the PTX (they must be unused, which is checked).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

from ..errors import CmdclError
from .triton_kernel import KERNEL_ARGS, causal_intervention_kernel, kernel_config, launch_grid

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NUM_WARPS = 4
NUM_STAGES = 2
# PTX ISA 8.4 (CUDA 12.4) up to Hopper: the oldest a driver must understand
# to JIT the engine's kernel. Triton's default follows its bundled ptxas (9.x
# on sm_90), which drivers older than that toolkit reject. Newer targets
# (Blackwell) need newer PTX: Triton's default there.
PTX_VERSION = 84


def ptx_version(arch: int) -> int | None:
    return PTX_VERSION if arch < 100 else None
# Above 48 KiB a launcher must opt in with cuFuncSetAttribute; stay under it.
MAX_STATIC_SHARED = 48 * 1024


class AotError(CmdclError, RuntimeError):
    """The kernel cannot be compiled or assembled for the requested target."""


@dataclass(frozen=True)
class AotKernel:
    """A compiled kernel plus its launch contract."""

    name: str
    ptx: str
    arch: int  # compute capability x 10, e.g. 90
    dtype: str  # fp32 | fp16 | bf16, of every input and the output
    num_heads: int
    head_dim: int
    block_l: int
    num_warps: int
    shared_mem: int  # bytes of dynamic shared memory per block
    constexprs: dict
    arg_order: tuple = KERNEL_ARGS  # pointers, then int32 scalars, then the output

    @property
    def threads(self) -> int:
        return self.num_warps * 32

    def grid(self, batch, seq_len, cdiv=triton.cdiv):
        """(grid_x, grid_y, grid_z); accepts symbolic sizes with a matching cdiv."""
        return launch_grid(batch, seq_len, self.num_heads, self.block_l, cdiv)

    @staticmethod
    def scalar_args(seq_len, num_text, num_conf):
        """The int32 arguments between the input and output pointers: (L, C, Kz)."""
        return (seq_len, num_text, num_conf)


def compile_kernel(
    dtype: str,
    num_heads: int,
    head_dim: int,
    num_text: int,
    num_conf: int,
    scale: float,
    arch: int = 90,
    block_l: int = 64,
) -> AotKernel:
    """Compile the fused kernel for one target and one set of constants.

    num_text / num_conf only pick tile sizes (the kernel takes C and Kz at run
    time); num_heads, head_dim and scale are baked into the code.
    """
    if dtype not in DTYPES:
        raise AotError(f"unsupported dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    from triton.backends.compiler import GPUTarget

    constexprs = dict(
        NUM_HEADS=num_heads,
        SCALE=float(scale),
        **kernel_config(head_dim, num_text, num_conf, block_l=block_l, dtype=DTYPES[dtype]),
    )
    pointer = f"*{dtype}"
    signature = {name: pointer for name in causal_intervention_kernel.arg_names[:6]}
    signature.update(seq_len="i32", num_text="i32", num_conf="i32", out_ptr=pointer)
    signature.update({name: "constexpr" for name in constexprs})
    # TensorRT and torch allocations are at least 256-byte aligned: let the
    # compiler vectorise pointer accesses.
    pointer_positions = [i for i, name in enumerate(causal_intervention_kernel.arg_names) if name.endswith("_ptr")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in pointer_positions}
    source = triton.compiler.ASTSource(fn=causal_intervention_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    try:
        options = dict(num_warps=NUM_WARPS, num_stages=NUM_STAGES, ptx_version=ptx_version(arch))
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as error:  # triton raises many types; report one line
        raise AotError(f"triton could not compile the kernel for sm_{arch}: {error}") from error
    meta = compiled.metadata
    if meta.shared > MAX_STATIC_SHARED:
        raise AotError(f"kernel needs {meta.shared} bytes of shared memory (> {MAX_STATIC_SHARED}); use smaller tiles")
    return AotKernel(
        name=meta.name,
        ptx=drop_trailing_params(compiled.asm["ptx"], meta.name, len(KERNEL_ARGS)),
        arch=arch,
        dtype=dtype,
        num_heads=num_heads,
        head_dim=head_dim,
        block_l=block_l,
        num_warps=meta.num_warps,
        shared_mem=meta.shared,
        constexprs=constexprs,
    )


def entry_params(ptx: str, kernel_name: str) -> list[str]:
    """Names of the .param entries of `kernel_name`, in order."""
    match = re.search(rf"\.entry\s+{re.escape(kernel_name)}\s*\((.*?)\)", ptx, re.S)
    if match is None:
        raise AotError(f"no .entry {kernel_name} in the PTX")
    return re.findall(r"\.param\s[^,]*?(\w+)\s*(?:,|$)", match.group(1).strip())


def drop_trailing_params(ptx: str, kernel_name: str, keep: int) -> str:
    """Remove the parameters after the first `keep` (Triton's scratch
    pointers) from the kernel entry, refusing if the body uses any of them."""
    params = entry_params(ptx, kernel_name)
    if len(params) < keep:
        raise AotError(f"{kernel_name} has {len(params)} parameters, expected at least {keep}")
    extra = params[keep:]
    used = [name for name in extra if re.search(rf"\[{re.escape(name)}(\+\d+)?\]", ptx)]
    if used:
        raise AotError(f"{kernel_name} uses Triton's scratch parameters {used}; TensorRT cannot pass them")
    if not extra:
        return ptx
    head, sep, rest = ptx.partition(f".entry {kernel_name}(")
    param_list, close, body = rest.partition(")")
    kept = [line for line in param_list.split("\n") if not any(re.search(rf"\b{name}\b", line) for name in extra)]
    kept_params = [i for i, line in enumerate(kept) if ".param" in line]
    kept[kept_params[-1]] = kept[kept_params[-1]].rstrip().rstrip(",")
    return head + sep + "\n".join(kept) + close + body


def find_ptxas() -> Path | None:
    """ptxas from $CMDCL_PTXAS, PATH, /usr/local/cuda*/bin, or Triton's bundled copy."""
    candidates = [os.environ.get("CMDCL_PTXAS"), shutil.which("ptxas")]
    candidates += sorted(glob.glob("/usr/local/cuda*/bin/ptxas"), reverse=True)
    candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"))
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def ptx_target(ptx: str) -> str:
    """The .target of a PTX module, e.g. 'sm_90a'."""
    match = re.search(r"^\.target\s+(\w+)", ptx, re.M)
    if match is None:
        raise AotError("PTX has no .target line")
    return match.group(1)


def assemble(ptx: str, ptxas: Path | None = None) -> bytes:
    """Assemble PTX into a cubin with ptxas (for the PTX's own target)."""
    ptxas = ptxas or find_ptxas()
    if ptxas is None:
        raise AotError("ptxas not found (set CMDCL_PTXAS or install the CUDA toolkit)")
    with tempfile.TemporaryDirectory() as tmp:
        source, cubin = Path(tmp) / "kernel.ptx", Path(tmp) / "kernel.cubin"
        source.write_text(ptx)
        result = subprocess.run(
            [str(ptxas), f"-arch={ptx_target(ptx)}", str(source), "-o", str(cubin)], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise AotError(f"ptxas failed: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}")
        return cubin.read_bytes()
