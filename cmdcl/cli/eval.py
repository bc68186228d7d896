"""`cmdcl-eval`: accuracy / mAP of a checkpoint on a manifest or dataset folder, in video or stream mode."""

from __future__ import annotations

import click

from .errors import WITH_DATA_ERRORS, cli_errors
from .options import BATCH, DEVICE, SECONDS_LIST, WORKERS, OutputPath, joined


@click.command(context_settings={"show_default": True})
@click.option("--ckpt", required=True, type=click.Path(dir_okay=False),
              help="CMDCL checkpoint (cmdcl-train's output); with --mode stream also an exported .onnx or .plan model.")
@click.option("--mode", default="video", type=click.Choice(["video", "stream"]),
              help="video: one clip per video; stream: cmdcl-run's sliding windows, scored per window and per summary.")
@click.option("--window", "windows", multiple=True, type=SECONDS_LIST, callback=joined,
              help="Stream mode: window seconds; repeat or comma-separate to compare several. Default: the model's.")
@click.option("--stride", "strides", multiple=True, type=SECONDS_LIST, callback=joined,
              help="Stream mode: seconds between windows, one per --window, one for all, or none (the model's default).")
@click.option("--data", required=True, help="A CSV manifest, or a Breakfast/COIN/Charades folder.")
@click.option("--split", default="test", type=click.Choice(["train", "test"]), help="Split of a dataset folder.")
@click.option("--target", default="label", type=click.Choice(["label", "segments"]),
              help="Labels from the manifest's label column or its segments.")
@click.option("--json", "json_path", type=OutputPath(dir_okay=False), help="Also write the metrics (with the per-class table) as JSON.")
@click.option("--batch-size", default=16, type=BATCH)
@click.option("--cache-dir", type=OutputPath(file_okay=False), help="Cache decoded clips here.")
@click.option("--device", default="auto", type=DEVICE, help="auto, cpu, cuda or cuda:N.")
@click.option("--sampling", default="exact", type=click.Choice(["exact", "keyframe"]),
              help="exact: each segment's centre frame (as in training); keyframe: each segment's keyframe where it has one (faster).")
@click.option("--workers", type=WORKERS,
              help="Processes decoding videos at once; 1 decodes in the main process. Default: one per usable CPU core.")
@click.option("--interventions", is_flag=True,
              help="Video mode: also report whether the causal interventions do anything (attention spread, logit changes "
                   "when a dictionary is shuffled or replaced, a probe of the confounder attention).")
