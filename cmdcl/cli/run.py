"""`cmdcl-run`: classify videos, directories and live streams with a CMDCL model."""

from __future__ import annotations

import contextlib
import sys

import click

from ..errors import ExitCode
from ..runtime.backends import BACKENDS
from .errors import cli_errors, end_on_sigterm
from .options import BATCH, PROBABILITY, RETRIES, SECONDS, SECONDS_LIST, TOP_K, WORKERS, OutputPath


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("--engine", type=click.Path(dir_okay=False),
              help="Model file: .onnx (ONNX Runtime), .plan (TensorRT, with its .json sidecar) or .pt (PyTorch). "
                   "Default: the bundled demo model on ONNX Runtime CPU.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="auto picks by the engine's suffix; trt with an .onnx file uses ONNX Runtime's TensorRT provider.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--mode", type=click.Choice(["video", "stream"]), default="video", show_default=True,
              help="video: F frames over each whole file, one result per file. "
                   "stream: sliding windows on a fixed time grid, one result per window plus a summary.")
@click.option("--window", type=SECONDS_LIST, metavar="SECONDS[,SECONDS...]",
              help="Stream mode: window length in seconds (F grid frames), or several comma-separated (e.g. 8,32): one window "
                   "per length at each stride, on the grid of the shortest, each frame encoded once; records name their "
                   "\"scale\". Default: the model's.")
@click.option("--stride", type=SECONDS, help="Stream mode: seconds between windows. Default: the model's.")
@click.option("--top-k", type=TOP_K, default=5, show_default=True, help="Labels reported per result (single-label models).")
@click.option("--threshold", type=PROBABILITY,
              help="Report only labels scoring at least this; multi-label models report every label over it (default 0.5).")
@click.option("--output", "-o", type=OutputPath(), help="Write records here instead of stdout.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "json", "csv"]),
              help="Record format. Default: from --output's suffix, else jsonl.")
@click.option("--batch", type=BATCH, default=1, show_default=True, help="Video mode: videos per model call.")
@click.option("--workers", type=WORKERS,
              help="Video mode: processes decoding the next videos while the model runs; 1 decodes in the main process. "
                   "Default: one per usable CPU core.")
@click.option("--sampling", type=click.Choice(["keyframe", "exact"]),
              help="Video mode: keyframe (default) takes, in each of the F segments that holds one, the keyframe nearest its centre "
                   "and decodes only that frame (same top-1 as exact on 99.3% of the synthetic test split, 5.6-8.7x faster decoding "
                   "of the 720p bench videos); exact takes each segment's centre frame, as training does.")
@click.option("--decode", "grid_decode", type=click.Choice(["keyframes", "all"]),
              help="Stream mode: keyframes (default) decodes only keyframes while they come at least once per grid step, "
                   "each grid time taking the nearest one, and every frame otherwise; all always decodes every frame.")
@click.option("--plot", type=OutputPath(), help="Stream mode: save a PNG of label scores over time.")
@click.option("--overlay", type=OutputPath(), help="Write a copy of the (single) input video with its labels drawn on it.")
@click.option("--timeout", type=SECONDS, default=10.0, show_default=True,
              help="Seconds any network open or read may wait before it fails (or reconnects).")
@click.option("--reconnect-tries", type=RETRIES, default=5, show_default=True,
              help="Live streams: reconnects that bring no new frame, within 5 minutes, before giving up.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--debug", is_flag=True, help="Decoding statistics on stderr, and tracebacks for errors.")
