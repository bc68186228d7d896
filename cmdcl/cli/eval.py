"""`cmdcl-eval`: accuracy / mAP of a checkpoint on a manifest or dataset folder."""

from __future__ import annotations

import json

import click

from .errors import EXPECTED, cli_errors


@click.command(context_settings={"show_default": True})
@click.option("--ckpt", required=True, type=click.Path(dir_okay=False), help="CMDCL checkpoint (cmdcl-train's output).")
@click.option("--data", required=True, help="A CSV manifest, or a Breakfast/COIN/Charades folder.")
@click.option("--split", default="test", type=click.Choice(["train", "test"]), help="Split of a dataset folder.")
@click.option("--target", default="label", type=click.Choice(["label", "segments"]),
              help="Labels from the manifest's label column or its segments.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the metrics (with the per-class table) as JSON.")
@click.option("--batch-size", default=16, type=click.IntRange(min=1))
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Cache decoded clips here.")
@click.option("--device", default="auto", help="auto, cpu, cuda, ...")
@click.option("--sampling", default="exact", type=click.Choice(["exact", "keyframe"]),
              help="exact: each segment's centre frame (as in training); keyframe: each segment's keyframe where it has one (faster).")
@click.option("--workers", type=click.IntRange(min=1),
              help="Processes decoding videos at once; 1 decodes in the main process. Default: one per usable CPU core.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(ckpt, data, split, target, json_path, batch_size, cache_dir, device, sampling, workers, debug):
    """Evaluate a checkpoint: top-1/top-5 accuracy (single-label) or mAP
    (multi-label), with a per-class table. Labels must be among the
    checkpoint's classes. Videos that cannot be read are left out, each with
    a warning line, and listed under "skipped" in the JSON."""
    from cmdcl.data.datasets import load_dataset
    from cmdcl.model import load_checkpoint
    from cmdcl.output_files import atomic_write, check_outputs
    from cmdcl.runtime.decode_pool import usable_cores
    from cmdcl.train.loop import evaluate, pick_device
    from cmdcl.train.metrics import format_report

    # ValueError: the data checks of cmdcl.train (classes that differ from the model's, no video readable, ...)
    with cli_errors("cmdcl-eval", debug, expected=(*EXPECTED, ValueError)):
        check_outputs([("--json", json_path)], [("--ckpt", ckpt), ("--data", data)])
        model = load_checkpoint(ckpt)
        dataset = load_dataset(data, split, model.class_names, target)
        check_outputs([("--json", json_path)], [("a video of --data", e.path) for e in dataset.entries])
        report = evaluate(model, dataset, cache_dir, batch_size, pick_device(device), progress=True, sampling=sampling,
                          workers=workers or usable_cores())
        report["checkpoint"], report["data"], report["sampling"] = str(ckpt), dataset.source, sampling
        if json_path:
            with atomic_write(json_path) as tmp, open(tmp, "w") as f:
                json.dump(report, f, indent=2)
    click.echo(format_report(report))
    if report["skipped"]:
        click.echo(f"warning: {len(report['skipped'])} of {len(dataset.entries)} videos could not be read and are not in these metrics",
                   err=True)


if __name__ == "__main__":
    main()