@click.option("--probe-labels", type=click.Path(dir_okay=False),
              help="With --interventions: CSV 'video,label' (videos as in the manifest, relative to this file's folder), "
                   "a label per video for the probe, e.g. cmdcl-synth's backgrounds.csv.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(ckpt, mode, windows, strides, data, split, target, json_path, batch_size, cache_dir, device, sampling, workers,
         interventions, probe_labels, debug):
    """Evaluate a checkpoint: top-1/top-5 accuracy (single-label) or mAP
    (multi-label), with a per-class table. Labels must be among the
    checkpoint's classes. Videos that cannot be read are left out, each with
    a warning line, and listed under "skipped" in the JSON.

    --mode stream runs cmdcl-run's stream path for each --window/--stride and
    reports window top-1 (each window against its video's label), the
    summary's top-1 and how often the summary agrees with video mode; with
    --target segments (a model whose classes are the segment labels, e.g.
    atomic actions), mAP of each window against the segments it overlaps.

    --interventions (video mode) adds the intervention diagnostics
    (cmdcl.train.diagnostics) to the table and the JSON ("interventions")."""
    from cmdcl.train.stream_eval import parse_configs

    if mode == "stream":
        if cache_dir:
            raise click.UsageError("--cache-dir is for --mode video (stream mode decodes each grid frame as it goes)")
        try:
            configs = parse_configs(windows, strides)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
    elif windows or strides:
        raise click.UsageError("--window and --stride need --mode stream")
    if interventions and mode == "stream":
        raise click.UsageError("--interventions is for --mode video")
    if probe_labels and not interventions:
        raise click.UsageError("--probe-labels needs --interventions")
    # ValueError: the data checks of cmdcl.train (classes that differ from the model's, no video readable, ...)
    with cli_errors("cmdcl-eval", debug, expected=WITH_DATA_ERRORS):
        from cmdcl.artifacts import model_files
        from cmdcl.data.datasets import load_dataset
        from cmdcl.output_files import check_outputs, write_json
        from cmdcl.runtime.decode_pool import default_workers
        from cmdcl.train.loop import pick_device

        check_outputs([("--json", json_path)], [*model_files(ckpt, "--ckpt"), ("--data", data), ("--probe-labels", probe_labels),
                                                ("--cache-dir", cache_dir)])
        if mode == "stream":
            from cmdcl.runtime import Recognizer, load_backend
            from cmdcl.train.stream_eval import evaluate_stream

            backend = load_backend(ckpt, "auto", pick_device(device).type)
            classes = backend.info.classes
        else:
            from cmdcl.model import load_checkpoint
            from cmdcl.train.loop import evaluate

            model = load_checkpoint(ckpt)
            classes = model.class_names
        dataset = load_dataset(data, split, classes, target)
        check_outputs([("--json", json_path)], [("a video of --data", e.path) for e in dataset.entries])
        if probe_labels:  # before the (long) evaluation, so that a bad file fails at once
            from cmdcl.train.diagnostics import read_probe_labels

            probe_labels = read_probe_labels(probe_labels, dataset.entries)
        workers = workers or default_workers()
        if mode == "stream":
            def recognizer(window, stride):  # every class in each record; the grid decoded as --sampling says
                try:
                    return Recognizer(backend, top_k=len(classes), threshold=0.0, window=window, stride=stride, batch=batch_size,
                                      sampling=sampling, workers=workers, keyframe_grid=sampling == "keyframe")
                except ValueError as exc:  # a window or stride the model cannot take, e.g. too short for its frames
                    raise click.UsageError(str(exc)) from None

            report = evaluate_stream(recognizer, dataset, configs, target)
        else:
            if interventions:
                report = _with_interventions(model, dataset, probe_labels, cache_dir, batch_size, pick_device(device), sampling,
                                             workers)
            else:
                report = evaluate(model, dataset, cache_dir, batch_size, pick_device(device), progress=True, sampling=sampling,
                                  workers=workers)
        report["checkpoint"], report["data"], report["sampling"] = str(ckpt), dataset.source, sampling
        if json_path:
            write_json(json_path, report)  # a metric with nothing to measure: null
    _print_report(report, mode, len(dataset.entries))


def _with_interventions(model, dataset, labels, cache_dir, batch_size, device, sampling, workers) -> dict:
    """evaluate()'s report plus cmdcl.train.diagnostics under "interventions", on the same clips, decoded once;
    `labels`: one per video or None (those of videos that could not be read are dropped with them)."""
    from cmdcl.train.diagnostics import intervention_diagnostics
    from cmdcl.train.loop import decode_clips, evaluate_clips

    skipped: dict[int, str] = {}  # the dataset was loaded with the model's classes (above)
    clips = decode_clips(dataset, model.cfg.num_frames, model.cfg.vision.image_size, cache_dir, True, skipped, sampling, workers)
    report = evaluate_clips(model, dataset, clips, skipped, batch_size, device, progress=True)
    if labels is not None:
        labels = [label for i, label in enumerate(labels) if i not in skipped]
    report["interventions"] = intervention_diagnostics(model, clips, labels, batch_size=batch_size)
    return report


def _print_report(report: dict, mode: str, videos: int) -> None:
    """The table on stdout; the videos left out on stderr."""
    from cmdcl.train.metrics import format_report
    from cmdcl.train.stream_eval import format_stream_report

    if mode == "stream":
        click.echo(format_stream_report(report))
        for skipped in report["skipped"]:
            click.echo(f"warning: {skipped['video']}: {skipped['error']} (left out)", err=True)
    else:
        click.echo(format_report(report))
        if "interventions" in report:
            from cmdcl.train.diagnostics import format_diagnostics

            click.echo(format_diagnostics(report["interventions"]))
        if report["skipped"]:
            click.echo(f"warning: {len(report['skipped'])} of {videos} videos could not be read and are not in these metrics", err=True)


if __name__ == "__main__":
    main()
