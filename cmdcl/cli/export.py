"""`cmdcl-export`: a CMDCL checkpoint -> ONNX graphs (and optionally a TensorRT engine)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..artifacts import MAX_OPSET, MIN_OPSET, TOLERANCES
from ..errors import CmdclError
from .errors import cli_errors
from .options import BATCH, SECONDS_LIST, OutputPath


@click.command()
@click.option("--ckpt", required=True, type=click.Path(path_type=Path), help="CMDCL checkpoint (model.pt).")
@click.option("--out", type=OutputPath(path_type=Path), default=None,
              help="Output ONNX file [default: the checkpoint's name with .onnx]. With --split, "
                   "<stem>.frame_encoder.onnx and <stem>.head.onnx are written next to it.")
@click.option("--opset", default=18, show_default=True, type=click.IntRange(MIN_OPSET, MAX_OPSET),
              help="ONNX opset (LayerNormalization is one op from 17 on; torch writes at most 20).")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16"]),
              help="Weights/compute precision; fp16 keeps LayerNorm, softmax and the classifier in fp32. "
                   "Inputs (uint8 frames) and outputs (fp32) are the same either way.")
@click.option("--split/--no-split", default=True, show_default=True,
              help="Also write the frame_encoder and head graphs for the streaming runtime.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Compare ONNX Runtime with PyTorch on random frames and the demo video; "
                   f"fail if outside the tolerances (fp32 {TOLERANCES['fp32']:g}, fp16 {TOLERANCES['fp16']:g}; docs/design.md section 7).")
@click.option("--video", type=click.Path(path_type=Path), default=None,
              help="Verify on this video instead of the demo video.")
@click.option("--engine", type=OutputPath(path_type=Path), default=None,
              help="Also build a TensorRT engine (needs TensorRT and a GPU) at this path.")
@click.option("--engine-precision", default="fp16", show_default=True, type=click.Choice(["fp32", "fp16", "bf16"]),
              help="Precision of the --engine build.")
@click.option("--max-batch", default=32, show_default=True, type=BATCH,
              help="Largest batch of the engine's optimisation profile (and of the --triton-repo models).")
@click.option("--timing-cache", type=OutputPath(path_type=Path), default=None,
              help="TensorRT timing cache file, read and updated by the --engine build.")
@click.option("--triton-repo", type=OutputPath(file_okay=False, path_type=Path), default=None,
              help="Also write a Triton Inference Server model repository here: frame_encoder and head with dynamic "
                   "batching, a BLS model cmdcl for whole clips, a sequence-batching cmdcl_stream for cameras. "
                   "Only model directories that cmdcl-export wrote are replaced; anything else there is kept.")
@click.option("--engine-format", default="onnx", show_default=True, type=click.Choice(["onnx", "plan"]),
              help="--triton-repo backend: onnx (ONNX Runtime) or plan (TensorRT; builds --engine, default <out>.plan).")
@click.option("--stream-window", type=SECONDS_LIST, metavar="SECONDS[,SECONDS...]",
              help="--triton-repo: the cmdcl_stream model's window in seconds, or several comma-separated lengths "
                   "(multi-scale, as cmdcl-run --window 8,32). Default: the model's recorded sampling.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(ckpt, out, opset, precision, split, verify, video, engine, engine_precision, max_batch, timing_cache, triton_repo,
         engine_format, stream_window, debug):
    """Export a CMDCL checkpoint to ONNX.

    The graph takes uint8 RGB frames [B, F, H, W, 3] (normalisation inside)
    and returns logits [B, C] and embedding [B, D]. The label texts (T'),
    dictionaries and their projections are folded into constants; the visual
    intervention is one cmdcl::CausalIntervention node with a standard-op
    local function, so ONNX Runtime needs no custom-op library. Everything
    the runtime needs is in the file's metadata.

    No output may be the checkpoint, --video or another output (checked
    first); the graphs are exported and verified aside and renamed into place
    only then, so a failed export leaves older files as they were.
    """
    with cli_errors("cmdcl-export", debug):
        out = out or ckpt.with_suffix(".onnx")
        if triton_repo and not split:
            raise CmdclError("--triton-repo needs the split graphs (drop --no-split)")
        if stream_window and not triton_repo:
            raise click.UsageError("--stream-window needs --triton-repo")
        if triton_repo and engine_format == "plan" and engine is None:
            engine = out.with_suffix(".plan")
        stale = [] if split else _stale_split_graphs(out)
        _check_paths(ckpt, out, split, video, engine, timing_cache, triton_repo, stale)
        _export(ckpt, out, opset, precision, split, verify, video, engine, engine_precision, max_batch, timing_cache, stale,
                stream_window)
        if triton_repo:
            _write_triton_repo(out, triton_repo, engine_format, engine, max_batch, stream_window)


def _stale_split_graphs(out: Path) -> list[Path]:
    """With --no-split: the split graphs of an older export beside `out`, which the streaming runtime
    would take for the new model's; removed once the new model is written. A file of that name that
    is not a CMDCL graph is not ours to remove: an error."""
    from cmdcl.export.metadata import ModelFileError, read_metadata
    from cmdcl.export.onnx_export import output_paths

    stale = [path for role, path in output_paths(out).items() if role != "full" and path.exists()]
    for path in stale:
        try:
            read_metadata(path)
        except ModelFileError:
            raise CmdclError(f"{path}: exists and is not a CMDCL graph, and the runtime would take it for {out.name}'s "
                           f"split graph; move it away") from None
    return stale


def _check_paths(ckpt, out, split, video, engine, timing_cache, triton_repo, stale) -> None:
    """Before anything loads or is written: no output is an input or another output, each can be written,
    and none lies in a model directory that writing the Triton repository replaces."""
    from cmdcl.artifacts import model_files, sidecar_path
    from cmdcl.export.onnx_export import output_paths
    from cmdcl.output_files import check_outputs
    from cmdcl.serve.triton_repo import check_triton_repo

    inputs = [*model_files(ckpt, "--ckpt"), ("--video", video), ("--triton-repo", triton_repo)]
    outputs = [("--out" if role == "full" else f"--out's {role} graph", path) for role, path in output_paths(out, split).items()]
    if engine:
        engines = list(output_paths(engine, split).values())  # the engines are named as the graphs are
        outputs += [(f"--engine{'' if path == engine else ' (split graph)'}", path) for path in engines]
        outputs += [("--engine's sidecar", sidecar_path(path)) for path in engines]
    outputs += [("--timing-cache", timing_cache), *[("the stale split graph", path) for path in stale]]
    check_outputs(outputs, inputs)
    if triton_repo:
        check_triton_repo(triton_repo, inputs + outputs)


def _export(ckpt, out, opset, precision, split, verify, video, engine, engine_precision, max_batch, timing_cache, stale,
            stream_window):
    """Export (and verify) the graphs in a temporary directory beside `out`, then rename them into place:
    a failed export or verification leaves any older files as they were. A --stream-window the model cannot
    take is refused before anything is written."""
    from tqdm import tqdm

    from cmdcl.export import export_onnx
    from cmdcl.export.onnx_export import output_paths
    from cmdcl.export.verify import VerificationError, verify_export
    from cmdcl.model import load_checkpoint
    from cmdcl.output_files import move_into_place, temporary_dir

    if video is not None and not video.is_file():
        raise CmdclError(f"{video}: no such video file")
    stages = 1 + (3 if split else 1) + bool(verify) + bool(engine)  # load, graphs, verify, engine
    # disable=None: no bar when stderr is not a terminal (logs, CI)
    with tqdm(total=stages, desc="cmdcl-export", file=sys.stderr, unit="step", disable=None) as bar:
        bar.set_postfix_str(f"loading {ckpt.name}")
        model = load_checkpoint(ckpt)
        if stream_window:
            from cmdcl.artifacts import window_scales

            try:
                window_scales(stream_window, model.cfg.num_frames)
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint="--stream-window") from None

        def progress(text):  # marks the previous stage done
            bar.update()
            bar.set_postfix_str(text)

        with temporary_dir(out.parent, out.name) as staging:
            paths = export_onnx(model, staging / out.name, opset=opset, precision=precision, split=split, progress=progress)
            if verify:
                progress("verifying with ONNX Runtime")
                try:
                    checks, notes = verify_export(model, paths, precision, video=video)
                except VerificationError as exc:  # a failed export leaves no file the runtime could pick up
                    raise VerificationError(f"{exc} (nothing written; --no-verify writes the files anyway)") from None
            final = output_paths(out, split)
            for role, path in paths.items():
                move_into_place(path, final[role])
        paths = final
        for path in stale:
            path.unlink()
        if engine:
            progress(f"building TensorRT engine {engine.name}")
            engines = _build_engines(paths, engine, engine_precision, max_batch, timing_cache)
        bar.update()
        bar.set_postfix_str("done")
    for role, path in paths.items():
        click.echo(f"wrote {role:<13} {path}")
    for path in stale:
        click.echo(f"removed {path} (an older export's split graph; --no-split)")
    if verify:
        for line in [*map(str, checks), *notes]:
            click.echo(line)
    if engine:
        for path in engines:
            click.echo(f"wrote engine  {path}")


def _build_engines(paths, engine, precision, max_batch, timing_cache) -> list:
    """The model's engine, plus the split graphs' engines next to it when they were exported."""
    from cmdcl.export.tensorrt_build import EngineBuildError, build_engine, build_engines

    options = dict(precision=precision, max_batch=max_batch, timing_cache=timing_cache)
    try:
        if "head" in paths:
            return build_engines(paths["full"], engine, **options)
        return [build_engine(paths["full"], engine, **options)]
    except EngineBuildError as exc:
        raise CmdclError(f"--engine: {exc}") from None


def _write_triton_repo(model_onnx, repo, engine_format, engine, max_batch, windows) -> None:
    """The repository (cmdcl.serve.triton_repo), validated with Triton's config schema when tritonclient is here."""
    import importlib.util

    from cmdcl.serve.triton_repo import validate_triton_repo, write_triton_repo

    write_triton_repo(model_onnx, repo, engine_format, engine, max_batch=max_batch, max_frames=max_batch, windows=windows)
    if importlib.util.find_spec("tritonclient") is None:
        click.echo(f"wrote triton repository {repo} (configs not validated: tritonclient is not installed here; "
                   f"run .venv-serve/bin/python -m cmdcl.serve.triton_repo {repo})")
        return
    models = validate_triton_repo(repo)
    click.echo(f"wrote triton repository {repo} ({', '.join(sorted(models))}; configs parsed with Triton's schema)")


if __name__ == "__main__":
    main()
