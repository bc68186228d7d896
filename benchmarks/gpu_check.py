"""GPU check of the fused cmdcl::CausalIntervention kernel.

Runs on a machine with an NVIDIA GPU and only torch, triton and cupy
installed (no TensorRT), from a checkout:

    python benchmarks/gpu_check.py [--out gpu_check.json] [--quick]

1. Parity: the Triton kernel against the PyTorch reference (computed in fp32
   from the same inputs) on fresh random inputs, fp32/fp16/bf16, several
   shapes including sizes that are not multiples of the tiles; the output is
   poisoned with NaN before every run. Tolerances: docs/design.md section 7 (`cmdcl.artifacts.TOLERANCES`).
2. AOT: the PTX the TensorRT plugin embeds in engines (cmdcl.kernels.aot),
   loaded through cupy and launched with the plugin's grid, block, shared
   memory and argument order, checked the same way.
3. Timings (CUDA events, warm-up, median of many runs) of the Triton kernel
   (both query-tile tactics), the AOT PTX, PyTorch eager (two attentions +
   concat) and torch.compile of the reference, at serving shapes (32
   streams) and at batch 1, with achieved TFLOP/s and GB/s against the
   bytes/FLOPs floor of each shape (the floor of the op alone); and the query
   projection as a separate GEMM + kernel against the kernel with the
   projection fused in.
Prints the card and a table; writes JSON. Exit status 1 if a parity check fails.

`--dry-run` needs no GPU: it compiles the AOT kernel for sm_90, builds the
launch arguments, computes the floors and writes the table/JSON with no
measurements (the CPU test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import torch  # noqa: E402

from cmdcl.artifacts import TOLERANCES  # noqa: E402
from cmdcl.bench.measure import time_calls  # noqa: E402
from cmdcl.bench.report import format_table  # noqa: E402
from cmdcl.kernels import aot  # noqa: E402
from cmdcl.kernels.reference import causal_intervention_reference  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    seq_len: int  # L = F * S tokens
    width: int  # D = h * d
    heads: int
    num_text: int  # C classes
    num_conf: int  # Kz dictionary entries

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


# Serving: 32 streams of F=64 frames x S=5 tokens, base preset (D=512, h=8),
# 200 classes, Kz=1024. Stream: one window at a time.
TIMING_SHAPES = [Shape("serving B=32", 32, 320, 512, 8, 200, 1024), Shape("stream B=1", 1, 320, 512, 8, 200, 1024)]
PARITY_SHAPES = [
    Shape("serving", 4, 320, 512, 8, 200, 1024),
    Shape("ragged", 3, 77, 96, 4, 37, 301),  # d=24 (padded to 32), nothing a tile multiple
    Shape("C=1 Kz=1", 2, 5, 64, 2, 1, 1),
]


def floors(shape: Shape, element_bytes: int) -> dict:
    """Least work any implementation must do: read Q and both memories once,
    write the output; two matmuls per memory (QK^T and PV), 2 FLOPs per MAC."""
    tokens = shape.batch * shape.seq_len
    memory_rows = shape.num_text + shape.num_conf
    bytes_moved = element_bytes * (tokens * shape.width + tokens * 2 * shape.width + 2 * memory_rows * shape.width + shape.num_conf)
    flops = 4 * tokens * shape.width * memory_rows
    return {"bytes": bytes_moved, "flops": flops, "flops_per_byte": round(flops / bytes_moved, 1)}


def random_inputs(shape: Shape, dtype: torch.dtype, device: str, generator: torch.Generator):
    """q, kt, vt, kz, vz, log_prior with the model's scales (unit-variance
    projections, a normalised log prior)."""
    h, d, b, seq_len = shape.heads, shape.head_dim, shape.batch, shape.seq_len

    def randn(*size):
        return torch.randn(*size, generator=generator, device=device).to(dtype)

    prior = torch.log_softmax(torch.randn(shape.num_conf, generator=generator, device=device), 0).to(dtype)
    return (randn(b, seq_len, h * d), randn(h, shape.num_text, d), randn(h, shape.num_text, d),
            randn(h, shape.num_conf, d), randn(h, shape.num_conf, d), prior)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def aot_arguments(kernel: aot.AotKernel, inputs, out, seq_len: int, num_text: int, num_conf: int) -> list:
    """The kernel arguments in the plugin's order (input pointers, int32
    scalars, output pointer), as numpy scalars for a raw CUDA launch."""
    import numpy as np

    pointers = dict(zip(kernel.arg_order[:6], inputs), out=out)
    scalars = dict(zip(kernel.arg_order[6:9], kernel.scalar_args(seq_len, num_text, num_conf)))
    return [
        np.uint64(pointers[name].data_ptr()) if name in pointers else np.int32(scalars[name]) for name in kernel.arg_order
    ]


def load_aot(kernel: aot.AotKernel):
    """The PTX as a cupy kernel (the driver JIT-compiles it, as under TensorRT)."""
    import cupy

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{kernel.name}.ptx"
        path.write_text(kernel.ptx)
        return cupy.RawModule(path=str(path)).get_function(kernel.name)


def launch_aot(function, kernel: aot.AotKernel, inputs, out, shape: Shape) -> None:
    grid = kernel.grid(shape.batch, shape.seq_len)
    args = aot_arguments(kernel, inputs, out, shape.seq_len, shape.num_text, shape.num_conf)
    function(grid, (kernel.threads, 1, 1), tuple(args), shared_mem=kernel.shared_mem)


def check_parity(arch: int, generator: torch.Generator) -> list[dict]:
    from cmdcl.kernels.triton_fused_q import causal_intervention_triton_fused_q
    from cmdcl.kernels.triton_kernel import causal_intervention_triton

    results = []
    for shape in PARITY_SHAPES:
        for name, dtype in aot.DTYPES.items():
            inputs = random_inputs(shape, dtype, "cuda", generator)
            scale = shape.head_dim**-0.5
            ref = causal_intervention_reference(*(t.float() for t in inputs), shape.heads, scale)
            out = torch.full((shape.batch, shape.seq_len, 2 * shape.width), float("nan"), dtype=dtype, device="cuda")
            for block_l in (64, 16):
                out.fill_(float("nan"))
                causal_intervention_triton(*inputs, shape.heads, scale, block_l=block_l, out=out)
                torch.cuda.synchronize()
                results.append(_parity_row(shape, name, f"triton BLOCK_L={block_l}", out, ref))
            kernel = aot.compile_kernel(name, shape.heads, shape.head_dim, shape.num_text, shape.num_conf, scale, arch=arch)
            out.fill_(float("nan"))
            torch.cuda.synchronize()
            launch_aot(load_aot(kernel), kernel, inputs, out, shape)
            torch.cuda.synchronize()
            results.append(_parity_row(shape, name, "aot ptx (cupy)", out, ref))

            x, weight, bias = projection_inputs(shape, dtype, generator)
            fused_ref = causal_intervention_reference(x.float() @ weight.float().T + bias.float(), *(t.float() for t in inputs[1:]),
                                                      shape.heads, scale)
            out.fill_(float("nan"))
            causal_intervention_triton_fused_q(x, weight, bias, *inputs[1:], shape.heads, scale, out=out)
            torch.cuda.synchronize()
            results.append(_parity_row(shape, name, "triton fused Q projection", out, fused_ref))
    return results


def projection_inputs(shape: Shape, dtype: torch.dtype, generator: torch.Generator):
    """x [B, L, D] and an nn.Linear-like query projection D -> D."""
    x = torch.randn(shape.batch, shape.seq_len, shape.width, generator=generator, device="cuda").to(dtype)
    weight = (torch.randn(shape.width, shape.width, generator=generator, device="cuda") / shape.width**0.5).to(dtype)
    return x, weight, torch.randn(shape.width, generator=generator, device="cuda").to(dtype)


def _parity_row(shape: Shape, dtype: str, impl: str, out: torch.Tensor, ref: torch.Tensor) -> dict:
    error = relative_error(out, ref) if torch.isfinite(out).all() else math.inf
    return {"shape": shape.name, "dtype": dtype, "impl": impl, "rel_error": error, "tolerance": TOLERANCES[dtype],
            "ok": error <= TOLERANCES[dtype]}


def time_shapes(arch: int, generator: torch.Generator, warmup: int, reps: int) -> list[dict]:
    from cmdcl.kernels.triton_fused_q import causal_intervention_triton_fused_q
    from cmdcl.kernels.triton_kernel import causal_intervention_triton

    compiled_reference = torch.compile(causal_intervention_reference, dynamic=False)
    rows = []
    for shape in TIMING_SHAPES:
        for name, dtype in aot.DTYPES.items():
            inputs = random_inputs(shape, dtype, "cuda", generator)
            scale, h = shape.head_dim**-0.5, shape.heads
            out = torch.empty(shape.batch, shape.seq_len, 2 * shape.width, dtype=dtype, device="cuda")
            kernel = aot.compile_kernel(name, h, shape.head_dim, shape.num_text, shape.num_conf, scale, arch=arch)
            function = load_aot(kernel)
            x, weight, bias = projection_inputs(shape, dtype, generator)
            memories = inputs[1:]
            candidates = {
                "triton BLOCK_L=64": lambda: causal_intervention_triton(*inputs, h, scale, block_l=64, out=out),
                "triton BLOCK_L=16": lambda: causal_intervention_triton(*inputs, h, scale, block_l=16, out=out),
                "aot ptx (cupy)": lambda: launch_aot(function, kernel, inputs, out, shape),
                "torch eager": lambda: causal_intervention_reference(*inputs, h, scale),
                "torch.compile": lambda: compiled_reference(*inputs, h, scale),
                # Does fusing the query projection pay? (the ms column includes the projection here)
                "Q linear + triton": lambda: causal_intervention_triton(torch.nn.functional.linear(x, weight, bias), *memories, h, scale,
                                                                        out=out),
                "triton fused Q projection": lambda: causal_intervention_triton_fused_q(x, weight, bias, *memories, h, scale, out=out),
            }
            floor = floors(shape, dtype.itemsize)
            for impl, fn in candidates.items():
                ms = statistics.median(time_calls(fn, reps, warmup, cuda=True))
                rows.append({"shape": shape.name, "dtype": name, "impl": impl, "ms": round(ms, 4),
                             "tflops": round(floor["flops"] / ms / 1e9, 2), "gbps": round(floor["bytes"] / ms / 1e6, 1)})
    return rows


def floor_rows() -> list[dict]:
    return [{"shape": s.name, "dtype": n, **asdict(s), **floors(s, d.itemsize)} for s in TIMING_SHAPES for n, d in aot.DTYPES.items()]


def dry_run() -> dict:
    """Everything but the GPU: AOT compile for sm_90, launch arguments, floors."""
    shape = TIMING_SHAPES[0]
    kernel = aot.compile_kernel("fp16", shape.heads, shape.head_dim, shape.num_text, shape.num_conf, shape.head_dim**-0.5, arch=90)
    inputs = random_inputs(shape, torch.float16, "cpu", torch.Generator().manual_seed(0))
    out = torch.empty(shape.batch, shape.seq_len, 2 * shape.width, dtype=torch.float16)
    args = aot_arguments(kernel, inputs, out, shape.seq_len, shape.num_text, shape.num_conf)
    return {
        "kernel": kernel.name,
        "arch": kernel.arch,
        "grid": list(kernel.grid(shape.batch, shape.seq_len)),
        "block": [kernel.threads, 1, 1],
        "shared_mem": kernel.shared_mem,
        "arguments": [f"{name}={type(a).__name__}" for name, a in zip(kernel.arg_order, args)],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="JSON results file")
    parser.add_argument("--quick", action="store_true", help="fewer timing repetitions")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: AOT compile, arguments, floors only")
    args = parser.parse_args(argv)
    started = time.time()
    report = {"floors": floor_rows()}
    if args.dry_run:
        report["device"] = "none (dry run)"
        report["dry_run"] = dry_run()
        report["parity"] = report["timings"] = None
        print(f"device: {report['device']}; AOT launch: {report['dry_run']}")
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA GPU visible (use --dry-run to check the rest)", file=sys.stderr)
            return 2
        major, minor = torch.cuda.get_device_capability()
        arch = 10 * major + minor
        report["device"] = f"{torch.cuda.get_device_name()} (sm_{arch}), torch {torch.__version__}"
        import cupy
        import triton

        report["versions"] = {"torch": torch.__version__, "triton": triton.__version__, "cupy": cupy.__version__,
                              "cuda": torch.version.cuda}
        print(f"device: {report['device']}")
        generator = torch.Generator(device="cuda").manual_seed(int(time.time()))  # fresh inputs every run
        report["parity"] = check_parity(arch, generator)
        print(format_table(["shape", "dtype", "impl", "rel error", "tolerance", "ok"],
                    [[r["shape"], r["dtype"], r["impl"], f"{r['rel_error']:.2e}", r["tolerance"], r["ok"]] for r in report["parity"]]))
        reps = 20 if args.quick else 200
        report["timings"] = time_shapes(arch, generator, warmup=10, reps=reps)
        print(format_table(["shape", "dtype", "impl", "median ms", "TFLOP/s", "GB/s"],
                    [[r["shape"], r["dtype"], r["impl"], r["ms"], r["tflops"], r["gbps"]] for r in report["timings"]]))
    print(format_table(["shape", "dtype", "MB moved (floor)", "GFLOP", "FLOP/byte"],
                [[r["shape"], r["dtype"], f"{r['bytes'] / 1e6:.2f}", f"{r['flops'] / 1e9:.2f}", r["flops_per_byte"]]
                 for r in report["floors"]]))
    report["seconds"] = round(time.time() - started, 1)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({report['seconds']} s)")
    failed = [r for r in report["parity"] or [] if not r["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
