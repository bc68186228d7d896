"""`cmdcl-synth`: write the procedural benchmark (cmdcl.data.synth)."""

from __future__ import annotations

import click

from .errors import clean_errors


@click.command(context_settings={"show_default": True})
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the MP4s, manifest.csv, classes.txt and actions.txt.")
@click.option("--videos", default=140, type=click.IntRange(min=1), help="Number of videos (activities balanced).")
@click.option("--seed", default=0, type=int)
@click.option("--split", default="train", type=click.Choice(["train", "test", "ood"]), help="ood: background independent of the activity.")
@click.option("--size", default=96, type=click.IntRange(min=16), help="Frame size in pixels (even).")
@click.option("--fps", default=10, type=click.IntRange(min=1))
@click.option("--home-bias", default=0.8, type=click.FloatRange(0, 1), help="P(the activity's own background) in train/test.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(out, videos, seed, split, size, fps, home_bias, debug):
    """Generate long activities made of shared atomic actions, with a
    background confounder that correlates with the activity except in ood."""
    from cmdcl.data.synth import SynthConfig, generate

    with clean_errors(debug):
        manifest = generate(out, videos, seed, split, SynthConfig(size=size, fps=fps, home_bias=home_bias), progress=True)
    click.echo(f"wrote {videos} videos and {manifest}")


if __name__ == "__main__":
    main()