def main(inputs, engine, backend, device, mode, window, stride, top_k, threshold, output, fmt, batch, workers, sampling, grid_decode, plot,
         overlay, timeout,
         reconnect_tries, quiet, debug):
    """Classify each INPUT (a video file, a directory of videos, or a stream
    URL/device such as rtsp://..., http://..., /dev/video0) and write one JSON
    record per result.

    No output may be an input, the model or another output (checked before
    anything is written); --output is written as OUTPUT.partial (tail it while
    the run goes) and renamed to OUTPUT when the run ends, also on Ctrl-C.

    Exit status: 0 when every input succeeded, 3 when any failed (each failure
    is one line on stderr and the run goes on), 1 when the model cannot be
    loaded or an output cannot be written, 2 for bad options, 130 on Ctrl-C
    (143 on SIGTERM, which also ends the run cleanly).
    """
    from ..artifacts import model_files
    from ..data.video import RUNTIME_SAMPLING, Reconnect
    from ..output_files import check_outputs
    from ..runtime.output import RecordWriter, partial_path
    from ..runtime.recognizer import Recognizer, expand_inputs

    end_on_sigterm()
    fmt = fmt or next((f for f in ("json", "csv") if output and output.lower().endswith("." + f)), "jsonl")
    outputs = [("--output", output), ("--output's temporary file", output and partial_path(output)), ("--plot", plot),
               ("--overlay", overlay)]
    writer, records, failed = None, [], 0

    def records_so_far():  # Ctrl-C is how a live stream ends: the records written until then are the output
        return f"; the records so far are in {output}" if output and writer is not None and writer.count else ""

    with cli_errors("cmdcl-run", debug, interrupted=records_so_far):  # from here on, Ctrl-C and SIGTERM end it as documented
        sources = expand_inputs(inputs)  # (a large directory takes a while)
        if not sources:
            raise click.UsageError("no video files found in the given directories")
        if overlay and len(sources) != 1:
            raise click.UsageError("--overlay takes exactly one input")
        if (window or stride or plot) and mode != "stream":
            raise click.UsageError("--window, --stride and --plot need --mode stream")
        if (workers or sampling) and mode != "video":
            raise click.UsageError("--workers and --sampling apply to --mode video (stream mode reads each source in its own reader)")
        if grid_decode and mode != "stream":
            raise click.UsageError("--decode applies to --mode stream")
        # before the model loads: a clash or an unwritable output is found at once
        # (without --engine, the demo model: in cmdcl's cache, where check_outputs lets no output go)
        check_outputs(outputs, [*(model_files(engine, "the --engine model") if engine else []),
                                *[("the input", source) for source in sources]])
        writer = RecordWriter(output, fmt)
        progress = _progress(len(sources), quiet)
        with writer, contextlib.closing(progress):
            try:
                recognizer = Recognizer(engine, backend, device, top_k=top_k, threshold=threshold, window=window, stride=stride,
                                        batch=batch, reconnect=Reconnect(tries=reconnect_tries), timeout=timeout, debug=debug,
                                        sampling=sampling or RUNTIME_SAMPLING, workers=workers, keyframe_grid=grid_decode != "all")
            except ValueError as exc:  # options the model cannot honour, e.g. a window too short for its F frames
                raise click.UsageError(str(exc)) from None
            if mode == "stream" and not quiet:
                progress.clear()
                click.echo(_stream_note(recognizer, window, stride), err=True)
            produced = recognizer.predict_many(sources) if mode == "video" else recognizer.stream_many(sources)
            with contextlib.closing(produced):  # also on Ctrl-C: video mode's decoding processes end here
                for record in produced:
                    record = writer.write(record)
                    if plot or overlay:  # kept only for them: a long stream's records are not held in memory
                        records.append(record)
                    if record.get("summary") and record.get("scale", recognizer.scales[-1]) == recognizer.scales[-1]:
                        progress.update(1)  # a source's last summary (stream mode: one per scale, the longest last)
                        failed += _report(record, mode, debug, progress)
    with cli_errors("cmdcl-run", debug, prefix="--plot/--overlay: ", expected=Exception,  # optional outputs: one line
                    interrupted=lambda: " while writing --plot/--overlay"):
        if plot:
            from ..runtime.output import plot_timeline

            plot_timeline(records, plot)
        if overlay and not failed:
            from ..runtime.output import write_overlay

            write_overlay(sources[0], records, overlay)
    sys.exit(ExitCode.INPUTS_FAILED if failed else ExitCode.OK)


def _stream_note(recognizer, window, stride) -> str:
    """The line that says which windows and stride stream mode uses, and why: the options, else the model's
    recorded sampling (from its training clips), else the defaults, since windows unlike the model's training
    clips change what it sees."""
    from ..artifacts import DEFAULT_STREAM_FPS, default_sampling

    info = recognizer.info
    if "source" in info.sampling:
        model = f"the model's training clips: {info.sampling['source']}"
    elif info.sampling and info.sampling != default_sampling(info.num_frames):
        model = "the model's recorded sampling"
    else:
        model = f"no sampling recorded in the model: {info.num_frames} frames at {DEFAULT_STREAM_FPS:g} frame/s"
    why = {(True, True): "--window, --stride", (True, False): f"--window; stride from {model}",
           (False, True): f"--stride; windows from {model}", (False, False): model}[bool(window), bool(stride)]
    windows = ", ".join(f"{scale:g}" for scale in recognizer.scales)
    return f"cmdcl-run: stream windows of {windows} s every {recognizer.stride_frames / recognizer.grid_rate:g} s ({why})"


def _report(record: dict, mode: str, debug: bool, progress) -> int:
    """One stderr line for a failed input (returns 1), or its decoding statistics with --debug."""
    if "error" in record:
        progress.clear()
        click.echo(f"cmdcl-run: {record['video']}: {record['error']}", err=True)
        return 1
    if debug and mode == "video":
        click.echo(f"cmdcl-run: {record['video']}: {record['strategy']} decoding, {record['frames_decoded']} frames "
                   f"decoded for {record['frames']} sampled ({record['frames_decoded'] / record['frames']:.2f} per sampled), "
                   f"{record['keyframes']} samples taken as keyframes", err=True)
    return 0


def _progress(total: int, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="input", file=sys.stderr, disable=quiet or not sys.stderr.isatty())


if __name__ == "__main__":
    main()
