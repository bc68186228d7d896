"""Ahead-of-time compilation of the intervention kernel for explicit GPU
targets (no GPU needed), the launch contract the TensorRT plugin returns,
and assembly of the PTX with ptxas."""

from __future__ import annotations

import re

import pytest

from cmdcl.kernels import aot
from cmdcl.kernels.tensorrt_plugin import aot_launch

# Serving shapes: base preset (h=8, d=64), 200 classes, Kz=1024.
HEADS, HEAD_DIM, NUM_TEXT, NUM_CONF, SCALE = 8, 64, 200, 1024, 0.125
TARGETS = [(80, "fp16"), (80, "fp32"), (90, "fp16"), (90, "bf16"), (90, "fp32")]


@pytest.fixture(scope="module")
def kernels():
    return {(arch, dtype): aot.compile_kernel(dtype, HEADS, HEAD_DIM, NUM_TEXT, NUM_CONF, SCALE, arch=arch) for arch, dtype in TARGETS}


@pytest.mark.slow
@pytest.mark.parametrize("arch,dtype", TARGETS)
def test_ptx_for_explicit_target(kernels, arch, dtype):
    kernel = kernels[arch, dtype]
    assert aot.ptx_target(kernel.ptx) == ("sm_90a" if arch == 90 else "sm_80")
    assert re.search(r"^\.version 8\.4$", kernel.ptx, re.M), "PTX ISA pinned to 8.4 for older drivers"
    assert kernel.name == "causal_intervention_kernel" and f".entry {kernel.name}(" in kernel.ptx
    assert kernel.threads == 128 and 0 < kernel.shared_mem <= aot.MAX_STATIC_SHARED


@pytest.mark.slow
@pytest.mark.parametrize("arch,dtype", TARGETS)
def test_entry_takes_exactly_the_plugin_arguments(kernels, arch, dtype):
    """TensorRT passes input pointers, int32 extras, output pointers: the
    entry must declare exactly those, in that order (Triton's scratch
    pointers removed)."""
    kernel = kernels[arch, dtype]
    entry = re.search(rf"\.entry {kernel.name}\((.*?)\)", kernel.ptx, re.S).group(1)
    kinds = ["u64" if ".u64" in line else "u32" for line in entry.strip().splitlines()]
    assert kernel.arg_order == ("q", "kt", "vt", "kz", "vz", "log_prior", "seq_len", "num_text", "num_conf", "out")
    assert kinds == ["u64"] * 6 + ["u32"] * 3 + ["u64"]


@pytest.mark.slow
@pytest.mark.parametrize("arch,dtype", TARGETS)
def test_ptxas_assembles(kernels, arch, dtype):
    ptxas = aot.find_ptxas()
    if ptxas is None:
        pytest.skip("no ptxas (CUDA toolkit or Triton's bundled copy) on this machine")
    cubin = aot.assemble(kernels[arch, dtype].ptx, ptxas)
    assert cubin[:4] == b"\x7fELF" and len(cubin) > 10_000


def test_launch_grid_and_scalars():
    kernel = aot_launch("fp16", HEADS, HEAD_DIM, NUM_TEXT, NUM_CONF, SCALE, arch=90, tactic=1)
    assert kernel.block_l == 64 and kernel.grid(32, 320) == (5, 256, 1)
    assert kernel.grid(1, 321) == (6, 8, 1)
    small_tiles = aot_launch("fp16", HEADS, HEAD_DIM, NUM_TEXT, NUM_CONF, SCALE, arch=90, tactic=2)
    assert small_tiles.block_l == 16 and small_tiles.grid(1, 320) == (20, 8, 1)
    assert kernel.scalar_args(320, 200, 1024) == (320, 200, 1024)


def test_grid_accepts_symbolic_sizes():
    """The plugin passes TensorRT shape expressions and trtp.cdiv."""
    calls = []

    def cdiv(a, b):
        calls.append((a, b))
        return ("cdiv", a, b)

    kernel = aot_launch("fp32", 2, 16, 5, 7, 0.25, arch=80, tactic=1)
    grid = kernel.grid(3, "L", cdiv=cdiv)
    assert grid == (("cdiv", "L", 64), 6, 1) and calls == [("L", 64)]


PTX_WITH_SCRATCH = """\
.visible .entry k(
\t.param .u64 .ptr .global .align 1 k_param_0,
\t.param .u32 k_param_1,
\t.param .u64 .ptr .global .align 1 k_param_2,
\t.param .u64 .ptr .global .align 1 k_param_3
)
{
\tld.param.b64 %rd1, [k_param_0];
\tld.param.b32 %r1, [k_param_1];
\tld.param.b64 %rd2, [k_param_2];
}
"""


def test_drop_trailing_params():
    trimmed = aot.drop_trailing_params(PTX_WITH_SCRATCH, "k", keep=3)
    assert aot.entry_params(trimmed, "k") == ["k_param_0", "k_param_1", "k_param_2"]
    assert "k_param_2\n)" in trimmed  # no dangling comma
    assert aot.drop_trailing_params(trimmed, "k", keep=3) == trimmed


def test_drop_trailing_params_refuses_used_scratch():
    used = PTX_WITH_SCRATCH.replace("}\n", "\tld.param.b64 %rd3, [k_param_3];\n}\n")
    with pytest.raises(aot.AotError, match="scratch"):
        aot.drop_trailing_params(used, "k", keep=3)


def test_unknown_dtype():
    with pytest.raises(aot.AotError, match="dtype"):
        aot.compile_kernel("int8", 2, 16, 4, 4, 0.25)
