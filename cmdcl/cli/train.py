"""`cmdcl-train`: train a CMDCL on a manifest or dataset folder (cmdcl.train.loop)."""

from __future__ import annotations

import shlex
import sys

import click

from .errors import WITH_DATA_ERRORS, cli_errors
from .options import BATCH, DEVICE, EPOCHS, FRAMES, IMAGE_SIZE, LEARNING_RATE, MAX_EPOCHS, SEED, FiniteFloat, OutputPath


def _model_options(ctx, param, values) -> dict:
    """FIELD=VALUE pairs -> {field: value}; VALUE is read as JSON (true, 0.5) when it parses, else kept as text.
    Fields and values are checked with the rest of the model config."""
    import json

    options = {}
    for item in values:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"{item!r} is not FIELD=VALUE", ctx, param)
        try:
            options[name.strip()] = json.loads(text)
        except ValueError:
            options[name.strip()] = text
    return options


@click.command(context_settings={"show_default": True})
@click.option("--data", required=True, help="Training data: a CSV manifest, or a Breakfast/COIN/Charades folder (train split).")
@click.option("--out", required=True, type=OutputPath(dir_okay=False), help="Checkpoint to write (OUT.resume holds the resume state).")
@click.option("--preset", "preset_name", default="tiny", type=click.Choice(["tiny", "base"]), help="Model size.")
@click.option("--epochs", default=10, type=EPOCHS)
@click.option("--batch-size", default=8, type=BATCH, help="Global batch (split across torchrun processes).")
@click.option("--frames", type=FRAMES, help="Frames per video F [default: the preset's].")
@click.option("--image-size", type=IMAGE_SIZE, help="Frame size in pixels [default: the preset's / the CLIP weights'].")
@click.option("--lr", default=5e-4, type=LEARNING_RATE, help="Peak learning rate (AdamW).")
@click.option("--encoder-lr-scale", default=0.1, type=FiniteFloat(0, 10), help="Video encoder learning rate = lr x this (0: frozen).")
@click.option("--weight-decay", default=0.05, type=FiniteFloat(0, 1))
@click.option("--warmup-epochs", default=1.0, type=FiniteFloat(0, MAX_EPOCHS), help="Linear warm-up before the cosine decay.")
@click.option("--seed", default=0, type=SEED, help="Seeds everything: CPU runs are bitwise repeatable.")
@click.option("--ablation", default="none", type=click.Choice(["none", "no-textual", "no-visual", "no-both"]),
              help="Switch off the textual and/or visual intervention.")
@click.option("--model-option", "model_options", multiple=True, metavar="FIELD=VALUE", callback=_model_options,
              help="Set a model config field, repeatable; the intervention variants: approximator=residual|catt, "
                   "key_norm=none|centre|whiten, learn_temperature=true, fixed_key_proj=true (docs/design.md 2.10).")
@click.option("--clip-weights", type=click.Path(exists=True, dir_okay=False),
              help="Local CLIP weights (OpenAI or open_clip file): the frozen VLM and the video encoder's init.")
@click.option("--text-init", default="auto", type=click.Choice(["auto", "clip", "minilm", "random"]),
              help="How label texts T start (see README).")
@click.option("--classes", type=click.Path(exists=True, dir_okay=False),
              help="Class list, one name per line [default: classes.txt beside the manifest, else the labels found].")
@click.option("--target", default="label", type=click.Choice(["label", "segments"]),
              help="'segments': multi-label atomic actions from the manifest's segments.")
@click.option("--candidates", default=2, type=click.IntRange(0, 64),
              help="Frames decoded once per segment; training picks one at random each epoch. "
                   "0: decode every epoch at random times (exact, slower).")
@click.option("--cache-dir", type=OutputPath(file_okay=False), help="Cache decoded clips and VLM features here.")
@click.option("--resume", is_flag=True, help="Continue from OUT.resume if it exists (same options).")
@click.option("--device", default="auto", type=DEVICE, help="auto, cpu, cuda or cuda:N.")
@click.option("--val", "val_data", help="Manifest evaluated after training; its metrics go into the checkpoint.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(preset_name, val_data, debug, **options):
    """Train CMDCL and write a checkpoint with class names and dictionaries.

    Multi-GPU (or multi-process CPU): torchrun --nproc_per_node N $(which cmdcl-train) ...
    Ctrl-C exits with status 130; OUT and OUT.resume keep the last completed epoch.
    """
    from cmdcl.output_files import check_outputs
    from cmdcl.train.loop import TrainOptions, train

    def kept():  # checkpoints are renamed into place whole: the last completed epoch is intact
        return f"; {options['out']} and its .resume file keep the last completed epoch, if any (continue with --resume)"

    # ValueError: the option and data checks of cmdcl.train (a batch larger than the data, a missing --clip-weights, ...)
    with cli_errors("cmdcl-train", debug, expected=WITH_DATA_ERRORS, interrupted=kept):
        out = options["out"]  # before anything loads: the checkpoint and its resume state overwrite no input
        check_outputs([("--out", out), ("--out's resume state", out + ".resume")],
                      [("--data", options["data"]), ("--val", val_data), ("--classes", options["classes"]),
                       ("--clip-weights", options["clip_weights"]), ("--cache-dir", options["cache_dir"])])
        opts = TrainOptions(preset=preset_name, val=val_data, **options)
        command = shlex.join(["cmdcl-train", *sys.argv[1:]])
        model = train(opts, command=command)
    extra = model.checkpoint_extra
    if extra["history"]:
        last = extra["history"][-1]
        click.echo(f"epoch {last['epoch']}: loss {last['loss']:.4f}, train accuracy {last['accuracy']:.3f}")
    if "sampling" in extra:
        sampling = extra["sampling"]
        click.echo(f"stream mode: windows of {sampling['num_frames']} frames in {sampling['window_seconds']:g} s "
                   f"({sampling['source']}), recorded in {opts.out}")
    if "val" in extra["metrics"]:
        from cmdcl.train.metrics import format_report

        click.echo(format_report(extra["metrics"]["val"]))
    click.echo(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
