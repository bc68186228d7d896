"""`cmdcl-run`: classify videos, directories and live streams with a CMDCL model."""

from __future__ import annotations

import sys

import click

from .errors import fail

EXIT_INPUT_FAILED = 3


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("--engine", type=click.Path(dir_okay=False), help="Model file: .onnx (ONNX Runtime), .plan (TensorRT, with its .json sidecar) or .pt (PyTorch). Default: the bundled demo model on ONNX Runtime CPU.")
@click.option("--backend", type=click.Choice(["auto", "ort", "trt", "torch"]), default="auto", show_default=True, help="auto picks by the engine's suffix; trt with an .onnx file uses ONNX Runtime's TensorRT provider.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--mode", type=click.Choice(["video", "stream"]), default="video", show_default=True, help="video: F frames over each whole file, one result per file. stream: sliding windows on a fixed time grid, one result per window plus a summary.")
@click.option("--window", type=click.FloatRange(min=0, min_open=True), help="Stream mode: window length in seconds (F grid frames). Default: the model's.")
@click.option("--stride", type=click.FloatRange(min=0, min_open=True), help="Stream mode: seconds between windows. Default: the model's.")
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True, help="Labels reported per result (single-label models).")
@click.option("--threshold", type=click.FloatRange(0, 1), help="Report only labels scoring at least this; multi-label models report every label over it (default 0.5).")
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Write records here instead of stdout.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "json", "csv"]), help="Record format. Default: from --output's suffix, else jsonl.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Video mode: videos per model call.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Stream mode: save a PNG of label scores over time.")
@click.option("--overlay", type=click.Path(dir_okay=False), help="Write a copy of the (single) input video with its labels drawn on it.")
@click.option("--reconnect-tries", type=click.IntRange(min=0), default=5, show_default=True, help="Live streams: consecutive reconnect attempts before giving up.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--debug", is_flag=True, help="Decoding statistics on stderr, and tracebacks for errors.")
def main(inputs, engine, backend, device, mode, window, stride, top_k, threshold, output, fmt, batch, plot, overlay, reconnect_tries, quiet, debug):
    """Classify each INPUT (a video file, a directory of videos, or a stream
    URL/device such as rtsp://..., http://..., /dev/video0) and write one JSON
    record per result.

    Exit status: 0 when every input succeeded, 3 when any failed (each failure
    is one line on stderr and the run goes on), 2 for bad options or a model
    that cannot be loaded.
    """
    from ..data.video import Reconnect
    from ..runtime.backends import BackendError
    from ..runtime.output import RecordWriter
    from ..runtime.recognizer import Recognizer, expand_inputs

    fmt = fmt or next((f for f in ("json", "csv") if output and output.lower().endswith("." + f)), "jsonl")
    sources = expand_inputs(inputs)
    if not sources:
        raise click.UsageError("no video files found in the given directories")
    if overlay and len(sources) != 1:
        raise click.UsageError("--overlay takes exactly one input")
    if (window or stride or plot) and mode != "stream":
        raise click.UsageError("--window, --stride and --plot need --mode stream")
    try:
        recognizer = Recognizer(engine, backend, device, top_k=top_k, threshold=threshold, window=window, stride=stride,
                                batch=batch, reconnect=Reconnect(tries=reconnect_tries))
    except BackendError as exc:
        fail("cmdcl-run", f"model: {exc}", 2, debug, exc, label=None)
    records, failed = [], 0
    progress = _progress(len(sources), quiet)
    with RecordWriter(output, fmt) as writer:
        produced = recognizer.predict_many(sources) if mode == "video" else recognizer.stream_many(sources)
        try:
            for record in produced:
                writer.write(record)
                if plot or overlay:  # kept only for them: a long stream's records are not held in memory
                    records.append(record)
                if record.get("summary"):
                    progress.update(1)
                    failed += _report(record, mode, debug, progress)
        except BackendError as exc:  # e.g. stream mode with a model exported without its split graphs
            progress.close()
            fail("cmdcl-run", f"model: {exc}", 2, debug, exc, label=None)
    progress.close()
    try:
        if plot:
            from ..runtime.output import plot_timeline

            plot_timeline(records, plot)
        if overlay and not failed:
            from ..runtime.output import write_overlay

            write_overlay(sources[0], records, overlay)
    except Exception as exc:  # noqa: BLE001 - optional outputs: one line, not a traceback
        fail("cmdcl-run", f"--plot/--overlay: {exc}", 1, debug, exc, label=None)
    sys.exit(EXIT_INPUT_FAILED if failed else 0)


def _report(record: dict, mode: str, debug: bool, progress) -> int:
    """One stderr line for a failed input (returns 1), or its decoding statistics with --debug."""
    if "error" in record:
        progress.clear()
        click.echo(f"cmdcl-run: {record['video']}: {record['error']}", err=True)
        return 1
    if debug and mode == "video":
        click.echo(f"cmdcl-run: {record['video']}: {record['strategy']} decoding, {record['frames_decoded']} frames "
                   f"decoded for {record['frames']} sampled ({record['frames_decoded'] / record['frames']:.2f} per sampled)", err=True)
    return 0


def _progress(total: int, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="input", file=sys.stderr, disable=quiet or not sys.stderr.isatty())


if __name__ == "__main__":
    main()
