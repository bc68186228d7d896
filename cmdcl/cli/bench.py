"""`cmdcl-bench`: latency, throughput and memory of every runtime stage, per backend."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from ..artifacts import SAMPLING_LIMITS
from ..bench.stages import STAGES
from ..bench.variants import BACKENDS
from ..bench.videos import MAX_VIDEO_SECONDS
from ..errors import ExitCode
from .errors import EXPECTED, cli_errors
from .options import BATCH, CLASSES, FRAMES, THREADS, WORKERS, CommaList, FiniteFloat, OutputPath


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--engine", "engines", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Model file to measure (.onnx, .plan, .pt); repeat for several. Default: random-weight models of --preset.")
@click.option("--backend", "backends", multiple=True, type=click.Choice(["auto", *BACKENDS]),
              help="Backend(s) to measure; repeatable. Default on CPU: torch, ort. On a GPU also torch-fp16, torch-bf16, "
                   "torch-compile, torch-fp16-triton (fused Triton intervention) and trt. With --engine: how to run the files "
                   "(auto: by suffix).")
@click.option("--preset", type=click.Choice(["tiny", "base"]), default="tiny", show_default=True,
              help="Model size when no --engine is given (base: CLIP ViT-B/16, 224 px, 64 frames).")
@click.option("--batch", "batches", default="1", show_default=True, type=CommaList(BATCH, "batch sizes like 1,8,32"),
              help="Batch sizes (clips or streams), comma-separated, e.g. 1,8,32.")
@click.option("--frames", type=FRAMES, help="Frames per clip F for the generated model (default: the preset's).")
@click.option("--classes", type=CLASSES, default=200, show_default=True, help="Classes of the generated model.")
@click.option("--iters", type=click.IntRange(1, 10_000), default=10, show_default=True, help="Timed calls per stage.")
@click.option("--warmup", type=click.IntRange(0, 1000), default=2, show_default=True,
              help="Untimed calls first (compiled variants take at least 3).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto: cuda when PyTorch sees a GPU.")
@click.option("--threads", type=THREADS, help="CPU threads for PyTorch and ONNX Runtime alike (default: PyTorch's default).")
@click.option("--stages", default=",".join(STAGES), type=CommaList(click.Choice(STAGES), "stages like head,clip"),
              help=f"Comma-separated subset of: {', '.join(STAGES)}.")
@click.option("--video", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Video for the decode, end-to-end and stream stages. Default: a generated 720p H.264 test pattern (cached).")
@click.option("--long-video", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Long video for seek vs sequential decoding. Default: a generated 720p H.264 with a keyframe every 10 s.")
@click.option("--long-minutes", type=FiniteFloat(0.01, MAX_VIDEO_SECONDS / 60), default=10.0, show_default=True,
              help="Length of the generated long video.")
@click.option("--sampling", type=click.Choice(["exact", "keyframe"]), default="exact", show_default=True,
              help="read_clip's sampling in decode_video and end_to_end (decode_per_sample measures both).")
@click.option("--workers", type=WORKERS,
              help="end_to_end_workers: decoding processes N measured against 1 (default: one per usable CPU core).")
@click.option("--stride-frames", type=click.IntRange(1, SAMPLING_LIMITS["stride_frames"][1]),
              help="Stream mode: new grid frames per window update (default: the model's, F/2).")
@click.option("--cuda-graphs", is_flag=True,
              help="On a GPU, also measure PyTorch fp16 with CUDA graphs (torch.compile mode reduce-overhead).")
@click.option("--json", "json_path", type=OutputPath(dir_okay=False, path_type=Path),
              help="Write the records and the machine as JSON here.")
@click.option("--plot", type=OutputPath(dir_okay=False, path_type=Path), help="Save a PNG of latency per stage and backend.")
@click.option("--markdown", type=OutputPath(dir_okay=False, path_type=Path),
              help="Write the tables as Markdown (for benchmarks/RESULTS.md).")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines on stderr.")
@click.option("--debug", is_flag=True, help="Tracebacks instead of one-line errors; a failing stage stops the run.")
def main(engines, backends, preset, batches, frames, classes, iters, warmup, device, threads, stages, video, long_video,
         long_minutes, sampling, workers, stride_frames, cuda_graphs, json_path, plot, markdown, quiet, debug):
    """Measure CMDCL inference stage by stage: decoding (video and stream
    mode), preprocessing, frame encoder, head, the intervention op alone, the
    whole clip, decode + classify end to end, and a stream window update,
    with p50/p90/p99 latency, throughput (clips/s, video-seconds per second)
    and peak memory. Prints a table and the ratios between backends (ONNX
    Runtime vs PyTorch at the same thread count; on a GPU fp16/bf16,
    torch.compile, the fused Triton intervention and TensorRT vs PyTorch
    eager fp32), the token-cache stream update vs re-running the clip,
    seek-based vs sequential sampling of a long video, and keyframe vs exact
    sampling (time and frames decoded per sampled frame).

    Without --engine the models are random-weight models of --preset: latency
    does not depend on the weights. GPU timings use CUDA events after warm-up;
    GPU-only backends are skipped, with the reason, when no GPU is visible.
    """
    from ..artifacts import model_files
    from ..bench import report as output
    from ..bench.runner import Bench, BenchSettings
    from ..output_files import atomic_write, check_outputs, write_json

    if engines and frames:
        raise click.UsageError("--frames applies to the generated models; an --engine's frame count is fixed")
    with cli_errors("cmdcl-bench", debug):  # fail before an hour of measuring, not after
        check_outputs([("--json", json_path), ("--plot", plot), ("--markdown", markdown)],
                      [*[file for path in engines for file in model_files(path, "the --engine model")], ("--video", video),
                       ("--long-video", long_video)])
    settings = BenchSettings(preset=preset, engines=tuple(engines), backends=tuple(b for b in backends if b != "auto"),
                             batches=tuple(dict.fromkeys(batches)), frames=frames,
                             classes=classes, iters=iters, warmup=warmup, device=device, threads=threads, stages=stages,
                             video=video, long_video=long_video, long_minutes=long_minutes, stride_frames=stride_frames, sampling=sampling,
                             workers=workers, cuda_graphs=cuda_graphs)
    from tqdm import tqdm

    bar = tqdm(unit="stage", file=sys.stderr, disable=quiet or not sys.stderr.isatty())

    def progress(message):  # a bar on a terminal, one line per stage in a log
        if bar.disable:
            log(message)
        else:
            bar.set_postfix_str(message, refresh=False)
            bar.update(1)

    def log(message):
        if not quiet:
            bar.write(message, file=sys.stderr)

    with cli_errors("cmdcl-bench", debug, expected=(*EXPECTED, ValueError, RuntimeError)), bar:  # the libraries' own errors: one line
        report = Bench(settings, progress=progress, log=log, debug=debug).run()
    report["command"] = _command_line(click.get_current_context())
    click.echo(output.text_report(report))
    # e.g. a full disk: the report above is on stdout all the same
    with cli_errors("cmdcl-bench", debug, prefix="cannot write the results: "):
        if json_path:
            write_json(json_path, report)
            click.echo(f"wrote {json_path}", err=True)
        if plot:
            with atomic_write(plot) as tmp:
                output.plot_latency(report, tmp)
            click.echo(f"wrote {plot}", err=True)
        if markdown:
            with atomic_write(markdown) as tmp:
                tmp.write_text(output.markdown(report))
            click.echo(f"wrote {markdown}", err=True)
    if report["interrupted"]:
        click.echo("cmdcl-bench: interrupted", err=True)
        sys.exit(ExitCode.INTERRUPTED)


def _command_line(ctx) -> str:
    """The options that differ from their defaults, as a command to rerun (recorded with the figures)."""
    words = ["cmdcl-bench"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        default = param.get_default(ctx)
        if isinstance(value, tuple) and isinstance(default, str):  # --batch, --stages: parsed from a comma list
            default = param.process_value(ctx, default)
        if value in (None, False, ()) or value == default:
            continue
        flag = param.opts[0]
        if param.is_flag:
            words.append(flag)
        elif param.multiple:
            for item in value:
                words += [flag, str(item)]
        else:
            words += [flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return shlex.join(words)


if __name__ == "__main__":
    main()
