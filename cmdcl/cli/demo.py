"""`cmdcl-demo`: run a random-weight tiny CMDCL on a generated clip.

A smoke run of the PyTorch model until the streaming runtime (`cmdcl-run`)
and the bundled demo model exist.
"""

from __future__ import annotations

import click


@click.command()
@click.option("--preset", "preset_name", default="tiny", show_default=True, type=click.Choice(["tiny", "base"]))
@click.option("--seed", default=0, show_default=True, help="Seed for the weights and the generated clip.")
def main(preset_name: str, seed: int) -> None:
    """Build a CMDCL with random weights and classify a generated clip."""
    import torch

    from cmdcl.model import CMDCL, preset

    torch.manual_seed(seed)
    cfg = preset(preset_name)
    classes = ["make tea", "make coffee", "fry egg", "make pancake"]
    model = CMDCL(cfg, classes).eval()
    size, frames = cfg.vision.image_size, cfg.num_frames
    # A moving bright square on a dark background, uint8 RGB [1, F, H, W, 3].
    clip = torch.full((1, frames, size, size, 3), 30, dtype=torch.uint8)
    for t in range(frames):
        x = t * (size // 2) // max(frames - 1, 1)
        clip[0, t, size // 4 : size // 4 + size // 3, x : x + size // 3] = 220
    with torch.no_grad():
        probs = model.probabilities(model(clip)[0])[0]
    click.echo(f"CMDCL {preset_name} (random weights, {frames} frames of {size}x{size}):")
    for p, i in zip(*probs.topk(3)):
        click.echo(f"  {classes[i]:<12} {p.item():.3f}")


if __name__ == "__main__":
    main()
