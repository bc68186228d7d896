"""`cmdcl-mini-vlm`: pretrain a mini vision-language model on the synthetic world (cmdcl.train.mini_vlm)."""

from __future__ import annotations

import click

from .errors import cli_errors
from .options import EPOCHS, LEARNING_RATE, SEED, OutputPath

MAX_PAIRS = 200_000  # 96 x 96 RGB frames kept in memory: at most 5.5 GB of corpus


@click.command(context_settings={"show_default": True})
@click.option("--out", required=True, type=OutputPath(dir_okay=False),
              help="CLIP weights file to write (for cmdcl-train --clip-weights).")
@click.option("--seed", default=0, type=SEED, help="Seeds the corpus (its own RNG streams, never a cmdcl-synth split's) and the model.")
@click.option("--pairs", default=10_000, type=click.IntRange(min=2, max=MAX_PAIRS),
              help="Captioned frames to pretrain on (held in memory: 27 KB each).")
@click.option("--heldout", default=1_000, type=click.IntRange(min=2, max=MAX_PAIRS),
              help="Held-out captioned frames for the retrieval report.")
@click.option("--epochs", default=8, type=EPOCHS)
@click.option("--batch-size", default=128, type=click.IntRange(min=2, max=MAX_PAIRS))
@click.option("--lr", default=1e-3, type=LEARNING_RATE)
@click.option("--json", "json_path", type=OutputPath(dir_okay=False), help="Also write the report (timings, losses, retrieval) here.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(out, seed, pairs, heldout, epochs, batch_size, lr, json_path, debug):
    """Render a captioned image corpus with cmdcl-synth's renderer, pretrain the tiny image tower against MiniLM
    caption embeddings with CLIP's loss, save it as CLIP weights, and report zero-shot retrieval on held-out frames."""
    from cmdcl.output_files import check_outputs, write_json
    from cmdcl.train.mini_vlm import ATTRIBUTES, run

    with cli_errors("cmdcl-mini-vlm", debug):
        check_outputs([("--out", out), ("--json", json_path)])
        report = run(out, seed, pairs, heldout, epochs, batch_size, lr, progress=True)
        if json_path:
            write_json(json_path, report)
    r = report["heldout_retrieval"]
    click.echo(f"wrote {out} (pretraining {report['pretrain_seconds']:.0f} s, final loss {report['losses'][-1]:.3f})")
    click.echo(f"held-out retrieval, top-1 (chance): image->caption {r['image_to_caption_top1']:.3f} ({r['image_to_caption_chance']:.3f}), "
               f"caption->image {r['caption_to_image_top1']:.3f} ({r['caption_to_image_chance']:.3f})")
    click.echo("  per attribute: " + ", ".join(f"{a} {r[f'{a}_top1']:.3f} ({r[f'{a}_chance']:.3f})" for a in ATTRIBUTES))


if __name__ == "__main__":
    main()
