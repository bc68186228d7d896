"""`cmdcl-synth`: write the procedural benchmark (cmdcl.data.synth)."""

from __future__ import annotations

from pathlib import Path

import click

from .errors import WITH_DATA_ERRORS, cli_errors
from .options import PROBABILITY, SEED, OutputPath

# One video's frames are held in memory while it is written: up to 8.8 s at 60 frame/s of 512 px is 0.4 GB.
MAX_SIZE, MAX_FPS = 512, 60


@click.command(context_settings={"show_default": True})
@click.option("--out", required=True, type=OutputPath(file_okay=False),
              help="Folder for the MP4s, manifest.csv, classes.txt, actions.txt and backgrounds.csv.")
@click.option("--videos", default=140, type=click.IntRange(1, 99_999),  # named SPLIT_00000.mp4 on: five digits
              help="Number of videos (activities balanced).")
@click.option("--seed", default=0, type=SEED)
@click.option("--split", default="train", type=click.Choice(["train", "test", "ood"]), help="ood: background independent of the activity.")
@click.option("--size", default=96, type=click.IntRange(16, MAX_SIZE), help="Frame size in pixels (even).")
@click.option("--fps", default=10, type=click.IntRange(1, MAX_FPS))
@click.option("--home-bias", default=0.8, type=PROBABILITY, help="P(the activity's own background) in train/test.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(out, videos, seed, split, size, fps, home_bias, debug):
    """Generate long activities made of shared atomic actions, with a
    background confounder that correlates with the activity except in ood."""
    from cmdcl.data.synth import SynthConfig, generate

    with cli_errors("cmdcl-synth", debug, expected=WITH_DATA_ERRORS):  # ValueError: what cmdcl.data.synth refuses (an odd size)
        _check_out(Path(out), split, videos)
        manifest = generate(out, videos, seed, split, SynthConfig(size=size, fps=fps, home_bias=home_bias), progress=True)
    click.echo(f"wrote {videos} videos and {manifest}")


def _check_out(out: Path, split: str, videos: int) -> None:
    """The files it writes may replace only an earlier cmdcl-synth output (its actions.txt lists our
    atomic actions), never someone else's manifest, class list or videos."""
    from cmdcl.data.synth import ATOMIC_ACTIONS
    from cmdcl.output_files import OutputError

    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out}: is a file, not a folder")
    names = ["manifest.csv", "classes.txt", "actions.txt", "backgrounds.csv", *[f"{split}_{i:05d}.mp4" for i in range(videos)]]
    clashes = [name for name in names if (out / name).exists() or (out / name).is_symlink()]
    links = [name for name in clashes if (out / name).is_symlink()]  # writing through a link would change its target
    try:
        ours = not links and (out / "actions.txt").read_text().splitlines() == list(ATOMIC_ACTIONS)
    except (OSError, UnicodeDecodeError):
        ours = False
    if clashes and not ours:
        raise OutputError(f"--out {out}: holds {(links or clashes)[0]}, which is not from cmdcl-synth; refusing to "
                          f"overwrite it (use a new or empty folder)")


if __name__ == "__main__":
    main()
