"""`cmdcl-build`: an exported CMDCL ONNX file -> TensorRT engine(s)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .errors import cli_errors
from .options import BATCH, OutputPath


@click.command()
@click.argument("onnx_path", metavar="MODEL.onnx", type=click.Path(path_type=Path))
@click.option("--engine", type=OutputPath(path_type=Path), default=None,
              help="Engine file to write [default: MODEL.plan]; a JSON sidecar ENGINE.json goes next to it.")
@click.option("--precision", default="fp16", show_default=True, type=click.Choice(["fp32", "fp16", "bf16"]),
              help="Engine precision; LayerNorm, softmax and the classifier stay fp32. An fp32 ONNX file is converted "
                   "in memory; an fp16 one builds fp16 only.")
@click.option("--max-batch", default=32, show_default=True, type=BATCH,
              help="Largest batch of the optimisation profile (min 1).")
@click.option("--opt-batch", default=None, type=BATCH,
              help="Batch TensorRT tunes for [default: --max-batch].")
@click.option("--timing-cache", type=OutputPath(path_type=Path), default=None,
              help="TensorRT timing cache: read if it exists, updated after the build.")
@click.option("--split/--no-split", default=True, show_default=True,
              help="Also build MODEL.frame_encoder.onnx and MODEL.head.onnx when they exist "
                   "(-> ENGINE-stem.frame_encoder.plan, ENGINE-stem.head.plan).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(onnx_path, engine, precision, max_batch, opt_batch, timing_cache, split, debug):
    """Build a TensorRT engine from an ONNX file written by cmdcl-export.

    Registers the cmdcl::CausalIntervention plugin (fused Triton kernel,
    compiled ahead of time into the engine, so trtexec and C++ can run it),
    parses the graph, adds a batch profile and writes the engine with a JSON
    sidecar (metadata, TensorRT version, GPU, precision). Needs TensorRT
    >= 10.9 and an NVIDIA GPU; the engine runs only on that GPU model.
    """
    from tqdm import tqdm

    from cmdcl.artifacts import model_files, read_sidecar, sidecar_path
    from cmdcl.export.tensorrt_build import build_engine, split_pairs
    from cmdcl.output_files import check_outputs

    if opt_batch is not None and opt_batch > max_batch:
        raise click.BadParameter(f"{opt_batch} is more than --max-batch {max_batch}", param_hint="--opt-batch")
    engine = engine or onnx_path.with_suffix(".plan")
    pairs = split_pairs(onnx_path, engine) if split else [(onnx_path, engine)]
    with cli_errors("cmdcl-build", debug):
        # before building: no engine, sidecar or timing cache may overwrite a model file or each other
        outputs = [*[("--engine", plan) for _, plan in pairs], *[("the engine's sidecar", sidecar_path(plan)) for _, plan in pairs]]
        check_outputs([*outputs, ("--timing-cache", timing_cache)], model_files(onnx_path, "the model"))
        for part, plan in tqdm(pairs, desc="cmdcl-build", unit="engine", file=sys.stderr,
                               disable=True if len(pairs) == 1 else None):  # None: no bar off a terminal
            build_engine(part, plan, precision=precision, max_batch=max_batch, timing_cache=timing_cache, opt_batch=opt_batch)
            click.echo(f"wrote {plan}")
            sidecar = read_sidecar(plan)
            meta = sidecar["metadata"]
            if sidecar["plugin"] is None and meta.get("visual_intervention") and meta.get("graph_role") != "frame_encoder":
                click.echo(f"note: {plan.name}: the intervention ran as the ONNX local function (plugin not picked up)", err=True)


if __name__ == "__main__":
    main()
